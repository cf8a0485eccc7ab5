"""Batched generation with per-step capture: parity with batch-size-1, model.generate and a
plain full-sequence forward."""

from __future__ import annotations

import pytest
import torch

from rloop.capture.generation import SamplingConfig, generate, layout_prompts
from rloop.capture.trace import Trace
from rloop.errors import ConfigError, PromptError, UnsupportedArchitectureError
from tests.tiny_models import VOCAB, WordTokenizer, tiny_lm

ROWS = [
    [5, 6, 7, 8, 9, 10, 11, 12, 13],
    [20, 21, 22],
    [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41],
]
POINT = "blocks.2.v"


class DecodingTokenizer(WordTokenizer):
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request):
    return tiny_lm(request.param)


def _full_forward_v(lm, ids: list[int]) -> torch.Tensor:
    """V at layer 2 of a plain forward over the whole sequence (no cache): (T, Hkv, D)."""
    with torch.no_grad(), Trace(lm.model, lm.adapter, capture=[POINT]) as trace:
        lm.model(input_ids=torch.tensor([ids]), use_cache=False)
    return trace[POINT][0]


def test_greedy_batched_equals_single_and_hf_generate(lm):
    sampling = SamplingConfig(max_new_tokens=12)
    batch = generate(lm.model, lm.adapter, ROWS, sampling, [POINT])
    assert batch.new_tokens.shape == (3, 12)
    for i, row in enumerate(ROWS):
        single = generate(lm.model, lm.adapter, [row], sampling, [POINT])
        reference = lm.model.generate(
            torch.tensor([row]), max_new_tokens=12, do_sample=False, pad_token_id=0
        )[0, len(row) :]
        assert batch.new_tokens[i].tolist() == reference.tolist()
        assert single.new_tokens[0].tolist() == reference.tolist()
        # captured V over prompt + generated equals a plain forward over that sequence
        full = _full_forward_v(lm, row + reference.tolist())  # (T + N, Hkv, D)
        real = batch.attention_mask[i].bool()
        assert real.sum() == len(row) + 12
        torch.testing.assert_close(batch.captured[POINT][i][real], full, atol=5e-5, rtol=0)
        torch.testing.assert_close(single.captured[POINT][0], full, atol=5e-5, rtol=0)


def test_windows_are_the_right_tokens(lm):
    result = generate(lm.model, lm.adapter, ROWS, SamplingConfig(max_new_tokens=6), [POINT])
    row = 2
    full = _full_forward_v(lm, ROWS[row] + result.new_tokens[row].tolist())
    n = len(ROWS[row])
    torch.testing.assert_close(
        result.prompt_window(POINT, 3)[row], full[n - 3 : n], atol=5e-5, rtol=0
    )
    torch.testing.assert_close(
        result.prompt_window(POINT, 4, steps=3)[row], full[n - 1 : n + 3], atol=5e-5, rtol=0
    )
    torch.testing.assert_close(
        result.generated_window(POINT, 4)[row], full[n + 2 : n + 6], atol=5e-5, rtol=0
    )
    with pytest.raises(ConfigError, match="fewer than the 8-token window"):
        result.generated_window(POINT, 8)
    with pytest.raises(PromptError, match="fewer real tokens"):
        result.prompt_window(POINT, 4)  # row 1 has 3 prompt tokens


def test_sampling_is_seeded_and_tiny_top_p_is_greedy():
    lm = tiny_lm("llama")
    sampled = SamplingConfig(max_new_tokens=8, temperature=1.5, seed=3)
    a = generate(lm.model, lm.adapter, ROWS, sampled)
    b = generate(lm.model, lm.adapter, ROWS, sampled)
    other = generate(lm.model, lm.adapter, ROWS, SamplingConfig(8, 1.5, 1.0, seed=4))
    greedy = generate(lm.model, lm.adapter, ROWS, SamplingConfig(max_new_tokens=8))
    nucleus = generate(lm.model, lm.adapter, ROWS, SamplingConfig(8, 1.0, 1e-9, seed=0))
    assert torch.equal(a.new_tokens, b.new_tokens)
    assert not torch.equal(a.new_tokens, other.new_tokens)
    assert torch.equal(nucleus.new_tokens, greedy.new_tokens)
    assert int(a.new_tokens.max()) < VOCAB


def test_texts_are_decoded():
    lm = tiny_lm("llama")
    result = generate(
        lm.model, lm.adapter, ROWS[:1], SamplingConfig(4), tokenizer=DecodingTokenizer()
    )
    assert result.texts == [" ".join(str(t) for t in result.new_tokens[0].tolist())]


def test_layout_positions_and_masks():
    layout = layout_prompts([[1, 2, 3, 4], [5, 6]], pad_id=0, frames=[3, 2])
    assert layout.memory_ids.tolist() == [[1, 2, 3], [0, 0, 5]]
    assert layout.memory_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert layout.memory_positions.tolist() == [[0, 1, 2], [0, 0, 1]]
    assert layout.last_ids.tolist() == [[4], [6]]
    assert layout.last_positions.tolist() == [[3], [2]]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_new_tokens": 0}, "generation length"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
    ],
)
def test_bad_sampling_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SamplingConfig(**kwargs)


def test_bad_prompts_and_model_without_cache():
    lm = tiny_lm("llama")
    with pytest.raises(PromptError, match="fewer than 2 tokens"):
        generate(lm.model, lm.adapter, [[5]], SamplingConfig(2))
    with pytest.raises(PromptError, match="at least one prompt"):
        generate(lm.model, lm.adapter, [], SamplingConfig(2))
    forward = lm.model.forward

    def no_cache(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.past_key_values = None
        out.cache = None  # the newer transformers name
        return out

    lm.model.forward = no_cache
    with pytest.raises(UnsupportedArchitectureError, match="no KV cache"):
        generate(lm.model, lm.adapter, ROWS, SamplingConfig(2))


@pytest.mark.slow
def test_embedded_model_batched_greedy_equals_hf_generate():
    from rloop.capture.generation import generate_texts
    from rloop.models import load_model
    from rloop.prompts import load_bank

    lm = load_model("smollm2-135m")
    texts = [p.text for p in list(load_bank())[:3]]
    result = generate_texts(lm, texts, SamplingConfig(max_new_tokens=8), layers=[5, 25])
    # reference: greedy decoding by full forwards without a cache (rloop never stops at
    # end-of-sequence, so HF generate's stopping rule does not apply)
    for i, text in enumerate(texts):
        ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]  # (1, T)
        n = ids.shape[1]
        with torch.no_grad():
            for _ in range(8):
                next_id = lm.model(input_ids=ids, use_cache=False).logits[0, -1].argmax()
                ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
        reference = ids[0, n:]
        assert result.new_tokens[i].tolist() == reference.tolist()
        assert result.texts[i] == lm.tokenizer.decode(reference, skip_special_tokens=True)
    assert result.captured["blocks.25.v"].shape[:2] == result.attention_mask.shape
