"""rloop sae train and rloop sae features on a tiny model: the saved SAE loads back, its
reported reconstruction equals a numpy re-computation on independently captured activations,
feature statistics and decoder span equal hand computations, and a d_in mismatch is refused
before a run directory exists."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from rloop.capture import Trace, address
from rloop.capture.batching import encode, gather_windows
from rloop.errors import ConfigError
from rloop.experiments.sae_runs import (
    SAEFeaturesConfig,
    SAETrainConfig,
    hook_of_sae,
    run_sae_features,
    run_sae_train,
)
from rloop.sae import SparseAutoencoder, load_sae, save_sae
from tests.test_contraction import prompt_set
from tests.tiny_models import tiny_lm

WINDOW = 4


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _file(tmp_path, n=5):
    path = tmp_path / "prompts.jsonl"
    with path.open("w") as f:
        for p in prompt_set(n):
            f.write(json.dumps({"id": p.id, "group": p.group, "text": p.text}) + "\n")
    return path


def _plain(lm, texts, point="resid_post", layer=1):
    batch = encode(lm.tokenizer, texts)
    with torch.no_grad(), Trace(lm.model, lm.adapter, capture=[address(layer, point)]) as tr:
        lm.model(**batch.model_inputs(), use_cache=False)
    return tr[address(layer, point)], batch.n_tokens


def _numpy_encode(sae, x: np.ndarray) -> np.ndarray:
    w_enc, b_enc = sae.W_enc.double().numpy(), sae.b_enc.double().numpy()
    pre = (x - sae.b_dec.double().numpy()) @ w_enc + b_enc
    if sae.architecture == "topk":
        keep = np.argsort(-pre, axis=1)[:, : sae.k]
        out = np.zeros_like(pre)
        np.put_along_axis(out, keep, np.maximum(np.take_along_axis(pre, keep, 1), 0), 1)
        return out
    return np.maximum(pre, 0)


def test_sae_train_saves_an_sae_whose_metrics_recompute(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    config = SAETrainConfig(
        prompts=str(_file(tmp_path)), layer=1, d_sae=32, k=4, steps=60, train_batch_size=32,
        continuation_tokens=0, heldout_prompts=0.2,
    )  # fmt: skip
    run_dir, _, headline = run_sae_train(config, out=tmp_path / "run", lm=lm)
    sae = load_sae(run_dir / "sae")
    assert sae.architecture == "topk" and sae.d_in == 64 and sae.hook_name == "blocks.1.resid_post"
    # Every real token but the first of each prompt, captured independently.
    values, n_tokens = _plain(lm, [p.text for p in prompt_set(5)])
    x = np.concatenate([values[i, 1:n].double().numpy() for i, n in enumerate(n_tokens)])
    recon = _numpy_encode(sae, x) @ sae.W_dec.double().numpy() + sae.b_dec.double().numpy()
    ev = 1 - ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    metrics = pd.read_csv(run_dir / "metrics.csv").set_index("split")
    assert metrics.loc["all", "n_rows"] == len(x)
    assert metrics.loc["all", "explained_variance"] == pytest.approx(ev, abs=1e-4)
    assert metrics.loc["all", "mean_l0"] <= 4
    assert set(metrics.index) == {"train", "heldout_prompts", "all"}
    assert headline["n_tokens"] == len(x)
    assert (run_dir / "plots" / "feature_density.png").exists()
    assert "Small-scale tool" in (run_dir / "summary.md").read_text()


def test_sae_train_with_continuations_counts_generated_tokens(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    config = SAETrainConfig(
        prompts=str(_file(tmp_path, 3)), layer=0, point="v", d_sae=16, k=2, steps=10,
        continuation_tokens=3, heldout_prompts=0.0,
    )  # fmt: skip
    run_dir, _, headline = run_sae_train(config, out=tmp_path / "run", lm=tiny_lm())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    lengths = [len(p.text.split()) for p in prompt_set(3)]
    assert manifest["data"]["n_generated_tokens"] == 6 * 3
    assert headline["n_tokens"] == sum(n + 3 - 1 for n in lengths)  # prompt + generated - first
    assert load_sae(run_dir / "sae").d_in == 2 * 16  # V flattened over the 2 KV heads


def _saved_sae(tmp_path, d_in=64, d_sae=24, hook="blocks.1.hook_resid_post"):
    generator = torch.Generator().manual_seed(3)
    sae = SparseAutoencoder(d_in, d_sae, "standard", hook_name=hook, model_name="tiny")
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=generator) * 0.3)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=generator))
        sae.b_enc.copy_(torch.randn(d_sae, generator=generator) * 0.1)
    return save_sae(sae, tmp_path / "sae"), sae


def test_sae_features_equal_hand_computations(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    sae_dir, sae = _saved_sae(tmp_path)
    config = SAEFeaturesConfig(
        prompts=str(_file(tmp_path)), sae=str(sae_dir), window=WINDOW, k=3, top_n=4,
        n_boot=200, n_random_sets=20,
    )  # fmt: skip
    run_dir, _, headline = run_sae_features(config, out=tmp_path / "run", lm=lm)
    assert headline["hook"] == "blocks.1.resid_post"
    prompts = list(prompt_set(5))
    groups = {}
    for group in ("L5", "factual"):
        values, n_tokens = _plain(lm, [p.text for p in prompts if p.group == group])
        groups[group] = gather_windows(values, n_tokens, WINDOW).double().numpy()  # (n, W, d)
    means = {
        g: _numpy_encode(sae, w.reshape(-1, 64)).reshape(w.shape[0], WINDOW, -1).mean(1)
        for g, w in groups.items()
    }  # (n, d_sae) per-prompt means
    diff = pd.read_csv(run_dir / "differential.csv").set_index("feature").sort_index()
    np.testing.assert_allclose(diff["mean_rec"], means["L5"].mean(0), atol=1e-5)
    np.testing.assert_allclose(diff["mean_base"], means["factual"].mean(0), atol=1e-5)
    # Span share of the first n features' decoders in the recursive top-3 subspace, by hand.
    rows = groups["L5"].reshape(-1, 64)
    basis = np.linalg.svd(rows, full_matrices=False)[2][:3]  # (3, d)
    span = pd.read_csv(run_dir / "span.csv")
    ranked = pd.read_csv(run_dir / "differential.csv")["feature"].tolist()
    for n in (1, 4):
        q = np.linalg.qr(sae.W_dec.double().numpy()[ranked[:n]].T)[0]  # (d, n)
        expected = ((basis @ q) ** 2).sum() / 3
        got = span.loc[span.n_features == n, "share_recursive_subspace"].item()
        assert got == pytest.approx(expected, abs=1e-8)
    examples = pd.read_csv(run_dir / "top_examples.csv")
    first = int(ranked[0])
    top = examples[examples.feature == first]["activation"].max()
    acts = [
        _numpy_encode(sae, w.reshape(-1, 64))[:, first].max() for w in groups.values()
    ]  # strongest activation of that feature over all windows
    assert top == pytest.approx(max(acts), rel=1e-5)


def test_sae_features_refuse_a_mismatched_sae(tmp_path) -> None:
    sae_dir, _ = _saved_sae(tmp_path, d_in=48)
    out = tmp_path / "never"
    config = SAEFeaturesConfig(prompts=str(_file(tmp_path)), sae=str(sae_dir), window=WINDOW)
    with pytest.raises(ConfigError, match="SAE d_in 48 does not match hook point blocks.1"):
        run_sae_features(config, out=out, lm=tiny_lm())
    with pytest.raises(ConfigError, match="layer 9 is out of range"):
        run_sae_features(
            SAEFeaturesConfig(prompts=str(_file(tmp_path)), sae=str(sae_dir), layer=9, window=4),
            out=out,
            lm=tiny_lm(),
        )
    assert not out.exists()


def test_hook_names_of_saelens_and_rloop() -> None:
    assert hook_of_sae("blocks.12.hook_resid_post") == (12, "resid_post")
    assert hook_of_sae("blocks.3.attn.hook_z") == (3, "z")
    assert hook_of_sae("blocks.15.resid_post") == (15, "resid_post")
    assert hook_of_sae("blocks.2.hook_resid_mid") is None
    assert hook_of_sae(None) is None
