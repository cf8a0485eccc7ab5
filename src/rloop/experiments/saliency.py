"""Gradient saliency (``rloop saliency``, seed 000 cells 6-9), from one backward pass.

Saliency: ||dR_V / dz[l, h]|| (the per-head attention result, over the prompt's real tokens)
for every head at every layer, layer 0 included, per prompt; R_V through the differentiable
participation ratio in float64 on the same windows as the exact measurement. Heads at layers
>= the late layer cannot change V there: exactly 0 (not computed). Engine:
:func:`rloop.interventions.gradients.head_gradients`; each prompt batch is a resume checkpoint.

Attribution patching: the linear estimate of each head's ablation effect on R_V,
sum(dR_V/dz * (z_ablated - z)), for every head from the same forward and backward, and its
Spearman rank correlation (bootstrap CI over heads) with the exact sweep's mean impact --
either computed on the same prompts in the same command (:func:`rloop.interventions.head_sweep.head_sweep`)
or read from a finished ``rloop ablate`` run on the same prompts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from rloop.capture.batching import encode
from rloop.errors import ConfigError
from rloop.experiments.runner import execute, record_inputs, run_identity, run_units
from rloop.experiments.settings import RVSettings, layer_list, prepare
from rloop.interventions.gradients import head_gradients
from rloop.runs import plots as plotting
from rloop.runs.markdown import markdown_table, summary_head

EXPERIMENT = "saliency"


@dataclass
class SaliencyConfig(RVSettings):
    layers: list[int] | None = None  # None = every layer
    batch_size: int = 4
    top_k: int = 10


def gradient_tables(
    lm, prompts, layers, early, late, window, pr_mode, batch_size, mean_z=None, run=None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run head_gradients over batches of ``batch_size`` consecutive prompts -> (r_v (P,),
    saliency, attribution (L, H, P)). With ``run`` each batch is a resume checkpoint."""
    texts = [p.text for p in prompts]
    ids = [p.id for p in prompts]
    n_heads = lm.adapter.n_heads

    def batch_rows(start: int) -> pd.DataFrame:
        batch = encode(lm.tokenizer, texts[start : start + batch_size], lm.device)
        grads = head_gradients(
            lm.model, lm.adapter, batch, layers, early, late, window, pr_mode, mean_z
        )
        n = len(batch.n_tokens)
        return pd.DataFrame(
            {
                "prompt_id": np.repeat(ids[start : start + n], len(layers) * n_heads),
                "r_v": np.repeat(grads.r_v.numpy(), len(layers) * n_heads),  # (B * L * H,)
                # (L, H, B) -> (B, L, H): rows prompt-major, then layer, then head
                "saliency": grads.saliency.numpy().transpose(2, 0, 1).ravel(),
                "attribution": grads.attribution.numpy().transpose(2, 0, 1).ravel(),
            }
        )

    rows = run_units(
        run, list(range(0, len(texts), batch_size)), batch_rows,
        key=lambda start: f"gradients-{start:05d}", label="gradients",
        weight=lambda start: len(texts[start : start + batch_size]),
    )  # fmt: skip
    shape = (len(texts), len(layers), n_heads)  # (P, L, H)
    r_v = rows["r_v"].to_numpy().reshape(shape)[:, 0, 0]  # (P,)
    saliency = rows["saliency"].to_numpy().reshape(shape).transpose(1, 2, 0)  # (L, H, P)
    attribution = rows["attribution"].to_numpy().reshape(shape).transpose(1, 2, 0)
    return r_v, saliency, attribution


def per_head_rows(values: dict[str, np.ndarray], prompts, layers, n_heads, late) -> pd.DataFrame:
    lay, head, p = np.meshgrid(
        np.arange(len(layers)), np.arange(n_heads), np.arange(len(prompts)), indexing="ij"
    )
    layer_values = np.array(layers)[lay.ravel()]
    table = pd.DataFrame(
        {
            "prompt_id": np.array([x.id for x in prompts])[p.ravel()],
            "group": np.array([x.group for x in prompts])[p.ravel()],
            "layer": layer_values,
            "head": head.ravel(),
            **{name: v.ravel() for name, v in values.items()},
            "computed": layer_values < late,
        }
    )
    return table.sort_values(["prompt_id", "layer", "head"], ignore_index=True)


