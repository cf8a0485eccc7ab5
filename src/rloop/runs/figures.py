"""Interactive plotly figures built from the tidy tables of a run directory.

Every builder looks for one table by name and for the columns it needs; when the table is
absent the figure is skipped silently, when it is present but unusable (a column missing, no
finite values) the figure is skipped with a one-line note. Nothing here raises for bad
tables: :func:`run_figures` and :func:`compare_figures` catch a builder's failure and turn it
into a note, so a report always renders.

Tables and columns read (names as the experiments write them):

- ``heads`` (ablate): ``layer``, ``head``, ``mean_impact``; optional ``ci_low``, ``ci_high``,
  ``p``, ``p_bh``, ``computed``, ``mean_kl``, ``kl_ci_low``, ``kl_ci_high``.
- ``profile`` (contraction): ``group``, ``layer``, ``pr``; optional ``pr_mode``.
- ``results`` (contraction): ``group``, ``r_v``; optional ``prompt_id``, ``pr_mode`` and the
  prompt text as ``text`` / ``prompt_text`` / ``prompt``, or a ``prompts`` table
  (``prompt_id``, ``text``) to look it up.
- ``layer_sweep`` (contraction): ``layer_late``, ``hedges_g``; optional ``hedges_g_ci_low``,
  ``hedges_g_ci_high``, ``pr_mode``, ``welch_p``.
- ``generations`` (kv-patch): ``kind``, ``alpha`` and the metrics ``r_v_generated`` /
  ``score``; optional ``range_label``; rows of kind ``natural_target`` / ``natural_source``
  give the reference levels.
- ``spec_curve`` (robustness): one row per specification, ``effect``, ``ci_low``,
  ``ci_high``; optional ``p``, ``p_bh``, ``n``, ``spec_id``; every other column is a
  specification choice (e.g. ``layer_early``, ``layer_late``, ``window``, ``pr_mode``,
  ``point``, ``baseline_group``).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative, sample_colorscale
from plotly.subplots import make_subplots

PALETTE = qualitative.Plotly
GRID = "#e5eaf2"
# A small template in the spirit of plotly_white. Named templates are deep-copied into every
# figure (about 70 ms each); this one costs almost nothing and keeps the JSON small.
PLOTLY_TEMPLATE = {
    "layout": {
        "paper_bgcolor": "white",
        "plot_bgcolor": "white",
        "colorway": PALETTE,
        "font": {"color": "#2a3f5f"},
        "hovermode": "closest",
        "hoverlabel": {"align": "left"},
        "xaxis": {"gridcolor": GRID, "linecolor": GRID, "zerolinecolor": GRID, "automargin": True},
        "yaxis": {"gridcolor": GRID, "linecolor": GRID, "zerolinecolor": GRID, "automargin": True},
    }
}

# Columns of a spec_curve table that are results, not specification choices.
SPEC_RESULT_COLUMNS = ("effect", "ci_low", "ci_high", "p", "p_bh", "n", "spec_id", "significant")
SPEC_REQUIRED_COLUMNS = ("effect", "ci_low", "ci_high")
DOSE_METRICS = (("r_v_generated", "R_V (generated window)"), ("score", "behaviour score"))
PROMPT_TEXT_COLUMNS = ("text", "prompt_text", "prompt")
HOVER_TEXT_MAX = 300
MAX_STRIP_POINTS = 5000
MAX_INTEGER_TICKS = 12  # an integer axis (layers) gets at most about this many ticks


@dataclass(frozen=True)
class Figure:
    """One interactive figure: ``key`` is stable and page-unique (used as the element id)."""

    key: str
    title: str
    caption: str
    figure: go.Figure


class SkipFigure(Exception):
    """A figure cannot be drawn from the tables at hand; the message says why."""


Tables = Mapping[str, pd.DataFrame]
Builder = Callable[[Tables, Mapping], list[Figure]]


# ---------------------------------------------------------------------------- helpers


def format_number(value: object) -> str:
    """4 significant digits for floats (``NaN``, ``inf``), ``NaN`` for None, ``str`` otherwise."""
    if value is None:
        return "NaN"
    if isinstance(value, bool | np.bool_):
        return str(bool(value)).lower()
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        number = float(value)
        if math.isnan(number):
            return "NaN"
        return f"{number:.4g}"  # "inf" / "-inf" for infinities
    return str(value)


def _need(table: pd.DataFrame, name: str, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise SkipFigure(f"table {name} lacks column(s) {', '.join(missing)}")
    if table.empty:
        raise SkipFigure(f"table {name} is empty")


def _numeric(series: pd.Series) -> np.ndarray:
    return pd.to_numeric(series, errors="coerce").to_numpy(dtype=float)


def _colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def colours(n: int) -> list[str]:
    """``n`` distinct colours, one per line or group: Plotly's 10, Dark24 up to 24 and evenly
    spaced Turbo hues beyond (so 13 prompt groups never share a colour)."""
    if n <= len(PALETTE):
        return list(PALETTE[:n])
    if n <= len(qualitative.Dark24):
        return list(qualitative.Dark24[:n])
    return sample_colorscale("Turbo", [0.05 + 0.9 * i / (n - 1) for i in range(n)])


def integer_axis(values: Sequence[float]) -> dict:
    """Axis settings with ticks at whole numbers only (a layer axis): a step of 1, 2, 5, 10,
    20, ... chosen so that the range of ``values`` gets at most :data:`MAX_INTEGER_TICKS`."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    span = max(finite) - min(finite) if finite else 0.0
    step = next(step for step in _nice_steps() if span / step <= MAX_INTEGER_TICKS)
    return {"tickmode": "linear", "tick0": 0, "dtick": step}


