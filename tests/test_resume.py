"""Interrupted runs resume through the shared runner: the head sweep and patching save each
finished unit and a rerun computes only the rest, giving the same tables as a fresh run."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import rloop.experiments.ablate as ablate_module
import rloop.experiments.patch as patch_module
from rloop.experiments.ablate import run_head_sweep
from rloop.experiments.patch import PatchConfig, run_patching
from tests.test_ablation_experiment import _l5_config, _prompt_file
from tests.tiny_models import tiny_lm


def _interrupt_on_call(monkeypatch, module, name: str, on_call: int) -> list:
    """Make ``module.name`` raise KeyboardInterrupt on call number ``on_call``; count calls."""
    real = getattr(module, name)
    calls: list = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == on_call:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the run
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def _sorted_csv(path, keys) -> pd.DataFrame:
    return pd.read_csv(path).sort_values(keys, ignore_index=True)


def test_interrupted_head_sweep_resumes_equal_to_a_fresh_run(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    monkeypatch.setattr(ablate_module, "LAYERS_PER_UNIT", 1)  # 3 layers -> 3 checkpoints
    lm = tiny_lm("llama")
    config = _l5_config(tmp_path)
    out = tmp_path / "run"
    _interrupt_on_call(monkeypatch, ablate_module, "head_sweep", on_call=3)
    with pytest.raises(KeyboardInterrupt):
        run_head_sweep(config, out=out, lm=lm)
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"
    assert len(list((out / "partial").glob("*.parquet"))) == 2

    monkeypatch.undo()
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    monkeypatch.setattr(ablate_module, "LAYERS_PER_UNIT", 1)
    calls = _interrupt_on_call(monkeypatch, ablate_module, "head_sweep", on_call=0)
    run_head_sweep(config, out=out, lm=lm)
    assert len(calls) == 1  # only the unfinished layer is computed again
    fresh_dir, _, _ = run_head_sweep(config, out=tmp_path / "fresh", lm=lm)
    keys = ["prompt_id", "layer", "head"]
    pd.testing.assert_frame_equal(
        _sorted_csv(out / "results.csv", keys), _sorted_csv(fresh_dir / "results.csv", keys)
    )
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "heads.csv"), pd.read_csv(fresh_dir / "heads.csv")
    )


def test_interrupted_patching_resumes_equal_to_a_fresh_run(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    config = PatchConfig(
        prompts=str(_prompt_file(tmp_path, n=4)),
        heads="1.2",
        measure_layers=[1, 2],
        window=5,
        n_boot=200,
        batch_size=1,
    )
    out = tmp_path / "run"
    _interrupt_on_call(monkeypatch, patch_module, "patched_r_v_batch", on_call=3)
    with pytest.raises(KeyboardInterrupt):
        run_patching(config, out=out, lm=lm)
    assert len(list((out / "partial").glob("*.parquet"))) == 2

    monkeypatch.undo()
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    calls = _interrupt_on_call(monkeypatch, patch_module, "patched_r_v_batch", on_call=0)
    run_patching(config, out=out, lm=lm)
    assert len(calls) == 2  # 4 pairs, one per chunk, 2 were done
    fresh_dir, _, _ = run_patching(config, out=tmp_path / "fresh", lm=lm)
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "results.csv"), pd.read_csv(fresh_dir / "results.csv")
    )
