"""Interrupted generation runs resume through the shared runner: kv-patch and validate save
each finished generation chunk (validate also phase 1's prompt batches), and a rerun
generates only the rest, giving the same tables as a fresh run."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import rloop.experiments.contraction as contraction_module
import rloop.experiments.kv_patch as kv_patch_module
from rloop.experiments.kv_patch import KVPatchConfig, run_kv_patching
from rloop.experiments.validate import run_validate
from tests.test_validate import _config, _prompt_file, _tiny


def _count_calls(monkeypatch, module, name: str, interrupt_on: int | None = None) -> list:
    """Count calls of ``module.name``; raise KeyboardInterrupt on call ``interrupt_on``."""
    real = getattr(module, name)
    calls: list = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == interrupt_on:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the run
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def _same_tables(run_a, run_b, names) -> None:
    for name in names:
        pd.testing.assert_frame_equal(
            pd.read_csv(run_a / f"{name}.csv"), pd.read_csv(run_b / f"{name}.csv")
        )


def _partials(run_dir, prefix: str) -> list[str]:
    return sorted(p.stem for p in (run_dir / "partial").glob(f"{prefix}*.parquet"))


def test_interrupted_kv_patch_resumes_equal_to_a_fresh_run(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = _tiny("llama")
    config = KVPatchConfig(
        prompts=str(_prompt_file(tmp_path)), recursive_group="rec", baseline_group="base",
        n_pairs=3, ranges=["1-2"], alphas=[0.0, 1.0], layers=[0, 2], window=4,
        max_new_tokens=5, semantic="off", n_boot=200, max_batch_rows=4,
    )  # fmt: skip  # 3 pairs x 5 conditions = 15 rows -> 4 chunks
    out = tmp_path / "run"
    _count_calls(monkeypatch, kv_patch_module, "patched_generate", interrupt_on=3)
    with pytest.raises(KeyboardInterrupt):
        run_kv_patching(config, out=out, lm=lm)
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"
    assert _partials(out, "generation") == ["generation-00000", "generation-00001"]

    monkeypatch.undo()
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    calls = _count_calls(monkeypatch, kv_patch_module, "patched_generate")
    run_kv_patching(config, out=out, lm=lm)
    assert len(calls) == 2  # only the two unfinished chunks are generated again
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    fresh, _, _ = run_kv_patching(config, out=tmp_path / "fresh", lm=lm)
    assert len(calls) == 2 + 4
    _same_tables(out, fresh, ["generations", "transfer", "correlations", "dose_response"])


def test_interrupted_validate_resumes_both_phases(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = _tiny("llama")
    config = _config(tmp_path, max_batch_rows=8)  # 4 pairs x 8 conditions -> 4 chunks
    out = tmp_path / "run"
    _count_calls(monkeypatch, kv_patch_module, "patched_generate", interrupt_on=3)
    with pytest.raises(KeyboardInterrupt):
        run_validate(config, out=out, lm=lm)
    assert _partials(out, "generation") == ["generation-00000", "generation-00001"]
    assert _partials(out, "batch")  # phase 1 finished before generating

    monkeypatch.undo()
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    generated = _count_calls(monkeypatch, kv_patch_module, "patched_generate")
    measured = _count_calls(monkeypatch, contraction_module, "measure_pr")
    run_validate(config, out=out, lm=lm)
    assert len(generated) == 2 and len(measured) == 0  # phase 1 is not measured again
    fresh, _, _ = run_validate(config, out=tmp_path / "fresh", lm=lm)
    assert len(measured) > 0 and len(generated) == 2 + 4
    _same_tables(
        out, fresh, ["phase1_contraction", "phase1_contrasts", "generations", "transfer",
                     "verdicts"],
    )  # fmt: skip
