"""The plots of issue 11 §6, checked on the drawn figures: group names that do not collide,
one colour per group with the legend outside the data, titles inside the figure, integer
ticks on layer/pair/head/step axes, no empty "generated" panel in temporal."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex
from matplotlib.ticker import AutoLocator, MaxNLocator

import rloop.experiments.gain as gain
import rloop.experiments.temporal as temporal
import rloop.runs.spec_plots as spec_plots
from rloop.prompts import load_bank
from rloop.runs import figures, plots
from rloop.runs.plots import finish_figure, plt

ABLATE_TITLE = "R_V impact (R_V L2/L0) of mean-ablating each attention head"


def bank_groups() -> list[str]:
    groups = load_bank("v1").groups()
    assert len(groups) == 13
    return groups


def results_table(groups: list[str], seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        [
            {"pr_mode": mode, "group": g, "r_v": rng.normal(0.8, 0.1), "layer_early": 5,
             "layer_late": 25}
            for mode in ("per-head", "whole") for g in groups for _ in range(6)
        ]
    )  # fmt: skip


def profile_table(groups: list[str], n_layers: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        [
            {"pr_mode": mode, "group": g, "layer": layer, "pr": 10 + k + rng.normal(0, 0.2)}
            for mode in ("per-head", "whole") for k, g in enumerate(groups)
            for layer in range(n_layers) for _ in range(3)
        ]
    )  # fmt: skip


def rotated_box(label, renderer) -> np.ndarray:
    """The 4 corners (pixels) of a tick label drawn with rotation_mode="anchor": its
    unrotated box (ha/va relative to the anchor), rotated about the anchor."""
    upright = label.figure.text(0, 0, label.get_text(), fontproperties=label.get_fontproperties())
    box = upright.get_window_extent(renderer)
    upright.remove()
    length, height = box.width, box.height
    x0 = {"left": 0.0, "center": -length / 2, "right": -length}[label.get_ha()]
    y0 = {"bottom": 0.0, "baseline": 0.0, "center": -height / 2, "top": -height}[label.get_va()]
    corners = np.array([[x0, y0], [x0 + length, y0], [x0 + length, y0 + height], [x0, y0 + height]])
    angle = math.radians(label.get_rotation())
    turn = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    anchor = label.get_transform().transform(label.get_position())
    return corners @ turn.T + anchor  # (4, 2)


def rectangles_overlap(a: np.ndarray, b: np.ndarray) -> bool:
    """Separating-axis test of two convex quadrilaterals (corners in order)."""
    for poly in (a, b):
        for i in range(4):
            edge = poly[(i + 1) % 4] - poly[i]
            normal = np.array([-edge[1], edge[0]])
            pa, pb = a @ normal, b @ normal
            if pa.max() <= pb.min() or pb.max() <= pa.min():
                return False
    return True


def inside(box, fig, slack: float = 1.0) -> bool:
    return (box.x0 >= -slack and box.y0 >= -slack and box.x1 <= fig.bbox.width + slack
            and box.y1 <= fig.bbox.height + slack)  # fmt: skip


def integer_ticks_shown(axis) -> list[float]:
    low, high = sorted(axis.get_view_interval())
    return [t for t in axis.get_majorticklocs() if low - 1e-9 <= t <= high + 1e-9]


def test_group_names_of_the_box_plot_do_not_collide() -> None:
    fig = plots.r_v_by_group_figure(results_table(bank_groups()))
    finish_figure(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        labels = [t for t in ax.get_xticklabels() if t.get_text()]
        assert [t.get_text() for t in labels] == sorted(bank_groups())
        boxes = [rotated_box(t, renderer) for t in labels]
        for label, corners in zip(labels, boxes, strict=True):
            # the corner model reproduces matplotlib's own (axis-aligned) extent of the label
            extent = label.get_window_extent(renderer)
            assert corners[:, 0].min() == pytest.approx(extent.x0, abs=2)
            assert corners[:, 1].max() == pytest.approx(extent.y1, abs=2)
            assert inside(extent, fig)
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                assert not rectangles_overlap(boxes[i], boxes[j]), (labels[i], labels[j])
    plt.close(fig)


def test_centred_rotated_names_would_collide() -> None:
    """The overlap test detects the old layout (rotated names centred on their ticks)."""
    fig = plots.r_v_by_group_figure(results_table(bank_groups()))
    ax = fig.axes[0]
    for label in ax.get_xticklabels():
        label.set_ha("center")
    fig.set_size_inches(6, 4)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [rotated_box(t, renderer) for t in ax.get_xticklabels()]
    assert any(rectangles_overlap(a, b) for a, b in zip(boxes, boxes[1:], strict=False))
    plt.close(fig)


def test_pr_profile_gives_13_groups_13_colours_and_a_legend_outside_the_data() -> None:
    groups = bank_groups()
    fig = plots.pr_profile_figure(profile_table(groups, 30), 5, 25)
    finish_figure(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    panels = [ax for ax in fig.axes if ax.get_lines()]
    assert len(panels) == 2
    colour_of = []
    for ax in panels:
        lines = {line.get_label(): to_hex(line.get_color()) for line in ax.get_lines()
                 if not line.get_label().startswith("_")}  # fmt: skip
        assert sorted(lines) == sorted(groups)
        assert len(set(lines.values())) == 13
        colour_of.append(lines)
    assert colour_of[0] == colour_of[1]  # a group has the same colour in every panel
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 1
    box = legends[0].get_window_extent(renderer)
    assert inside(box, fig)
    for ax in panels:
        assert not box.overlaps(ax.get_window_extent(renderer))
    plt.close(fig)


@pytest.mark.parametrize("n", [1, 2, 9, 10, 13, 18, 20, 21, 40])
def test_group_colours_are_distinct_for_any_number_of_groups(n) -> None:
    assert len(set(plots.group_colours(n))) == n
    assert len(set(figures.colours(n))) == n


def test_a_title_wider_than_the_figure_is_wrapped_inside_it() -> None:
    fig = plots.heatmap_figure(np.arange(12.0).reshape(3, 4), ABLATE_TITLE, "head", "layer",
                               row_labels=["0", "1", "2"])  # fmt: skip
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    title = fig.axes[0].title
    assert title.get_window_extent(renderer).x0 < 0  # what tight_layout alone leaves: clipped
    finish_figure(fig)
    box = title.get_window_extent(fig.canvas.get_renderer())
    assert inside(box, fig)
    assert title.get_text().count("\n") >= 1
    assert title.get_text().split() == ABLATE_TITLE.split()  # the same words
    plt.close(fig)


def test_layer_pair_head_and_step_axes_get_integer_ticks() -> None:
    checked = 0
    for label in ("pair", "late layer", "head (layer-major order)", "generation step (0 = x)"):
        fig, ax = plt.subplots()
        ax.plot([0, 1, 2], [1.0, 2.0, 0.5])
        ax.set_xlabel(label)
        finish_figure(fig)
        assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator)
        ticks = integer_ticks_shown(ax.xaxis)
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), (label, ticks)
        checked += 1
        plt.close(fig)
    assert checked == 4
    # an axis that is not a count keeps matplotlib's ticks (0.25 steps on this range)
    fig, ax = plt.subplots()
    ax.plot([0, 1, 2], [1.0, 2.0, 0.5])
    ax.set_xlabel("alpha (KV mixed on layers 0-2)")
    finish_figure(fig)
    assert type(ax.xaxis.get_major_locator()) is AutoLocator
    assert not all(float(t).is_integer() for t in integer_ticks_shown(ax.xaxis))
    plt.close(fig)


def test_layer_axes_of_the_shared_plots_are_integer() -> None:
    fig = plots.pr_profile_figure(profile_table(["L5", "factual"], 3), 0, 2)
    heat = plots.heatmap_figure(np.ones((3, 4)), "t", "head", "layer")
    for figure in (fig, heat):
        finish_figure(figure)
        for ax in figure.axes[:-1] if figure is heat else figure.axes:
            for axis in (ax.xaxis,) if figure is fig else (ax.xaxis, ax.yaxis):
                ticks = integer_ticks_shown(axis)
                assert ticks and all(float(t).is_integer() for t in ticks), ticks
        plt.close(figure)


def test_plotly_profile_has_13_colours_and_integer_layer_ticks() -> None:
    groups = bank_groups()
    profile = profile_table(groups, 3)
    built = figures.pr_profiles({"profile": profile}, {"layers": {"early": 0, "late": 2}})
    assert len(built) == 2
    for item in built:
        layout = item.figure.layout
        assert layout.xaxis.dtick == 1 and layout.xaxis.tickmode == "linear"
        colours = [trace.line.color for trace in item.figure.data]
        assert len(colours) == 13 and len(set(colours)) == 13
    wide = figures.integer_axis(list(range(30)))
    assert wide["dtick"] == 5 and float(wide["dtick"]).is_integer()


def test_temporal_leaves_out_the_empty_generated_panel(monkeypatch, tmp_path) -> None:
    drawn = []
    monkeypatch.setattr(temporal, "_save", lambda fig, path: drawn.append(fig) or path)
    rows = [
        {"group": g, "scope": temporal.SCOPE_ALL, "step": s, "n": 3, "mean": 0.8 + k * 0.1,
         "sd": 0.1, "sem": 0.02}
        for k, g in enumerate(("L5", "factual")) for s in range(7)
    ]  # fmt: skip
    temporal.plot_curves(pd.DataFrame(rows), tmp_path / "t.png")
    (fig,) = drawn
    assert len(fig.axes) == 1
    assert "no generated-only window" in fig.axes[0].get_title()
    generated = [{**row, "scope": temporal.SCOPE_GENERATED} for row in rows if row["step"] >= 4]
    temporal.plot_curves(pd.DataFrame(rows + generated), tmp_path / "t.png")
    fig = drawn[-1]
    assert len(fig.axes) == 2 and all(ax.get_lines() for ax in fig.axes)
    for figure in drawn:
        plt.close(figure)


def test_specification_ranks_are_integer_ticks(monkeypatch, tmp_path) -> None:
    closed = []

    class Pyplot:
        def __getattr__(self, name):
            return getattr(plt, name)

        def close(self, fig):
            closed.append(fig)

    monkeypatch.setattr(spec_plots, "plt", Pyplot())
    specs = pd.DataFrame(
        {"spec_id": range(3), "window": [8, 16, 32], "effect": [-0.5, -0.2, 0.1],
         "ci_low": [-0.9, -0.6, -0.3], "ci_high": [-0.1, 0.2, 0.5]}
    )  # fmt: skip
    spec_plots.specification_curve_plot(specs, ["window"], tmp_path / "s.png")
    (fig,) = closed
    ticks = integer_ticks_shown(fig.axes[1].xaxis)
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    plt.close(fig)


def shown_tick_labels(ax) -> list:
    """The x and y tick labels of ``ax`` at ticks inside its view (matplotlib keeps labels
    of ticks past the ends, which are never drawn)."""
    shown = []
    for axis in (ax.xaxis, ax.yaxis):
        low, high = sorted(axis.get_view_interval())
        for tick in axis.get_major_ticks():
            if low - 1e-9 <= tick.get_loc() <= high + 1e-9:
                shown.append(tick.label1)
    return shown


def the_one_legend(fig):
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 1
    return legends[0]


def assert_legend_outside_the_data(fig) -> None:
    """The figure's single legend lies inside the figure and overlaps no panel."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = the_one_legend(fig).get_window_extent(renderer)
    assert inside(box, fig)
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent(renderer)), ax


