"""KV substitution and alpha mixing: exact end points, a hand-built mixed cache, alignment."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rloop.capture.generation import SamplingConfig, cache_kwarg, cache_of, generate
from rloop.errors import ConfigError
from rloop.interventions.kv_cache import (
    PatchRow,
    cache_layer,
    check_alpha,
    check_layer_range,
    default_patch_layers,
    mix_tensors,
    patched_generate,
    scale_layer_range,
)
from tests.tiny_models import tiny_lm

TARGET = (5, 6, 7, 8, 9, 10, 40)
SOURCE = (30, 31, 32, 33, 34, 35, 40)  # same length and last token as TARGET
SHORT_SOURCE = (33, 34, 35, 40)
LONG_SOURCE = (50, 51, 52, 30, 31, 32, 33, 34, 35, 40)
POINT = "blocks.2.v"


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request):
    return tiny_lm(request.param)


def test_mix_tensors_float32_against_float64_reference():
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(3, 2, 5, 4, generator=gen).to(torch.bfloat16)
    source = torch.randn(3, 2, 5, 4, generator=gen).to(torch.bfloat16)
    alpha = torch.tensor([0.0, 0.3, 1.0])
    mixed = mix_tensors(target, source, alpha)
    assert mixed.dtype == torch.bfloat16
    t64, s64 = target.double().numpy(), source.double().numpy()
    a = alpha.double().numpy()[:, None, None, None]
    reference = (1 - a) * t64 + a * s64
    np.testing.assert_allclose(mixed.double().numpy(), reference, atol=1e-2)
    assert torch.equal(mixed[0], target[0]) and torch.equal(mixed[2], source[2])


def test_alpha_end_points_are_natural_generations(lm):
    sampling = SamplingConfig(max_new_tokens=10)
    all_layers = tuple(range(lm.adapter.n_layers))
    natural_target = generate(lm.model, lm.adapter, [TARGET], sampling, [POINT])
    natural_source = generate(lm.model, lm.adapter, [SOURCE], sampling, [POINT])
    zero = patched_generate(
        lm.model, lm.adapter, [PatchRow(TARGET, SOURCE, all_layers, 0.0)], sampling, [POINT]
    )
    one = patched_generate(
        lm.model, lm.adapter, [PatchRow(TARGET, SOURCE, all_layers, 1.0)], sampling, [POINT]
    )
    assert torch.equal(zero.new_tokens, natural_target.new_tokens)
    assert torch.equal(zero.first_logits, natural_target.first_logits)
    assert torch.equal(zero.captured[POINT], natural_target.captured[POINT])
    assert torch.equal(one.new_tokens, natural_source.new_tokens)
    assert torch.equal(one.first_logits, natural_source.first_logits)
    assert torch.equal(one.captured[POINT], natural_source.captured[POINT])
    # a longer target with a shorter source: the target keeps its natural positions
    short = patched_generate(
        lm.model,
        lm.adapter,
        [PatchRow(TARGET, SHORT_SOURCE, all_layers, 0.0)],
        sampling,
    )
    assert torch.equal(short.new_tokens, natural_target.new_tokens)


def test_mixed_cache_matches_hand_built_reference(lm):
    """alpha = 0.4 on layers {1, 2}: compare with a cache built by hand from two prefills."""
    from transformers import DynamicCache

    layers, alpha = (1, 2), 0.4
    rows = [PatchRow(TARGET, SOURCE, layers, alpha), PatchRow(TARGET), PatchRow(SOURCE)]
    result = patched_generate(lm.model, lm.adapter, rows, SamplingConfig(max_new_tokens=3))
    with torch.no_grad():
        t = cache_of(lm.model(input_ids=torch.tensor([TARGET[:-1]]), use_cache=True))
        s = cache_of(lm.model(input_ids=torch.tensor([SOURCE[:-1]]), use_cache=True))
        cache = DynamicCache(config=lm.model.config)
        for layer in range(lm.adapter.n_layers):
            k_t, v_t = cache_layer(t, layer)
            k_s, v_s = cache_layer(s, layer)
            a = alpha if layer in layers else 0.0
            k = ((1 - a) * k_t.double() + a * k_s.double()).float()
            v = ((1 - a) * v_t.double() + a * v_s.double()).float()
            cache.update(k, v, layer)
        n = len(TARGET)
        out = lm.model(
            input_ids=torch.tensor([[TARGET[-1]]]),
            position_ids=torch.tensor([[n - 1]]),
            attention_mask=torch.ones(1, n, dtype=torch.long),
            use_cache=True,
            **{cache_kwarg(lm.model): cache},
        )
    torch.testing.assert_close(result.first_logits[0], out.logits[0, -1], atol=1e-4, rtol=0)
    assert not torch.allclose(result.first_logits[0], result.first_logits[1], atol=1e-3)


def test_rows_in_one_batch_equal_rows_alone(lm):
    sampling = SamplingConfig(max_new_tokens=8)
    rows = [
        PatchRow(TARGET, SOURCE, (1, 2), 0.5),
        PatchRow(TARGET, LONG_SOURCE, (0, 1, 2), 1.0),
        PatchRow(SHORT_SOURCE, SOURCE, (2,), 0.25),
        PatchRow(TARGET, SOURCE, (), 0.0, v_patch_layer=1),
        PatchRow(SOURCE),
    ]
    batch = patched_generate(lm.model, lm.adapter, rows, sampling)
    for i, row in enumerate(rows):
        alone = patched_generate(lm.model, lm.adapter, [row], sampling)
        assert batch.new_tokens[i].tolist() == alone.new_tokens[0].tolist()
        torch.testing.assert_close(batch.first_logits[i], alone.first_logits[0], atol=1e-4, rtol=0)


def test_shifted_target_is_position_invariant_for_rotary():
    """A target shorter than its source is shifted in the pair frame; rotary models give the
    natural logits up to rounding."""
    lm = tiny_lm("llama")
    natural = generate(lm.model, lm.adapter, [SHORT_SOURCE], SamplingConfig(max_new_tokens=4))
    shifted = patched_generate(
        lm.model,
        lm.adapter,
        [PatchRow(SHORT_SOURCE, LONG_SOURCE, (0,), 0.0)],
        SamplingConfig(max_new_tokens=4),
    )
    torch.testing.assert_close(shifted.first_logits, natural.first_logits, atol=1e-4, rtol=0)
    assert torch.equal(shifted.new_tokens, natural.new_tokens)


def test_v_patch_replaces_memory_values(lm):
    layer = 1
    address = f"blocks.{layer}.v"
    result = patched_generate(
        lm.model,
        lm.adapter,
        [PatchRow(TARGET, SOURCE, (), 0.0, v_patch_layer=layer), PatchRow(SOURCE)],
        SamplingConfig(max_new_tokens=2),
        [address],
    )
    memory = len(SOURCE) - 1
    torch.testing.assert_close(
        result.captured[address][0, :memory],
        result.captured[address][1, :memory],
        atol=1e-5,
        rtol=0,
    )


def test_layer_ranges_and_bad_input():
    assert default_patch_layers(32) == tuple(range(16, 32))
    assert default_patch_layers(30) == tuple(range(15, 30))
    assert scale_layer_range(25, 29, 30) == (23, 24, 25, 26, 27)
    assert scale_layer_range(27, 27, 30) == (25,)
    assert scale_layer_range(16, 31, 32) == tuple(range(16, 32))
    with pytest.raises(ConfigError, match="alpha must lie in"):
        check_alpha(1.5)
    with pytest.raises(ConfigError, match="out of range"):
        check_layer_range(3, (1, 3))
    with pytest.raises(ConfigError, match="empty"):
        check_layer_range(3, ())
    lm = tiny_lm("llama")
    with pytest.raises(ConfigError, match="alpha"):
        patched_generate(
            lm.model, lm.adapter, [PatchRow(TARGET, SOURCE, (1,), -0.1)], SamplingConfig(2)
        )
    with pytest.raises(ConfigError, match="out of range"):
        patched_generate(
            lm.model, lm.adapter, [PatchRow(TARGET, SOURCE, (7,), 0.5)], SamplingConfig(2)
        )
