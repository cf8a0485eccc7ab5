"""Attention vs MLP (experiment B of seed 000): the PR ("whole" mode: the (W, d_model) window)
of the attention-block output and of the MLP output at every layer, per prompt, from one forward
per batch; per group and layer the mean of each and which one is lower (the seed's "winner"),
plus a recursive vs baseline contrast per layer and component. The headline counts layers:
those where attention has the lower PR in every group, those where the MLP has, and the rest.
Each prompt batch is a resume checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from rloop.capture.batching import (
    EncodedBatch,
    encode,
    gather_windows,
    plan_batches,
    token_counts,
)
from rloop.capture.trace import Trace, address
from rloop.experiments.runner import (
    PromptBatch,
    execute,
    prompt_batches,
    record_inputs,
    run_units,
)
from rloop.experiments.settings import RVSettings, prepare_contrast
from rloop.metrics import participation_ratio
from rloop.metrics.stats import contrast
from rloop.prompts import Prompt
from rloop.runs.markdown import markdown_table, summary_head
from rloop.runs.plots import _save, plt

EXPERIMENT = "attn-vs-mlp"
COMPONENT_POINTS = {"attn": "attn_out", "mlp": "mlp_out"}


@dataclass
class ComponentsConfig(RVSettings):
    layers: list[int] | None = None  # None = every layer
    recursive_group: str = "L5"
    baseline_group: str = "factual"
    batch_size: int = 16


def component_pr_batch(
    lm, batch: EncodedBatch, layers: list[int], window: int
) -> dict[str, np.ndarray]:
    """PR of the attn_out and mlp_out windows of one batch: component -> (B, n_layers)
    float64 numpy, from one forward capturing both points at every layer ("whole" PR of
    the (W, d_model) window)."""
    points = [address(layer, p) for layer in layers for p in COMPONENT_POINTS.values()]
    with (
        torch.no_grad(),
        Trace(lm.model, lm.adapter, capture=points, stop_after_layer=max(layers)) as tr,
    ):
        lm.model(**batch.model_inputs(), use_cache=False)
    out = {c: np.empty((len(batch.n_tokens), len(layers))) for c in COMPONENT_POINTS}
    for j, layer in enumerate(layers):
        for component, point in COMPONENT_POINTS.items():
            windows = gather_windows(tr[address(layer, point)], batch.n_tokens, window)
            out[component][:, j] = participation_ratio(windows).cpu().numpy()  # (B,)
    return out


def component_pr(
    lm, texts: list[str], layers: list[int], window: int, batch_size: int = 16
) -> dict[str, np.ndarray]:
    """PR of attn_out and mlp_out windows: component -> (P, n_layers) float64 numpy, one
    forward per batch of similar-length texts (:func:`component_pr_batch`)."""
    lengths = token_counts(lm.tokenizer, texts)
    out = {c: np.empty((len(texts), len(layers))) for c in COMPONENT_POINTS}
    for indices in plan_batches(lengths, batch_size):
        batch = encode(lm.tokenizer, [texts[i] for i in indices], lm.device)
        for component, values in component_pr_batch(lm, batch, layers, window).items():
            out[component][indices] = values  # (B, n_layers)
    return out


def component_rows(
    prompts: list[Prompt], pr: dict[str, np.ndarray], layers: list[int]
) -> pd.DataFrame:
    """Tidy rows, one per prompt x layer x component (in that order), from ``pr``:
    component -> (len(prompts), n_layers)."""
    rows = []
    for p, prompt in enumerate(prompts):
        for j, layer in enumerate(layers):
            for component in COMPONENT_POINTS:
                rows.append(
                    {
                        "prompt_id": prompt.id,
                        "group": prompt.group,
                        "layer": layer,
                        "component": component,
                        "point": COMPONENT_POINTS[component],
                        "pr_mode": "whole",
                        "pr": pr[component][p, j],
                    }
                )
    return pd.DataFrame(rows)


def run_components(config: ComponentsConfig, out=None, force: bool = False, lm=None):
    """``rloop attn-vs-mlp``: returns (run_dir, already_complete, headline)."""
    prepared, layers = prepare_contrast(config, lm)
    lm = prepared.lm

    def body(run) -> dict:
        record_inputs(run, prepared)
        started = time.perf_counter()
        prompts = list(prepared.prompts)

        def measure_batch(batch: PromptBatch) -> pd.DataFrame:
            pr = component_pr_batch(lm, batch.encode(lm), layers, config.window)
            return component_rows(batch.prompts, pr, layers)

        results = run_units(
            run, prompt_batches(lm, prompts, config.batch_size), measure_batch,
            key=lambda b: b.key, label="attn vs MLP PR", weight=lambda b: len(b.prompts),
        )  # fmt: skip
        results = in_prompt_order(results, prompts)
        seconds = time.perf_counter() - started
        table = _group_layer_table(results)
        contrasts = _component_contrasts(results, config)
        run.write_table("results", results)
        run.write_table("by_group", table)
        if not contrasts.empty:
            run.write_table("contrasts", contrasts)
        _plot_components(table, run.plot_path("attn_vs_mlp"))
        run.write_summary(_components_markdown(table, contrasts, config, prepared, seconds))
        run.update_manifest(timings={"measure_s": seconds}, component_layers=layers)
        return lower_pr_headline(table, layers)

    return execute(EXPERIMENT, config.to_dict(), lm.name, out, body, force=force).as_tuple()


def in_prompt_order(rows: pd.DataFrame, prompts: list[Prompt]) -> pd.DataFrame:
    """``rows`` (with a ``prompt_id`` column) stably reordered to the order of ``prompts``."""
    position = {prompt.id: i for i, prompt in enumerate(prompts)}
    order = np.argsort(rows["prompt_id"].map(position).to_numpy(), kind="stable")
    return rows.iloc[order].reset_index(drop=True)


def lower_pr_headline(table: pd.DataFrame, layers: list[int]) -> dict:
    """Layers (not group x layer rows) where the attention output has the lower PR in every
    group, where the MLP output has, and where the groups differ or tie: the three add up to
    ``n_layers``."""
    per_layer = table.groupby("layer")["lower_pr"].agg(lambda winners: set(winners))
    attn = int(sum(winners == {"attn"} for winners in per_layer))
    mlp = int(sum(winners == {"mlp"} for winners in per_layer))
    return {
        "n_layers": len(layers),
        "layers_attn_lower": attn,
        "layers_mlp_lower": mlp,
        "layers_mixed": len(layers) - attn - mlp,
    }


def _group_layer_table(results: pd.DataFrame) -> pd.DataFrame:
    """Per group x layer: mean (and sd) PR of attn and MLP, and which is lower."""
    stats = results.pivot_table(
        index=["group", "layer"], columns="component", values="pr", aggfunc=["mean", "std", "count"]
    )
    table = pd.DataFrame(
        {
            "n": stats[("count", "attn")],
            "attn_pr": stats[("mean", "attn")],
            "attn_pr_sd": stats[("std", "attn")],
            "mlp_pr": stats[("mean", "mlp")],
            "mlp_pr_sd": stats[("std", "mlp")],
        }
    ).reset_index()
    table["lower_pr"] = np.where(
        table["attn_pr"] < table["mlp_pr"],
        "attn",
        np.where(table["mlp_pr"] < table["attn_pr"], "mlp", "tie"),
    )
    return table


def _component_contrasts(results: pd.DataFrame, config: ComponentsConfig) -> pd.DataFrame:
    groups = set(results["group"])
    if not {config.recursive_group, config.baseline_group} <= groups:
        return pd.DataFrame()
    rows = []
    for (layer, component), frame in results.groupby(["layer", "component"], sort=True):
        rec = frame.loc[frame.group == config.recursive_group, "pr"].to_numpy()
        base = frame.loc[frame.group == config.baseline_group, "pr"].to_numpy()
        c = contrast(rec, base, n_boot=min(config.n_boot, 1000), n_perm=1000, seed=config.seed)
        d = c.to_dict()
        rows.append(
            {
                "layer": layer,
                "component": component,
                "recursive_group": config.recursive_group,
                "baseline_group": config.baseline_group,
                **{
                    k: d[k]
                    for k in (
                        "n_recursive",
                        "n_baseline",
                        "mean_recursive",
                        "mean_baseline",
                        "diff",
                        "hedges_g",
                        "hedges_g_ci_low",
                        "hedges_g_ci_high",
                        "welch_p",
                        "mann_whitney_p",
                    )
                },
            }
        )
    return pd.DataFrame(rows)


def _plot_components(table: pd.DataFrame, path) -> None:

    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (group, frame) in enumerate(table.groupby("group")):
        ax.plot(
            frame["layer"], frame["attn_pr"], color=f"C{i}", marker="o", ms=3, label=f"{group} attn"
        )
        ax.plot(
            frame["layer"],
            frame["mlp_pr"],
            color=f"C{i}",
            ls="--",
            marker="s",
            ms=3,
            label=f"{group} MLP",
        )
    ax.set_xlabel("layer")
    ax.set_ylabel("PR of the block output (whole, window)")
    ax.set_title("Attention output vs MLP output participation ratio")
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def _components_markdown(table, contrasts, config, prepared, seconds) -> str:
    lines = [
        *summary_head("Attention vs MLP", prepared.lm),
        f"- PR (whole: the (W, d_model) window, W = {config.window}) of the attention-block "
        "output (`attn_out`) and the MLP output (`mlp_out`) per layer; lower PR = fewer "
        "effective dimensions",
        f"- time: {seconds:.1f} s",
        "",
        "## Mean PR per group and layer",
        "",
        markdown_table(table),
        "",
    ]
    if not contrasts.empty:
        lines += [
            f"## {config.recursive_group} vs {config.baseline_group} per layer and component",
            "",
            markdown_table(contrasts.drop(columns=["recursive_group", "baseline_group"])),
            "",
        ]
    lines.append(
        "Files: `results.*` (per prompt x layer x component), `by_group.*`, `contrasts.*`, "
        "`plots/attn_vs_mlp.png`."
    )
    return "\n".join(lines) + "\n"