def run_saliency(config: SaliencyConfig, out=None, force: bool = False, lm=None):
    """``rloop saliency``: returns (run_dir, already_complete, headline)."""

    if config.batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {config.batch_size}")
    prepared = prepare(config, ["L5"], lm)
    lm = prepared.lm
    layers = layer_list(lm.adapter, config.layers)
    early, late = prepared.early, prepared.late

    def body(run) -> dict:
        record_inputs(run, prepared, saliency_layers=layers)
        started = time.perf_counter()
        prompts = list(prepared.prompts)
        rv, sal, _ = gradient_tables(
            lm, prompts, layers, early, late, config.window, config.pr_mode, config.batch_size,
            run=run,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        results = per_head_rows({"saliency": sal}, prompts, layers, lm.adapter.n_heads, late)
        heads = (
            results.groupby(["layer", "head"], sort=True)
            .agg(
                saliency_mean=("saliency", "mean"),
                saliency_sd=("saliency", "std"),
                computed=("computed", "first"),
            )
            .reset_index()
        )
        heads["rank"] = heads["saliency_mean"].rank(ascending=False, method="first").astype(int)
        heads = heads.sort_values("rank", ignore_index=True)
        by_layer = heads.groupby("layer")["saliency_mean"].agg(["mean", "max"]).reset_index()
        run.write_table("results", results)
        run.write_table("heads", heads)
        run.write_table("by_layer", by_layer)
        plot_head_heatmap(
            heads,
            "saliency_mean",
            layers,
            lm.adapter.n_heads,
            run.plot_path("saliency"),
            f"||dR_V/dz|| per head (R_V L{late}/L{early})",
        )
        run.write_summary(_saliency_markdown(heads, by_layer, rv, config, prepared, seconds))
        run.update_manifest(timings={"gradients_s": seconds})
        top = heads.iloc[0]
        return {
            "r_v_mean": float(np.nanmean(rv)),
            "top_head": f"L{int(top['layer'])}H{int(top['head'])}",
            "top_saliency": float(top["saliency_mean"]),
            "gradients_seconds": seconds,
        }

    identity = run_identity(config, measure_layers=[early, late])
    return execute(EXPERIMENT, identity, lm.name, out, body, force=force).as_tuple()


def plot_head_heatmap(heads, column, layers, n_heads, path, title, center=False) -> None:

    grid = np.full((len(layers), n_heads), np.nan)
    for row in heads.itertuples():
        grid[layers.index(row.layer), row.head] = getattr(row, column)
    plotting.heatmap(grid, path, title, "head", "layer", [str(x) for x in layers], center=center)


def _saliency_markdown(heads, by_layer, rv, config, prepared, seconds) -> str:
    lines = [
        *summary_head("Gradient saliency", prepared.lm),
        f"- R_V = PR(L{prepared.late}) / PR(L{prepared.early}) ({prepared.rule}), "
        f"differentiable {config.pr_mode} PR in float64, window {config.window}; "
        f"mean R_V {np.nanmean(rv):.4f} over {len(rv)} prompts",
        "- saliency = ||dR_V/dz[l, h]|| over the prompt's real tokens (z: the head's result at "
        "the input of the output projection), total derivative through every later layer",
        f"- heads at layers >= {prepared.late} cannot change V at layer {prepared.late}: "
        "saliency exactly 0, not computed",
        f"- time (forward + backward): {seconds:.1f} s",
        "",
        f"## Top {config.top_k} heads",
        "",
        markdown_table(heads.head(config.top_k)),
        "",
        "## Per layer",
        "",
        markdown_table(by_layer),
        "",
        "Files: `results.*` (per prompt x layer x head), `heads.*`, `by_layer.*`, "
        "`plots/saliency.png`.",
    ]
    return "\n".join(lines) + "\n"
