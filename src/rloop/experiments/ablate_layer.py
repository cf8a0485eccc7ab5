"""Layer ablation (``rloop ablate-layer``, seed 000 cell 4).

It removes a layer's attention-block output (``attn_out``) or MLP output
(``mlp_out``) for every token -- zero, or the mean over a named reference set -- and reports
R_V clean vs ablated per prompt. Components at layers >= the late layer cannot change V at the
late layer (V is computed from the block's input): they are reported as exactly 0 change and
not computed. Each (layer, component) is a resume checkpoint.

"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from rloop.errors import ConfigError
from rloop.experiments.runner import encode_prompts, execute, record_inputs, run_identity, run_units
from rloop.experiments.settings import RVSettings, load_reference, prepare, reference_means
from rloop.interventions.edits import check_ablation_mode, layer_ablation_edits
from rloop.interventions.engine import measure_r_v
from rloop.metrics.stats import paired_change
from rloop.runs.markdown import markdown_table, summary_head
from rloop.runs.plots import _save, plt

EXPERIMENT = "ablate-layer"
COMPONENT_POINTS = {"attn": "attn_out", "mlp": "mlp_out"}


# ---------------------------------------------------------------------------- layer ablation
@dataclass
class LayerAblationConfig(RVSettings):
    layers: list[int] | None = None  # layers to ablate, one at a time
    components: list[str] = field(default_factory=lambda: ["attn"])  # attn and/or mlp
    mode: str = "zero"
    reference_group: str = "factual"


def check_components(components: list[str]) -> list[str]:
    bad = [c for c in components if c not in COMPONENT_POINTS]
    if bad or not components:
        raise ConfigError(f"unknown component {bad[0] if bad else ''!r}: choose attn, mlp or both")
    return list(dict.fromkeys(components))


def layer_ablation_r_v(
    lm, batch, layer: int, point: str, early: int, late: int, window: int, pr_mode: str, mean=None
) -> np.ndarray:
    """R_V per prompt (P,) with ``point`` (attn_out | mlp_out) at ``layer`` ablated."""
    edits = layer_ablation_edits(layer, point, mean)
    return measure_r_v(lm.model, lm.adapter, batch, early, late, window, pr_mode, edits=edits)[2]


def run_layer_ablation(config: LayerAblationConfig, out=None, force: bool = False, lm=None):
    """``rloop ablate-layer``: returns (run_dir, already_complete, headline)."""

    check_ablation_mode(config.mode)
    components = check_components(config.components)
    if not config.layers:
        raise ConfigError("give the layers to ablate, e.g. --layers 19 or --layers 10-20")
    prepared = prepare(config, ["L5"], lm)
    lm = prepared.lm
    for layer in config.layers:
        lm.adapter.check_layer(layer)
    layers = sorted(set(config.layers))
    reference = (
        load_reference(config, config.reference_group, lm) if config.mode == "mean" else None
    )
    early, late = prepared.early, prepared.late

    def body(run) -> dict:
        record_inputs(
            run,
            prepared,
            mean_reference=None
            if reference is None
            else {"group": config.reference_group, "n": len(reference)},
        )
        started = time.perf_counter()
        batch = encode_prompts(lm, prepared.prompts)
        _, _, clean = measure_r_v(
            lm.model, lm.adapter, batch, early, late, config.window, config.pr_mode
        )
        prompts = list(prepared.prompts)
        todo = [(layer, c) for layer in layers for c in components]

        def ablate_unit(unit: tuple[int, str]) -> pd.DataFrame:
            return _unit_rows(lm, batch, prompts, clean, unit, reference, config, (early, late))

        results = run_units(
            run, todo, ablate_unit, key=lambda u: f"layer-{u[0]:04d}-{u[1]}",
            label="ablating layers",
        )  # fmt: skip
        summary = _layer_summary(results, config)
        seconds = time.perf_counter() - started
        results["layer_early"], results["layer_late"] = early, late
        run.write_table("results", results)
        run.write_table("summary", summary)
        _plot_layer_ablation(summary, run.plot_path("layer_ablation"), config, early, late)
        run.write_summary(_layer_markdown(summary, config, prepared, seconds))
        run.update_manifest(timings={"ablation_s": seconds})
        computed = summary[summary["computed"]]
        biggest = (
            computed.iloc[int(np.nanargmax(computed["mean_change"].abs().to_numpy()))]
            if len(computed) and computed["mean_change"].notna().any()
            else None
        )
        return {
            "r_v_clean": float(np.nanmean(clean)),
            "largest_change": None if biggest is None else float(biggest["mean_change"]),
            "largest_at": None
            if biggest is None
            else f"L{int(biggest['layer'])} {biggest['component']}",
        }

    identity = run_identity(config, measure_layers=[early, late])
    return execute(EXPERIMENT, identity, lm.name, out, body, force=force).as_tuple()


def _layer_summary(results: pd.DataFrame, config: LayerAblationConfig) -> pd.DataFrame:
    """Per (layer, component), in the order of ``results``: the paired change over prompts."""
    rows = []
    for (layer, component), frame in results.groupby(["layer", "component"], sort=False):
        change = paired_change(
            frame["r_v_clean"].to_numpy(), frame["r_v_ablated"].to_numpy(), config.n_boot,
            config.seed,
        )  # fmt: skip
        rows.append(
            {
                "layer": layer,
                "component": component,
                "mode": config.mode,
                **change,
                "computed": bool(frame["computed"].iloc[0]),
            }
        )
    return pd.DataFrame(rows)


def _unit_rows(
    lm, batch, prompts: list, clean: np.ndarray, unit: tuple[int, str], reference,
    config: LayerAblationConfig, measured: tuple[int, int],
) -> pd.DataFrame:  # fmt: skip
    """One unit (layer, component) of the layer ablation: per prompt R_V clean (P,) and with
    the component at the layer ablated (the clean value, not computed, at layers >= late)."""
    layer, component = unit
    early, late = measured
    point = COMPONENT_POINTS[component]
    computed = layer < late
    if computed:
        means = reference_means(lm, reference, [layer], point)
        mean = None if means is None else means[layer]
        ablated = layer_ablation_r_v(
            lm, batch, layer, point, early, late, config.window, config.pr_mode, mean
        )
    else:  # causality: V at the late layer is computed before this component
        ablated = clean.copy()
    return pd.DataFrame(
        [
            {
                "prompt_id": prompt.id,
                "group": prompt.group,
                "layer": layer,
                "component": component,
                "mode": config.mode,
                "r_v_clean": clean[p],
                "r_v_ablated": ablated[p],
                "change": ablated[p] - clean[p],
                "computed": computed,
            }
            for p, prompt in enumerate(prompts)
        ]
    )


def _plot_layer_ablation(summary, path, config, early, late) -> None:

    fig, ax = plt.subplots(figsize=(7, 4))
    for component, frame in summary.groupby("component"):
        ax.errorbar(
            frame["layer"],
            frame["mean_change"],
            yerr=[frame["mean_change"] - frame["ci_low"], frame["ci_high"] - frame["mean_change"]],
            marker="o",
            capsize=3,
            label=component,
        )
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("ablated layer")
    ax.set_ylabel("mean R_V change (ablated - clean)")
    ax.set_title(f"{config.mode}-ablating whole components (R_V L{late}/L{early})")
    ax.legend()
    _save(fig, path)


def _layer_markdown(summary, config, prepared, seconds) -> str:
    lines = [
        *summary_head("Layer ablation", prepared.lm),
        f"- {config.mode} ablation of the whole attention-block output (attn) / MLP output (mlp) "
        "at every token"
        + (
            f"; mean over reference group {config.reference_group}" if config.mode == "mean" else ""
        ),
        f"- R_V = PR(L{prepared.late}) / PR(L{prepared.early}) ({prepared.rule}), "
        f"{config.pr_mode} PR, window {config.window}",
        f"- components at layers >= {prepared.late} cannot change V at layer {prepared.late}: "
        "change exactly 0, not computed",
        f"- time: {seconds:.1f} s",
        "",
        markdown_table(summary),
        "",
        "Files: `results.*` (per prompt x layer x component), `summary.*`, "
        "`plots/layer_ablation.png`.",
    ]
    return "\n".join(lines) + "\n"
