"""The specification-curve plot (PNG, matplotlib Agg): effects sorted, with a choice panel.

Top panel: the effect of every estimable specification, sorted, with its CI as a band and the
significant ones coloured by direction; bottom panel: one row per choice level (``window =
16``), a mark where a specification made that choice (Simonsohn, Simmons & Nelson 2020). With
more specifications than :data:`MAX_EXACT_COLUMNS` the panel shows, per bin of consecutive
ranks, the share of specifications in the bin that made the choice (grey level), because
single marks can no longer be told apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from rloop.runs.layout import atomic_write  # noqa: E402
from rloop.runs.plots import finish_figure, integer_ticks, legend_outside  # noqa: E402

NEGATIVE_COLOUR = "#1f77b4"
POSITIVE_COLOUR = "#d62728"
NEUTRAL_COLOUR = "#9a9a9a"
MAX_EXACT_COLUMNS = 300
LEGEND_WIDTH = 1.8  # inches added to the figure for the legend right of the curve
SIGNIFICANCE_LABELS = {
    NEGATIVE_COLOUR: "significant, effect < 0",
    POSITIVE_COLOUR: "significant, effect > 0",
    NEUTRAL_COLOUR: "not significant",
}


def _levels(frame: pd.DataFrame, choices: Sequence[str]) -> list[tuple[str, object]]:
    """(choice, level) rows of the indicator panel, levels sorted within each choice."""
    return [(c, level) for c in choices for level in sorted(frame[c].unique(), key=_sort_key)]


def _sort_key(value: object) -> tuple[int, object]:
    return (0, value) if isinstance(value, int | float | np.number) else (1, str(value))


def _legend(top, colours: np.ndarray) -> None:
    """The legend of the curve panel, right of it (it covers no specification): the CI band,
    the median, the highlighted specification, and a mark for each point colour drawn."""
    handles, labels = top.get_legend_handles_labels()
    for colour, label in SIGNIFICANCE_LABELS.items():
        if np.any(colours == colour):
            handles.append(Line2D([], [], ls="none", marker="o", ms=5, color=colour))
            labels.append(label)
    legend_outside(top, handles=handles, labels=labels, fontsize=8)


def specification_curve_plot(
    specs: pd.DataFrame,
    choices: Sequence[str],
    path: Path,
    effect_label: str = "effect",
    title: str | None = None,
    highlight: int | None = None,
    highlight_label: str = "highlighted",
) -> Path:
    """Write the specification curve of ``specs`` to ``path`` (PNG) and return the path.

    specs: one row per specification with ``effect``, ``ci_low``, ``ci_high``, the
    ``choices`` columns and optionally ``significant`` (bool) and ``estimable`` (bool; False
    rows are left out). ``highlight``: a ``spec_id`` to mark on the curve (e.g. the
    reference specification), named ``highlight_label`` in the legend. Raises ValueError
    when no row has a finite effect. Ranks are integer ticks; a title wider than the figure
    is wrapped.
    """
    frame = specs
    if "estimable" in frame.columns:
        frame = frame[frame["estimable"].astype(bool)]
    frame = frame[np.isfinite(frame["effect"].to_numpy(dtype=float))]
    if frame.empty:
        raise ValueError("no specification with a finite effect to plot")
    frame = frame.sort_values("effect", kind="stable", ignore_index=True)
    effect = frame["effect"].to_numpy(dtype=float)  # (S,)
    rank = np.arange(1, len(frame) + 1)  # (S,)
    significant = (
        frame["significant"].to_numpy(dtype=bool)
        if "significant" in frame.columns
        else ((frame["ci_low"] > 0) | (frame["ci_high"] < 0)).to_numpy()
    )
    levels = _levels(frame, choices)
    n_columns = min(len(frame), MAX_EXACT_COLUMNS)
    column = (np.arange(len(frame)) * n_columns) // len(frame)  # (S,) bin of each rank
    in_bin = np.bincount(column, minlength=n_columns)  # (n_columns,)
    indicator = np.zeros((len(levels), n_columns))  # (n_levels, n_columns)
    for i, (choice, level) in enumerate(levels):
        hits = (frame[choice] == level).to_numpy(dtype=np.float64)  # (S,)
        indicator[i] = np.bincount(column, weights=hits, minlength=n_columns) / in_bin

    height = 3.2 + 0.18 * len(levels)
    fig, (top, bottom) = plt.subplots(
        2,
        1,
        figsize=(11 + LEGEND_WIDTH, height),
        sharex=True,
        gridspec_kw={"height_ratios": [3.2, 0.18 * max(len(levels), 1)]},
    )
    top.fill_between(
        rank, frame["ci_low"], frame["ci_high"], color=NEUTRAL_COLOUR, alpha=0.3, lw=0,
        step="mid", label="95% CI",
    )  # fmt: skip
    colours = np.where(
        significant, np.where(effect < 0, NEGATIVE_COLOUR, POSITIVE_COLOUR), NEUTRAL_COLOUR
    )
    size = 12 if len(frame) <= 200 else 3
    top.scatter(rank, effect, c=list(colours), s=size, zorder=3, lw=0)
    top.axhline(0.0, color="black", lw=0.8)
    median = float(np.median(effect))
    top.axhline(median, color="black", lw=0.8, ls="--", label=f"median {median:.3g}")
    if highlight is not None and "spec_id" in frame.columns:
        marked = np.flatnonzero(frame["spec_id"].to_numpy() == highlight)
        if marked.size:
            top.scatter(
                rank[marked], effect[marked], marker="*", s=120, c="orange", edgecolors="black",
                zorder=4, label=highlight_label,
            )  # fmt: skip
    top.set_ylabel(effect_label)
    _legend(top, colours)
    top.set_title(title or f"Specification curve ({len(frame)} specifications)", fontsize=10)
    bottom.imshow(
        indicator,
        aspect="auto",
        interpolation="nearest",
        cmap="Greys",
        vmin=0,
        vmax=1,
        extent=(0.5, len(frame) + 0.5, len(levels) - 0.5, -0.5),
    )
    bottom.set_yticks(range(len(levels)), [f"{c} = {v}" for c, v in levels], fontsize=7)
    integer_ticks(bottom.xaxis)  # ranks (shared with the top panel)
    binned = len(frame) > n_columns
    bottom.set_xlabel(
        "specification (sorted by effect)"
        + ("; grey level: share of the specifications in each rank bin" if binned else "")
    )
    finish_figure(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path
