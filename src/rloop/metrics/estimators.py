"""Finite-sample bias-corrected participation ratio (SCIENCE.md §9).

rloop's PR of a window X (W tokens x d) uses the **uncentred** Gram matrix G = X X^T
(:mod:`rloop.metrics.participation`): with S = X^T X / W, the window's uncentred second-moment
matrix, PR(X) = tr(G)^2 / ||G||_F^2 = tr(S)^2 / tr(S^2). Read the rows x_1..x_W as draws from
a distribution with second-moment matrix M = E[x x^T] (= Sigma + mu mu^T: the mean is part of
M, exactly as the PR does not centre). The population quantity is then

    PR_pop = tr(M)^2 / tr(M^2) = (sum_k lambda_k)^2 / sum_k lambda_k^2,  lambda_k = eig(M),

and the plain PR, a ratio of sample moments, is biased low: it is at most W however large
PR_pop is, and for W = 16 and PR_pop = 20 it sits far below 20.

The correction replaces the numerator and denominator with unbiased U-statistics over
pairs of distinct rows i != j, which need only independent, identically distributed rows
(no Gaussianity):

    E[||x_i||^2 ||x_j||^2] = tr(M)^2       ->  T1 = sum_{i!=j} G_ii G_jj / (W (W-1))
    E[(x_i^T x_j)^2]       = tr(M^2)       ->  T2 = sum_{i!=j} G_ij^2    / (W (W-1))

and PR_corrected = T1 / T2. These are the known-mean (mean taken as zero, i.e. uncentred)
forms of the unbiased estimators of tr(Sigma^2) and (tr Sigma)^2 in the high-dimensional
sphericity and two-sample tests of Bai & Saranadasa (1996) and Chen, Zhang & Zhong (2010);
with the mean inside M no centring terms are needed. The ratio of two unbiased estimators is
not exactly unbiased but it is ratio-consistent, and its bias is much smaller than the plain
PR's. By Cauchy-Schwarz T2 <= T1, so PR_corrected >= 1; it has no upper bound of W (it
estimates a population quantity up to d) and it is noisier than the plain PR.

Caveat: the rows of a real window are consecutive tokens, which are not independent. The
correction removes the bias that comes from having only W points; it cannot remove the part
that comes from dependence between them.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import ArrayLike

from rloop.errors import ConfigError
from rloop.metrics.participation import (
    PR_MODE_WHOLE,
    REASON_NON_FINITE,
    REASON_ZERO_WINDOW,
    Reasons,
    as_tensor,
    check_mode,
    check_window_matrix,
    window_status,
)

REASON_NO_OVERLAP = "no two rows overlap (pairwise orthogonal or a single non-zero row)"


def _check_corrected_window(x: torch.Tensor, name: str) -> None:
    check_window_matrix(x, name)
    if x.shape[-2] < 2:
        raise ConfigError(f"{name} needs at least 2 rows per window, got W = {x.shape[-2]}")


def _scaled_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(T1, T2, scale) of windows x (..., W, d), T1 and T2 of x / scale (scale = largest
    |entry| per window, so fourth powers neither overflow nor underflow), float64."""
    x64 = torch.where(torch.isfinite(x), x, 0).to(torch.float64)  # (..., W, d)
    scale = x64.abs().amax(dim=(-2, -1), keepdim=True)  # (..., 1, 1)
    scale = torch.where(scale > 0, scale, 1.0)  # (..., 1, 1)
    x64 = x64 / scale  # (..., W, d)
    w = x.shape[-2]
    gram = x64 @ x64.mT  # (..., W, W)
    norms = gram.diagonal(dim1=-2, dim2=-1)  # (..., W) squared row norms
    # sum_{i != j} a_i a_j = 2 sum_j a_j (a_1 + ... + a_{j-1}): positive terms only, so no
    # cancellation when one row dominates.
    before = norms.cumsum(dim=-1) - norms  # (..., W)
    pairs = w * (w - 1)
    t1 = 2.0 * (norms * before).sum(dim=-1) / pairs  # (...)
    off_diagonal = gram - torch.diag_embed(norms)  # (..., W, W)
    t2 = off_diagonal.square().sum(dim=(-2, -1)) / pairs  # (...)
    return t1, t2, scale.squeeze(-1).squeeze(-1)  # (...), (...), (...)


