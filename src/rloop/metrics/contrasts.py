"""Contrasts for experiment designs: minimal pairs, many controls, trends and clusters.

SCIENCE.md §9 asks for paired contrasts against structural twins, the effect against every
control (BH-adjusted), trends over ordered levels (e.g. recursion depth) and correlations whose
rows are not independent (tokens of one generation, prompts sharing a template). Everything is
float64 numpy; every random procedure takes a ``seed`` and uses its own
``numpy.random.Generator``, so the same inputs and seed give the same numbers.

NaN policy (as in :mod:`rloop.metrics.stats`): non-finite values are dropped and counted;
a statistic the data cannot define is NaN and the result carries a ``reason`` string saying
why. Bad input (mismatched lengths, too few rows, unknown method) raises ConfigError.

Bootstrap CIs are percentile intervals; permutation p-values from random draws are
(1 + #{null >= observed}) / (1 + n_perm), exact enumerations count the observed arrangement
among all arrangements.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.stats
from numpy.typing import ArrayLike
from scipy.special import gammaln

from rloop.errors import ConfigError
from rloop.metrics.stats import (
    CORRELATION_METHODS,
    AsDictMixin,
    benjamini_hochberg,
    bootstrap_ci,
    check_choice,
    check_ci,
    check_positive_int,
    contrast,
    correlation_with_ci,
    percentile_interval,
)

SIGN_FLIP_EXACT_MAX_PAIRS = 16  # 2**16 = 65,536 sign vectors
JT_METHODS = ("normal", "exact", "permutation")
JT_EXACT_MAX_ARRANGEMENTS = 200_000
ALTERNATIVES = ("two-sided", "increasing", "decreasing")
CLUSTER_NULLS = ("auto", "cluster-x", "blocks", "within")
NULL_CLUSTER_X = "cluster-x"
NULL_BLOCKS = "blocks"
NULL_WITHIN = "within"

_CHUNK = 500  # permutations / resamples per vectorized block


def _vector(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ConfigError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def _paired_vectors(
    first: ArrayLike, second: ArrayLike, names: tuple[str, str], mismatch: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first, second, keep): two paired one-dimensional float64 vectors (n,) and the mask
    (n,) of the pairs where both are finite. ``mismatch`` is the ConfigError message for
    unequal lengths, with ``{}`` placeholders for the two lengths."""
    a, b = _vector(first, names[0]), _vector(second, names[1])
    if a.size != b.size:
        raise ConfigError(mismatch.format(a.size, b.size))
    return a, b, np.isfinite(a) & np.isfinite(b)


def _n_dropped(keep: np.ndarray) -> int:
    """Number of rows a keep mask leaves out."""
    return int(keep.size - keep.sum())


def _check_resampling(n_boot: int, n_perm: int, ci: float) -> None:
    """ConfigError unless n_boot and n_perm are positive integers and 0 < ci < 1."""
    check_positive_int(n_boot, "n_boot")
    check_positive_int(n_perm, "n_perm")
    check_ci(ci)


def _chunks(total: int) -> Iterator[tuple[int, int]]:
    """(start, size) of the vectorized blocks of ``_CHUNK`` draws that make up ``total``."""
    for start in range(0, total, _CHUNK):
        yield start, min(_CHUNK, total - start)


def _join(reasons: list[str]) -> str | None:
    return "; ".join(reasons) if reasons else None


# --------------------------------------------------------------------------- paired contrast


@dataclass(frozen=True)
class PairedContrast(AsDictMixin):
    """Recursive prompts vs their structural twins, paired (diff = recursive - twin).

    ``n_pairs`` pairs were used; ``n_dropped`` pairs had a non-finite value on either side.
    ``d_z`` = mean diff / sd diff (ddof=1), no small-sample correction. ``sign_flip_exact``
    says whether the sign-flip p enumerated all 2**n sign vectors. ``reason`` (None when
    every field is a number) says why the NaN fields are undefined.
    """

    n_pairs: int
    n_dropped: int
    mean_recursive: float
    mean_twin: float
    mean_diff: float
    mean_diff_ci_low: float
    mean_diff_ci_high: float
    sd_diff: float
    d_z: float
    d_z_ci_low: float
    d_z_ci_high: float
    wilcoxon_statistic: float
    wilcoxon_p: float
    sign_flip_p: float
    sign_flip_exact: bool
    reason: str | None
    ci: float
    n_boot: int
    n_perm: int
    seed: int


def _d_z(diffs: np.ndarray, axis: int = -1) -> np.ndarray:
    """mean / sd (ddof=1) along ``axis``; NaN where the sd is 0."""
    sd = np.std(diffs, axis=axis, ddof=1)
    mean = np.mean(diffs, axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sd > 0, mean / np.where(sd > 0, sd, 1.0), np.nan)


def _sign_flip_p(diffs: np.ndarray, n_perm: int, seed: int) -> tuple[float, bool]:
    """Two-sided sign-flip p of the mean of ``diffs`` (n,) -> (p, exact)."""
    n = diffs.size
    observed = abs(diffs.sum())
    tolerance = 1e-12 * np.abs(diffs).sum()  # sums in another order round differently
    if n <= SIGN_FLIP_EXACT_MAX_PAIRS:
        bits = (np.arange(2**n)[:, None] >> np.arange(n)) & 1  # (2**n, n)
        sums = (2.0 * bits - 1.0) @ diffs  # (2**n,)
        return float(np.mean(np.abs(sums) >= observed - tolerance)), True
    rng = np.random.default_rng(seed)
    extreme = 0
    for _, size in _chunks(n_perm):
        signs = rng.choice(np.array([-1.0, 1.0]), size=(size, n))  # (chunk, n)
        extreme += int((np.abs(signs @ diffs) >= observed - tolerance).sum())
    return (1 + extreme) / (1 + n_perm), False


