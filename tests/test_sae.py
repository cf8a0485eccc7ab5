"""Sparse autoencoders: encode semantics, the SAELens file format, training, feature statistics.

Expected values come from numpy re-computations of the formulas, hand-built cases, files
written the way SAELens writes them, and synthetic activations with planted sparse features.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.optimize
import torch
from safetensors.torch import save_file

from rloop.errors import ConfigError
from rloop.metrics.stats import mann_whitney, welch_t
from rloop.sae import (
    SparseAutoencoder,
    check_d_in,
    decoder_span_share,
    differential_features,
    evaluate_sae,
    feature_activations,
    geometric_median,
    load_sae,
    save_sae,
    top_activating,
    train_sae,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """These SAEs are tiny: one intra-op thread is fastest and avoids oversubscribing a busy
    2-core machine (which slows small matmuls by orders of magnitude)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_sae(architecture: str, d_in: int = 6, d_sae: int = 10, seed: int = 0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(d_in, d_sae, architecture, **kwargs)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        if sae.threshold is not None:
            sae.threshold.copy_(torch.rand(d_sae, generator=generator) * 0.5)
    return sae


def _planted_activations(seed: int, n: int = 8192, d: int = 32, m: int = 48, active: int = 3):
    """Rows that are non-negative combinations of ``active`` of ``m`` planted unit directions,
    plus small noise and an offset. Returns (rows (n, d), directions (m, d))."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(m, d, generator=generator)
    directions /= directions.norm(dim=1, keepdim=True)
    chosen = torch.rand(n, m, generator=generator).argsort(dim=1)[:, :active]  # (n, active)
    magnitudes = torch.rand(n, active, generator=generator) * 1.5 + 0.5
    coefficients = torch.zeros(n, m).scatter_(1, chosen, magnitudes)  # (n, m)
    noise = 0.02 * torch.randn(n, d, generator=generator)
    return coefficients @ directions + noise + 0.3, directions


def _recovery(sae: SparseAutoencoder, directions: torch.Tensor) -> float:
    """Mean over planted directions of the best cosine with any decoder row."""
    rows = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    return float((directions @ rows.T).max(dim=1).values.mean())


# ----------------------------------------------------------------------------------------------
# Encode / decode semantics


def _numpy_pre(sae: SparseAutoencoder, x: np.ndarray) -> np.ndarray:
    w_enc, b_enc = sae.W_enc.detach().double().numpy(), sae.b_enc.detach().double().numpy()
    b_dec = sae.b_dec.detach().double().numpy()
    centred = x - b_dec if sae.apply_b_dec_to_input else x
    return centred @ w_enc + b_enc


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_standard_encode_decode_match_numpy(apply_b_dec):
    sae = _random_sae("standard", apply_b_dec_to_input=apply_b_dec)
    x = np.random.default_rng(0).standard_normal((5, 6))
    expected = np.maximum(_numpy_pre(sae, x), 0.0)
    features = sae.encode(torch.tensor(x))
    np.testing.assert_allclose(features.double().numpy(), expected, atol=1e-5)
    reconstruction = expected @ sae.W_dec.detach().double().numpy() + sae.b_dec.detach().numpy()
    np.testing.assert_allclose(sae(torch.tensor(x)).double().numpy(), reconstruction, atol=1e-5)


def test_topk_keeps_the_k_largest_pre_activations_after_relu():
    sae = _random_sae("topk", k=3)
    x = np.random.default_rng(1).standard_normal((7, 6))
    pre = _numpy_pre(sae, x)
    expected = np.zeros_like(pre)
    for row in range(pre.shape[0]):
        top = np.argsort(pre[row])[-3:]
        expected[row, top] = np.maximum(pre[row, top], 0.0)
    np.testing.assert_allclose(sae.encode(torch.tensor(x)).double().numpy(), expected, atol=1e-5)
    assert int((sae.encode(torch.tensor(x)) > 0).sum(dim=1).max()) <= 3


def test_topk_rescale_by_decoder_norm():
    sae = _random_sae("topk", k=2, rescale_acts_by_decoder_norm=True)
    x = np.random.default_rng(2).standard_normal((4, 6))
    norms = np.linalg.norm(sae.W_dec.detach().double().numpy(), axis=1)
    pre = _numpy_pre(sae, x) * norms
    expected = np.zeros_like(pre)
    for row in range(pre.shape[0]):
        top = np.argsort(pre[row])[-2:]
        expected[row, top] = np.maximum(pre[row, top], 0.0)
    features = sae.encode(torch.tensor(x))
    np.testing.assert_allclose(features.double().numpy(), expected, atol=1e-5)
    w_dec = sae.W_dec.detach().double().numpy()
    decoded = (expected / norms) @ w_dec + sae.b_dec.detach().double().numpy()
    np.testing.assert_allclose(sae.decode(features).double().numpy(), decoded, atol=1e-5)


@pytest.mark.parametrize("negative_threshold", [False, True])
def test_jumprelu_zeroes_pre_activations_at_or_below_the_threshold(negative_threshold):
    sae = _random_sae("jumprelu")
    if negative_threshold:  # the ReLU still applies above a negative threshold
        with torch.no_grad():
            sae.threshold -= 1.0
    x = np.random.default_rng(3).standard_normal((6, 6))
    pre = _numpy_pre(sae, x)
    threshold = sae.threshold.detach().double().numpy()
    expected = np.where(pre > threshold, np.maximum(pre, 0.0), 0.0)
    np.testing.assert_allclose(sae.encode(torch.tensor(x)).double().numpy(), expected, atol=1e-5)


def test_constructor_and_input_validation():
    with pytest.raises(ConfigError, match="needs an integer k"):
        SparseAutoencoder(4, 8, "topk")
    with pytest.raises(ConfigError, match="not supported"):
        SparseAutoencoder(4, 8, "gated")
    with pytest.raises(ConfigError, match="last dimension 5 but the SAE has d_in 4"):
        SparseAutoencoder(4, 8).encode(torch.zeros(2, 5))


def test_check_d_in_names_the_hook_point():
    sae = SparseAutoencoder(512, 16)
    with pytest.raises(
        ConfigError, match=r"^SAE d_in 512 does not match hook point blocks\.25\.resid_post \(576\)"
    ):
        check_d_in(sae, 576, "blocks.25.resid_post")
    check_d_in(sae, 512, "blocks.25.resid_post")  # no error


# ----------------------------------------------------------------------------------------------
# File format


@pytest.mark.parametrize(
    ("architecture", "kwargs", "dtype"),
    [
        ("standard", {}, torch.float32),
        ("topk", {"k": 4}, torch.float32),
        ("jumprelu", {}, torch.float32),
        ("topk", {"k": 2, "rescale_acts_by_decoder_norm": True}, torch.bfloat16),
    ],
)
def test_save_load_round_trip_is_exact(tmp_path, architecture, kwargs, dtype):
    sae = _random_sae(
        architecture, hook_name="blocks.3.hook_resid_post", model_name="tiny", **kwargs
    ).to(dtype)
    save_sae(sae, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert loaded.architecture == architecture and loaded.dtype == dtype
    assert (loaded.d_in, loaded.d_sae, loaded.k) == (sae.d_in, sae.d_sae, sae.k)
    assert loaded.rescale_acts_by_decoder_norm == sae.rescale_acts_by_decoder_norm
    assert (loaded.hook_name, loaded.model_name) == ("blocks.3.hook_resid_post", "tiny")
    assert set(loaded.tensors()) == set(sae.tensors())
    for name, tensor in sae.tensors().items():
        assert torch.equal(loaded.tensors()[name], tensor), name
    x = torch.randn(9, sae.d_in).to(dtype)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert cfg["architecture"] == architecture


def test_hook_z_flag_and_dtype_override_survive_loading(tmp_path):
    sae = _random_sae("standard", reshape_activations="hook_z", hook_name="blocks.0.attn.hook_z")
    save_sae(sae, tmp_path / "z")
    loaded = load_sae(tmp_path / "z", dtype=torch.float64)
    assert loaded.reshape_activations == "hook_z" and loaded.dtype == torch.float64
    torch.testing.assert_close(loaded.W_enc, sae.W_enc.double(), atol=0, rtol=0)
    with pytest.raises(ConfigError, match="reshape_activations 'heads'"):
        SparseAutoencoder(4, 8, reshape_activations="heads")


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize(
    ("architecture", "kwargs"),
    [
        ("standard", {}),
        ("topk", {"k": 3}),
        ("topk", {"k": 2, "rescale_acts_by_decoder_norm": True}),
        ("jumprelu", {}),
    ],
)
def test_sae_lens_loads_an_rloop_saved_sae_and_agrees(tmp_path, architecture, kwargs, apply_b_dec):
    """The `sae` extra: SAELens itself reads a directory rloop wrote, and its encode/decode
    give rloop's numbers (the independent reference for the format and the activations)."""
    sae_lens = pytest.importorskip(
        "sae_lens",
        reason="sae-lens is not installed (the optional extra: pip install 'rloop[sae]'); "
        "rloop reads and writes the format itself",
    )
    sae = _random_sae(
        architecture,
        d_in=12,
        d_sae=20,
        apply_b_dec_to_input=apply_b_dec,
        hook_name="blocks.1.hook_resid_post",
        model_name="tiny",
        **kwargs,
    )
    save_sae(sae, tmp_path / "sae")
    reference = sae_lens.SAE.load_from_disk(tmp_path / "sae", device="cpu")
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = sae.encode(x), reference.encode(x)
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
        assert torch.equal(theirs != 0, ours != 0)  # the same features fire
        torch.testing.assert_close(reference.decode(ours), sae.decode(ours), atol=1e-5, rtol=1e-5)
    assert reference.cfg.metadata.hook_name == "blocks.1.hook_resid_post"


def _write_sae_dir(path, cfg: dict, tensors: dict) -> None:
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(
        {name: t.contiguous() for name, t in tensors.items()}, str(path / "sae_weights.safetensors")
    )


def _weights(d_in: int, d_sae: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d_in, d_sae, generator=generator),
        "b_enc": torch.randn(d_sae, generator=generator),
        "W_dec": torch.randn(d_sae, d_in, generator=generator),
        "b_dec": torch.randn(d_in, generator=generator),
    }


