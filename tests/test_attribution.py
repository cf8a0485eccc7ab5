"""Attribution patching and saliency: gradients checked against finite differences of the
exact ablation path in a float64 model."""

from __future__ import annotations

import pytest
import torch

from rloop.adapters import adapter_for
from rloop.capture.batching import gather_windows
from rloop.capture.trace import Trace, address
from rloop.interventions.gradients import head_gradients
from rloop.metrics import window_pr
from tests.test_head_sweep import _ragged_batch
from tests.tiny_models import tiny_model

WINDOW = 4


def _r_v_with_partial_ablation(model, adapter, batch, layer, head, s, target, mode):
    """R_V per prompt with z[layer, head] moved a fraction s towards ``target`` (H, D)."""

    def edit(z):  # (P, T, H, D)
        z = z.clone()
        goal = (
            torch.zeros_like(z[:, :, head])
            if target is None
            else target[head].expand_as(z[:, :, head])
        )
        z[:, :, head] = z[:, :, head] + s * (goal - z[:, :, head])
        return z

    with (
        torch.no_grad(),
        Trace(
            model,
            adapter,
            capture=[address(1, "v"), address(2, "v")],
            edits={address(layer, "z"): edit},
        ) as tr,
    ):
        model(**batch.model_inputs(), use_cache=False)
    e = window_pr(gather_windows(tr[address(1, "v")], batch.n_tokens, WINDOW), mode)
    lt = window_pr(gather_windows(tr[address(2, "v")], batch.n_tokens, WINDOW), mode)
    return lt / e


# LayerNorm families run fully in float64, so central differences are exact to ~1e-9.
# Llama's RMSNorm computes in float32 even in a float64 model: differences are noisy at
# ~1e-7 absolute, so it gets a larger step and a looser tolerance.
TOLERANCES = {
    "gpt_neox": (1e-6, {"rtol": 1e-6, "atol": 1e-9}),
    "gpt2": (1e-6, {"rtol": 1e-6, "atol": 1e-9}),
    "llama": (1e-2, {"rtol": 2e-2, "atol": 2e-4}),
}


@pytest.mark.parametrize("family", ["gpt_neox", "gpt2", "llama"])
@pytest.mark.parametrize("mean", [False, True])
def test_attribution_is_the_directional_derivative(family: str, mean: bool) -> None:
    model = tiny_model(family, dtype=torch.float64, attn="sdpa")
    adapter = adapter_for(model)
    batch = _ragged_batch((9, 7))
    gen = torch.Generator().manual_seed(0)
    mean_z = (
        {
            layer: 0.1
            * torch.randn(adapter.n_heads, adapter.d_head, generator=gen, dtype=torch.float64)
            for layer in range(3)
        }
        if mean
        else None
    )
    grads = head_gradients(model, adapter, batch, [0, 1, 2], 1, 2, WINDOW, "per-head", mean_z)
    # SDPA keeps attention in float64 (eager attention runs its softmax in float32).
    eps, tolerance = TOLERANCES[family]
    for i, layer in enumerate([0, 1]):
        for head in range(adapter.n_heads):
            target = None if mean_z is None else mean_z[layer]
            plus = _r_v_with_partial_ablation(
                model, adapter, batch, layer, head, eps, target, "per-head"
            )
            minus = _r_v_with_partial_ablation(
                model, adapter, batch, layer, head, -eps, target, "per-head"
            )
            numeric = (plus - minus) / (2 * eps)  # (P,)
            torch.testing.assert_close(grads.attribution[i, head], numeric, **tolerance)
    # Layer 2 is the late layer: nothing there can change its V.
    assert torch.all(grads.attribution[2] == 0) and torch.all(grads.saliency[2] == 0)
    assert torch.all(grads.saliency[:2] >= 0)


def test_saliency_is_the_gradient_norm() -> None:
    model = tiny_model("llama", dtype=torch.float64)
    adapter = adapter_for(model)
    batch = _ragged_batch((8,))
    grads = head_gradients(model, adapter, batch, [0], 1, 2, WINDOW)
    # Independent: autograd through an additive perturbation of z at layer 0.
    delta = torch.zeros(
        1, 8, adapter.n_heads, adapter.d_head, dtype=torch.float64, requires_grad=True
    )
    with Trace(
        model,
        adapter,
        capture=[address(1, "v"), address(2, "v")],
        edits={address(0, "z"): lambda z: z + delta},
        detach=False,
    ) as tr:
        model(**batch.model_inputs(), use_cache=False)
    from rloop.interventions.gradients import differentiable_window_pr

    e = differentiable_window_pr(
        gather_windows(tr[address(1, "v")], batch.n_tokens, WINDOW), "per-head"
    )
    lt = differentiable_window_pr(
        gather_windows(tr[address(2, "v")], batch.n_tokens, WINDOW), "per-head"
    )
    (g,) = torch.autograd.grad((lt / e).sum(), delta)
    expected = g[0].square().sum(dim=(0, 2)).sqrt()  # (H,)
    torch.testing.assert_close(grads.saliency[0, :, 0], expected, rtol=1e-6, atol=1e-12)
