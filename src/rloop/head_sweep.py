"""Exact batched head-ablation sweep (SCIENCE.md §3).

For every head at every swept layer, the R_V of every prompt with that head ablated, exactly
as a plain forward with that one head ablated would give it, but computed so:

1. one clean forward caches the residual stream entering every swept layer and the clean V
   windows at the early and late measurement layers;
2. for a head at layer l, the blocks below l are not recomputed: they return the cached
   residual stream (:class:`SkipBlocks`), so the forward starts at block l;
3. variants (one ablated head each) are stacked along the batch dimension, ``n_prompts`` rows
   per variant, chunked to a row budget;
4. the forward stops right after the late layer's value projection: no later layer, no final
   norm, no LM head;
5. heads at layers >= the late layer cannot change V at the late layer (causality), so their
   impact is exactly 0 and they are not computed; heads at layers >= the early layer leave
   PR(early) at its clean value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from rloop.adapters import Adapter
from rloop.batching import EncodedBatch, gather_windows
from rloop.capture import Trace, address
from rloop.interventions import head_ablation_edit, keep_mask, query_heads_of
from rloop.metrics import window_pr
from rloop.profiles import check_mode_for_point


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
    clean_early / clean_late: mode -> (n_prompts,)."""

    layers: list[int]
    n_units: int
    unit: str
    pr_early: dict[str, torch.Tensor]
    pr_late: dict[str, torch.Tensor]
    clean_early: dict[str, torch.Tensor]
    clean_late: dict[str, torch.Tensor]
    computed_layers: list[int]


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
    max_rows: int = 512,
    on_layer: Callable[[int], None] | None = None,
) -> SweepResult:
    """Ablate each head (or KV group) of ``layers`` in turn; PR at early/late per prompt.

    batch: the prompts (right-padded, P rows). mean_z: layer -> (H, D) reference means for
    mean ablation (None = zero ablation). max_rows bounds the rows of one stacked forward.
    """
    check_mode_for_point("v", modes)
    n_prompts = batch.input_ids.shape[0]
    n_units = adapter.n_heads if unit == "query" else adapter.n_kv_heads
    v_early, v_late = address(early, "v"), address(late, "v")
    todo = sorted(layer for layer in layers if layer < late)
    resid_points = [address(layer, "resid_pre") for layer in todo]
    inputs = batch.model_inputs()

    with (
        torch.no_grad(),
        Trace(
            model, adapter, capture=[v_early, v_late, *resid_points], stop_after_point=v_late
        ) as clean,
    ):
        model(**inputs, use_cache=False)
    clean_windows = {
        "early": gather_windows(clean[v_early], batch.n_tokens, window),  # (P, W, Hkv, D)
        "late": gather_windows(clean[v_late], batch.n_tokens, window),
    }
    clean_early = {m: window_pr(clean_windows["early"], m) for m in modes}  # mode -> (P,)
    clean_late = {m: window_pr(clean_windows["late"], m) for m in modes}

    shape = (len(layers), n_units, n_prompts)
    pr_early = {m: clean_early[m].expand(shape).clone() for m in modes}
    pr_late = {m: clean_late[m].expand(shape).clone() for m in modes}
    row_of = {layer: i for i, layer in enumerate(layers)}

    # Every (unit, prompt) pair is one row; rows are ordered by prompt length so that each
    # stacked chunk is trimmed to its own longest prompt (right padding: trimming the tail
    # removes pad columns only).
    pairs = sorted(
        ((u, p) for u in range(n_units) for p in range(n_prompts)),
        key=lambda up: (batch.n_tokens[up[1]], up[1], up[0]),
    )
    for layer in todo:
        resid = clean[address(layer, "resid_pre")]  # (P, T, d)
        for start in range(0, len(pairs), max_rows):
            chunk = pairs[start : start + max_rows]
            units = [u for u, _ in chunk]
            prompts = torch.tensor([p for _, p in chunk], device=resid.device)  # (N,)
            lengths = [batch.n_tokens[p] for _, p in chunk]
            width = max(lengths)
            keep = keep_mask(adapter, [[u] for u in units], unit)  # (N, H), one row each
            stacked = {k: v[prompts, :width] for k, v in inputs.items()}  # (N, T')
            edit = head_ablation_edit(keep, None if mean_z is None else mean_z[layer])
            capture = [v_late] + ([v_early] if layer < early else [])
            with (
                torch.no_grad(),
                SkipBlocks(model, adapter, layer, resid[prompts, :width]),
                Trace(
                    model,
                    adapter,
                    capture=capture,
                    edits={address(layer, "z"): edit},
                    stop_after_point=v_late,
                ) as tr,
            ):
                model(**stacked, use_cache=False)
            unit_index = torch.tensor(units)
            prompt_index = prompts.cpu()
            late_windows = gather_windows(tr[v_late], lengths, window)  # (N, W, Hkv, D)
            for m in modes:
                pr_late[m][row_of[layer], unit_index, prompt_index] = window_pr(late_windows, m)
            if layer < early:
                early_windows = gather_windows(tr[v_early], lengths, window)
                for m in modes:
                    pr_early[m][row_of[layer], unit_index, prompt_index] = window_pr(
                        early_windows, m
                    )
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
    )


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