def test_reads_a_sae_lens_6_layout(tmp_path):
    cfg = {
        "d_in": 4,
        "d_sae": 8,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.5.0",
            "model_name": "pythia-70m",
            "hook_name": "blocks.2.hook_resid_post",
            "context_size": 128,
        },
        "architecture": "jumprelu",
    }
    weights = _weights(4, 8)
    weights["threshold"] = torch.rand(8)
    _write_sae_dir(tmp_path / "six", cfg, weights)
    sae = load_sae(tmp_path / "six")
    assert sae.architecture == "jumprelu" and not sae.apply_b_dec_to_input
    assert (sae.model_name, sae.hook_name) == ("pythia-70m", "blocks.2.hook_resid_post")
    assert sae.metadata["context_size"] == 128
    assert torch.equal(sae.threshold.detach(), weights["threshold"])


def test_reads_a_pre_6_topk_layout_and_log_threshold(tmp_path):
    cfg = {
        "d_in": 4,
        "d_sae": 8,
        "dtype": "torch.float32",
        "hook_point": "blocks.1.hook_resid_pre",
        "model_name": "gpt2-small",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 3},
        "normalize_activations": False,
    }
    _write_sae_dir(tmp_path / "old", cfg, _weights(4, 8))
    sae = load_sae(tmp_path / "old")
    assert (sae.architecture, sae.k) == ("topk", 3)
    assert (sae.hook_name, sae.model_name) == ("blocks.1.hook_resid_pre", "gpt2-small")
    jump_cfg = {"d_in": 4, "d_sae": 8, "dtype": "float32", "architecture": "jumprelu"}
    weights = _weights(4, 8)
    weights["log_threshold"] = torch.randn(8)
    _write_sae_dir(tmp_path / "jump", jump_cfg, weights)
    jump = load_sae(tmp_path / "jump")
    torch.testing.assert_close(jump.threshold.detach(), torch.exp(weights["log_threshold"]))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cfg": {"architecture": "gated"}}, "architecture 'gated' is not supported"),
        ({"cfg": {"architecture": "topk"}}, "needs an integer k"),
        ({"cfg": {"normalize_activations": "layer_norm"}}, "normalize_activations 'layer_norm'"),
        ({"cfg": {"d_sae": 9}}, r"W_enc has shape \(4, 8\) .* needs \(4, 9\)"),
        ({"cfg": {"dtype": "int8"}}, "dtype 'int8' is not supported"),
        ({"drop": "b_enc"}, "missing b_enc"),
        ({"add": "extra"}, "unexpected extra"),
        ({"nan": "W_dec"}, "W_dec holds NaN"),
    ],
)
def test_format_errors_are_one_line_config_errors(tmp_path, change, message):
    cfg = {"d_in": 4, "d_sae": 8, "dtype": "float32", "architecture": "standard"}
    cfg.update(change.get("cfg", {}))
    weights = _weights(4, 8)
    if "drop" in change:
        del weights[change["drop"]]
    if "add" in change:
        weights[change["add"]] = torch.zeros(3)
    if "nan" in change:
        weights[change["nan"]][0, 0] = math.nan
    _write_sae_dir(tmp_path / "bad", cfg, weights)
    with pytest.raises(ConfigError, match=message) as raised:
        load_sae(tmp_path / "bad")
    assert "\n" not in str(raised.value)


