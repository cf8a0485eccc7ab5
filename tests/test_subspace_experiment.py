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
