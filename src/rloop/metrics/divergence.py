"""Divergence between next-token distributions (a behaviour proxy for ablations)."""

from __future__ import annotations

import torch


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) in nats of the softmax distributions of logits (..., V) -> (...) float64.

    P is the reference (e.g. the clean run), Q the intervened run. Computed from log-softmax
    in float64, so it is >= 0 up to rounding and exactly 0 for identical logits. Non-finite
    logits give NaN.
    """
    log_p = torch.log_softmax(p_logits.to(torch.float64), dim=-1)  # (..., V)
    log_q = torch.log_softmax(q_logits.to(torch.float64), dim=-1)  # (..., V)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # (...)
    finite = torch.isfinite(p_logits).all(dim=-1) & torch.isfinite(q_logits).all(dim=-1)
    return torch.where(finite, kl.clamp(min=0.0), torch.nan)  # (...)
