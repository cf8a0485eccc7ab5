"""Paired, many-group, trend and clustered contrasts against brute force, scipy and simulation."""

import itertools
import math

import numpy as np
import pytest
import scipy.stats

from rloop.errors import ConfigError
from rloop.metrics.contrasts import (
    _weighted_correlation,
    _weighted_midranks,
    cluster_bootstrap_mean,
    cluster_correlation,
    contrasts_against_groups,
    paired_contrast,
    trend_test,
)
from rloop.metrics.stats import benjamini_hochberg, bootstrap_ci, hedges_g


def _brute_sign_flip_p(diffs):
    observed = abs(sum(diffs))
    sums = [abs(sum(s * d for s, d in zip(signs, diffs, strict=True))) for signs in
            itertools.product((-1, 1), repeat=len(diffs))]  # fmt: skip
    return np.mean([s >= observed - 1e-9 for s in sums])


def test_paired_contrast_against_hand_and_scipy():
    rec = np.array([0.61, 0.55, 0.70, 0.52, np.nan, 0.66, 0.58, 0.49, 0.63, 0.57])
    twin = np.array([0.72, 0.60, 0.69, 0.61, 0.70, 0.75, 0.64, 0.58, np.inf, 0.66])
    result = paired_contrast(rec, twin, n_boot=2000, seed=3)
    keep = np.isfinite(rec) & np.isfinite(twin)
    diffs = rec[keep] - twin[keep]
    assert result.n_pairs == 8 and result.n_dropped == 2
    assert result.mean_recursive == pytest.approx(rec[keep].mean())
    assert result.mean_twin == pytest.approx(twin[keep].mean())
    assert result.mean_diff == pytest.approx(diffs.mean())
    assert result.sd_diff == pytest.approx(diffs.std(ddof=1))
    assert result.d_z == pytest.approx(diffs.mean() / diffs.std(ddof=1))
    reference_ci = bootstrap_ci(diffs, np.mean, n_boot=2000, seed=3)
    assert (result.mean_diff_ci_low, result.mean_diff_ci_high) == pytest.approx(
        (reference_ci.low, reference_ci.high)
    )
    assert result.d_z_ci_low < result.d_z < result.d_z_ci_high < 0
    assert result.wilcoxon_p == pytest.approx(scipy.stats.wilcoxon(diffs).pvalue)
    assert result.sign_flip_exact
    assert result.sign_flip_p == pytest.approx(_brute_sign_flip_p(diffs.tolist()))
    assert result.reason is None


def _exact_sign_flip_p_integer(diffs):
    """Exact two-sided sign-flip p for integer diffs by dynamic programming over sums."""
    counts = {0: 1}
    for d in diffs:
        updated = {}
        for total, ways in counts.items():
            for step in (d, -d):
                updated[total + step] = updated.get(total + step, 0) + ways
        counts = updated
    observed = abs(sum(diffs))
    extreme = sum(ways for total, ways in counts.items() if abs(total) >= observed)
    return extreme / 2 ** len(diffs)


def test_paired_monte_carlo_sign_flip_matches_exact_distribution():
    rng = np.random.default_rng(11)
    diffs = rng.integers(-5, 9, size=24)
    reference = _exact_sign_flip_p_integer(diffs.tolist())
    result = paired_contrast(diffs.astype(float), np.zeros(24), n_boot=200, n_perm=40_000, seed=1)
    assert not result.sign_flip_exact
    se = math.sqrt(reference * (1 - reference) / 40_000)
    assert abs(result.sign_flip_p - reference) < 4 * se + 1e-4


def test_paired_contrast_degenerate_inputs_give_nan_with_reason():
    none = paired_contrast([np.nan, 1.0], [2.0, np.nan], n_boot=50, n_perm=50)
    assert none.n_pairs == 0 and none.n_dropped == 2 and "no usable pairs" in none.reason
    assert math.isnan(none.mean_diff) and math.isnan(none.sign_flip_p)
    one = paired_contrast([1.0, np.nan], [0.5, 2.0], n_boot=50, n_perm=50)
    assert one.n_pairs == 1 and one.mean_diff == 0.5 and "only 1 usable pair" in one.reason
    assert math.isnan(one.d_z) and math.isnan(one.wilcoxon_p)
    constant = paired_contrast([1.5, 2.5, 3.5], [1.0, 2.0, 3.0], n_boot=50, n_perm=50)
    assert math.isnan(constant.d_z) and "zero variance" in constant.reason
    assert constant.mean_diff == pytest.approx(0.5)
    assert constant.sign_flip_p == pytest.approx(2 / 8)  # only all-+ and all-- reach |1.5|
    assert constant.wilcoxon_p == pytest.approx(scipy.stats.wilcoxon([0.5, 0.5, 0.5]).pvalue)
    zeros = paired_contrast([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], n_boot=50, n_perm=50)
    assert math.isnan(zeros.wilcoxon_p) and "all differences are zero" in zeros.reason
    assert zeros.sign_flip_p == 1.0
    with pytest.raises(ConfigError, match="paired"):
        paired_contrast([1.0, 2.0], [1.0])


