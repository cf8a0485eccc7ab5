"""rloop steer, rloop sae train and rloop sae features from the command line (tiny model, no
downloads): each writes a complete run record; bad input is one line, exit 2, no run dir."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import typer
from typer.testing import CliRunner

from rloop.cli.steering import register
from rloop.sae import load_sae
from tests.test_contraction import prompt_set
from tests.tiny_models import tiny_lm


@pytest.fixture
def cli(tmp_path, monkeypatch):
    import rloop.models

    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    monkeypatch.setattr(rloop.models, "load_model", lambda *args, **kwargs: lm)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    yield lambda *args: runner.invoke(app, list(args))
    torch.set_num_threads(threads)


@pytest.fixture
def prompts(tmp_path) -> str:
    path = tmp_path / "prompts.jsonl"
    with path.open("w") as f:
        for p in prompt_set(4):
            f.write(json.dumps({"id": p.id, "group": p.group, "text": p.text}) + "\n")
    return str(path)


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


def _one_line_error(result, *words) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for word in words:
        assert word in lines[0]


def test_steer_and_sae_commands_write_run_records(cli, prompts, tmp_path) -> None:
    steered = cli(
        "steer", "--prompts", prompts, "--window", "4", "--max-new-tokens", "4",
        "--alphas", "0,1", "--n-random", "1", "--n-boot", "200", "--semantic", "off",
        "--out", str(tmp_path / "steer"),
    )  # fmt: skip
    assert steered.exit_code == 0, steered.output
    assert _manifest(tmp_path / "steer")["status"] == "complete"
    grid = pd.read_csv(tmp_path / "steer" / "generations.csv")
    assert len(grid) == 4 * 3 + 4  # 4 factual x (none, u, random) + 4 recursive
    trained = cli(
        "sae", "train", "--prompts", prompts, "--layer", "1", "--d-sae", "16", "--k", "2",
        "--steps", "20", "--continuation-tokens", "0", "--out", str(tmp_path / "train"),
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    assert load_sae(tmp_path / "train" / "sae").d_sae == 16
    found = cli(
        "sae", "features", "--sae", str(tmp_path / "train" / "sae"), "--prompts", prompts,
        "--window", "4", "--k", "2", "--top-n", "3", "--n-boot", "200",
        "--out", str(tmp_path / "features"),
    )  # fmt: skip
    assert found.exit_code == 0, found.output
    assert _manifest(tmp_path / "features")["headline"]["hook"] == "blocks.1.resid_post"
    assert len(pd.read_csv(tmp_path / "features" / "differential.csv")) == 16


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["steer", "--window", "4", "--alphas", ","], ["--alphas", "empty"]),
        (["steer", "--window", "4", "--layer", "9"], ["layer 9"]),
        (["sae", "train", "--layer", "5"], ["layer 5"]),
        (["sae", "train", "--k", "0"], ["--k"]),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_run(cli, prompts, tmp_path, args, words) -> None:
    out = tmp_path / "never"
    result = cli(*args, "--prompts", prompts, "--out", str(out))
    _one_line_error(result, *words)
    assert not out.exists()


def test_sae_features_with_a_wrong_width_is_refused(cli, prompts, tmp_path) -> None:
    trained = cli(
        "sae", "train", "--prompts", prompts, "--layer", "1", "--point", "v", "--d-sae", "8",
        "--k", "2", "--steps", "5", "--continuation-tokens", "0", "--out", str(tmp_path / "t"),
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    out = tmp_path / "never"
    result = cli(
        "sae", "features", "--sae", str(tmp_path / "t" / "sae"), "--point", "resid_post",
        "--prompts", prompts, "--window", "4", "--out", str(out),
    )  # fmt: skip
    _one_line_error(result, "d_in 32", "blocks.1.resid_post")
    assert not out.exists()
