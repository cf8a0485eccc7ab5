"""The batched, block-skipping, early-stopping sweep equals one plain forward per head."""

from __future__ import annotations

import pytest
import torch

from rloop.adapters import adapter_for
from rloop.batching import EncodedBatch
from rloop.head_sweep import head_sweep, single_head_reference
from rloop.interventions import mean_activations
from tests.tiny_models import VOCAB, tiny_model

WINDOW = 4


def _ragged_batch(lengths=(9, 12, 7), seed: int = 5) -> EncodedBatch:
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)  # (P, T) right padded
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, VOCAB, (n,), generator=gen)
        mask[i, :n] = 1
    return EncodedBatch(ids, mask, list(lengths))


class _WordTokenizer:
    """Whitespace tokenizer over integers, enough for mean_activations in tests."""

    pad_token_id = 0

    def __call__(self, texts):
        return {"input_ids": [[int(w) for w in t.split()] for t in texts]}


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2", "gemma3"])
@pytest.mark.parametrize("mode", ["per-head", "whole"])
def test_sweep_equals_one_forward_per_head(family: str, mode: str) -> None:
    model = tiny_model(family)
    adapter = adapter_for(model)
    batch = _ragged_batch()
    early, late = 1, 2
    layers = [0, 1, 2]
    # max_rows=5 forces chunking (2 variants x 3 prompts would be 6 rows).
    result = head_sweep(
        model, adapter, batch, layers, early, late, WINDOW, modes=[mode], max_rows=5
    )
    assert result.computed_layers == [0, 1]
    for i, layer in enumerate(layers):
        for head in range(adapter.n_heads):
            ref_early, ref_late = single_head_reference(
                model, adapter, batch, layer, head, early, late, WINDOW, mode
            )
            torch.testing.assert_close(result.pr_late[mode][i, head], ref_late, rtol=1e-5, atol=0)
            torch.testing.assert_close(result.pr_early[mode][i, head], ref_early, rtol=1e-5, atol=0)
    # Causality: a head at the late layer cannot change V there; reported as the clean value.
    torch.testing.assert_close(
        result.pr_late[mode][2], result.clean_late[mode].expand(adapter.n_heads, -1)
    )


def test_kv_group_and_mean_ablation_match_reference() -> None:
    model = tiny_model("llama")
    adapter = adapter_for(model)
    batch = _ragged_batch((10, 8))
    texts = [" ".join(str(t) for t in range(3, 3 + n)) for n in (6, 9, 5)]
    mean_z = mean_activations(model, adapter, _WordTokenizer(), texts, [0, 1], "z")
    assert mean_z[0].shape == (adapter.n_heads, adapter.d_head)
    result = head_sweep(model, adapter, batch, [0, 1], 1, 2, WINDOW, unit="kv_group", mean_z=mean_z)
    assert result.n_units == adapter.n_kv_heads
    for i, layer in enumerate([0, 1]):
        for group in range(adapter.n_kv_heads):
            ref_early, ref_late = single_head_reference(
                model,
                adapter,
                batch,
                layer,
                group,
                1,
                2,
                WINDOW,
                unit="kv_group",
                mean_z=mean_z[layer],
            )
            torch.testing.assert_close(
                result.pr_late["per-head"][i, group], ref_late, rtol=1e-5, atol=0
            )
            torch.testing.assert_close(
                result.pr_early["per-head"][i, group], ref_early, rtol=1e-5, atol=0
            )


def test_mean_activations_is_the_masked_token_mean() -> None:
    model = tiny_model("gpt2")
    adapter = adapter_for(model)
    texts = ["5 6 7 8", "9 10 11 12 13 14"]
    means = mean_activations(model, adapter, _WordTokenizer(), texts, [1], "attn_out", batch_size=1)
    rows = []
    from rloop.capture import Trace

    for t in texts:
        ids = torch.tensor([[int(w) for w in t.split()]])
        with torch.no_grad(), Trace(model, adapter, capture=["blocks.1.attn_out"]) as tr:
            model(input_ids=ids)
        rows.append(tr["blocks.1.attn_out"][0].double())
    expected = torch.cat(rows).mean(dim=0).float()
    torch.testing.assert_close(means[1], expected, rtol=1e-5, atol=1e-6)
