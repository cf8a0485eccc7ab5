"""Subspace geometry of activation windows: which directions carry a window, and do two groups
of prompts (or two layers) use the same ones?

A *window* is a (W, d) matrix: the last W real tokens of one prompt at one hook point (see
:mod:`rloop.metrics.participation`). A group of prompts is a stacked tensor (n, W, d) or a list
of (W_i, d) matrices. Everything here takes torch tensors or numpy arrays of any float dtype
and accumulates in float64 (SCIENCE.md §7); results are float64 torch tensors.

Conventions:

- A *basis* is a (k, d) matrix whose rows span a subspace. Functions that compare subspaces
  orthonormalise their bases first (rows need not be orthonormal, only independent), so any
  spanning set gives the same answer.
- :func:`top_directions` is **uncentred** by default, like the participation ratio: the
  directions are the right singular vectors of the stacked rows themselves, and a direction
  shared by all tokens (the mean) counts. ``center=True`` subtracts the mean row first (PCA).
  The variance shares are shares of the squared Frobenius norm of the (centred or uncentred)
  stacked rows.
- Singular vectors have an arbitrary sign; rloop fixes it so that each direction's
  largest-magnitude entry is positive, which makes results reproducible. Signs carry no
  meaning: :func:`logit_lens_tokens` reads both +u and -u.
- Principal angles are in radians, ascending, in [0, pi/2]. The overlap of two k-dimensional
  subspaces is the mean cos^2 of their principal angles, ||Q_a Q_b^T||_F^2 / k: 1 for the same
  subspace, 0 for orthogonal ones, and k / d on average for two uniformly random ones.
- Random procedures take a ``seed`` and use their own generator (numpy), so the same inputs and
  seed give the same numbers. Bootstraps resample prompts (never tokens within a prompt).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from rloop.errors import ConfigError

_VOCAB_CHUNK = 8192  # unembedding rows per float64 block in logit_lens_tokens


# ----------------------------------------------------------------------------------------------
# Input handling


def _to_float64(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        tensor = x.detach()
    else:
        try:
            tensor = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{name} must be a tensor or array of numbers: {error}") from None
    if not (tensor.is_floating_point() or tensor.dtype in (torch.int32, torch.int64)):
        raise ConfigError(f"{name} must hold real numbers, got dtype {tensor.dtype}")
    tensor = tensor.to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(tensor).all():
        raise ConfigError(f"{name} holds NaN or infinite values: drop or fix those windows first")
    return tensor


def _window_list(windows, name: str = "windows") -> list[torch.Tensor]:
    """A group of windows -> list of float64 (W_i, d) tensors, all with the same d."""
    if isinstance(windows, (list, tuple)):
        matrices = [_to_float64(w, f"{name}[{i}]") for i, w in enumerate(windows)]
    else:
        stacked = _to_float64(windows, name)
        if stacked.dim() == 2:
            raise ConfigError(
                f"{name} has shape {tuple(stacked.shape)}: pass a group of windows (n, W, d) "
                "or a list of (W, d) matrices (one window is windows[None])"
            )
        if stacked.dim() != 3:
            raise ConfigError(f"{name} must have shape (n, W, d), got {tuple(stacked.shape)}")
        matrices = list(stacked.unbind(0))
    if not matrices:
        raise ConfigError(f"{name} is empty: pass at least one window")
    for i, matrix in enumerate(matrices):
        if matrix.dim() != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
            raise ConfigError(
                f"{name}[{i}] must be a non-empty (W, d) matrix, got {tuple(matrix.shape)}"
            )
    widths = {int(m.shape[1]) for m in matrices}
    if len(widths) > 1:
        raise ConfigError(f"{name} mixes widths d = {sorted(widths)}: windows must share d")
    return matrices


def _check_basis(basis, name: str) -> torch.Tensor:
    tensor = _to_float64(basis, name)
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)  # (1, d)
    if tensor.dim() != 2 or tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ConfigError(
            f"{name} must be a (k, d) matrix of row vectors, got {tuple(tensor.shape)}"
        )
    return tensor


def orthonormal_basis(basis, name: str = "basis") -> torch.Tensor:
    """Orthonormal rows spanning the same subspace as the rows of ``basis`` (k, d) -> (k, d)
    float64. Raises ConfigError if the rows are linearly dependent (rank < k)."""
    rows = _check_basis(basis, name)  # (k, d)
    k, d = rows.shape
    if k > d:
        raise ConfigError(f"{name} has {k} rows in dimension {d}: at most {d} can be independent")
    _, singular, vh = torch.linalg.svd(rows, full_matrices=False)  # (k,), (k, d)
    tolerance = singular.max() * max(k, d) * torch.finfo(torch.float64).eps
    rank = int((singular > tolerance).sum())
    if rank < k:
        raise ConfigError(
            f"{name} has {k} rows but spans only {rank} dimensions: pass independent rows"
        )
    return vh  # (k, d), rows orthonormal, same span


def _fix_signs(directions: torch.Tensor) -> torch.Tensor:
    """Flip each row (k, d) so that its largest-magnitude entry is positive."""
    largest = directions.abs().argmax(dim=1, keepdim=True)  # (k, 1)
    signs = torch.sign(directions.gather(1, largest))  # (k, 1)
    return directions * torch.where(signs == 0, 1.0, signs)  # (k, d)


def _check_k(k: int, limit: int, what: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    if k > limit:
        raise ConfigError(f"k = {k} exceeds {what} = {limit}: choose k <= {limit}")


# ----------------------------------------------------------------------------------------------
# Top directions of a group


@dataclass(frozen=True)
class TopDirections:
    """Top-k right singular vectors of a group's stacked window rows.

    directions: (k, d) float64, orthonormal rows, sign fixed (largest entry positive).
    variance_share: (k,) share of the total squared norm carried by each direction.
    spectrum_share: (min(N, d),) share of every singular direction, descending; sums to 1.
    mean: (d,) the subtracted mean row when ``center`` is True, else None.
    n_prompts, n_rows: prompts and stacked rows (tokens) the directions were computed from.
    """

    directions: torch.Tensor
    variance_share: torch.Tensor
    spectrum_share: torch.Tensor
    center: bool
    mean: torch.Tensor | None
    n_prompts: int
    n_rows: int

    @property
    def k(self) -> int:
        return int(self.directions.shape[0])

    @property
    def total_share(self) -> float:
        """Share of the total squared norm inside the span of the k directions."""
        return float(self.variance_share.sum())


def _rank_limit(n_rows: int, d: int, center: bool) -> int:
    return min(n_rows - 1 if center else n_rows, d)


def top_directions(windows, k: int, center: bool = False) -> TopDirections:
    """Top-k directions of a group of windows (n, W, d) or a list of (W_i, d).

    The rows of all windows are stacked into X (N = sum W_i, d); with ``center`` the mean row
    is subtracted first. The directions are X's top-k right singular vectors (float64 SVD), and
    each one's share is s_i^2 / sum_j s_j^2. Raises ConfigError if k exceeds min(N, d) (N - 1
    when centred) or the numerical rank of X, or if X is all zeros.
    """
    matrices = _window_list(windows)
    rows = torch.cat(matrices, dim=0)  # (N, d)
    n_rows, d = rows.shape
    _check_k(k, _rank_limit(n_rows, d, center), "the rank limit min(rows, d)")
    mean = rows.mean(dim=0) if center else None  # (d,)
    if mean is not None:
        rows = rows - mean  # (N, d)
    _, singular, vh = torch.linalg.svd(rows, full_matrices=False)  # (r,), (r, d)
    total = singular.square().sum()
    if total == 0:
        raise ConfigError("windows are all zeros: they have no directions")
    tolerance = singular[0] * max(n_rows, d) * torch.finfo(torch.float64).eps
    rank = int((singular > tolerance).sum())
    _check_k(k, rank, "the numerical rank of the stacked windows")
    spectrum_share = singular.square() / total  # (r,)
    return TopDirections(
        directions=_fix_signs(vh[:k]),  # (k, d)
        variance_share=spectrum_share[:k].clone(),  # (k,)
        spectrum_share=spectrum_share,  # (r,)
        center=center,
        mean=mean,
        n_prompts=len(matrices),
        n_rows=n_rows,
    )


def subspace_share(windows, basis, mean=None) -> torch.Tensor:
    """Share of each window's squared Frobenius norm inside span(basis).

    windows: one (W, d) window, a group (n, W, d) or a list of (W_i, d); basis: (k, d) rows
    (orthonormalised here). ``mean`` (d,), if given, is subtracted from every row first (pass
    ``TopDirections.mean`` for centred directions). Returns (n,) float64 in [0, 1] (a 0-d
    tensor for a single (W, d) window); NaN for an all-zero window.
    """
    single = isinstance(windows, (torch.Tensor, np.ndarray)) and np.ndim(windows) == 2
    matrices = _window_list(windows[None] if single else windows)
    q = orthonormal_basis(basis)  # (k, d)
    if q.shape[1] != matrices[0].shape[1]:
        raise ConfigError(
            f"basis has d = {q.shape[1]} but the windows have d = {matrices[0].shape[1]}"
        )
    offset = None if mean is None else _to_float64(mean, "mean").reshape(-1)  # (d,)
    shares = torch.empty(len(matrices), dtype=torch.float64)
    for i, matrix in enumerate(matrices):
        rows = matrix if offset is None else matrix - offset  # (W, d)
        total = rows.square().sum()
        inside = (rows @ q.T).square().sum()  # ||X Q^T||_F^2
        shares[i] = inside / total if total > 0 else math.nan
    return shares[0] if single else shares


# ----------------------------------------------------------------------------------------------
# Comparing subspaces


def principal_angles(basis_a, basis_b) -> torch.Tensor:
    """Principal angles between span(basis_a) (k_a, d) and span(basis_b) (k_b, d), in radians,
    ascending -> (min(k_a, k_b),) float64.

    Cosines are the singular values of Q_a Q_b^T (orthonormalised bases). Small angles are read
    from the sines instead (singular values of the part of the smaller basis outside the other
    span), because arccos loses precision near 0 (Knyazev & Argentati 2002).
    """
    qa = orthonormal_basis(basis_a, "basis_a")  # (k_a, d)
    qb = orthonormal_basis(basis_b, "basis_b")  # (k_b, d)
    if qa.shape[1] != qb.shape[1]:
        raise ConfigError(
            f"bases live in different dimensions: d = {qa.shape[1]} and d = {qb.shape[1]}"
        )
    if qb.shape[0] > qa.shape[0]:
        qa, qb = qb, qa  # qb is the smaller (or equal) basis
    cosines = torch.linalg.svdvals(qa @ qb.T).clamp(0.0, 1.0)  # (k_b,) descending
    residual = qb - (qb @ qa.T) @ qa  # (k_b, d): qb rows minus their projection on span(qa)
    sines = torch.linalg.svdvals(residual).clamp(0.0, 1.0).flip(0)  # (k_b,) ascending
    small = cosines.square() >= 0.5
    return torch.where(small, torch.arcsin(sines), torch.arccos(cosines))  # (k_b,) ascending


def subspace_overlap(basis_a, basis_b) -> float:
    """Mean cos^2 of the principal angles: ||Q_a Q_b^T||_F^2 / min(k_a, k_b), in [0, 1].

    1 when the smaller subspace lies inside the other, 0 when they are orthogonal; for two
    uniformly random subspaces its expectation is :func:`random_overlap` = max(k_a, k_b) / d.
    """
    qa = orthonormal_basis(basis_a, "basis_a")  # (k_a, d)
    qb = orthonormal_basis(basis_b, "basis_b")  # (k_b, d)
    if qa.shape[1] != qb.shape[1]:
        raise ConfigError(
            f"bases live in different dimensions: d = {qa.shape[1]} and d = {qb.shape[1]}"
        )
    cross = qa @ qb.T  # (k_a, k_b)
    return float(cross.square().sum() / min(qa.shape[0], qb.shape[0]))


def random_overlap(k_a: int, k_b: int, d: int) -> float:
    """Expected :func:`subspace_overlap` of uniformly random k_a- and k_b-dimensional
    subspaces of R^d: E||Q_a Q_b^T||_F^2 = k_a k_b / d, divided by min(k_a, k_b)."""
    if min(k_a, k_b) < 1 or max(k_a, k_b) > d:
        raise ConfigError(f"need 1 <= k_a, k_b <= d, got k_a={k_a}, k_b={k_b}, d={d}")
    return max(k_a, k_b) / d


def layer_to_layer_overlap(bases: Sequence) -> torch.Tensor:
    """Overlap (:func:`subspace_overlap`) of consecutive bases: bases[l] (k_l, d) vs
    bases[l + 1] -> (L - 1,) float64. All bases must share d (e.g. the residual stream)."""
    if len(bases) < 2:
        raise ConfigError(f"layer_to_layer_overlap needs at least 2 bases, got {len(bases)}")
    checked = [_check_basis(b, f"bases[{i}]") for i, b in enumerate(bases)]
    for i in range(1, len(checked)):
        if checked[i].shape[1] != checked[0].shape[1]:
            raise ConfigError(
                f"bases[{i}] has d = {checked[i].shape[1]} but bases[0] has d = "
                f"{checked[0].shape[1]}: compare layers of the same stream"
            )
    overlaps = [subspace_overlap(checked[i], checked[i + 1]) for i in range(len(checked) - 1)]
    return torch.tensor(overlaps, dtype=torch.float64)  # (L - 1,)


# ----------------------------------------------------------------------------------------------
# Resampling: split halves, bootstrap, null


class _StackedGroup:
    """A group's stacked rows with the bookkeeping to recompute top-k directions of
    prompt-weighted resamples quickly.

    Resampling prompt i c_i times multiplies its rows' contribution to X^T X by c_i, so the
    resample's right singular vectors are those of diag(sqrt(c)) X. When N <= d the N x N Gram
    K = X X^T is formed once and each resample only rescales it; otherwise the d x d Gram is
    rebuilt from the weighted rows (cheap because d is small).
    """

    def __init__(self, matrices: list[torch.Tensor], center: bool):
        self.rows = torch.cat(matrices, dim=0)  # (N, d)
        self.row_prompt = torch.repeat_interleave(
            torch.arange(len(matrices)), torch.tensor([m.shape[0] for m in matrices])
        )  # (N,)
        self.n_prompts = len(matrices)
        self.center = center
        n_rows, d = self.rows.shape
        self.row_gram = self.rows @ self.rows.T if n_rows <= d and not center else None  # (N, N)

    def top_k(self, counts: np.ndarray, k: int) -> torch.Tensor | None:
        """Orthonormal top-k directions (k, d) of the resample with prompt counts (n,); None
        when the resample has fewer than k resolvable directions (too few distinct prompts)."""
        weights = torch.as_tensor(counts, dtype=torch.float64)[self.row_prompt]  # (N,)
        if self.center:
            mean = (weights[:, None] * self.rows).sum(0) / weights.sum()  # (d,)
            rows = (self.rows - mean) * weights.sqrt()[:, None]  # (N, d)
            _, singular, vh = torch.linalg.svd(rows, full_matrices=False)  # (r,), (r, d)
            squared = singular.square()  # (r,) eigenvalues of the weighted Gram
            directions = vh[:k] if vh.shape[0] >= k else None  # (k, d)
        elif self.row_gram is not None:
            root = weights.sqrt()  # (N,)
            gram = root[:, None] * self.row_gram * root[None, :]  # (N, N)
            eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
            squared = eigenvalues.flip(0)  # (N,) descending
            top = eigenvectors[:, -k:].flip(1)  # (N, k)
            directions = (root[:, None] * top).T @ self.rows  # (k, d) = s_j v_j^T
            directions = directions / squared[:k].clamp(min=1e-300).sqrt()[:, None]  # (k, d)
        else:
            gram = self.rows.T @ (weights[:, None] * self.rows)  # (d, d)
            eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
            squared = eigenvalues.flip(0)  # (d,) descending
            directions = eigenvectors[:, -k:].flip(1).T  # (k, d)
        # A direction whose eigenvalue is at rounding level is not determined by the data.
        tolerance = squared[0] * max(self.rows.shape) * 1e3 * torch.finfo(torch.float64).eps
        if directions is None or squared.shape[0] < k or squared[k - 1] <= tolerance:
            return None
        return directions


@dataclass(frozen=True)
class SplitHalfOverlap:
    """Stability of a group's top-k subspace across random halves of its prompts.

    overlaps: (n_splits,) overlap of the two halves' top-k subspaces.
    heldout_share: (n_splits,) share of one half's squared norm inside the other half's top-k
    span (mean of both directions); insample_share: (n_splits,) the same half's share inside
    its own top-k span (the in-sample optimum, for comparison).
    """

    k: int
    d: int
    n_prompts: int
    n_splits: int
    seed: int
    center: bool
    overlaps: torch.Tensor
    heldout_share: torch.Tensor
    insample_share: torch.Tensor

    @property
    def mean(self) -> float:
        return float(self.overlaps.mean())

    @property
    def sd(self) -> float:
        return float(self.overlaps.std()) if self.n_splits > 1 else math.nan

    @property
    def heldout_mean(self) -> float:
        return float(self.heldout_share.mean())

    def to_dict(self) -> dict:
        """Scalar summary (means, sds and 2.5 / 97.5 % quantiles over splits)."""
        low, high = torch.quantile(self.overlaps, torch.tensor([0.025, 0.975], dtype=torch.float64))
        return {
            "k": self.k,
            "n_prompts": self.n_prompts,
            "n_splits": self.n_splits,
            "seed": self.seed,
            "center": self.center,
            "overlap_mean": self.mean,
            "overlap_sd": self.sd,
            "overlap_q025": float(low),
            "overlap_q975": float(high),
            "heldout_share_mean": self.heldout_mean,
            "heldout_share_sd": float(self.heldout_share.std()) if self.n_splits > 1 else math.nan,
            "insample_share_mean": float(self.insample_share.mean()),
            "random_overlap": self.k / self.d,
        }


def _halves(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2 :])


def _check_splits(n_splits: int) -> None:
    if isinstance(n_splits, bool) or not isinstance(n_splits, int) or n_splits < 1:
        raise ConfigError(f"n_splits must be a positive integer, got {n_splits!r}")


def _check_half_rank(matrices: list[torch.Tensor], k: int, center: bool, what: str) -> None:
    n = len(matrices)
    if n < 2:
        raise ConfigError(f"{what} needs at least 2 prompts to split in halves, got {n}")
    widths = sorted(int(m.shape[0]) for m in matrices)
    smallest_half_rows = sum(widths[: n // 2])  # the fewest rows any half can have
    limit = _rank_limit(smallest_half_rows, int(matrices[0].shape[1]), center)
    _check_k(k, limit, f"the rank limit of a half ({n // 2} prompts)")


def split_half_overlap(
    windows, k: int, n_splits: int = 100, seed: int = 0, center: bool = False
) -> SplitHalfOverlap:
    """Split the prompts of a group (n, W, d) at random into halves (n // 2 and the rest),
    compute each half's top-k directions and compare them, ``n_splits`` times.

    An overlap near 1 means the top-k subspace is a property of the group, not of a few
    prompts; compare with k / d for unrelated subspaces. ``heldout_share`` is the out-of-sample
    version of :attr:`TopDirections.total_share`.
    """
    _check_splits(n_splits)
    matrices = _window_list(windows)
    _check_half_rank(matrices, k, center, "split_half_overlap")
    rng = np.random.default_rng(seed)
    overlaps = torch.empty(n_splits, dtype=torch.float64)
    heldout = torch.empty(n_splits, dtype=torch.float64)
    insample = torch.empty(n_splits, dtype=torch.float64)
    for s in range(n_splits):
        first, second = _halves(len(matrices), rng)
        half_a = [matrices[i] for i in first]
        half_b = [matrices[i] for i in second]
        top_a = top_directions(half_a, k, center=center)
        top_b = top_directions(half_b, k, center=center)
        overlaps[s] = subspace_overlap(top_a.directions, top_b.directions)
        heldout[s] = 0.5 * (
            _pooled_share(half_b, top_a.directions, top_a.mean)
            + _pooled_share(half_a, top_b.directions, top_b.mean)
        )
        insample[s] = 0.5 * (top_a.total_share + top_b.total_share)
    d = int(matrices[0].shape[1])
    return SplitHalfOverlap(
        k, d, len(matrices), n_splits, seed, center, overlaps, heldout, insample
    )


def _pooled_share(matrices: list[torch.Tensor], directions: torch.Tensor, mean) -> float:
    """Share of the stacked rows' squared norm (after subtracting ``mean``) inside the span of
    orthonormal ``directions`` (k, d)."""
    rows = torch.cat(matrices, dim=0)  # (N, d)
    if mean is not None:
        rows = rows - mean  # (N, d)
    total = rows.square().sum()
    return float((rows @ directions.T).square().sum() / total) if total > 0 else math.nan


@dataclass(frozen=True)
class AngleBootstrap:
    """Principal angles between two groups' top-k subspaces with a bootstrap over prompts.

    angles: (k,) radians, ascending, from all prompts; samples: (n_boot, k) from resamples
    (prompts drawn with replacement within each group); low / high: (k,) percentile interval
    per angle; sd: (k,) bootstrap standard deviation. overlap / overlap_samples likewise for
    :func:`subspace_overlap`. Resamples with fewer than k resolvable directions (too few
    distinct prompts) are NaN in ``samples``, counted in ``n_undefined`` and left out of the
    interval.
    """

    k: int
    n_a: int
    n_b: int
    n_boot: int
    ci: float
    seed: int
    center: bool
    angles: torch.Tensor
    samples: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    sd: torch.Tensor
    overlap: float
    overlap_samples: torch.Tensor
    n_undefined: int

    def to_frame(self) -> pd.DataFrame:
        """One row per angle: index, angle, CI, bootstrap sd (radians) and in degrees."""
        return pd.DataFrame(
            {
                "angle_index": np.arange(self.k),
                "angle_rad": self.angles.numpy(),
                "ci_low_rad": self.low.numpy(),
                "ci_high_rad": self.high.numpy(),
                "sd_rad": self.sd.numpy(),
                "angle_deg": np.degrees(self.angles.numpy()),
            }
        )


def _check_boot(n_boot: int, ci: float) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ConfigError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0.0 < ci < 1.0:
        raise ConfigError(f"confidence level must be between 0 and 1 (e.g. 0.95), got {ci}")


def bootstrap_principal_angles(
    windows_a,
    windows_b,
    k: int,
    n_boot: int = 500,
    seed: int = 0,
    ci: float = 0.95,
    center: bool = False,
) -> AngleBootstrap:
    """Principal angles between the top-k subspaces of two groups (e.g. recursive vs baseline
    prompts at one hook point), with a percentile bootstrap over prompts.

    Each resample draws n_a prompts from group a and n_b from group b with replacement and
    recomputes both top-k subspaces. Compare the angles with :func:`random_split_null`, the
    angles expected between two samples of one group.
    """
    _check_boot(n_boot, ci)
    group_a = _window_list(windows_a, "windows_a")
    group_b = _window_list(windows_b, "windows_b")
    if group_a[0].shape[1] != group_b[0].shape[1]:
        raise ConfigError(
            f"groups have different widths: d = {group_a[0].shape[1]} and "
            f"d = {group_b[0].shape[1]}: compare windows from the same hook point"
        )
    top_a = top_directions(group_a, k, center=center).directions  # (k, d)
    top_b = top_directions(group_b, k, center=center).directions  # (k, d)
    angles = principal_angles(top_a, top_b)  # (k,)
    stacked_a, stacked_b = _StackedGroup(group_a, center), _StackedGroup(group_b, center)
    rng = np.random.default_rng(seed)
    samples = torch.empty(n_boot, k, dtype=torch.float64)
    overlap_samples = torch.empty(n_boot, dtype=torch.float64)
    for b in range(n_boot):
        counts_a = rng.multinomial(len(group_a), np.full(len(group_a), 1.0 / len(group_a)))
        counts_b = rng.multinomial(len(group_b), np.full(len(group_b), 1.0 / len(group_b)))
        resample_a = stacked_a.top_k(counts_a, k)  # (k, d) or None
        resample_b = stacked_b.top_k(counts_b, k)  # (k, d) or None
        if resample_a is None or resample_b is None:
            samples[b] = math.nan  # undefined resample: left out of the interval, counted
        else:
            samples[b] = principal_angles(resample_a, resample_b)
        overlap_samples[b] = torch.cos(samples[b]).square().mean()
    n_undefined = int(torch.isnan(samples[:, 0]).sum())
    if n_undefined > n_boot / 2:
        raise ConfigError(
            f"{n_undefined} of {n_boot} resamples had fewer than k = {k} directions: use more "
            "prompts or a smaller k"
        )
    alpha = 1.0 - ci
    levels = torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)
    low, high = torch.nanquantile(samples, levels, dim=0)  # (k,), (k,)
    defined = samples[~torch.isnan(samples[:, 0])]  # (n_defined, k)
    return AngleBootstrap(
        k=k, n_a=len(group_a), n_b=len(group_b), n_boot=n_boot, ci=ci, seed=seed, center=center,
        angles=angles, samples=samples, low=low, high=high,
        sd=defined.std(dim=0) if defined.shape[0] > 1 else torch.full((k,), math.nan),
        overlap=float(torch.cos(angles).square().mean()),
        overlap_samples=overlap_samples, n_undefined=n_undefined,
    )  # fmt: skip


@dataclass(frozen=True)
class AngleNull:
    """Principal angles between the top-k subspaces of two random halves of one group.

    samples: (n_splits, k) radians, ascending within a row; mean / q_low / q_high: (k,).
    Halves hold n // 2 prompts, fewer than a full group, so these angles are somewhat larger
    than the sampling noise between two full groups: a conservative null.
    """

    k: int
    n_prompts: int
    n_splits: int
    seed: int
    center: bool
    samples: torch.Tensor
    mean: torch.Tensor
    q_low: torch.Tensor
    q_high: torch.Tensor

    def exceedance(self, angles) -> torch.Tensor:
        """Share of null splits whose angle is at least the observed one, per angle (k,):
        a one-sided empirical p-value, (1 + #{null >= observed}) / (1 + n_splits)."""
        observed = _to_float64(angles, "angles").reshape(1, -1)  # (1, k)
        count = (self.samples >= observed).sum(dim=0)  # (k,)
        return (1.0 + count) / (1.0 + self.n_splits)


def random_split_null(
    windows_base,
    k: int,
    n_splits: int = 200,
    seed: int = 0,
    center: bool = False,
    ci: float = 0.95,
) -> AngleNull:
    """Null distribution of principal angles: split one group's prompts (e.g. the baseline) at
    random into halves, ``n_splits`` times, and take the angles between the halves' top-k
    subspaces. An angle between two groups that lies inside this distribution is not evidence
    that the groups use different directions."""
    _check_splits(n_splits)
    _check_boot(1, ci)
    matrices = _window_list(windows_base, "windows_base")
    _check_half_rank(matrices, k, center, "random_split_null")
    rng = np.random.default_rng(seed)
    samples = torch.empty(n_splits, k, dtype=torch.float64)
    for s in range(n_splits):
        first, second = _halves(len(matrices), rng)
        top_a = top_directions([matrices[i] for i in first], k, center=center).directions
        top_b = top_directions([matrices[i] for i in second], k, center=center).directions
        samples[s] = principal_angles(top_a, top_b)
    alpha = 1.0 - ci
    levels = torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)
    q_low, q_high = torch.quantile(samples, levels, dim=0)  # (k,), (k,)
    return AngleNull(
        k, len(matrices), n_splits, seed, center, samples, samples.mean(dim=0), q_low, q_high
    )


# ----------------------------------------------------------------------------------------------
# Logit lens of directions


def logit_lens_tokens(
    directions,
    final_norm: Callable[[torch.Tensor], torch.Tensor],
    unembed,
    top_n: int = 10,
    scale: float = 1.0,
    decode: Callable[[int], str] | None = None,
) -> pd.DataFrame:
    """Vocabulary entries each direction promotes, read through the final norm and unembedding.

    directions: (k, d_model) rows (e.g. :attr:`TopDirections.directions`); final_norm: the
    model's final normalisation as a callable on (..., d_model) tensors (identity for none);
    unembed: (vocab, d_model) unembedding matrix. For each direction u and each sign (+u, -u:
    singular vectors have arbitrary signs), logits = unembed @ final_norm(sign * scale * u),
    and the ``top_n`` largest are returned. ``scale`` sets the norm of the vector fed to the
    norm (LayerNorm/RMSNorm are nearly scale invariant; a bias is not). Norms run in the
    unembedding's dtype; the logits accumulate in float64.

    Returns a DataFrame with columns direction, sign ("+" / "-"), rank (0 = highest),
    token_id, logit, and token when ``decode`` (token id -> string) is given.
    """
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
        raise ConfigError(f"top_n must be a positive integer, got {top_n!r}")
    if not isinstance(unembed, torch.Tensor):
        unembed = torch.as_tensor(np.asarray(unembed))
    if unembed.dim() != 2:
        raise ConfigError(f"unembed must be (vocab, d_model), got {tuple(unembed.shape)}")
    vocab, d_model = unembed.shape
    if top_n > vocab:
        raise ConfigError(f"top_n = {top_n} exceeds the vocabulary size {vocab}")
    rows = _check_basis(directions, "directions")  # (k, d)
    if rows.shape[1] != d_model:
        raise ConfigError(
            f"directions have d = {rows.shape[1]} but unembed has d_model = {d_model}: pass "
            "residual-stream directions"
        )
    signed = torch.cat([rows, -rows], dim=0) * scale  # (2k, d): +u rows, then -u rows
    # float64 logits on the unembedding's device, or on CPU for devices without float64.
    device = torch.device("cpu") if unembed.device.type == "mps" else unembed.device
    with torch.no_grad():
        normed = final_norm(signed.to(device=unembed.device, dtype=unembed.dtype))  # (2k, d)
        if tuple(normed.shape) != tuple(signed.shape):
            raise ConfigError(
                f"final_norm changed the shape {tuple(signed.shape)} to {tuple(normed.shape)}"
            )
        normed = normed.to(device=device, dtype=torch.float64)  # (2k, d)
        best_values = torch.full((signed.shape[0], 0), -math.inf, dtype=torch.float64)
        best_ids = torch.zeros((signed.shape[0], 0), dtype=torch.long)
        for start in range(0, vocab, _VOCAB_CHUNK):
            block = unembed[start : start + _VOCAB_CHUNK].to(device, torch.float64)  # (c, d)
            logits = (normed @ block.T).cpu()  # (2k, c)
            values = torch.cat([best_values, logits], dim=1)  # (2k, top_n + c)
            ids = torch.cat(
                [best_ids, torch.arange(start, start + block.shape[0]).expand_as(logits)], dim=1
            )  # (2k, top_n + c)
            order = values.topk(min(top_n, values.shape[1]), dim=1).indices  # (2k, top_n)
            best_values, best_ids = values.gather(1, order), ids.gather(1, order)
    k = rows.shape[0]
    records = []
    for row in range(2 * k):
        for rank in range(top_n):
            token_id = int(best_ids[row, rank])
            record = {
                "direction": row % k,
                "sign": "+" if row < k else "-",
                "rank": rank,
                "token_id": token_id,
                "logit": float(best_values[row, rank]),
            }
            if decode is not None:
                record["token"] = decode(token_id)
            records.append(record)
    frame = pd.DataFrame.from_records(records)
    return frame.sort_values(["direction", "sign", "rank"], kind="stable").reset_index(drop=True)
