"""Participation-ratio profiles: PR of one hook point at every requested layer, per prompt.

One forward pass per batch captures the hook point at all requested layers and stops after
the deepest one (no later block, no LM head). Windows are the last W real tokens of each
prompt; PR is computed in float64 by the canonical functions in :mod:`rloop.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from rloop.adapters import HEAD_POINTS, Adapter
from rloop.capture.batching import encode, gather_windows, plan_batches, token_counts
from rloop.capture.trace import Trace, address
from rloop.errors import ConfigError, PromptError
from rloop.metrics import PR_MODES, participation_ratio_with_reason, window_pr_with_reason

DEPTH_EARLY = 0.15
DEPTH_LATE = 0.84


def default_layers(n_layers: int) -> tuple[int, int]:
    """Early and late layer by depth fraction: round(0.15 * n) and round(0.84 * n), clamped."""
    early = min(n_layers - 1, math.floor(DEPTH_EARLY * n_layers + 0.5))
    late = min(n_layers - 1, math.floor(DEPTH_LATE * n_layers + 0.5))
    return early, late


def resolve_layers(adapter: Adapter, layers: Sequence[int] | None) -> tuple[int, int, str]:
    """(early, late, rule) with range checks; rule says how they were chosen."""
    if layers is None:
        early, late = default_layers(adapter.n_layers)
        rule = f"depth fractions {DEPTH_EARLY:.2f}/{DEPTH_LATE:.2f} of {adapter.n_layers} layers"
    else:
        if len(layers) != 2:
            raise ConfigError(f"give exactly two layers EARLY,LATE, got {list(layers)}")
        early, late = int(layers[0]), int(layers[1])
        rule = "explicit"
    for layer in (early, late):
        adapter.check_layer(layer)
    if early >= late:
        raise ConfigError(f"early layer {early} must be below late layer {late}: use --layers E,L")
    return early, late, rule


def check_mode_for_point(point: str, modes: Sequence[str]) -> None:
    for mode in modes:
        if mode not in PR_MODES:
            raise ConfigError(f"unknown PR mode {mode!r}: choose one of {', '.join(PR_MODES)}")
        if mode == "per-head" and point not in HEAD_POINTS:
            raise ConfigError(
                f"per-head PR needs a per-head hook point ({', '.join(HEAD_POINTS)}), "
                f"not {point!r}: use --pr-mode whole"
            )


@dataclass
class WindowedBatch:
    """Windows of one batch at each captured layer: layer -> (B, W, H, D) or (B, W, d)."""

    indices: list[int]
    n_tokens: list[int]
    windows: dict[int, torch.Tensor]


def iter_windows(
    model: torch.nn.Module,
    adapter: Adapter,
    tokenizer,
    texts: Sequence[str],
    layers: Sequence[int],
    point: str,
    window: int,
    batch_size: int = 16,
    skip: Callable[[int], bool] | None = None,
):
    """Yield (batch_number, WindowedBatch) for right-padded batches of ``texts``.

    ``skip(batch_number)`` lets a resumed run pass over finished batches without computing.
    Prompts shorter than ``window`` are rejected up front, by index and token count.
    """
    if window < 2:
        raise ConfigError(f"window must be at least 2 tokens, got {window}")
    lengths = token_counts(tokenizer, texts)
    short = [(i, n) for i, n in enumerate(lengths) if n < window]
    if short:
        raise PromptError(
            f"{len(short)} prompt(s) shorter than the {window}-token window: "
            + ", ".join(f"#{i} ({n} tokens)" for i, n in short[:5])
            + (" ..." if len(short) > 5 else "")
            + f"; use longer prompts or a smaller --window (minimum here {min(lengths)})"
        )
    device = next(model.parameters()).device
    deepest = max(layers)
    points = [address(layer, point) for layer in layers]
    for number, indices in enumerate(plan_batches(lengths, batch_size)):
        if skip is not None and skip(number):
            continue
        batch = encode(tokenizer, [texts[i] for i in indices], device)
        with torch.no_grad(), Trace(model, adapter, capture=points, stop_after_layer=deepest) as tr:
            model(**batch.model_inputs(), use_cache=False)
        windows = {
            layer: gather_windows(tr[address(layer, point)], batch.n_tokens, window)
            for layer in layers
        }  # layer -> (B, W, ...)
        yield number, WindowedBatch(indices, batch.n_tokens, windows)


def window_pr_table(batch: WindowedBatch, point: str, modes: Sequence[str]) -> pd.DataFrame:
    """Tidy PR rows for one batch: (item, n_tokens, layer, pr_mode, pr, nan_reason)."""
    rows = []
    for layer, values in batch.windows.items():
        for mode in modes:
            if values.dim() == 3:  # stream point (B, W, d): only "whole" is defined
                pr, reasons = participation_ratio_with_reason(values)  # (B,)
            else:  # head point (B, W, H, D)
                pr, reasons = window_pr_with_reason(values, mode)  # (B,)
            for b, item in enumerate(batch.indices):
                value = float(pr[b])
                rows.append(
                    {
                        "item": item,
                        "n_tokens": batch.n_tokens[b],
                        "layer": layer,
                        "pr_mode": mode,
                        "pr": value,
                        "nan_reason": reasons[b] if math.isnan(value) else None,
                    }
                )
    return pd.DataFrame(rows)