def test_contrasts_against_groups_rows_and_bh():
    rng = np.random.default_rng(2)
    groups = {
        "recursive": rng.normal(0.0, 1.0, 25),
        "matched": rng.normal(0.4, 1.0, 22),
        "long": np.r_[rng.normal(1.0, 1.2, 20), np.nan],
        "poetry": rng.normal(0.1, 0.8, 18),
    }
    table = contrasts_against_groups(groups, "recursive", n_boot=500, n_perm=999, seed=4)
    assert table["other"].tolist() == ["matched", "long", "poetry"]
    for row in table.itertuples():
        other = groups[row.other]
        finite = other[np.isfinite(other)]
        assert row.n_other == finite.size and row.n_nan_other == other.size - finite.size
        assert row.diff == pytest.approx(groups["recursive"].mean() - finite.mean())
        assert row.hedges_g == pytest.approx(hedges_g(groups["recursive"], finite))
        welch = scipy.stats.ttest_ind(groups["recursive"], finite, equal_var=False).pvalue
        assert row.welch_p == pytest.approx(welch)
        assert row.hedges_g_ci_low < row.hedges_g < row.hedges_g_ci_high
    for column in ("welch_p", "mann_whitney_p", "permutation_p"):
        expected = benjamini_hochberg(table[column].to_numpy())
        np.testing.assert_allclose(table[f"{column}_bh"], expected)
    subset = contrasts_against_groups(groups, "recursive", others=["poetry"], n_boot=50, n_perm=50)
    assert len(subset) == 1 and subset["welch_p_bh"][0] == subset["welch_p"][0]
    with pytest.raises(ConfigError, match="target group"):
        contrasts_against_groups(groups, "missing")
    with pytest.raises(ConfigError, match="not among"):
        contrasts_against_groups(groups, "recursive", others=["nope"])


def test_jonckheere_hand_computed():
    # levels 1,1,2,2,3 with values 1,2,2,3,5. Pairs (lower level a, higher level b):
    # level1 vs level2: (1,2)=1 (1,3)=1 (2,2)=0.5 (2,3)=1 -> 3.5; level1 vs level3: 2;
    # level2 vs level3: 2 -> J = 7.5, E[J] = (25 - 9) / 4 = 4
    result = trend_test([1.0, 2.0, 2.0, 3.0, 5.0], [1, 1, 2, 2, 3], n_boot=100)
    assert result.jt_statistic == 7.5 and result.jt_expected == 4.0
    assert result.direction == "increasing"


def test_jonckheere_two_groups_equals_mann_whitney_with_ties():
    rng = np.random.default_rng(5)
    low = rng.integers(0, 6, 14).astype(float)
    high = rng.integers(1, 7, 17).astype(float)
    values = np.r_[low, high]
    levels = np.r_[np.zeros(14), np.ones(17)]
    result = trend_test(values, levels, n_boot=100)
    mwu = scipy.stats.mannwhitneyu(high, low, method="asymptotic", use_continuity=False)
    assert result.jt_statistic == pytest.approx(mwu.statistic)
    assert result.jt_p == pytest.approx(mwu.pvalue, rel=1e-10)


def _brute_jt_p(values, levels):
    """Exact two-sided JT p over every permutation of the values (levels fixed)."""

    def jt(v):
        return sum(
            (v[b] > v[a]) + 0.5 * (v[b] == v[a])
            for a in range(len(v))
            for b in range(len(v))
            if levels[b] > levels[a]
        )

    expected = (len(values) ** 2 - sum(c**2 for c in np.unique(levels, return_counts=True)[1])) / 4
    observed = abs(jt(values) - expected)
    null = [abs(jt(p) - expected) for p in itertools.permutations(values)]
    return np.mean([s >= observed - 1e-9 for s in null])


def test_jonckheere_exact_matches_brute_force_permutations():
    values = [3.0, 1.0, 4.0, 4.0, 5.0, 9.0, 2.0]
    levels = [0, 0, 1, 1, 1, 2, 2]
    result = trend_test(values, levels, method="exact", n_boot=100)
    assert result.jt_p == pytest.approx(_brute_jt_p(values, levels))


