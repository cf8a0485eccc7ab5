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


# ---------------------------------------------------------------- sliding-window layers (Gemma-3)

SLIDING_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]


def sliding_gemma3():
    """A tiny Gemma-3 (window 8) with sliding layers 0 and 2 and a full-attention layer 1."""
    from transformers import AutoModelForCausalLM

    from rloop.adapters import adapter_for
    from tests.tiny_models import tiny_config

    config = tiny_config("gemma3")
    config.layer_types = list(SLIDING_TYPES)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name:
                param.normal_(0.0, 0.15)
    model.eval()
    return model, adapter_for(model)


def tokens(start: int, n: int, last: int = 40) -> tuple[int, ...]:
    return tuple(1 + (start + 7 * i) % 95 for i in range(n - 1)) + (last,)


SLIDING_POINTS = ["blocks.0.v", "blocks.1.v", "blocks.2.v"]
# Two pairs of different lengths (memories of 12 and 15 tokens, window 8): targets, sources
# of the same length and last token (alpha = 1), and shorter sources (alpha = 0).
SLIDING_TARGETS = [tokens(3, 13), tokens(11, 16, last=41)]
SLIDING_SOURCES = [tokens(50, 13), tokens(60, 16, last=41)]
SHORT_SOURCES = [tokens(70, 6), tokens(80, 9, last=41)]


def test_sliding_window_caches_hold_fewer_columns_than_the_memory():
    """The case the mixing must handle: layers 0 and 2 cache only the last 7 of 15 columns."""
    from rloop.capture.generation import layout_prompts, prefill_memory

    model, adapter = sliding_gemma3()
    layout = layout_prompts(SLIDING_TARGETS, 0)
    cache, _ = prefill_memory(model, adapter, layout)
    width = layout.memory_ids.shape[1]
    assert width == 15
    assert [cache_layer(cache, layer)[0].shape[2] for layer in range(3)] == [7, 15, 7]


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_sliding_window_alpha_end_points_equal_natural_generation(alpha):
    model, adapter = sliding_gemma3()
    sampling = SamplingConfig(max_new_tokens=8)
    sources = SLIDING_SOURCES if alpha == 1 else SHORT_SOURCES
    rows = [PatchRow(t, s, (0, 1, 2), alpha) for t, s in zip(SLIDING_TARGETS, sources, strict=True)]
    patched = patched_generate(model, adapter, rows, sampling, SLIDING_POINTS)
    natural = generate(
        model, adapter, SLIDING_SOURCES if alpha == 1 else SLIDING_TARGETS, sampling,
        SLIDING_POINTS,
    )  # fmt: skip
    assert torch.equal(patched.new_tokens, natural.new_tokens)
    assert torch.equal(patched.first_logits, natural.first_logits)
    assert torch.equal(patched.attention_mask, natural.attention_mask)
    real = natural.attention_mask.bool()  # (B, M + 1 + N); padding V depends on the row
    for point in SLIDING_POINTS:  # every real memory column, inside and before the window
        assert torch.equal(patched.captured[point][real], natural.captured[point][real]), point
    if alpha == 1:  # the sources do change the generation
        alone = generate(model, adapter, SLIDING_TARGETS, sampling)
        assert not torch.equal(alone.new_tokens, patched.new_tokens)


def test_sliding_window_mix_matches_a_hand_built_cache():
    """alpha = 0.4 on every layer of one pair: first-step logits from a cache mixed by hand in
    float64 from two plain prefills, and captured memory V equal to the float64 mix of the two
    prompts' V from plain forwards (before the window too)."""
    from transformers import DynamicCache

    from rloop.capture import Trace

    model, adapter = sliding_gemma3()
    target, source, alpha = SLIDING_TARGETS[1], SLIDING_SOURCES[1], 0.4
    result = patched_generate(
        model, adapter, [PatchRow(target, source, (0, 1, 2), alpha)],
        SamplingConfig(max_new_tokens=2), SLIDING_POINTS,
    )  # fmt: skip
    memory = len(target) - 1
    values = {}
    with torch.no_grad():
        caches = []
        for ids in (target, source):
            with Trace(model, adapter, capture=SLIDING_POINTS) as trace:
                out = model(input_ids=torch.tensor([ids[:-1]]), use_cache=True)
            caches.append(cache_of(out))
            values[ids] = {p: trace[p][0].double() for p in SLIDING_POINTS}  # (M, Hkv, D)
        cache = DynamicCache(config=model.config)
        for layer in range(3):
            (k_t, v_t), (k_s, v_s) = cache_layer(caches[0], layer), cache_layer(caches[1], layer)
            assert k_t.shape[2] == (memory if layer == 1 else 7)
            k = ((1 - alpha) * k_t.double() + alpha * k_s.double()).float()
            v = ((1 - alpha) * v_t.double() + alpha * v_s.double()).float()
            cache.update(k, v, layer)
        reference = model(
            input_ids=torch.tensor([[target[-1]]]),
            position_ids=torch.tensor([[memory]]),
            attention_mask=torch.ones(1, memory + 1, dtype=torch.long),
            use_cache=True,
            **{cache_kwarg(model): cache},
        ).logits[0, -1]
    torch.testing.assert_close(result.first_logits[0], reference, atol=1e-4, rtol=0)
    for point in SLIDING_POINTS:
        mixed = (1 - alpha) * values[target][point] + alpha * values[source][point]
        captured = result.captured[point][0, :memory].double()  # (M, Hkv, D)
        torch.testing.assert_close(captured, mixed, atol=1e-5, rtol=0)
