"""Covariates against hand-counted cases; the adjusted effect against numpy lstsq and a
hand-coded HC3 formula on data with a known confounding structure."""

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from rloop.errors import ConfigError
from rloop.metrics.confounds import (
    adjusted_group_effect,
    covariate_correlations,
    is_punctuation_token,
    prompt_covariates,
    sentence_count,
)
from rloop.metrics.stats import benjamini_hochberg


def test_prompt_covariates_hand_counted():
    ids = [5, 6, 5, 7, 5, 8]
    strings = [" The", ",", " the", ".", "\u0120!", "\n"]
    text = "Hello there. Is it? Yes..."
    covariates = prompt_covariates(text, ids, n_tokens=20, tokens_text=strings)
    assert covariates == {
        "n_tokens": 20.0,
        "type_token_ratio": 4 / 6,
        "repeated_token_share": 2 / 6,  # the 2nd and 3rd 5
        "punctuation_share": 3 / 6,  # ",", ".", "Ġ!" ("\n" is whitespace)
        "sentence_count": 3.0,
    }
    with_context = prompt_covariates(text, ids, 20, strings, context_token_ids=[8, 1])
    assert with_context["repeated_token_share"] == 3 / 6  # 8 occurred before the window
    assert math.isnan(prompt_covariates(text, ids, 20)["punctuation_share"])
    with pytest.raises(ConfigError, match="tokens_text has 2"):
        prompt_covariates(text, ids, 20, tokens_text=["a", "b"])
    with pytest.raises(ConfigError, match="empty"):
        prompt_covariates(text, [], 20)
    with pytest.raises(ConfigError, match="n_tokens"):
        prompt_covariates(text, ids, 3)


def test_punctuation_and_sentences():
    assert is_punctuation_token("--") and is_punctuation_token(" \u201c")
    assert is_punctuation_token("\u2581?")  # SentencePiece marker then "?"
    assert not is_punctuation_token("+") and not is_punctuation_token(" ")
    assert not is_punctuation_token("ab.") and not is_punctuation_token("")
    assert sentence_count("") == 0 and sentence_count("no end mark") == 1
    assert sentence_count('She said "stop!" Then left.') == 2
    assert sentence_count("3.14 is pi") == 1  # a dot inside a number is no sentence end
    assert sentence_count("Wait... what?! Fine") == 3


def test_covariate_correlations_against_scipy_and_constant_covariate():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"rv": rng.normal(size=40)})
    df["length"] = df["rv"] * 2 + rng.normal(size=40)
    df["punct"] = rng.normal(size=40)
    df.loc[3, "punct"] = np.nan
    df["flat"] = 7.0
    table = covariate_correlations(df, "rv", ["length", "punct", "flat"], n_boot=500, seed=1)
    length = scipy.stats.spearmanr(df["length"], df["rv"])
    assert table.rho[0] == pytest.approx(length.statistic) and table.p[0] == pytest.approx(
        length.pvalue
    )
    keep = df["punct"].notna()
    assert table.rho[1] == pytest.approx(
        scipy.stats.spearmanr(df.punct[keep], df.rv[keep]).statistic
    )
    assert table.n[1] == 39 and table.n_dropped[1] == 1
    assert table.ci_low[0] < table.rho[0] < table.ci_high[0]
    assert table.estimable.tolist() == [True, True, False]
    assert table.reason[2] == "constant covariate" and table.reason[0] is None
    np.testing.assert_allclose(table.p_bh, benjamini_hochberg(table.p))
    with pytest.raises(ConfigError, match="not in the table"):
        covariate_correlations(df, "rv", ["nope"])


