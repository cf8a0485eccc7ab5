"""Statistics against hand-computed cases, closed forms and scipy reference values."""

import itertools
import math

import numpy as np
import pytest
import scipy.stats

from rloop.errors import ConfigError
from rloop.metrics.stats import (
    benjamini_hochberg,
    bootstrap_ci,
    cohens_d,
    contrast,
    correlation_with_ci,
    describe_group,
    effect_size_ci,
    hedges_correction,
    hedges_g,
    mann_whitney,
    noise_floor,
    permutation_test,
    transfer_percent,
    welch_t,
)

A = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
B = np.array([3.0, 4.0, 5.0, 6.0, 7.0])


def test_cohens_d_and_hedges_g_hand_computed():
    # means 3 and 5, both variances 2.5 -> pooled sd sqrt(2.5)
    d = -2 / math.sqrt(2.5)
    assert cohens_d(A, B) == pytest.approx(d, rel=1e-14)
    # exact J(8) = Gamma(4) / (sqrt(4) Gamma(3.5))
    j = math.gamma(4) / (2 * math.gamma(3.5))
    assert hedges_correction(8) == pytest.approx(j, rel=1e-12)
    assert hedges_g(A, B) == pytest.approx(d * j, rel=1e-12)
    # close to the usual approximation 1 - 3 / (4 (n_a + n_b) - 9)
    assert hedges_correction(38) == pytest.approx(1 - 3 / (4 * 40 - 9), abs=1e-4)


def test_cohens_d_unequal_sizes_and_degenerate_cases():
    a = np.array([2.0, 4.0, 9.0])
    b = np.array([1.0, 1.0, 2.0, 4.0])
    pooled = math.sqrt((2 * np.var(a, ddof=1) + 3 * np.var(b, ddof=1)) / 5)
    assert cohens_d(a, b) == pytest.approx((5.0 - 2.0) / pooled, rel=1e-14)
    assert math.isnan(cohens_d([1.0], b))  # too few values
    assert math.isnan(cohens_d([2.0, 2.0], [2.0, 2.0]))  # zero spread
    assert math.isnan(cohens_d([1.0, np.nan, 3.0], b))  # NaN in, NaN out
    assert math.isnan(hedges_g([1.0, np.nan, 3.0], b))


def test_welch_t_against_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 12), rng.normal(0.8, 2, 20)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    t_ref = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    p_ref = 2 * scipy.stats.t.sf(abs(t_ref), df)
    t, p = welch_t(a, b)
    assert t == pytest.approx(t_ref, rel=1e-12)
    assert p == pytest.approx(p_ref, rel=1e-9)
    assert all(math.isnan(v) for v in welch_t([1.0], b))


