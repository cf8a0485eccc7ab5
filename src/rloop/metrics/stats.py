"""Statistics for contrasts, sweeps and correlations (SCIENCE.md §6).

Everything is float64 numpy; every random procedure takes a ``seed`` and uses its own
``numpy.random.Generator``, so the same inputs and seed give the same numbers.

NaN policy:
- Summaries (``bootstrap_ci``, ``describe_group``, ``contrast``, ``noise_floor``,
  ``correlation_with_ci``) drop non-finite values and report how many they dropped.
- Single-number functions (``cohens_d``, ``hedges_g``, ``effect_size_ci``, ``welch_t``,
  ``mann_whitney``, ``permutation_test``) return NaN when any input is non-finite, so a NaN
  can never be averaged over silently; ``contrast`` drops and counts first, then calls them.
- A statistic that is undefined for the data (too few values, zero spread) is NaN.

Bootstrap CIs are percentile intervals over items (prompts), resampled with replacement.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import scipy.stats
from scipy.special import gammaln

from rloop.errors import ConfigError

EFFECT_SIZE_KINDS = ("cohens_d", "hedges_g")
CORRELATION_METHODS = ("pearson", "spearman")
REASON_GAP_WITHIN_NOISE = "gap within noise"
REASON_NON_FINITE = "non-finite input"

BOOT_CHUNK = 1000  # resamples per vectorized block: bounds memory at n_boot x n


class AsDictMixin:
    """``to_dict()`` for a result dataclass: its fields as a plain dict (``dataclasses.asdict``)."""

    def to_dict(self) -> dict:
        return asdict(self)


def _values(values) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        array = array.reshape(-1)
    return array


def _finite(values) -> tuple[np.ndarray, int]:
    """(finite values, number dropped)."""
    array = _values(values)
    keep = np.isfinite(array)
    return array[keep], int(array.size - keep.sum())


def check_ci(ci: float) -> None:
    """ConfigError unless the confidence level ``ci`` lies strictly between 0 and 1."""
    if not 0.0 < ci < 1.0:
        raise ConfigError(f"confidence level must be between 0 and 1 (e.g. 0.95), got {ci}")


def check_count(count: int, name: str) -> None:
    """ConfigError unless ``count`` (e.g. n_boot) is at least 1."""
    if count < 1:
        raise ConfigError(f"{name} must be at least 1, got {count}")


def check_positive_int(count: int, name: str) -> None:
    """ConfigError unless ``count`` is an int (or numpy integer, not a bool) of at least 1."""
    if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 1:
        raise ConfigError(f"{name} must be a positive integer, got {count!r}")


def check_choice(value: object, choices: Sequence[object], what: str) -> None:
    """ConfigError "unknown <what> <value>: choose one of <choices>" unless value is one."""
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}: choose one of {choices}")


def percentile_interval(estimates: np.ndarray, ci: float) -> tuple[float, float]:
    """Percentile interval of bootstrap estimates, ignoring resamples where the statistic is
    undefined (NaN); NaN if fewer than half of the resamples are defined."""
    finite = estimates[np.isfinite(estimates)]
    if finite.size == 0 or finite.size < estimates.size / 2:
        return math.nan, math.nan
    alpha = 1.0 - ci
    low, high = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


@dataclass(frozen=True)
class BootstrapCI(AsDictMixin):
    """A statistic, its percentile bootstrap CI, and what it was computed on.

    Unpacks as ``low, high = bootstrap_ci(...)``.
    """

    estimate: float
    low: float
    high: float
    n: int  # finite values used
    n_dropped: int  # non-finite values dropped before computing
    ci: float
    n_boot: int
    seed: int

    def __iter__(self) -> Iterator[float]:
        return iter((self.low, self.high))


def _bootstrap_statistic(
    values: np.ndarray, statistic: Callable, n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """statistic of n_boot resamples of values -> (n_boot,). Uses statistic(x, axis=1) when
    the statistic supports it, else one call per resample."""
    n = values.size
    estimates = np.empty(n_boot, dtype=np.float64)
    try:
        vectorized = np.asarray(statistic(values[None, :].repeat(2, axis=0), axis=1))
        vectorized_ok = vectorized.shape == (2,)
    except TypeError:
        vectorized_ok = False
    for start in range(0, n_boot, BOOT_CHUNK):
        stop = min(start + BOOT_CHUNK, n_boot)
        resamples = values[rng.integers(0, n, size=(stop - start, n))]  # (chunk, n)
        if vectorized_ok:
            estimates[start:stop] = statistic(resamples, axis=1)
        else:
            estimates[start:stop] = [statistic(row) for row in resamples]
    return estimates


def bootstrap_ci(
    values,
    statistic: Callable = np.mean,
    n_boot: int = 10_000,
    ci: float = 0.95,
    seed: int = 0,
) -> BootstrapCI:
    """Percentile bootstrap CI of ``statistic`` over items (values: (n,)).

    Non-finite values are dropped and counted in ``n_dropped``. With fewer than 2 finite
    values the CI is NaN (and the estimate is NaN with none).
    """
    check_ci(ci)
    check_count(n_boot, "n_boot")
    finite, dropped = _finite(values)
    estimate = float(statistic(finite)) if finite.size else math.nan
    if finite.size < 2:
        return BootstrapCI(estimate, math.nan, math.nan, finite.size, dropped, ci, n_boot, seed)
    rng = np.random.default_rng(seed)
    estimates = _bootstrap_statistic(finite, statistic, n_boot, rng)
    low, high = percentile_interval(estimates, ci)
    return BootstrapCI(estimate, low, high, finite.size, dropped, ci, n_boot, seed)


@dataclass(frozen=True)
class GroupSummary:
    """One group's values: n finite, n_nan dropped (non-finite), mean, sd (ddof=1) and the
    bootstrap CI of the mean."""

    n: int
    n_nan: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float


def describe_group(values, n_boot: int = 10_000, ci: float = 0.95, seed: int = 0) -> GroupSummary:
    """n, NaN count, mean, sd and bootstrap CI of the mean of one group's values (n,)."""
    interval = bootstrap_ci(values, np.mean, n_boot=n_boot, ci=ci, seed=seed)
    finite, dropped = _finite(values)
    sd = float(np.std(finite, ddof=1)) if finite.size >= 2 else math.nan
    return GroupSummary(finite.size, dropped, interval.estimate, sd, interval.low, interval.high)


