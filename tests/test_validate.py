"""rloop validate, kv-patch and temporal on tiny models: config, verdicts from thresholds,
tables recomputed independently, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import typer
from typer.testing import CliRunner

from rloop.capture.trace import Trace
from rloop.errors import ConfigError
from rloop.experiments.kv_patch import KVPatchConfig, run_kv_patching
from rloop.experiments.temporal import TemporalConfig, run_temporal
from rloop.experiments.validate import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    Verdict,
    _check,
    _verdicts,
    load_validate_config,
    phase_verdict,
    run_validate,
)
from rloop.metrics import r_v, window_pr
from tests.tiny_models import WordTokenizer, tiny_lm

WORDS = [
    "the", "river", "itself", "aware", "i", "myself", "observing", "city", "of", "noticing",
    "stone", "loop", "my", "a", "water", "mind", "watching", "north", "in", "self",
]  # fmt: skip


class WordsTokenizer(WordTokenizer):
    """WordTokenizer whose decode maps ids to words (some recursive, some plain)."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(WORDS[i % len(WORDS)] for i in ids)


def _prompt_file(tmp_path, n=4, length=8):
    rng = np.random.default_rng(0)
    records = []
    for group in ("rec", "base"):
        for i in range(n):
            ids = rng.integers(1, 96, size=length + i).tolist()
            records.append({"id": f"{group}_{i}", "group": group, "text": " ".join(map(str, ids))})
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(records))
    return path


def _tiny(family="llama"):
    lm = tiny_lm(family)
    lm.tokenizer = WordsTokenizer()
    return lm


def _config(tmp_path, **overrides):
    toml = tmp_path / "validate.toml"
    toml.write_text(
        f"""
[prompts]
prompts = "{_prompt_file(tmp_path)}"
recursive_group = "rec"
baseline_group = "base"
n_pairs = 4
[measure]
window = 4
layers = [0, 2]
n_boot = 200
[generation]
max_new_tokens = 6
semantic = "off"
[patching]
alphas = [0.0, 0.5, 1.0]
[thresholds.phase3]
min_behavior_transfer_pct = 25.0
"""
    )
    return load_validate_config(toml, **overrides)


def test_config_layers_defaults_user_file_and_overrides(tmp_path):
    default = load_validate_config()
    assert default.n_pairs == 20 and default.max_new_tokens == 64
    assert default.thresholds["phase3"]["min_behavior_transfer_pct"] == 30.0
    config = _config(tmp_path, n_pairs=3)
    assert config.n_pairs == 3 and config.window == 4 and config.alphas == [0.0, 0.5, 1.0]
    assert config.thresholds["phase3"] == {
        "min_behavior_transfer_pct": 25.0,
        "min_r_v_transfer_pct": 30.0,
    }
    bad = tmp_path / "bad.toml"
    for text, match in [
        ("[patching]\nalphas = [0.0, 1.5]\n", "alpha must lie in"),
        ("[generation]\nmax_new_tokens = 0\n", "generation length"),
        ("[prompts]\nbogus = 1\n", "unknown key"),
        ("[thresholds.phase9]\nx = 1\n", "unknown thresholds"),
        ("[measure]\nwindow = 100\n", "below the 100-token window"),
        ("not toml = = 1", "not valid TOML"),
    ]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_validate_config(bad)


def test_check_and_phase_verdict():
    assert _check("1", "g", -1.0, "<=", -0.8).verdict == PASS
    assert _check("1", "g", -0.5, "<=", -0.8).verdict == FAIL
    assert _check("3", "t", 31.0, ">=", 30).verdict == PASS
    assert _check("3", "t", float("nan"), ">=", 30, "gap within noise").verdict == INCONCLUSIVE
    v = [Verdict("1", "a", 1, "", PASS), Verdict("1", "b", 1, "", INCONCLUSIVE)]
    assert phase_verdict(v) == INCONCLUSIVE
    assert phase_verdict([*v, Verdict("1", "c", 1, "", FAIL)]) == FAIL


@pytest.fixture(scope="module")
def validate_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("validate")
    config = _config(tmp_path)
    run_dir, already, headline = run_validate(config, out=tmp_path / "run", lm=_tiny())
    return config, run_dir, headline


def test_validate_writes_report_and_recomputable_tables(validate_run):
    config, run_dir, headline = validate_run
    assert set(headline) == {"phase1", "phase2", "phase3", "phase4"}
    summary = (run_dir / "summary.md").read_text()
    for title in ("Phase 1", "Phase 2", "Phase 3", "Phase 4", "Verdicts"):
        assert title in summary
    for name in ("generations", "transfer", "verdicts", "correlations", "dose_response"):
        assert (run_dir / f"{name}.parquet").is_file() and (run_dir / f"{name}.csv").is_file()
    assert (run_dir / "plots" / "dose_response.png").is_file()
    grid = pd.read_parquet(run_dir / "generations.parquet")
    # 4 pairs x (2 natural + v_patch + 3 alphas + targeted + single)
    assert len(grid) == 4 * 8
    # transfer % recomputed by hand from the per-row table
    transfer = pd.read_parquet(run_dir / "transfer.parquet")
    means = grid.groupby("condition")["r_v_generated"].mean()
    row = transfer[(transfer.condition == "kv:full@0.5") & (transfer.metric == "r_v_generated")]
    gap = means["natural_source"] - means["natural_target"]
    expected = (means["kv:full@0.5"] - means["natural_target"]) / gap * 100
    if abs(gap) > float(row.noise.iloc[0]):
        assert float(row.transfer_pct.iloc[0]) == pytest.approx(expected, rel=1e-9)
    else:
        assert np.isnan(row.transfer_pct.iloc[0])
    # alpha = 0 on the full range reproduces the natural target rows (same memory lengths
    # would make it exact; here the target may be shifted, so only where lengths allow)
    zero = grid[grid.condition == "kv:full@0"].set_index("pair_id")
    natural = grid[grid.condition == "natural_target"].set_index("pair_id")
    targets_longer = [p for p in zero.index if int(p.split("<-")[0][-1]) >= int(p[-1])]
    assert targets_longer
    for pair in targets_longer:
        assert zero.loc[pair, "text"] == natural.loc[pair, "text"]
    # the verdicts follow the config thresholds, recomputed from the same data
    verdicts = pd.read_parquet(run_dir / "verdicts.parquet")
    behaviour = verdicts[verdicts.check.str.startswith("behaviour transfer")].iloc[0]
    assert behaviour.rule.startswith(">= 25")
    if np.isfinite(behaviour.value):
        assert behaviour.verdict == (PASS if behaviour.value >= 25 else FAIL)


