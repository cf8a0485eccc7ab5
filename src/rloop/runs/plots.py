"""Plots (PNG, matplotlib Agg) shared by the experiments. Each function writes one file.

Every figure is finished by :func:`finish_figure` (through :func:`_save`): an axis whose label
names a whole-number quantity (layer, pair, head, step, block) gets integer ticks, the layout
is tightened, and a title wider than the figure is wrapped onto more lines instead of being
clipped. :func:`group_colours` gives every prompt group its own colour, for any number of
groups.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.ticker import AutoLocator, MaxNLocator  # noqa: E402

# Words of an axis label (before any parenthesis) that name a whole-number quantity.
INTEGER_AXIS_WORDS = frozenset(
    {"layer", "layers", "pair", "pairs", "head", "heads", "step", "steps", "block", "blocks"}
)
MIN_TITLE_CHARS = 12  # a wrapped title keeps at least this many characters per line
_FIT_ROUNDS = 3


def group_colours(n: int) -> list[str]:
    """``n`` distinct colours (hex): tab10, then the light tab20 shades, then evenly spaced
    hues of the turbo map when more than 20 are needed."""
    tab20 = plt.get_cmap("tab20")
    palette = [to_hex(tab20(2 * i)) for i in range(10)] + [
        to_hex(tab20(2 * i + 1)) for i in range(10)
    ]
    if n <= len(palette):
        return palette[:n]
    turbo = plt.get_cmap("turbo")
    return [to_hex(turbo(x)) for x in np.linspace(0.05, 0.95, n)]


def integer_ticks(axis) -> None:
    """Ticks of ``axis`` (``ax.xaxis`` / ``ax.yaxis``) at whole numbers only."""
    axis.set_major_locator(MaxNLocator(integer=True))


def names_whole_numbers(label: str) -> bool:
    """Whether an axis label (e.g. "late layer", "pair", "generation step (0 = ...)") names a
    whole-number quantity: a word of :data:`INTEGER_AXIS_WORDS` before any parenthesis."""
    words = re.findall(r"[a-z_]+", label.split("(", 1)[0].lower())
    return any(word in INTEGER_AXIS_WORDS for word in words)


def _integer_axes(fig) -> None:
    """Integer ticks on every axis with the default locator whose label names whole numbers
    (fixed tick labels, log and category axes keep their own locator)."""
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if type(axis.get_major_locator()) is AutoLocator and names_whole_numbers(
                axis.get_label_text()
            ):
                integer_ticks(axis)


def _titles(fig) -> list:
    """The title texts of a figure: each axes' centred title and the suptitle, if any."""
    texts = [ax.title for ax in fig.axes if ax.title.get_text()]
    suptitle = getattr(fig, "_suptitle", None)
    if suptitle is not None and suptitle.get_text():
        texts.append(suptitle)
    return texts


def _wrap_wide_titles(fig) -> bool:
    """Wrap every title that reaches past the figure's left or right edge to the room it has
    (twice the distance from its centre to the nearer edge); True when one was wrapped."""
    renderer = fig.canvas.get_renderer()
    width = fig.bbox.width
    wrapped = False
    for text in _titles(fig):
        box = text.get_window_extent(renderer)
        if box.x0 >= 0 and box.x1 <= width:
            continue
        centre = (box.x0 + box.x1) / 2
        room = 2 * max(min(centre, width - centre), 1.0)
        lines = text.get_text().splitlines() or [""]
        longest = max(len(line) for line in lines)
        chars = max(MIN_TITLE_CHARS, int(longest * room / box.width * 0.95))
        if chars >= longest:
            chars = longest - 1
        if chars < MIN_TITLE_CHARS:
            continue
        text.set_text("\n".join(textwrap.fill(line, chars) for line in lines))
        wrapped = True
    return wrapped


