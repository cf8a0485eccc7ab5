"""Exact batched head-ablation sweep (SCIENCE.md §3).

For every head at every swept layer, the R_V of every prompt with that head ablated, exactly
as a plain forward with that one head ablated would give it, but computed so:

1. one clean forward caches the residual stream entering every swept layer and the clean V
   windows at the early and late measurement layers;
2. for a head at layer l, the blocks below l are not recomputed: they return the cached
   residual stream (:class:`SkipBlocks`), so the forward starts at block l;
3. variants (one ablated head each) are stacked along the batch dimension, ``n_prompts`` rows
   per variant, in balanced chunks that fit a memory budget;
4. the forward stops right after the late layer's value projection: no later layer, no final
   norm, no LM head;
5. heads at layers >= the late layer cannot change V at the late layer (causality), so their
   impact is exactly 0 and they are not computed; heads at layers >= the early layer leave
   PR(early) at its clean value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from rloop.adapters import Adapter
from rloop.adapters.base import text_config
from rloop.capture.batching import EncodedBatch, gather_windows, take_windows, window_positions
from rloop.capture.trace import LastTokenLogits, Trace, address
from rloop.interventions.edits import head_ablation_edit, keep_mask, query_heads_of
from rloop.interventions.engine import check_mode_for_point
from rloop.metrics import kl_divergence, window_pr


@contextmanager
def SkipBlocks(model: nn.Module, adapter: Adapter, start_layer: int, resid: torch.Tensor):
    """Make blocks 0..start_layer-1 return ``resid`` (B, T, d) instead of computing.

    The block ``start_layer`` then reads exactly ``resid`` as its input. Embeddings, position
    information and masks are still built by the model as usual (cheap).
    """
    blocks = adapter.blocks(model)
    patched = []

    def skipped(*args, **kwargs):
        return resid

    try:
        for layer in range(start_layer):
            blocks[layer].forward = skipped
            patched.append(blocks[layer])
        yield
    finally:
        for block in patched:
            del block.forward


@dataclass
class SweepResult:
    """pr_early / pr_late: mode -> (n_layers_swept, n_units, n_prompts) float64 CPU tensors;
    clean_early / clean_late: mode -> (n_prompts,). kl: (n_layers_swept, n_units, n_prompts)
    KL(clean || ablated) of the last real token's next-token distribution, when asked for."""

    layers: list[int]
    n_units: int
    unit: str
    pr_early: dict[str, torch.Tensor]
    pr_late: dict[str, torch.Tensor]
    clean_early: dict[str, torch.Tensor]
    clean_late: dict[str, torch.Tensor]
    computed_layers: list[int]
    kl: torch.Tensor | None = None


# Activation memory of one block's forward per token, in model-dtype elements, as a multiple
# of (d_model, intermediate): residual, norm output, q/k/v (+ rotary copies), attention
# result and output, MLP in/out; plus one attention-score row per head (eager attention
# materialises (B, H, T, T)); doubled for allocator slack and temporaries.
_BLOCK_ELEMENTS_PER_TOKEN = (12, 2)
_SLACK = 2.0