def _nice_steps() -> Iterator[int]:
    """1, 2, 5, 10, 20, 50, 100, ..."""
    scale = 1
    while True:
        for factor in (1, 2, 5):
            yield factor * scale
        scale *= 10


def _shorten(text: object, limit: int = HOVER_TEXT_MAX) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _escape(text: object) -> str:
    """Text for a hover label or legend: plotly reads ``<...>`` there as markup."""
    return html.escape(str(text), quote=False)


def _wrap(text: str, width: int = 60) -> str:
    """Break a hover text into lines of about ``width`` characters (plotly's ``<br>``)."""
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    if line:
        lines.append(line)
    return "<br>".join(lines)


def _layout(fig: go.Figure, title: str, height: int = 450, **axes: object) -> go.Figure:
    fig.update_layout(
        template=PLOTLY_TEMPLATE,
        title={"text": title, "x": 0.01},
        height=height,
        margin={"l": 60, "r": 30, "t": 60, "b": 60},
        legend={"orientation": "v"},
        **axes,
    )
    return fig


def _modes(table: pd.DataFrame) -> list[object]:
    """The PR modes in a table (``[None]`` when it has no ``pr_mode`` column)."""
    if "pr_mode" not in table.columns:
        return [None]
    return list(dict.fromkeys(table["pr_mode"].dropna()))


def _of_mode(table: pd.DataFrame, mode: object) -> pd.DataFrame:
    return table if mode is None else table[table["pr_mode"] == mode]


def _mode_suffix(mode: object) -> str:
    return "" if mode is None else f" ({mode})"


def _slug(text: object) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in str(text)).strip("-").lower() or "x"


def _measured_layers(manifest: Mapping) -> tuple[int | None, int | None]:
    layers = manifest.get("layers") if isinstance(manifest, Mapping) else None
    if not isinstance(layers, Mapping):
        return None, None
    early, late = layers.get("early"), layers.get("late")
    return (
        int(early) if isinstance(early, int | float) else None,
        int(late) if isinstance(late, int | float) else None,
    )