def test_missing_files_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_sae(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no cfg.json"):
        load_sae(tmp_path / "empty")
    (tmp_path / "empty" / "cfg.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_sae(tmp_path / "empty")
    (tmp_path / "empty" / "cfg.json").write_text(json.dumps({"d_in": 4, "d_sae": 8}))
    with pytest.raises(ConfigError, match="no sae_weights.safetensors"):
        load_sae(tmp_path / "empty")
    (tmp_path / "empty" / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="cannot read"):
        load_sae(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------
# Training


def test_topk_training_recovers_planted_features():
    activations, directions = _planted_activations(seed=0)
    sae, metrics = train_sae(
        activations, d_sae=64, architecture="topk", k=3, steps=600, lr=3e-3, seed=0
    )
    assert _recovery(sae, directions) >= 0.9
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5, rtol=0)
    assert metrics["mean_l0"] <= 3.0
    assert metrics["explained_variance"] > 0.9
    assert metrics["evaluated_on"] == "holdout" and metrics["n_holdout"] == 819
    assert 0.0 <= metrics["dead_share"] < 1.0


def test_relu_training_recovers_planted_features():
    activations, directions = _planted_activations(seed=1)
    sae, metrics = train_sae(activations, d_sae=64, architecture="relu", l1=1.0, steps=800, lr=3e-3)
    assert _recovery(sae, directions) >= 0.9
    assert sae.architecture == "standard"
    assert metrics["explained_variance"] > 0.8


def test_training_is_seeded_and_reports_progress():
    activations, _ = _planted_activations(seed=2, n=1024)
    calls = []
    first, metrics_a = train_sae(
        activations, 16, k=2, steps=30, seed=5, progress=lambda *a: calls.append(a), log_every=10
    )
    second, metrics_b = train_sae(activations, 16, k=2, steps=30, seed=5)
    other, _ = train_sae(activations, 16, k=2, steps=30, seed=6)
    for name, tensor in first.tensors().items():
        assert torch.equal(tensor, second.tensors()[name]), name
    assert metrics_a == metrics_b
    assert not torch.equal(first.W_dec, other.W_dec)
    assert [c[:2] for c in calls] == [(10, 30), (20, 30), (30, 30)]


def test_input_scale_is_folded_back_into_the_weights():
    """Training on 10x the activations (same seed) sees the same normalised data, so the
    returned SAEs must agree up to the scale: same W_enc, W_dec; 10x b_enc, b_dec, features."""
    activations, _ = _planted_activations(seed=3, n=1024)
    small, _ = train_sae(activations, 16, k=2, steps=40, seed=0)
    large, _ = train_sae(activations * 10, 16, k=2, steps=40, seed=0)
    torch.testing.assert_close(large.W_dec, small.W_dec, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(large.W_enc, small.W_enc, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(large.b_dec, 10 * small.b_dec, atol=1e-3, rtol=1e-4)
    x = activations[:50]
    torch.testing.assert_close(large.encode(10 * x), 10 * small.encode(x), atol=1e-3, rtol=1e-3)


def test_training_settings_are_validated():
    activations = torch.randn(64, 4)
    with pytest.raises(ConfigError, match="needs k"):
        train_sae(activations, 8, architecture="topk")
    with pytest.raises(ConfigError, match="steps or epochs, not both"):
        train_sae(activations, 8, k=2, steps=5, epochs=1)
    with pytest.raises(ConfigError, match="unknown SAE architecture"):
        train_sae(activations, 8, architecture="gated")
    with pytest.raises(ConfigError, match=r"\(n, d_in\)"):
        train_sae(torch.randn(4, 5, 6), 8, k=2)
    bad = activations.clone()
    bad[3, 1] = math.nan
    with pytest.raises(ConfigError, match="NaN or infinite values in 1 rows"):
        train_sae(bad, 8, k=2)
    _, metrics = train_sae(activations, 8, k=2, epochs=2, batch_size=16, holdout_fraction=0)
    assert metrics["n_steps"] == 8 and metrics["evaluated_on"] == "train"


def test_evaluate_sae_matches_numpy():
    sae = _random_sae("topk", k=3)
    x = np.random.default_rng(4).standard_normal((40, 6))
    features = sae.encode(torch.tensor(x)).double().numpy()
    reconstruction = sae(torch.tensor(x)).double().numpy()
    metrics = evaluate_sae(sae, torch.tensor(x))
    expected_ev = 1 - np.sum((x - reconstruction) ** 2) / np.sum((x - x.mean(axis=0)) ** 2)
    assert metrics["explained_variance"] == pytest.approx(expected_ev, abs=1e-5)
    assert metrics["mean_l0"] == pytest.approx(np.mean((features > 0).sum(axis=1)))
    assert metrics["dead_features"] == int((~(features > 0).any(axis=0)).sum())


def test_geometric_median_minimises_the_sum_of_distances():
    points = np.random.default_rng(5).standard_normal((30, 3)) ** 3  # skewed, median != mean
    reference = scipy.optimize.minimize(
        lambda y: np.linalg.norm(points - y, axis=1).sum(),
        points.mean(axis=0),
        method="Nelder-Mead",
        options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000},
    ).x
    median = geometric_median(torch.tensor(points)).numpy()
    np.testing.assert_allclose(median, reference, atol=1e-5)
    assert np.linalg.norm(median - points.mean(axis=0)) > 1e-2


# ----------------------------------------------------------------------------------------------
# Features


def test_feature_activations_shapes_and_values():
    sae = _random_sae("standard")
    windows = torch.randn(3, 5, 6)
    features = feature_activations(sae, windows, batch_size=4)
    assert features.shape == (3, 5, 10) and features.dtype == torch.float32
    torch.testing.assert_close(features, sae.encode(windows))
    listed = feature_activations(sae, [windows[0], windows[1, :2]])
    assert [tuple(f.shape) for f in listed] == [(5, 10), (2, 10)]
    torch.testing.assert_close(listed[1], sae.encode(windows[1, :2]))
    with pytest.raises(ConfigError, match="d_in 6"):
        feature_activations(sae, torch.randn(3, 5, 7))


def _groups_with_a_planted_feature(seed: int = 0, n: int = 40, w: int = 8, d_sae: int = 20):
    rng = np.random.default_rng(seed)
    rec = np.maximum(rng.normal(0.2, 0.3, (n, w, d_sae)), 0.0)  # (n, W, d_sae) non-negative
    base = np.maximum(rng.normal(0.2, 0.3, (n, w, d_sae)), 0.0)
    rec[:, :, 7] += 0.5  # feature 7 fires more on recursive prompts
    base[:, :, 11] = 0.0  # feature 11 never fires in either group
    rec[:, :, 11] = 0.0
    return rec, base


def test_differential_features_finds_the_planted_feature():
    rec, base = _groups_with_a_planted_feature()
    frame = differential_features(torch.tensor(rec), torch.tensor(base), n_boot=1000, seed=0)
    assert len(frame) == 20
    top = frame.iloc[0]
    assert top["feature"] == 7 and top["p_adj"] < 1e-6
    assert top["diff_ci_low"] < top["diff"] < top["diff_ci_high"]
    assert top["diff_ci_low"] > 0.3  # true shift 0.5; far from 0
    # Per-prompt means and the Welch p agree with rloop.metrics.stats on the same values.
    rec_means, base_means = rec.mean(axis=1), base.mean(axis=1)
    for feature in (7, 3):
        row = frame.set_index("feature").loc[feature]
        assert row["mean_rec"] == pytest.approx(rec_means[:, feature].mean())
        assert row["p"] == pytest.approx(welch_t(rec_means[:, feature], base_means[:, feature])[1])
    # Null features: few survive BH; the constant one has no test and sorts last.
    null = frame[~frame["feature"].isin([7, 11])]
    assert (null["p_adj"] < 0.05).sum() <= 1
    last = frame.iloc[-1]
    assert last["feature"] == 11 and math.isnan(last["p"]) and math.isnan(last["p_adj"])
    assert last["frac_active_rec"] == 0.0


def test_differential_features_mann_whitney_and_seed():
    rec, base = _groups_with_a_planted_feature(seed=1)
    rec_means, base_means = rec.mean(axis=1), base.mean(axis=1)
    frame = differential_features(rec_means, base_means, n_boot=200, test="mann-whitney")
    row = frame.set_index("feature").loc[7]
    assert row["p"] == pytest.approx(mann_whitney(rec_means[:, 7], base_means[:, 7])[1])
    again = differential_features(rec_means, base_means, n_boot=200, test="mann-whitney")
    assert frame.equals(again)
    # The bootstrap CI of a difference of means is close to the normal-theory interval.
    se = math.sqrt(rec_means[:, 7].var(ddof=1) / 40 + base_means[:, 7].var(ddof=1) / 40)
    big = differential_features(rec_means, base_means, n_boot=4000).set_index("feature").loc[7]
    assert big["diff_ci_high"] - big["diff_ci_low"] == pytest.approx(2 * 1.96 * se, rel=0.1)
    with pytest.raises(ConfigError, match="20 features but acts_base has 19"):
        differential_features(rec_means, base_means[:, :19])
    with pytest.raises(ConfigError, match="unknown test"):
        differential_features(rec_means, base_means, test="t")


def test_top_activating_lists_the_strongest_positions():
    acts = torch.zeros(2, 4, 3)
    acts[0, 2, 1] = 0.5
    acts[1, 0, 1] = 2.0
    acts[1, 3, 1] = 0.5
    acts[0, 1, 0] = 9.0  # another feature
    tokens = [["a", "b", "c", "d"], ["e", "f", "g", "h"]]
    frame = top_activating(acts, ["p0", "p1"], tokens, feature=1, top_n=2, context=1)
    assert list(frame["prompt_id"]) == ["p1", "p0"]
    assert list(frame["position"]) == [0, 2]
    assert list(frame["activation"]) == [2.0, 0.5]
    assert list(frame["context"]) == ["[[e]]f", "b[[c]]d"]
    everything = top_activating(acts, ["p0", "p1"], None, feature=1, top_n=10)
    assert len(everything) == 3 and "token" not in everything.columns
    assert top_activating(acts, ["p0", "p1"], None, feature=2).empty


def test_decoder_span_share():
    sae = SparseAutoencoder(4, 4)
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0]]))
    plane = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0]])
    assert decoder_span_share(sae, [0, 1], plane) == pytest.approx(1.0)
    assert decoder_span_share(sae, [0, 1, 2], plane) == pytest.approx(1.0)  # dependent rows
    assert decoder_span_share(sae, [3], plane) == pytest.approx(0.0)
    # (e0 + e1)/sqrt(2) captures half of each of e0 and e1.
    assert decoder_span_share(sae, [2], plane) == pytest.approx(0.5)
    # Any spanning set of the plane gives the same answer.
    assert decoder_span_share(sae, [2], torch.tensor([[1.0, 1, 0, 0], [1, -3, 0, 0]])) == (
        pytest.approx(0.5)
    )
    with pytest.raises(ConfigError, match="out of range"):
        decoder_span_share(sae, [4], plane)