def unbiased_trace_moments(x: torch.Tensor | ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased estimates of (tr M)^2 and tr(M^2), M = E[x x^T] the uncentred second-moment
    matrix of the rows, from windows x (..., W, d), W >= 2 -> two (...) float64 tensors in
    the units of x to the fourth power. NaN for a non-finite window."""
    x = as_tensor(x)
    _check_corrected_window(x, "unbiased_trace_moments")
    non_finite, _ = window_status(x)  # (...)
    t1, t2, scale = _scaled_moments(x)  # (...) each
    units = scale.pow(4)  # (...)
    t1 = torch.where(non_finite, torch.nan, t1 * units)  # (...)
    t2 = torch.where(non_finite, torch.nan, t2 * units)  # (...)
    return t1, t2


def _corrected(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(corrected PR, non_finite, zero, no_overlap) of windows x (..., W, d)."""
    _check_corrected_window(x, "participation_ratio_corrected")
    non_finite, zero = window_status(x)  # (...), (...)
    t1, t2, _ = _scaled_moments(x)  # (...), (...)
    no_overlap = (t2 <= 0) & ~non_finite & ~zero  # (...)
    undefined = non_finite | zero | no_overlap  # (...)
    pr = t1 / torch.where(undefined, 1.0, t2)  # (...)
    return torch.where(undefined, torch.nan, pr), non_finite, zero, no_overlap


def participation_ratio_corrected(x: torch.Tensor | ArrayLike) -> torch.Tensor:
    """Bias-corrected PR of windows x (..., W, d), W >= 2 -> (...) float64: an estimate of
    tr(M)^2 / tr(M^2) for the rows' uncentred second-moment matrix M (see the module
    docstring). >= 1, may exceed W. NaN for a zero or non-finite window, or when no two rows
    overlap (every x_i^T x_j = 0 for i != j)."""
    return _corrected(as_tensor(x))[0]


def participation_ratio_corrected_with_reason(
    x: torch.Tensor | ArrayLike,
) -> tuple[torch.Tensor, Reasons]:
    """Bias-corrected PR of windows x (..., W, d) -> (PR (...) float64, reasons): a nested
    list shaped like the leading dimensions (a single value for one window), None where the
    PR is a number, else "non-finite activations", "zero window" or the no-overlap reason."""
    pr, non_finite, zero, no_overlap = _corrected(as_tensor(x))
    labels = np.full(tuple(pr.shape), None, dtype=object)
    labels[no_overlap.cpu().numpy()] = REASON_NO_OVERLAP
    labels[zero.cpu().numpy()] = REASON_ZERO_WINDOW
    labels[non_finite.cpu().numpy()] = REASON_NON_FINITE
    return pr, labels.tolist()


def window_pr_corrected(v: torch.Tensor | ArrayLike, mode: str) -> torch.Tensor:
    """Bias-corrected PR of v (..., W, H, D) in mode "per-head" (mean over heads of each
    head's corrected PR; NaN if any head is NaN) or "whole" (corrected PR of the
    (W, H*D) matrix) -> (...) float64. The corrected counterpart of
    :func:`rloop.metrics.participation.window_pr`."""
    check_mode(mode)
    v = as_tensor(v)
    if v.dim() < 3:
        raise ConfigError(
            f"window_pr_corrected needs values of shape (..., W, H, D), got {v.shape}"
        )
    if mode == PR_MODE_WHOLE:
        return participation_ratio_corrected(v.flatten(-2))  # (..., W, H*D) -> (...)
    per_head = participation_ratio_corrected(v.transpose(-3, -2))  # (..., H, W, D) -> (..., H)
    return per_head.mean(dim=-1)  # (...)
