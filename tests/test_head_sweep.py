"""The batched, block-skipping, early-stopping sweep equals one plain forward per head."""

from __future__ import annotations

import pytest
import torch

from rloop.adapters import adapter_for
from rloop.capture.batching import EncodedBatch
from rloop.capture.memory import activation_bytes_per_token
from rloop.interventions.edits import mean_activations
from rloop.interventions.head_sweep import head_sweep, single_head_reference
from tests.tiny_models import FAMILIES, VOCAB, tiny_model

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
    from rloop.capture.trace import Trace

    for t in texts:
        ids = torch.tensor([[int(w) for w in t.split()]])
        with torch.no_grad(), Trace(model, adapter, capture=["blocks.1.attn_out"]) as tr:
            model(input_ids=ids)
        rows.append(tr["blocks.1.attn_out"][0].double())
    expected = torch.cat(rows).mean(dim=0).float()
    torch.testing.assert_close(means[1], expected, rtol=1e-5, atol=1e-6)


def _plain_last_logits(model, batch: EncodedBatch, edits=None) -> torch.Tensor:
    """Logits at each row's last real token from a plain Hugging Face forward -> (P, V)."""
    from rloop.capture.trace import Trace

    adapter = adapter_for(model)
    with torch.no_grad(), Trace(model, adapter, edits=edits or {}):
        logits = model(**batch.model_inputs(), use_cache=False).logits  # (P, T, V)
    rows = torch.arange(logits.shape[0])
    return logits[rows, torch.tensor(batch.n_tokens) - 1]  # (P, V)


@pytest.mark.parametrize("family", FAMILIES)
def test_last_token_logits_equal_the_models_logits(family: str) -> None:
    from rloop.capture.trace import LastTokenLogits

    model = tiny_model(family)
    if family == "gemma3":  # exercise the soft-capping branch too
        model.config.final_logit_softcapping = 3.0
    adapter = adapter_for(model)
    batch = _ragged_batch()
    with torch.no_grad(), LastTokenLogits(model, adapter, torch.tensor(batch.n_tokens) - 1) as lt:
        model(**batch.model_inputs(), use_cache=False)
    torch.testing.assert_close(lt.logits(), _plain_last_logits(model, batch), rtol=1e-5, atol=1e-6)


def test_kl_divergence_against_a_hand_computed_case() -> None:
    from rloop.metrics import kl_divergence

    p = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    q = torch.tensor([[0.0, 0.0], [2.0, 1.0]])
    # Row 1: P = softmax(1, 2) = (1 - s, s), Q = (s, 1 - s), s = sigmoid(1):
    # KL = (1 - s) log((1 - s)/s) + s log(s/(1 - s)) = (2s - 1) * 1.
    s = 1 / (1 + torch.exp(torch.tensor(-1.0, dtype=torch.float64)))
    expected = torch.tensor([0.0, float(2 * s - 1)], dtype=torch.float64)
    torch.testing.assert_close(kl_divergence(p, q), expected, rtol=1e-12, atol=1e-15)
    assert torch.isnan(kl_divergence(torch.tensor([1.0, float("nan")]), torch.zeros(2)))


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2", "gemma3"])
def test_sweep_kl_equals_plain_forward_kl(family: str) -> None:
    from rloop.interventions.edits import head_ablation_edit, keep_mask
    from rloop.metrics import kl_divergence

    model = tiny_model(family)
    adapter = adapter_for(model)
    batch = _ragged_batch()
    early, late = 1, 2
    layers = [0, 1, 2]
    plain = head_sweep(model, adapter, batch, layers, early, late, WINDOW)
    result = head_sweep(model, adapter, batch, layers, early, late, WINDOW, kl=True, max_rows=5)
    assert result.kl is not None and result.kl.shape == (3, adapter.n_heads, 3)
    # KL does not change what is measured for R_V: layer 2 (>= late) stays exactly clean.
    for m in ("per-head",):
        torch.testing.assert_close(result.pr_late[m], plain.pr_late[m], rtol=1e-6, atol=0)
        assert torch.equal(result.pr_late[m][2], plain.pr_late[m][2])
    clean = _plain_last_logits(model, batch)
    for i, layer in enumerate(layers):
        for head in range(adapter.n_heads):
            edit = head_ablation_edit(keep_mask(adapter, [[head]]))
            ablated = _plain_last_logits(model, batch, {f"blocks.{layer}.z": edit})
            expected = kl_divergence(clean, ablated)  # (P,)
            torch.testing.assert_close(result.kl[i, head], expected, rtol=1e-4, atol=1e-7)
    assert (result.kl[2] > 0).any()  # heads past the measured layer still move behaviour


def test_plan_chunks_is_balanced_and_within_budget() -> None:
    from rloop.interventions.head_sweep import plan_chunks

    lengths = [5] * 7 + [9] * 6  # sorted, as the sweep orders its rows
    chunks = plan_chunks(lengths, max_tokens=40)
    assert chunks[0][0] == 0 and chunks[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:], strict=False))  # contiguous
    assert all((stop - start) * lengths[stop - 1] <= 40 for start, stop in chunks)
    assert plan_chunks([32] * 640, max_tokens=10**9, max_rows=512) == [(0, 320), (320, 640)]
    assert plan_chunks([32] * 640, max_tokens=10**9) == [(0, 640)]
    assert plan_chunks([50], max_tokens=10) == [(0, 1)]  # one row always fits


def test_window_positions_match_last_real_window() -> None:
    from rloop.capture.batching import take_windows, window_positions
    from rloop.errors import PromptError
    from rloop.metrics import last_real_window

    batch = _ragged_batch()
    values = torch.randn(3, max(batch.n_tokens), 2, 5)  # (B, T, H, D)
    expected = last_real_window(values, batch.attention_mask, WINDOW)
    assert torch.equal(take_windows(values, window_positions(batch.n_tokens, WINDOW)), expected)
    with pytest.raises(PromptError, match="row 2 has 7 real tokens"):
        window_positions(batch.n_tokens, 8)


def test_memory_budget_chunks_give_the_same_sweep() -> None:
    model = tiny_model("llama")
    adapter = adapter_for(model)
    batch = _ragged_batch()
    whole = head_sweep(model, adapter, batch, [0, 1], 1, 2, WINDOW)
    # A budget of a few rows' activations forces many chunks.
    tiny_budget = 30 * activation_bytes_per_token(model, adapter, max(batch.n_tokens))
    chunked = head_sweep(model, adapter, batch, [0, 1], 1, 2, WINDOW, memory_budget=tiny_budget)
    for m in whole.pr_late:
        torch.testing.assert_close(chunked.pr_late[m], whole.pr_late[m], rtol=1e-5, atol=0)
        torch.testing.assert_close(chunked.pr_early[m], whole.pr_early[m], rtol=1e-5, atol=0)
