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

import rloop.experiments.kv_patch as kv_patch_module
from rloop.capture.trace import Trace
from rloop.errors import ConfigError, PromptError
from rloop.experiments.kv_patch import (
    KVPatchConfig,
    plot_transfer,
    run_kv_patching,
    transfer_plot_notes,
    transfer_table,
)
from rloop.experiments.temporal import TemporalConfig, run_temporal
from rloop.experiments.validate import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    ValidateConfig,
    Verdict,
    _check,
    _verdicts,
    abs_interval,
    load_validate_config,
    phase_verdict,
    run_validate,
)
from rloop.metrics import r_v, window_pr
from rloop.metrics.stats import (
    noise_floor,
    transfer_bootstrap,
    transfer_interval,
    transfer_percent,
)
from rloop.prompts import DEFAULT_BANK_VERSION, load_bank
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


# ---------------------------------------------------------------- transfer % with a cluster CI
def _synthetic_grid(n_pairs=6, seed=3) -> pd.DataFrame:
    """A grid of per-pair values: source ~ target + 1, v_patch near the target, kv half way;
    one missing (NaN) value."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_pairs):
        target = rng.normal(0.5, 0.2)
        source = target + 1.0 + rng.normal(0, 0.3)
        values = {
            "natural_target": target,
            "natural_source": source,
            "v_patch": target + rng.normal(0.05, 0.2),
            "kv:full@1": target + 0.5 * (source - target) + rng.normal(0, 0.2),
        }
        for condition, value in values.items():
            kind = "kv" if condition.startswith("kv") else condition
            rows.append(
                {
                    "pair_id": f"p{i}", "condition": condition, "kind": kind,
                    "range_label": "full" if kind == "kv" else "",
                    "layers": "1-2" if kind == "kv" else "",
                    "alpha": 1.0 if kind == "kv" else np.nan,
                    "r_v_generated": value, "score": 2.0 * value + rng.normal(0, 0.1),
                }
            )  # fmt: skip
    grid = pd.DataFrame(rows)
    grid.loc[(grid.pair_id == "p2") & (grid.condition == "kv:full@1"), "score"] = np.nan
    return grid


def _hand_transfer_cis(grid, noise, n_boot, seed) -> dict:
    """Resample pair ids with a plain loop, stack the long rows of the drawn pairs and
    recompute the means and transfer % of each draw with pandas -> (metric, condition) ->
    (ci_low, ci_high, undefined share). ``noise``: metric -> the point estimate's noise."""
    pair_ids = sorted(grid["pair_id"].unique())
    by_pair = {pair: grid[grid["pair_id"] == pair] for pair in pair_ids}
    draws = np.random.default_rng(seed).integers(0, len(pair_ids), size=(n_boot, len(pair_ids)))
    values: dict = {}
    for draw in draws:
        sample = pd.concat([by_pair[pair_ids[i]] for i in draw])
        means = sample.groupby("condition")[["r_v_generated", "score"]].mean()
        for metric in ("r_v_generated", "score"):
            for condition in ("kv:full@1", "v_patch"):
                pct, _ = transfer_percent(
                    means.loc[condition, metric],
                    means.loc["natural_target", metric],
                    means.loc["natural_source", metric],
                    noise[metric],
                )
                values.setdefault((metric, condition), []).append(pct)
    out = {}
    for key, pcts in values.items():
        pcts = np.array(pcts)
        defined = pcts[np.isfinite(pcts)]
        low, high = np.quantile(defined, [0.025, 0.975])
        out[key] = (low, high, 1.0 - defined.size / n_boot)
    return out