def _mean_sem(values: pd.Series) -> tuple[float, float, int]:
    finite = values[np.isfinite(values)]
    n = int(len(finite))
    if n == 0:
        return float("nan"), float("nan"), 0
    sem = float(finite.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return float(finite.mean()), sem, n


# ---------------------------------------------------------------------------- ablation heatmap


def ablation_heatmaps(tables: Tables, manifest: Mapping) -> list[Figure]:
    """Layer x head heatmap of the mean R_V impact of ablating each head (and of the KL when
    the sweep measured it); hover: value, bootstrap 95 % CI, p and BH-adjusted p."""
    heads = tables.get("heads")
    if heads is None or "mean_impact" not in heads.columns:
        return []
    _need(heads, "heads", ("layer", "head", "mean_impact"))
    frame = heads.copy()
    frame["layer"] = pd.to_numeric(frame["layer"], errors="coerce")
    frame["head"] = pd.to_numeric(frame["head"], errors="coerce")
    frame = frame.dropna(subset=["layer", "head"])
    if frame.empty:
        raise SkipFigure("table heads has no numeric layer/head values")
    early, late = _measured_layers(manifest)
    measured = f" (R_V = PR L{late} / PR L{early})" if early is not None else ""
    specs = [_HeatmapSpec("mean_impact", "ci_low", "ci_high", "R_V impact", True)]
    if "mean_kl" in frame.columns:
        specs.append(
            _HeatmapSpec("mean_kl", "kl_ci_low", "kl_ci_high", "last-token KL (nats)", False)
        )
    return [_ablation_heatmap(frame, spec, measured) for spec in specs]


@dataclass(frozen=True)
class _HeatmapSpec:
    """One heatmap of the heads table: the value column, its CI columns, what it measures,
    and whether it is signed (a diverging colour scale centred on 0)."""

    column: str
    low_column: str
    high_column: str
    what: str
    diverging: bool


def _head_hover(record: Mapping, layer: int, head: int, spec: _HeatmapSpec, value: float) -> str:
    """Hover text of one head's cell: value, CI, p, BH-adjusted p and rank when present."""
    lines = [f"layer {layer}, head {head}", f"{spec.what}: {format_number(value)}"]
    if spec.low_column in record and spec.high_column in record:
        low, high = record[spec.low_column], record[spec.high_column]
        lines.append(f"95% CI: [{format_number(low)}, {format_number(high)}]")
    for name, label in (("p", "p"), ("p_bh", "p (BH)"), ("rank", "rank")):
        if name in record:
            lines.append(f"{label}: {format_number(record[name])}")
    if "computed" in record and not bool(record["computed"]):
        lines.append("not computed: at or after the late layer (exactly 0)")
    return "<br>".join(lines)


def _ablation_heatmap(frame: pd.DataFrame, spec: _HeatmapSpec, measured: str) -> Figure:
    """The layer x head heatmap of ``spec.column`` from heads rows with numeric layer/head."""
    layers = sorted(int(x) for x in frame["layer"].unique())
    n_heads = int(frame["head"].max()) + 1
    row_of = {layer: i for i, layer in enumerate(layers)}
    z = np.full((len(layers), n_heads), np.nan)  # (layers, heads)
    hover = np.full((len(layers), n_heads), "no value", dtype=object)  # (layers, heads)
    for row in frame.itertuples(index=False):
        record = row._asdict()
        i, j = row_of[int(record["layer"])], int(record["head"])
        value = pd.to_numeric(record.get(spec.column), errors="coerce")
        z[i, j] = value
        hover[i, j] = _head_hover(record, layers[i], j, spec, value)
    if not np.isfinite(z).any():
        raise SkipFigure(f"table heads has no finite {spec.column}")
    scale = float(np.nanmax(np.abs(z))) or 1.0
    heatmap = go.Heatmap(
        z=z,
        x=list(range(n_heads)),
        y=[str(layer) for layer in layers],
        text=hover,
        hovertemplate="%{text}<extra></extra>",
        colorscale="RdBu_r" if spec.diverging else "Viridis",
        zmid=0.0 if spec.diverging else None,
        zmin=-scale if spec.diverging else None,
        zmax=scale if spec.diverging else None,
        colorbar={"title": {"text": spec.column}},
    )
    fig = _layout(
        go.Figure(heatmap),
        f"{spec.what} of ablating each head{measured}",
        height=max(350, 22 * len(layers) + 150),
        xaxis={"title": {"text": "head"}, "dtick": 1},
        yaxis={"title": {"text": "layer"}, "autorange": "reversed", "type": "category"},
    )
    return Figure(
        key=f"ablation-heatmap-{_slug(spec.column)}",
        title=f"Head ablation: {spec.column} by layer and head",
        caption="Hover a cell for the value, its bootstrap 95% CI, p and BH-adjusted p.",
        figure=fig,
    )


# ---------------------------------------------------------------------------- contraction


def pr_profiles(tables: Tables, manifest: Mapping) -> list[Figure]:
    """Mean participation ratio by layer, one line per prompt group (one figure per PR mode);
    hover: mean, standard error and n; the measured early/late layers are marked."""
    profile = tables.get("profile")
    if profile is None:
        return []
    _need(profile, "profile", ("group", "layer", "pr"))
    layers = _measured_layers(manifest)
    return [_pr_profile(_of_mode(profile, mode).copy(), mode, layers) for mode in _modes(profile)]


def _pr_profile(
    frame: pd.DataFrame, mode: object, measured: tuple[int | None, int | None]
) -> Figure:
    """PR by layer of one PR mode's profile rows, a line per group; ``measured`` is the
    (early, late) layer pair of R_V (None when unknown), marked with dashed lines."""
    frame["pr"] = _numeric(frame["pr"])
    frame["layer"] = pd.to_numeric(frame["layer"], errors="coerce")
    fig = go.Figure()
    palette = colours(frame["group"].nunique())
    for k, (group, sub) in enumerate(frame.groupby("group", sort=True)):
        stats = [
            (layer, *_mean_sem(values["pr"])) for layer, values in sub.groupby("layer", sort=True)
        ]
        fig.add_trace(
            go.Scatter(
                x=[s[0] for s in stats],
                y=[s[1] for s in stats],
                mode="lines+markers",
                name=_escape(group),
                line={"color": palette[k]},
                marker={"size": 5},
                customdata=[[format_number(s[2]), s[3]] for s in stats],
                hovertemplate=(
                    f"group {_escape(group)}<br>layer %{{x}}<br>mean PR %{{y:.4g}}"
                    "<br>SEM %{customdata[0]}<br>n %{customdata[1]}<extra></extra>"
                ),
            )
        )
    if not fig.data:
        raise SkipFigure("table profile has no rows")
    for layer, label in zip(measured, ("early", "late"), strict=True):
        if layer is not None:
            fig.add_vline(
                x=layer,
                line={"dash": "dash", "color": "grey", "width": 1},
                annotation_text=f"{label} L{layer}",
            )
    _layout(
        fig,
        f"Participation ratio by layer{_mode_suffix(mode)}",
        xaxis={"title": {"text": "layer"}, **integer_axis(frame["layer"])},
        yaxis={"title": {"text": "PR (mean over prompts)"}},
    )
    caption = "Click a group in the legend to hide it; double-click to isolate it."
    title = f"PR-by-layer profile per group{_mode_suffix(mode)}"
    return Figure(key=f"pr-profile-{_slug(mode)}", title=title, caption=caption, figure=fig)


def _prompt_texts(results: pd.DataFrame, tables: Tables) -> pd.Series | None:
    for column in PROMPT_TEXT_COLUMNS:
        if column in results.columns:
            return results[column]
    prompts = tables.get("prompts")
    if prompts is not None and "prompt_id" in results.columns and "prompt_id" in prompts:
        for column in PROMPT_TEXT_COLUMNS:
            if column in prompts.columns:
                lookup = prompts.drop_duplicates("prompt_id").set_index("prompt_id")[column]
                return results["prompt_id"].map(lookup)
    return None


def r_v_strips(tables: Tables, manifest: Mapping) -> list[Figure]:
    """Per-prompt R_V as a strip plot by group (one figure per PR mode), group means as bars;
    hover: prompt id, R_V and the prompt text when the run recorded it."""
    results = tables.get("results")
    if results is None or "r_v" not in results.columns or "group" not in results.columns:
        return []
    _need(results, "results", ("group", "r_v"))
    texts = _prompt_texts(results, tables)
    rng = np.random.default_rng(0)  # the jitter only spreads points; fixed so pages are stable
    figures = []
    for mode in _modes(results):
        frame = _of_mode(results, mode)
        if len(frame) > MAX_STRIP_POINTS:
            frame = frame.iloc[:MAX_STRIP_POINTS]
        groups = sorted(frame["group"].dropna().unique(), key=str)
        fig = go.Figure()
        palette = colours(len(groups))
        for k, group in enumerate(groups):
            sub = frame[frame["group"] == group]
            values = _numeric(sub["r_v"])
            jitter = rng.uniform(-0.3, 0.3, size=len(sub))  # (n,)
            ids = sub["prompt_id"].astype(str) if "prompt_id" in sub else sub.index.astype(str)
            hover = []
            for position, (pid, value) in enumerate(zip(ids, values, strict=True)):
                line = f"{_escape(pid)} ({_escape(group)})<br>R_V {format_number(value)}"
                if texts is not None:
                    text = texts.loc[sub.index[position]]
                    if isinstance(text, str) and text:
                        line += "<br>" + _wrap(_escape(_shorten(text)))
                hover.append(line)
            finite = np.isfinite(values)
            fig.add_trace(
                go.Scatter(
                    x=k + jitter[finite],
                    y=values[finite],
                    mode="markers",
                    name=_escape(group),
                    marker={"color": palette[k], "size": 7, "opacity": 0.75},
                    text=[h for h, f in zip(hover, finite, strict=True) if f],
                    hovertemplate="%{text}<extra></extra>",
                )
            )
            if finite.any():
                mean = float(values[finite].mean())
                fig.add_trace(
                    go.Scatter(
                        x=[k - 0.4, k + 0.4],
                        y=[mean, mean],
                        mode="lines",
                        line={"color": "black", "width": 2},
                        showlegend=False,
                        hovertemplate=f"{_escape(group)}: mean R_V {mean:.4g}<extra></extra>",
                    )
                )
        if not fig.data:
            raise SkipFigure("table results has no finite r_v")
        _layout(
            fig,
            f"R_V per prompt by group{_mode_suffix(mode)}",
            showlegend=False,
            xaxis={
                "title": {"text": "group"},
                "tickvals": list(range(len(groups))),
                "ticktext": [_escape(g) for g in groups],
            },
            yaxis={"title": {"text": "R_V = PR(late) / PR(early)"}},
        )
        note = "" if texts is not None else " (this run did not record prompt texts)"
        figures.append(
            Figure(
                key=f"r-v-strip-{_slug(mode)}",
                title=f"R_V per prompt{_mode_suffix(mode)}",
                caption=f"One point per prompt, black lines are group means; hover for the "
                f"prompt{note}.",
                figure=fig,
            )
        )
    return figures


def layer_sweep_effects(tables: Tables, manifest: Mapping) -> list[Figure]:
    """Hedges' g of R_V (recursive vs baseline) against the late layer, one line per PR mode,
    with its bootstrap CI as error bars."""
    sweep = tables.get("layer_sweep")
    if sweep is None:
        return []
    _need(sweep, "layer_sweep", ("layer_late", "hedges_g"))
    fig = go.Figure()
    for k, mode in enumerate(_modes(sweep)):
        frame = _of_mode(sweep, mode).sort_values("layer_late")
        g = _numeric(frame["hedges_g"])
        error = None
        if {"hedges_g_ci_low", "hedges_g_ci_high"} <= set(frame.columns):
            error = {
                "type": "data",
                "symmetric": False,
                "array": _numeric(frame["hedges_g_ci_high"]) - g,
                "arrayminus": g - _numeric(frame["hedges_g_ci_low"]),
                "thickness": 1,
            }
        p = frame["welch_p"].map(format_number) if "welch_p" in frame else ["NaN"] * len(frame)
        fig.add_trace(
            go.Scatter(
                x=_numeric(frame["layer_late"]),
                y=g,
                error_y=error,
                mode="lines+markers",
                name=str(mode) if mode is not None else "hedges_g",
                line={"color": _colour(k)},
                customdata=np.asarray(list(p), dtype=object).reshape(-1, 1),
                hovertemplate="late layer %{x}<br>Hedges g %{y:.3g}<br>Welch p %{customdata[0]}"
                "<extra></extra>",
            )
        )
    fig.add_hline(y=0, line={"color": "grey", "width": 1})
    _layout(
        fig,
        "Effect size by late layer (early layer fixed)",
        xaxis={"title": {"text": "late layer"}, **integer_axis(_numeric(sweep["layer_late"]))},
        yaxis={"title": {"text": "Hedges g, recursive vs baseline"}},
    )
    return [
        Figure(
            key="layer-sweep-effect",
            title="Effect size by late layer",
            caption="Negative g: recursive prompts contract more. Error bars: bootstrap 95% CI.",
            figure=fig,
        )
    ]


# ---------------------------------------------------------------------------- kv-patch


def _dose_stats(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    records = []
    for alpha, sub in rows.groupby("alpha", sort=True):
        mean, sem, n = _mean_sem(pd.Series(_numeric(sub[metric])))
        records.append({"alpha": float(alpha), "mean": mean, "sem": sem, "n": n})
    return pd.DataFrame(records, columns=["alpha", "mean", "sem", "n"])


def _dose_correlation(table: pd.DataFrame | None, metric: str, ranges: Sequence[str]) -> str:
    """ ", Spearman ρ r [lo, hi]" of alpha with ``metric`` from the dose_response table (only
    with a single layer range, where the table has one row per metric); else ""."""
    if table is None or len(ranges) != 1 or not {"y", "r"} <= set(table.columns):
        return ""
    rows = table[table["y"] == metric]
    if len(rows) != 1:
        return ""
    row = rows.iloc[0]
    text = f", Spearman ρ {format_number(row['r'])}"
    if "ci_low" in row and "ci_high" in row:
        text += f" [{format_number(row['ci_low'])}, {format_number(row['ci_high'])}]"
    return text


# Condition kinds of a KV-mixing grid (kv-patch, validate) besides the mixed "kv" rows.
KV_NATURAL_KINDS = ("natural_target", "natural_source")


def dose_responses(tables: Tables, manifest: Mapping) -> list[Figure]:
    """Mean R_V of the generated window and behaviour score against the KV mixing weight
    alpha (one line per layer range), with the natural target and source levels dashed."""
    grid = tables.get("generations")
    if grid is None:
        return []
    _need(grid, "generations", ("kind", "alpha"))
    if not grid["kind"].isin(("kv", *KV_NATURAL_KINDS)).any():
        return []  # not a KV-mixing grid (e.g. rloop steer's generations): nothing to skip
    metrics = [(m, label) for m, label in DOSE_METRICS if m in grid.columns]
    if not metrics:
        raise SkipFigure("table generations has neither r_v_generated nor score")
    kv = grid[grid["kind"] == "kv"].copy()
    kv["alpha"] = pd.to_numeric(kv["alpha"], errors="coerce")
    kv = kv.dropna(subset=["alpha"])
    if kv["alpha"].nunique() < 2:
        raise SkipFigure("table generations has fewer than two alpha values of kind 'kv'")
    ranges = list(dict.fromkeys(kv["range_label"].astype(str))) if "range_label" in kv else ["kv"]
    titles = [
        label + _dose_correlation(tables.get("dose_response"), m, ranges) for m, label in metrics
    ]
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=titles)
    for col, (metric, label) in enumerate(metrics, start=1):
        for k, label_range in enumerate(ranges):
            rows = (
                kv if "range_label" not in kv else kv[kv["range_label"].astype(str) == label_range]
            )
            stats = _dose_stats(rows, metric)
            fig.add_trace(
                go.Scatter(
                    x=stats["alpha"],
                    y=stats["mean"],
                    error_y={"type": "data", "array": stats["sem"], "thickness": 1},
                    mode="lines+markers",
                    name=f"layers {label_range}",
                    legendgroup=label_range,
                    showlegend=col == 1,
                    line={"color": _colour(k)},
                    customdata=np.stack([stats["sem"].map(format_number), stats["n"]], axis=-1),
                    hovertemplate=f"layers {label_range}<br>alpha %{{x}}<br>mean {metric} "
                    "%{y:.4g}<br>SEM %{customdata[0]}<br>n %{customdata[1]}<extra></extra>",
                ),
                row=1,
                col=col,
            )
        for kind, colour in (("natural_target", "#1f77b4"), ("natural_source", "#d62728")):
            level = _numeric(grid.loc[grid["kind"] == kind, metric])
            level = level[np.isfinite(level)]
            if len(level):
                fig.add_hline(
                    y=float(level.mean()),
                    line={"dash": "dash", "color": colour, "width": 1},
                    annotation_text=kind.replace("_", " "),
                    row=1,
                    col=col,
                )
        fig.update_xaxes(title_text="alpha (share of the source KV)", row=1, col=col)
        fig.update_yaxes(title_text=label, row=1, col=col)
    _layout(fig, "Dose-response of KV mixing")
    return [
        Figure(
            key="dose-response",
            title="Dose-response (KV mixing weight alpha)",
            caption="Means over pairs with standard errors; dashed lines: unpatched target "
            "and source.",
            figure=fig,
        )
    ]


# ---------------------------------------------------------------------------- spec curve


def spec_choice_columns(table: pd.DataFrame) -> list[str]:
    """The specification-choice columns of a spec_curve table (all but the result columns)."""
    return [c for c in table.columns if c not in SPEC_RESULT_COLUMNS]


def _spec_hover(frame: pd.DataFrame, choices: Sequence[str]) -> list[str]:
    """Hover text per specification: effect, CI, p (when present) and its choices."""
    hover = []
    for _, row in frame.iterrows():
        lines = [f"effect {format_number(row['effect'])}"]
        lines.append(f"95% CI [{format_number(row['ci_low'])}, {format_number(row['ci_high'])}]")
        if "p" in frame:
            lines.append(f"p {format_number(row['p'])}")
        lines += [f"{_escape(c)}: {_escape(format_number(row[c]))}" for c in choices]
        hover.append("<br>".join(lines))
    return hover


def _add_spec_effects(
    fig: go.Figure, frame: pd.DataFrame, excludes_zero: np.ndarray, hover: Sequence[str]
) -> None:
    """Top panel: each specification's effect (sorted, x = rank from 1) with its CI as error
    bars, one trace for CIs that exclude 0 and one for those that include it."""
    rank = np.arange(1, len(frame) + 1)
    for significant, colour, name in (
        (True, "#d62728", "CI excludes 0"),
        (False, "grey", "CI includes 0"),
    ):
        mask = excludes_zero == significant
        if not mask.any():
            continue
        sub = frame[mask]
        fig.add_trace(
            go.Scatter(
                x=rank[mask],
                y=sub["effect"],
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": sub["ci_high"] - sub["effect"],
                    "arrayminus": sub["effect"] - sub["ci_low"],
                    "thickness": 1,
                    "color": colour,
                },
                mode="markers",
                marker={"color": colour, "size": 6},
                name=name,
                text=[h for h, m in zip(hover, mask, strict=True) if m],
                hovertemplate="spec %{x}<br>%{text}<extra></extra>",
            ),
            row=1,
            col=1,
        )


