"""Activation patching from recursive into baseline prompts (seed 000 cells 12-15, "Head 11").

Pairs: the i-th prompt of the source group (recursive, default L5) with the i-th prompt of the
target group (baseline, default factual); as many pairs as the shorter group has. For each
pair, the chosen activations of the source run are written into the target run and the
target's R_V is measured:

- ``--heads 15.4,16.2``: those heads' slices of a per-head point (z by default: the head's
  result; v and k index KV heads, q and z query heads);
- ``--layers 19`` (with ``--point``): the whole point (e.g. resid_pre, attn_out) at the layers.

Positions (source and target usually differ in length):

- ``window`` (default): the last W real positions of the source are written into the last W
  real positions of the target, aligned from the end (position n_src - W + i -> n_tgt - W + i);
- ``all``: every position; source and target must then have the same number of tokens, and
  a pair that does not is rejected with a one-line error before anything is written.

Transfer % = (patched - target) / (source - target) * 100 on the group means, undefined (NaN
with the reason) when the source-target gap is within its noise (the half-width of the
bootstrap CI of the mean paired gap); per pair with the same noise.

Circular patches (SCIENCE.md §3) are detected and reported instead of a transfer: writing V
itself at a layer the metric reads (early or late), the residual stream that V at such a
layer is a per-token function of (resid_pre of that layer, resid_post of the layer before) at
the read positions, or the residual stream at every position at or below the late layer
(every later activation is then determined by the patch). Patches computed after V at the
late layer change nothing and are reported as such.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from rloop.adapters import HEAD_POINTS
from rloop.capture.batching import encode
from rloop.capture.trace import EditFn, Trace, address
from rloop.errors import ConfigError, PromptError
from rloop.experiments.runner import execute, record_inputs, run_identity, run_units
from rloop.experiments.settings import RVSettings, prepare
from rloop.interventions.edits import PatchSpec, parse_heads
from rloop.interventions.engine import measure_pr, measure_r_v
from rloop.metrics.stats import bootstrap_ci, transfer_percent
from rloop.runs.markdown import markdown_table, summary_head
from rloop.runs.plots import _save, plt

EXPERIMENT = "patch"
POSITION_POLICIES = ("window", "all")
RESIDUAL_POINTS = ("resid_pre", "resid_post")


@dataclass
class PatchConfig(RVSettings):
    heads: str | None = None  # "15.4,16.2": per-head patch of `point`
    layers: list[int] | None = None  # whole-point patch at these layers
    point: str | None = None  # default z with heads, resid_pre with layers
    positions: str = "window"  # window | all
    source_group: str = "L5"
    target_group: str = "factual"
    batch_size: int = 16  # pairs per stacked forward


@dataclass(frozen=True)
class Circularity:
    """circular: the patch writes what the metric reads; no_effect: it cannot change R_V."""

    circular: bool
    reason: str | None
    no_effect: bool = False


def patch_specs(config: PatchConfig, adapter) -> list[PatchSpec]:
    """The patches the config asks for (positions are filled in per pair)."""
    if (config.heads is None) == (config.layers is None):
        raise ConfigError("give exactly one of --heads LAYER.HEAD,... or --layers A-B")
    if config.positions not in POSITION_POLICIES:
        raise ConfigError(f"unknown --positions {config.positions!r}: choose window or all")
    point = config.point or ("z" if config.heads is not None else "resid_pre")
    adapter.spec(point)
    if config.heads is not None:
        if point not in HEAD_POINTS:
            raise ConfigError(
                f"--heads needs a per-head point ({', '.join(HEAD_POINTS)}), not {point!r}: "
                "use --layers for stream points"
            )
        n = adapter.heads_at(point)
        by_layer: dict[int, list[int]] = {}
        for layer, head in parse_heads(config.heads):
            adapter.check_layer(layer)
            if not 0 <= head < n:
                raise ConfigError(
                    f"head index {head} is out of range at layer {layer}: "
                    f"{point} has heads 0..{n - 1} in this model"
                )
            by_layer.setdefault(layer, []).append(head)
        return [PatchSpec(layer, point, tuple(hs)) for layer, hs in sorted(by_layer.items())]
    if not config.layers:
        raise ConfigError("--layers is empty: give the layers to patch, e.g. --layers 19")
    for layer in config.layers:
        adapter.check_layer(layer)
    return [PatchSpec(layer, point) for layer in sorted(set(config.layers))]


def circularity(specs: list[PatchSpec], early: int, late: int, every_position: bool) -> Circularity:
    """Whether the patch writes what the R_V metric then reads (SCIENCE.md §3).

    every_position: the patch covers every position of (some) target, i.e. --positions all or
    a target exactly W tokens long.
    """
    reasons = []
    for spec in specs:
        where = f"blocks.{spec.layer}.{spec.point}"
        if spec.point == "v" and spec.layer in (early, late):
            reasons.append(f"{where} is the V the metric reads")
        if spec.point in RESIDUAL_POINTS:
            feeds = spec.layer if spec.point == "resid_pre" else spec.layer + 1
            if feeds in (early, late):
                reasons.append(
                    f"{where} is the residual stream V at layer {feeds} is computed from, "
                    "token by token, at the read positions"
                )
            elif every_position and feeds <= late:
                reasons.append(
                    f"{where} at every position replaces the whole residual stream: V at "
                    f"layer {late} is then determined by the patch alone"
                )
    if reasons:
        return Circularity(True, "circular patch: " + "; ".join(reasons))
    # V at layer L is computed before z, attn_out, mlp_out and resid_post of layer L.
    invisible = all(
        spec.layer > late or (spec.layer == late and spec.point not in ("resid_pre", "v"))
        for spec in specs
    )
    if invisible:
        return Circularity(
            False,
            f"every patched point is computed after V at layer {late}: no effect possible",
            no_effect=True,
        )
    return Circularity(False, None)


def aligned_source_index(
    n_src: Sequence[int], n_tgt: Sequence[int], width: int, window: int | None, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which source position each target position of a right-padded batch reads.

    Returns (index (N, width) long, patched (N, width) bool). Row i patches target positions
    n_tgt - W .. n_tgt - 1 (window=W) or 0 .. n_tgt - 1 (window=None, equal lengths), each
    from the source position aligned from the end: target j <- source j + n_src - n_tgt.
    """
    cols = torch.arange(width, device=device)[None, :]  # (1, T)
    ns = torch.tensor(list(n_src), device=device)[:, None]  # (N, 1)
    nt = torch.tensor(list(n_tgt), device=device)[:, None]  # (N, 1)
    first = nt - window if window is not None else torch.zeros_like(nt)  # (N, 1)
    patched = (cols >= first) & (cols < nt)  # (N, T)
    index = (cols + ns - nt).clamp(min=0, max=int(max(n_src)) - 1)  # (N, T)
    return index, patched


