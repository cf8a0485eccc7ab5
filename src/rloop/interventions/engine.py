"""THE R_V engine: participation ratio of a hook point at some layers, for a batch of prompts,
clean or under a set of edits, over the last W real tokens of each prompt.

Every experiment that measures PR or R_V on prompts goes through :func:`measure_pr` (any set
of layers and PR modes, one forward per batch, stopped right after the deepest hook point) or
its R_V form :func:`measure_r_v`. Windows from generation (KV-cached steps) go through
:func:`windows_r_v`, the same PR code on windows assembled elsewhere. The exact head sweep
(:mod:`rloop.interventions.head_sweep`) keeps its specialised forward but shares the window
and PR functions.

Stacked variants: ``variants=N`` repeats the batch N times along the batch dimension (rows
``v * B + b``), so N edited variants (a per-row edit, e.g. a keep-mask per variant) run in one
forward; results come back as (N, B).

Layer rule: :func:`resolve_layers` picks the early and late layer (depth fractions by default)
and records how they were chosen; :func:`check_mode_for_point` refuses per-head PR at a hook
point that has no head axis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from rloop.adapters import HEAD_POINTS, Adapter
from rloop.capture.batching import EncodedBatch, encode, gather_windows
from rloop.capture.trace import EditFn, Trace, address
from rloop.errors import ConfigError
from rloop.interventions.edits import HeadList, stacked_head_edits
from rloop.metrics import (
    PR_MODES,
    participation_ratio_with_reason,
    r_v,
    window_pr,
    window_pr_with_reason,
)

DEPTH_EARLY = 0.15
DEPTH_LATE = 0.84


def default_layers(n_layers: int) -> tuple[int, int]:
    """Early and late layer by depth fraction: round(0.15 * n) and round(0.84 * n), clamped."""
    early = min(n_layers - 1, math.floor(DEPTH_EARLY * n_layers + 0.5))
    late = min(n_layers - 1, math.floor(DEPTH_LATE * n_layers + 0.5))
    return early, late


def resolve_layers(
    adapter: Adapter, layers: Sequence[int] | None, flag: str = "--layers"
) -> tuple[int, int, str]:
    """(early, late, rule) with range checks; rule says how they were chosen.

    ``flag`` names the option the layers came from, for the error messages.
    """
    if layers is None:
        early, late = default_layers(adapter.n_layers)
        rule = f"depth fractions {DEPTH_EARLY:.2f}/{DEPTH_LATE:.2f} of {adapter.n_layers} layers"
    else:
        if len(layers) != 2:
            raise ConfigError(f"give exactly two layers EARLY,LATE with {flag}, got {list(layers)}")
        early, late = int(layers[0]), int(layers[1])
        rule = "explicit"
    for layer in (early, late):
        adapter.check_layer(layer)
    if early >= late:
        raise ConfigError(f"early layer {early} must be below late layer {late}: use {flag} E,L")
    return early, late, rule


def check_mode_for_point(point: str, modes: Sequence[str]) -> None:
    """Refuse unknown PR modes and per-head PR at a hook point without a head axis."""
    for mode in modes:
        if mode not in PR_MODES:
            raise ConfigError(f"unknown PR mode {mode!r}: choose one of {', '.join(PR_MODES)}")
        if mode == "per-head" and point not in HEAD_POINTS:
            raise ConfigError(
                f"per-head PR needs a per-head hook point ({', '.join(HEAD_POINTS)}), "
                f"not {point!r}: use --pr-mode whole"
            )


def windows_pr(
    windows: torch.Tensor, mode: str, reasons: bool = False
) -> tuple[torch.Tensor, list | None]:
    """PR of windows (B, W, H, D) at a head point or (B, W, d) at a stream point -> (B,)
    float64, and the NaN reasons (a list of B entries) when ``reasons`` is True.

    A stream point has no head axis: its PR is the "whole" PR whatever ``mode`` says (callers
    refuse per-head there with :func:`check_mode_for_point`).
    """
    if windows.dim() == 3:  # (B, W, d)
        if reasons:
            return participation_ratio_with_reason(windows)
        return participation_ratio_with_reason(windows)[0], None
    if reasons:
        return window_pr_with_reason(windows, mode)
    return window_pr(windows, mode), None


def windows_r_v(early: torch.Tensor, late: torch.Tensor, mode: str) -> torch.Tensor:
    """R_V per row from windows at the early and late layer, each (B, W, ...) -> (B,) float64."""
    return r_v(windows_pr(late, mode)[0], windows_pr(early, mode)[0])


@dataclass
class PRMeasurement:
    """PR of one hook point per (layer, mode): (rows,) float64 tensors on the CPU.

    rows = variants x prompts (variant-major) when variants were stacked. ``reasons`` holds
    the NaN reason of each row per (layer, mode) when asked for; ``windows`` the gathered
    windows per layer (on the model's device) when asked for.
    """

    layers: list[int]
    modes: list[str]
    n_tokens: list[int]
    pr: dict[tuple[int, str], torch.Tensor]
    reasons: dict[tuple[int, str], list] = field(default_factory=dict)
    windows: dict[int, torch.Tensor] = field(default_factory=dict)

    def r_v(self, early: int, late: int, mode: str) -> np.ndarray:
        """R_V = PR(late) / PR(early) per row, float64 numpy."""
        return r_v(self.pr[(late, mode)].numpy(), self.pr[(early, mode)].numpy())

    def table(self) -> pd.DataFrame:
        """Tidy rows (row, n_tokens, layer, pr_mode, pr, nan_reason)."""
        frames = []
        for (layer, mode), values in self.pr.items():
            pr = values.numpy()
            reasons = self.reasons.get((layer, mode)) or [None] * len(pr)
            frames.append(
                pd.DataFrame(
                    {
                        "row": np.arange(len(pr)),
                        "n_tokens": self.n_tokens,
                        "layer": layer,
                        "pr_mode": mode,
                        "pr": pr,
                        "nan_reason": [
                            r if math.isnan(v) else None for v, r in zip(pr, reasons, strict=True)
                        ],
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)


def measure_pr(
    model: nn.Module,
    adapter: Adapter,
    batch: EncodedBatch,
    layers: Sequence[int],
    window: int,
    *,
    point: str = "v",
    modes: Sequence[str] = ("per-head",),
    edits: Mapping[str, EditFn] | None = None,
    variants: int = 1,
    reasons: bool = False,
    keep_windows: bool = False,
) -> PRMeasurement:
    """PR of ``point`` at every layer in ``layers`` for the rows of ``batch`` (one forward).

    batch: right-padded prompts (B rows). edits: Trace edits (hook address -> function) applied
    during the forward; with ``variants`` = N the batch is repeated N times along the batch
    dimension before the forward (edits then see N * B rows, variant-major). The forward stops
    right after the deepest requested hook point. PR is float64 from the last ``window`` real
    tokens of each row (prompts shorter than the window raise PromptError by row).
    """
    if variants < 1:
        raise ConfigError(f"variants must be at least 1, got {variants}")
    layers = sorted(set(int(layer) for layer in layers))
    points = [address(layer, point) for layer in layers]
    inputs = batch.model_inputs()
    if variants > 1:
        inputs = {k: v.repeat(variants, 1) for k, v in inputs.items()}  # (N*B, T)
    n_tokens = list(batch.n_tokens) * variants
    with (
        torch.no_grad(),
        Trace(model, adapter, capture=points, edits=edits or {}, stop_after_point=points[-1]) as tr,
    ):
        model(**inputs, use_cache=False)
    result = PRMeasurement(layers, list(modes), n_tokens, {})
    for layer, hook in zip(layers, points, strict=True):
        windows = gather_windows(tr[hook], n_tokens, window)  # (N*B, W, ...)
        if keep_windows:
            result.windows[layer] = windows
        for mode in modes:
            pr, why = windows_pr(windows, mode, reasons)  # (N*B,)
            result.pr[(layer, mode)] = pr.cpu()
            if why is not None:
                result.reasons[(layer, mode)] = why
    return result


def measure_r_v(
    model: nn.Module,
    adapter: Adapter,
    batch: EncodedBatch,
    early: int,
    late: int,
    window: int,
    mode: str = "per-head",
    *,
    point: str = "v",
    edits: Mapping[str, EditFn] | None = None,
    variants: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(PR early, PR late, R_V) per row, each float64 numpy of shape (variants * B,)."""
    measured = measure_pr(
        model,
        adapter,
        batch,
        [early, late],
        window,
        point=point,
        modes=[mode],
        edits=edits,
        variants=variants,
    )
    pe = measured.pr[(early, mode)].numpy()  # (N*B,)
    pl = measured.pr[(late, mode)].numpy()  # (N*B,)
    return pe, pl, r_v(pl, pe)


def head_set_r_v(
    model: nn.Module,
    adapter: Adapter,
    batch: EncodedBatch,
    head_sets: Sequence[HeadList],
    early: int,
    late: int,
    window: int,
    mode: str,
    unit: str = "query",
    mean_z: dict[int, torch.Tensor] | None = None,
    max_rows: int = 256,
) -> np.ndarray:
    """R_V per (variant, prompt) with each variant's heads ablated together -> (N, P).

    Variants are stacked along the batch dimension (P rows each, at most ``max_rows`` rows
    per forward) with a per-row keep-mask at every layer a variant touches; equal to one
    forward per variant (tested).
    """
    n_prompts = batch.input_ids.shape[0]
    per_chunk = max(1, max_rows // n_prompts)
    out = np.empty((len(head_sets), n_prompts))
    for start in range(0, len(head_sets), per_chunk):
        chunk = head_sets[start : start + per_chunk]
        edits = stacked_head_edits(adapter, chunk, n_prompts, unit, mean_z)
        _, _, rv = measure_r_v(
            model, adapter, batch, early, late, window, mode, edits=edits, variants=len(chunk)
        )  # (N*P,)
        out[start : start + len(chunk)] = rv.reshape(len(chunk), n_prompts)
    return out


def ablated_r_v(
    lm,
    texts: Sequence[str],
    edits: Mapping[str, EditFn],
    early: int,
    late: int,
    window: int,
    mode: str = "per-head",
) -> tuple[np.ndarray, np.ndarray]:
    """(clean R_V, edited R_V) per prompt, (P,) each, for texts and a dict of Trace edits."""
    batch = encode(lm.tokenizer, list(texts), lm.device)
    clean = measure_r_v(lm.model, lm.adapter, batch, early, late, window, mode)[2]
    edited = measure_r_v(lm.model, lm.adapter, batch, early, late, window, mode, edits=edits)[2]
    return clean, edited
