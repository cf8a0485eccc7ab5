"""Participation ratio, spectrum, effective rank, R_V and window gathering against float64
numpy references and hand-made cases."""

import math

import numpy as np
import pytest
import torch

from rloop.errors import ConfigError, PromptError
from rloop.metrics import (
    PR_MODES,
    differentiable_participation_ratio,
    effective_rank,
    last_real_window,
    participation_ratio,
    participation_ratio_with_reason,
    pr_per_head,
    pr_per_head_mean,
    pr_whole,
    r_v,
    singular_spectrum,
    window_pr,
    window_pr_with_reason,
)


def numpy_pr(x: np.ndarray) -> np.ndarray:
    """Reference: PR from the singular values of each window, float64 SVD."""
    s = np.linalg.svd(np.asarray(x, dtype=np.float64), compute_uv=False)  # (..., k)
    return (s**2).sum(-1) ** 2 / (s**4).sum(-1)


@pytest.mark.parametrize("shape", [(16, 64), (16, 8), (4, 4), (5, 3, 16, 32), (7, 2, 40)])
def test_pr_matches_numpy_svd(shape):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape) * rng.uniform(0.1, 10, size=shape[-1])  # anisotropic
    pr = participation_ratio(torch.from_numpy(x))
    assert pr.dtype == torch.float64
    assert pr.shape == shape[:-2]
    np.testing.assert_allclose(pr.numpy(), numpy_pr(x), rtol=1e-12)
    assert (pr >= 1 - 1e-12).all() and (pr <= min(shape[-2:]) + 1e-12).all()


def test_pr_accepts_numpy():
    x = np.random.default_rng(2).standard_normal((3, 6, 9))
    np.testing.assert_allclose(participation_ratio(x).numpy(), numpy_pr(x), rtol=1e-12)


def test_rank_one_window_has_pr_one():
    rng = np.random.default_rng(3)
    x = np.outer(rng.standard_normal(16), rng.standard_normal(64))  # rank 1
    assert participation_ratio(torch.from_numpy(x)).item() == pytest.approx(1.0, abs=1e-12)


def test_orthogonal_equal_norm_rows_give_pr_w():
    q, _ = np.linalg.qr(np.random.default_rng(4).standard_normal((64, 16)))  # (64, 16)
    x = 3.7 * q.T  # 16 orthonormal rows, each of norm 3.7
    assert participation_ratio(torch.from_numpy(x)).item() == pytest.approx(16.0, abs=1e-10)


def test_hand_computed_diagonal_case():
    # singular values 2 and 1: (4 + 1)^2 / (16 + 1) = 25 / 17
    x = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert participation_ratio(x).item() == pytest.approx(25 / 17, rel=1e-14)


def test_rank_deficient_matches_numpy():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((16, 3)) @ rng.standard_normal((3, 48))  # rank 3
    pr = participation_ratio(torch.from_numpy(x)).item()
    assert pr == pytest.approx(numpy_pr(x), rel=1e-10)
    assert 1 <= pr <= 3 + 1e-9


