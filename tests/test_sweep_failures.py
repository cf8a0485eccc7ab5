"""Sweeps whose jobs fail exit with code 3 and say which; checkpoints measured before an
``--evict`` (or before an interruption) come from the run record, not from the disk."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from rloop.cli.app import app
from rloop.experiments.sweeps import FAILED_JOBS_EXIT, CheckpointConfig, run_checkpoints
from tests.test_sweeps import LOADS, load_local, save_checkpoint, settings
from tests.test_sweeps import write_prompts as write_csv_prompts

RUNNER = CliRunner()
MEASURE = ["--layers", "0,2", "--window", "5", "--n-boot", "200", "--batch-size", "4"]


@pytest.fixture(autouse=True)
def _isolated_store(tmp_path, monkeypatch):
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))


def test_a_sweep_with_a_failed_job_exits_3_and_lists_it(tmp_path) -> None:
    good = save_checkpoint(tmp_path / "m0")
    missing = tmp_path / "m1"  # no such model directory: its job fails, the other goes on
    prompts = write_csv_prompts(tmp_path / "prompts.csv")
    out = tmp_path / "sweep"
    args = ["scaling", "--models", f"{good},{missing}", "--prompts", str(prompts), *MEASURE]
    result = RUNNER.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == FAILED_JOBS_EXIT == 3, result.output
    lines = result.output.splitlines()
    assert any("1 job(s) failed" in line for line in lines)
    failed = [line for line in lines if line.startswith(f"  {missing}:")]
    assert len(failed) == 1 and "does not exist" in failed[0]
    failures = pd.read_csv(out / "failures.csv")
    assert failures["model"].tolist() == [str(missing)]
    scaling = pd.read_csv(out / "scaling.csv")
    assert scaling["model"].unique().tolist() == [str(good)]  # the finished job is reported
    # the recorded result is the same on a rerun: still exit 3, nothing recomputed
    again = RUNNER.invoke(app, [*args, "--out", str(out)])
    assert again.exit_code == 3 and "already complete" in again.output


def test_a_sweep_without_failures_exits_0(tmp_path) -> None:
    good = save_checkpoint(tmp_path / "m0")
    prompts = write_csv_prompts(tmp_path / "prompts.csv")
    result = RUNNER.invoke(
        app, ["scaling", "--models", str(good), "--prompts", str(prompts), *MEASURE]
    )
    assert result.exit_code == 0, result.output
    assert "job(s) failed" not in result.output and "n_failed: 0" in result.output


def test_gain_with_a_model_that_fails_exits_3(tmp_path) -> None:
    good = save_checkpoint(tmp_path / "m0")
    missing = tmp_path / "nowhere"
    prompts = write_csv_prompts(tmp_path / "prompts.csv")
    result = RUNNER.invoke(
        app,
        ["gain", "--models", f"{good},{missing}", "--prompts", str(prompts), "--n-boot", "200",
         "--out", str(tmp_path / "gain")],
    )  # fmt: skip
    assert result.exit_code == 3, result.output
    assert "1 model(s) failed" in result.output
    assert any(line.startswith(f"  {missing}:") for line in result.output.splitlines())


def test_every_job_failing_is_one_line_and_exit_2(tmp_path) -> None:
    prompts = write_csv_prompts(tmp_path / "prompts.csv")
    models = f"{tmp_path / 'a'},{tmp_path / 'b'}"
    result = RUNNER.invoke(
        app, ["scaling", "--models", models, "--prompts", str(prompts), *MEASURE]
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: every job failed")


def test_help_documents_the_exit_codes() -> None:
    for command in ("scaling", "checkpoints", "gain"):
        text = " ".join(RUNNER.invoke(app, [command, "--help"]).output.split())
        assert "exits with code 3" in text or "3 the sweep completed" in text, command


def test_evicted_checkpoints_are_taken_from_the_record_on_a_rerun(tmp_path) -> None:
    dirs = [save_checkpoint(tmp_path / "ck" / f"step{s}", seed=s) for s in (0, 100)]
    prompts = write_csv_prompts(tmp_path / "prompts.csv")
    out = tmp_path / "sweep"
    args = ["checkpoints", "--checkpoint-dirs", ",".join(map(str, dirs)), "--evict"]
    args += ["--prompts", str(prompts), *MEASURE, "--out", str(out)]
    first = RUNNER.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert not any(d.exists() for d in dirs)  # evicted after measuring
    table = pd.read_parquet(out / "checkpoints.parquet")
    again = RUNNER.invoke(app, args)
    assert again.exit_code == 0 and "already complete" in again.output, again.output
    rebuilt = RUNNER.invoke(app, [*args, "--force"])  # rebuilds every table from the records
    assert rebuilt.exit_code == 0, rebuilt.output
    pd.testing.assert_frame_equal(pd.read_parquet(out / "checkpoints.parquet"), table)
    jobs = pd.read_csv(out / "jobs.csv")
    for row in table[table.pr_mode == "per-head"].itertuples():
        child = Path(jobs.loc[jobs.label == row.label, "run_dir"].iloc[0])
        results = pd.read_parquet(child / "results.parquet")
        per_head = results[(results.pr_mode == "per-head") & (results.group == "L5")]
        assert row.r_v_recursive == pytest.approx(per_head["r_v"].mean(), abs=1e-12)
    # a directory that was never measured is still an error, before anything is written
    never = RUNNER.invoke(
        app, [*args[:2], str(tmp_path / "ck" / "step999"), *args[3:-2], "--out",
              str(tmp_path / "other")],
    )  # fmt: skip
    assert never.exit_code == 2 and "not found" in never.output
    assert not (tmp_path / "other").exists()


def test_an_interrupted_evicting_sweep_resumes_without_the_evicted_checkpoint(tmp_path):
    dirs = [save_checkpoint(tmp_path / "ck" / f"step{s}", seed=s) for s in (0, 100)]
    config = CheckpointConfig(
        checkpoint_dirs=[str(d) for d in dirs], evict=True, settings=settings(tmp_path)
    )

    def interrupted(name, **kwargs):
        if name == str(dirs[1]):
            raise KeyboardInterrupt  # killed while the second checkpoint loads
        return load_local(name, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        run_checkpoints(config, out=tmp_path / "sweep", loader=interrupted)
    assert not dirs[0].exists() and dirs[1].exists()  # the first was measured and evicted
    LOADS.clear()
    outcome = run_checkpoints(config, out=tmp_path / "sweep", loader=load_local)
    assert [str(dirs[1])] == LOADS  # the evicted one is not needed again
    table = pd.read_csv(outcome.run_dir / "checkpoints.csv")
    assert table[table.pr_mode == "per-head"]["step"].tolist() == [0, 100]
    assert outcome.headline["n_failed"] == 0 and not any(d.exists() for d in dirs)
