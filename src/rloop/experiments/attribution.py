"""Gradient saliency and attribution patching of every head (seed 000 cells 6-9; issue 3).

One forward (stopped at the late layer's V) and one backward give, per prompt x layer x
head, the saliency ||dR_V/dz|| and the attribution-patching estimate of the head's ablation
effect on R_V (see :mod:`rloop.attribution`). With ``exact=True`` the exact batched sweep
runs on the same prompts and the Spearman rank correlation of the two is reported: the
estimate is a fast screen, and this says how far to trust it on this model.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from rloop.errors import ConfigError
from rloop.interventions import ABLATION_MODES, mean_activations
from rloop.metrics import r_v
from rloop.metrics.stats import correlation_with_ci
from rloop.profiles import check_mode_for_point, resolve_layers
from rloop.prompts import PromptSet

EXPERIMENT = "attribution"


@dataclass
class AttributionConfig:
    model: str = "smollm2-135m"
    revision: str | None = None
    prompts: str | None = None
    bank_version: str = "v1"
    groups: list[str] | None = None  # None = ["L5"] from the bank
    max_prompts: int | None = 10
    measure_layers: list[int] | None = None
    window: int = 16
    pr_mode: str = "per-head"
    mode: str = "zero"  # the ablation the attribution estimates: zero | mean
    reference_group: str = "factual"
    exact: bool = False  # also run the exact sweep and report the rank correlation
    n_boot: int = 2000
    seed: int = 0
    dtype: str | None = None
    device: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def run_attribution(config: AttributionConfig, out=None, force: bool = False, lm=None):
    """``rloop attribution``: returns (run_dir, already_complete, headline)."""
    from rloop.attribution import head_gradients
    from rloop.batching import encode
    from rloop.experiments.runner import execute, load_prompt_set, model_manifest, prompts_manifest
    from rloop.head_sweep import head_sweep
    from rloop.prompts import check_window

    if config.mode not in ABLATION_MODES:
        raise ConfigError(f"unknown ablation mode {config.mode!r}: choose zero or mean")
    check_mode_for_point("v", [config.pr_mode])
    groups = config.groups or (["L5"] if config.prompts is None else None)
    prompt_set = load_prompt_set(config.prompts, config.bank_version, groups)
    prompts = list(prompt_set)[: config.max_prompts] if config.max_prompts else list(prompt_set)
    used = PromptSet(prompts, prompt_set.source, prompt_set.version, prompt_set.sha256)
    reference = None
    if config.mode == "mean":
        reference = load_prompt_set(config.prompts, config.bank_version, [config.reference_group])
    if lm is None:
        from rloop.models import load_model

        lm = load_model(
            config.model, revision=config.revision, device=config.device, dtype=config.dtype
        )
    adapter = lm.adapter
    early, late, rule = resolve_layers(adapter, config.measure_layers)
    check_window(used, lm.tokenizer, config.window)
    layers = list(range(adapter.n_layers))

    def body(run) -> dict:
        run.set_model(model_manifest(lm))
        run.set_prompts(prompts_manifest(used, lm.tokenizer))
        mean_z = None
        if reference is not None:
            mean_z = mean_activations(
                lm.model, adapter, lm.tokenizer, [p.text for p in reference], layers[:late], "z"
            )
        batch = encode(lm.tokenizer, [p.text for p in prompts], lm.device)
        started = time.perf_counter()
        grads = head_gradients(
            lm.model, adapter, batch, layers, early, late, config.window, config.pr_mode, mean_z
        )
        gradient_s = time.perf_counter() - started
        rows = []
        for i, layer in enumerate(layers):
            for head in range(adapter.n_heads):
                for p, prompt in enumerate(prompts):
                    rows.append(
                        {
                            "prompt_id": prompt.id,
                            "layer": layer,
                            "head": head,
                            "saliency": float(grads.saliency[i, head, p]),
                            "attribution": float(grads.attribution[i, head, p]),
                            "computed": layer < late,
                        }
                    )
        table = pd.DataFrame(rows)
        per_head = (
            table.groupby(["layer", "head"])[["saliency", "attribution"]].mean().reset_index()
        )
        headline: dict = {"gradient_seconds": gradient_s, "layer_early": early, "layer_late": late}
        if config.exact:
            started = time.perf_counter()
            exact = head_sweep(
                lm.model,
                adapter,
                batch,
                layers,
                early,
                late,
                config.window,
                modes=[config.pr_mode],
                mean_z=mean_z,
            )
            headline["exact_seconds"] = time.perf_counter() - started
            base = r_v(
                exact.clean_late[config.pr_mode].numpy(), exact.clean_early[config.pr_mode].numpy()
            )
            impact = (
                r_v(exact.pr_late[config.pr_mode].numpy(), exact.pr_early[config.pr_mode].numpy())
                - base
            )
            per_head["exact_impact"] = impact.mean(axis=-1).ravel()  # layer-major, head-minor
            below = per_head["layer"] < late
            corr = correlation_with_ci(
                per_head.loc[below, "attribution"],
                per_head.loc[below, "exact_impact"],
                method="spearman",
                n_boot=config.n_boot,
                seed=config.seed,
            )
            headline.update(
                spearman_r=corr.r,
                spearman_ci_low=corr.ci_low,
                spearman_ci_high=corr.ci_high,
                heads_compared=corr.n,
            )
        per_head["saliency_rank"] = (
            per_head["saliency"].rank(ascending=False, method="first").astype(int)
        )
        run.write_table("results", table)
        run.write_table("heads", per_head)
        _plots(per_head, run.plot_path, adapter, early, late, config)
        run.write_summary(_markdown(per_head, headline, config, lm, early, late, rule))
        run.update_manifest(layers={"early": early, "late": late, "rule": rule})
        return headline

    outcome = execute(EXPERIMENT, config.to_dict(), lm.name, out, body, force=force)
    return outcome.run_dir, outcome.already_complete, outcome.headline


def _grid(per_head: pd.DataFrame, column: str, n_layers: int, n_heads: int) -> np.ndarray:
    grid = np.full((n_layers, n_heads), np.nan)
    grid[per_head["layer"].to_numpy(), per_head["head"].to_numpy()] = per_head[column].to_numpy()
    return grid


def _plots(per_head, plot_path, adapter, early, late, config) -> None:
    from rloop import plotting

    labels = [str(x) for x in range(adapter.n_layers)]
    plotting.heatmap(
        _grid(per_head, "saliency", adapter.n_layers, adapter.n_heads),
        plot_path("saliency_heatmap"),
        title=f"Gradient saliency ||dR_V/dz|| (R_V L{late}/L{early})",
        xlabel="head",
        ylabel="layer",
        row_labels=labels,
        center=False,
    )
    plotting.heatmap(
        _grid(per_head, "attribution", adapter.n_layers, adapter.n_heads),
        plot_path("attribution_heatmap"),
        title=f"Attribution estimate of {config.mode}-ablation effect on R_V",
        xlabel="head",
        ylabel="layer",
        row_labels=labels,
    )
    if "exact_impact" in per_head:
        import matplotlib.pyplot as plt

        below = per_head[per_head["layer"] < late]
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(below["exact_impact"], below["attribution"], s=8)
        ax.axline((0, 0), slope=1, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("exact impact on R_V (sweep)")
        ax.set_ylabel("attribution estimate")
        ax.set_title("Attribution patching vs exact ablation")
        plotting._save(fig, plot_path("attribution_vs_exact"))


def _markdown(per_head, headline, config, lm, early, late, rule) -> str:
    top = per_head[per_head["layer"] < late].sort_values("saliency", ascending=False).head(10)
    lines = [
        "# Gradient saliency and attribution patching",
        "",
        f"- model: {lm.name}; R_V = PR(L{late}) / PR(L{early}) ({rule}), {config.pr_mode} PR, "
        f"window {config.window}; {config.mode} ablation estimated",
        f"- one forward + one backward: {headline['gradient_seconds']:.2f} s",
        f"- heads at layers >= {late} cannot change V at layer {late}: gradient exactly 0",
    ]
    if config.exact:
        lines.append(
            f"- exact sweep on the same prompts: {headline['exact_seconds']:.1f} s; Spearman r of "
            f"attribution vs exact impact {headline['spearman_r']:.3f} "
            f"(95 % CI {headline['spearman_ci_low']:.3f}..{headline['spearman_ci_high']:.3f}, "
            f"{headline['heads_compared']} heads)"
        )
    lines += [
        "",
        "## Top 10 heads by saliency",
        "",
        "| layer | head | saliency | attribution |",
        "|---|---|---|---|",
    ]
    for row in top.itertuples():
        lines.append(f"| {row.layer} | {row.head} | {row.saliency:.4g} | {row.attribution:+.4g} |")
    return "\n".join(lines) + "\n"