def test_scale_invariance_including_extreme_scales():
    x = np.random.default_rng(6).standard_normal((16, 32))
    reference = numpy_pr(x)
    for scale in (1e-150, 1e-20, 1.0, 1e20, 1e150):  # fourth powers would over/underflow
        assert participation_ratio(torch.from_numpy(x * scale)).item() == pytest.approx(
            reference, rel=1e-12
        )


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_input_error_bound(dtype, rtol):
    # PR is computed in float64; the only error is the rounding of the input itself.
    x = torch.randn(64, 16, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    reference = numpy_pr(x.numpy())
    pr = participation_ratio(x.to(dtype))
    assert pr.dtype == torch.float64
    np.testing.assert_allclose(pr.numpy(), reference, rtol=rtol)


def test_nan_with_reasons():
    x = torch.randn(4, 8, 5, dtype=torch.float32)
    x[1] = 0.0
    x[2, 3, 1] = float("nan")
    x[3, 0, 0] = float("inf")
    pr, reasons = participation_ratio_with_reason(x)
    assert reasons == [None, "zero window", "non-finite activations", "non-finite activations"]
    assert math.isfinite(pr[0].item())
    assert torch.isnan(pr[1:]).all()
    assert pr[0].item() == pytest.approx(numpy_pr(x[0].double().numpy()), rel=1e-12)


def test_nan_reasons_nested_and_single():
    x = torch.randn(2, 3, 4, 6)
    x[1, 2] = 0.0
    _, reasons = participation_ratio_with_reason(x)
    assert reasons == [[None, None, None], [None, None, "zero window"]]
    pr, reason = participation_ratio_with_reason(torch.zeros(4, 6))
    assert math.isnan(pr.item()) and reason == "zero window"


def test_batched_equals_looped():
    x = torch.randn(3, 5, 16, 24, generator=torch.Generator().manual_seed(8))
    batched = participation_ratio(x)
    for i in range(3):
        for j in range(5):
            assert batched[i, j].item() == pytest.approx(participation_ratio(x[i, j]).item())


def test_per_head_and_whole_hand_made():
    # Two heads, W = 2, D = 2. Head 0: rank 1 -> PR 1; head 1: orthogonal equal rows -> PR 2.
    head0 = torch.tensor([[1.0, 0.0], [2.0, 0.0]])  # (W, D)
    head1 = torch.tensor([[0.0, 3.0], [3.0, 0.0]])  # (W, D)
    v = torch.stack([head0, head1], dim=1)  # (W, H, D)
    np.testing.assert_allclose(pr_per_head(v).numpy(), [1.0, 2.0], rtol=1e-14)
    assert pr_per_head_mean(v).item() == pytest.approx(1.5, rel=1e-14)
    whole = torch.cat([head0, head1], dim=1)  # (W, H*D)
    assert pr_whole(v).item() == pytest.approx(numpy_pr(whole.double().numpy()), rel=1e-14)
    assert window_pr(v, "per-head").item() == pytest.approx(1.5, rel=1e-14)
    assert window_pr(v, "whole").item() == pytest.approx(pr_whole(v).item(), rel=1e-14)


def test_per_head_matches_numpy_on_batches():
    rng = np.random.default_rng(9)
    v = rng.standard_normal((3, 16, 4, 8))  # (B, W, H, D)
    per_head = pr_per_head(torch.from_numpy(v))  # (B, H)
    reference = numpy_pr(v.transpose(0, 2, 1, 3))  # (B, H)
    np.testing.assert_allclose(per_head.numpy(), reference, rtol=1e-12)
    whole = pr_whole(torch.from_numpy(v))  # (B,)
    np.testing.assert_allclose(whole.numpy(), numpy_pr(v.reshape(3, 16, 32)), rtol=1e-12)


def test_per_head_mean_is_nan_if_any_head_is_nan():
    v = torch.randn(2, 8, 3, 4)  # (B, W, H, D)
    v[1, :, 2] = 0.0  # head 2 of item 1 is a zero window
    mean = pr_per_head_mean(v)
    assert math.isfinite(mean[0].item()) and math.isnan(mean[1].item())
    pr, reasons = window_pr_with_reason(v, "per-head")
    assert reasons == [None, "head 2: zero window"]
    assert math.isnan(pr[1].item())


def test_unknown_mode_raises():
    assert set(PR_MODES) == {"per-head", "whole"}
    with pytest.raises(ConfigError, match="per-head, whole"):
        window_pr(torch.randn(4, 2, 3), "mean")


def test_singular_spectrum_matches_numpy():
    rng = np.random.default_rng(10)
    for shape in [(16, 64), (16, 8), (2, 12, 12)]:
        x = rng.standard_normal(shape)
        spectrum = singular_spectrum(torch.from_numpy(x))
        reference = np.linalg.svd(x, compute_uv=False)
        assert spectrum.shape == reference.shape
        np.testing.assert_allclose(spectrum.numpy(), reference, rtol=1e-9, atol=1e-12)


def numpy_effective_rank(x: np.ndarray) -> float:
    s = np.linalg.svd(x, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def test_effective_rank_matches_numpy_and_hand_cases():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((16, 40))
    assert effective_rank(torch.from_numpy(x)).item() == pytest.approx(
        numpy_effective_rank(x), rel=1e-10
    )
    # Equal singular values -> erank = number of them; rank 1 -> 1 (to Gram precision).
    assert effective_rank(torch.eye(5, 7, dtype=torch.float64) * 2).item() == pytest.approx(5.0)
    rank_one = np.outer(rng.standard_normal(8), rng.standard_normal(9))
    assert effective_rank(torch.from_numpy(rank_one)).item() == pytest.approx(1.0, abs=1e-6)
    # Singular values 3 and 1: p = (3/4, 1/4).
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    x = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    assert effective_rank(x).item() == pytest.approx(expected, rel=1e-12)
    assert math.isnan(effective_rank(torch.zeros(4, 4)).item())


def test_r_v_ratio_and_nan_rules():
    assert r_v(2.0, 4.0) == 0.5
    assert math.isnan(r_v(2.0, 0.0))
    out = r_v(np.array([1.0, np.nan, 3.0, 1.0]), np.array([2.0, 1.0, 0.0, np.inf]))
    np.testing.assert_array_equal(np.isnan(out), [False, True, True, True])
    assert out[0] == 0.5
    t = r_v(torch.tensor([3.0, 1.0]), torch.tensor([2.0, 0.0]))
    assert t.dtype == torch.float64 and t[0].item() == 1.5 and math.isnan(t[1].item())


def test_differentiable_pr_value_and_gradcheck():
    x = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    pr = differentiable_participation_ratio(x)
    np.testing.assert_allclose(pr.detach().numpy(), numpy_pr(x.detach().numpy()), rtol=1e-12)
    assert torch.autograd.gradcheck(differentiable_participation_ratio, (x,))
    # float32 leaf: computed in float64, gradient arrives in float32.
    y = torch.randn(6, 4, requires_grad=True)
    out = differentiable_participation_ratio(y)
    out.backward()
    assert out.dtype == torch.float64 and y.grad.dtype == torch.float32
    assert torch.isfinite(y.grad).all()
    # scale invariance: the gradient is orthogonal to x (Euler, degree 0).
    assert (y.grad.double() * y.detach().double()).sum().item() == pytest.approx(0.0, abs=1e-6)


def test_differentiable_pr_zero_window_is_nan_with_zero_grad():
    x = torch.zeros(2, 3, 4, dtype=torch.float64)
    x[0] = torch.randn(3, 4, dtype=torch.float64)
    x.requires_grad_(True)
    pr = differentiable_participation_ratio(x)
    assert math.isnan(pr[1].item())
    pr[0].backward()
    assert torch.equal(x.grad[1], torch.zeros(3, 4, dtype=torch.float64))


def test_last_real_window_right_and_left_padding():
    hidden = torch.arange(2 * 6, dtype=torch.float32).view(2, 6, 1).expand(2, 6, 3)  # (B, T, d)
    right = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])  # 4 and 6 real tokens
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    out_right = last_real_window(hidden, right, 3)  # (B, W, d)
    out_left = last_real_window(hidden, left, 3)
    assert out_right.shape == (2, 3, 3)
    assert out_right[:, :, 0].tolist() == [[1, 2, 3], [9, 10, 11]]
    assert out_left[:, :, 0].tolist() == [[3, 4, 5], [9, 10, 11]]


def test_last_real_window_keeps_trailing_dims_and_mask_holes():
    hidden = torch.randn(1, 7, 2, 3)  # (B, T, H, D)
    mask = torch.tensor([[0, 1, 1, 0, 1, 1, 0]])  # real positions 1, 2, 4, 5
    out = last_real_window(hidden, mask, 3)  # (B, W, H, D)
    assert torch.equal(out[0], hidden[0, [2, 4, 5]])


def test_last_real_window_short_row_raises_with_index_and_count():
    hidden = torch.randn(3, 8, 4)
    mask = torch.tensor([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0, 0]])
    with pytest.raises(PromptError, match=r"row 2 has 3 real tokens") as info:
        last_real_window(hidden, mask, 5)
    assert "row 1" not in str(info.value) and "5-token window" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="at least 2"):
        last_real_window(hidden, mask, 1)
    with pytest.raises(ConfigError, match="does not match"):
        last_real_window(hidden, mask[:, :5], 2)