def _confounded(rng, n=120):
    group = np.r_[np.ones(n // 2), np.zeros(n // 2)]
    cov = 0.8 * group + rng.normal(size=n)  # recursive prompts are longer, say
    noise = rng.normal(size=n) * (0.5 + group)  # heteroskedastic
    y = 2.0 * group + 3.0 * cov + noise
    labels = np.where(group == 1, "recursive", "baseline")
    return pd.DataFrame({"y": y, "group": labels, "cov": cov}), group, cov, y


def _hc3(design, y):
    beta = np.linalg.lstsq(design, y, rcond=None)[0]
    residual = y - design @ beta
    bread = np.linalg.inv(design.T @ design)
    leverage = np.einsum("ij,jk,ik->i", design, bread, design)
    meat = design.T @ (design * (residual**2 / (1 - leverage) ** 2)[:, None])
    return beta, np.sqrt(np.diag(bread @ meat @ bread))


def test_adjusted_effect_matches_lstsq_and_hand_hc3():
    rng = np.random.default_rng(3)
    df, group, cov, y = _confounded(rng)
    df = pd.concat([df, pd.DataFrame({"y": [1.0, np.nan], "group": ["other", "baseline"],
                                      "cov": [0.0, 1.0]})], ignore_index=True)  # fmt: skip
    result = adjusted_group_effect(df, "y", "group", ("recursive", "baseline"), ["cov"])
    assert result.n == 120 and result.n_dropped == 1  # the "other" row is not counted
    assert result.raw_gap == pytest.approx(y[group == 1].mean() - y[group == 0].mean())
    raw_beta, raw_se = _hc3(np.column_stack([np.ones(120), group]), y)
    assert result.raw_se == pytest.approx(raw_se[1])
    design = np.column_stack([np.ones(120), group, cov])
    beta, se = _hc3(design, y)
    assert result.adjusted_effect == pytest.approx(beta[1])
    assert result.covariate_coefficients["cov"] == pytest.approx(beta[2])
    assert result.adjusted_se == pytest.approx(se[1])
    t = scipy.stats.t.ppf(0.975, 117)
    assert result.adjusted_ci_low == pytest.approx(beta[1] - t * se[1])
    assert result.adjusted_p == pytest.approx(2 * scipy.stats.t.sf(abs(beta[1] / se[1]), 117))
    assert result.share_explained == pytest.approx(1 - beta[1] / result.raw_gap)
    # the known structure: raw gap ~ 2 + 3 * 0.8 = 4.4, adjusted ~ 2
    assert 3.4 < result.raw_gap < 5.4 and result.adjusted_ci_low < 2.0 < result.adjusted_ci_high
    assert result.reason is None and result.share_reason is None


def test_adjusted_effect_drops_constant_and_collinear_covariates():
    rng = np.random.default_rng(4)
    df, *_ = _confounded(rng)
    df["flat"] = 1.0
    df["cov_scaled"] = 2.0 * df["cov"] + 1.0
    df["tiny"] = rng.normal(size=len(df)) * 1e-9  # small units, not collinear
    result = adjusted_group_effect(
        df, "y", "group", ("recursive", "baseline"), ["flat", "cov", "cov_scaled", "tiny"]
    )
    assert result.covariates_used == ("cov", "tiny")
    assert result.covariates_dropped == {
        "flat": "constant in the rows used",
        "cov_scaled": "collinear with intercept, cov",
    }
    confounded = df.assign(same=(df["group"] == "recursive").astype(float) * 3 - 1)
    blocked = adjusted_group_effect(confounded, "y", "group", ("recursive", "baseline"), ["same"])
    assert math.isnan(blocked.adjusted_effect) and "not identifiable" in blocked.reason
    assert math.isfinite(blocked.raw_gap) and blocked.share_reason == "adjusted effect undefined"


def test_share_explained_undefined_for_a_gap_within_noise():
    rng = np.random.default_rng(5)
    df = pd.DataFrame({"y": rng.normal(size=60), "group": ["a", "b"] * 30,
                       "cov": rng.normal(size=60)})  # fmt: skip
    result = adjusted_group_effect(df, "y", "group", ("a", "b"), ["cov"])
    assert result.raw_ci_low < 0 < result.raw_ci_high
    assert math.isnan(result.share_explained) and "within noise" in result.share_reason
    assert math.isfinite(result.adjusted_effect)
    with pytest.raises(ConfigError, match="must contain both"):
        adjusted_group_effect(df, "y", "group", ("a", "c"), ["cov"])
    with pytest.raises(ConfigError, match="two different"):
        adjusted_group_effect(df, "y", "group", ("a", "a"), ["cov"])