def test_mann_whitney_exact_hand_case():
    u, p = mann_whitney([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert u == 0.0
    assert p == pytest.approx(2 / 20)  # exact: 2 of C(6, 3) = 20 splits are as extreme
    u, _ = mann_whitney([4.0, 5.0, 6.0], [1.0, 2.0, 3.0])
    assert u == 9.0


def brute_force_permutation_p(a: np.ndarray, b: np.ndarray) -> float:
    pooled = np.concatenate([a, b])
    observed = abs(a.mean() - b.mean())
    hits = total = 0
    for chosen in itertools.combinations(range(pooled.size), a.size):
        mask = np.zeros(pooled.size, bool)
        mask[list(chosen)] = True
        total += 1
        hits += abs(pooled[mask].mean() - pooled[~mask].mean()) >= observed - 1e-12
    return hits / total


def test_permutation_test_exact_against_enumeration():
    assert permutation_test([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1)
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 5), rng.normal(1, 1, 5)  # 252 relabellings < n_perm: exact
    assert permutation_test(a, b) == pytest.approx(brute_force_permutation_p(a, b), rel=1e-12)


def test_permutation_test_random_is_seeded():
    rng = np.random.default_rng(2)
    a, b = rng.normal(0, 1, 30), rng.normal(0.5, 1, 30)
    p1 = permutation_test(a, b, n_perm=2000, seed=3)
    assert p1 == permutation_test(a, b, n_perm=2000, seed=3)
    assert p1 != permutation_test(a, b, n_perm=2000, seed=4)
    _, p_t = welch_t(a, b)
    assert p1 == pytest.approx(p_t, abs=0.02)  # large-sample agreement with the t test


def test_bootstrap_ci_against_normal_theory_and_scipy():
    rng = np.random.default_rng(4)
    values = rng.normal(10, 2, 60)
    result = bootstrap_ci(values, n_boot=20_000, seed=0)
    low, high = result  # unpacks as (low, high)
    assert result.estimate == pytest.approx(values.mean(), rel=1e-14)
    half = 1.959964 * values.std(ddof=0) / math.sqrt(values.size)
    assert (high - low) / 2 == pytest.approx(half, rel=0.05)
    reference = scipy.stats.bootstrap(
        (values,), np.mean, n_resamples=20_000, method="percentile", rng=np.random.default_rng(9)
    ).confidence_interval
    assert low == pytest.approx(reference.low, abs=0.03)
    assert high == pytest.approx(reference.high, abs=0.03)


def test_bootstrap_ci_seeded_and_vectorized_equals_looped():
    values = np.random.default_rng(5).exponential(size=25)
    first = bootstrap_ci(values, np.median, n_boot=3000, seed=7)
    assert first == bootstrap_ci(values, np.median, n_boot=3000, seed=7)
    assert first != bootstrap_ci(values, np.median, n_boot=3000, seed=8)
    looped = bootstrap_ci(values, lambda v: float(np.median(v)), n_boot=3000, seed=7)
    assert (looped.low, looped.high) == (first.low, first.high)


def test_bootstrap_ci_drops_and_counts_nan():
    values = np.array([1.0, 2.0, np.nan, 4.0, np.inf, 3.0])
    result = bootstrap_ci(values, n_boot=500)
    assert (result.n, result.n_dropped) == (4, 2)
    assert result.estimate == pytest.approx(2.5)
    assert result.low >= 1.0 and result.high <= 4.0
    single = bootstrap_ci([np.nan, 5.0], n_boot=100)
    assert single.estimate == 5.0 and math.isnan(single.low) and single.n_dropped == 1
    with pytest.raises(ConfigError):
        bootstrap_ci(values, ci=95)


def test_describe_group():
    values = [1.0, 2.0, np.nan, 6.0]
    summary = describe_group(values, n_boot=1000, seed=0)
    assert (summary.n, summary.n_nan) == (3, 1)
    assert summary.mean == pytest.approx(3.0)
    assert summary.sd == pytest.approx(np.std([1.0, 2.0, 6.0], ddof=1))
    assert 1.0 <= summary.ci_low <= 3.0 <= summary.ci_high <= 6.0


def test_effect_size_ci_width_matches_large_sample_theory():
    rng = np.random.default_rng(6)
    a, b = rng.normal(0, 1, 80), rng.normal(0.7, 1, 80)
    result = effect_size_ci(a, b, "cohens_d", n_boot=4000, seed=0)
    d = cohens_d(a, b)
    assert result.estimate == d
    se = math.sqrt((a.size + b.size) / (a.size * b.size) + d**2 / (2 * (a.size + b.size)))
    assert (result.high - result.low) / 2 == pytest.approx(1.959964 * se, rel=0.12)
    assert result.low < d < result.high
    g = effect_size_ci(a, b, n_boot=4000, seed=0)  # hedges_g by default
    j = hedges_correction(158)
    assert g.estimate == pytest.approx(d * j) and g.low == pytest.approx(result.low * j)
    with pytest.raises(ConfigError, match="hedges_g"):
        effect_size_ci(a, b, kind="glass")


def test_contrast_fields():
    rec = np.array([0.5, 0.6, np.nan, 0.7, 0.55, 0.65])
    base = np.array([1.0, 0.9, 1.1, 0.95, 1.05])
    c = contrast(rec, base, n_boot=2000, n_perm=2000, seed=0)
    clean = rec[~np.isnan(rec)]
    assert (c.n_recursive, c.n_nan_recursive, c.n_baseline, c.n_nan_baseline) == (5, 1, 5, 0)
    assert c.mean_recursive == pytest.approx(0.6)
    assert c.mean_baseline == pytest.approx(1.0)
    assert c.diff == pytest.approx(-0.4)
    assert c.contraction_pct == pytest.approx(40.0)
    assert c.cohens_d == pytest.approx(cohens_d(clean, base))
    assert c.hedges_g == pytest.approx(hedges_g(clean, base))
    assert c.hedges_g_ci_low < c.hedges_g < c.hedges_g_ci_high < 0
    t_ref = scipy.stats.ttest_ind(clean, base, equal_var=False)
    assert (c.welch_t, c.welch_p) == pytest.approx((t_ref.statistic, t_ref.pvalue))
    assert c.mann_whitney_u == 0.0
    assert c.permutation_p == pytest.approx(brute_force_permutation_p(clean, base))
    d = c.to_dict()
    for key in ("mean_recursive", "mean_baseline", "hedges_g", "hedges_g_ci_low", "welch_p"):
        assert key in d
    assert contrast(rec, base, n_boot=2000, n_perm=2000, seed=0) == c


def test_contrast_zero_baseline_mean_has_no_percent():
    c = contrast([1.0, 2.0, 3.0], [-1.0, 0.0, 1.0], n_boot=200, n_perm=200)
    assert math.isnan(c.contraction_pct)


def test_benjamini_hochberg_hand_case_and_scipy():
    p = np.array([0.01, 0.04, 0.03, 0.005])
    # sorted 0.005, 0.01, 0.03, 0.04 -> p * 4 / rank = 0.02, 0.02, 0.04, 0.04 (already monotone)
    np.testing.assert_allclose(benjamini_hochberg(p), [0.02, 0.04, 0.04, 0.02], rtol=1e-14)
    rng = np.random.default_rng(7)
    many = np.concatenate([rng.uniform(size=80), rng.uniform(0, 0.01, size=20)])
    np.testing.assert_allclose(
        benjamini_hochberg(many), scipy.stats.false_discovery_control(many), rtol=1e-12
    )


def test_benjamini_hochberg_textbook_example():
    # Benjamini & Hochberg (1995), section 4: 15 p-values; at q = 0.05 the first four are
    # rejected.
    p = [0.0001, 0.0004, 0.0019, 0.0095, 0.0201, 0.0278, 0.0298, 0.0344, 0.0459, 0.3240,
         0.4262, 0.5719, 0.6528, 0.7590, 1.0000]  # fmt: skip
    adjusted = benjamini_hochberg(p)
    assert (adjusted <= 0.05).tolist() == [True] * 4 + [False] * 11
    assert adjusted[3] == pytest.approx(0.0095 * 15 / 4)


def test_benjamini_hochberg_nan_safe():
    p = np.array([0.01, np.nan, 0.04, 0.03, 0.005])
    adjusted = benjamini_hochberg(p)
    assert math.isnan(adjusted[1])
    np.testing.assert_allclose(adjusted[[0, 2, 3, 4]], [0.02, 0.04, 0.04, 0.02], rtol=1e-14)
    with pytest.raises(ConfigError):
        benjamini_hochberg([0.5, 1.5])


def test_noise_floor_is_half_width_of_mean_ci():
    rng = np.random.default_rng(8)
    null = np.append(rng.normal(0, 0.01, 200), np.nan)
    floor = noise_floor(null, n_boot=5000)
    assert (floor.n, floor.n_dropped) == (200, 1)
    expected = 1.959964 * np.nanstd(null) / math.sqrt(200)
    assert float(floor) == pytest.approx(expected, rel=0.08)
    interval = bootstrap_ci(null, n_boot=5000)
    assert floor.value == pytest.approx((interval.high - interval.low) / 2, rel=1e-14)


def test_transfer_percent_rules():
    assert transfer_percent(1.5, 1.0, 2.0, noise=0.1) == (pytest.approx(50.0), None)
    assert transfer_percent(0.0, 1.0, 0.5, noise=0.1) == (pytest.approx(200.0), None)
    value, reason = transfer_percent(1.0271, 1.0, 1.01, noise=0.05)  # would print 271 %
    assert math.isnan(value) and reason == "gap within noise"
    value, reason = transfer_percent(1.0, 1.0, 1.0, noise=0.0)  # zero gap, zero noise
    assert math.isnan(value) and reason == "gap within noise"
    value, reason = transfer_percent(float("nan"), 1.0, 2.0, noise=0.1)
    assert math.isnan(value) and reason == "non-finite input"
    with pytest.raises(ConfigError):
        transfer_percent(1.0, 1.0, 2.0, noise=-1.0)


def test_correlation_with_ci_pearson_and_spearman():
    rng = np.random.default_rng(9)
    x = rng.normal(size=200)
    y = 0.5 * x + rng.normal(size=200)
    pearson = correlation_with_ci(x, y, n_boot=4000, seed=0)
    ref = scipy.stats.pearsonr(x, y)
    assert pearson.r == pytest.approx(ref.statistic) and pearson.p == pytest.approx(ref.pvalue)
    # Fisher z interval as the large-sample reference for the bootstrap CI.
    z, se = math.atanh(ref.statistic), 1 / math.sqrt(200 - 3)
    assert pearson.ci_low == pytest.approx(math.tanh(z - 1.959964 * se), abs=0.03)
    assert pearson.ci_high == pytest.approx(math.tanh(z + 1.959964 * se), abs=0.03)
    r, p, low, high, n = correlation_with_ci(x, y, "spearman", n_boot=2000, seed=0)
    ref = scipy.stats.spearmanr(x, y)
    assert (r, p, n) == (pytest.approx(ref.statistic), pytest.approx(ref.pvalue), 200)
    assert low < r < high


def test_correlation_with_ci_nan_pairs_and_errors():
    x = np.array([1.0, 2.0, 3.0, np.nan, 5.0, 6.0])
    y = np.array([2.0, 1.0, 4.0, 3.0, np.nan, 7.0])
    result = correlation_with_ci(x, y, n_boot=500)
    assert (result.n, result.n_dropped) == (4, 2)
    assert result.r == pytest.approx(scipy.stats.pearsonr([1, 2, 3, 6], [2, 1, 4, 7]).statistic)
    assert math.isnan(correlation_with_ci([1.0, 1.0, 1.0], [1.0, 2.0, 3.0], n_boot=10).r)
    with pytest.raises(ConfigError, match="paired"):
        correlation_with_ci([1.0, 2.0], [1.0], n_boot=10)
    with pytest.raises(ConfigError, match="pearson"):
        correlation_with_ci(x, y, method="kendall")
