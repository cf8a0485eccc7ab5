"""Tokenise prompt texts into right-padded batches.

Right padding keeps every real token at the position it has when the prompt runs alone
(position ids 0..n-1, causal attention never reaches the pad tokens after it), so batched
activations of real tokens equal batch-size-1 activations for every architecture, absolute
position embeddings (GPT-2, GPT-J) included. Windows are then the last W *real* tokens:
positions ``n_tokens - W .. n_tokens - 1`` of each row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rloop.errors import ConfigError, PromptError


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


def gather_windows(values: torch.Tensor, n_tokens: Sequence[int], window: int) -> torch.Tensor:
    """The last ``window`` real tokens of each right-padded row: (B, T, ...) -> (B, W, ...).

    A thin wrapper over :func:`rloop.metrics.last_real_window` for batches described by their
    real-token counts; raises PromptError naming each row that is too short.
    """
    from rloop.metrics import last_real_window

    positions = torch.arange(values.shape[1], device=values.device)  # (T,)
    counts = torch.tensor(list(n_tokens), device=values.device)  # (B,)
    mask = positions[None, :] < counts[:, None]  # (B, T) right padding
    return last_real_window(values, mask, window)