def test_verdicts_move_with_thresholds_not_with_code(validate_run):
    config, run_dir, _ = validate_run
    verdicts = pd.read_parquet(run_dir / "verdicts.parquet")
    g = float(verdicts[verdicts.check.str.startswith("Hedges")].value.iloc[0])

    class Contraction:
        contrasts = pd.read_parquet(run_dir / "phase1_contrasts.parquet")

    transfer = pd.read_parquet(run_dir / "transfer.parquet")
    corr = pd.read_parquet(run_dir / "correlations.parquet")
    dose = pd.read_parquet(run_dir / "dose_response.parquet")
    for threshold, expected in ((g + 0.1, PASS), (g - 0.1, FAIL)):
        config.thresholds["phase1"]["max_hedges_g"] = threshold
        again = _verdicts(Contraction, transfer, corr, dose, config)
        assert again[again.check.str.startswith("Hedges")].verdict.iloc[0] == expected


def test_kv_patch_run_with_ranges(tmp_path):
    lm = _tiny("gpt2")
    prompts = _prompt_file(tmp_path)
    config = KVPatchConfig(
        prompts=str(prompts), recursive_group="rec", baseline_group="base", n_pairs=3,
        ranges=["1-2", "2"], alphas=[0.0, 1.0], layers=[0, 2], window=4, max_new_tokens=5,
        semantic="off", n_boot=200,
    )  # fmt: skip
    run_dir, _, headline = run_kv_patching(config, out=tmp_path / "kv", lm=lm)
    grid = pd.read_parquet(run_dir / "generations.parquet")
    assert set(grid.condition) == {
        "natural_target", "natural_source", "v_patch", "kv:1-2@0", "kv:1-2@1", "kv:2@0", "kv:2@1",
    }  # fmt: skip
    assert "kv:1-2@1:score:transfer_pct" in headline
    with pytest.raises(ConfigError, match="out of range"):
        run_kv_patching(
            KVPatchConfig(prompts=str(prompts), recursive_group="rec", baseline_group="base",
                          n_pairs=3, ranges=["1-5"], layers=[0, 2], window=4, max_new_tokens=5),
            out=tmp_path / "never", lm=lm,
        )  # fmt: skip
    assert not (tmp_path / "never").exists()


def test_temporal_step0_matches_plain_forward(tmp_path):
    lm = _tiny("llama")
    prompts = _prompt_file(tmp_path, n=2)
    config = TemporalConfig(
        prompts=str(prompts), groups=["rec", "base"], layers=[0, 2], window=4,
        max_new_tokens=6, batch_size=3,
    )  # fmt: skip
    run_dir, _, _ = run_temporal(config, out=tmp_path / "t", lm=lm)
    per_step = pd.read_parquet(run_dir / "per_step.parquet")
    assert set(per_step.step) == set(range(7))
    assert set(per_step[per_step.scope == "generated"].step) == {4, 5, 6}
    text = json.loads(prompts.read_text())[0]["text"]
    ids = [int(w) for w in text.split()]
    with torch.no_grad(), Trace(lm.model, lm.adapter, ["blocks.0.v", "blocks.2.v"]) as tr:
        lm.model(input_ids=torch.tensor([ids]), use_cache=False)
    expected = r_v(
        window_pr(tr["blocks.2.v"][:, -4:], "per-head"),
        window_pr(tr["blocks.0.v"][:, -4:], "per-head"),
    )
    got = per_step[(per_step.prompt_id == "rec_0") & (per_step.step == 0)]
    assert float(got.r_v.iloc[0]) == pytest.approx(float(expected[0]), abs=1e-4)


def test_cli_bad_input_is_one_line(tmp_path):
    from rloop.cli.generation import register

    app = typer.Typer()
    register(app)
    bad = tmp_path / "bad.toml"
    bad.write_text("[patching]\nalphas = [2.0]\n")
    result = CliRunner().invoke(app, ["validate", "--config", str(bad)])
    assert result.exit_code == 2
    assert "alpha must lie in [0, 1]" in result.output
    result = CliRunner().invoke(app, ["kv-patch", "--alphas", "0,x"])
    assert result.exit_code == 2 and "cannot read --alphas" in result.output
    result = CliRunner().invoke(app, ["temporal", "--max-new-tokens", "0"])
    assert result.exit_code == 2 and "generation length" in result.output