def _add_spec_choices(
    fig: go.Figure, frame: pd.DataFrame, levels: Sequence[tuple[str, str]]
) -> None:
    """Bottom panel: a tick per specification (x = rank) at each (choice = level) it made."""
    rank = np.arange(1, len(frame) + 1)
    labels = [_escape(f"{c} = {v}") for c, v in levels]
    xs, ys = [], []
    for column, value in levels:
        hits = (frame[column].map(format_number) == value).to_numpy()
        xs += list(rank[hits])
        ys += [_escape(f"{column} = {value}")] * int(hits.sum())
    fig.add_trace(
        go.Scatter(
            x=xs,
            y=ys,
            mode="markers",
            marker={"symbol": "line-ns-open", "size": 10, "color": "#444"},
            showlegend=False,
            hovertemplate="spec %{x}: %{y}<extra></extra>",
        ),
        row=2,
        col=1,
    )
    fig.update_yaxes(
        type="category", categoryorder="array", categoryarray=labels[::-1], row=2, col=1
    )


def spec_curves(tables: Tables, manifest: Mapping) -> list[Figure]:
    """Specification curve: every specification's effect with its CI, sorted by effect, above
    a panel that marks which choice each specification made (Simonsohn et al. 2020)."""
    table = tables.get("spec_curve")
    if table is None:
        return []
    _need(table, "spec_curve", SPEC_REQUIRED_COLUMNS)
    frame = table.copy()
    for column in SPEC_REQUIRED_COLUMNS:
        frame[column] = _numeric(frame[column])
    frame = frame[np.isfinite(frame["effect"])].sort_values("effect", ignore_index=True)
    if frame.empty:
        raise SkipFigure("table spec_curve has no finite effect")
    choices = spec_choice_columns(frame)
    excludes_zero = (frame["ci_low"] > 0) | (frame["ci_high"] < 0)
    levels = [(c, str(v)) for c in choices for v in dict.fromkeys(frame[c].map(format_number))]
    n_rows = 2 if levels else 1
    fig = make_subplots(
        rows=n_rows,
        cols=1,
        shared_xaxes=True,
        row_heights=[0.6, 0.4] if levels else [1.0],
        vertical_spacing=0.04,
    )
    _add_spec_effects(fig, frame, excludes_zero.to_numpy(), _spec_hover(frame, choices))
    fig.add_hline(y=0, line={"color": "black", "width": 1}, row=1, col=1)
    if levels:
        _add_spec_choices(fig, frame, levels)
    fig.update_xaxes(title_text="specification (sorted by effect)", row=n_rows, col=1)
    fig.update_yaxes(title_text="effect", row=1, col=1)
    share = float(excludes_zero.mean())
    _layout(
        fig,
        f"Specification curve: {len(frame)} specifications, {share:.0%} with a CI excluding 0",
        height=450 + 18 * len(levels),
    )
    return [
        Figure(
            key="spec-curve",
            title="Specification curve",
            caption="Top: effect and 95% CI per specification, sorted. Bottom: the choices "
            "of each specification.",
            figure=fig,
        )
    ]