def _any_non_finite(*arrays: np.ndarray) -> bool:
    return any(not np.isfinite(a).all() for a in arrays)


def _pooled_sd(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    n_a, n_b = a.shape[axis], b.shape[axis]
    var_a = np.var(a, axis=axis, ddof=1)
    var_b = np.var(b, axis=axis, ddof=1)
    return np.sqrt(((n_a - 1) * var_a + (n_b - 1) * var_b) / (n_a + n_b - 2))


def cohens_d_along(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """(mean_a - mean_b) / pooled sd along ``axis``; NaN where the pooled sd is 0."""
    diff = np.mean(a, axis=axis) - np.mean(b, axis=axis)
    pooled = _pooled_sd(a, b, axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pooled > 0, diff / np.where(pooled > 0, pooled, 1.0), np.nan)


def hedges_correction(df: int) -> float:
    """Exact small-sample factor J(df) = Gamma(df/2) / (sqrt(df/2) Gamma((df-1)/2)), Hedges
    (1981); about 1 - 3 / (4 df - 1). df = n_a + n_b - 2."""
    if df < 2:
        return math.nan
    return math.exp(gammaln(df / 2) - gammaln((df - 1) / 2)) / math.sqrt(df / 2)


def cohens_d(a, b) -> float:
    """Cohen's d of a vs b: (mean_a - mean_b) / pooled sd (ddof=1 in each group).

    NaN if either group has fewer than 2 values, any value is non-finite, or the pooled sd
    is 0."""
    a, b = _values(a), _values(b)
    if a.size < 2 or b.size < 2 or _any_non_finite(a, b):
        return math.nan
    return float(cohens_d_along(a, b))


def hedges_g(a, b) -> float:
    """Hedges' g: Cohen's d times the exact small-sample correction J(n_a + n_b - 2)."""
    a, b = _values(a), _values(b)
    return cohens_d(a, b) * hedges_correction(a.size + b.size - 2)


def effect_size_ci(
    a,
    b,
    kind: str = "hedges_g",
    n_boot: int = 10_000,
    ci: float = 0.95,
    seed: int = 0,
) -> BootstrapCI:
    """Effect size (kind "cohens_d" or "hedges_g") of a vs b with a percentile bootstrap CI,
    resampling each group with replacement on its own. NaN if any value is non-finite
    (``n_dropped`` is then the count of non-finite values; drop them first, as ``contrast``
    does)."""
    check_choice(kind, EFFECT_SIZE_KINDS, "effect size")
    check_ci(ci)
    check_count(n_boot, "n_boot")
    a, b = _values(a), _values(b)
    n_bad = int((~np.isfinite(a)).sum() + (~np.isfinite(b)).sum())
    estimate = cohens_d(a, b) if kind == "cohens_d" else hedges_g(a, b)
    n = a.size + b.size
    if math.isnan(estimate) or n_bad:
        return BootstrapCI(estimate, math.nan, math.nan, n, n_bad, ci, n_boot, seed)
    factor = 1.0 if kind == "cohens_d" else hedges_correction(n - 2)
    rng = np.random.default_rng(seed)
    estimates = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, BOOT_CHUNK):
        stop = min(start + BOOT_CHUNK, n_boot)
        resampled_a = a[rng.integers(0, a.size, size=(stop - start, a.size))]  # (chunk, n_a)
        resampled_b = b[rng.integers(0, b.size, size=(stop - start, b.size))]  # (chunk, n_b)
        estimates[start:stop] = factor * cohens_d_along(resampled_a, resampled_b, axis=1)
    low, high = percentile_interval(estimates, ci)
    return BootstrapCI(estimate, low, high, n, 0, ci, n_boot, seed)


def welch_t(a, b) -> tuple[float, float]:
    """Welch's unequal-variance t test of a vs b -> (t, two-sided p). NaN if a group has
    fewer than 2 values or any value is non-finite."""
    a, b = _values(a), _values(b)
    if a.size < 2 or b.size < 2 or _any_non_finite(a, b):
        return math.nan, math.nan
    result = scipy.stats.ttest_ind(a, b, equal_var=False)
    return float(result.statistic), float(result.pvalue)


def mann_whitney(a, b) -> tuple[float, float]:
    """Mann-Whitney U test of a vs b -> (U of a, two-sided p; exact or asymptotic as scipy
    chooses). NaN if a group is empty or any value is non-finite."""
    a, b = _values(a), _values(b)
    if a.size < 1 or b.size < 1 or _any_non_finite(a, b):
        return math.nan, math.nan
    result = scipy.stats.mannwhitneyu(a, b, alternative="two-sided")
    return float(result.statistic), float(result.pvalue)


def _mean_difference(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


_PERMUTATION_TAKES_RNG = "rng" in inspect.signature(scipy.stats.permutation_test).parameters


def permutation_test(a, b, n_perm: int = 10_000, seed: int = 0) -> float:
    """Two-sided permutation test of the difference of means (a - b) -> p.

    Exact when the number of distinct relabellings is at most ``n_perm``, else ``n_perm``
    random relabellings (scipy.stats.permutation_test). NaN if a group is empty or any value
    is non-finite."""
    check_count(n_perm, "n_perm")
    a, b = _values(a), _values(b)
    if a.size < 1 or b.size < 1 or _any_non_finite(a, b):
        return math.nan
    seeding = (
        {"rng": np.random.default_rng(seed)}
        if _PERMUTATION_TAKES_RNG
        else {"random_state": np.random.default_rng(seed)}
    )
    result = scipy.stats.permutation_test(
        (a, b),
        _mean_difference,
        permutation_type="independent",
        vectorized=True,
        n_resamples=n_perm,
        alternative="two-sided",
        **seeding,
    )
    return float(result.pvalue)


@dataclass(frozen=True)
class Contrast(AsDictMixin):
    """Recursive vs baseline: counts, means, difference, effect sizes and tests.

    diff = mean_recursive - mean_baseline; contraction_pct = (mean_baseline - mean_recursive)
    / mean_baseline * 100 (NaN if the baseline mean is 0). Non-finite values are dropped
    first and counted in n_nan_*; n_* count the values used.
    """

    n_recursive: int
    n_baseline: int
    n_nan_recursive: int
    n_nan_baseline: int
    mean_recursive: float
    mean_baseline: float
    sd_recursive: float
    sd_baseline: float
    diff: float
    contraction_pct: float
    cohens_d: float
    hedges_g: float
    hedges_g_ci_low: float
    hedges_g_ci_high: float
    welch_t: float
    welch_p: float
    mann_whitney_u: float
    mann_whitney_p: float
    permutation_p: float
    ci: float
    n_boot: int
    n_perm: int
    seed: int


def contrast(
    recursive,
    baseline,
    n_boot: int = 10_000,
    n_perm: int = 10_000,
    ci: float = 0.95,
    seed: int = 0,
) -> Contrast:
    """Full contrast of two groups of per-prompt values (e.g. R_V), each (n,)."""
    rec, n_nan_rec = _finite(recursive)
    base, n_nan_base = _finite(baseline)
    mean_rec = float(rec.mean()) if rec.size else math.nan
    mean_base = float(base.mean()) if base.size else math.nan
    sd_rec = float(rec.std(ddof=1)) if rec.size >= 2 else math.nan
    sd_base = float(base.std(ddof=1)) if base.size >= 2 else math.nan
    contraction = (
        (mean_base - mean_rec) / mean_base * 100.0
        if math.isfinite(mean_base) and mean_base != 0
        else math.nan
    )
    g = effect_size_ci(rec, base, "hedges_g", n_boot=n_boot, ci=ci, seed=seed)
    t, p_t = welch_t(rec, base)
    u, p_u = mann_whitney(rec, base)
    return Contrast(
        n_recursive=int(rec.size),
        n_baseline=int(base.size),
        n_nan_recursive=n_nan_rec,
        n_nan_baseline=n_nan_base,
        mean_recursive=mean_rec,
        mean_baseline=mean_base,
        sd_recursive=sd_rec,
        sd_baseline=sd_base,
        diff=mean_rec - mean_base,
        contraction_pct=contraction,
        cohens_d=cohens_d(rec, base),
        hedges_g=g.estimate,
        hedges_g_ci_low=g.low,
        hedges_g_ci_high=g.high,
        welch_t=t,
        welch_p=p_t,
        mann_whitney_u=u,
        mann_whitney_p=p_u,
        permutation_p=permutation_test(rec, base, n_perm=n_perm, seed=seed),
        ci=ci,
        n_boot=n_boot,
        n_perm=n_perm,
        seed=seed,
    )


def benjamini_hochberg(pvalues) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values), same shape as ``pvalues``.

    NaN p-values stay NaN and do not count towards the number of tests m. Raises
    ConfigError for a p-value outside [0, 1].
    """
    p = np.asarray(pvalues, dtype=np.float64)
    flat = p.reshape(-1)
    finite = ~np.isnan(flat)
    valid = flat[finite]
    if ((valid < 0) | (valid > 1)).any():
        raise ConfigError("p-values must lie in [0, 1]: pass raw p-values, not statistics")
    adjusted = np.full(flat.shape, np.nan)
    m = valid.size
    if m:
        order = np.argsort(valid)
        scaled = valid[order] * m / np.arange(1, m + 1)
        monotone = np.minimum.accumulate(scaled[::-1])[::-1].clip(max=1.0)
        q = np.empty(m)
        q[order] = monotone
        adjusted[finite] = q
    return adjusted.reshape(p.shape)


@dataclass(frozen=True)
class NoiseFloor:
    """Noise floor of a sweep: the half-width of the bootstrap CI of the mean of null
    (baseline / control) values, in the units of those values. ``float(floor)`` gives it."""

    value: float
    n: int
    n_dropped: int
    ci: float
    n_boot: int
    seed: int

    def __float__(self) -> float:
        return self.value


def noise_floor(values, ci: float = 0.95, n_boot: int = 10_000, seed: int = 0) -> NoiseFloor:
    """Half-width (high - low) / 2 of the percentile bootstrap CI of the mean of null values
    (n,): the spread of a mean impact expected from noise alone. Effects smaller than this
    are indistinguishable from noise. Non-finite values are dropped and counted; NaN with
    fewer than 2 finite values."""
    interval = bootstrap_ci(values, np.mean, n_boot=n_boot, ci=ci, seed=seed)
    half_width = (interval.high - interval.low) / 2
    return NoiseFloor(half_width, interval.n, interval.n_dropped, ci, n_boot, seed)


def transfer_percent(
    patched: float, target_natural: float, source_natural: float, noise: float
) -> tuple[float, str | None]:
    """Transfer % = (patched - target) / (source - target) * 100 -> (value, None), or
    (NaN, reason) when it is undefined: "gap within noise" when |source - target| <= noise
    (never a 271 % from a near-zero gap), "non-finite input" for NaN/inf inputs."""
    noise = float(noise)
    if not noise >= 0:
        raise ConfigError(f"noise must be a non-negative number, got {noise}")
    values = (float(patched), float(target_natural), float(source_natural))
    if not all(math.isfinite(v) for v in values) or math.isinf(noise):
        return math.nan, REASON_NON_FINITE
    patched, target, source = values
    gap = source - target
    if abs(gap) <= noise:
        return math.nan, REASON_GAP_WITHIN_NOISE
    return (patched - target) / gap * 100.0, None


TRANSFER_CI = 0.95  # level of the transfer % bootstrap CI


@dataclass(frozen=True)
class TransferCI:
    """Cluster bootstrap CI of a transfer %: ``low``/``high`` (NaN when not given, ``note``
    says why) and the share of bootstrap draws in which the transfer % was undefined."""

    low: float
    high: float
    undefined_share: float
    note: str = ""


def pair_draws(n_pairs: int, n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap draws of pairs with replacement: (n_boot, n_pairs) row indices, from
    ``np.random.default_rng(seed).integers(0, n_pairs, size=(n_boot, n_pairs))``."""
    return np.random.default_rng(seed).integers(0, n_pairs, size=(n_boot, n_pairs))


def resampled_means(values: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Mean over the drawn pairs of each draw, NaN values ignored: (n,), (B, n) -> (B,);
    NaN for a draw with no finite value."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN draws are NaN, on purpose
        return np.nanmean(np.asarray(values, dtype=np.float64)[draws], axis=1)  # (B,)


def transfer_interval(
    boot_pct: np.ndarray, point_defined: bool, ci: float = TRANSFER_CI
) -> TransferCI:
    """Percentile CI of bootstrap transfer % values (B,), NaN where a draw was undefined.

    The CI is given only when the point transfer % is defined and at most ``1 - ci`` of the
    draws are undefined: an undefined draw has a natural gap within noise, i.e. a transfer %
    that would be arbitrarily large, so dropping more than the CI's tail of them would
    leave an interval that is too narrow (the ratio's CI is then unbounded, as in Fieller's
    interval when the denominator is not clearly away from zero)."""
    boot_pct = np.asarray(boot_pct, dtype=np.float64)
    share = float(np.mean(~np.isfinite(boot_pct))) if boot_pct.size else math.nan
    if not point_defined:
        return TransferCI(math.nan, math.nan, share, "point transfer % undefined")
    if not share <= 1.0 - ci + 1e-12:
        note = (
            f"undefined in {share:.0%} of bootstrap draws (more than {1.0 - ci:.0%}): the "
            "natural gap is not clearly away from the noise, the CI is unbounded"
        )
        return TransferCI(math.nan, math.nan, share, note)
    low, high = percentile_interval(boot_pct, ci)
    return TransferCI(low, high, share)


def bootstrap_transfer_pct(
    boot_condition: np.ndarray,
    boot_target: np.ndarray,
    boot_source: np.ndarray,
    noise: float,
) -> np.ndarray:
    """Transfer % of every bootstrap draw (B,) from the draws' means, by the rule of
    :func:`~rloop.metrics.stats.transfer_percent` with the point estimate's ``noise``."""
    return np.array(
        [
            transfer_percent(c, t, s, noise)[0]
            for c, t, s in zip(boot_condition, boot_target, boot_source, strict=True)
        ],
        dtype=np.float64,
    )


def transfer_bootstrap(
    target,
    source,
    values,
    noise: float,
    n_boot: int = 2000,
    seed: int = 0,
    ci: float = TRANSFER_CI,
) -> TransferCI:
    """Pair-level (cluster) bootstrap CI of the transfer % of one condition.

    target, source, values: (n_pairs,) per-pair values of the natural target, the natural
    source and the condition (NaN where undefined). Each draw resamples pairs with
    replacement (:func:`pair_draws`; the same pairs for the three arrays), recomputes the
    three means (NaN ignored) and the transfer % by the near-zero-gap rule with the point
    estimate's ``noise`` as threshold (a nested bootstrap of the noise per draw would cost
    n_boot² resamples; the threshold is the design's resolution, not re-estimated), and
    :func:`transfer_interval` turns the draws into the CI.
    """
    target, source, values = (np.asarray(a, dtype=np.float64) for a in (target, source, values))
    noise = float(noise) if math.isfinite(float(noise)) else 0.0
    point, _ = transfer_percent(
        finite_mean(values), finite_mean(target), finite_mean(source), noise
    )
    if target.size < 2:
        return TransferCI(math.nan, math.nan, math.nan, "fewer than 2 pairs")
    draws = pair_draws(target.size, n_boot, seed)
    boot = bootstrap_transfer_pct(
        resampled_means(values, draws),
        resampled_means(target, draws),
        resampled_means(source, draws),
        noise,
    )
    return transfer_interval(boot, math.isfinite(point), ci)


def finite_mean(values: np.ndarray) -> float:
    """Mean of the finite entries of ``values`` (NaN when there are none)."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


@dataclass(frozen=True)
class Correlation(AsDictMixin):
    """A correlation with its bootstrap CI over (x, y) pairs. Unpacks as
    ``r, p, ci_low, ci_high, n = correlation_with_ci(...)``."""

    r: float
    p: float
    ci_low: float
    ci_high: float
    n: int  # pairs used
    n_dropped: int  # pairs with a non-finite x or y
    method: str
    ci: float
    n_boot: int
    seed: int

    def __iter__(self) -> Iterator[float | int]:
        return iter((self.r, self.p, self.ci_low, self.ci_high, self.n))


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair of x, y (k, n) -> (k,); NaN for a constant row."""
    xc = x - x.mean(axis=1, keepdims=True)  # (k, n)
    yc = y - y.mean(axis=1, keepdims=True)  # (k, n)
    denominator = np.sqrt((xc * xc).sum(axis=1) * (yc * yc).sum(axis=1))  # (k,)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (xc * yc).sum(axis=1) / np.where(denominator > 0, denominator, 1.0)  # (k,)
    return np.where(denominator > 0, r, np.nan)


def correlation_with_ci(
    x,
    y,
    method: str = "pearson",
    n_boot: int = 10_000,
    ci: float = 0.95,
    seed: int = 0,
) -> Correlation:
    """Pearson or Spearman correlation of paired values x, y (n,) with scipy's p-value and a
    percentile bootstrap CI over pairs. Pairs with a non-finite value are dropped and
    counted; NaN with fewer than 3 pairs or a constant variable."""
    check_choice(method, CORRELATION_METHODS, "correlation")
    check_ci(ci)
    check_count(n_boot, "n_boot")
    x, y = _values(x), _values(y)
    if x.size != y.size:
        raise ConfigError(f"x and y must be paired: got {x.size} and {y.size} values")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y, dropped = x[keep], y[keep], int(keep.size - keep.sum())
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        nan = math.nan
        return Correlation(nan, nan, nan, nan, x.size, dropped, method, ci, n_boot, seed)
    test = scipy.stats.pearsonr if method == "pearson" else scipy.stats.spearmanr
    result = test(x, y)
    r, p = float(result.statistic), float(result.pvalue)
    rng = np.random.default_rng(seed)
    estimates = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, BOOT_CHUNK):
        stop = min(start + BOOT_CHUNK, n_boot)
        index = rng.integers(0, x.size, size=(stop - start, x.size))  # (chunk, n)
        xs, ys = x[index], y[index]  # (chunk, n)
        if method == "spearman":
            xs = scipy.stats.rankdata(xs, axis=1)  # (chunk, n)
            ys = scipy.stats.rankdata(ys, axis=1)  # (chunk, n)
        estimates[start:stop] = _pearson_rows(xs, ys)
    low, high = percentile_interval(estimates, ci)
    return Correlation(r, p, low, high, x.size, dropped, method, ci, n_boot, seed)


def paired_change(clean, ablated, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean clean / ablated value, mean change (ablated - clean) with bootstrap CI over
    prompts; ``n_nan`` counts prompts whose change is undefined."""
    clean = _values(clean)
    ablated = _values(ablated)
    change = ablated - clean
    ci = bootstrap_ci(change, n_boot=n_boot, seed=seed)
    return {
        "n": ci.n,
        "n_nan": ci.n_dropped,
        "r_v_clean": float(np.nanmean(clean)) if np.isfinite(clean).any() else float("nan"),
        "r_v_ablated": float(np.nanmean(ablated)) if np.isfinite(ablated).any() else float("nan"),
        "mean_change": ci.estimate,
        "ci_low": ci.low,
        "ci_high": ci.high,
    }
