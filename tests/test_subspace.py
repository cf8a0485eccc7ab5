"""Subspace geometry: top directions, shares, principal angles, overlaps, resampling, logit lens.

Every expected value comes from an independent route: scipy's subspace_angles, numpy SVD/PCA,
planted subspaces whose answer is known, or the analytic k / d of random subspaces.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from rloop.errors import ConfigError
from rloop.metrics.subspace import (
    _StackedGroup,
    bootstrap_principal_angles,
    layer_to_layer_overlap,
    logit_lens_tokens,
    orthonormal_basis,
    principal_angles,
    random_overlap,
    random_split_null,
    split_half_overlap,
    subspace_overlap,
    subspace_share,
    top_directions,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Small float64 SVDs: one intra-op thread is fastest and does not oversubscribe a busy
    2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_basis(rng: np.random.Generator, k: int, d: int) -> np.ndarray:
    """k orthonormal rows in R^d, uniformly distributed (QR of a Gaussian matrix)."""
    q, _ = np.linalg.qr(rng.standard_normal((d, k)))
    return q.T  # (k, d)


def _planted_windows(
    rng: np.random.Generator, basis: np.ndarray, n: int = 30, w: int = 16, noise: float = 0.05
) -> np.ndarray:
    """Windows (n, W, d) whose rows are large combinations of ``basis`` rows plus small noise."""
    k, d = basis.shape
    scales = np.linspace(3.0, 1.5, k)  # distinct singular values: a well-defined top-k
    coefficients = rng.standard_normal((n, w, k)) * scales  # (n, W, k)
    return coefficients @ basis + noise * rng.standard_normal((n, w, d))  # (n, W, d)


def _scipy_angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """scipy's principal angles for row bases, sorted ascending (scipy returns descending)."""
    return np.sort(scipy.linalg.subspace_angles(a.T, b.T))


# ----------------------------------------------------------------------------------------------
# top_directions and subspace_share


def test_top_directions_recover_a_planted_subspace():
    rng = np.random.default_rng(0)
    planted = _random_basis(rng, 3, 40)
    windows = _planted_windows(rng, planted)
    top = top_directions(windows, 3)
    assert top.directions.shape == (3, 40)
    assert top.directions.dtype == torch.float64
    assert subspace_overlap(top.directions, planted) > 0.999
    # Orthonormal rows.
    gram = top.directions @ top.directions.T
    torch.testing.assert_close(gram, torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0)
    # Shares: the whole spectrum sums to 1, the top-k part is below 1 and holds nearly all.
    assert math.isclose(float(top.spectrum_share.sum()), 1.0, rel_tol=1e-12)
    assert top.total_share <= 1.0
    assert top.total_share > 0.99
    assert torch.all(top.variance_share[:-1] >= top.variance_share[1:])


def test_top_directions_match_numpy_svd_and_pca():
    rng = np.random.default_rng(1)
    windows = rng.standard_normal((6, 5, 8)) + 2.0  # a mean offset: centring matters
    rows = windows.reshape(-1, 8)
    for center in (False, True):
        matrix = rows - rows.mean(axis=0) if center else rows
        _, singular, vh = np.linalg.svd(matrix, full_matrices=False)
        top = top_directions(windows, 4, center=center)
        expected_share = singular**2 / (singular**2).sum()
        np.testing.assert_allclose(top.spectrum_share.numpy(), expected_share, atol=1e-12)
        np.testing.assert_allclose(top.variance_share.numpy(), expected_share[:4], atol=1e-12)
        # Same vectors up to sign; rloop's sign makes the largest-|entry| positive.
        for row, expected in zip(top.directions.numpy(), vh[:4], strict=True):
            assert abs(abs(row @ expected) - 1.0) < 1e-10
            assert row[np.argmax(np.abs(row))] > 0
    assert top_directions(windows, 2, center=True).mean is not None
    np.testing.assert_allclose(
        top_directions(windows, 2, center=True).mean.numpy(), rows.mean(axis=0), atol=1e-12
    )


def test_top_directions_accepts_a_list_of_windows_of_different_lengths():
    rng = np.random.default_rng(2)
    windows = [rng.standard_normal((w, 6)) for w in (4, 7, 5)]
    stacked = np.concatenate(windows, axis=0)
    expected = np.linalg.svd(stacked, full_matrices=False)[2][:2]
    top = top_directions([torch.tensor(w, dtype=torch.float32) for w in windows], 2)
    assert top.n_prompts == 3 and top.n_rows == 16
    # float32 input: compare at float32 precision.
    assert subspace_overlap(top.directions, expected) == pytest.approx(1.0, abs=1e-5)


