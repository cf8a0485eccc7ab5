"""Every family: the captured V is what attention multiplies by its weights (SCIENCE.md §1),
and captured hook points match a plain Hugging Face forward."""

from __future__ import annotations

import pytest
import torch

from rloop.adapters import adapter_for
from rloop.capture.trace import Trace, address
from rloop.errors import ConfigError, UnsupportedArchitectureError
from tests.tiny_models import FAMILIES, VOCAB, tiny_model

B, T = 2, 11


def _inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _everything(adapter) -> list[str]:
    return [
        address(layer, point)
        for layer in range(adapter.n_layers)
        for point in ("v", "z", "attn_out", "mlp_out", "resid_pre", "resid_post")
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_v_is_what_attention_consumes(family: str) -> None:
    model = tiny_model(family)
    adapter = adapter_for(model)
    inputs = _inputs()
    with Trace(model, adapter, capture=_everything(adapter)) as trace, torch.no_grad():
        out = model(**inputs, output_attentions=True, use_cache=False)
    group = adapter.n_heads // adapter.n_kv_heads
    for layer in range(adapter.n_layers):
        weights = out.attentions[layer]  # (B, H, T, T) softmax(QK^T) as the model computed it
        v = trace[address(layer, "v")]  # (B, T, Hkv, D)
        assert v.shape == (B, T, adapter.n_kv_heads, adapter.d_head)
        # Query head h reads KV head h // group (GQA); never split V by query heads.
        v_per_query = v.repeat_interleave(group, dim=2)  # (B, T, H, D)
        recomputed_z = torch.einsum("bhts,bshd->bthd", weights, v_per_query)  # (B, T, H, D)
        torch.testing.assert_close(recomputed_z, trace[address(layer, "z")], atol=1e-5, rtol=1e-5)
        o_proj = adapter.module_for(model, layer, "z")
        with torch.no_grad():
            recomputed_out = o_proj(recomputed_z.flatten(-2))  # (B, T, d_model)
        torch.testing.assert_close(
            recomputed_out, trace[address(layer, "attn_out")], atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_points_match_hidden_states(family: str) -> None:
    model = tiny_model(family)
    adapter = adapter_for(model)
    inputs = _inputs(2)
    with Trace(model, adapter, capture=_everything(adapter)) as trace, torch.no_grad():
        out = model(**inputs, output_hidden_states=True, use_cache=False)
    hidden = out.hidden_states  # n_layers + 1 entries
    assert len(hidden) == adapter.n_layers + 1
    torch.testing.assert_close(trace[address(0, "resid_pre")], hidden[0])
    for layer in range(adapter.n_layers - 1):
        torch.testing.assert_close(trace[address(layer, "resid_post")], hidden[layer + 1])
        torch.testing.assert_close(
            trace[address(layer + 1, "resid_pre")], trace[address(layer, "resid_post")]
        )
    # The last entry of hidden_states has the final norm applied, not the last block's output.
    final_norm = model.get_submodule(adapter.final_norm_path)
    last = trace[address(adapter.n_layers - 1, "resid_post")]
    with torch.no_grad():
        torch.testing.assert_close(final_norm(last), hidden[-1])


@pytest.mark.parametrize("family", FAMILIES)
def test_v_edit_matches_zeroed_projection_weights(family: str) -> None:
    """Zeroing KV head 1's V through the hook equals zeroing its projection weights."""
    model = tiny_model(family)
    adapter = adapter_for(model)
    inputs = _inputs(3)
    layer, kv_head = 1, 1

    def zero_head(v: torch.Tensor) -> torch.Tensor:  # (B, T, Hkv, D)
        v = v.clone()
        v[:, :, kv_head] = 0
        return v

    with Trace(model, adapter, edits={address(layer, "v"): zero_head}), torch.no_grad():
        edited = model(**inputs, use_cache=False).logits

    proj = adapter.module_for(model, layer, "v")
    spec = adapter.spec("v")
    d = adapter.d_head
    if spec.fused is not None:
        cols = spec.fused.index("v", adapter.n_kv_heads, d).view(adapter.n_kv_heads, d)[kv_head]
    else:
        cols = torch.arange(kv_head * d, (kv_head + 1) * d)
    with torch.no_grad():
        # Conv1D (GPT-2) stores weight as (in, out); nn.Linear as (out, in).
        if family == "gpt2":
            proj.weight[:, cols] = 0
        else:
            proj.weight[cols, :] = 0
        if getattr(proj, "bias", None) is not None:
            proj.bias[cols] = 0
        reference = model(**inputs, use_cache=False).logits
    torch.testing.assert_close(edited, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2"])
def test_stop_after_layer_gives_same_values_and_skips_later_blocks(family: str) -> None:
    model = tiny_model(family)
    adapter = adapter_for(model)
    inputs = _inputs(4)
    points = [address(0, "v"), address(1, "v")]
    with Trace(model, adapter, capture=points) as full, torch.no_grad():
        model(**inputs, use_cache=False)
    calls = []
    last_block = adapter.blocks(model)[2]
    handle = last_block.register_forward_hook(lambda *a: calls.append(1))
    try:
        with Trace(model, adapter, capture=points, stop_after_layer=1) as stopped, torch.no_grad():
            model(**inputs, use_cache=False)
            raise AssertionError("the forward pass should have stopped")  # pragma: no cover
    finally:
        handle.remove()
    assert calls == []
    for p in points:
        torch.testing.assert_close(stopped[p], full[p])


def test_hooks_are_removed_even_on_error() -> None:
    model = tiny_model("llama")
    adapter = adapter_for(model)
    with pytest.raises(RuntimeError), Trace(model, adapter, capture=[address(0, "v")]):
        raise RuntimeError("boom")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_bad_addresses_and_layers_are_one_line_errors() -> None:
    model = tiny_model("llama")
    adapter = adapter_for(model)
    with pytest.raises(ConfigError, match="out of range"):
        Trace(model, adapter, capture=["blocks.7.v"])
    with pytest.raises(ConfigError, match="unknown hook point"):
        Trace(model, adapter, capture=["blocks.0.values"])
    with pytest.raises(ConfigError, match="blocks.<layer>.<point>"):
        Trace(model, adapter, capture=["layer0.v"])


def test_unsupported_architecture_names_the_supported_families() -> None:
    from transformers import AutoModelForCausalLM, BloomConfig

    model = AutoModelForCausalLM.from_config(
        BloomConfig(hidden_size=32, n_layer=1, n_head=4, vocab_size=50)
    )
    with pytest.raises(UnsupportedArchitectureError, match="supported families: llama"):
        adapter_for(model)