def finish_figure(fig) -> None:
    """Integer ticks where the axis counts whole things, a tight layout, and titles that fit
    the figure (wrapped when wider), the layout tightened again after each wrap."""
    _integer_axes(fig)
    fig.tight_layout()
    for _ in range(_FIT_ROUNDS):
        if not _wrap_wide_titles(fig):
            break
        fig.tight_layout()


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    finish_figure(fig)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def r_v_by_group_figure(results: pd.DataFrame):
    """The figure of :func:`r_v_by_group`: group names at 45 degrees, each anchored by its
    end at its tick (so long names do not run into their neighbours), panels wide enough for
    the number of groups."""
    modes = sorted(results["pr_mode"].unique())
    n_groups = results["group"].nunique()
    width = max(6.0, 0.45 * n_groups + 1.5)
    fig, axes = plt.subplots(1, len(modes), figsize=(width * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        frame = results[results.pr_mode == mode]
        groups = sorted(frame["group"].unique())
        data = [frame.loc[frame.group == g, "r_v"].dropna().to_numpy() for g in groups]
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(
            range(1, len(groups) + 1), groups, rotation=45, ha="right", rotation_mode="anchor"
        )
        rng = np.random.default_rng(0)
        for i, values in enumerate(data, start=1):
            ax.scatter(i + rng.uniform(-0.15, 0.15, len(values)), values, s=10, alpha=0.6)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        e, late = int(frame.layer_early.iloc[0]), int(frame.layer_late.iloc[0])
        ax.set_title(f"R_V = PR(L{late}) / PR(L{e}), {mode}")
        ax.set_ylabel("R_V")
    return fig


def r_v_by_group(results: pd.DataFrame, path: Path) -> Path:
    """Strip + box plot of R_V per prompt group, one panel per PR mode."""
    return _save(r_v_by_group_figure(results), path)


def pr_profile_figure(profile: pd.DataFrame, early: int, late: int):
    """The figure of :func:`pr_profile`: one colour per group (the same in every panel), the
    legend outside the panels on the right, integer layer ticks."""
    modes = sorted(profile["pr_mode"].unique())
    groups = sorted(profile["group"].unique())
    colour_of = dict(zip(groups, group_colours(len(groups)), strict=True))
    legend_width = 1.2 + 1.1 * (len(groups) > 16)
    fig, axes = plt.subplots(
        1, len(modes), figsize=(6 * len(modes) + legend_width, 4), squeeze=False
    )
    for ax, mode in zip(axes[0], modes, strict=True):
        frame = profile[profile.pr_mode == mode]
        stats = frame.groupby(["group", "layer"])["pr"].agg(["mean", "sem"]).reset_index()
        for group, g in stats.groupby("group"):
            colour = colour_of[group]
            ax.plot(g["layer"], g["mean"], label=group, lw=1.2, color=colour)
            ax.fill_between(
                g["layer"], g["mean"] - g["sem"], g["mean"] + g["sem"], alpha=0.15, color=colour
            )
        for layer in (early, late):
            ax.axvline(layer, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("layer")
        integer_ticks(ax.xaxis)
        ax.set_ylabel("participation ratio")
        ax.set_title(f"PR by layer ({mode})")
    legend_outside(axes[0][-1], title="group", ncol=1 if len(groups) <= 16 else 2)
    return fig


def pr_profile(profile: pd.DataFrame, path: Path, early: int, late: int) -> Path:
    """Mean PR by layer per group (shaded: +-1 standard error), one panel per PR mode."""
    return _save(pr_profile_figure(profile, early, late), path)


def effect_by_layer(sweep: pd.DataFrame, path: Path) -> Path:
    """Hedges' g of R_V (recursive vs baseline) against the late layer, with bootstrap CI."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, frame in sweep.groupby("pr_mode"):
        ax.plot(frame["layer_late"], frame["hedges_g"], marker="o", ms=3, label=mode)
        ax.fill_between(
            frame["layer_late"], frame["hedges_g_ci_low"], frame["hedges_g_ci_high"], alpha=0.15
        )
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("late layer")
    integer_ticks(ax.xaxis)
    ax.set_ylabel("Hedges' g (recursive - baseline)")
    ax.set_title("Effect size of R_V by late layer")
    ax.legend()
    return _save(fig, path)


def heatmap_figure(
    matrix: np.ndarray,
    title: str,
    xlabel: str,
    ylabel: str,
    row_labels=None,
    col_labels=None,
    center: bool = True,
):
    """The figure of :func:`heatmap`; cells without labels are numbered by integer ticks."""
    fig, ax = plt.subplots(
        figsize=(max(5, 0.35 * matrix.shape[1] + 2), max(4, 0.3 * matrix.shape[0] + 1))
    )
    finite = np.abs(matrix[np.isfinite(matrix)])
    vmax = float(finite.max()) if finite.size else 1.0
    kwargs = {"cmap": "RdBu_r", "vmin": -vmax, "vmax": vmax} if center else {"cmap": "viridis"}
    image = ax.imshow(matrix, aspect="auto", **kwargs)
    fig.colorbar(image, ax=ax)
    if row_labels is not None:
        ax.set_yticks(range(len(row_labels)), row_labels)
    else:
        integer_ticks(ax.yaxis)
    if col_labels is not None:
        ax.set_xticks(range(len(col_labels)), col_labels)
    else:
        integer_ticks(ax.xaxis)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return fig


def heatmap(
    matrix: np.ndarray,
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
    row_labels=None,
    col_labels=None,
    center: bool = True,
) -> Path:
    """A labelled heatmap (e.g. layer x head); diverging colours centred on 0 if ``center``.
    A title wider than the figure is wrapped (see :func:`finish_figure`)."""
    figure = heatmap_figure(matrix, title, xlabel, ylabel, row_labels, col_labels, center)
    return _save(figure, path)


def paired_scatter(pair_values: pd.DataFrame, path: Path) -> Path:
    """R_V of each recursive prompt against its structural twin (one point per pair, one
    colour per paired contrast), with the identity line; one panel per PR mode. Points below
    the line contract more than their twin."""
    modes = sorted(pair_values["pr_mode"].unique())
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        frame = pair_values[pair_values.pr_mode == mode]
        for label, pairs in frame.groupby(["recursive_group", "twin_group"], sort=False):
            ax.scatter(pairs["r_v_twin"], pairs["r_v_recursive"], s=14, alpha=0.7,
                       label=f"{label[0]} vs {label[1]}")  # fmt: skip
        values = frame[["r_v_twin", "r_v_recursive"]].to_numpy(dtype=float)
        finite = values[np.isfinite(values)]
        if finite.size:
            low, high = float(finite.min()), float(finite.max())
            ax.plot([low, high], [low, high], color="grey", lw=0.8, ls="--")
        ax.set_xlabel("R_V of the twin")
        ax.set_ylabel("R_V of the recursive prompt")
        ax.set_title(f"Minimal pairs ({mode})")
        ax.legend(fontsize=7)
    return _save(fig, path)


def short_names(names: list[str]) -> list[str]:
    """Plot labels for model names: the fewest trailing "/"-separated parts that keep every
    name distinct (``/tmp/runs/m0`` -> ``m0``, ``EleutherAI/pythia-70m`` -> ``pythia-70m``),
    so that long local paths do not crowd the figure; names are kept whole when only the
    full name tells them apart."""
    parts = [str(name).rstrip("/").split("/") for name in names]
    longest = max((len(p) for p in parts), default=0)
    for keep in range(1, longest + 1):
        labels = ["/".join(p[-keep:]) for p in parts]
        if len(set(labels)) == len(set(map(str, names))):
            return labels
    return [str(name) for name in names]


def legend_outside(ax, title: str | None = None, fontsize: float = 7, **kwargs):
    """The legend of ``ax`` to the right of its panel, top-aligned with it (so it covers no
    data); :func:`finish_figure`'s tight layout makes room for it. ``kwargs`` go to
    ``ax.legend`` (e.g. ``handles``, ``ncol``, ``markerscale``)."""
    return ax.legend(
        fontsize=fontsize,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        borderaxespad=0.0,
        title=title,
        title_fontsize=fontsize + 1 if title else None,
        **kwargs,
    )


def covariate_scatter_figure(frame: pd.DataFrame, covariates: list[str], outcome: str = "r_v"):
    """The figure of :func:`covariate_scatter`: one colour per family (the same in every
    panel), one legend for the whole grid to the right of the top-right panel."""
    modes = sorted(frame["pr_mode"].unique())
    families = sorted(frame["family"].astype(str).unique())
    colour_of = dict(zip(families, group_colours(len(families)), strict=True))
    legend_width = 0.4 + 0.07 * max((len(f) for f in families), default=0)
    fig, axes = plt.subplots(
        len(modes),
        len(covariates),
        figsize=(2.6 * len(covariates) + 1 + legend_width, 2.4 * len(modes) + 0.6),
        squeeze=False,
    )
    for row, mode in enumerate(modes):
        rows = frame[frame.pr_mode == mode]
        for column, covariate in enumerate(covariates):
            ax = axes[row][column]
            for family in families:
                chosen = rows[rows["family"].astype(str) == family]
                ax.scatter(chosen[covariate], chosen[outcome], s=6, alpha=0.6,
                           color=colour_of[family], label=family)  # fmt: skip
            ax.set_xlabel(covariate, fontsize=8)
            if column == 0:
                ax.set_ylabel(f"{outcome} ({mode})", fontsize=8)
            ax.tick_params(labelsize=7)
    legend_outside(axes[0][-1], title="family", fontsize=6, markerscale=2)
    fig.suptitle(f"{outcome} against prompt covariates", fontsize=10)
    return fig


def covariate_scatter(
    frame: pd.DataFrame, covariates: list[str], path: Path, outcome: str = "r_v"
) -> Path:
    """A grid of ``outcome`` against each covariate: one row per PR mode, one column per
    covariate, one colour per prompt family. ``frame`` has pr_mode, family, the outcome and
    the covariate columns (one row per prompt x mode)."""
    return _save(covariate_scatter_figure(frame, covariates, outcome), path)