def test_top_directions_rejects_k_above_the_rank_limit():
    windows = np.random.default_rng(3).standard_normal((2, 3, 10))  # 6 rows, d = 10
    with pytest.raises(ConfigError, match=r"k = 7 exceeds .* = 6"):
        top_directions(windows, 7)
    with pytest.raises(ConfigError, match=r"k = 6 exceeds .* = 5"):
        top_directions(windows, 6, center=True)  # centring removes one dimension
    rank_two = np.random.default_rng(4).standard_normal((4, 5, 2)) @ np.eye(2, 10)  # rank 2
    with pytest.raises(ConfigError, match=r"k = 3 exceeds the numerical rank .* = 2"):
        top_directions(rank_two, 3)
    with pytest.raises(ConfigError, match="all zeros"):
        top_directions(np.zeros((2, 3, 4)), 1)
    with pytest.raises(ConfigError, match="NaN"):
        top_directions(np.full((2, 3, 4), np.nan), 1)
    with pytest.raises(ConfigError, match=r"\(n, W, d\)"):
        top_directions(np.ones((3, 4)), 1)


def test_subspace_share_against_projection_formula():
    # Hand case: rows e0 and e1 of equal norm, basis e0 -> half the squared norm.
    window = np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    assert float(subspace_share(window, np.array([[1.0, 0.0, 0.0]]))) == pytest.approx(0.5)
    # Non-orthonormal basis rows spanning e0, e1 -> everything.
    assert float(subspace_share(window, np.array([[1.0, 1.0, 0.0], [1.0, -1.0, 0.0]]))) == (
        pytest.approx(1.0)
    )
    rng = np.random.default_rng(5)
    windows = rng.standard_normal((4, 6, 9))
    basis = rng.standard_normal((3, 9))  # not orthonormal
    projector = basis.T @ np.linalg.inv(basis @ basis.T) @ basis  # (d, d)
    expected = [np.sum((x @ projector) ** 2) / np.sum(x**2) for x in windows]
    shares = subspace_share(windows, basis)
    np.testing.assert_allclose(shares.numpy(), expected, atol=1e-12)
    assert torch.all((shares >= 0) & (shares <= 1))
    # With a mean subtracted first.
    mean = rng.standard_normal(9)
    expected = [np.sum(((x - mean) @ projector) ** 2) / np.sum((x - mean) ** 2) for x in windows]
    np.testing.assert_allclose(subspace_share(windows, basis, mean=mean).numpy(), expected)


def test_subspace_share_of_a_zero_window_is_nan():
    shares = subspace_share(np.zeros((2, 3, 4)), np.eye(1, 4))
    assert torch.isnan(shares).all()


# ----------------------------------------------------------------------------------------------
# principal angles and overlap


@pytest.mark.parametrize(("k_a", "k_b", "d"), [(3, 3, 12), (2, 5, 9), (5, 2, 9), (1, 1, 4)])
def test_principal_angles_match_scipy(k_a, k_b, d):
    rng = np.random.default_rng(10 + k_a + k_b)
    a = rng.standard_normal((k_a, d))
    b = rng.standard_normal((k_b, d))
    angles = principal_angles(a, b)
    assert angles.shape == (min(k_a, k_b),)
    np.testing.assert_allclose(angles.numpy(), _scipy_angles(a, b), atol=1e-10, rtol=0)
    assert torch.all(angles[:-1] <= angles[1:])


def test_principal_angles_are_accurate_for_nearly_identical_subspaces():
    rng = np.random.default_rng(11)
    a = _random_basis(rng, 4, 20)
    b = a + 1e-7 * rng.standard_normal(a.shape)  # angles around 1e-7 rad
    angles = principal_angles(a, b).numpy()
    np.testing.assert_allclose(angles, _scipy_angles(a, b), atol=1e-10, rtol=0)
    assert angles.max() < 1e-5
    np.testing.assert_allclose(principal_angles(a, a).numpy(), 0.0, atol=1e-10)


def test_principal_angles_of_a_known_rotation():
    # span(e0, e1) vs span(e0, cos t e1 + sin t e2): angles 0 and t.
    theta = 0.3
    a = np.eye(2, 5)
    b = np.array([[1.0, 0, 0, 0, 0], [0, math.cos(theta), math.sin(theta), 0, 0]])
    np.testing.assert_allclose(principal_angles(a, b).numpy(), [0.0, theta], atol=1e-12)
    assert subspace_overlap(a, b) == pytest.approx((1 + math.cos(theta) ** 2) / 2)


def test_overlap_is_mean_squared_cosine_of_scipy_angles():
    rng = np.random.default_rng(12)
    a, b = rng.standard_normal((4, 10)), rng.standard_normal((4, 10))
    expected = np.mean(np.cos(scipy.linalg.subspace_angles(a.T, b.T)) ** 2)
    assert subspace_overlap(a, b) == pytest.approx(expected, abs=1e-12)
    assert subspace_overlap(a, 3.0 * a) == pytest.approx(1.0, abs=1e-12)
    assert subspace_overlap(np.eye(2, 6), np.eye(6)[2:4]) == pytest.approx(0.0, abs=1e-15)


