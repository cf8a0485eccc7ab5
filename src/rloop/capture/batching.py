"""Tokenise prompt texts into right-padded batches.

Right padding keeps every real token at the position it has when the prompt runs alone
(position ids 0..n-1, causal attention never reaches the pad tokens after it), so batched
activations of real tokens equal batch-size-1 activations for every architecture, absolute
position embeddings (GPT-2, GPT-J) included. Windows are then the last W *real* tokens:
positions ``n_tokens - W .. n_tokens - 1`` of each row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rloop.adapters.base import Adapter
from rloop.capture.trace import EditFn, Trace
from rloop.errors import ConfigError, PromptError
from rloop.metrics import check_window_lengths


@dataclass
class EncodedBatch:
    """input_ids and attention_mask: (B, T) on the model's device; n_tokens: real tokens per row."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    n_tokens: list[int]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def token_counts(tokenizer, texts: Sequence[str]) -> list[int]:
    """Number of tokens the model sees for each text (special tokens included)."""
    return [len(ids) for ids in tokenizer(list(texts))["input_ids"]]


def encode(tokenizer, texts: Sequence[str], device: torch.device | str = "cpu") -> EncodedBatch:
    """Tokenise ``texts`` into one right-padded batch."""
    if not texts:
        raise PromptError("no prompts to encode: pass at least one prompt")
    rows = tokenizer(list(texts))["input_ids"]
    if any(len(r) == 0 for r in rows):
        raise PromptError("a prompt encodes to zero tokens: remove empty prompts")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return EncodedBatch(ids.to(device), mask.to(device), [len(r) for r in rows])


def plan_batches(
    lengths: Sequence[int], batch_size: int, max_tokens: int | None = None
) -> list[list[int]]:
    """Group item indices into batches of similar length (less padding), in a stable order.

    Each batch has at most ``batch_size`` items and, if given, at most ``max_tokens`` padded
    tokens (batch rows x longest row).
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = max([lengths[j] for j in current] + [lengths[i]])
        too_many_tokens = max_tokens is not None and longest * (len(current) + 1) > max_tokens
        if current and (len(current) >= batch_size or too_many_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def window_positions(
    n_tokens: Sequence[int], window: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(B, W) positions of the last ``window`` real tokens of right-padded rows, ascending.

    Built on the host from the known lengths (one copy to ``device``, no synchronisation);
    raises PromptError naming each row that is too short.
    """

    check_window_lengths(n_tokens, window)
    ends = torch.tensor([int(n) for n in n_tokens]).unsqueeze(1)  # (B, 1)
    return (ends - window + torch.arange(window)).to(device)  # (B, W)


def take_windows(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """values (B, T, ...) at ``positions`` (B, W) from :func:`window_positions` -> (B, W, ...)."""
    rows = torch.arange(values.shape[0], device=values.device).unsqueeze(1)  # (B, 1)
    return values[rows, positions]  # (B, W, ...)


def gather_windows(values: torch.Tensor, n_tokens: Sequence[int], window: int) -> torch.Tensor:
    """The last ``window`` real tokens of each right-padded row: (B, T, ...) -> (B, W, ...).

    Raises PromptError naming each row that is too short (the window is never shrunk).
    """
    return take_windows(values, window_positions(n_tokens, window, values.device))


def capture_windows(
    model: nn.Module,
    adapter: Adapter,
    batch: EncodedBatch,
    points: Sequence[str],
    window: int,
    edits: Mapping[str, EditFn] | None = None,
    stop_after_point: str | None = None,
    detach: bool = True,
) -> list[torch.Tensor]:
    """One forward of ``batch`` under ``edits``, capturing ``points`` (hook addresses).

    Returns the window of the last ``window`` real tokens of every row at each point, in the
    order of ``points``: (B, W, ...) each. ``stop_after_point`` ends the forward right after
    that hook point; ``detach=False`` keeps the autograd graph. The caller picks the grad mode.
    """
    with Trace(
        model, adapter, points, edits, detach=detach, stop_after_point=stop_after_point
    ) as trace:
        model(**batch.model_inputs(), use_cache=False)
    return [gather_windows(trace[point], batch.n_tokens, window) for point in points]