def covariate_table(families: list[str], seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        [
            {"pr_mode": mode, "family": family, "r_v": rng.normal(0.8, 0.1),
             "n_tokens": int(rng.integers(5, 40)), "type_token_ratio": rng.uniform(0.5, 1),
             "punctuation_share": rng.uniform(0, 0.2)}
            for mode in ("per-head", "whole") for family in families for _ in range(5)
        ]
    )  # fmt: skip


def test_covariate_grid_has_one_legend_outside_the_data_and_a_colour_per_family() -> None:
    families = [f"family_{i:02d}" for i in range(12)]  # more than tab10 has colours
    covariates = ["n_tokens", "type_token_ratio", "punctuation_share"]
    fig = plots.covariate_scatter_figure(covariate_table(families), covariates)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        finish_figure(fig)
    panels = [ax for ax in fig.axes if ax.collections]
    assert len(panels) == 2 * len(covariates)
    legend = the_one_legend(fig)
    assert [t.get_text() for t in legend.get_texts()] == families
    colour_of = [
        {c.get_label(): to_hex(c.get_facecolor()[0]) for c in ax.collections} for ax in panels
    ]
    assert all(colours == colour_of[0] for colours in colour_of)  # same colour in every panel
    assert len(set(colour_of[0].values())) == len(families)
    assert_legend_outside_the_data(fig)
    plt.close(fig)


