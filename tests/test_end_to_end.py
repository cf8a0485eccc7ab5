"""The embedded real model end to end: the contraction experiment from the CLI, and
batched measurement equal to batch size 1 on real weights."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from rloop.cli import app


@pytest.mark.slow
def test_contraction_cli_on_embedded_model(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "contraction",
            "--bank-version",
            "v1",
            "--groups",
            "L5,factual",
            "--layers",
            "5,25",
            "--n-boot",
            "200",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "summary.md" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["model"]["name"] == "smollm2-135m" and manifest["model"]["family"] == "llama"
    assert manifest["layers"] == {"early": 5, "late": 25, "rule": "explicit"}
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 2 * 48  # 24 L5 + 24 factual, two PR modes
    assert results["r_v"].notna().all() and (results["n_tokens"] >= 16).all()
    profile = pd.read_parquet(out / "profile.parquet")
    assert sorted(profile["layer"].unique()) == list(range(30))
    # The profile's layer-25 / layer-5 ratio is the recorded R_V.
    wide = profile.pivot_table(index=["prompt_id", "pr_mode"], columns="layer", values="pr")
    merged = results.set_index(["prompt_id", "pr_mode"])
    np.testing.assert_allclose(merged["r_v"], (wide[25] / wide[5]).loc[merged.index], rtol=1e-12)
    # Runs list shows it.
    listed = CliRunner().invoke(
        app, ["runs", "list", "--root", str(tmp_path / "store")], env={"COLUMNS": "200"}
    )
    assert listed.exit_code == 0 and "contraction" in listed.output


@pytest.mark.slow
def test_batched_equals_batch_one_on_real_weights() -> None:
    from rloop.experiments.contraction import ContractionConfig, measure_contraction
    from rloop.models import load_model
    from rloop.prompts import load_bank

    lm = load_model("smollm2-135m")
    bank = load_bank().select(["L5", "factual", "long_nonrecursive"])
    config = dict(n_boot=100, pr_modes=["per-head", "whole"])
    batched = measure_contraction(lm, bank, ContractionConfig(batch_size=16, **config))
    single = measure_contraction(lm, bank, ContractionConfig(batch_size=1, **config))
    a = batched.profile.sort_values(["prompt_id", "pr_mode", "layer"])["pr"].to_numpy()
    b = single.profile.sort_values(["prompt_id", "pr_mode", "layer"])["pr"].to_numpy()
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_bad_input_from_cli_is_one_line_exit_2(tmp_path) -> None:
    runner = CliRunner()
    cases = [
        ["contraction", "--model", "no-such-model"],
        ["contraction", "--prompts", str(tmp_path / "missing.jsonl")],
        ["contraction", "--window", "1"],
        ["contraction", "--layers", "5"],
        ["contraction", "--pr-mode", "sideways"],
    ]
    for args in cases:
        result = runner.invoke(app, [*args, "--out", str(tmp_path / "never")])
        assert result.exit_code == 2, (args, result.output)
        assert "error:" in result.output and result.output.strip().count("\n") == 0, result.output
    assert not (tmp_path / "never").exists()
