"""Specification curves: per-spec numbers against scipy, the joint test against exact
enumeration, its calibration under the null and its power under a planted effect."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from rloop.errors import ConfigError
from rloop.metrics.specification import (
    effect_variance_by_factor,
    specification_curve,
    specification_joint_test,
)
from rloop.metrics.stats import cohens_d, hedges_correction, hedges_g


def _correlated_specs(rng, n_prompts, n_specs, shift=0.0, labels=None):
    """Values whose specs share a per-prompt factor (correlation ~0.7 between specs)."""
    prompt = rng.normal(size=(n_prompts, 1))
    values = prompt + 0.65 * rng.normal(size=(n_prompts, n_specs))
    if labels is not None:
        values = values + shift * labels[:, None] * np.linspace(0.5, 1.5, n_specs)
    return values


def test_unpaired_per_spec_numbers_match_scipy():
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(12, bool), np.zeros(15, bool)]
    values = _correlated_specs(rng, 27, 4, shift=0.8, labels=labels)
    values[[0, 3, 20], 1] = np.nan  # prompts excluded from spec 1
    table = pd.DataFrame({"layer": [4, 4, 8, 8], "window": [8, 16, 8, 16]})
    curve = specification_curve(values, labels=labels, spec_table=table, n_perm=99, seed=1)
    specs = curve.specs
    assert list(specs.columns[:2]) == ["layer", "window"]
    for s in range(4):
        col = values[:, s]
        keep = np.isfinite(col)
        a, b = col[keep & labels], col[keep & ~labels]
        g = hedges_g(a, b)
        assert specs.effect[s] == pytest.approx(g, rel=1e-10)
        assert specs.p[s] == pytest.approx(scipy.stats.ttest_ind(a, b).pvalue, rel=1e-8)
        assert (specs.n_target[s], specs.n_control[s]) == (a.size, b.size)
        se = math.sqrt(1 / a.size + 1 / b.size + g**2 / (2 * (a.size + b.size)))
        assert specs.ci_low[s] == pytest.approx(g - 1.959963984540054 * se)
        assert specs.ci_high[s] == pytest.approx(g + 1.959963984540054 * se)
    assert sorted(specs.curve_rank) == [0, 1, 2, 3]
    assert specs.effect[specs.curve_rank.idxmin()] == specs.effect.min()
    assert curve.median_effect == pytest.approx(np.median(specs.effect))
    significant = specs.p < 0.05
    assert curve.share_significant_positive == pytest.approx(
        (significant & (specs.effect > 0)).mean()
    )
    d0 = cohens_d(values[labels, 0], values[~labels, 0])
    assert specs.effect[0] == pytest.approx(d0 * hedges_correction(25))


def test_paired_per_spec_numbers_match_scipy():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(20, 3))
    pairs = np.array([(i, i + 10) for i in range(10)])
    values[:10] += 0.7
    values[2, 0] = np.nan  # pair 2 drops out of spec 0
    curve = specification_curve(values, pairs=pairs, effect="d_z", n_perm=99)
    for s in range(3):
        diffs = values[:10, s] - values[10:, s]
        diffs = diffs[np.isfinite(diffs)]
        assert curve.specs.effect[s] == pytest.approx(diffs.mean() / diffs.std(ddof=1))
        assert curve.specs.p[s] == pytest.approx(scipy.stats.ttest_1samp(diffs, 0).pvalue)
        assert curve.specs.n_target[s] == diffs.size
    assert curve.design == "paired"


def test_not_estimable_specs_are_excluded_and_counted():
    rng = np.random.default_rng(2)
    labels = np.r_[np.ones(8, bool), np.zeros(8, bool)]
    values = rng.normal(size=(16, 5))
    values[:, 1] = np.nan  # nothing measured
    values[1:8, 2] = np.nan  # one target value left
    values[:, 3] = 2.5  # constant
    curve = specification_curve(values, labels=labels, n_perm=199, seed=3)
    assert curve.n_estimable == 2 and curve.n_not_estimable == 3
    reasons = curve.specs.reason.tolist()
    assert reasons[1] == "no finite values"
    assert "target group" in reasons[2] and "zero variance" in reasons[3]
    assert reasons[0] is None and reasons[4] is None
    assert curve.specs.curve_rank[[1, 2, 3]].tolist() == [-1, -1, -1]
    assert curve.median_effect == pytest.approx(np.median(curve.specs.effect[[0, 4]]))
    assert all(math.isfinite(v) for v in (curve.p_median, curve.p_share_significant))
    assert np.isfinite(curve.null_medians).all()
    empty = specification_curve(np.full((6, 2), np.nan), labels=[1, 1, 1, 0, 0, 0], n_perm=9)
    assert empty.n_estimable == 0 and math.isnan(empty.median_effect)


def test_joint_test_matches_exact_sign_flip_enumeration():
    rng = np.random.default_rng(4)
    n_pairs, n_specs = 8, 5
    diffs = 0.4 + rng.normal(size=(n_pairs, 1)) + 0.5 * rng.normal(size=(n_pairs, n_specs))
    values = np.vstack([diffs, np.zeros_like(diffs)])
    pairs = np.array([(i, i + n_pairs) for i in range(n_pairs)])
    curve = specification_curve(values, pairs=pairs, effect="d_z", n_perm=20_000, seed=5)

    def median_dz(d):
        return np.median(d.mean(axis=0) / d.std(axis=0, ddof=1))

    observed = median_dz(diffs)
    null = [median_dz(diffs * np.array(signs)[:, None])
            for signs in itertools.product((-1, 1), repeat=n_pairs)]  # fmt: skip
    exact = np.mean(np.abs(null) >= abs(observed) - 1e-12)
    assert curve.median_effect == pytest.approx(observed)
    assert abs(curve.p_median - exact) < 4 * math.sqrt(exact * (1 - exact) / 20_000) + 1e-3


def test_joint_test_from_precomputed_arrays():
    effects = np.array([0.5, 0.8, np.nan, 0.3])
    p_values = np.array([0.01, 0.001, np.nan, 0.2])
    null_effects = np.array([[0.1, -0.2, 9.0, 0.0], [0.9, 0.7, 9.0, 0.6], [-0.6, -0.9, 9.0, -0.4]])
    null_p = np.array([[0.5, 0.3, 0.0, 0.9], [0.01, 0.02, 0.0, 0.04], [0.03, 0.01, 0.0, 0.2]])
    result = specification_joint_test(effects, p_values, null_effects, null_p)
    assert result["n_specs"] == 4 and result["n_estimable"] == 3
    assert result["median_effect"] == 0.5
    assert result["share_significant_positive"] == pytest.approx(2 / 3)
    # null medians over the estimable specs: 0.0, 0.7, -0.6 -> |.| >= 0.5 twice
    assert result["p_median"] == pytest.approx((1 + 2) / (1 + 3))
    # null max shares: 0, 1, 2/3 -> >= 2/3 twice
    assert result["p_share_significant"] == pytest.approx((1 + 2) / (1 + 3))
    with pytest.raises(ConfigError, match="null_effects"):
        specification_joint_test(effects, p_values, null_effects[:, :2], null_p)


@pytest.mark.parametrize("design", ["unpaired", "paired"])
def test_joint_test_is_calibrated_under_the_null(design):
    rng = np.random.default_rng(10 if design == "unpaired" else 11)
    sims, rejections, share_rejections = 400, 0, 0
    labels = np.r_[np.ones(14, bool), np.zeros(16, bool)]
    pairs = np.array([(i, i + 15) for i in range(15)])
    for sim in range(sims):
        values = _correlated_specs(rng, 30, 12)
        values[rng.random(values.shape) < 0.1] = np.nan  # prompts excluded from some specs
        if design == "unpaired":
            curve = specification_curve(values, labels=labels, n_perm=199, seed=sim)
        else:
            curve = specification_curve(values, pairs=pairs, effect="d_z", n_perm=199, seed=sim)
        rejections += curve.p_median <= 0.05
        share_rejections += curve.p_share_significant <= 0.05
    assert abs(rejections / sims - 0.05) <= 0.03
    assert share_rejections / sims <= 0.08


def test_joint_test_detects_a_planted_effect():
    rng = np.random.default_rng(12)
    labels = np.r_[np.ones(30), np.zeros(30)]
    detected = 0
    for sim in range(40):
        values = _correlated_specs(rng, 60, 30, shift=-0.9, labels=labels)
        curve = specification_curve(values, labels=labels, n_perm=199, seed=sim)
        detected += curve.p_median <= 0.05 and curve.median_effect < 0
    assert detected / 40 > 0.8


def test_bad_inputs_raise_config_error():
    values = np.zeros((6, 2))
    with pytest.raises(ConfigError, match="exactly one"):
        specification_curve(values)
    with pytest.raises(ConfigError, match="unknown effect"):
        specification_curve(values, labels=[1, 1, 1, 0, 0, 0], effect="r")
    with pytest.raises(ConfigError, match="hedges_g"):
        specification_curve(values, labels=[1, 1, 1, 0, 0, 0], effect="d_z")
    with pytest.raises(ConfigError, match="one entry per prompt"):
        specification_curve(values, labels=[1, 0])
    with pytest.raises(ConfigError, match="both groups"):
        specification_curve(values, labels=np.ones(6))
    with pytest.raises(ConfigError, match="outside"):
        specification_curve(values, pairs=[(0, 1), (2, 9)], effect="d_z")
    with pytest.raises(ConfigError, match="spec_table"):
        specification_curve(values, labels=[1, 1, 1, 0, 0, 0], spec_table=pd.DataFrame({"a": [1]}))


def test_effect_variance_by_factor_hand_computed():
    table = pd.DataFrame(
        {
            "layer": ["a", "a", "a", "b", "b", "b"],
            "window": [8, 16, 32, 8, 16, 32],
            "effect": [1.0, 2.0, 3.0, 5.0, 6.0, 7.0],
            "estimable": [True] * 6,
        }
    )
    table.loc[len(table)] = ["b", 8, np.nan, False]  # left out
    out = effect_variance_by_factor(table, ["window", "layer"])
    # grand mean 4, SS_total = 9+4+1+1+4+9 = 28; layer means 2, 6 -> SS = 3*4 + 3*4 = 24;
    # window means 3, 4, 5 -> SS = 2*1 + 0 + 2*1 = 4
    assert out.factor.tolist() == ["layer", "window"]
    assert out.eta_squared.tolist() == pytest.approx([24 / 28, 4 / 28])
    assert out.n_levels.tolist() == [2, 3] and out.n_specs.tolist() == [6, 6]
    assert out.lowest_level_mean.tolist() == [2.0, 3.0]
    flat = effect_variance_by_factor(table.assign(effect=1.0), ["layer"])
    assert math.isnan(flat.eta_squared[0]) and "equal" in flat.reason[0]
    with pytest.raises(ConfigError, match="factor columns"):
        effect_variance_by_factor(table, ["mode"])