def paired_contrast(
    recursive: ArrayLike,
    twin: ArrayLike,
    n_boot: int = 10_000,
    n_perm: int = 10_000,
    ci: float = 0.95,
    seed: int = 0,
) -> PairedContrast:
    """Paired contrast of per-prompt values (e.g. R_V) of recursive prompts and their twins.

    recursive, twin: (n,) with recursive[i] paired with twin[i]. Pairs with a non-finite value
    are dropped and counted. Reports the mean of each side, the mean paired difference with a
    bootstrap CI (pairs resampled with replacement), d_z with a bootstrap CI over the same
    resamples, the Wilcoxon signed-rank test (scipy defaults: zero differences dropped,
    exact p for small n without ties) and a two-sided sign-flip permutation p of the mean
    difference (exact enumeration when n <= 16, else ``n_perm`` random sign vectors).
    Fewer than 2 pairs, zero-variance or all-zero differences leave the fields they make
    undefined as NaN and say why in ``reason``.
    """
    _check_resampling(n_boot, n_perm, ci)
    rec, tw, keep = _paired_vectors(
        recursive,
        twin,
        ("recursive", "twin"),
        "recursive and twin values must be paired: got {} and {} values",
    )
    rec, tw, n_dropped = rec[keep], tw[keep], _n_dropped(keep)
    diffs = rec - tw  # (n,)
    n = int(diffs.size)
    nan = math.nan
    reasons: list[str] = []
    fields = dict(
        mean_diff_ci_low=nan,
        mean_diff_ci_high=nan,
        sd_diff=nan,
        d_z=nan,
        d_z_ci_low=nan,
        d_z_ci_high=nan,
        wilcoxon_statistic=nan,
        wilcoxon_p=nan,
        sign_flip_p=nan,
        sign_flip_exact=False,
    )
    if n == 0:
        reasons.append("no usable pairs (every pair has a non-finite value)")
    elif n == 1:
        reasons.append("only 1 usable pair: CIs, d_z and tests need at least 2")
    else:
        mean_ci = bootstrap_ci(diffs, np.mean, n_boot=n_boot, ci=ci, seed=seed)
        fields.update(mean_diff_ci_low=mean_ci.low, mean_diff_ci_high=mean_ci.high)
        fields["sd_diff"] = float(np.std(diffs, ddof=1))
        if fields["sd_diff"] > 0:
            dz_ci = bootstrap_ci(diffs, _d_z, n_boot=n_boot, ci=ci, seed=seed)
            fields.update(d_z=dz_ci.estimate, d_z_ci_low=dz_ci.low, d_z_ci_high=dz_ci.high)
        else:
            reasons.append("differences have zero variance: d_z is undefined")
        if np.all(diffs == 0):
            reasons.append("all differences are zero: the Wilcoxon test is undefined")
        else:
            wilcoxon = scipy.stats.wilcoxon(diffs)
            fields.update(
                wilcoxon_statistic=float(wilcoxon.statistic), wilcoxon_p=float(wilcoxon.pvalue)
            )
        p, exact = _sign_flip_p(diffs, n_perm, seed)
        fields.update(sign_flip_p=p, sign_flip_exact=exact)
    return PairedContrast(
        n_pairs=n,
        n_dropped=n_dropped,
        mean_recursive=float(rec.mean()) if n else nan,
        mean_twin=float(tw.mean()) if n else nan,
        mean_diff=float(diffs.mean()) if n else nan,
        reason=_join(reasons),
        ci=ci,
        n_boot=n_boot,
        n_perm=n_perm,
        seed=seed,
        **fields,
    )


# ------------------------------------------------------------------ target vs every control


def contrasts_against_groups(
    values_by_group: Mapping[str, Sequence[float] | np.ndarray],
    target: str,
    others: Sequence[str] | None = None,
    n_boot: int = 10_000,
    n_perm: int = 10_000,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """The target group against every other group, one row per other group.

    values_by_group: group name -> per-prompt values (n_group,). ``others`` defaults to every
    group except the target, in the mapping's order. Each row is
    :func:`rloop.metrics.stats.contrast` (target vs that group; non-finite values dropped and
    counted): n and NaN counts, means, diff = mean_target - mean_other, Hedges' g with its
    bootstrap CI, Welch p, Mann-Whitney p and permutation p, followed by Benjamini-Hochberg
    adjusted versions of the three p-value columns (``*_bh``), each adjusted over the rows.
    Every row uses the same seed.
    """
    if target not in values_by_group:
        raise ConfigError(
            f"target group {target!r} is not among the groups {list(values_by_group)}"
        )
    chosen = [name for name in values_by_group if name != target] if others is None else others
    chosen = list(chosen)
    missing = [name for name in chosen if name not in values_by_group]
    if missing:
        raise ConfigError(f"groups {missing} are not among the groups {list(values_by_group)}")
    if target in chosen:
        raise ConfigError(f"the target group {target!r} cannot also be a control group")
    if not chosen:
        raise ConfigError("contrasts_against_groups needs at least one other group")
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"control groups must be distinct, got {chosen}")
    rows = []
    for other in chosen:
        result = contrast(
            values_by_group[target],
            values_by_group[other],
            n_boot=n_boot,
            n_perm=n_perm,
            ci=ci,
            seed=seed,
        )
        rows.append(
            {
                "target": target,
                "other": other,
                "n_target": result.n_recursive,
                "n_other": result.n_baseline,
                "n_nan_target": result.n_nan_recursive,
                "n_nan_other": result.n_nan_baseline,
                "mean_target": result.mean_recursive,
                "mean_other": result.mean_baseline,
                "diff": result.diff,
                "hedges_g": result.hedges_g,
                "hedges_g_ci_low": result.hedges_g_ci_low,
                "hedges_g_ci_high": result.hedges_g_ci_high,
                "welch_p": result.welch_p,
                "mann_whitney_p": result.mann_whitney_p,
                "permutation_p": result.permutation_p,
            }
        )
    table = pd.DataFrame(rows)
    for column in ("welch_p", "mann_whitney_p", "permutation_p"):
        table[f"{column}_bh"] = benjamini_hochberg(table[column].to_numpy(dtype=np.float64))
    return table


# ----------------------------------------------------------------------------- trend test


@dataclass(frozen=True)
class TrendTest(AsDictMixin):
    """A monotone trend of values over ordered levels.

    Spearman's rho of (level, value) with scipy's p and a bootstrap CI over rows; the
    Jonckheere-Terpstra statistic J (pairs from a lower and a higher level where the higher
    level's value is larger, ties counting 1/2), its null mean and tie-corrected variance,
    z, and p by ``jt_method``. ``direction`` is "increasing", "decreasing" or "none" from the
    sign of J - E[J].
    """

    n: int
    n_dropped: int
    n_levels: int
    spearman_rho: float
    spearman_p: float
    spearman_ci_low: float
    spearman_ci_high: float
    jt_statistic: float
    jt_expected: float
    jt_variance: float
    jt_z: float
    jt_p: float
    jt_method: str
    direction: str
    alternative: str
    reason: str | None
    ci: float
    n_boot: int
    n_perm: int
    seed: int