def batched_patch_edit(
    source: torch.Tensor, index: torch.Tensor, patched: torch.Tensor, heads: Sequence[int] | None
) -> EditFn:
    """Edit writing each row's source activations into the target rows.

    source: (N, T_src, H, D) or (N, T_src, d) from the source run; index / patched (N, T):
    from :func:`aligned_source_index`. heads: only these heads of a per-head point (None =
    the whole point). Every (position, head) pair of the two sets is written.
    """
    rows = torch.arange(source.shape[0], device=source.device)[:, None]  # (N, 1)
    aligned = source[rows, index]  # (N, T, H, D) or (N, T, d)
    where = patched  # (N, T)
    if source.dim() == 4:
        head_mask = torch.ones(source.shape[2], dtype=torch.bool, device=source.device)  # (H,)
        if heads is not None:
            head_mask = torch.zeros_like(head_mask)
            head_mask[list(heads)] = True
        where = where[:, :, None, None] & head_mask[None, None, :, None]  # (N, T, H, 1)
    else:
        where = where[:, :, None]  # (N, T, 1)

    def edit(x: torch.Tensor) -> torch.Tensor:  # (N, T, H, D) or (N, T, d)
        return torch.where(where.to(x.device), aligned.to(device=x.device, dtype=x.dtype), x)

    return edit


