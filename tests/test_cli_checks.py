"""rloop verify, subspace and report from the command line (tiny model, no downloads)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from rloop.cli.checks import register
from tests.test_cli_causal import write_prompts
from tests.tiny_models import tiny_lm


@pytest.fixture
def cli(tmp_path, monkeypatch):
    import rloop.models

    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    monkeypatch.setattr(rloop.models, "load_model", lambda *args, **kwargs: lm)
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args))


def test_verify_subspace_and_report(cli, tmp_path) -> None:
    prompts = str(write_prompts(tmp_path))
    verified = cli("verify", "--prompts", prompts, "--window", "4", "--out", str(tmp_path / "v"))
    assert verified.exit_code == 0, verified.output
    manifest = json.loads((tmp_path / "v" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["headline"]["all_pass"]
    sub = cli(
        "subspace", "--prompts", prompts, "--window", "4", "--k", "2", "--n-boot", "200",
        "--out", str(tmp_path / "s"),
    )  # fmt: skip
    assert sub.exit_code == 0, sub.output
    assert (tmp_path / "s" / "angles.csv").exists()
    site = cli("report", "--runs", str(tmp_path / "store"), "--out", str(tmp_path / "site"))
    assert site.exit_code == 0, site.output
    index = (tmp_path / "site" / "index.html").read_text()
    assert "verify" in index and "subspace" in index


def test_bad_k_is_one_line_exit_2_and_no_run(cli, tmp_path) -> None:
    prompts = str(write_prompts(tmp_path))
    result = cli("subspace", "--prompts", prompts, "--k", "0", "--out", str(tmp_path / "never"))
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--k" in lines[0]
    assert not (tmp_path / "never").exists()


def test_readout_top_n_sets_the_tokens_per_direction(cli, tmp_path) -> None:
    prompts = str(write_prompts(tmp_path))
    out = tmp_path / "r"
    result = cli(
        "subspace", "--prompts", prompts, "--window", "4", "--k", "2", "--n-boot", "200",
        "--point", "resid_post", "--readout-top-n", "3", "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["readout_top_n"] == 3
    readout = pd.read_csv(out / "readout.csv")
    # 2 groups x k=2 directions x 2 signs, 3 tokens each (rank 0 = the most aligned)
    counts = readout.groupby(["group", "direction", "sign"]).size()
    assert len(counts) == 2 * 2 * 2 and set(counts) == {3}
    assert sorted(readout["rank"].unique()) == [0, 1, 2]
    bad = cli(
        "subspace", "--prompts", prompts, "--readout-top-n", "0", "--out", str(tmp_path / "x")
    )
    assert bad.exit_code == 2 and "--readout-top-n" in bad.output
    assert not (tmp_path / "x").exists()
