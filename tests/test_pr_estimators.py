"""Bias-corrected participation ratio: formulas against explicit loops, unbiasedness of the
moment estimates and the reduction of bias on Gaussian data with a known covariance."""

import math

import numpy as np
import pytest
import torch

from rloop.errors import ConfigError
from rloop.metrics.estimators import (
    REASON_NO_OVERLAP,
    participation_ratio_corrected,
    participation_ratio_corrected_with_reason,
    unbiased_trace_moments,
    window_pr_corrected,
)
from rloop.metrics.participation import REASON_NON_FINITE, REASON_ZERO_WINDOW, participation_ratio


def _loop_moments(x):
    w = x.shape[0]
    t1 = sum(x[i] @ x[i] * (x[j] @ x[j]) for i in range(w) for j in range(w) if i != j)
    t2 = sum((x[i] @ x[j]) ** 2 for i in range(w) for j in range(w) if i != j)
    return t1 / (w * (w - 1)), t2 / (w * (w - 1))


def test_moments_and_corrected_pr_match_explicit_pair_sums():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 6, 5)) * 1e3  # batched, large units
    t1, t2 = unbiased_trace_moments(x)
    pr = participation_ratio_corrected(torch.as_tensor(x, dtype=torch.float32))
    assert t1.shape == t2.shape == pr.shape == (2, 3) and pr.dtype == torch.float64
    for index in np.ndindex(2, 3):
        ref1, ref2 = _loop_moments(x[index])
        assert t1[index].item() == pytest.approx(ref1, rel=1e-12)
        assert t2[index].item() == pytest.approx(ref2, rel=1e-12)
        assert pr[index].item() == pytest.approx(ref1 / ref2, rel=1e-5)  # float32 input
    assert (pr >= 1).all()
    scaled = participation_ratio_corrected(x * 1e-30)
    np.testing.assert_allclose(scaled, participation_ratio_corrected(x), rtol=1e-12)


def test_moment_estimates_are_unbiased_with_a_mean():
    rng = np.random.default_rng(1)
    d, w, draws = 10, 4, 40_000
    root = rng.normal(size=(d, d)) / math.sqrt(d)
    mu = rng.normal(size=d)
    second_moment = root @ root.T + np.outer(mu, mu)  # M = Sigma + mu mu^T
    x = rng.normal(size=(draws, w, d)) @ root.T + mu  # (draws, W, d)
    t1, t2 = unbiased_trace_moments(x)
    assert t1.mean().item() == pytest.approx(np.trace(second_moment) ** 2, rel=0.02)
    assert t2.mean().item() == pytest.approx(np.trace(second_moment @ second_moment), rel=0.02)


@pytest.mark.parametrize("window", [8, 16])
def test_corrected_pr_removes_most_of_the_finite_sample_bias(window):
    d = 64
    eigenvalues = np.exp(-np.arange(d) / 12)
    population = eigenvalues.sum() ** 2 / (eigenvalues**2).sum()  # about 23.8
    generator = torch.Generator().manual_seed(window)
    x = torch.randn(3000, window, d, generator=generator, dtype=torch.float64)
    x = x * torch.as_tensor(np.sqrt(eigenvalues))  # rows ~ N(0, diag(eigenvalues))
    plain_bias = participation_ratio(x).mean().item() - population
    corrected_bias = participation_ratio_corrected(x).mean().item() - population
    assert plain_bias < -10  # PR <= W < population PR
    assert abs(corrected_bias) < 0.2 * abs(plain_bias)


def test_corrected_pr_with_a_mean_estimates_the_uncentred_population_pr():
    d, window = 32, 16
    rng = np.random.default_rng(2)
    eigenvalues = np.linspace(1.0, 0.1, d)
    mu = np.full(d, 0.3)
    second_moment = np.diag(eigenvalues) + np.outer(mu, mu)
    population = np.trace(second_moment) ** 2 / np.trace(second_moment @ second_moment)
    x = rng.normal(size=(3000, window, d)) * np.sqrt(eigenvalues) + mu
    plain_bias = participation_ratio(x).mean().item() - population
    corrected_bias = participation_ratio_corrected(x).mean().item() - population
    assert abs(corrected_bias) < 0.2 * abs(plain_bias)


def test_undefined_windows_give_nan_with_reasons():
    windows = torch.zeros(4, 3, 3, dtype=torch.float64)
    windows[0] = torch.eye(3)  # orthogonal rows
    windows[1, 0, 0] = 1.0  # one non-zero row
    windows[2, 0, 0] = float("nan")
    windows[3] = torch.tensor([[1.0, 2.0, 0.0], [0.5, 1.0, 1.0], [0.0, 1.0, 3.0]])
    pr, reasons = participation_ratio_corrected_with_reason(windows)
    assert torch.isnan(pr[:3]).all() and math.isfinite(pr[3].item())
    assert reasons == [REASON_NO_OVERLAP, REASON_NO_OVERLAP, REASON_NON_FINITE, None]
    zero_pr, zero_reason = participation_ratio_corrected_with_reason(torch.zeros(3, 2))
    assert math.isnan(zero_pr.item()) and zero_reason == REASON_ZERO_WINDOW
    with pytest.raises(ConfigError, match="at least 2 rows"):
        participation_ratio_corrected(torch.ones(1, 4))


def test_window_modes_match_their_definitions():
    v = torch.randn(2, 8, 3, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    whole = window_pr_corrected(v, "whole")
    per_head = window_pr_corrected(v, "per-head")
    expected_whole = participation_ratio_corrected(v.reshape(2, 8, 12))
    expected_heads = torch.stack(
        [participation_ratio_corrected(v[:, :, h, :]) for h in range(3)], dim=-1
    ).mean(dim=-1)
    torch.testing.assert_close(whole, expected_whole)
    torch.testing.assert_close(per_head, expected_heads)
    with pytest.raises(ConfigError, match="unknown PR mode"):
        window_pr_corrected(v, "mean")
