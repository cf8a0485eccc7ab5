"""Per-head diagnostics (seed 000 cells 3, 12-15: the "Head 11" tests), for every head.

For every head of the requested layers and every prompt, over the window (the last W real
tokens, as query rows):

- output norm: the L2 norm of the head's contribution to the attention-block output, i.e.
  its slice of z sent through its columns of the output projection (the projection's bias
  excluded), averaged over the window's tokens; and its rank among the layer's heads;
- per-head PR of V (per KV head) and of z (per query head) over the window;
- attention self-score: the mean over window query rows of the diagonal attention weight
  A[q, q]; attention entropy: the mean over window rows of -sum_k A[q, k] ln A[q, k] (nats)
  over the real keys the query may attend to. Attention weights come from the eager
  attention implementation (switched on for the measurement and restored afterwards).

Recursive vs baseline per head and quantity: means, difference, Hedges' g with bootstrap CI,
Welch p, and Benjamini-Hochberg adjustment over heads. The headline ranks as the summary's
tables do: the loudest head by mean output norm, and by per-head PR of z the most
differential head and the number of heads with BH-adjusted p < 0.05. Each prompt batch is a
resume checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from rloop.capture.attention import eager_attention
from rloop.capture.batching import EncodedBatch, encode, gather_windows, plan_batches, token_counts
from rloop.capture.trace import Trace, address
from rloop.errors import UnsupportedArchitectureError
from rloop.experiments.attn_vs_mlp import in_prompt_order
from rloop.experiments.runner import PromptBatch, execute, prompt_batches, record_inputs, run_units
from rloop.experiments.settings import RVSettings, prepare_contrast
from rloop.metrics import participation_ratio
from rloop.metrics.stats import benjamini_hochberg, effect_size_ci, welch_t
from rloop.runs import plots as plotting
from rloop.runs.markdown import markdown_table, summary_head

EXPERIMENT = "heads"
QUANTITIES = ("output_norm", "pr_v", "pr_z", "self_score", "entropy")


@dataclass
class HeadDiagnosticsConfig(RVSettings):
    layers: list[int] | None = None  # None = every layer
    recursive_group: str = "L5"
    baseline_group: str = "factual"
    batch_size: int = 8
    top_k: int = 10


def head_contributions(o_proj: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Each head's contribution to the output projection: z (B, W, H, D) -> (B, W, H, d_model).

    Runs the projection module itself on z with every other head zeroed, minus its output on
    zeros (the bias), so any layout of the weight (Linear, GPT-2's Conv1D) is handled.
    """
    b, w, h, d = z.shape
    eye = torch.eye(h, device=z.device, dtype=z.dtype)  # (H, H)
    only = z[:, :, None, :, :] * eye[None, None, :, :, None]  # (B, W, H, H, D): head i only
    out = o_proj(only.reshape(b, w, h, h * d))  # (B, W, H, d_model)
    bias = o_proj(torch.zeros(1, 1, h * d, device=z.device, dtype=z.dtype))  # (1, 1, d_model)
    return out - bias[:, :, None, :]  # (B, W, H, d_model)