RUN_BUILDERS: tuple[tuple[str, Builder], ...] = (
    ("ablation heatmap", ablation_heatmaps),
    ("PR profile", pr_profiles),
    ("R_V strip plot", r_v_strips),
    ("layer sweep", layer_sweep_effects),
    ("dose-response", dose_responses),
    ("specification curve", spec_curves),
)


def _collect(builders: Sequence[tuple[str, Callable[[], list[Figure]]]]) -> tuple[list, list]:
    figures: list[Figure] = []
    notes: list[str] = []
    for name, build in builders:
        try:
            figures += build()
        except SkipFigure as skip:
            notes.append(f"{name} skipped: {skip}")
        except Exception as err:  # a bad table must not stop the report
            first = (str(err).strip().splitlines() or [""])[0]
            notes.append(f"{name} skipped: {type(err).__name__}: {first}")
    return figures, notes


def run_figures(tables: Tables, manifest: Mapping | None) -> tuple[list[Figure], list[str]]:
    """All interactive figures the tables of one run allow, and notes on skipped figures.

    ``tables`` maps table name -> DataFrame (only the tables that could be read);
    ``manifest`` is the run's manifest (for the measured layers), ``{}`` if unreadable.
    """
    manifest = manifest if isinstance(manifest, Mapping) else {}
    return _collect([(name, lambda b=build: b(tables, manifest)) for name, build in RUN_BUILDERS])


