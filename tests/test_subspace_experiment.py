"""rloop subspace on a tiny model: angles and spectra equal the metrics applied to windows
captured independently with a plain Trace, and bad k is refused before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.linalg import subspace_angles

from rloop.capture import Trace, address
from rloop.capture.batching import encode, gather_windows
from rloop.errors import ConfigError
from rloop.experiments.subspace import SubspaceConfig, run_subspace
from tests.test_contraction import prompt_set
from tests.tiny_models import tiny_lm


def _file(tmp_path, n=6):
    path = tmp_path / "prompts.jsonl"
    with path.open("w") as f:
        for p in prompt_set(n):
            f.write(json.dumps({"id": p.id, "group": p.group, "text": p.text}) + "\n")
    return path


def _plain_windows(lm, texts, layer, window):
    batch = encode(lm.tokenizer, texts)
    with torch.no_grad(), Trace(lm.model, lm.adapter, capture=[address(layer, "v")]) as tr:
        lm.model(**batch.model_inputs(), use_cache=False)
    v = gather_windows(tr[address(layer, "v")], batch.n_tokens, window)  # (n, W, H, D)
    return v.flatten(2).double().numpy()  # (n, W, H * D)


def _top(windows, k):
    rows = windows.reshape(-1, windows.shape[-1])
    _, s, vt = np.linalg.svd(rows, full_matrices=False)
    return vt[:k], (s**2 / (s**2).sum())[:k]


def test_subspace_tables_equal_an_independent_computation(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    config = SubspaceConfig(
        prompts=str(_file(tmp_path)), layer=2, k=3, window=5, n_boot=200, n_splits=20
    )
    run_dir, _, headline = run_subspace(config, out=tmp_path / "run", lm=lm)
    prompts = list(prompt_set(6))
    rec = _plain_windows(lm, [p.text for p in prompts if p.group == "L5"], 2, 5)
    base = _plain_windows(lm, [p.text for p in prompts if p.group == "factual"], 2, 5)
    (rec_dirs, rec_share), (base_dirs, _) = _top(rec, 3), _top(base, 3)
    angles = pd.read_csv(run_dir / "angles.csv")
    np.testing.assert_allclose(
        np.sort(angles["radians"]), np.sort(subspace_angles(rec_dirs.T, base_dirs.T)), atol=1e-8
    )
    spectra = pd.read_csv(run_dir / "spectra.csv")
    np.testing.assert_allclose(
        spectra[spectra.group == "L5"]["variance_share"], rec_share, rtol=1e-8
    )
    assert 0 < headline["overlap_rec_base"] <= 1
    relay = pd.read_csv(run_dir / "relay.csv")
    assert list(relay["layer"]) == [0, 1] and relay["overlap"].between(0, 1 + 1e-9).all()


def test_k_larger_than_the_data_is_refused_before_a_run_exists(tmp_path) -> None:
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match="--k 999"):
        run_subspace(
            SubspaceConfig(prompts=str(_file(tmp_path)), k=999, window=5), out=out, lm=tiny_lm()
        )
    assert not out.exists()


def _hand_readout(lm, directions: np.ndarray, point: str, layer: int, top_n: int):
    """Logit lens by hand in float64: map V rows through o_proj (KV head g -> query heads of
    its group), normalise, scale to unit RMS, RMSNorm by formula, multiply by the lm_head."""
    model = lm.model
    if point == "v":
        heads = directions.reshape(len(directions), 2, 16)  # (k, Hkv, D)
        z = np.repeat(heads, 2, axis=1).reshape(len(directions), 64)  # (k, H * D): h -> h // 2
        w_o = (
            model.model.layers[layer].self_attn.o_proj.weight.detach().double().numpy()
        )  # (d, H * D)
        rows = z @ w_o.T  # (k, d)
    else:
        rows = directions
    rows = rows / np.linalg.norm(rows, axis=1, keepdims=True) * np.sqrt(64)
    norm = model.model.norm
    w_norm, eps = norm.weight.detach().double().numpy(), norm.variance_epsilon
    unembed = model.lm_head.weight.detach().double().numpy()  # (vocab, d)
    tops = []
    for sign in (1, -1):
        x = sign * rows
        normed = x / np.sqrt((x**2).mean(axis=1, keepdims=True) + eps) * w_norm
        logits = normed @ unembed.T  # (k, vocab)
        tops.append(np.argsort(-logits, axis=1)[:, :top_n])
    return tops  # [+u ids (k, top_n), -u ids (k, top_n)]


@pytest.mark.parametrize("point", ["v", "resid_post"])
def test_readout_equals_a_hand_logit_lens(tmp_path, point) -> None:
    lm = tiny_lm("llama")
    config = SubspaceConfig(
        prompts=str(_file(tmp_path)), layer=1, point=point, k=2, window=5, n_boot=200,
        n_splits=10, layers=[1], readout_top_n=4,
    )  # fmt: skip
    run_dir, _, _ = run_subspace(config, out=tmp_path / "run", lm=lm)
    readout = pd.read_csv(run_dir / "readout.csv")
    assert set(readout.group) == {"L5", "factual"}
    texts = [p.text for p in prompt_set(6) if p.group == "L5"]
    batch = encode(lm.tokenizer, texts)
    with torch.no_grad(), Trace(lm.model, lm.adapter, capture=[address(1, point)]) as tr:
        lm.model(**batch.model_inputs(), use_cache=False)
    windows = gather_windows(tr[address(1, point)], batch.n_tokens, 5).flatten(2).double().numpy()
    directions, _ = _top(windows, 2)  # numpy SVD: signs arbitrary
    plus, minus = _hand_readout(lm, directions, point, 1, 4)
    rec = readout[readout.group == "L5"]
    for j in range(2):
        found = {
            sign: rec[(rec.direction == j + 1) & (rec.sign == sign)].sort_values("rank")
            for sign in "+-"
        }
        got = {tuple(found["+"]["token_id"]), tuple(found["-"]["token_id"])}
        assert got == {tuple(plus[j]), tuple(minus[j])}