def test_old_covariate_legend_inside_a_panel_is_caught() -> None:
    """The overlap check detects a legend drawn inside the top-left panel (the old layout)."""
    fig = plots.covariate_scatter_figure(covariate_table(["baseline", "recursive"]), ["n_tokens"])
    the_one_legend(fig).remove()
    fig.axes[0].legend(fontsize=6)
    finish_figure(fig)
    with pytest.raises(AssertionError):
        assert_legend_outside_the_data(fig)
    plt.close(fig)


def test_specification_legend_is_outside_the_curve_and_names_the_colours(
    monkeypatch, tmp_path
) -> None:
    kept = []
    monkeypatch.setattr(spec_plots.plt, "close", kept.append)
    effect = np.array([-0.8, -0.5, -0.1, 0.05, 0.2, 0.7])
    specs = pd.DataFrame(
        {"spec_id": range(6), "window": [8, 16, 32] * 2, "pr_mode": ["whole", "per-head"] * 3,
         "effect": effect, "ci_low": effect - 0.3, "ci_high": effect + 0.3}
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec_plots.specification_curve_plot(
            specs, ["window", "pr_mode"], tmp_path / "s.png", highlight=2, highlight_label="ref"
        )
    (fig,) = kept
    assert (tmp_path / "s.png").stat().st_size > 1000
    labels = [t.get_text() for t in the_one_legend(fig).get_texts()]
    # significant by CI: -0.8 and -0.5 (below 0), 0.7 (above 0); the rest not
    assert labels == ["95% CI", "median -0.025", "ref", "significant, effect < 0",
                      "significant, effect > 0", "not significant"]  # fmt: skip
    assert_legend_outside_the_data(fig)
    plt.close(fig)


@pytest.mark.parametrize(
    ("names", "labels"),
    [
        (["/tmp/a/run_1/m0", "/tmp/a/run_1/m1"], ["m0", "m1"]),
        (["/x/one/model", "/x/two/model/"], ["one/model", "two/model"]),
        (["EleutherAI/pythia-70m", "gpt2"], ["pythia-70m", "gpt2"]),
        (["a/b", "/a/b"], ["a/b", "/a/b"]),
    ],
)
def test_short_names_keep_the_fewest_trailing_parts_that_stay_distinct(names, labels) -> None:
    assert plots.short_names(names) == labels


def test_h25_plot_with_long_model_paths_fits_without_a_layout_warning(
    monkeypatch, tmp_path
) -> None:
    drawn = []
    monkeypatch.setattr(plots.plt, "close", drawn.append)
    root = "/tmp/pytest-of-someone/pytest-123/test_scaling_with_gain_writes_h25_outputs0"
    names = [f"{root}/m{i}" for i in range(4)]
    models = pd.DataFrame(
        {"model": names, "rho": [0.25, 0.25, 0.5, 1.0], "gain": [1.2, 0.9, 1.1, 0.8],
         "gain_ci_low": [1.1, 0.8, 1.0, 0.7], "gain_ci_high": [1.3, 1.0, 1.2, 0.9]}
    )  # fmt: skip
    curves = pd.DataFrame(
        [
            {"model": name, "stage": gain.BLOCK_STAGE if layer < 3 else gain.FINAL_NORM_STAGE,
             "layer": layer, "gain_last": 1.0 + 0.1 * k - 0.05 * layer}
            for k, name in enumerate(names) for layer in range(4)
        ]
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Tight layout not applied" would fail here
        gain.plot_h25(models, curves, tmp_path / "h25.png", threshold=0.5)
    (fig,) = drawn
    assert (tmp_path / "h25.png").stat().st_size > 1000
    renderer = fig.canvas.get_renderer()
    texts = [t for ax in fig.axes for t in (*shown_tick_labels(ax), *ax.texts) if t.get_text()]
    assert {t.get_text() for t in fig.axes[0].texts} == {"m0", "m1", "m2", "m3"}
    for text in texts:
        assert inside(text.get_window_extent(renderer), fig), text.get_text()
    models_legend = fig.axes[2].get_legend()  # (panel 0 keeps its legend of the two lines)
    assert [t.get_text() for t in models_legend.get_texts()] == ["m0", "m1", "m2", "m3"]
    legend = models_legend.get_window_extent(renderer)
    assert inside(legend, fig) and not legend.overlaps(fig.axes[2].get_window_extent(renderer))
    plt.close(fig)