# ---------------------------------------------------------------------------- comparisons


@dataclass(frozen=True)
class CompareInput:
    """One run of a comparison: its label (run id), tables and manifest."""

    label: str
    tables: Tables
    manifest: Mapping


def _overlay(
    runs: Sequence[CompareInput],
    table_name: str,
    columns: Sequence[str],
    curve: Callable[[pd.DataFrame], tuple[Sequence, Sequence, Sequence[str]]],
) -> list[tuple[str, Sequence, Sequence, Sequence[str]]]:
    """(label, x, y, hover) per run that has ``table_name`` with ``columns``."""
    lines = []
    for run in runs:
        table = run.tables.get(table_name)
        if table is None or table.empty or any(c not in table.columns for c in columns):
            continue
        x, y, hover = curve(table)
        if len(x):
            lines.append((run.label, x, y, hover))
    return lines


def _overlay_figure(
    lines: Sequence[tuple[str, Sequence, Sequence, Sequence[str]]],
    key: str,
    title: str,
    xlabel: str,
    ylabel: str,
    caption: str,
    category_x: bool = False,
) -> list[Figure]:
    """One line per run; an x axis labelled with a layer gets integer ticks."""
    if len(lines) < 2:
        return []
    fig = go.Figure()
    palette = colours(len(lines))
    for k, (label, x, y, hover) in enumerate(lines):
        fig.add_trace(
            go.Scatter(
                x=list(x),
                y=list(y),
                mode="lines+markers",
                name=label,
                line={"color": palette[k]},
                marker={"size": 5},
                text=list(hover),
                hovertemplate=f"{label}<br>%{{text}}<extra></extra>",
            )
        )
    xaxis: dict = {"title": {"text": xlabel}}
    if category_x:
        xaxis["type"] = "category"
    elif xlabel.endswith("layer"):
        xaxis.update(integer_axis([v for _, x, _, _ in lines for v in x]))
    _layout(fig, title, xaxis=xaxis, yaxis={"title": {"text": ylabel}})
    return [Figure(key=key, title=title, caption=caption, figure=fig)]