def activation_bytes_per_token(model: nn.Module, adapter: Adapter, width: int) -> int:
    """Estimated peak activation bytes one stacked row-token of a ``width``-token forward
    costs in a block."""
    config = text_config(model.config)
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    inter = int(inter or 4 * adapter.d_model)
    dtype = next(model.parameters()).dtype
    per_d, per_inter = _BLOCK_ELEMENTS_PER_TOKEN
    elements = per_d * adapter.d_model + per_inter * inter + adapter.n_heads * width
    return int(_SLACK * elements * torch.finfo(dtype).bits // 8)


def default_memory_budget(device: torch.device) -> int:
    """Bytes one stacked forward may use: a quarter of the free memory of a CUDA device, 1 GiB
    on the CPU (larger chunks do not make CPU matmuls faster)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 4)
    return 1 << 30


def plan_chunks(lengths: Sequence[int], max_tokens: int, max_rows: int | None = None):
    """Split rows (already sorted by length) into contiguous chunks of balanced size.

    Each chunk has at most ``max_rows`` rows and at most ``max_tokens`` padded tokens (rows x
    its longest row, rows are right-padded). Returns a list of (start, stop) pairs.
    """
    n = len(lengths)
    cap = max(1, min(max_rows or n, max_tokens // max(1, max(lengths, default=1))))
    n_chunks = -(-n // cap)  # ceil
    size = -(-n // n_chunks)  # balanced: sizes differ by at most one chunk's remainder
    chunks, start = [], 0
    while start < n:
        stop = min(n, start + size)
        # Rows are sorted by length, so a chunk's longest row is its last one.
        while stop - start > 1 and (stop - start) * lengths[stop - 1] > max_tokens:
            stop -= 1
        chunks.append((start, stop))
        start = stop
    return chunks


@dataclass
class _Chunk:
    """One stacked forward: rows (unit, prompt), their tensors on the model's device."""

    units: torch.Tensor  # (N,) long
    prompts: torch.Tensor  # (N,) long
    width: int  # longest prompt in the chunk: the forward runs on T' = width columns
    inputs: dict[str, torch.Tensor]  # (N, T') each
    keep: torch.Tensor  # (N, H) 0 = ablated query head
    windows: torch.Tensor  # (N, W) positions of the last W real tokens
    last: torch.Tensor  # (N,) position of the last real token


@torch.no_grad()
def head_sweep(
    model: nn.Module,
    adapter: Adapter,
    batch: EncodedBatch,
    layers: Sequence[int],
    early: int,
    late: int,
    window: int,
    modes: Sequence[str] = ("per-head",),
    unit: str = "query",
    mean_z: dict[int, torch.Tensor] | None = None,
    max_rows: int | None = None,
    on_layer: Callable[[int], None] | None = None,
    memory_budget: int | None = None,
    kl: bool = False,
) -> SweepResult:
    """Ablate each head (or KV group) of ``layers`` in turn; PR at early/late per prompt.

    batch: the prompts (right-padded, P rows). mean_z: layer -> (H, D) reference means for
    mean ablation (None = zero ablation). Rows of one stacked forward are bounded by
    ``memory_budget`` bytes of activations (default :func:`default_memory_budget`) and, if
    given, by ``max_rows``. The loop never waits for the device; results come back at the end.

    kl: also measure KL(clean || ablated) of the next-token distribution at each prompt's last
    real token, a behaviour proxy. Every forward then runs through the last block (the LM
    head only at that token), and heads at layers >= ``late`` are computed too (for KL only:
    their R_V stays exactly the clean value).
    """
    check_mode_for_point("v", modes)
    n_prompts = batch.input_ids.shape[0]
    n_units = adapter.n_heads if unit == "query" else adapter.n_kv_heads
    v_early, v_late = address(early, "v"), address(late, "v")
    todo = sorted(layer for layer in layers if layer < late)
    run_layers = sorted(set(layers)) if kl else todo
    resid_points = [address(layer, "resid_pre") for layer in run_layers]
    stop_point = None if kl else v_late
    inputs = batch.model_inputs()
    device = batch.input_ids.device
    clean_positions = window_positions(batch.n_tokens, window, device)  # (P, W)

    last_clean = torch.tensor(batch.n_tokens, device=device) - 1  # (P,)
    with (
        torch.no_grad(),
        Trace(
            model, adapter, capture=[v_early, v_late, *resid_points], stop_after_point=stop_point
        ) as clean,
        _logits_at(model, adapter, last_clean, kl) as clean_head,
    ):
        model(**inputs, use_cache=False)
    clean_logits = clean_head.logits() if kl else None  # (P, V)
    clean_windows = {
        "early": take_windows(clean[v_early], clean_positions),  # (P, W, Hkv, D)
        "late": take_windows(clean[v_late], clean_positions),
    }
    clean_early = {m: window_pr(clean_windows["early"], m) for m in modes}  # mode -> (P,)
    clean_late = {m: window_pr(clean_windows["late"], m) for m in modes}

    shape = (len(layers), n_units, n_prompts)
    pr_early = {m: clean_early[m].expand(shape).clone() for m in modes}
    pr_late = {m: clean_late[m].expand(shape).clone() for m in modes}
    row_of = {layer: i for i, layer in enumerate(layers)}
    kl_values = torch.zeros(shape, dtype=torch.float64, device=device) if kl else None

    # Every (unit, prompt) pair is one row; rows are ordered by prompt length so that each
    # stacked chunk is trimmed to its own longest prompt (right padding: trimming the tail
    # removes pad columns only). The chunks are the same for every layer: build them once.
    pairs = sorted(
        ((u, p) for u in range(n_units) for p in range(n_prompts)),
        key=lambda up: (batch.n_tokens[up[1]], up[1], up[0]),
    )
    lengths = [batch.n_tokens[p] for _, p in pairs]
    budget = memory_budget if memory_budget is not None else default_memory_budget(device)
    per_token = activation_bytes_per_token(model, adapter, max(lengths))
    max_tokens = max(1, budget // per_token)
    chunks = []
    for first, end in plan_chunks(lengths, max_tokens, max_rows):
        units = [u for u, _ in pairs[first:end]]
        prompts = torch.tensor([p for _, p in pairs[first:end]], device=device)  # (N,)
        width = lengths[end - 1]
        chunks.append(
            _Chunk(
                units=torch.tensor(units, device=device),
                prompts=prompts,
                width=width,
                inputs={k: v[prompts, :width] for k, v in inputs.items()},  # (N, T')
                keep=keep_mask(adapter, [[u] for u in units], unit).to(device),  # (N, H)
                windows=window_positions(lengths[first:end], window, device),  # (N, W)
                last=torch.tensor(lengths[first:end], device=device) - 1,  # (N,)
            )
        )

    for layer in run_layers:
        resid = clean[address(layer, "resid_pre")]  # (P, T, d)
        capture = ([v_late] if layer < late else []) + ([v_early] if layer < early else [])
        for chunk in chunks:
            edit = head_ablation_edit(chunk.keep, None if mean_z is None else mean_z[layer])
            with (
                torch.no_grad(),
                SkipBlocks(model, adapter, layer, resid[chunk.prompts, : chunk.width]),
                Trace(
                    model,
                    adapter,
                    capture=capture,
                    edits={address(layer, "z"): edit},
                    stop_after_point=stop_point,
                ) as tr,
                _logits_at(model, adapter, chunk.last, kl) as head,
            ):
                model(**chunk.inputs, use_cache=False)
            cells = (row_of[layer], chunk.units, chunk.prompts)
            if kl:
                kl_values[cells] = kl_divergence(clean_logits[chunk.prompts], head.logits())
            if layer >= late:
                continue
            late_windows = take_windows(tr[v_late], chunk.windows)  # (N, W, Hkv, D)
            for m in modes:
                pr_late[m][cells] = window_pr(late_windows, m)
            if layer < early:
                early_windows = take_windows(tr[v_early], chunk.windows)  # (N, W, Hkv, D)
                for m in modes:
                    pr_early[m][cells] = window_pr(early_windows, m)
        if on_layer is not None:
            on_layer(layer)

    def cpu(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: t.cpu() for m, t in values.items()}

    return SweepResult(
        list(layers),
        n_units,
        unit,
        cpu(pr_early),
        cpu(pr_late),
        cpu(clean_early),
        cpu(clean_late),
        todo,
        kl_values.cpu() if kl_values is not None else None,
    )


def _logits_at(model: nn.Module, adapter: Adapter, positions: torch.Tensor, on: bool):
    """:class:`LastTokenLogits` when ``on``, else a do-nothing context."""
    return LastTokenLogits(model, adapter, positions) if on else nullcontext()


def single_head_reference(
    model: nn.Module,
    adapter: Adapter,
    batch: EncodedBatch,
    layer: int,
    head: int,
    early: int,
    late: int,
    window: int,
    mode: str = "per-head",
    unit: str = "query",
    mean_z: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward way: one full forward with one head ablated. (P,) PR early, late."""
    keep = torch.ones(1, adapter.n_heads)
    keep[0, query_heads_of(adapter, [head], unit)] = 0.0
    edit = head_ablation_edit(keep, mean_z)
    with (
        torch.no_grad(),
        Trace(
            model,
            adapter,
            capture=[address(early, "v"), address(late, "v")],
            edits={address(layer, "z"): edit},
        ) as tr,
    ):
        model(**batch.model_inputs(), use_cache=False)
    e = gather_windows(tr[address(early, "v")], batch.n_tokens, window)
    lt = gather_windows(tr[address(late, "v")], batch.n_tokens, window)
    return window_pr(e, mode), window_pr(lt, mode)