def test_jonckheere_normal_and_permutation_agree_with_permutation_reference():
    rng = np.random.default_rng(8)
    levels = np.repeat([0, 1, 2, 3], 15)
    values = np.round(rng.normal(0.03 * levels, 1.0) * 2) / 2  # ties
    normal = trend_test(values, levels, n_boot=100)
    permuted = trend_test(values, levels, method="permutation", n_perm=20_000, n_boot=100, seed=1)
    # independent permutation reference: shuffle values, recompute J directly
    codes = levels
    observed = normal.jt_statistic
    extreme, draws = 0, 4000
    shuffler = np.random.default_rng(99)
    for _ in range(draws):
        v = shuffler.permutation(values)
        j = sum(
            ((v[codes == hi][None, :] > v[codes == lo][:, None]).sum()
             + 0.5 * (v[codes == hi][None, :] == v[codes == lo][:, None]).sum())
            for lo in range(4) for hi in range(lo + 1, 4)
        )  # fmt: skip
        extreme += abs(j - normal.jt_expected) >= abs(observed - normal.jt_expected) - 1e-9
    reference = extreme / draws
    assert abs(normal.jt_p - reference) < 0.03
    assert abs(permuted.jt_p - reference) < 0.03
    assert 0.02 < reference < 0.98  # a non-trivial case


def test_trend_direction_one_sided_and_spearman():
    levels = np.repeat([1, 2, 3, 4], 6)
    values = -0.5 * levels + np.random.default_rng(1).normal(0, 0.5, levels.size)
    two = trend_test(values, levels, n_boot=500)
    down = trend_test(values, levels, alternative="decreasing", n_boot=100)
    up = trend_test(values, levels, alternative="increasing", n_boot=100)
    assert two.direction == "decreasing" and two.jt_z < 0
    assert down.jt_p == pytest.approx(two.jt_p / 2) and up.jt_p > 0.99
    rho = scipy.stats.spearmanr(levels, values)
    assert two.spearman_rho == pytest.approx(rho.statistic)
    assert two.spearman_ci_low < two.spearman_rho < two.spearman_ci_high < 0
    with pytest.raises(ConfigError, match="unknown trend-test method"):
        trend_test(values, levels, method="magic")
    with pytest.raises(ConfigError, match="2 distinct levels"):
        trend_test(values, np.ones(levels.size))


def test_weighted_ranks_and_correlation_equal_expanded_resample():
    rng = np.random.default_rng(0)
    x = np.round(rng.normal(size=12), 1)
    y = np.round(rng.normal(size=12), 1)
    weights = rng.integers(0, 4, size=(5, 12)).astype(float)
    ranks = _weighted_midranks(x, weights)
    spearman = _weighted_correlation(x, y, weights, "spearman")
    pearson = _weighted_correlation(x, y, weights, "pearson")
    for k in range(5):
        rows = np.repeat(np.arange(12), weights[k].astype(int))
        expanded_ranks = scipy.stats.rankdata(x[rows])
        np.testing.assert_allclose(ranks[k][rows], expanded_ranks)
        assert spearman[k] == pytest.approx(scipy.stats.spearmanr(x[rows], y[rows]).statistic)
        assert pearson[k] == pytest.approx(scipy.stats.pearsonr(x[rows], y[rows]).statistic)


def _clustered(rng, n_clusters, size, cluster_level_x):
    codes = np.repeat(np.arange(n_clusters), size)
    x = rng.normal(size=n_clusters)[codes]
    if not cluster_level_x:
        x = x + 0.3 * rng.normal(size=codes.size)
    y = rng.normal(size=n_clusters)[codes] + 0.3 * rng.normal(size=codes.size)
    return x, y, codes


@pytest.mark.parametrize(("cluster_level_x", "method"), [(False, "pearson"), (True, "spearman")])
def test_cluster_permutation_keeps_nominal_level_where_naive_p_does_not(cluster_level_x, method):
    rng = np.random.default_rng(42)
    sims, naive_rejections, cluster_rejections = 200, 0, 0
    for sim in range(sims):
        x, y, codes = _clustered(rng, 16, 10, cluster_level_x)
        result = cluster_correlation(x, y, codes, method=method, n_boot=20, n_perm=199, seed=sim)
        assert result.null == ("cluster-x" if cluster_level_x else "blocks")
        naive_rejections += result.naive_p < 0.05
        cluster_rejections += result.p <= 0.05
    assert naive_rejections / sims > 0.4
    assert abs(cluster_rejections / sims - 0.05) < 0.04


