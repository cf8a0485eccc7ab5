"""``--verify``: experiments run the fidelity self-check on the loaded model first and refuse
to start on a FAIL (exit 2, one line, no run directory); the flag is not part of the run's
identity, so it never makes a new run directory."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from rloop.adapters.base import PointSpec
from rloop.cli.app import app
from rloop.experiments.contraction import ContractionConfig
from rloop.runs.layout import config_hash
from tests.test_causal_experiments import write_prompts
from tests.test_sweeps import write_prompts as write_csv_prompts
from tests.tiny_models import tiny_lm

RUNNER = CliRunner()
COMMANDS = {
    "contraction": ["contraction", "--layers", "0,2", "--n-boot", "200"],
    "heads": ["heads", "--n-boot", "200"],
    "temporal": ["temporal", "--layers", "0,2", "--max-new-tokens", "6"],
    "kv-patch": ["kv-patch", "--layers", "0,2", "--max-new-tokens", "6", "--n-pairs", "2",
                 "--alphas", "1", "--semantic", "off"],
}  # fmt: skip


def broken(lm):
    """The tiny model with an adapter that reads V from the key projection (a wrong layout)."""
    points = {**lm.adapter.points, "v": PointSpec("self_attn.k_proj", "output")}
    return dataclasses.replace(lm, adapter=dataclasses.replace(lm.adapter, points=points))


@pytest.fixture
def use(tmp_path, monkeypatch):
    """use(lm): every model name loads ``lm``; returns the command runner."""
    import rloop.models

    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    prompts = str(write_prompts(tmp_path))

    def choose(lm):
        monkeypatch.setattr(rloop.models, "load_model", lambda *args, **kwargs: lm)
        return lambda *args: RUNNER.invoke(app, [*args, "--window", "4", "--prompts", prompts])

    return choose


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_failing_model_is_refused_with_verify_and_runs_without(use, tmp_path, name) -> None:
    run = use(broken(tiny_lm("llama")))
    out = tmp_path / "never"
    refused = run(*COMMANDS[name], "--verify", "--out", str(out))
    assert refused.exit_code == 2, refused.output
    lines = [line for line in refused.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: fidelity checks failed"), lines
    assert "attention_recompute" in lines[0]
    assert not out.exists()
    if name in ("contraction", "heads"):  # the same path as the others, without the check
        ran = run(*COMMANDS[name], "--out", str(out))
        assert ran.exit_code == 0, ran.output
        assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_verify_does_not_change_the_run_directory(use, tmp_path) -> None:
    run = use(tiny_lm("llama"))
    first = run(*COMMANDS["heads"], "--verify")  # a correct model passes: the run goes on
    assert first.exit_code == 0, first.output
    (run_dir,) = [p for p in (tmp_path / "store").iterdir() if p.is_dir()]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert "verify" not in manifest["config"]
    second = run(*COMMANDS["heads"])  # the same request without --verify: the same run
    assert second.exit_code == 0 and "already complete" in second.output, second.output
    assert [p for p in (tmp_path / "store").iterdir() if p.is_dir()] == [run_dir]
    refused = use(broken(tiny_lm("llama")))(*COMMANDS["heads"], "--verify", "--force")
    assert refused.exit_code == 2  # refused before the complete run is touched
    assert json.loads((run_dir / "manifest.json").read_text()) == manifest


def test_verify_is_left_out_of_the_config_hash() -> None:
    plain, checked = ContractionConfig(), ContractionConfig(verify=True)
    assert checked.verify and "verify" not in checked.to_dict()
    assert config_hash(plain.to_dict()) == config_hash(checked.to_dict())


def test_a_sweep_fails_the_job_of_a_model_that_fails_verification(tmp_path, monkeypatch):
    import rloop.models

    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    good, bad = tiny_lm("llama"), broken(tiny_lm("llama"))
    monkeypatch.setattr(
        rloop.models, "load_model", lambda name, **kwargs: bad if name == "bad" else good
    )
    prompts = write_csv_prompts(tmp_path / "prompts.csv")
    args = ["scaling", "--models", "good,bad", "--prompts", str(prompts), "--layers", "0,2",
            "--window", "5", "--n-boot", "200", "--verify"]  # fmt: skip
    result = RUNNER.invoke(app, args)
    assert result.exit_code == 3, result.output
    (failed,) = [line for line in result.output.splitlines() if line.startswith("  bad:")]
    assert "fidelity checks failed" in failed


def test_verify_is_offered_where_the_experiment_takes_it() -> None:
    def options(command: str) -> str:
        return RUNNER.invoke(app, [command, "--help"]).output

    for command in ("contraction", "heads", "patch", "kv-patch", "temporal", "scaling"):
        assert "--verify" in options(command), command
    for command in ("verify", "gain", "validate"):
        assert "--verify" not in options(command), command
