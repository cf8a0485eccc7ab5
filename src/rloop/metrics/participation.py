"""Participation ratio (PR), spectrum, effective rank and R_V of activation windows.

A *window* is a matrix X of shape (W, d): the last W real tokens of one sequence at one hook
point. Every function here is batched over leading dimensions, takes torch tensors of any
float dtype (numpy arrays are accepted and converted) and accumulates in float64, whatever the
model's dtype (SCIENCE.md §2, §7).

    PR(X) = (sum_i s_i^2)^2 / sum_i s_i^4 = tr(G)^2 / ||G||_F^2,   G = X X^T  (W x W)

over the singular values s_i of X, so no SVD is needed. 1 <= PR <= min(W, d); PR = 1 for a
rank-1 window and PR = W for W orthogonal rows of equal norm. PR is scale invariant.

A window that is all zeros, or that holds a NaN or an infinity, has no PR: it gives NaN (never
0, never -1), and the ``*_with_reason`` variants say which of the two it was.
"""

from __future__ import annotations

import numpy as np
import torch

from rloop.errors import ConfigError, PromptError

PR_MODE_PER_HEAD = "per-head"
PR_MODE_WHOLE = "whole"
PR_MODES: tuple[str, ...] = (PR_MODE_PER_HEAD, PR_MODE_WHOLE)

REASON_NON_FINITE = "non-finite activations"
REASON_ZERO_WINDOW = "zero window"

# Nested lists of reasons mirror the leading (batch) dimensions of the PR tensor; a 0-d PR
# has a single reason.
Reasons = list | str | None


def as_tensor(x) -> torch.Tensor:
    """``x`` as a torch tensor: tensors pass through, arrays and lists are converted."""
    if isinstance(x, torch.Tensor):
        return x
    return torch.as_tensor(np.asarray(x))


def check_window_matrix(x: torch.Tensor, name: str) -> None:
    """ConfigError unless x is non-empty windows (..., W, d); ``name`` is the caller."""
    if x.dim() < 2:
        raise ConfigError(f"{name} needs windows of shape (..., W, d), got shape {tuple(x.shape)}")
    if x.shape[-2] == 0 or x.shape[-1] == 0:
        raise ConfigError(f"{name} got an empty window of shape {tuple(x.shape[-2:])}")


