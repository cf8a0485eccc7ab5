"""Scaling and checkpoint sweeps on tiny random-weight checkpoints saved as local directories
(save_pretrained + a real `tokenizers` WordLevel tokenizer): tables equal the child runs'
per-prompt results, failures are recorded and the sweep goes on, an interrupted sweep resumes
with only the unfinished jobs, and eviction deletes exactly the measured checkpoints."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rloop.errors import ConfigError, ModelLoadError
from rloop.experiments.contraction import ContractionConfig
from rloop.experiments.sweeps import (
    CheckpointConfig,
    ContractionSettings,
    ScalingConfig,
    evict_checkpoint,
    run_checkpoints,
    run_scaling,
    step_of,
)
from rloop.runs.site import load_run
from tests.tiny_models import VOCAB, tiny_model


@pytest.fixture(autouse=True)
def _isolated_store(tmp_path, monkeypatch):
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    monkeypatch.setenv("RLOOP_PROGRESS", "0")


def word_tokenizer():
    """A real PreTrainedTokenizerFast: each whitespace-separated integer is its token id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {str(i): i for i in range(VOCAB)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="0", unk_token="0")


def save_checkpoint(directory: Path, family: str = "llama", seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tiny_model(family, seed=seed).save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    return directory


@dataclass
class LocalLM:
    model: torch.nn.Module
    tokenizer: object
    adapter: object
    name: str
    source: str = "local"
    path: str = "-"
    revision: str | None = None
    weights_sha256: str = "0" * 64
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32


LOADS: list[str] = []


def load_local(name: str, revision=None, device=None, dtype=None) -> LocalLM:
    """Stand-in for rloop.models.load_model on local directories (module level: picklable)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rloop.adapters import adapter_for

    LOADS.append(name)
    if revision is not None:
        raise ModelLoadError(f"revision {revision!r} not found for {name}; check the hub's list")
    if not (Path(name) / "config.json").is_file():
        raise ModelLoadError(f"{name} is not a model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="eager").eval()
    return LocalLM(model, AutoTokenizer.from_pretrained(name), adapter_for(model), name, path=name)


def write_prompts(path: Path, n_per_group: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for group in ("L5", "factual"):
        for i in range(n_per_group):
            n = int(rng.integers(7, 12))
            rows.append({"id": f"{group}_{i}", "group": group,
                         "text": " ".join(str(t) for t in rng.integers(1, VOCAB, n))})  # fmt: skip
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def settings(tmp_path: Path) -> ContractionSettings:
    return ContractionSettings(
        prompts=str(write_prompts(tmp_path / "prompts.csv")),
        layers=[0, 2],
        window=5,
        n_boot=200,
        batch_size=4,
    )


def child_means(run_dir: Path, mode: str = "per-head") -> dict[str, float]:
    """Mean R_V per group recomputed from a child run's per-prompt results.csv."""
    results = pd.read_csv(run_dir / "results.csv")
    results = results[results.pr_mode == mode]
    return results.groupby("group")["r_v"].mean().to_dict()


def test_step_of() -> None:
    assert step_of("step143000") == 143000
    assert step_of("/x/ckpt-7/step-5000") == 5000
    assert step_of("main") is None


def test_checkpoint_sweep_records_failure_and_evicts(tmp_path) -> None:
    dirs = [save_checkpoint(tmp_path / "ck" / f"step{s}", seed=s) for s in (0, 1000, 5000)]
    broken = tmp_path / "ck" / "step2000"
    broken.mkdir()  # no config.json: fails to load in the middle of the sweep
    order = [dirs[0], broken, dirs[1], dirs[2]]
    config = CheckpointConfig(
        checkpoint_dirs=[str(d) for d in order], evict=True, settings=settings(tmp_path)
    )
    outcome = run_checkpoints(config, out=tmp_path / "sweep", loader=load_local)
    run_dir = outcome.run_dir
    table = pd.read_csv(run_dir / "checkpoints.csv")
    per_head = table[table.pr_mode == "per-head"]
    assert per_head["step"].tolist() == [0, 1000, 5000]
    failures = pd.read_csv(run_dir / "failures.csv")
    assert failures["label"].tolist() == ["step2000"]
    assert "no config.json" in failures["error"].iloc[0]
    jobs = pd.read_csv(run_dir / "jobs.csv")
    for row in per_head.itertuples():
        child = Path(jobs.loc[jobs.label == row.label, "run_dir"].iloc[0])
        means = child_means(child)
        np.testing.assert_allclose(row.r_v_recursive, means["L5"], atol=1e-9)
        np.testing.assert_allclose(row.gap, means["factual"] - means["L5"], atol=1e-9)
    # Measured checkpoints were deleted, the failed one is kept for a retry.
    assert not any(d.exists() for d in dirs) and broken.exists()
    assert (run_dir / "plots" / "checkpoints.png").stat().st_size > 0
    assert outcome.headline["n_failed"] == 1
    # The sweep run goes through the runner: it has its report and names what was swept.
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["model"]["name"] == "ck" and manifest["model"]["path"] == str(tmp_path / "ck")
    assert manifest["model"]["checkpoints"] == ["step0", "step2000", "step1000", "step5000"]
    record = load_run(run_dir)
    assert record.model == "ck" and record.status == "complete"
    report = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "<strong>ck</strong>" in report and 'id="table-checkpoints-data"' in report
    for child in jobs["run_dir"]:  # each measured checkpoint's own report is linked
        assert (Path(child) / "report.html").is_file()
        assert f'href="jobs/{Path(child).name}/report.html"' in report


def test_interrupted_sweep_resumes_with_unfinished_jobs(tmp_path, monkeypatch) -> None:
    dirs = [save_checkpoint(tmp_path / f"m{i}", family=f) for i, f in enumerate(["llama", "gpt2"])]
    dirs.append(save_checkpoint(tmp_path / "m2", family="gpt_neox"))
    config = ScalingConfig(models=[str(d) for d in dirs], settings=settings(tmp_path))

    def interrupted(name, **kwargs):
        if name == str(dirs[1]):
            raise KeyboardInterrupt
        return load_local(name, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        run_scaling(config, out=tmp_path / "sweep", loader=interrupted)
    LOADS.clear()
    outcome = run_scaling(config, out=tmp_path / "sweep", loader=load_local)
    loaded = list(LOADS)
    assert loaded == [str(dirs[1]), str(dirs[2])]  # the finished model is not loaded again
    table = pd.read_csv(outcome.run_dir / "scaling.csv")
    assert sorted(table["model"].unique()) == sorted(str(d) for d in dirs)
    for row in table.itertuples():
        model = load_local(row.model).model
        assert row.n_params == sum(p.numel() for p in model.parameters())
    again = run_scaling(config, out=tmp_path / "sweep", loader=load_local)
    assert again.already_complete
    model = json.loads((outcome.run_dir / "manifest.json").read_text())["model"]
    assert model["models"] == [str(d) for d in dirs]
    assert load_run(outcome.run_dir).model == ", ".join(str(d) for d in dirs)
    assert (outcome.run_dir / "report.html").is_file()


def test_scaling_with_gain_writes_h25_outputs(tmp_path) -> None:
    dirs = [save_checkpoint(tmp_path / f"m{i}", family=f) for i, f in enumerate(["llama", "gpt2"])]
    config = ScalingConfig(models=[str(d) for d in dirs], gain=True, settings=settings(tmp_path))
    outcome = run_scaling(config, out=tmp_path / "sweep", loader=load_local)
    models = pd.read_csv(outcome.run_dir / "models.csv")
    assert len(models) == 2 and set(models["rho"]) == {4 / 16}
    assert (outcome.run_dir / "plots" / "h25.png").exists()
    assert (outcome.run_dir / "plots" / "scaling.png").exists()


def test_retried_job_is_idempotent(tmp_path) -> None:
    from rloop.experiments.sweeps import run_job, scaling_jobs

    ckpt = save_checkpoint(tmp_path / "m0")
    config = ScalingConfig(models=[str(ckpt)], settings=settings(tmp_path))
    (job,) = scaling_jobs(config, tmp_path / "sweep")
    first = run_job(job, loader=load_local)
    LOADS.clear()
    second = run_job(job, loader=load_local)  # e.g. a Ray retry after the worker died
    assert LOADS == [] and second.tables == first.tables and second.status == "done"


def test_bad_input_is_rejected_before_writing(tmp_path) -> None:
    ckpt = save_checkpoint(tmp_path / "m0")
    s = settings(tmp_path)
    with pytest.raises(ConfigError, match="more than once"):
        run_scaling(ScalingConfig(models=[str(ckpt), str(ckpt)], settings=s), out=tmp_path / "a")
    with pytest.raises(ConfigError, match="not found"):
        run_checkpoints(
            CheckpointConfig(checkpoint_dirs=[str(tmp_path / "nope")], settings=s),
            out=tmp_path / "b",
        )
    with pytest.raises(ConfigError, match="either"):
        run_checkpoints(CheckpointConfig(model="m", settings=s), out=tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_unknown_revision_is_recorded_and_sweep_continues(tmp_path) -> None:
    ckpt = save_checkpoint(tmp_path / "m0")

    def revision_loader(name, revision=None, **kwargs):
        if revision == "step999":
            raise ModelLoadError(f"revision {revision!r} not found for {name}")
        return load_local(name, **kwargs)

    config = CheckpointConfig(model=str(ckpt), revisions=["step0", "step999"],
                              settings=settings(tmp_path))  # fmt: skip
    outcome = run_checkpoints(config, out=tmp_path / "sweep", loader=revision_loader)
    failures = pd.read_csv(outcome.run_dir / "failures.csv")
    assert failures["revision"].tolist() == ["step999"]
    assert "not found" in failures["error"].iloc[0]
    assert pd.read_csv(outcome.run_dir / "checkpoints.csv")["revision"].unique().tolist() == [
        "step0"
    ]
    model = json.loads((outcome.run_dir / "manifest.json").read_text())["model"]
    assert (model["name"], model["revision"]) == (str(ckpt), "step0, step999")


def test_sweeps_default_to_the_contraction_prompt_bank() -> None:
    assert ContractionSettings().bank_version == ContractionConfig().bank_version == "v2"


def test_evict_hub_revision_deletes_only_that_snapshot(tmp_path) -> None:
    repo = tmp_path / "hub" / "models--org--tiny"
    for name, commit, content in (("step0", "a" * 40, "x"), ("step1", "b" * 40, "yy")):
        blob = repo / "blobs" / f"{name}blob"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_text(content)
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / "config.json")
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / name).write_text(commit)
    deleted = evict_checkpoint(repo / "snapshots" / ("a" * 40), "hub")
    assert deleted == [str(repo / "snapshots" / ("a" * 40))]
    assert not (repo / "snapshots" / ("a" * 40)).exists()
    assert (repo / "snapshots" / ("b" * 40) / "config.json").read_text() == "yy"
    assert evict_checkpoint(tmp_path / "not-a-cache", "hub") == []