def _jt_pair_scores(values: np.ndarray) -> np.ndarray:
    """scores[a, b] = 1 if values[b] > values[a], 1/2 if equal (a != b), else 0 -> (n, n)."""
    greater = (values[None, :] > values[:, None]).astype(np.float64)  # (n, n)
    equal = values[None, :] == values[:, None]  # (n, n)
    np.fill_diagonal(equal, False)
    return greater + 0.5 * equal


def _jt_statistics(scores: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """J for each row of level codes (k, n) -> (k,): sum of scores[a, b] over c_b > c_a."""
    out = np.empty(codes.shape[0], dtype=np.float64)
    rows_per_block = max(1, 4_000_000 // max(1, codes.shape[1] ** 2))
    for start in range(0, codes.shape[0], rows_per_block):
        block = codes[start : start + rows_per_block]  # (k, n)
        higher = block[:, None, :] > block[:, :, None]  # (k, n, n): c_b > c_a
        out[start : start + rows_per_block] = (higher * scores).sum(axis=(1, 2))
    return out


def _jt_null_moments(group_sizes: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """Null mean and tie-corrected variance of J (Hollander & Wolfe, Nonparametric
    Statistical Methods, the Jonckheere-Terpstra variance with ties)."""
    n = float(values.size)
    sizes = group_sizes.astype(np.float64)
    ties = np.unique(values, return_counts=True)[1].astype(np.float64)
    mean = (n**2 - np.sum(sizes**2)) / 4.0
    variance = (
        n * (n - 1) * (2 * n + 5)
        - np.sum(sizes * (sizes - 1) * (2 * sizes + 5))
        - np.sum(ties * (ties - 1) * (2 * ties + 5))
    ) / 72.0
    variance += (
        np.sum(sizes * (sizes - 1) * (sizes - 2)) * np.sum(ties * (ties - 1) * (ties - 2))
    ) / (36.0 * n * (n - 1) * (n - 2))
    variance += (np.sum(sizes * (sizes - 1)) * np.sum(ties * (ties - 1))) / (8.0 * n * (n - 1))
    return float(mean), float(variance)


def _distinct_arrangements(group_sizes: Sequence[int]) -> np.ndarray:
    """Every distinct assignment of level codes 0..k-1 (code c used group_sizes[c] times) to
    n positions -> (multinomial count, n) int."""
    n = int(sum(group_sizes))
    arrangements = np.full((1, n), -1, dtype=np.int64)  # (R, n), -1 = not yet assigned
    for code, size in enumerate(group_sizes[:-1]):
        free_count = n - int((arrangements[0] >= 0).sum())
        free = np.nonzero(arrangements < 0)[1].reshape(arrangements.shape[0], free_count)
        combos = np.array(list(itertools.combinations(range(free_count), size)), dtype=np.int64)
        combos = combos.reshape(len(combos), size)  # (C, size)
        chosen = free[:, combos].reshape(-1, size)  # (R*C, size)
        arrangements = np.repeat(arrangements, len(combos), axis=0)  # (R*C, n)
        np.put_along_axis(arrangements, chosen, code, axis=1)
    arrangements[arrangements < 0] = len(group_sizes) - 1
    return arrangements


def _multinomial_count(group_sizes: Sequence[int]) -> int:
    remaining, count = int(sum(group_sizes)), 1
    for size in group_sizes:
        count *= math.comb(remaining, int(size))
        remaining -= int(size)
    return count


def _tail_p(null: np.ndarray, observed: float, center: float, alternative: str) -> np.ndarray:
    """Which null statistics are at least as extreme as ``observed`` -> bool (k,)."""
    tolerance = 1e-9 * max(1.0, abs(observed))
    if alternative == "increasing":
        return null >= observed - tolerance
    if alternative == "decreasing":
        return null <= observed + tolerance
    return np.abs(null - center) >= abs(observed - center) - tolerance


@dataclass(frozen=True)
class _ObservedJT:
    """The observed Jonckheere-Terpstra statistic and what its null distributions need."""

    scores: np.ndarray  # (n, n) pair scores of the values
    codes: np.ndarray  # (n,) level code of every row
    group_sizes: np.ndarray  # (n_levels,) rows per level
    statistic: float
    expected: float  # null mean of J


def _jt_normal_p(z: float, alternative: str) -> float:
    """p of the standardised J statistic ``z`` from the normal approximation."""
    if alternative == "increasing":
        return float(scipy.stats.norm.sf(z))
    if alternative == "decreasing":
        return float(scipy.stats.norm.cdf(z))
    return float(2 * scipy.stats.norm.sf(abs(z)))


def _jt_exact_p(observed: _ObservedJT, alternative: str) -> float:
    """p of J over every distinct assignment of the values to the level groups."""
    count = _multinomial_count(observed.group_sizes.tolist())
    if count > JT_EXACT_MAX_ARRANGEMENTS:
        raise ConfigError(
            f"exact trend test would enumerate {count} assignments (limit "
            f"{JT_EXACT_MAX_ARRANGEMENTS}): use method='permutation' or 'normal'"
        )
    arrangements = _distinct_arrangements(observed.group_sizes.tolist())
    null = _jt_statistics(observed.scores, arrangements)
    return float(_tail_p(null, observed.statistic, observed.expected, alternative).mean())


def _jt_permutation_p(observed: _ObservedJT, alternative: str, n_perm: int, seed: int) -> float:
    """p of J over ``n_perm`` random shuffles of the level codes: (1 + extreme) / (1 + n_perm)."""
    rng = np.random.default_rng(seed)
    extreme = 0
    for _, size in _chunks(n_perm):
        shuffled = rng.permuted(np.tile(observed.codes, (size, 1)), axis=1)  # (chunk, n)
        null = _jt_statistics(observed.scores, shuffled)
        extreme += int(_tail_p(null, observed.statistic, observed.expected, alternative).sum())
    return (1 + extreme) / (1 + n_perm)


def trend_test(
    values: ArrayLike,
    levels: ArrayLike,
    method: str = "normal",
    alternative: str = "two-sided",
    n_boot: int = 10_000,
    n_perm: int = 10_000,
    ci: float = 0.95,
    seed: int = 0,
) -> TrendTest:
    """Monotone trend of values (n,) over ordered numeric levels (n,), e.g. recursion depth.

    Rows with a non-finite value or level are dropped and counted. Spearman's rho (levels vs
    values) comes from :func:`rloop.metrics.stats.correlation_with_ci`. The
    Jonckheere-Terpstra test orders the groups by level; its p is from the normal
    approximation with the tie-corrected variance (``method="normal"``), from every distinct
    assignment of the values to the level groups (``"exact"``, up to 200,000 assignments), or
    from ``n_perm`` random assignments (``"permutation"``); the last two cost O(n^2) per
    assignment, so they are meant for small n. ``alternative`` is "two-sided",
    "increasing" (values grow with level) or "decreasing".
    """
    check_choice(method, JT_METHODS, "trend-test method")
    check_choice(alternative, ALTERNATIVES, "alternative")
    _check_resampling(n_boot, n_perm, ci)
    y, x, keep = _paired_vectors(
        values, levels, ("values", "levels"), "values and levels must be paired: got {} and {}"
    )
    y, x, n_dropped = y[keep], x[keep], _n_dropped(keep)
    distinct_levels, codes = np.unique(x, return_inverse=True)
    if y.size < 3 or distinct_levels.size < 2:
        raise ConfigError(
            f"trend_test needs at least 3 finite rows over at least 2 distinct levels, got "
            f"{y.size} rows and {distinct_levels.size} levels"
        )
    spearman = correlation_with_ci(x, y, method="spearman", n_boot=n_boot, ci=ci, seed=seed)
    group_sizes = np.bincount(codes)
    scores = _jt_pair_scores(y)  # (n, n)
    statistic = float(_jt_statistics(scores, codes[None, :])[0])
    expected, variance = _jt_null_moments(group_sizes, y)
    observed = _ObservedJT(scores, codes, group_sizes, statistic, expected)
    reasons: list[str] = []
    z = (statistic - expected) / math.sqrt(variance) if variance > 0 else math.nan
    if variance <= 0:
        reasons.append("all values are tied: the Jonckheere-Terpstra test is undefined")
        p = math.nan
    elif method == "normal":
        p = _jt_normal_p(z, alternative)
    elif method == "exact":
        p = _jt_exact_p(observed, alternative)
    else:
        p = _jt_permutation_p(observed, alternative, n_perm, seed)
    direction = (
        "increasing" if statistic > expected else "decreasing" if statistic < expected else "none"
    )
    return TrendTest(
        n=int(y.size), n_dropped=n_dropped, n_levels=int(distinct_levels.size),
        spearman_rho=spearman.r, spearman_p=spearman.p,
        spearman_ci_low=spearman.ci_low, spearman_ci_high=spearman.ci_high,
        jt_statistic=statistic, jt_expected=expected, jt_variance=variance, jt_z=z, jt_p=p,
        jt_method=method, direction=direction, alternative=alternative, reason=_join(reasons),
        ci=ci, n_boot=n_boot, n_perm=n_perm, seed=seed,
    )  # fmt: skip


# ---------------------------------------------------------------------- clustered rows


def _cluster_codes(clusters, n: int) -> np.ndarray:
    """Cluster labels (n,) of any hashable kind -> integer codes 0..K-1 in order of
    appearance."""
    if isinstance(clusters, pd.Series | pd.Index):
        labels = clusters.to_numpy(dtype=object)
    else:
        labels = np.asarray(clusters, dtype=object).reshape(-1)
    if labels.size != n:
        raise ConfigError(f"clusters must label every row: got {labels.size} labels for {n} rows")
    codes, _ = pd.factorize(labels, sort=False)
    if (codes < 0).any():
        raise ConfigError("cluster labels must not be missing (None/NaN): label every row")
    return codes.astype(np.int64)


def _weighted_pearson(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Pearson r of x, y (k, n) or (1, n) with row weights (k, n) -> (k,); NaN where x or y
    has no spread (relative to its magnitude) in a row."""
    total = weights.sum(axis=1, keepdims=True)  # (k, 1)
    mean_x = (weights * x).sum(axis=1, keepdims=True) / total  # (k, 1)
    mean_y = (weights * y).sum(axis=1, keepdims=True) / total  # (k, 1)
    dx, dy = x - mean_x, y - mean_y  # (k, n)
    sxy = (weights * dx * dy).sum(axis=1)  # (k,)
    sxx = (weights * dx * dx).sum(axis=1)  # (k,)
    syy = (weights * dy * dy).sum(axis=1)  # (k,)
    # A constant row leaves only rounding error in sxx: compare with the raw second moment.
    spread_x = sxx > 1e-20 * (weights * x * x).sum(axis=1)  # (k,)
    spread_y = syy > 1e-20 * (weights * y * y).sum(axis=1)  # (k,)
    defined = spread_x & spread_y & (sxx > 0) & (syy > 0)  # (k,)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = sxy / np.sqrt(np.where(defined, sxx * syy, 1.0))  # (k,)
    return np.where(defined, np.clip(r, -1.0, 1.0), np.nan)


def _weighted_midranks(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Midranks of ``values`` (n,) in the data set where row i appears weights[k, i] times
    -> (k, n): the ranks rankdata would give the expanded resample, row by row."""
    order = np.argsort(values, kind="stable")  # (n,)
    sorted_values = values[order]  # (n,)
    starts_mask = np.r_[True, sorted_values[1:] != sorted_values[:-1]]  # (n,)
    starts = np.flatnonzero(starts_mask)  # (G,)
    tie_group = np.cumsum(starts_mask) - 1  # (n,) in sorted order
    group_weight = np.add.reduceat(weights[:, order], starts, axis=1)  # (k, G)
    before = np.cumsum(group_weight, axis=1) - group_weight  # (k, G)
    group_rank = before + (group_weight + 1.0) / 2.0  # (k, G)
    ranks = np.empty_like(weights, dtype=np.float64)  # (k, n)
    ranks[:, order] = group_rank[:, tie_group]
    return ranks


def _weighted_correlation(
    x: np.ndarray, y: np.ndarray, weights: np.ndarray, method: str
) -> np.ndarray:
    """Correlation of the resamples given by integer row weights (k, n) -> (k,)."""
    if method == "spearman":
        return _weighted_pearson(
            _weighted_midranks(x, weights), _weighted_midranks(y, weights), weights
        )
    return _weighted_pearson(x[None, :], y[None, :], weights)


def _row_correlations(x: np.ndarray, y: np.ndarray, method: str) -> np.ndarray:
    """Correlation of each row pair x, y (k, n) -> (k,)."""
    if method == "spearman":
        x = scipy.stats.rankdata(x, axis=1)
        y = scipy.stats.rankdata(y, axis=1)
    return _weighted_pearson(x, y, np.ones_like(x))


@dataclass(frozen=True)
class ClusterCorrelation(AsDictMixin):
    """A correlation over all rows whose CI and p respect clusters of dependent rows.

    ``r`` is the ordinary correlation over all usable rows; ``naive_p`` is scipy's p that
    treats rows as independent (shown for comparison, not for inference). ``ci_low/high``
    come from a cluster bootstrap, ``p`` from the cluster permutation named by ``null``
    ("cluster-x" or "blocks", see :func:`cluster_correlation`). ``n_exchangeable_clusters``
    counts clusters the permutation could move.
    """

    r: float
    p: float
    ci_low: float
    ci_high: float
    naive_p: float
    n: int
    n_dropped: int
    n_clusters: int
    n_exchangeable_clusters: int
    method: str
    null: str
    reason: str | None
    ci: float
    n_boot: int
    n_perm: int
    seed: int


def _cluster_bootstrap_weights(
    codes: np.ndarray, n_clusters: int, size: int, rng: np.random.Generator
) -> np.ndarray:
    """Row weights (size, n) of ``size`` cluster bootstrap resamples: each resample draws
    n_clusters clusters with replacement and keeps every row of each draw."""
    counts = rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters), size=size)
    return counts[:, codes].astype(np.float64)  # (size, n)


def _block_permutation_index(
    codes: np.ndarray, n_clusters: int, size: int, rng: np.random.Generator
) -> np.ndarray:
    """Row index arrays (size, n) that swap whole clusters' rows (kept in order) among
    clusters of equal size."""
    n = codes.size
    index = np.tile(np.arange(n), (size, 1))  # (size, n)
    rows_of = [np.flatnonzero(codes == c) for c in range(n_clusters)]
    by_size: dict[int, list[int]] = {}
    for cluster, rows in enumerate(rows_of):
        by_size.setdefault(rows.size, []).append(cluster)
    for members in by_size.values():
        if len(members) < 2:
            continue
        block = np.stack([rows_of[c] for c in members])  # (k_s, m)
        order = rng.permuted(np.tile(np.arange(len(members)), (size, 1)), axis=1)  # (size, k_s)
        source = block[order].reshape(size, -1)  # (size, k_s * m)
        index[:, block.reshape(-1)] = source
    return index


def _renumbered(codes: np.ndarray) -> tuple[np.ndarray, int]:
    """Cluster codes (n,) renumbered 0..K-1 in order of appearance, and K (0 for no rows)."""
    codes = pd.factorize(codes, sort=False)[0].astype(np.int64)
    return codes, int(codes.max()) + 1 if codes.size else 0


def _cluster_null(null: str, x: np.ndarray, codes: np.ndarray, n_clusters: int) -> tuple[str, int]:
    """(the null used, the number of clusters it can move) for ``null`` ("auto", "cluster-x"
    or "blocks"); ConfigError for "cluster-x" when x varies within a cluster."""
    cluster_x_constant = bool(
        codes.size and all(np.ptp(x[codes == c]) == 0 for c in range(n_clusters))
    )
    chosen_null = (
        (NULL_CLUSTER_X if cluster_x_constant else NULL_BLOCKS) if null == "auto" else null
    )
    if chosen_null == NULL_CLUSTER_X and codes.size and not cluster_x_constant:
        raise ConfigError(
            "null='cluster-x' needs x constant within every cluster: use null='blocks' for "
            "row-level x"
        )
    if chosen_null == NULL_CLUSTER_X:
        return chosen_null, n_clusters
    sizes = np.bincount(codes, minlength=n_clusters) if codes.size else np.zeros(0, int)
    if chosen_null == NULL_WITHIN:  # clusters of two or more rows can be shuffled inside
        return chosen_null, int((sizes >= 2).sum())
    size_counts = np.bincount(sizes) if sizes.size else np.zeros(0, int)
    return chosen_null, int(sum(count for count in size_counts if count >= 2))


@dataclass(frozen=True)
class _ClusteredRows:
    """Usable rows of a clustered correlation: x, y (n,) and cluster codes (n,) 0..K-1."""

    x: np.ndarray
    y: np.ndarray
    codes: np.ndarray
    n_clusters: int


def _cluster_bootstrap_interval(
    rows: _ClusteredRows, method: str, n_boot: int, ci: float, rng: np.random.Generator
) -> tuple[float, float]:
    """Percentile CI of the correlation over ``n_boot`` cluster bootstrap resamples."""
    estimates = np.empty(n_boot, dtype=np.float64)
    for start, size in _chunks(n_boot):
        weights = _cluster_bootstrap_weights(rows.codes, rows.n_clusters, size, rng)  # (chunk, n)
        estimates[start : start + size] = _weighted_correlation(rows.x, rows.y, weights, method)
    return percentile_interval(estimates, ci)


def _within_permutation_index(codes: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, n) row indices: each row a random permutation of the rows inside every cluster
    (rows never leave their cluster)."""
    n = codes.size
    keys = rng.random((size, n))  # (size, n)
    order = np.lexsort((keys, np.broadcast_to(codes, (size, n))), axis=-1)  # (size, n)
    index = np.empty_like(order)
    index[:, np.argsort(codes, kind="stable")] = order  # position j of cluster c gets a row of c
    return index


def _cluster_permutation_p(
    rows: _ClusteredRows,
    r: float,
    method: str,
    null: str,
    n_perm: int,
    rng: np.random.Generator,
) -> float:
    """Two-sided p of the correlation ``r`` under ``n_perm`` draws of the cluster permutation
    ``null`` ("cluster-x" or "blocks"): (1 + #{|r_null| >= |r|}) / (1 + n_perm)."""
    x, y, codes, n_clusters = rows.x, rows.y, rows.codes, rows.n_clusters
    cluster_x = np.zeros(n_clusters)
    np.add.at(cluster_x, codes, x)
    cluster_x /= np.bincount(codes, minlength=n_clusters)
    tolerance = 1e-12
    extreme = 0
    for _, size in _chunks(n_perm):
        if null == NULL_CLUSTER_X:
            order = rng.permuted(np.tile(np.arange(n_clusters), (size, 1)), axis=1)  # (chunk, K)
            x_null = cluster_x[order][:, codes]  # (chunk, n)
            y_null = np.broadcast_to(y, x_null.shape)  # (chunk, n)
        elif null == NULL_WITHIN:
            x_null = x[_within_permutation_index(codes, size, rng)]  # (chunk, n)
            y_null = np.broadcast_to(y, x_null.shape)  # (chunk, n)
        else:
            y_null = y[_block_permutation_index(codes, n_clusters, size, rng)]  # (chunk, n)
            x_null = np.broadcast_to(x, y_null.shape)  # (chunk, n)
        null_r = _row_correlations(x_null, y_null, method)  # (chunk,)
        extreme += int((np.abs(null_r) >= abs(r) - tolerance).sum())
    return (1 + extreme) / (1 + n_perm)


def cluster_correlation(
    x: ArrayLike,
    y: ArrayLike,
    clusters: ArrayLike,
    method: str = "pearson",
    null: str = "auto",
    n_boot: int = 2_000,
    n_perm: int = 2_000,
    ci: float = 0.95,
    seed: int = 0,
) -> ClusterCorrelation:
    """Correlation of x and y (n,) over all rows, with inference that respects clusters.

    Rows in one cluster (tokens of one generation, prompts from one template) are dependent,
    so scipy's p for n independent rows rejects far too often. Here:

    - CI: cluster bootstrap. Draw as many clusters as there are, with replacement, keep all
      rows of every drawn cluster, recompute the correlation (Spearman re-ranks the resample,
      ties from repeated clusters getting midranks); percentile interval.
    - p: a cluster permutation test of "x and y are unrelated", with clusters independent of
      each other and exchangeable. Two nulls (``null``):

      * "cluster-x" — x is a cluster-level treatment (constant within each cluster, e.g.
        alpha per generation). The cluster x values are permuted among clusters while every
        cluster keeps its own y rows. Valid for any cluster sizes: under the null the
        treatment is unrelated to the y-blocks, so every reassignment is equally likely.
      * "blocks" — x varies within clusters. The y-blocks (each cluster's y rows, in their
        row order) are shuffled among clusters of equal size, and row i of a block is paired
        with row i of its new cluster's x-block. Under the null the x-block and the y-block
        of a cluster are independent and blocks of equal size are exchangeable, so the
        shuffle leaves the joint distribution unchanged. Clusters whose size no other cluster
        shares cannot move (they are counted out of ``n_exchangeable_clusters``). Because the
        within-block row order is kept, a trend over row position shared by every cluster is
        part of the null, not evidence against it.

      * "within" — x is assigned within clusters (e.g. the alpha grid applied to every pair
        of a dose-response: each cluster holds every x level). x is permuted among the rows
        of each cluster, clusters kept apart. Under the null (y does not depend on x once
        the cluster is fixed) the rows of a cluster are exchangeable over x. With the same
        x levels in every cluster this is the only one of the three nulls that can move: a
        block shuffle would pair every y-block with the same x-block.

      "auto" picks "cluster-x" when x is constant within every cluster, else "blocks".
      p = (1 + #{|r_null| >= |r|}) / (1 + n_perm), two-sided.

    Rows with a non-finite x or y are dropped and counted. ``method`` is "pearson" or
    "spearman". The correlation is NaN with a reason when fewer than 3 rows remain or a
    variable is constant; p is NaN with a reason when fewer than 2 clusters can be permuted.
    """
    check_choice(method, CORRELATION_METHODS, "correlation")
    check_choice(null, CLUSTER_NULLS, "cluster null")
    _check_resampling(n_boot, n_perm, ci)
    x, y, keep = _paired_vectors(x, y, ("x", "y"), "x and y must be paired: got {} and {} values")
    if x.size < 3:
        raise ConfigError(f"cluster_correlation needs at least 3 rows, got {x.size}")
    codes = _cluster_codes(clusters, x.size)
    x, y, codes, n_dropped = x[keep], y[keep], codes[keep], _n_dropped(keep)
    codes, n_clusters = _renumbered(codes)  # renumber surviving clusters
    chosen_null, exchangeable = _cluster_null(null, x, codes, n_clusters)
    nan = math.nan

    def result(r, p, low, high, naive_p, reason):
        return ClusterCorrelation(
            r, p, low, high, naive_p, int(x.size), n_dropped, n_clusters, exchangeable,
            method, chosen_null, reason, ci, n_boot, n_perm, seed,
        )  # fmt: skip

    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        why = "fewer than 3 usable rows" if x.size < 3 else "x or y is constant"
        return result(nan, nan, nan, nan, nan, f"{why}: the correlation is undefined")
    test = scipy.stats.pearsonr if method == "pearson" else scipy.stats.spearmanr
    naive = test(x, y)
    r, naive_p = float(naive.statistic), float(naive.pvalue)
    reasons: list[str] = []
    rng = np.random.default_rng(seed)
    if n_clusters < 2:
        reasons.append("only 1 cluster: no cluster bootstrap or permutation is possible")
        return result(r, nan, nan, nan, naive_p, _join(reasons))
    rows = _ClusteredRows(x, y, codes, n_clusters)
    low, high = _cluster_bootstrap_interval(rows, method, n_boot, ci, rng)
    if exchangeable < 2:
        reasons.append("no two clusters have the same size: the block permutation is impossible")
        return result(r, nan, low, high, naive_p, _join(reasons))
    p = _cluster_permutation_p(rows, r, method, chosen_null, n_perm, rng)
    return result(r, p, low, high, naive_p, _join(reasons))


@dataclass(frozen=True)
class ClusterBootstrapCI(AsDictMixin):
    """Mean over all rows with a cluster bootstrap CI (percentile). Unpacks as
    ``low, high``."""

    estimate: float
    low: float
    high: float
    n: int
    n_dropped: int
    n_clusters: int
    reason: str | None
    ci: float
    n_boot: int
    seed: int

    def __iter__(self):
        return iter((self.low, self.high))


def cluster_bootstrap_mean(
    values: ArrayLike,
    clusters: ArrayLike,
    n_boot: int = 10_000,
    ci: float = 0.95,
    seed: int = 0,
) -> ClusterBootstrapCI:
    """Mean of values (n,) over all rows, with a CI from resampling clusters (n,) labels.

    Each resample draws as many clusters as there are, with replacement, and keeps every row
    of each drawn cluster; the statistic is the row mean of the resample (clusters weigh by
    their size), e.g. per-prompt transfer % clustered by source prompt. Non-finite values
    are dropped and counted. The CI is NaN with a reason when fewer than 2 clusters remain.
    """
    check_positive_int(n_boot, "n_boot")
    check_ci(ci)
    v = _vector(values, "values")
    if v.size < 1:
        raise ConfigError("cluster_bootstrap_mean needs at least one value")
    codes = _cluster_codes(clusters, v.size)
    keep = np.isfinite(v)
    v, codes, n_dropped = v[keep], codes[keep], _n_dropped(keep)
    if v.size == 0:
        return ClusterBootstrapCI(
            math.nan, math.nan, math.nan, 0, n_dropped, 0, "no finite values", ci, n_boot, seed
        )
    codes, n_clusters = _renumbered(codes)
    estimate = float(v.mean())
    if n_clusters < 2:
        reason = "only 1 cluster: the cluster bootstrap CI is undefined"
        return ClusterBootstrapCI(
            estimate, math.nan, math.nan, int(v.size), n_dropped, 1, reason, ci, n_boot, seed
        )
    sums = np.bincount(codes, weights=v, minlength=n_clusters)  # (K,)
    sizes = np.bincount(codes, minlength=n_clusters).astype(np.float64)  # (K,)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters), size=n_boot)
    estimates = (counts @ sums) / (counts @ sizes)  # (n_boot,)
    low, high = percentile_interval(estimates, ci)
    return ClusterBootstrapCI(
        estimate, low, high, int(v.size), n_dropped, n_clusters, None, ci, n_boot, seed
    )


# ------------------------------------------------------- max-statistic (selection-adjusted) test

MAX_STATISTICS_TWO_GROUP = ("hedges_g", "mean_diff")
MAX_STATISTICS_PAIRED = ("d_z", "mean_diff")
MAX_SELECTIONS = ("min", "max", "max_abs")


@dataclass(frozen=True)
class MaxStatisticTest(AsDictMixin):
    """A statistic chosen as the most extreme of several columns, and its selection-adjusted p.

    ``observed`` holds the statistic of every column (NaN where undefined);
    ``selected_column`` is the column the selection rule picks (-1 if none is defined) and
    ``selected_value`` its statistic. ``adjusted_p`` is the share of relabelled data sets
    whose *selected* statistic (the same rule applied over all columns) is at least as
    extreme, with the +1 correction; ``column_p`` is each column's own permutation p from the
    same draws and in the same direction (the naive p of the selected column is
    ``column_p[selected_column]``). ``n_perm_defined`` draws had a defined selected statistic.
    """

    statistic: str
    select: str
    design: str  # "two-group" (labels permuted) | "paired" (signs of the rows flipped)
    n_rows: int
    n_columns: int
    observed: tuple[float, ...]
    selected_column: int
    selected_value: float
    adjusted_p: float
    column_p: tuple[float, ...]
    n_perm: int
    n_perm_defined: int
    seed: int
    reason: str | None


def _hedges_factor(df: np.ndarray) -> np.ndarray:
    """Exact Hedges J(df) elementwise (as :func:`rloop.metrics.stats.hedges_correction`)."""
    safe = np.where(df >= 2, df, 2.0)
    factor = np.exp(gammaln(safe / 2) - gammaln((safe - 1) / 2)) / np.sqrt(safe / 2)
    return np.where(df >= 2, factor, np.nan)


def _two_group_columns(
    weights: np.ndarray, centred: np.ndarray, finite: np.ndarray, statistic: str
) -> np.ndarray:
    """The statistic of group 1 (weight 1) vs group 0 per draw and column.

    weights: (B, n) 0/1 group-1 indicators; centred: (n, m) values minus their column mean,
    0 where not finite; finite: (n, m) 0/1 mask. Returns (B, m), NaN where undefined."""
    n1 = weights @ finite  # (B, m)
    n2 = finite.sum(axis=0) - n1
    s1 = weights @ centred
    s2 = centred.sum(axis=0) - s1
    q1 = weights @ (centred**2)
    q2 = (centred**2).sum(axis=0) - q1
    with np.errstate(divide="ignore", invalid="ignore"):
        diff = s1 / n1 - s2 / n2
        if statistic == "mean_diff":
            return np.where((n1 >= 1) & (n2 >= 1), diff, np.nan)
        squares = np.maximum(q1 - s1**2 / n1, 0.0) + np.maximum(q2 - s2**2 / n2, 0.0)
        pooled = np.sqrt(squares / (n1 + n2 - 2))
        scale = np.abs(centred).max(axis=0)  # (m,): a pooled sd below rounding is zero
        defined = (n1 >= 2) & (n2 >= 2) & (pooled > 1e-12 * np.where(scale > 0, scale, 1.0))
        g = diff / np.where(defined, pooled, 1.0) * _hedges_factor(n1 + n2 - 2)
    return np.where(defined, g, np.nan)


def _paired_columns(
    signs: np.ndarray, diffs: np.ndarray, finite: np.ndarray, statistic: str
) -> np.ndarray:
    """The paired statistic per draw and column: signs (B, n) of +-1, diffs (n, m) with 0
    where not finite, finite (n, m) 0/1. Returns (B, m), NaN where undefined."""
    count = finite.sum(axis=0)  # (m,)
    total = signs @ diffs  # (B, m)
    squares = (diffs**2).sum(axis=0)  # (m,): unchanged by sign flips
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = total / count
        if statistic == "mean_diff":
            return np.where(count >= 1, mean, np.nan)
        sd = np.sqrt(np.maximum(squares - total**2 / count, 0.0) / (count - 1))
        scale = np.abs(diffs).max(axis=0)
        defined = (count >= 2) & (sd > 1e-12 * np.where(scale > 0, scale, 1.0))
        d_z = mean / np.where(defined, sd, 1.0)
    return np.where(defined, d_z, np.nan)


def _selected(stats: np.ndarray, select: str) -> np.ndarray:
    """The selection rule over the columns of stats (B, m) -> (B,), oriented as
    :func:`_direction` (larger is more extreme); NaN where no column is defined."""
    keyed = _direction(stats, select)
    defined = np.isfinite(keyed).any(axis=1)
    best = np.max(np.where(np.isfinite(keyed), keyed, -np.inf), axis=1)
    return np.where(defined, best, np.nan)


def _direction(stats: np.ndarray, select: str) -> np.ndarray:
    """Column statistics oriented so that larger is more extreme under ``select``."""
    return -stats if select == "min" else (stats if select == "max" else np.abs(stats))


def max_statistic_permutation(
    values: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    statistic: str = "hedges_g",
    select: str = "min",
    n_perm: int = 10_000,
    seed: int = 0,
) -> MaxStatisticTest:
    """Selection-adjusted permutation test of the most extreme of several columns.

    values: (n, m), one row per unit (prompt, or pair) and one column per candidate analysis
    (e.g. the late layer of R_V) that all share the rows. Two-group design (``labels`` given,
    (n,) booleans, True = the first group): the statistic of every column is group True vs
    group False ("hedges_g": Hedges' g with the exact small-sample factor, as
    :func:`rloop.metrics.stats.hedges_g`; "mean_diff"). Paired design (``labels`` None): the
    rows are paired differences and the statistic is "d_z" (mean / sd, ddof=1) or
    "mean_diff". Non-finite values are left out of their column only.

    The selection rule ``select`` ("min": the most negative column, "max", "max_abs") picks
    one column. Each of ``n_perm`` seeded draws permutes the labels over the rows (two-group)
    or flips the sign of each row (paired) — the same draw for every column, so the columns'
    dependence is kept — recomputes every column and applies the same rule. The adjusted p
    is (1 + #{draws whose selected statistic is at least as extreme as the observed selected
    statistic}) / (1 + #draws with a defined selected statistic): the p of "the best of m"
    (Westfall & Young's max-T), valid however the columns are correlated. With no column
    defined everything is NaN and ``reason`` says why.
    """
    check_positive_int(n_perm, "n_perm")
    check_choice(select, MAX_SELECTIONS, "selection rule")
    matrix = np.asarray(values, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] < 1 or matrix.shape[1] < 1:
        raise ConfigError(f"values must be a non-empty (rows, columns) matrix, got {matrix.shape}")
    finite = np.isfinite(matrix).astype(np.float64)  # (n, m)
    n, m = matrix.shape
    rng = np.random.default_rng(seed)
    if labels is None:
        design = "paired"
        check_choice(statistic, MAX_STATISTICS_PAIRED, "paired statistic")
        diffs = np.where(finite > 0, matrix, 0.0)

        def columns(signs: np.ndarray) -> np.ndarray:
            return _paired_columns(signs, diffs, finite, statistic)

        observed_draw = np.ones((1, n))

        def draws(size: int) -> np.ndarray:
            return rng.choice(np.array([-1.0, 1.0]), size=(size, n))  # (size, n)

    else:
        design = "two-group"
        check_choice(statistic, MAX_STATISTICS_TWO_GROUP, "two-group statistic")
        group = np.asarray(labels)
        if group.shape != (n,) or group.dtype != bool:
            raise ConfigError(f"labels must be ({n},) booleans, got {group.dtype} {group.shape}")
        kept = np.where(finite > 0, matrix, 0.0)
        column_mean = kept.sum(axis=0) / np.maximum(finite.sum(axis=0), 1.0)  # (m,)
        centred = np.where(finite > 0, matrix - column_mean, 0.0)

        def columns(weights: np.ndarray) -> np.ndarray:
            return _two_group_columns(weights, centred, finite, statistic)

        observed_draw = group[None, :].astype(np.float64)

        def draws(size: int) -> np.ndarray:
            return rng.permuted(np.tile(observed_draw, (size, 1)), axis=1)  # (size, n)

    observed = columns(observed_draw)[0]  # (m,)
    return _max_statistic_result(
        observed, columns, draws, statistic, select, design, n, n_perm, seed
    )


def _max_statistic_result(
    observed: np.ndarray,
    columns: Callable[[np.ndarray], np.ndarray],
    draws: Callable[[int], np.ndarray],
    statistic: str,
    select: str,
    design: str,
    n: int,
    n_perm: int,
    seed: int,
) -> MaxStatisticTest:
    """Run the draws of :func:`max_statistic_permutation` and count the extreme ones."""
    m = observed.size
    head = dict(statistic=statistic, select=select, design=design, n_rows=n, n_columns=m)
    if not np.isfinite(observed).any():
        nan_columns = (math.nan,) * m
        return MaxStatisticTest(
            **head, observed=tuple(float(v) for v in observed), selected_column=-1,
            selected_value=math.nan, adjusted_p=math.nan, column_p=nan_columns,
            n_perm=n_perm, n_perm_defined=0, seed=seed,
            reason="no column has a defined statistic (too few finite rows or no spread)",
        )  # fmt: skip
    oriented = _direction(observed, select)  # (m,)
    column = int(np.nanargmax(oriented))
    best = float(oriented[column])
    tolerance = 1e-10 * max(1.0, abs(best))  # the same arrangement recomputed rounds alike
    extreme, defined = 0, 0
    column_extreme = np.zeros(m)
    column_defined = np.zeros(m)
    column_tolerance = 1e-10 * np.maximum(1.0, np.abs(oriented))  # (m,)
    for _, size in _chunks(n_perm):
        stats = columns(draws(size))  # (size, m)
        selected = _selected(stats, select)  # (size,)
        defined += int(np.isfinite(selected).sum())
        extreme += int((selected >= best - tolerance).sum())
        per_column = _direction(stats, select)
        column_defined += np.isfinite(per_column).sum(axis=0)
        column_extreme += (per_column >= oriented - column_tolerance).sum(axis=0)
    with np.errstate(invalid="ignore"):
        column_p = np.where(
            np.isfinite(oriented), (1 + column_extreme) / (1 + column_defined), np.nan
        )
    return MaxStatisticTest(
        **head,
        observed=tuple(float(v) for v in observed),
        selected_column=column,
        selected_value=float(observed[column]),
        adjusted_p=(1 + extreme) / (1 + defined),
        column_p=tuple(float(p) for p in column_p),
        n_perm=n_perm,
        n_perm_defined=defined,
        seed=seed,
        reason=None,
    )