def test_transfer_ci_equals_a_hand_written_pair_bootstrap():
    grid = _synthetic_grid()
    table = transfer_table(grid, n_boot=200, seed=7)
    assert table.equals(transfer_table(grid, n_boot=200, seed=7))  # same seed, same numbers
    other = transfer_table(grid, n_boot=200, seed=8)
    assert not np.allclose(other["transfer_ci_low"], table["transfer_ci_low"], equal_nan=True)
    noise = table.groupby("metric")["noise"].first().to_dict()
    expected = _hand_transfer_cis(grid, noise, 200, 7)
    for (metric, condition), (low, high, share) in expected.items():
        row = table[(table.metric == metric) & (table.condition == condition)].iloc[0]
        assert np.isfinite(row.transfer_pct)  # the gap (about 1) is far above the noise
        assert row.transfer_ci_low == pytest.approx(low, rel=1e-9, abs=1e-9)
        assert row.transfer_ci_high == pytest.approx(high, rel=1e-9, abs=1e-9)
        assert row.transfer_undefined_share == pytest.approx(share)
        assert row.transfer_ci_low <= row.transfer_pct <= row.transfer_ci_high


def test_transfer_ci_withheld_when_the_gap_is_near_noise():
    grid = _synthetic_grid()
    flat = grid.copy()
    source = flat.condition == "natural_source"
    target = flat[flat.condition == "natural_target"].set_index("pair_id")["r_v_generated"]
    jitter = np.random.default_rng(5).normal(0.0, 0.3, int(source.sum()))  # no true gap
    flat.loc[source, "r_v_generated"] = flat.loc[source, "pair_id"].map(target).to_numpy() + jitter
    row = transfer_table(flat, n_boot=200, seed=0)
    row = row[(row.metric == "r_v_generated") & (row.condition == "kv:full@1")].iloc[0]
    assert np.isnan(row.transfer_pct) and row.transfer_undefined == "gap within noise"
    assert np.isnan(row.transfer_ci_low) and np.isnan(row.transfer_ci_high)
    assert row.transfer_ci_note == "point transfer % undefined"
    # More than 5 % of the draws undefined: no CI; at most 5 %: the percentile CI of the rest.
    boot = np.arange(100, dtype=float)
    boot[:10] = np.nan
    wide = transfer_interval(boot, point_defined=True)
    assert np.isnan(wide.low) and wide.undefined_share == pytest.approx(0.1)
    assert "unbounded" in wide.note
    boot[5:10] = np.arange(5, 10)
    kept = transfer_interval(boot, point_defined=True)
    assert kept.undefined_share == pytest.approx(0.05)
    want = np.quantile(np.arange(5, 100), [0.025, 0.975])
    assert (kept.low, kept.high) == pytest.approx(tuple(want), rel=1e-12)


def test_transfer_ci_covers_the_true_transfer_in_simulation():
    """Pairs with a known transfer of 40 %: the 95 % CI covers it in about 95 % of 200
    simulated experiments (30 pairs each)."""
    rng = np.random.default_rng(11)
    hits = 0
    n_sim = 200
    for sim in range(n_sim):
        target = rng.normal(0, 1, 30)
        source = target + rng.normal(1.0, 0.5, 30)
        patched = target + 0.4 * (source - target) + rng.normal(0, 0.3, 30)
        noise = float(noise_floor(source - target, n_boot=400, seed=sim))
        ci = transfer_bootstrap(target, source, patched, noise, n_boot=400, seed=sim)
        hits += ci.low <= 40.0 <= ci.high
    assert 0.88 <= hits / n_sim <= 0.99


def test_plot_transfer_notes_a_metric_without_any_value(tmp_path, monkeypatch):
    grid = _synthetic_grid()
    grid["score"] = 1.0  # no natural gap at all: every behaviour transfer % undefined
    table = transfer_table(grid, n_boot=200, seed=0)
    notes = transfer_plot_notes(table)
    assert notes == ["score: transfer % undefined for every condition (gap within noise)"]
    seen = {}

    def keep(fig, path):
        seen["texts"] = [t.get_text() for t in fig.axes[0].texts]
        seen["bars"] = len(fig.axes[0].containers)
        return kv_patch_module.plt.close(fig)

    monkeypatch.setattr(kv_patch_module, "_save", keep)
    plot_transfer(table, tmp_path / "t.png")
    assert notes[0] in seen["texts"][-1]
    assert seen["bars"] == 1  # only R_V has bars
    assert transfer_plot_notes(transfer_table(_synthetic_grid(), n_boot=200)) == []