def test_random_subspaces_overlap_k_over_d():
    rng = np.random.default_rng(13)
    k, d, trials = 5, 40, 400
    overlaps = np.array(
        [
            subspace_overlap(_random_basis(rng, k, d), _random_basis(rng, k, d))
            for _ in range(trials)
        ]
    )
    standard_error = overlaps.std(ddof=1) / math.sqrt(trials)
    assert abs(overlaps.mean() - k / d) < 4 * standard_error
    assert random_overlap(k, k, d) == k / d


def test_bases_must_be_independent_and_share_d():
    with pytest.raises(ConfigError, match="spans only 1 dimensions"):
        principal_angles(np.array([[1.0, 0.0], [2.0, 0.0]]), np.eye(2))
    with pytest.raises(ConfigError, match="different dimensions"):
        subspace_overlap(np.eye(2, 4), np.eye(2, 5))
    assert orthonormal_basis(np.array([[3.0, 4.0]])).abs().sum() == pytest.approx(1.4)


def test_layer_to_layer_overlap():
    rng = np.random.default_rng(14)
    a, b = rng.standard_normal((3, 8)), rng.standard_normal((3, 8))
    overlaps = layer_to_layer_overlap([a, 2.0 * a, b])
    np.testing.assert_allclose(
        overlaps.numpy(),
        [1.0, np.mean(np.cos(scipy.linalg.subspace_angles(a.T, b.T)) ** 2)],
        atol=1e-12,
    )
    with pytest.raises(ConfigError, match=r"bases\[1\] has d = 9"):
        layer_to_layer_overlap([a, rng.standard_normal((3, 9))])


# ----------------------------------------------------------------------------------------------
# split halves, bootstrap, null


def test_split_half_overlap_on_planted_and_isotropic_data():
    rng = np.random.default_rng(20)
    planted = _planted_windows(rng, _random_basis(rng, 2, 24), n=20, w=8)
    result = split_half_overlap(planted, 2, n_splits=20, seed=0)
    assert result.overlaps.shape == (20,)
    assert result.mean > 0.999
    assert result.heldout_mean > 0.99
    assert torch.all(result.heldout_share <= result.insample_share + 1e-12)
    # Isotropic noise: the other half's top-k is an unrelated subspace, so it explains about
    # k / d of the held-out variance.
    k, d = 3, 30
    isotropic = rng.standard_normal((40, 8, d))
    noise = split_half_overlap(isotropic, k, n_splits=30, seed=1)
    assert noise.heldout_mean == pytest.approx(k / d, abs=0.03)
    assert noise.mean < 0.5
    summary = noise.to_dict()
    assert summary["random_overlap"] == pytest.approx(k / d)
    assert summary["overlap_q025"] <= summary["overlap_mean"] <= summary["overlap_q975"]


def test_split_half_overlap_is_seeded():
    windows = np.random.default_rng(21).standard_normal((10, 4, 12))
    first = split_half_overlap(windows, 2, n_splits=5, seed=3)
    second = split_half_overlap(windows, 2, n_splits=5, seed=3)
    assert torch.equal(first.overlaps, second.overlaps)
    assert not torch.equal(first.overlaps, split_half_overlap(windows, 2, 5, seed=4).overlaps)
    with pytest.raises(ConfigError, match="at least 2 prompts"):
        split_half_overlap(windows[:1], 2)
    with pytest.raises(ConfigError, match=r"k = 9 exceeds the rank limit of a half"):
        split_half_overlap(windows[:4], 9)  # halves of 2 prompts x 4 rows = 8 rows


@pytest.mark.parametrize(("w", "d", "center"), [(3, 20, False), (6, 5, False), (4, 10, True)])
def test_weighted_resample_equals_explicit_resample(w, d, center):
    """The bootstrap's weighted-Gram shortcut gives the top-k of the explicitly resampled
    group, on both of its branches (N <= d and N > d) and centred."""
    rng = np.random.default_rng(22)
    windows = [torch.tensor(rng.standard_normal((w, d))) for _ in range(5)]
    counts = np.array([2, 0, 1, 0, 2])
    explicit = [windows[i] for i, c in enumerate(counts) for _ in range(c)]
    expected = top_directions(explicit, 2, center=center).directions
    got = _StackedGroup(windows, center).top_k(counts, 2)
    np.testing.assert_allclose(principal_angles(got, expected).numpy(), 0.0, atol=1e-7)
    torch.testing.assert_close(got @ got.T, torch.eye(2, dtype=torch.float64))