def test_cluster_correlation_detects_real_relation_and_reports_degenerate_cases():
    rng = np.random.default_rng(7)
    codes = np.repeat(np.arange(20), 6)
    alpha = np.linspace(0, 1, 20)[codes]
    y = 1.5 * alpha + rng.normal(0, 0.3, 20)[codes] + rng.normal(0, 0.2, codes.size)
    result = cluster_correlation(alpha, y, [f"gen{c}" for c in codes], n_boot=500, n_perm=499)
    assert result.r == pytest.approx(scipy.stats.pearsonr(alpha, y).statistic)
    assert result.p < 0.01 and result.ci_low < result.r < result.ci_high
    assert result.n_clusters == 20 and result.null == "cluster-x"
    unequal = cluster_correlation(
        rng.normal(size=6), rng.normal(size=6), [0, 1, 1, 2, 2, 2], null="blocks", n_boot=20
    )
    assert math.isnan(unequal.p) and "same size" in unequal.reason
    constant = cluster_correlation(np.ones(6), rng.normal(size=6), [0, 0, 1, 1, 2, 2])
    assert math.isnan(constant.r) and "constant" in constant.reason
    with pytest.raises(ConfigError, match="constant within every cluster"):
        cluster_correlation(rng.normal(size=6), rng.normal(size=6), [0, 0, 1, 1, 2, 2],
                            null="cluster-x")  # fmt: skip
    with pytest.raises(ConfigError, match="label every row"):
        cluster_correlation(np.arange(4.0), np.arange(4.0), [0, 1, 2])


def test_cluster_bootstrap_mean_matches_explicit_resampling():
    rng = np.random.default_rng(3)
    codes = np.repeat(np.arange(7), [3, 5, 2, 4, 4, 1, 6])
    values = rng.normal(size=codes.size)
    values[4] = np.nan
    result = cluster_bootstrap_mean(values, codes, n_boot=300, seed=9)
    finite = np.isfinite(values)
    assert result.estimate == pytest.approx(values[finite].mean())
    assert result.n == finite.sum() and result.n_dropped == 1 and result.n_clusters == 7
    # explicit reference with the same multinomial draws
    draws = np.random.default_rng(9).multinomial(7, np.full(7, 1 / 7), size=300)
    means = []
    for counts in draws:
        rows = np.concatenate([np.tile(np.flatnonzero(finite & (codes == c)), k)
                               for c, k in enumerate(counts)])  # fmt: skip
        means.append(values[rows].mean())
    assert (result.low, result.high) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    single = cluster_bootstrap_mean([1.0, 2.0], ["a", "a"], n_boot=10)
    assert math.isnan(single.low) and "only 1 cluster" in single.reason


def test_cluster_bootstrap_mean_covers_where_row_bootstrap_does_not():
    rng = np.random.default_rng(5)
    sims, cluster_hits, row_hits = 200, 0, 0
    for sim in range(sims):
        codes = np.repeat(np.arange(25), 8)
        values = rng.normal(size=25)[codes] + 0.3 * rng.normal(size=codes.size)
        low, high = cluster_bootstrap_mean(values, codes, n_boot=400, seed=sim)
        cluster_hits += low <= 0 <= high
        row = bootstrap_ci(values, n_boot=400, seed=sim)
        row_hits += row.low <= 0 <= row.high
    assert cluster_hits / sims > 0.88
    assert row_hits / sims < 0.7


def _dose_data(rng, n_pairs: int, alphas, slope: float):
    """Every pair at every alpha: y = pair effect + slope * alpha + noise."""
    alpha = np.tile(alphas, n_pairs)
    pair = np.repeat(np.arange(n_pairs), len(alphas))
    y = rng.normal(0, 2, n_pairs)[pair] + slope * alpha + rng.normal(0, 1, alpha.size)
    return alpha, y, pair


def test_within_cluster_null_is_calibrated_and_detects_a_dose_response() -> None:
    from rloop.metrics.contrasts import cluster_correlation

    alphas = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    rng = np.random.default_rng(11)
    p_values = []
    for seed in range(200):
        x, y, pair = _dose_data(rng, 8, alphas, 0.0)
        c = cluster_correlation(
            x, y, pair, "spearman", null="within", n_boot=100, n_perm=199, seed=seed
        )
        p_values.append(c.p)
    assert c.null == "within" and c.n_exchangeable_clusters == 8
    assert abs(np.mean(np.array(p_values) < 0.05) - 0.05) < 0.035
    x, y, pair = _dose_data(rng, 8, alphas, 4.0)
    assert cluster_correlation(x, y, pair, "spearman", null="within", n_perm=499).p < 0.01
    # The block shuffle cannot move here: every pair holds the same alpha sequence.
    blocks = cluster_correlation(x, y, pair, "spearman", null="blocks", n_perm=99)
    assert blocks.p == 1.0