def _profile_curve(group: object, mode: object):
    def curve(table: pd.DataFrame):
        frame = _of_mode(table, mode) if mode is None or "pr_mode" in table else table.iloc[:0]
        frame = frame[frame["group"] == group]
        stats = [
            (layer, *_mean_sem(pd.Series(_numeric(s["pr"])))) for layer, s in frame.groupby("layer")
        ]
        hover = [f"layer {s[0]}, mean PR {format_number(s[1])} (n {s[3]})" for s in stats]
        return [s[0] for s in stats], [s[1] for s in stats], hover

    return curve


def _sweep_curve(mode: object):
    def curve(table: pd.DataFrame):
        frame = _of_mode(table, mode) if mode is None or "pr_mode" in table else table.iloc[:0]
        frame = frame.sort_values("layer_late")
        g = _numeric(frame["hedges_g"])
        hover = [
            f"late layer {x}, g {format_number(v)}"
            for x, v in zip(frame["layer_late"], g, strict=True)
        ]
        return list(frame["layer_late"]), list(g), hover

    return curve


def _heads_curve(table: pd.DataFrame):
    frame = table.copy()
    frame["layer"] = pd.to_numeric(frame["layer"], errors="coerce")
    frame["head"] = pd.to_numeric(frame["head"], errors="coerce")
    frame = frame.dropna(subset=["layer", "head"]).sort_values(["layer", "head"])
    names = [f"L{int(a)}H{int(b)}" for a, b in zip(frame["layer"], frame["head"], strict=True)]
    values = _numeric(frame["mean_impact"])
    hover = [f"{n}: impact {format_number(v)}" for n, v in zip(names, values, strict=True)]
    return names, list(values), hover


