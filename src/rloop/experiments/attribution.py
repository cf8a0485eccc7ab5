"""Attribution patching (``rloop attribution``): every head's ablation effect on R_V estimated
linearly from one gradient pass, optionally compared with the exact sweep of a finished
``rloop ablate`` run (Spearman with CI, agreement of the top heads). Resume checkpoints: each
gradient batch, and every ``LAYERS_PER_UNIT`` layers of the exact sweep.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from rloop.errors import ConfigError
from rloop.experiments.ablate import read_sweep, sweep_table
from rloop.experiments.runner import encode_prompts, execute, record_inputs, run_identity, run_units
from rloop.experiments.saliency import gradient_tables, per_head_rows, plot_head_heatmap
from rloop.experiments.settings import (
    RVSettings,
    layer_list,
    load_reference,
    prepare,
    reference_means,
)
from rloop.interventions.edits import check_ablation_mode
from rloop.interventions.head_sweep import head_sweep
from rloop.metrics.stats import correlation_with_ci
from rloop.runs.markdown import markdown_table, summary_head
from rloop.runs.plots import _save, plt

EXPERIMENT = "attribution"
# Layers of the exact sweep per resume checkpoint (each unit repeats one clean forward).
LAYERS_PER_UNIT = 4


@dataclass
class AttributionConfig(RVSettings):
    layers: list[int] | None = None  # None = every layer below the late one
    mode: str = "zero"
    reference_group: str = "factual"
    from_sweep: str | None = None  # compare with this finished `rloop ablate` run
    batch_size: int = 4
    max_rows: int | None = None  # cap on stacked rows; None = memory budget
    top_k: int = 10


def run_attribution(config: AttributionConfig, out=None, force: bool = False, lm=None):
    """``rloop attribution``: returns (run_dir, already_complete, headline)."""

    check_ablation_mode(config.mode)
    sweep = None
    if config.from_sweep is not None:
        sweep = read_sweep(config.from_sweep)
    prepared = prepare(config, ["L5"], lm)
    lm = prepared.lm
    early, late = prepared.early, prepared.late
    layers = layer_list(lm.adapter, config.layers)
    if sweep is not None:
        _check_sweep_matches(sweep, config, prepared, layers)
    reference = (
        load_reference(config, config.reference_group, lm) if config.mode == "mean" else None
    )

    def body(run) -> dict:
        record_inputs(
            run,
            prepared,
            attribution_layers=layers,
            exact_sweep=config.from_sweep or "computed in this run",
            mean_reference=None
            if reference is None
            else {"group": config.reference_group, "n": len(reference)},
        )
        prompts = list(prepared.prompts)
        mean_z = reference_means(lm, reference, layers, "z")
        started = time.perf_counter()
        _, _, att = gradient_tables(
            lm,
            prompts,
            layers,
            early,
            late,
            config.window,
            config.pr_mode,
            config.batch_size,
            mean_z,
            run=run,
        )
        gradient_s = time.perf_counter() - started
        if sweep is None:
            exact, exact_s = _exact_sweep(lm, prompts, layers, (early, late), config, mean_z, run)
        else:
            exact, exact_s = sweep[0], float(sweep[2].get("timings", {}).get("sweep_s", np.nan))
        results = per_head_rows({"attribution": att}, prompts, layers, lm.adapter.n_heads, late)
        results = results.merge(
            exact[["prompt_id", "layer", "head", "impact"]].rename(columns={"impact": "exact"}),
            on=["prompt_id", "layer", "head"],
            how="left",
        )
        heads, computed, corr, agreement, k, overlap = head_agreement(results, config)
        agreement["gradient_seconds"] = gradient_s
        agreement["exact_seconds"] = exact_s
        run.write_table("results", results)
        run.write_table("heads", heads)
        run.write_table("agreement", agreement)
        _scatter(computed, run.plot_path("attribution_vs_exact"), corr, config)
        plot_head_heatmap(
            heads,
            "attribution_mean",
            layers,
            lm.adapter.n_heads,
            run.plot_path("attribution"),
            "Attribution estimate of each head's R_V change",
            center=True,
        )
        run.write_summary(
            _attribution_markdown(heads, agreement, corr, config, prepared, gradient_s, exact_s)
        )
        run.update_manifest(timings={"gradients_s": gradient_s, "exact_s": exact_s})
        return {
            "spearman_r": corr.r,
            "spearman_ci_low": corr.ci_low,
            "spearman_ci_high": corr.ci_high,
            f"top{k}_overlap": overlap,
            "gradient_seconds": gradient_s,
            "exact_seconds": exact_s,
        }

    identity = run_identity(config, measure_layers=[early, late])
    return execute(EXPERIMENT, identity, lm.name, out, body, force=force).as_tuple()


def _exact_sweep(
    lm, prompts, layers: list[int], measured: tuple[int, int], config, mean_z, run=None
) -> tuple[pd.DataFrame, float]:
    """The exact sweep's per-prompt table on the same prompts, and its seconds; every
    ``LAYERS_PER_UNIT`` layers are one unit (a resume checkpoint when ``run`` is given)."""
    early, late = measured
    started = time.perf_counter()
    batch = encode_prompts(lm, prompts)
    chunks = [layers[i : i + LAYERS_PER_UNIT] for i in range(0, len(layers), LAYERS_PER_UNIT)]

    def sweep_chunk(chunk: list[int]) -> pd.DataFrame:
        result = head_sweep(
            lm.model, lm.adapter, batch, chunk, early, late, config.window,
            modes=[config.pr_mode], mean_z=mean_z, max_rows=config.max_rows,
        )  # fmt: skip
        return sweep_table(result, [p.id for p in prompts], config.mode, "query", config.pr_mode)

    exact = run_units(
        run, chunks, sweep_chunk, key=lambda c: f"exact-layers-{c[0]:04d}-{c[-1]:04d}",
        label="exact sweep", weight=len,
    )  # fmt: skip
    return exact, time.perf_counter() - started


def head_agreement(results: pd.DataFrame, config: AttributionConfig):
    """Per head: mean attribution and exact impact with their ranks; Spearman and Pearson of
    the two over computed heads (bootstrap CIs over heads) and the top-k overlap.

    Returns (heads, computed heads, Spearman, agreement table, k, overlap).
    """
    heads = (
        results.groupby(["layer", "head"], sort=True)
        .agg(
            attribution_mean=("attribution", "mean"),
            exact_mean=("exact", "mean"),
            computed=("computed", "first"),
        )
        .reset_index()
    )
    computed = heads[heads["computed"]]
    corr, pearson = (
        correlation_with_ci(
            computed["attribution_mean"],
            computed["exact_mean"],
            method,
            n_boot=config.n_boot,
            seed=config.seed,
        )
        for method in ("spearman", "pearson")
    )
    for column in ("attribution", "exact"):
        heads[f"{column}_rank"] = (
            heads[f"{column}_mean"].abs().rank(ascending=False, method="first").astype(int)
        )
    heads = heads.sort_values("exact_rank", ignore_index=True)
    k = min(config.top_k, len(computed))
    top_exact = set(heads.nsmallest(k, "exact_rank")[["layer", "head"]].itertuples(index=False))
    top_att = set(heads.nsmallest(k, "attribution_rank")[["layer", "head"]].itertuples(index=False))
    overlap = len(top_exact & top_att)
    agreement = pd.DataFrame(
        [
            {"method": m, **{key: c.to_dict()[key] for key in ("r", "p", "ci_low", "ci_high", "n")}}
            for m, c in (("spearman", corr), ("pearson", pearson))
        ]
        + [{"method": f"top-{k} overlap", "r": overlap / k if k else np.nan, "n": k}]
    )
    return heads, computed, corr, agreement, k, overlap


def _check_sweep_matches(sweep, config: AttributionConfig, prepared, layers) -> None:
    """The finished sweep must have measured what the attribution estimates."""
    results, _, manifest = sweep
    cfg = manifest.get("config", {})
    sweep_layers = manifest.get("layers", {})
    problems = []
    if cfg.get("unit", "query") != "query":
        problems.append("it ablated KV groups; attribution is per query head (use --unit query)")
    if cfg.get("mode") != config.mode:
        problems.append(f"its mode is {cfg.get('mode')}, not {config.mode}")
    if cfg.get("pr_mode") != config.pr_mode:
        problems.append(f"its PR mode is {cfg.get('pr_mode')}, not {config.pr_mode}")
    if cfg.get("window") != config.window:
        problems.append(f"its window is {cfg.get('window')}, not {config.window}")
    if (sweep_layers.get("early"), sweep_layers.get("late")) != (prepared.early, prepared.late):
        problems.append(
            f"it measured R_V L{sweep_layers.get('late')}/L{sweep_layers.get('early')}, "
            f"not L{prepared.late}/L{prepared.early}"
        )
    if manifest.get("model", {}).get("name") != prepared.lm.name:
        problems.append(
            f"it ran on {manifest.get('model', {}).get('name')}, not {prepared.lm.name}"
        )
    ids = {p.id for p in prepared.prompts}
    if set(results["prompt_id"]) != ids:
        problems.append("its prompts differ (pass the same --prompts/--groups/--max-prompts)")
    missing = sorted(set(layers) - set(results["layer"]))
    if missing:
        problems.append(f"it did not sweep layer(s) {missing} (pass --layers within its range)")
    if problems:
        raise ConfigError(f"sweep {config.from_sweep} does not match: " + "; ".join(problems))


def _scatter(computed, path, corr, config) -> None:

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(computed["exact_mean"], computed["attribution_mean"], s=10, alpha=0.7)
    ax.axhline(0, color="grey", lw=0.6)
    ax.axvline(0, color="grey", lw=0.6)
    ax.set_xlabel("exact mean R_V change (sweep)")
    ax.set_ylabel("attribution estimate")
    ax.set_title(
        f"{config.mode} ablation: Spearman {corr.r:.2f} [{corr.ci_low:.2f}, {corr.ci_high:.2f}]"
    )
    _save(fig, path)


def _attribution_markdown(heads, agreement, corr, config, prepared, gradient_s, exact_s) -> str:
    lines = [
        *summary_head("Attribution patching vs exact head sweep", prepared.lm),
        f"- R_V = PR(L{prepared.late}) / PR(L{prepared.early}) ({prepared.rule}), "
        f"{config.pr_mode} PR, window {config.window}; {config.mode} ablation of query heads",
        "- attribution = sum over real tokens of dR_V/dz * (z_ablated - z): the first-order "
        "estimate of each head's ablation effect, all heads from one forward + one backward",
        f"- exact sweep: {config.from_sweep or 'computed in this run on the same prompts'}",
        f"- Spearman rank correlation (heads below layer {prepared.late}): {corr.r:.3f} "
        f"(95 % CI {corr.ci_low:.3f}..{corr.ci_high:.3f}, p {corr.p:.3g}, n {corr.n})",
        f"- time: gradients {gradient_s:.1f} s, exact sweep {exact_s:.1f} s",
        "",
        markdown_table(agreement),
        "",
        f"## Top {config.top_k} heads by exact |impact|",
        "",
        markdown_table(heads.head(config.top_k)),
        "",
        "Files: `results.*` (per prompt x head: attribution and exact), `heads.*`, "
        "`agreement.*`, `plots/`.",
    ]
    return "\n".join(lines) + "\n"