def attention_window_stats(
    weights: torch.Tensor, n_tokens: list[int], window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-score and entropy per row and head from attention weights (B, H, T, T).

    Query rows: the last ``window`` real tokens of each right-padded row; keys: the real
    tokens (positions < n_tokens). Returns (self_score, entropy), each (B, H) float64.
    """
    w = weights.to(torch.float64)  # (B, H, T, T)
    b_size, _, t_size, _ = w.shape
    positions = torch.arange(t_size, device=w.device)  # (T,)
    counts = torch.tensor(n_tokens, device=w.device)  # (B,)
    real_keys = positions[None, :] < counts[:, None]  # (B, T)
    w = w * real_keys[:, None, None, :]  # (B, H, T, T) padded keys dropped
    rows = gather_windows(w.permute(0, 2, 1, 3), n_tokens, window)  # (B, W, H, T)
    query_pos = counts[:, None] - window + torch.arange(window, device=w.device)  # (B, W)
    diagonal = rows.gather(-1, query_pos[:, :, None, None].expand(-1, -1, rows.shape[2], 1))
    self_score = diagonal.squeeze(-1).mean(dim=1)  # (B, H)
    entropy = -torch.xlogy(rows, rows).sum(dim=-1).mean(dim=1)  # (B, H)
    return self_score, entropy


def _weight_keeper(attention: dict, layer: int):
    """A forward hook on layer ``layer``'s attention module that keeps its weights
    (B, H, T, T) in ``attention[layer]``."""

    def hook(module, args, output):
        if not isinstance(output, tuple) or len(output) < 2 or output[1] is None:
            raise UnsupportedArchitectureError(
                f"layer {layer}'s attention returned no weights: this family does not "
                "expose eager attention weights"
            )
        attention[layer] = output[1].detach()  # (B, H, T, T)

    return hook


def measure_heads_batch(
    lm, batch: EncodedBatch, layers: list[int], window: int
) -> dict[str, np.ndarray]:
    """Per-head quantities of one batch: name -> (B, n_layers, n_heads) float64 numpy, from
    one forward with eager attention. pr_v has n_kv_heads columns (padded with NaN)."""
    adapter, model = lm.adapter, lm.model
    n_kv = adapter.n_kv_heads
    out = {
        q: np.full((len(batch.n_tokens), len(layers), adapter.n_heads), np.nan) for q in QUANTITIES
    }
    points = [address(layer, p) for layer in layers for p in ("v", "z")]
    attention: dict[int, torch.Tensor] = {}
    with eager_attention(model):
        handles = [
            adapter.module_for(model, layer, "attn_out").register_forward_hook(
                _weight_keeper(attention, layer)
            )
            for layer in layers
        ]
        try:
            with (
                torch.no_grad(),
                Trace(model, adapter, capture=points, stop_after_layer=max(layers)) as tr,
            ):
                model(**batch.model_inputs(), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
    for j, layer in enumerate(layers):
        z = gather_windows(tr[address(layer, "z")], batch.n_tokens, window)  # (B, W, H, D)
        v = gather_windows(tr[address(layer, "v")], batch.n_tokens, window)  # (B, W, Hkv, D)
        o_proj = adapter.module_for(model, layer, "z")
        with torch.no_grad():
            contrib = head_contributions(o_proj, z)  # (B, W, H, d_model)
        norm = contrib.to(torch.float64).norm(dim=-1).mean(dim=1)  # (B, H)
        out["output_norm"][:, j] = norm.cpu().numpy()
        out["pr_z"][:, j] = participation_ratio(z.transpose(1, 2)).cpu().numpy()  # (B, H)
        out["pr_v"][:, j, :n_kv] = participation_ratio(v.transpose(1, 2)).cpu().numpy()
        self_score, entropy = attention_window_stats(
            attention[layer], batch.n_tokens, window
        )  # (B, H) each
        out["self_score"][:, j] = self_score.cpu().numpy()
        out["entropy"][:, j] = entropy.cpu().numpy()
    return out


def measure_heads(
    lm, texts: list[str], layers: list[int], window: int, batch_size: int = 8
) -> dict[str, np.ndarray]:
    """Per-head quantities: name -> (P, n_layers, n_heads) float64 numpy, one forward per
    batch of similar-length texts (:func:`measure_heads_batch`).

    pr_v has n_kv_heads columns (padded with NaN to n_heads); the others n_heads.
    """
    lengths = token_counts(lm.tokenizer, texts)
    n_heads = lm.adapter.n_heads
    out = {q: np.full((len(texts), len(layers), n_heads), np.nan) for q in QUANTITIES}
    for indices in plan_batches(lengths, batch_size):
        batch = encode(lm.tokenizer, [texts[i] for i in indices], lm.device)
        for q, values in measure_heads_batch(lm, batch, layers, window).items():
            out[q][indices] = values  # (B, n_layers, n_heads)
    return out


def run_head_diagnostics(config: HeadDiagnosticsConfig, out=None, force: bool = False, lm=None):
    """``rloop heads``: returns (run_dir, already_complete, headline)."""
    prepared, layers = prepare_contrast(config, lm)
    lm = prepared.lm

    def body(run) -> dict:
        record_inputs(run, prepared, diagnostic_layers=layers)
        started = time.perf_counter()
        prompts = list(prepared.prompts)

        def measure_batch(batch: PromptBatch) -> pd.DataFrame:
            values = measure_heads_batch(lm, batch.encode(lm), layers, config.window)
            return _results_table(values, batch.prompts, layers, lm.adapter)

        results = run_units(
            run, prompt_batches(lm, prompts, config.batch_size), measure_batch,
            key=lambda b: b.key, label="head diagnostics", weight=lambda b: len(b.prompts),
        )  # fmt: skip
        results = in_prompt_order(results, prompts)
        seconds = time.perf_counter() - started
        heads = _head_table(results, config)
        run.write_table("results", results)
        run.write_table("heads", heads)
        _plots(heads, run.plot_path, config, layers, lm.adapter.n_heads)
        run.write_summary(_markdown(heads, config, prepared, seconds))
        run.update_manifest(timings={"measure_s": seconds})
        return heads_headline(heads)

    return execute(EXPERIMENT, config.to_dict(), lm.name, out, body, force=force).as_tuple()


def loudest_order(heads: pd.DataFrame) -> pd.DataFrame:
    """Heads by mean output norm, loudest first (the summary's "Loudest heads" table)."""
    return heads.sort_values("output_norm_mean", ascending=False)


def differential_order(heads: pd.DataFrame) -> pd.DataFrame:
    """Heads by |Hedges' g| of per-head PR(z), recursive vs baseline, largest first (the
    summary's "Most differential heads" table)."""
    return heads.assign(key=-heads["pr_z_hedges_g"].abs()).sort_values("key").drop(columns="key")


def heads_headline(heads: pd.DataFrame) -> dict:
    """The loudest head, and by the measure the differential table ranks by (per-head PR of
    z): the most differential head and the heads with BH-adjusted p < 0.05."""
    loudest = loudest_order(heads).iloc[0]
    headline = {
        "loudest_head": f"L{int(loudest['layer'])}H{int(loudest['head'])}",
        "loudest_norm": float(loudest["output_norm_mean"]),
    }
    if "pr_z_hedges_g" in heads:
        top = differential_order(heads).iloc[0]
        headline["most_differential_head"] = f"L{int(top['layer'])}H{int(top['head'])}"
        headline["most_differential_pr_z_hedges_g"] = float(top["pr_z_hedges_g"])
        headline["n_differential_pr_z_bh05"] = int((heads["pr_z_p_bh"] < 0.05).sum())
    return headline


def _results_table(values, prompts, layers, adapter) -> pd.DataFrame:
    """One row per prompt x layer x head; norm rank within (prompt, layer), 1 = loudest."""
    p_idx, l_idx, h_idx = np.meshgrid(
        np.arange(len(prompts)), np.arange(len(layers)), np.arange(adapter.n_heads), indexing="ij"
    )
    table = pd.DataFrame(
        {
            "prompt_id": np.array([p.id for p in prompts])[p_idx.ravel()],
            "group": np.array([p.group for p in prompts])[p_idx.ravel()],
            "layer": np.array(layers)[l_idx.ravel()],
            "head": h_idx.ravel(),
            "kv_head": h_idx.ravel() // (adapter.n_heads // adapter.n_kv_heads),
            **{q: values[q].ravel() for q in QUANTITIES},
        }
    )
    table["output_norm_rank"] = (
        table.groupby(["prompt_id", "layer"])["output_norm"]
        .rank(ascending=False, method="first")
        .astype(int)
    )
    # pr_v belongs to the KV head: for query heads sharing one, repeat its value.
    kv_pr = table[table["head"] < adapter.n_kv_heads].set_index(["prompt_id", "layer", "head"])[
        "pr_v"
    ]
    table["pr_v"] = kv_pr.reindex(
        pd.MultiIndex.from_arrays([table["prompt_id"], table["layer"], table["kv_head"]])
    ).to_numpy()
    return table


def _head_table(results: pd.DataFrame, config) -> pd.DataFrame:
    """Per layer x head: mean of every quantity, norm rank within the layer, and per quantity
    the recursive vs baseline difference, Hedges' g (bootstrap CI), Welch p and BH p."""
    heads = results.groupby(["layer", "head"], sort=True)[list(QUANTITIES)].mean()
    heads.columns = [f"{q}_mean" for q in heads.columns]
    heads = heads.reset_index()
    heads["kv_head"] = results.groupby(["layer", "head"], sort=True)["kv_head"].first().to_numpy()
    heads["output_norm_rank"] = (
        heads.groupby("layer")["output_norm_mean"].rank(ascending=False, method="first").astype(int)
    )
    groups = set(results["group"])
    if not {config.recursive_group, config.baseline_group} <= groups:
        return heads
    n_boot = min(config.n_boot, 500)
    for q in QUANTITIES:
        diffs, gs, lows, highs, ps = [], [], [], [], []
        for (_layer, _head), frame in results.groupby(["layer", "head"], sort=True):
            rec = frame.loc[frame.group == config.recursive_group, q].to_numpy(dtype=float)
            base = frame.loc[frame.group == config.baseline_group, q].to_numpy(dtype=float)
            rec, base = rec[np.isfinite(rec)], base[np.isfinite(base)]
            diffs.append(rec.mean() - base.mean() if rec.size and base.size else np.nan)
            if rec.size >= 2 and base.size >= 2:
                g = effect_size_ci(rec, base, "hedges_g", n_boot=n_boot, seed=config.seed)
                gs.append(g.estimate)
                lows.append(g.low)
                highs.append(g.high)
                ps.append(welch_t(rec, base)[1])
            else:
                gs.append(np.nan)
                lows.append(np.nan)
                highs.append(np.nan)
                ps.append(np.nan)
        heads[f"{q}_diff"] = diffs
        heads[f"{q}_hedges_g"] = gs
        heads[f"{q}_g_ci_low"] = lows
        heads[f"{q}_g_ci_high"] = highs
        heads[f"{q}_p"] = ps
        p = np.asarray(ps, dtype=float)
        adjusted = np.full_like(p, np.nan)
        finite = np.isfinite(p)
        if finite.any():
            adjusted[finite] = benjamini_hochberg(p[finite])
        heads[f"{q}_p_bh"] = adjusted
    return heads


def _plots(heads, plot_path, config, layers, n_heads) -> None:

    def grid(column):
        matrix = np.full((len(layers), n_heads), np.nan)
        for row in heads.itertuples():
            matrix[layers.index(row.layer), row.head] = getattr(row, column)
        return matrix

    labels = [str(x) for x in layers]
    plotting.heatmap(
        grid("output_norm_mean"),
        plot_path("output_norm"),
        "Mean output norm per head (window)",
        "head",
        "layer",
        labels,
        center=False,
    )
    plotting.heatmap(
        grid("self_score_mean"),
        plot_path("self_score"),
        "Mean attention self-score A[q,q] (window rows)",
        "head",
        "layer",
        labels,
        center=False,
    )
    plotting.heatmap(
        grid("entropy_mean"),
        plot_path("entropy"),
        "Mean attention entropy (nats, window rows)",
        "head",
        "layer",
        labels,
        center=False,
    )
    if "pr_z_hedges_g" in heads:
        plotting.heatmap(
            grid("pr_z_hedges_g"),
            plot_path("pr_z_effect"),
            f"Hedges' g of per-head PR(z), {config.recursive_group} - {config.baseline_group}",
            "head",
            "layer",
            labels,
        )


def _markdown(heads, config, prepared, seconds) -> str:
    lines = [
        *summary_head("Head diagnostics", prepared.lm),
        f"- window: last {config.window} real tokens (query rows for attention statistics; "
        "real keys only); eager attention",
        "- output norm: ||z_h W_O[:, h]|| per token (bias excluded), mean over the window; "
        "rank 1 = loudest head of its layer",
        "- pr_v: per-KV-head PR of V; pr_z: per-head PR of the head's result z",
        f"- time: {seconds:.1f} s",
        "",
        f"## Loudest {config.top_k} heads",
        "",
    ]
    cols = [
        "layer",
        "head",
        "output_norm_mean",
        "output_norm_rank",
        "pr_v_mean",
        "pr_z_mean",
        "self_score_mean",
        "entropy_mean",
    ]
    lines.append(markdown_table(loudest_order(heads)[cols].head(config.top_k)))
    if "pr_z_hedges_g" in heads:
        lines += [
            "",
            f"## Most differential heads ({config.recursive_group} vs {config.baseline_group}, "
            "per-head PR of z)",
            "",
        ]
        cols = [
            "layer",
            "head",
            "pr_z_diff",
            "pr_z_hedges_g",
            "pr_z_g_ci_low",
            "pr_z_g_ci_high",
            "pr_z_p",
            "pr_z_p_bh",
            "self_score_diff",
            "entropy_diff",
        ]
        lines.append(markdown_table(differential_order(heads)[cols].head(config.top_k)))
    lines += [
        "",
        "Files: `results.*` (per prompt x layer x head), `heads.*` (per head: means, ranks, "
        "recursive vs baseline effect sizes with BH-adjusted p), `plots/`.",
    ]
    return "\n".join(lines) + "\n"