def _dose_curve(metric: str, range_label: str | None):
    def curve(table: pd.DataFrame):
        rows = table[table["kind"] == "kv"].copy()
        if range_label is not None and "range_label" in rows:
            rows = rows[rows["range_label"].astype(str) == range_label]
        rows["alpha"] = pd.to_numeric(rows["alpha"], errors="coerce")
        stats = _dose_stats(rows.dropna(subset=["alpha"]), metric)
        hover = [
            f"alpha {a}, mean {format_number(m)} (n {n})"
            for a, m, n in zip(stats["alpha"], stats["mean"], stats["n"], strict=True)
        ]
        return list(stats["alpha"]), list(stats["mean"]), hover

    return curve


def _spec_curve(table: pd.DataFrame):
    effects = np.sort(_numeric(table["effect"])[np.isfinite(_numeric(table["effect"]))])
    hover = [f"spec {i + 1}: effect {format_number(v)}" for i, v in enumerate(effects)]
    return list(range(1, len(effects) + 1)), list(effects), hover


def _shared_values(runs: Sequence[CompareInput], table: str, column: str) -> list[object]:
    """Values of ``column`` present in ``table`` of at least two runs, in first-seen order."""
    counts: dict[object, int] = {}
    for run in runs:
        frame = run.tables.get(table)
        if frame is not None and column in frame.columns:
            for value in dict.fromkeys(frame[column].dropna()):
                counts[value] = counts.get(value, 0) + 1
    return [value for value, count in counts.items() if count >= 2]


def _compare_builders(runs: Sequence[CompareInput]) -> list[tuple[str, Callable[[], list]]]:
    def profiles() -> list[Figure]:
        modes = _shared_values(runs, "profile", "pr_mode") or [None]
        config = runs[0].manifest.get("config") or {}
        wanted = [config.get("recursive_group"), config.get("baseline_group")]
        groups = [g for g in wanted if g in _shared_values(runs, "profile", "group")]
        groups = groups or _shared_values(runs, "profile", "group")[:2]
        figures = []
        for mode in modes[:2]:
            for group in groups:
                lines = _overlay(
                    runs, "profile", ("group", "layer", "pr"), _profile_curve(group, mode)
                )
                figures += _overlay_figure(
                    lines,
                    f"compare-profile-{_slug(mode)}-{_slug(group)}",
                    f"PR by layer, group {group}{_mode_suffix(mode)}",
                    "layer",
                    "PR (mean over prompts)",
                    "One line per run.",
                )
        return figures

    def sweeps() -> list[Figure]:
        figures = []
        for mode in _shared_values(runs, "layer_sweep", "pr_mode") or [None]:
            lines = _overlay(runs, "layer_sweep", ("layer_late", "hedges_g"), _sweep_curve(mode))
            figures += _overlay_figure(
                lines,
                f"compare-sweep-{_slug(mode)}",
                f"Hedges g by late layer{_mode_suffix(mode)}",
                "late layer",
                "Hedges g",
                "One line per run.",
            )
        return figures

    def heads() -> list[Figure]:
        lines = _overlay(runs, "heads", ("layer", "head", "mean_impact"), _heads_curve)
        return _overlay_figure(
            lines,
            "compare-heads",
            "Mean R_V impact per head",
            "head (layer-major order)",
            "mean impact",
            "One line per run; heads in layer, head order.",
            category_x=True,
        )

    def doses() -> list[Figure]:
        figures = []
        ranges = [str(r) for r in _shared_values(runs, "generations", "range_label")] or [None]
        for metric, label in DOSE_METRICS:
            for range_label in ranges:
                lines = _overlay(
                    runs, "generations", ("kind", "alpha", metric), _dose_curve(metric, range_label)
                )
                suffix = f", layers {range_label}" if range_label else ""
                figures += _overlay_figure(
                    lines,
                    f"compare-dose-{_slug(metric)}-{_slug(range_label)}",
                    f"Dose-response: {label}{suffix}",
                    "alpha",
                    label,
                    "Means over pairs, one line per run.",
                )
        return figures

    def specs() -> list[Figure]:
        lines = _overlay(runs, "spec_curve", ("effect",), _spec_curve)
        return _overlay_figure(
            lines,
            "compare-spec-curve",
            "Specification curves (sorted effects)",
            "specification rank",
            "effect",
            "One line per run.",
        )

    return [
        ("PR profile overlay", profiles),
        ("layer sweep overlay", sweeps),
        ("head impact overlay", heads),
        ("dose-response overlay", doses),
        ("specification curve overlay", specs),
    ]


def compare_figures(runs: Sequence[CompareInput]) -> tuple[list[Figure], list[str]]:
    """Curves of two or more runs overlaid (PR profiles, layer sweeps, head impacts,
    dose-responses, specification curves: whichever tables at least two runs share)."""
    return _collect(_compare_builders(runs))