def patched_r_v_batch(
    lm,
    pairs: Sequence[tuple[str, str]],
    specs: list[PatchSpec],
    early: int,
    late: int,
    window: int,
    pr_mode: str,
    positions: str = "window",
) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """R_V of each target with ``specs`` patched from its own source, all pairs in two
    forwards (every source, then every patched target; rows right-padded).

    pairs: (source text, target text). Returns (R_V (N,) float64, {"early": V windows
    (N, W, Hkv, D), "late": ...}) of the patched runs; equal to one pair at a time (tested).
    """
    src = encode(lm.tokenizer, [s for s, _ in pairs], lm.device)
    tgt = encode(lm.tokenizer, [t for _, t in pairs], lm.device)
    if positions == "all":
        for i, (n_src, n_tgt) in enumerate(zip(src.n_tokens, tgt.n_tokens, strict=True)):
            if n_src != n_tgt:
                raise PromptError(
                    f"pair {i}: source has {n_src} tokens and target {n_tgt}: --positions all "
                    "needs equal lengths; use --positions window (aligned from the end)"
                )
    points = [address(s.layer, s.point) for s in specs]
    deepest = max(s.layer for s in specs)
    with (
        torch.no_grad(),
        Trace(lm.model, lm.adapter, capture=points, stop_after_layer=deepest) as source_run,
    ):
        lm.model(**src.model_inputs(), use_cache=False)
    index, patched = aligned_source_index(
        src.n_tokens,
        tgt.n_tokens,
        tgt.input_ids.shape[1],
        None if positions == "all" else window,
        lm.device,
    )  # (N, T), (N, T)
    edits = {
        point: batched_patch_edit(source_run[point], index, patched, spec.heads)
        for spec, point in zip(specs, points, strict=True)
    }
    measured = measure_pr(
        lm.model, lm.adapter, tgt, [early, late], window, modes=[pr_mode], edits=edits,
        keep_windows=True,
    )  # fmt: skip
    windows = {"early": measured.windows[early], "late": measured.windows[late]}  # (N, W, Hkv, D)
    return measured.r_v(early, late, pr_mode), windows


def patched_r_v(
    lm, source_text: str, target_text: str, *measure: Any, **options: Any
) -> tuple[float, dict[str, torch.Tensor]]:
    """R_V of one target patched from one source: :func:`patched_r_v_batch` on a batch of one
    pair (``measure`` and ``options``: its arguments after ``pairs``, from ``specs`` on).

    Returns (R_V, {"early": V window (1, W, Hkv, D), "late": ...}) of the patched run.
    """
    values, windows = patched_r_v_batch(lm, [(source_text, target_text)], *measure, **options)
    return float(values[0]), windows


def n_tokens_of(lm, text: str) -> int:
    return len(lm.tokenizer([text])["input_ids"][0])


def make_pairs(prepared, config: PatchConfig) -> list:
    """(source, target) prompt pairs: i-th of the source group with i-th of the target group."""
    sources = [p for p in prepared.prompts if p.group == config.source_group]
    targets = [p for p in prepared.prompts if p.group == config.target_group]
    if not sources or not targets:
        raise PromptError(
            f"patching needs prompts in both groups {config.source_group} (source) and "
            f"{config.target_group} (target); got {len(sources)} and {len(targets)}"
        )
    pairs = list(zip(sources, targets, strict=False))
    if config.positions == "all":
        for s, t in pairs:
            n_s, n_t = n_tokens_of(prepared.lm, s.text), n_tokens_of(prepared.lm, t.text)
            if n_s != n_t:
                raise PromptError(
                    f"pair {s.id} ({n_s} tokens) -> {t.id} ({n_t} tokens) has different lengths: "
                    "--positions all needs equal lengths; use --positions window "
                    "(aligned from the end)"
                )
    return pairs


