"""An interrupted ``rloop sae train`` resumes: the activations of finished prompt batches and
the training up to the last saved step are not computed again, the resumed run's progress bars
start at what was done, and its SAE (bit for bit, on the CPU) and tables equal those of an
uninterrupted run."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import rloop.experiments.runner as runner_module
import rloop.experiments.sae_runs as sae_runs_module
import rloop.sae.train as train_module
from rloop.experiments.sae_runs import TRAINING_STATE, SAETrainConfig, run_sae_train
from tests.test_sae_runs import _file
from tests.tiny_models import tiny_lm

TABLES = ("metrics", "training_loss", "feature_density")
STEPS = 300
EVERY = 100  # steps between saved training states in these tests


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-identical training needs the same thread count
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    monkeypatch.setattr(sae_runs_module, "CHECKPOINT_EVERY", EVERY)
    config = SAETrainConfig(
        prompts=str(_file(tmp_path, 5)), layer=1, d_sae=24, k=3, steps=STEPS,
        train_batch_size=16, continuation_tokens=2, heldout_prompts=0.2, batch_size=4,
    )  # fmt: skip
    return config, tiny_lm("llama")


def _reset(monkeypatch, tmp_path) -> None:
    """Undo every patch of the interrupted session, keeping the run store and the cadence."""
    monkeypatch.undo()
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    monkeypatch.setattr(sae_runs_module, "CHECKPOINT_EVERY", EVERY)


def _counting(monkeypatch, module, name: str, fail_on: int = 0) -> list:
    """Count calls of ``module.name``; raise KeyboardInterrupt (Ctrl-C) on call ``fail_on``."""
    real = getattr(module, name)
    calls: list = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_on:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def _record_bars(monkeypatch) -> dict[str, dict]:
    """Replace both progress bars (the runner's and the training's) with recording ones."""
    bars: dict[str, dict] = {}

    @contextmanager
    def recording_bar(label: str, total: int):
        bars[label] = {"total": total, "steps": []}
        yield bars[label]["steps"].append

    monkeypatch.setattr(runner_module, "progress_bar", recording_bar)
    monkeypatch.setattr(sae_runs_module, "progress_bar", recording_bar)
    return bars


def _assert_same_run(resumed, fresh) -> None:
    """Same SAE tensors bit for bit, same cfg.json, same tables, same training metrics."""
    weights = load_file(resumed / "sae" / "sae_weights.safetensors")
    expected = load_file(fresh / "sae" / "sae_weights.safetensors")
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name
    cfg = (resumed / "sae" / "cfg.json").read_text()
    assert cfg == (fresh / "sae" / "cfg.json").read_text()
    for table in TABLES:
        pd.testing.assert_frame_equal(
            pd.read_parquet(resumed / f"{table}.parquet"),
            pd.read_parquet(fresh / f"{table}.parquet"),
            check_exact=True,
        )
    got, want = (json.loads((d / "manifest.json").read_text())["sae"] for d in (resumed, fresh))
    assert {**got, "dir": None} == {**want, "dir": None}
    assert not (resumed / "partial").exists()  # the checkpoints went with completion


def test_interrupted_training_continues_from_the_last_saved_step(setup, tmp_path, monkeypatch):
    config, lm = setup
    out = tmp_path / "run"
    _counting(monkeypatch, train_module, "_adam_step", fail_on=251)  # killed in step 251
    with pytest.raises(KeyboardInterrupt):
        run_sae_train(config, out=out, lm=lm)
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"
    state = torch.load(out / "partial" / TRAINING_STATE, weights_only=True)
    assert state["trainer"]["step"] == 200
    assert [row["step"] for row in state["losses"]] == [50, 100, 150, 200]
    n_batches = len(list((out / "partial").glob("activations-*.parquet")))
    assert n_batches == 3  # 10 prompts in batches of at most 4

    _reset(monkeypatch, tmp_path)
    steps = _counting(monkeypatch, train_module, "_adam_step")
    forwards = _counting(monkeypatch, sae_runs_module, "batch_activations")
    bars = _record_bars(monkeypatch)
    run_sae_train(config, out=out, lm=lm)
    assert len(steps) == STEPS - 200  # steps 1..200 were not taken again
    assert forwards == []  # every batch's activations came from its checkpoint
    assert bars["training the SAE"]["total"] == STEPS
    assert bars["training the SAE"]["steps"][0] == 200  # the bar starts at the done steps
    assert sum(bars["training the SAE"]["steps"]) == STEPS
    assert bars["collecting activations"]["steps"] == [10]

    monkeypatch.undo()  # the fresh run saves its state every 500 steps: only after the last
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    fresh_steps = _counting(monkeypatch, train_module, "_adam_step")
    fresh, _, _ = run_sae_train(config, out=tmp_path / "fresh", lm=lm)
    assert len(fresh_steps) == STEPS
    _assert_same_run(out, fresh)


def test_interrupted_collection_computes_only_the_missing_batches(setup, tmp_path, monkeypatch):
    config, lm = setup
    out = tmp_path / "run"
    _counting(monkeypatch, sae_runs_module, "batch_activations", fail_on=3)
    with pytest.raises(KeyboardInterrupt):
        run_sae_train(config, out=out, lm=lm)
    assert len(list((out / "partial").glob("activations-*.parquet"))) == 2
    assert not (out / "partial" / TRAINING_STATE).exists()

    _reset(monkeypatch, tmp_path)
    forwards = _counting(monkeypatch, sae_runs_module, "batch_activations")
    bars = _record_bars(monkeypatch)
    run_sae_train(config, out=out, lm=lm)
    assert len(forwards) == 1
    done = bars["collecting activations"]["steps"]
    assert bars["collecting activations"]["total"] == 10 and done[0] == 10 - done[1] > 0

    monkeypatch.undo()
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    fresh, _, _ = run_sae_train(config, out=tmp_path / "fresh", lm=lm)
    _assert_same_run(out, fresh)  # activations read back from parquet are the computed ones


def test_a_state_that_cannot_be_restored_is_warned_about_and_trained_afresh(
    setup, tmp_path, monkeypatch
):
    config, lm = setup
    out = tmp_path / "run"
    _counting(monkeypatch, train_module, "_adam_step", fail_on=150)
    with pytest.raises(KeyboardInterrupt):
        run_sae_train(config, out=out, lm=lm)
    (out / "partial" / TRAINING_STATE).write_bytes(b"not a training state")
    _reset(monkeypatch, tmp_path)
    steps = _counting(monkeypatch, train_module, "_adam_step")
    with pytest.warns(RuntimeWarning, match="training from step 0"):
        run_sae_train(config, out=out, lm=lm)
    assert len(steps) == STEPS
    monkeypatch.undo()
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    fresh, _, _ = run_sae_train(config, out=tmp_path / "fresh", lm=lm)
    _assert_same_run(out, fresh)
