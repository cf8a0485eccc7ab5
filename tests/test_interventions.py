"""Patch edits: positions x heads are crossed, and a whole-sequence patch needs equal lengths."""

from __future__ import annotations

import pytest
import torch

from rloop.errors import ConfigError
from rloop.interventions.edits import PatchSpec, patch_edit


def test_patch_positions_and_heads_are_crossed() -> None:
    target = torch.zeros(1, 6, 4, 3)  # (B, T, H, D)
    source = torch.arange(72, dtype=torch.float32).view(1, 6, 4, 3) + 1
    out = patch_edit(source, PatchSpec(layer=0, point="z", heads=(1, 3), positions=(2, 5)))(target)
    expected = torch.zeros_like(target)
    for p in (2, 5):
        for h in (1, 3):
            expected[0, p, h] = source[0, p, h]
    torch.testing.assert_close(out, expected)
    assert torch.all(target == 0)  # the input is not modified in place


def test_whole_sequence_patch_needs_equal_lengths() -> None:
    edit = patch_edit(torch.ones(1, 5, 8), PatchSpec(layer=0, point="resid_pre"))
    with pytest.raises(ConfigError, match="equal lengths"):
        edit(torch.zeros(1, 6, 8))
    torch.testing.assert_close(edit(torch.zeros(1, 5, 8)), torch.ones(1, 5, 8))