def run_patching(config: PatchConfig, out=None, force: bool = False, lm=None):
    """``rloop patch``: returns (run_dir, already_complete, headline)."""

    if config.source_group == config.target_group:
        raise ConfigError("--source-group and --target-group must differ")
    if config.groups is None:
        config.groups = [config.source_group, config.target_group]
    prepared = prepare(config, None, lm)
    lm = prepared.lm
    specs = patch_specs(config, lm.adapter)
    early, late = prepared.early, prepared.late
    pairs = make_pairs(prepared, config)
    shortest_target = min(n_tokens_of(lm, t.text) for _, t in pairs)
    every_position = config.positions == "all" or shortest_target == config.window
    circ = circularity(specs, early, late, every_position)

    def body(run) -> dict:
        record_inputs(
            run,
            prepared,
            patch={
                "specs": [{"layer": s.layer, "point": s.point, "heads": s.heads} for s in specs],
                "positions": config.positions,
                "alignment": "last W real positions, aligned from the end"
                if config.positions == "window"
                else "every position (equal lengths)",
                "circular": circ.circular,
                "note": circ.reason,
            },
        )
        started = time.perf_counter()
        src_batch = encode(lm.tokenizer, [s.text for s, _ in pairs], lm.device)
        tgt_batch = encode(lm.tokenizer, [t.text for _, t in pairs], lm.device)
        _, _, source_rv = measure_r_v(
            lm.model, lm.adapter, src_batch, early, late, config.window, config.pr_mode
        )
        _, _, target_rv = measure_r_v(
            lm.model, lm.adapter, tgt_batch, early, late, config.window, config.pr_mode
        )
        chunks = [
            list(range(start, min(start + config.batch_size, len(pairs))))
            for start in range(0, len(pairs), config.batch_size)
        ]

        def patch_chunk(chunk: list[int]) -> pd.DataFrame:
            values, _ = patched_r_v_batch(
                lm,
                [(pairs[i][0].text, pairs[i][1].text) for i in chunk],
                specs,
                early,
                late,
                config.window,
                config.pr_mode,
                config.positions,
            )
            return pd.DataFrame({"pair": chunk, "r_v_patched": values})

        done = run_units(
            run, chunks, patch_chunk, key=lambda c: f"pairs-{c[0]:05d}", label="patching pairs",
            weight=len,
        )  # fmt: skip
        patched = done.sort_values("pair")["r_v_patched"].to_numpy(dtype=float)
        seconds = time.perf_counter() - started
        gap_ci = bootstrap_ci(source_rv - target_rv, n_boot=config.n_boot, seed=config.seed)
        noise = (gap_ci.high - gap_ci.low) / 2 if np.isfinite(gap_ci.high) else np.inf
        results = _pair_rows(
            pairs, src_batch, tgt_batch, source_rv, target_rv, patched, noise, circ
        )
        results["layer_early"], results["layer_late"] = early, late
        summary = _patch_summary(specs, config, source_rv, target_rv, patched, noise, circ)
        row = summary.iloc[0]
        mean_t, mean_s, mean_patched = row["r_v_target"], row["r_v_source"], row["r_v_patched"]
        value, reason = row["transfer_pct"], row["transfer_note"]
        run.write_table("results", results)
        run.write_table("summary", summary)
        _plot(results, run.plot_path("patching"), specs)
        run.write_summary(_markdown(summary, specs, circ, config, prepared, seconds))
        run.update_manifest(timings={"patching_s": seconds})
        return {
            "n_pairs": len(pairs),
            "r_v_target": mean_t,
            "r_v_patched": mean_patched,
            "r_v_source": mean_s,
            "transfer_pct": value,
            **({"note": reason} if reason else {}),
        }

    identity = run_identity(config, measure_layers=[early, late])
    return execute(EXPERIMENT, identity, lm.name, out, body, force=force).as_tuple()


def _pair_rows(pairs, src_batch, tgt_batch, source_rv, target_rv, patched, noise, circ):
    """One row per (source, target) pair: the three R_V values, the change and transfer %."""
    rows = []
    for i, (s, t) in enumerate(pairs):
        value, reason = _transfer(patched[i], target_rv[i], source_rv[i], noise, circ)
        rows.append(
            {
                "pair": i,
                "source_id": s.id,
                "target_id": t.id,
                "n_tokens_source": src_batch.n_tokens[i],
                "n_tokens_target": tgt_batch.n_tokens[i],
                "r_v_source": source_rv[i],
                "r_v_target": target_rv[i],
                "r_v_patched": patched[i],
                "patch_change": patched[i] - target_rv[i],
                "transfer_pct": value,
                "transfer_note": reason,
                "circular": circ.circular,
            }
        )
    return pd.DataFrame(rows)


