"""The causal-battery CLI commands on a tiny model: files written, one-line errors, exit 2."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from rloop.cli.causal import register
from tests.test_causal_experiments import write_prompts
from tests.tiny_models import tiny_lm

COMMON = ["--window", "4", "--measure-layers", "0,2", "--n-boot", "200"]


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """A fresh app with the causal commands; every model name loads the tiny llama."""
    import rloop.models

    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    monkeypatch.setattr(rloop.models, "load_model", lambda *args, **kwargs: lm)
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    prompts = str(write_prompts(tmp_path))

    def invoke(*args: str):
        return runner.invoke(app, [*args, "--prompts", prompts])

    return invoke


def test_every_command_writes_tables_plots_and_summary(cli, tmp_path) -> None:
    sweep = tmp_path / "sweep"
    commands = {
        "sweep": ["ablate", "--groups", "L5", *COMMON, "--out", str(sweep)],
        "group": [
            "ablate-group",
            "--from-sweep",
            str(sweep),
            "--top-k",
            "3",
            "--n-random",
            "3",
            *COMMON,
        ],
        "group_list": [
            "ablate-group",
            "--heads",
            "0.1,1.2",
            "--mode",
            "mean",
            "--n-random",
            "2",
            *COMMON,
        ],
        "layer": ["ablate-layer", "--layers", "0-2", "--component", "both", *COMMON],
        "components": ["attn-vs-mlp", "--window", "4", "--n-boot", "200"],
        "heads": ["heads", "--window", "4", "--n-boot", "200"],
        "saliency": ["saliency", *COMMON],
        "patch": ["patch", "--heads", "1.2,1.3", *COMMON],
        "patch_layer": ["patch", "--layers", "1", "--point", "attn_out", *COMMON],
        "attribution": ["attribution", "--groups", "L5", *COMMON],
        "attribution_sweep": ["attribution", "--groups", "L5", "--from-sweep", str(sweep), *COMMON],
    }
    for name, args in commands.items():
        out = tmp_path / name if name != "sweep" else sweep
        if "--out" not in args:
            args = [*args, "--out", str(out)]
        result = cli(*args)
        assert result.exit_code == 0, (name, result.output)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["status"] == "complete", name
        assert (out / "summary.md").exists() and (out / "results.csv").exists(), name
        assert list((out / "plots").glob("*.png")), name
    sweep_rows = pd.read_csv(sweep / "results.csv")
    assert {"prompt_id", "layer", "head", "r_v_base", "r_v_ablated", "impact"} <= set(
        sweep_rows.columns
    )
    layer_rows = pd.read_csv(tmp_path / "layer" / "summary.csv")
    assert set(zip(layer_rows.layer, layer_rows.component, strict=True)) == {
        (layer, c) for layer in range(3) for c in ("attn", "mlp")
    }
    assert len(pd.read_csv(tmp_path / "patch" / "results.csv")) == 4  # 4 L5 -> factual pairs


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ablate-group", "--heads", "1.9", *COMMON], "head index 9 is out of range"),
        (["ablate-group", "--heads", "7.1", *COMMON], "layer 7 is out of range"),
        (["ablate-group", "--heads", "1-2", *COMMON], "cannot read head"),
        (["ablate-layer", "--layers", "5", *COMMON], "layer 5 is out of range"),
        (["heads", "--layers", "3", "--window", "4"], "layer 3 is out of range"),
        (["saliency", "--window", "40", "--measure-layers", "0,2"], "fewer than 40 tokens"),
        (["patch", "--heads", "1.1", "--positions", "all", *COMMON], "different lengths"),
        (["patch", "--layers", "1", "--heads", "1.1", *COMMON], "exactly one of"),
        (["attribution", "--from-sweep", "nowhere", *COMMON], "not a run directory"),
        (["ablate-group", "--heads", "1.1", "--groups", "nope", *COMMON], "not in the prompt set"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(cli, tmp_path, args, message) -> None:
    out = tmp_path / "never"
    result = cli(*args, "--out", str(out))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert message in lines[0]
    assert not out.exists()


def test_empty_prompt_file_and_short_reference_set(tmp_path, monkeypatch) -> None:
    import rloop.models

    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    monkeypatch.setattr(rloop.models, "load_model", lambda *a, **k: tiny_lm("llama"))
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = runner.invoke(
        app,
        [
            "ablate-layer",
            "--layers",
            "1",
            "--prompts",
            str(empty),
            *COMMON,
            "--out",
            str(tmp_path / "a"),
        ],
    )
    assert result.exit_code == 2 and "is empty" in result.output
    short_ref = tmp_path / "mixed.jsonl"
    short_ref.write_text(
        json.dumps({"id": "r", "group": "L5", "text": "1 2 3 4 5 6 7"})
        + "\n"
        + json.dumps({"id": "f", "group": "factual", "text": "1 2"})
        + "\n"
    )
    result = runner.invoke(
        app,
        [
            "ablate-group",
            "--heads",
            "1.1",
            "--mode",
            "mean",
            "--prompts",
            str(short_ref),
            *COMMON,
            "--out",
            str(tmp_path / "b"),
        ],
    )
    assert result.exit_code == 2 and "fewer than 4 tokens" in result.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