def test_verdicts_show_the_transfer_ci_next_to_the_point_value(validate_run):
    _, run_dir, _ = validate_run
    verdicts = pd.read_parquet(run_dir / "verdicts.parquet")
    transfer = pd.read_parquet(run_dir / "transfer.parquet")
    kv = transfer[(transfer.condition == "kv:full@1") & (transfer.metric == "score")].iloc[0]
    row = verdicts[verdicts.check.str.startswith("behaviour transfer")].iloc[0]
    np.testing.assert_equal((row.ci_low, row.ci_high), (kv.transfer_ci_low, kv.transfer_ci_high))
    v = transfer[(transfer.condition == "v_patch") & (transfer.metric == "score")].iloc[0]
    null = verdicts[verdicts.phase == "2"].iloc[0]
    np.testing.assert_equal(
        (null.ci_low, null.ci_high), abs_interval(v.transfer_ci_low, v.transfer_ci_high)
    )
    assert abs_interval(-3.0, 5.0) == (0.0, 5.0) and abs_interval(-5.0, -3.0) == (3.0, 5.0)
    summary = (run_dir / "summary.md").read_text()
    assert "transfer_ci_low" in summary and "ci_low" in summary


# ---------------------------------------------------------------- input checks and defaults
def _write(tmp_path, records) -> str:
    path = tmp_path / "checked.json"
    path.write_text(json.dumps(records))
    return str(path)


def _records(n=4, length=8, extra=()):
    rng = np.random.default_rng(0)
    out = [
        {"id": f"{g}_{i}", "group": g, "text": " ".join(map(str, rng.integers(1, 96, length)))}
        for g in ("rec", "base")
        for i in range(n)
    ]
    return out + list(extra)


def test_validate_refuses_small_groups_before_loading_the_model(tmp_path):
    twin = {"id": "twin_0", "group": "rec_twin", "text": " ".join(["5"] * 8)}
    config = _config(
        tmp_path, prompts=_write(tmp_path, _records(extra=[twin])), twin_group="rec_twin",
        model="no-such-model-anywhere",
    )  # fmt: skip
    with pytest.raises(PromptError, match="at least 2 prompts per group.*'rec_twin' has 1"):
        run_validate(config, out=tmp_path / "never")  # no lm: the model would be loaded
    assert not (tmp_path / "never").exists()
    with pytest.raises(ConfigError, match="n_boot must be at least 100"):
        _config(tmp_path, n_boot=50)


def test_validate_refuses_prompts_longer_than_the_context(tmp_path):
    # The tiny model's context is 128 positions; max_new_tokens = 6.
    long_unpaired = {"id": "rec_9", "group": "rec", "text": " ".join(["7"] * 130)}
    config = _config(tmp_path, prompts=_write(tmp_path, _records(extra=[long_unpaired])))
    with pytest.raises(PromptError, match="rec_9 has 130 tokens, more than the model's context"):
        run_validate(config, out=tmp_path / "a", lm=_tiny())
    records = _records()
    records[0]["text"] = " ".join(["7"] * 125)  # rec_0: a pair's source, 125 + 6 > 128
    config = _config(tmp_path, prompts=_write(tmp_path, records))
    with pytest.raises(PromptError, match="rec_0 has 125 tokens \\+ 6 generated"):
        run_validate(config, out=tmp_path / "b", lm=_tiny())
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_validate_defaults_to_bank_v2_and_v1_stays_loadable():
    assert DEFAULT_BANK_VERSION == "v2"
    assert load_validate_config().bank_version == "v2" == ValidateConfig().bank_version
    assert load_validate_config(bank_version="v1").bank_version == "v1"
    assert load_bank("v1").version == "v1" and "L5_twin" in load_bank("v2").groups()
