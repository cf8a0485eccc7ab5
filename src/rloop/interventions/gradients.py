"""Gradients of R_V with respect to every head's result: saliency and attribution patching.

One forward (stopped at the late layer's value projection) and one backward give, for every
head h at every layer l below the late layer and every prompt p:

- ``grad``: dR_V/dz[l, h] over the prompt's real tokens — the total derivative, through all
  later layers (the graph is never cut between heads);
- saliency: ||dR_V/dz[l, h]|| (L2 over tokens and head dimensions);
- attribution (the linear estimate of an ablation's effect on R_V, as in attribution
  patching): sum over tokens and dims of dR_V/dz * (z_ablated - z), with z_ablated = 0 (zero
  ablation) or the reference mean (mean ablation).

R_V uses the differentiable participation ratio in float64 on the same windows as the exact
measurement (last W real tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rloop.adapters import Adapter
from rloop.capture.batching import EncodedBatch, capture_windows
from rloop.capture.trace import address
from rloop.metrics import differentiable_participation_ratio


def differentiable_window_pr(windows: torch.Tensor, mode: str) -> torch.Tensor:
    """PR of windows (N, W, H, D) keeping autograd: per-head mean or whole -> (N,)."""
    if mode == "whole":
        return differentiable_participation_ratio(windows.flatten(2))  # (N,)
    return differentiable_participation_ratio(windows.permute(0, 2, 1, 3)).mean(dim=1)  # (N,)


@dataclass
class HeadGradients:
    """layers: the layers with gradients; each tensor is (L, H, P) float64 unless noted."""

    layers: list[int]
    r_v: torch.Tensor  # (P,) clean R_V (float64)
    saliency: torch.Tensor  # (L, H, P) ||dR_V/dz||
    attribution: torch.Tensor  # (L, H, P) linear estimate of the ablation's R_V change


def head_gradients(
    model: nn.Module,
    adapter: Adapter,
    batch: EncodedBatch,
    layers: Sequence[int],
    early: int,
    late: int,
    window: int,
    mode: str = "per-head",
    mean_z: dict[int, torch.Tensor] | None = None,
) -> HeadGradients:
    """Saliency and attribution of every head of ``layers`` (layers >= late get zeros)."""
    layers = list(layers)
    needed = [layer for layer in layers if layer < late]
    kept: dict[int, torch.Tensor] = {}

    def keep(layer: int):
        def edit(z: torch.Tensor) -> torch.Tensor:  # (P, T, H, D)
            z = z.clone()
            z.retain_grad()
            kept[layer] = z
            return z

        return edit

    embed = model.get_input_embeddings()

    def make_leaf(module, args, output):
        return output.detach().requires_grad_(True)

    handle = embed.register_forward_hook(make_leaf)
    try:
        with torch.enable_grad():
            v_early, v_late = capture_windows(
                model,
                adapter,
                batch,
                [address(early, "v"), address(late, "v")],
                window,
                edits={address(layer, "z"): keep(layer) for layer in needed},
                stop_after_point=address(late, "v"),
                detach=False,
            )  # (P, W, Hkv, D) each
            pr_early = differentiable_window_pr(v_early.double(), mode)  # (P,)
            pr_late = differentiable_window_pr(v_late.double(), mode)  # (P,)
            r_v = pr_late / pr_early  # (P,)
            # Each prompt's R_V depends only on its own row, so the gradient of the sum gives
            # every prompt's gradient at once.
            r_v.sum().backward()
    finally:
        handle.remove()

    n_prompts = batch.input_ids.shape[0]
    mask = batch.attention_mask.to(torch.float64)[:, :, None, None]  # (P, T, 1, 1)
    saliency = torch.zeros(len(layers), adapter.n_heads, n_prompts, dtype=torch.float64)
    attribution = torch.zeros_like(saliency)
    for i, layer in enumerate(layers):
        if layer not in kept:
            continue
        z = kept[layer].detach().double()  # (P, T, H, D)
        grad = kept[layer].grad
        grad = torch.zeros_like(z) if grad is None else grad.double() * mask  # (P, T, H, D)
        saliency[i] = grad.square().sum(dim=(1, 3)).sqrt().T.cpu()  # (H, P)
        target = torch.zeros_like(z) if mean_z is None else mean_z[layer].double()[None, None]
        delta = (target - z) * mask  # (P, T, H, D)
        attribution[i] = (grad * delta).sum(dim=(1, 3)).T.cpu()  # (H, P)
    return HeadGradients(layers, r_v.detach().cpu(), saliency, attribution)
