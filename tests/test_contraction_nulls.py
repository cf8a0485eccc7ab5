"""Null models and the post-hoc layer of ``rloop contraction``.

- the selection-adjusted p of the best of many columns (max-statistic permutation) is
  calibrated under no effect, larger than the naive p of the chosen column, agrees with an
  exact enumeration, and detects a planted effect;
- a random-init null measures what a plain model built from the same config and seed gives
  (independent float64 numpy PR of V from a plain HF forward);
- token shuffles keep the bag of words, change the order and are seeded;
- bad ``--null`` values exit 2 before anything runs; good ones reach the config and its hash;
- an end-to-end run with ``--null random-init:2,token-shuffle:1`` writes the ``nulls`` table,
  its summary section and headline, and resumes null by null.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import rloop.experiments.nulls as nulls_module
from rloop.cli.app import app
from rloop.errors import ConfigError
from rloop.experiments.contraction import ContractionConfig, measure_contraction, run_contraction
from rloop.experiments.nulls import (
    null_units,
    parse_nulls,
    shuffle_words,
    shuffled_prompt_set,
)
from rloop.metrics.contrasts import max_statistic_permutation
from rloop.metrics.stats import hedges_g
from rloop.prompts import Prompt, PromptSet
from rloop.runs import default_run_dir
from tests.test_cli_parsing import _rejected, calls  # noqa: F401 (calls is a fixture)
from tests.tiny_models import VOCAB, tiny_config, tiny_lm

WINDOW = 6
LAYERS = [0, 2]


# --------------------------------------------------------------------- (a) max-statistic test


def test_selection_adjusted_p_is_calibrated_and_larger_than_the_naive_p() -> None:
    """400 data sets without any group effect, 10 correlated columns (layers): the adjusted p
    of the most negative g rejects about 5 % of the time; the naive p of the chosen column
    (its own permutation p) rejects far more often and is never smaller than the adjusted p."""
    labels = np.arange(20) < 10
    adjusted, naive = [], []
    for sim in range(400):
        rng = np.random.default_rng(1000 + sim)
        shared = rng.normal(size=(20, 1))
        values = 0.6 * shared + rng.normal(size=(20, 10))  # (prompts, layers), correlated
        test = max_statistic_permutation(values, labels, n_perm=199, seed=sim)
        adjusted.append(test.adjusted_p)
        naive.append(test.column_p[test.selected_column])
    adjusted, naive = np.array(adjusted), np.array(naive)
    type_one = float(np.mean(adjusted <= 0.05))
    assert 0.025 <= type_one <= 0.085, type_one  # 0.05 +- 3 binomial SE (400 sims)
    assert float(np.mean(naive <= 0.05)) > 0.15  # choosing the best of 10 inflates it
    assert np.all(adjusted >= naive - 1e-12) and adjusted.mean() > naive.mean() + 0.1


def test_paired_selection_adjusted_p_is_calibrated() -> None:
    """Sign flips of paired differences: same calibration under no effect (300 sims)."""
    rejections = 0
    for sim in range(300):
        diffs = np.random.default_rng(5000 + sim).normal(size=(12, 8))
        test = max_statistic_permutation(
            diffs, None, statistic="d_z", select="max_abs", n_perm=199, seed=sim
        )
        rejections += test.adjusted_p <= 0.05
    assert 0.015 <= rejections / 300 <= 0.095, rejections / 300


def test_selection_adjusted_p_detects_a_planted_effect() -> None:
    """One layer of 12 where the first group is 1.5 sd lower: found and significant."""
    rng = np.random.default_rng(7)
    values = rng.normal(size=(40, 12))
    labels = np.arange(40) < 20
    values[labels, 8] -= 1.5
    test = max_statistic_permutation(values, labels, n_perm=2000, seed=1)
    assert test.selected_column == 8 and test.adjusted_p < 0.01
    assert test.selected_value < -1.0


def test_max_statistic_matches_hedges_g_and_an_exact_enumeration() -> None:
    """Columns equal stats.hedges_g (NaNs left out of their column only); with 4 vs 4 rows the
    adjusted p matches the share of all 70 labellings whose min g is at most the observed."""
    rng = np.random.default_rng(3)
    values = rng.normal(size=(8, 3))
    values[2, 1] = np.nan
    labels = np.array([True] * 4 + [False] * 4)
    test = max_statistic_permutation(values, labels, n_perm=20_000, seed=0)

    def g_of(column: np.ndarray, mask: np.ndarray) -> float:
        keep = np.isfinite(column)
        return hedges_g(column[mask & keep], column[~mask & keep])

    observed = [g_of(values[:, j], labels) for j in range(3)]
    np.testing.assert_allclose(test.observed, observed, rtol=1e-10)
    assert test.selected_column == int(np.argmin(observed))
    minima = []
    for chosen in itertools.combinations(range(8), 4):
        mask = np.zeros(8, dtype=bool)
        mask[list(chosen)] = True
        minima.append(min(g_of(values[:, j], mask) for j in range(3)))
    exact = float(np.mean(np.array(minima) <= min(observed) + 1e-12))
    assert abs(test.adjusted_p - exact) < 0.01, (test.adjusted_p, exact)


def test_max_statistic_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match="selection rule"):
        max_statistic_permutation(np.zeros((4, 2)), np.array([1, 1, 0, 0], bool), select="best")
    with pytest.raises(ConfigError, match="booleans"):
        max_statistic_permutation(np.zeros((4, 2)), np.array([1, 1, 0, 0]))
    flat = max_statistic_permutation(np.ones((4, 2)), np.array([1, 1, 0, 0], bool), n_perm=10)
    assert flat.selected_column == -1 and "no column" in flat.reason


# --------------------------------------------------------------------- prompts of the tests


def paired_prompts(n_pairs: int = 5, seed: int = 0) -> PromptSet:
    """L5 prompts, their twins (the same words reversed, same pair_id) and factual prompts;
    the word tokenizer gives one token per word."""
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(n_pairs):
        words = [str(t) for t in rng.integers(1, VOCAB, int(rng.integers(8, 13)))]
        prompts.append(Prompt(f"L5_{i}", "L5", "recursive", " ".join(words), pair_id=f"p{i}"))
        prompts.append(
            Prompt(f"twin_{i}", "L5_twin", "twin", " ".join(reversed(words)), pair_id=f"p{i}")
        )
    for i in range(n_pairs):
        words = [str(t) for t in rng.integers(1, VOCAB, int(rng.integers(8, 13)))]
        prompts.append(Prompt(f"factual_{i}", "factual", "baseline", " ".join(words)))
    return PromptSet(prompts, "test", None, "0" * 64)


def numpy_pr(x: np.ndarray) -> float:
    s = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    return float((s**2).sum() ** 2 / (s**4).sum())


def reference_r_v(model, text: str) -> dict[str, float]:
    """R_V of layers 0 -> 2 of a tiny llama from a plain HF forward: V = v_proj(input norm of
    the block input), last WINDOW tokens, PR in float64 numpy, per head and whole."""
    ids = torch.tensor([[int(w) % VOCAB for w in text.split()]])
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    prs = {}
    for layer in LAYERS:
        block = model.model.layers[layer]
        v = block.self_attn.v_proj(block.input_layernorm(hidden[layer]))[0]  # (T, Hkv*D)
        v = v.detach().numpy()[-WINDOW:]
        heads = v.reshape(WINDOW, 2, 16)  # 2 KV heads of 16
        prs[("per-head", layer)] = np.mean([numpy_pr(heads[:, h]) for h in range(2)])
        prs[("whole", layer)] = numpy_pr(v)
    return {mode: prs[(mode, 2)] / prs[(mode, 0)] for mode in ("per-head", "whole")}


# --------------------------------------------------------------------- (b) random-init null


def test_random_init_null_is_a_plain_model_from_the_same_config_and_seed() -> None:
    lm = tiny_lm("llama")
    prompts = paired_prompts()
    config = ContractionConfig(layers=LAYERS, window=WINDOW, n_boot=200, nulls="random-init:2")
    result = measure_contraction(lm, prompts, config)
    rows = result.null_results
    assert set(rows["null"]) == {"random-init"} and sorted(set(rows["replicate"])) == [0, 1]
    seeds = rows.groupby("replicate")["seed"].first()
    assert seeds[0] != seeds[1]  # each null model has its own seed, recorded in the rows
    prompt = list(prompts)[0]
    for replicate, seed in seeds.items():
        torch.manual_seed(int(seed))
        model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="eager")
        expected = reference_r_v(model.eval(), prompt.text)
        for mode in ("per-head", "whole"):
            row = rows[
                (rows.replicate == replicate)
                & (rows.prompt_id == prompt.id)
                & (rows.pr_mode == mode)
            ].iloc[0]
            np.testing.assert_allclose(row.r_v, expected[mode], rtol=1e-5)
    # ... and not the trained model's R_V
    trained = result.results.set_index(["pr_mode", "prompt_id"])["r_v"]
    first = rows[(rows.replicate == 0) & (rows.prompt_id == prompt.id)].set_index("pr_mode")
    assert abs(first.loc["whole", "r_v"] - trained[("whole", prompt.id)]) > 1e-3
    # The null's contrast is the run's main (paired) contrast, recomputed from its own R_V.
    table = result.nulls.set_index(["pr_mode", "null", "replicate"])
    by_prompt = rows[(rows.replicate == 1) & (rows.pr_mode == "whole")].set_index("prompt_id")
    diffs = np.array(
        [by_prompt.loc[f"L5_{i}", "r_v"] - by_prompt.loc[f"twin_{i}", "r_v"] for i in range(5)]
    )
    d_z = diffs.mean() / diffs.std(ddof=1)
    np.testing.assert_allclose(table.loc[("whole", "random-init", 1), "value"], d_z, rtol=1e-10)
    assert set(rows["group"]) == {"L5", "L5_twin"}  # only the main contrast's prompts


def test_random_init_leaves_the_global_torch_random_state_alone() -> None:
    lm = tiny_lm("llama")
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    nulls_module.random_init_model(lm, 1234)
    torch.testing.assert_close(torch.rand(3), expected)


# --------------------------------------------------------------------- (c) token shuffle


def test_token_shuffle_keeps_the_words_changes_the_order_and_is_seeded() -> None:
    text = "one two three four five six seven eight nine ten eleven twelve"
    shuffled = shuffle_words(text, 5)
    assert sorted(shuffled.split()) == sorted(text.split())
    assert shuffled != text
    assert shuffle_words(text, 5) == shuffled
    assert len({shuffle_words(text, seed) for seed in range(6)}) == 6
    assert shuffle_words("a  b\nc", 0).count(" ") == 2  # whitespace-split, single spaces

    prompts = paired_prompts()
    whole = shuffled_prompt_set(prompts, 9)
    subset = shuffled_prompt_set(PromptSet(list(prompts)[3:], "t", None, "0"), 9)
    assert [p.text for p in list(whole)[3:]] == [p.text for p in subset]  # per prompt
    for before, after in zip(prompts, whole, strict=True):
        assert (after.id, after.group, after.pair_id) == (before.id, before.group, before.pair_id)
        assert sorted(after.text.split()) == sorted(before.text.split())


def test_token_shuffle_null_measures_the_trained_model_on_shuffled_prompts() -> None:
    lm = tiny_lm("llama")
    prompts = paired_prompts()
    config = ContractionConfig(
        layers=LAYERS, window=WINDOW, n_boot=200, nulls="token-shuffle:1", twin_group=None
    )
    result = measure_contraction(lm, prompts, config)
    rows = result.null_results
    assert set(rows["group"]) == {"L5", "factual"}  # unpaired design: recursive vs baseline
    [unit] = null_units(config.nulls, config.seed)
    assert set(rows["seed"]) == {unit.seed}
    shuffled = {p.id: p.text for p in shuffled_prompt_set(prompts, unit.seed)}
    for prompt_id in ("L5_2", "factual_4"):
        expected = reference_r_v(lm.model, shuffled[prompt_id])
        for mode, value in expected.items():
            row = rows[(rows.prompt_id == prompt_id) & (rows.pr_mode == mode)].iloc[0]
            np.testing.assert_allclose(row.r_v, value, rtol=1e-5)
    # unpaired main contrast: Hedges g of the shuffled R_V
    frame = rows[rows.pr_mode == "per-head"]
    g = hedges_g(frame[frame.group == "L5"].r_v, frame[frame.group == "factual"].r_v)
    table = result.nulls.set_index(["pr_mode", "null"])
    np.testing.assert_allclose(table.loc[("per-head", "token-shuffle"), "value"], g, rtol=1e-10)
    assert (result.nulls["effect"] == "hedges_g").all()


# --------------------------------------------------------------------- (d) bad --null values


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("shuffle:2", ["unknown null 'shuffle'", "random-init or token-shuffle"]),
        ("random-init", ["random-init:K", "no count"]),
        ("random-init:", ["no count"]),
        ("random-init:0", ["positive integer", "count '0'"]),
        ("token-shuffle:-2", ["positive integer"]),
        ("token-shuffle:two", ["positive integer"]),
        ("random-init:2,random-init:3", ["given twice"]),
        ("random-init:2,", ["unknown null ''"]),
    ],
)
def test_bad_null_values_exit_2_before_anything_runs(value, words, tmp_path, calls) -> None:  # noqa: F811
    line = _rejected(["contraction", "--null", value], tmp_path, calls)
    assert "--null" in line
    for word in words:
        assert word in line, (word, line)


def test_good_null_values_reach_the_config_and_its_hash(tmp_path, calls) -> None:  # noqa: F811
    result = CliRunner().invoke(app, ["contraction", "--null", "random-init:3, token-shuffle:2"])
    assert result.exit_code == 1, result.output  # the recorder raised: it got the config
    [(_, config)] = calls
    assert config.nulls == ["random-init:3", "token-shuffle:2"]
    plain = ContractionConfig()
    assert "nulls" not in plain.to_dict()  # runs without nulls keep their hash
    assert config.to_dict()["nulls"] == ["random-init:3", "token-shuffle:2"]
    root = tmp_path / "runs"
    assert default_run_dir(root, "contraction", "m", config.to_dict()) != default_run_dir(
        root, "contraction", "m", plain.to_dict()
    )
    assert ContractionConfig(nulls=["random-init:3", "token-shuffle:2"]).nulls == config.nulls
    with pytest.raises(ConfigError, match="unknown null"):
        ContractionConfig(nulls="noise:3")
    assert parse_nulls("none") == [] and parse_nulls(None) == []


# --------------------------------------------------------------------- (e) end to end


def write_prompts(path, prompts: PromptSet):
    with path.open("w") as f:
        for p in prompts:
            row = {"id": p.id, "group": p.group, "text": p.text, "pair_id": p.pair_id}
            f.write(json.dumps(row) + "\n")
    return path


def test_end_to_end_nulls_table_summary_headline_and_resume(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    prompts_file = write_prompts(tmp_path / "prompts.jsonl", paired_prompts())
    config = ContractionConfig(
        prompts=str(prompts_file),
        layers=LAYERS,
        window=WINDOW,
        n_boot=200,
        nulls="random-init:2,token-shuffle:1",
    )
    real = nulls_module.random_init_model
    built: list[int] = []

    def interrupted(lm_, seed):
        built.append(seed)
        if len(built) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second null model is being built
        return real(lm_, seed)

    monkeypatch.setattr(nulls_module, "random_init_model", interrupted)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_contraction(config, out=out, lm=lm)
    assert (out / "partial" / "null-random-init-000.parquet").is_file()

    def counted(lm_, seed):
        built.append(seed)
        return real(lm_, seed)

    built.clear()
    monkeypatch.setattr(nulls_module, "random_init_model", counted)
    run_dir, already, headline = run_contraction(config, out=out, lm=lm)
    assert not already and len(built) == 1  # the first null model was not rebuilt

    table = pd.read_csv(run_dir / "nulls.csv")
    assert len(table) == 2 * 4  # per mode: trained, 2 random-init, 1 token-shuffle
    assert list(table[table.pr_mode == "whole"]["null"]) == [
        "trained", "random-init", "random-init", "token-shuffle"
    ]  # fmt: skip
    assert set(table["effect"]) == {"d_z"} and set(table["contrast"]) == {"L5 vs L5_twin (paired)"}
    paired = pd.read_csv(run_dir / "paired.csv")
    main = paired[paired["main"]].set_index("pr_mode")["d_z"]
    trained = table[table["null"] == "trained"].set_index("pr_mode")["value"]
    np.testing.assert_allclose(trained.sort_index(), main.sort_index(), rtol=1e-12)
    np.testing.assert_allclose(table["trained_value"], table["pr_mode"].map(main), rtol=1e-12)
    assert (run_dir / "null_results.parquet").is_file()

    # The same numbers as an uninterrupted computation of the nulls.
    fresh = measure_contraction(lm, paired_prompts(), config).nulls
    np.testing.assert_allclose(table["value"], fresh["value"], rtol=1e-10)

    summary = (run_dir / "summary.md").read_text()
    assert "## Null models: L5 vs L5_twin (paired), d_z" in summary
    assert "random-init null (K=2)" in summary and "token-shuffle null (K=1)" in summary
    assert "whitespace-split words" in summary
    assert summary.index("## Null models") < summary.index("## R_V by group")  # not buried
    for mode in ("per-head", "whole"):
        values = table[(table.pr_mode == mode) & (table["null"] == "random-init")]["value"]
        assert headline[f"{mode}:null_random-init_k"] == 2
        assert headline[f"{mode}:null_random-init_d_z_min"] == pytest.approx(values.min())
        assert headline[f"{mode}:null_random-init_d_z_max"] == pytest.approx(values.max())
        extreme = int((values.abs() >= abs(trained[mode])).sum())
        assert headline[f"{mode}:null_random-init_n_as_extreme"] == extreme
        t = trained[mode]
        far = int((values <= t).sum() if t < 0 else (values >= t).sum())
        assert headline[f"{mode}:null_random-init_n_as_far"] == far

    # The post-hoc layer: labelled, with its selection-adjusted p, never a headline layer.
    sweep = pd.read_csv(run_dir / "layer_sweep.csv")
    assert "best" not in sweep.columns and sweep["post_hoc_best"].sum() == 2
    best = sweep[sweep["post_hoc_best"]]
    assert (best["selection_adjusted_p"] >= best["naive_permutation_p"] - 1e-12).all()
    assert sweep[~sweep["post_hoc_best"]]["selection_adjusted_p"].isna().all()
    assert "chosen after the fact" in summary and "selection-adjusted p" in summary
    assert headline["layer_late"] == LAYERS[1]
    assert all(key.split(":")[1].startswith("post_hoc") for key in headline if "best" in key)


def null_rows(trained: float, values: list[float]) -> pd.DataFrame:
    rows = [{"pr_mode": "whole", "null": "trained", "value": trained}]
    rows += [{"pr_mode": "whole", "null": "random-init", "value": v} for v in values]
    table = pd.DataFrame(rows)
    table["trained_value"], table["effect"] = trained, "hedges_g"
    return table


def test_null_comparison_says_plainly_when_the_null_is_as_large() -> None:
    """The bank v1 case: random-init |g| 1.2-2.0, trained g -0.61 -> it does not stand out."""
    [c] = nulls_module.compare_with_nulls(null_rows(-0.61, [-1.2, -2.0, -1.5]))
    assert (c.position, c.n_as_extreme, c.n_as_far) == ("above every null", 3, 3)
    assert "does not stand out" in nulls_module.comparison_sentence(c)
    [c] = nulls_module.compare_with_nulls(null_rows(-2.5, [0.2, -0.7, 0.4]))
    assert (c.position, c.n_as_extreme, c.n_as_far) == ("below every null", 0, 0)
    sentence = nulls_module.comparison_sentence(c)
    assert "larger in magnitude than all 3 nulls" in sentence and "0.25" in sentence
    [c] = nulls_module.compare_with_nulls(null_rows(-0.5, [0.7, -0.8, -0.1]))
    assert (c.position, c.n_as_extreme, c.n_as_far) == ("inside the null range", 2, 1)


def test_random_init_of_a_model_spread_over_devices_is_refused_before_the_run(tmp_path) -> None:
    lm = tiny_lm("llama")
    lm.model.hf_device_map = {"model.layers.0": 0, "model.layers.1": 1}
    prompts_file = write_prompts(tmp_path / "prompts.jsonl", paired_prompts())
    config = ContractionConfig(
        prompts=str(prompts_file), layers=LAYERS, window=WINDOW, n_boot=200, nulls="random-init:1"
    )
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match="spread over 2 devices"):
        run_contraction(config, out=out, lm=lm)
    assert not out.exists()