def window_status(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(non_finite, zero) boolean masks of shape (...) for windows x (..., W, d)."""
    non_finite = ~torch.isfinite(x).flatten(-2).all(dim=-1)  # (...)
    zero = (x == 0).flatten(-2).all(dim=-1) & ~non_finite  # (...)
    return non_finite, zero


def _reasons(non_finite: torch.Tensor, zero: torch.Tensor) -> Reasons:
    labels = np.full(tuple(non_finite.shape), None, dtype=object)
    labels[zero.cpu().numpy()] = REASON_ZERO_WINDOW
    labels[non_finite.cpu().numpy()] = REASON_NON_FINITE
    return labels.tolist()


def _participation_ratio(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(PR (...) float64, non_finite (...), zero (...)) of windows x (..., W, d).

    Stays on x's device and never synchronises with it (no reasons are built here), so
    sweeps can call it once per chunk without stalling a GPU.
    """
    check_window_matrix(x, "participation_ratio")
    non_finite, zero = window_status(x)  # (...), (...)
    x64 = torch.where(torch.isfinite(x), x, 0).to(torch.float64)  # (..., W, d)
    # Divide each window by its largest |entry| (PR is scale invariant) so that the fourth
    # powers in ||G||_F^2 neither overflow nor underflow.
    scale = x64.abs().amax(dim=(-2, -1), keepdim=True)  # (..., 1, 1)
    x64 = x64 / torch.where(scale > 0, scale, 1.0)  # (..., W, d)
    gram = x64 @ x64.mT  # (..., W, W)
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(dim=-1)  # (...)
    frobenius_sq = gram.square().sum(dim=(-2, -1))  # (...)
    undefined = non_finite | zero  # (...)
    pr = trace.square() / torch.where(undefined, 1.0, frobenius_sq)  # (...)
    pr = torch.where(undefined, torch.nan, pr)  # (...)
    return pr, non_finite, zero


def participation_ratio_with_reason(x) -> tuple[torch.Tensor, Reasons]:
    """PR of windows x (..., W, d) -> (PR (...) float64, reasons).

    ``reasons`` is a nested list shaped like the leading dimensions (a single value for one
    window): None where PR is a number, "non-finite activations" or "zero window" where it
    is NaN.
    """
    pr, non_finite, zero = _participation_ratio(as_tensor(x))
    return pr, _reasons(non_finite, zero)


def participation_ratio(x) -> torch.Tensor:
    """PR of windows x (..., W, d), any float dtype -> (...) float64; NaN for a zero or
    non-finite window. Computed from the W x W Gram matrix in float64 (no SVD)."""
    return _participation_ratio(as_tensor(x))[0]


def _heads_first(v: torch.Tensor, name: str) -> torch.Tensor:
    if v.dim() < 3:
        raise ConfigError(f"{name} needs values of shape (..., W, H, D), got {tuple(v.shape)}")
    return v.transpose(-3, -2)  # (..., H, W, D)


def pr_per_head(v) -> torch.Tensor:
    """PR of each head's window: v (..., W, H, D) -> (..., H) float64."""
    v = as_tensor(v)
    return participation_ratio(_heads_first(v, "pr_per_head"))  # (..., H)


def pr_per_head_mean(v) -> torch.Tensor:
    """Mean over heads of the per-head PR (the seed notebooks' definition):
    v (..., W, H, D) -> (...) float64. NaN if any head's window is NaN (a mean over the
    remaining heads would silently change what is measured)."""
    return pr_per_head(v).mean(dim=-1)  # (...)


def pr_whole(v) -> torch.Tensor:
    """PR of the concatenated-heads window: v (..., W, H, D) -> (...) float64, the PR of the
    (W, H*D) matrix."""
    v = as_tensor(v)
    if v.dim() < 3:
        raise ConfigError(f"pr_whole needs values of shape (..., W, H, D), got {tuple(v.shape)}")
    return participation_ratio(v.flatten(-2))  # (..., W, H*D) -> (...)


def check_mode(mode: str) -> None:
    """ConfigError unless ``mode`` is one of PR_MODES."""
    if mode not in PR_MODES:
        raise ConfigError(f"unknown PR mode {mode!r}: choose one of {', '.join(PR_MODES)}")


def window_pr_with_reason(v, mode: str) -> tuple[torch.Tensor, Reasons]:
    """PR in a named mode of v (..., W, H, D) -> ((...) float64, reasons shaped like (...)).

    "per-head": mean over heads of each head's PR (NaN if any head is NaN; the reason names
    the first such head). "whole": PR of the (W, H*D) matrix.
    """
    check_mode(mode)
    v = as_tensor(v)
    if mode == PR_MODE_WHOLE:
        if v.dim() < 3:
            raise ConfigError(f"window_pr needs values of shape (..., W, H, D), got {v.shape}")
        return participation_ratio_with_reason(v.flatten(-2))  # (...)
    per_head, head_reasons = participation_ratio_with_reason(_heads_first(v, "window_pr"))
    reasons = np.empty(tuple(per_head.shape[:-1]), dtype=object)
    flat_heads = np.asarray(head_reasons, dtype=object).reshape(-1, per_head.shape[-1])
    for i, row in enumerate(flat_heads):
        first = next(((h, r) for h, r in enumerate(row) if r is not None), None)
        reasons.flat[i] = None if first is None else f"head {first[0]}: {first[1]}"
    return per_head.mean(dim=-1), reasons.tolist()  # (...)


def window_pr(v, mode: str) -> torch.Tensor:
    """PR of v (..., W, H, D) in mode "per-head" (mean over heads) or "whole" -> (...) float64.
    Raises ConfigError for any other mode. Same numbers as :func:`window_pr_with_reason`,
    without building reasons (no host synchronisation)."""
    check_mode(mode)
    v = as_tensor(v)
    if mode == PR_MODE_WHOLE:
        return pr_whole(v)  # (...)
    return pr_per_head_mean(v)  # (...)


def singular_spectrum(x) -> torch.Tensor:
    """Singular values of windows x (..., W, d) -> (..., min(W, d)) float64, descending.

    From the eigenvalues of the smaller Gram matrix (X X^T or X^T X) in float64, clamped at 0
    before the square root. Singular values below about 1e-8 * s_max are not resolved (they
    come out near 0). All zeros for a zero window, NaN for a non-finite one.
    """
    x = as_tensor(x)
    check_window_matrix(x, "singular_spectrum")
    non_finite, _ = window_status(x)  # (...)
    x64 = torch.where(torch.isfinite(x), x, 0).to(torch.float64)  # (..., W, d)
    scale = x64.abs().amax(dim=(-2, -1), keepdim=True)  # (..., 1, 1)
    scale = torch.where(scale > 0, scale, 1.0)  # (..., 1, 1)
    x64 = x64 / scale  # (..., W, d)
    gram = x64 @ x64.mT if x.shape[-2] <= x.shape[-1] else x64.mT @ x64  # (..., k, k)
    eigenvalues = torch.linalg.eigvalsh(gram).flip(-1)  # (..., k) descending
    spectrum = eigenvalues.clamp(min=0).sqrt() * scale.squeeze(-1)  # (..., k)
    return torch.where(non_finite.unsqueeze(-1), torch.nan, spectrum)  # (..., k)


def effective_rank(x) -> torch.Tensor:
    """Effective rank (Roy & Vetterli 2007) of windows x (..., W, d) -> (...) float64.

    erank = exp(H(p)), H(p) = -sum_i p_i log p_i, p_i = s_i / sum_j s_j over the singular
    values (not their squares; 0 log 0 = 0). 1 <= erank <= min(W, d). NaN for a zero or
    non-finite window.
    """
    spectrum = singular_spectrum(x)  # (..., k)
    total = spectrum.sum(dim=-1, keepdim=True)  # (..., 1)
    p = spectrum / torch.where(total > 0, total, 1.0)  # (..., k)
    entropy = -torch.xlogy(p, p).sum(dim=-1)  # (...)
    return torch.where(total.squeeze(-1) > 0, entropy.exp(), torch.nan)  # (...)


def r_v(pr_late, pr_early):
    """R_V = PR(late layer) / PR(early layer), elementwise.

    Tensors give a float64 tensor, numpy arrays a float64 array, Python numbers a float.
    NaN propagates; a zero or non-finite early PR (and a non-finite late PR) gives NaN,
    never inf or 0.
    """
    if isinstance(pr_late, torch.Tensor) or isinstance(pr_early, torch.Tensor):
        late = as_tensor(pr_late).to(torch.float64)
        early = as_tensor(pr_early).to(torch.float64).to(late.device)
        valid = torch.isfinite(late) & torch.isfinite(early) & (early != 0)
        return torch.where(valid, late / torch.where(valid, early, 1.0), torch.nan)
    late = np.asarray(pr_late, dtype=np.float64)
    early = np.asarray(pr_early, dtype=np.float64)
    valid = np.isfinite(late) & np.isfinite(early) & (early != 0)
    ratio = np.where(valid, late / np.where(valid, early, 1.0), np.nan)
    if ratio.ndim == 0 and np.isscalar(pr_late) and np.isscalar(pr_early):
        return float(ratio)
    return ratio


def differentiable_participation_ratio(x: torch.Tensor) -> torch.Tensor:
    """PR of windows x (..., W, d) that keeps autograd (for gradient saliency) -> (...).

    Computed in float64 (float32 on devices without float64, e.g. MPS); gradients flow back
    to ``x`` in its own dtype. A zero window gives NaN with zero gradient; non-finite input
    gives NaN.
    """
    check_window_matrix(x, "differentiable_participation_ratio")
    compute_dtype = torch.float32 if x.device.type == "mps" else torch.float64
    x64 = x.to(compute_dtype)  # (..., W, d)
    gram = x64 @ x64.mT  # (..., W, W)
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(dim=-1)  # (...)
    frobenius_sq = gram.square().sum(dim=(-2, -1))  # (...)
    zero = frobenius_sq == 0  # (...)
    pr = trace.square() / torch.where(zero, 1.0, frobenius_sq)  # (...)
    return torch.where(zero, torch.nan, pr)  # (...)


def check_window_lengths(n_tokens, window: int) -> None:
    """Raise PromptError naming every row (index and real-token count) shorter than ``window``;
    ConfigError for a window that is not an integer >= 2."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ConfigError(f"window must be an integer of at least 2 tokens, got {window!r}")
    short = [(i, int(n)) for i, n in enumerate(n_tokens) if n < window]
    if short:
        listed = ", ".join(f"row {i} has {n} real tokens" for i, n in short[:8])
        more = f" (and {len(short) - 8} more)" if len(short) > 8 else ""
        raise PromptError(
            f"fewer real tokens than the {window}-token window: {listed}{more}; "
            "use longer prompts or a smaller window"
        )


def last_real_window(hidden: torch.Tensor, attention_mask: torch.Tensor, window: int):
    """The last ``window`` real tokens (attention_mask != 0) of each row, in order.

    hidden: (B, T, ...), attention_mask: (B, T) -> (B, W, ...). Works for right padding,
    left padding and masks with holes. Raises PromptError naming every row (index and
    real-token count) that has fewer than W real tokens; the window is never shrunk.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ConfigError(f"window must be an integer of at least 2 tokens, got {window!r}")
    if hidden.dim() < 2 or tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ConfigError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match the (B, T) "
            f"of activations {tuple(hidden.shape)}: pass the mask of the same batch"
        )
    real = attention_mask.to(hidden.device) != 0  # (B, T)
    n_real = real.sum(dim=1)  # (B,)
    check_window_lengths(n_real.tolist(), window)
    rank_from_end = n_real.unsqueeze(1) - real.long().cumsum(dim=1)  # (B, T) 0 = last real
    selected = real & (rank_from_end < window)  # (B, T), exactly W per row
    positions = selected.nonzero()[:, 1].view(hidden.shape[0], window)  # (B, W) ascending
    rows = torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(1)  # (B, 1)
    return hidden[rows, positions]  # (B, W, ...)