def test_bootstrap_principal_angles_recover_a_planted_angle():
    rng = np.random.default_rng(23)
    theta = 0.5
    basis_a = np.eye(2, 16)
    basis_b = np.zeros((2, 16))
    basis_b[0, 0] = 1.0
    basis_b[1, 1], basis_b[1, 2] = math.cos(theta), math.sin(theta)
    group_a = _planted_windows(rng, basis_a, n=16, w=6, noise=0.02)
    group_b = _planted_windows(rng, basis_b, n=16, w=6, noise=0.02)
    result = bootstrap_principal_angles(group_a, group_b, 2, n_boot=60, seed=0)
    np.testing.assert_allclose(result.angles.numpy(), [0.0, theta], atol=0.02)
    assert result.samples.shape == (60, 2)
    assert torch.all(result.low <= result.angles + 1e-9)
    assert torch.all(result.high >= result.angles - 1e-9)
    assert result.low[1] < theta < result.high[1]
    assert result.overlap == pytest.approx((1 + math.cos(theta) ** 2) / 2, abs=0.02)
    assert result.n_undefined == 0
    frame = result.to_frame()
    assert list(frame["angle_index"]) == [0, 1]
    again = bootstrap_principal_angles(group_a, group_b, 2, n_boot=60, seed=0)
    assert torch.equal(result.samples, again.samples)


def test_random_split_null_is_small_for_one_planted_group_and_flags_a_real_difference():
    rng = np.random.default_rng(24)
    basis = _random_basis(rng, 2, 20)
    group = _planted_windows(rng, basis, n=20, w=6, noise=0.05)
    null = random_split_null(group, 2, n_splits=40, seed=0)
    assert null.samples.shape == (40, 2)
    assert torch.all((null.samples >= 0) & (null.samples <= math.pi / 2))
    assert float(null.q_high.max()) < 0.05
    # An orthogonal subspace's angles (pi/2) exceed every null split: minimal p-value.
    p = null.exceedance(torch.tensor([math.pi / 2, math.pi / 2]))
    np.testing.assert_allclose(p.numpy(), 1.0 / 41)


# ----------------------------------------------------------------------------------------------
# logit lens


def test_logit_lens_tokens_on_a_hand_built_unembedding():
    d, vocab = 4, 10
    unembed = torch.zeros(vocab, d)
    unembed[3] = torch.tensor([1.0, 0, 0, 0])  # promoted by +e0
    unembed[7] = torch.tensor([-1.0, 0, 0, 0])  # promoted by -e0
    unembed[5] = torch.tensor([0, 2.0, 0, 0])  # strongly promoted by +e1
    unembed[1] = torch.tensor([0.5, 0.5, 0, 0])  # mildly by both
    unembed[8] = torch.tensor([0, -1.0, 0, 0])  # promoted by -e1
    directions = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    frame = logit_lens_tokens(directions, lambda x: x, unembed, top_n=2, decode=lambda i: f"tok{i}")
    assert list(frame.columns) == ["direction", "sign", "rank", "token_id", "logit", "token"]
    top = frame[frame["rank"] == 0].set_index(["direction", "sign"])["token_id"].to_dict()
    assert top == {(0, "+"): 3, (0, "-"): 7, (1, "+"): 5, (1, "-"): 8}
    second = frame[(frame["direction"] == 1) & (frame["sign"] == "+")]
    assert list(second["token_id"]) == [5, 1]
    np.testing.assert_allclose(second["logit"].to_numpy(), [2.0, 0.5])
    assert frame.loc[0, "token"] == "tok3"


def test_logit_lens_applies_the_final_norm_with_its_bias():
    # A LayerNorm without affine terms centres the vector; a bias then shifts the result, so
    # -u is not simply the negation of +u after the norm. Compare with a direct computation.
    torch.manual_seed(0)
    d, vocab = 6, 50
    norm = torch.nn.LayerNorm(d)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1.0, 1.0)
    unembed = torch.randn(vocab, d)
    directions = torch.randn(3, d)
    frame = logit_lens_tokens(directions, norm, unembed, top_n=4, scale=5.0)
    with torch.no_grad():
        for j in range(3):
            for sign, factor in (("+", 1.0), ("-", -1.0)):
                logits = unembed.double() @ norm(factor * 5.0 * directions[j]).double()
                expected = torch.topk(logits, 4).indices.tolist()
                rows = frame[(frame["direction"] == j) & (frame["sign"] == sign)]
                assert list(rows["token_id"]) == expected
    with pytest.raises(ConfigError, match="d_model = 6"):
        logit_lens_tokens(torch.randn(1, 5), norm, unembed)
    with pytest.raises(ConfigError, match="top_n = 51 exceeds"):
        logit_lens_tokens(directions, norm, unembed, top_n=51)