def _patch_summary(specs, config, source_rv, target_rv, patched, noise, circ) -> pd.DataFrame:
    """One row: mean R_V of sources, targets and patched targets, the paired change with its
    bootstrap CI over pairs, and the transfer % of the means (undefined within noise)."""
    mean_patched = float(np.nanmean(patched))
    mean_t, mean_s = float(np.nanmean(target_rv)), float(np.nanmean(source_rv))
    value, reason = _transfer(mean_patched, mean_t, mean_s, noise, circ)
    change_ci = bootstrap_ci(patched - target_rv, n_boot=config.n_boot, seed=config.seed)
    return pd.DataFrame(
        [
            {
                "n_pairs": len(patched),
                "patch": describe(specs),
                "positions": config.positions,
                "r_v_source": mean_s,
                "r_v_target": mean_t,
                "r_v_patched": mean_patched,
                "patch_change": change_ci.estimate,
                "patch_change_ci_low": change_ci.low,
                "patch_change_ci_high": change_ci.high,
                "gap": mean_s - mean_t,
                "gap_noise": noise,
                "transfer_pct": value,
                "transfer_note": reason,
                "circular": circ.circular,
            }
        ]
    )


def _transfer(patched, target, source, noise, circ: Circularity) -> tuple[float, str | None]:
    if circ.circular:
        return float("nan"), circ.reason
    value, reason = transfer_percent(patched, target, source, noise)
    if circ.no_effect and reason is None:
        reason = circ.reason
    return value, reason


def describe(specs: list[PatchSpec]) -> str:
    """'L15.z[4] + L16.z[2]' for the log and the tables."""
    parts = []
    for s in specs:
        heads = "" if s.heads is None else "[" + ",".join(str(h) for h in s.heads) + "]"
        parts.append(f"L{s.layer}.{s.point}{heads}")
    return " + ".join(parts)


def _plot(results, path, specs) -> None:

    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(results))
    ax.plot(x, results["r_v_source"], "o", label="source (clean)")
    ax.plot(x, results["r_v_target"], "s", label="target (clean)")
    ax.plot(x, results["r_v_patched"], "^", label="target, patched")
    ax.set_xlabel("pair")
    ax.set_ylabel("R_V")
    ax.set_title(f"Patching {describe(specs)}"[:80])
    ax.legend(fontsize=8)
    _save(fig, path)


def _markdown(summary, specs, circ, config, prepared, seconds) -> str:
    row = summary.iloc[0]  # the one summary row of the patch
    lines = [
        *summary_head("Activation patching", prepared.lm),
        f"- patch: {describe(specs)} from {config.source_group} (source) into "
        f"{config.target_group} (target), pairs i -> i ({row['n_pairs']} pairs)",
        "- positions: "
        + (
            f"the last {config.window} real positions, aligned from the end"
            if config.positions == "window"
            else "every position (equal lengths)"
        ),
        f"- R_V = PR(L{prepared.late}) / PR(L{prepared.early}) ({prepared.rule}), "
        f"{config.pr_mode} PR, window {config.window}",
        "",
    ]
    if circ.circular:
        lines += [
            f"**{circ.reason}.** The patched R_V measures the patch, not the model; "
            "no transfer is reported.",
            "",
        ]
    elif circ.no_effect:
        lines += [f"**{circ.reason}.**", ""]
    transfer = (
        f"{row['transfer_pct']:.1f} %"
        if np.isfinite(row["transfer_pct"])
        else f"undefined ({row['transfer_note']})"
    )
    lines += [
        f"- mean R_V: source {row['r_v_source']:.4f}, target {row['r_v_target']:.4f}, "
        f"patched target {row['r_v_patched']:.4f}",
        f"- patch change {row['patch_change']:+.4f} (95 % CI {row['patch_change_ci_low']:+.4f}.."
        f"{row['patch_change_ci_high']:+.4f})",
        f"- transfer: {transfer} (gap {row['gap']:+.4f}, noise {row['gap_noise']:.4f})",
        f"- time: {seconds:.1f} s",
        "",
        markdown_table(summary),
        "",
        "Files: `results.*` (per pair), `summary.*`, `plots/patching.png`.",
    ]
    return "\n".join(lines) + "\n"
