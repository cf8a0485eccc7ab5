"""The experiment-design layer of the contraction experiment (SCIENCE.md §9) on a tiny model
with a synthetic minimal-pair prompt file: every design table equals the statistic recomputed
from R_V values measured independently (plain forward + numpy PR), covariates equal a hand
count, and bad designs fail before a run directory exists."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import statsmodels.api as sm
import torch

from rloop.errors import PromptError
from rloop.experiments.contraction import (
    ContractionConfig,
    covariate_table,
    measure_contraction,
    run_contraction,
)
from rloop.experiments.validate import (
    FAIL,
    PASS,
    load_validate_config,
    phase1_basis,
    phase1_verdicts,
    run_validate,
)
from rloop.metrics.contrasts import paired_contrast
from rloop.metrics.stats import benjamini_hochberg, contrast
from rloop.prompts import load_prompt_file
from tests.tiny_models import VOCAB, tiny_lm

WINDOW = 5
PERIOD = VOCAB - 1  # the token id of "."
N_BOOT = 200
# group -> number of prompts (twins mirror their recursive group, linked by pair_id)
RECURSIVE = {"L3": 4, "L4": 4, "L5": 10}
OTHERS = {"factual": 10, "nonsense": 4, "repetitive": 4}


class PunctuationTokenizer:
    """Each whitespace word is an integer token id; a trailing '.' adds the token PERIOD.
    ``convert_ids_to_tokens`` gives GPT-2 style strings ("Ġ12") and "." for PERIOD."""

    pad_token_id = 0

    @staticmethod
    def _ids(text: str) -> list[int]:
        ids = []
        for word in text.split():
            ids.append(int(word.rstrip(".")))
            if word.endswith("."):
                ids.append(PERIOD)
        return ids

    def __call__(self, texts, **kwargs):
        if isinstance(texts, str):
            return {"input_ids": self._ids(texts)}
        return {"input_ids": [self._ids(t) for t in texts]}

    def convert_ids_to_tokens(self, ids):
        return ["." if i == PERIOD else f"\u0120{i}" for i in ids]


def _text(rng: np.random.Generator) -> str:
    """8-12 words from a small vocabulary (so windows repeat tokens), 1-3 sentences."""
    n = int(rng.integers(8, 13))
    words = [str(w) for w in rng.integers(1, 25, n)]
    for position in rng.choice(np.arange(2, n), size=int(rng.integers(0, 3)), replace=False):
        words[position - 1] += "."
    if rng.random() < 0.5:
        words[-1] += "."
    return " ".join(words)


def design_records(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    records = []
    for group, n in RECURSIVE.items():
        for twin in (False, True):
            for i in range(1, n + 1):
                name = f"{group}_twin" if twin else group
                records.append(
                    {
                        "id": f"{name}_{i:03d}",
                        "group": name,
                        "pair_id": f"P_{group}_{i:03d}",
                        "level": int(group[1]),
                        "style": ("loop", "declarative")[i % 2],
                        "text": _text(rng),
                    }
                )
    for group, n in OTHERS.items():
        for i in range(1, n + 1):
            records.append({"id": f"{group}_{i:03d}", "group": group, "text": _text(rng)})
    return records


def write_jsonl(path, records) -> str:
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return str(path)


def _lm():
    lm = tiny_lm("llama")
    lm.tokenizer = PunctuationTokenizer()
    return lm


def _config(prompts: str, **overrides) -> ContractionConfig:
    settings = dict(prompts=prompts, layers=[0, 2], window=WINDOW, n_boot=N_BOOT, batch_size=8)
    return ContractionConfig(**{**settings, **overrides})


def numpy_pr(x: np.ndarray) -> float:
    s = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    return float((s**2).sum() ** 2 / (s**4).sum())


def independent_r_v(lm, text: str) -> float:
    """Per-head R_V = PR(V, layer 2) / PR(V, layer 0) of one prompt from a plain HF forward
    (V from each block's v_proj of its input layernorm), PR by SVD in numpy."""
    ids = torch.tensor([lm.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        hidden = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
    prs = []
    for layer in (0, 2):
        block = lm.adapter.blocks(lm.model)[layer]
        v = block.self_attn.v_proj(block.input_layernorm(hidden[layer]))[0]  # (T, Hkv*D)
        v = v.detach().numpy()[-WINDOW:]  # (W, Hkv*D)
        heads = v.reshape(WINDOW, lm.adapter.n_kv_heads, lm.adapter.d_head)  # (W, Hkv, D)
        prs.append(np.mean([numpy_pr(heads[:, h]) for h in range(heads.shape[1])]))
    return prs[1] / prs[0]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("design")
    records = design_records()
    path = write_jsonl(tmp / "pairs.jsonl", records)
    lm = _lm()
    result = measure_contraction(lm, load_prompt_file(path), _config(path))
    r_v = {r["id"]: independent_r_v(lm, r["text"]) for r in records}
    return result, records, r_v, path


def test_r_v_of_the_results_table_is_the_independent_r_v(measured) -> None:
    result, _, r_v, _ = measured
    per_head = result.results[result.results.pr_mode == "per-head"].set_index("prompt_id")
    np.testing.assert_allclose(
        per_head["r_v"].to_numpy(), [r_v[i] for i in per_head.index], rtol=1e-5
    )


def test_paired_table_equals_paired_contrast_of_independent_r_v(measured) -> None:
    result, records, r_v, _ = measured
    by_pair: dict[tuple[str, str], dict[str, list[float]]] = {}
    for record in records:
        if "pair_id" not in record:
            continue
        level_group = record["pair_id"].split("_")[1]
        side = "twin" if record["group"].endswith("_twin") else "rec"
        by_pair.setdefault((level_group, record["pair_id"]), {})[side] = r_v[record["id"]]
    paired = result.paired[result.paired.pr_mode == "per-head"].set_index("recursive_group")
    assert sorted(paired.index) == ["L3", "L4", "L5"]
    assert paired.loc["L5", "main"] and not paired.loc["L3", "main"]
    for group in RECURSIVE:
        pairs = sorted((pid, v) for (g, pid), v in by_pair.items() if g == group)
        rec = np.array([v["rec"] for _, v in pairs])
        twin = np.array([v["twin"] for _, v in pairs])
        expected = paired_contrast(rec, twin, n_boot=N_BOOT, n_perm=10_000, seed=0)
        row = paired.loc[group]
        assert row["twin_group"] == f"{group}_twin" and row["n_pairs"] == RECURSIVE[group]
        assert row["level"] == int(group[1])
        np.testing.assert_allclose(row["mean_diff"], (rec - twin).mean(), rtol=1e-5)
        for name in ("mean_diff", "d_z", "wilcoxon_p", "sign_flip_p"):
            np.testing.assert_allclose(row[name], getattr(expected, name), rtol=1e-4, atol=1e-6)
        assert row["sign_flip_exact"]  # <= 16 pairs: every sign vector enumerated
    # pair_values carries the pairs themselves.
    values = result.pair_values[result.pair_values.pr_mode == "per-head"]
    first = values[values.recursive_id == "L5_001"].iloc[0]
    assert first.twin_id == "L5_twin_001" and first.pair_id == "P_L5_001"
    np.testing.assert_allclose(first["diff"], r_v["L5_001"] - r_v["L5_twin_001"], rtol=1e-5)


def test_controls_cover_every_baseline_and_control_group(measured) -> None:
    result, records, r_v, _ = measured
    controls = result.controls[result.controls.pr_mode == "per-head"].set_index("other")
    assert list(controls.index) == ["factual", "nonsense", "repetitive"]
    values = {g: np.array([r_v[r["id"]] for r in records if r["group"] == g]) for g in OTHERS}
    l5 = np.array([r_v[r["id"]] for r in records if r["group"] == "L5"])
    for group, base in values.items():
        expected = contrast(l5, base, n_boot=N_BOOT, seed=0)
        np.testing.assert_allclose(controls.loc[group, "hedges_g"], expected.hedges_g, rtol=1e-4)
        np.testing.assert_allclose(controls.loc[group, "welch_p"], expected.welch_p, rtol=1e-4)
    np.testing.assert_allclose(
        controls["welch_p_bh"], benjamini_hochberg(controls["welch_p"].to_numpy()), rtol=1e-12
    )


def _jonckheere(values: np.ndarray, levels: np.ndarray) -> float:
    """J = sum over pairs from a lower and a higher level of [higher > lower] + ties / 2."""
    total = 0.0
    for i in range(values.size):
        for j in range(values.size):
            if levels[i] < levels[j]:
                total += float(values[j] > values[i]) + 0.5 * float(values[j] == values[i])
    return total


def test_trend_over_levels(measured) -> None:
    result, records, r_v, _ = measured
    trend = result.trend[result.trend.pr_mode == "per-head"].set_index("series")
    assert list(trend.index) == ["recursive", "twin", "paired_diff"]
    chosen = [r for r in records if r["group"] in RECURSIVE]
    values = np.array([r_v[r["id"]] for r in chosen])
    levels = np.array([int(r["group"][1]) for r in chosen])
    rho, p = scipy.stats.spearmanr(levels, values)
    row = trend.loc["recursive"]
    assert row["groups"] == "L3,L4,L5" and row["n"] == len(chosen) and row["n_levels"] == 3
    np.testing.assert_allclose(row["spearman_rho"], rho, rtol=1e-4)
    np.testing.assert_allclose(row["spearman_p"], p, rtol=1e-3)
    np.testing.assert_allclose(row["jt_statistic"], _jonckheere(values, levels), rtol=1e-9)


def test_covariates_by_hand_and_constant_covariate_not_estimable(measured) -> None:
    result, records, _, _ = measured
    record = next(r for r in records if r["id"] == "L5_003")
    ids = PunctuationTokenizer._ids(record["text"])
    window = ids[-WINDOW:]
    row = result.covariates.set_index("prompt_id").loc["L5_003"]
    assert row["n_tokens"] == len(ids)
    assert row["type_token_ratio"] == pytest.approx(len(set(window)) / WINDOW)
    repeated = sum(1 for k, t in enumerate(window) if t in window[:k])
    assert row["repeated_token_share"] == pytest.approx(repeated / WINDOW)
    assert row["punctuation_share"] == pytest.approx(window.count(PERIOD) / WINDOW)
    ends = record["text"].count(".")
    trailing = 0 if record["text"].endswith(".") else 1
    assert row["sentence_count"] == ends + trailing
    assert row["level"] == 5 and row["style"] == record["style"] and row["family"] == "recursive"
    assert np.isnan(result.covariates.set_index("prompt_id").loc["factual_001", "level"])

    # Spearman of R_V with the token count over all prompts, recomputed.
    corr = result.covariate_correlations
    per_head = corr[corr.pr_mode == "per-head"].set_index("covariate")
    merged = result.results[result.results.pr_mode == "per-head"].merge(
        result.covariates, on="prompt_id"
    )
    rho, _ = scipy.stats.spearmanr(merged["n_tokens_y"], merged["r_v"])
    np.testing.assert_allclose(per_head.loc["n_tokens", "rho"], rho, rtol=1e-9)


def _plain_file(tmp_path, groups=("rec", "base", "other"), n=4) -> str:
    """Prompts without periods (one sentence, no punctuation) and without pair ids."""
    rng = np.random.default_rng(1)
    records = [
        {"id": f"{g}_{i}", "group": g, "text": " ".join(map(str, rng.integers(1, 90, 7 + i)))}
        for g in groups
        for i in range(n)
    ]
    return write_jsonl(tmp_path / "plain.jsonl", records)


def test_constant_covariate_is_marked_not_estimable(tmp_path) -> None:
    path = _plain_file(tmp_path)
    config = _config(path, recursive_group="rec", baseline_group="base")
    prompts = load_prompt_file(path)
    table = covariate_table(list(prompts), PunctuationTokenizer(), WINDOW)
    assert (table["punctuation_share"] == 0).all() and (table["sentence_count"] == 1).all()
    result = measure_contraction(_lm(), prompts, config)
    corr = result.covariate_correlations.set_index(["pr_mode", "covariate"])
    for name in ("punctuation_share", "sentence_count"):
        row = corr.loc[("per-head", name)]
        assert not row["estimable"] and row["reason"] == "constant covariate"
        assert np.isnan(row["rho"])
    assert corr.loc[("per-head", "n_tokens"), "estimable"]
    confound = result.confounds.iloc[0]
    assert "punctuation_share" in json.loads(confound["covariates_dropped"])


def test_adjusted_effect_equals_statsmodels_hc3(measured) -> None:
    result, _, _, _ = measured
    row = result.confounds.set_index("pr_mode").loc["per-head"]
    frame = result.results[result.results.pr_mode == "per-head"][["prompt_id", "r_v"]].merge(
        result.covariates, on="prompt_id"
    )
    frame = frame[frame.group.isin(["L5", "factual"])]
    used = row["covariates_used"].split(",")
    assert set(used) <= {"n_tokens", "type_token_ratio", "punctuation_share", "sentence_count"}
    assert used  # the synthetic prompts vary in every covariate
    design = np.column_stack(
        [np.ones(len(frame)), (frame.group == "L5").to_numpy(float), frame[used].to_numpy(float)]
    )
    fit = sm.OLS(frame["r_v"].to_numpy(), design).fit(cov_type="HC3", use_t=True)
    np.testing.assert_allclose(row["adjusted_effect"], fit.params[1], rtol=1e-8)
    np.testing.assert_allclose(row["adjusted_se"], fit.bse[1], rtol=1e-8)
    raw = frame[frame.group == "L5"]["r_v"].mean() - frame[frame.group == "factual"]["r_v"].mean()
    np.testing.assert_allclose(row["raw_gap"], raw, rtol=1e-8)


def test_run_writes_the_design_tables_and_summary(measured, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    _, _, _, path = measured
    out = tmp_path / "run"
    run_dir, _, headline = run_contraction(_config(path), out=out, lm=_lm())
    for name in ("paired", "pair_values", "controls", "trend", "covariates",
                 "covariate_correlations", "confounds"):  # fmt: skip
        assert (run_dir / f"{name}.parquet").is_file() and (run_dir / f"{name}.csv").is_file()
    for plot in ("paired_r_v", "r_v_vs_covariates"):
        assert (run_dir / "plots" / f"{plot}.png").stat().st_size > 1000
    paired = pd.read_parquet(run_dir / "paired.parquet")
    main = paired[(paired.pr_mode == "per-head") & paired.main].iloc[0]
    assert headline["per-head:paired_d_z"] == pytest.approx(main.d_z)
    summary = (run_dir / "summary.md").read_text()
    for title in ("## Headline", "## Paired contrast", "every baseline and control",
                  "## Trend over recursion levels", "## Confounds"):  # fmt: skip
        assert title in summary
    assert "L5 vs L5_twin (paired, 10 pairs)" in summary
    assert "adjusted for" in summary
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["design"]["controls"] == ["factual", "nonsense", "repetitive"]


def test_missing_twins_and_levels_are_said_not_silent(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    records = [r for r in design_records() if r["group"] in ("L5", "factual")]
    path = write_jsonl(tmp_path / "unpaired.jsonl", records)
    run_dir, _, headline = run_contraction(_config(path), out=tmp_path / "run", lm=_lm())
    assert not (run_dir / "paired.parquet").exists() and not (run_dir / "trend.parquet").exists()
    summary = (run_dir / "summary.md").read_text()
    assert "paired contrast L5 vs L5_twin not computed: the prompt set has no group" in summary
    assert "trend over recursion levels not computed: the prompt set has 1 of" in summary
    assert "per-head:paired_d_z" not in headline
    controls = pd.read_parquet(run_dir / "controls.parquet")
    assert set(controls.other) == {"factual"}


def test_bad_designs_fail_before_a_run_directory(tmp_path) -> None:
    lm = _lm()
    out = tmp_path / "never"
    unpaired = [{k: v for k, v in r.items() if k != "pair_id"} for r in design_records()]
    no_ids = write_jsonl(tmp_path / "no_ids.jsonl", unpaired)
    with pytest.raises(PromptError, match="no pair_id column"):
        run_contraction(_config(no_ids), out=out, lm=lm)
    plain = _plain_file(tmp_path)
    named = dict(recursive_group="rec", baseline_group="base")
    with pytest.raises(PromptError, match="no pair_id column"):
        run_contraction(_config(plain, twin_group="other", **named), out=out, lm=lm)
    with pytest.raises(PromptError, match=r"'L5' \(--recursive-group\).*available: rec, base"):
        run_contraction(_config(plain), out=out, lm=lm)
    with pytest.raises(PromptError, match=r"twin group 'typo' \(--twin-group\) is not in"):
        run_contraction(
            _config(plain, twin_group="typo", **named),
            out=out,
            lm=lm,
        )
    assert not out.exists()
    with pytest.raises(PromptError, match="L5"):  # the experiment itself, without a run
        measure_contraction(lm, load_prompt_file(plain), _config(plain))


def test_validate_phase1_verdict_comes_from_the_paired_contrast(measured) -> None:
    result, _, _, _ = measured
    config = load_validate_config(pr_mode="per-head")
    main = result.paired[(result.paired.pr_mode == "per-head") & result.paired.main].iloc[0]
    # measure_contraction ran both modes; keep the per-head rows as phase 1 would.
    only = type("R", (), {"paired": result.paired[result.paired.pr_mode == "per-head"],
                          "contrasts": result.contrasts, "notes": result.notes})  # fmt: skip
    for threshold, expected in ((main.d_z + 0.1, PASS), (main.d_z - 0.1, FAIL)):
        config.thresholds["phase1"]["max_paired_d_z"] = threshold
        config.thresholds["phase1"]["max_paired_p"] = 1.0
        verdicts = phase1_verdicts(only, config)
        assert [v.check for v in verdicts] == [
            "paired d_z of R_V (recursive - twin)",
            "sign-flip p (paired)",
        ]
        assert verdicts[0].value == pytest.approx(main.d_z) and verdicts[0].verdict == expected
    assert "paired contrast L5 vs L5_twin (10 minimal pairs)" in phase1_basis(only, config)


def test_validate_run_shows_paired_and_unpaired(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    records = [r for r in design_records() if r["group"] in ("L5", "L5_twin", "factual")]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    toml = tmp_path / "validate.toml"
    toml.write_text(
        f"""
[prompts]
prompts = "{path}"
n_pairs = 4
[measure]
window = {WINDOW}
layers = [0, 2]
n_boot = {N_BOOT}
[generation]
max_new_tokens = 6
semantic = "off"
[patching]
alphas = [0.0, 1.0]
"""
    )
    run_dir, _, _ = run_validate(load_validate_config(toml), out=tmp_path / "v", lm=_lm())
    summary = (run_dir / "summary.md").read_text()
    assert "Verdict from the paired contrast L5 vs L5_twin (10 minimal pairs)" in summary
    assert "Paired (recursive - twin):" in summary and "Unpaired (recursive - baseline):" in summary
    verdicts = pd.read_parquet(run_dir / "verdicts.parquet")
    phase1 = verdicts[verdicts.phase == "1"]
    assert list(phase1.check) == ["paired d_z of R_V (recursive - twin)", "sign-flip p (paired)"]
    paired = pd.read_parquet(run_dir / "phase1_paired.parquet")
    assert paired.iloc[0].d_z == pytest.approx(phase1.iloc[0].value)


@pytest.mark.slow
def test_embedded_model_with_bank_v2_defaults(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    run_dir, _, headline = run_contraction(ContractionConfig(n_boot=1000), out=tmp_path / "run")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["prompts"]["version"] == "v2"
    for name in ("paired", "pair_values", "controls", "trend", "covariates",
                 "covariate_correlations", "confounds"):  # fmt: skip
        assert (run_dir / f"{name}.parquet").is_file(), name
    paired = pd.read_parquet(run_dir / "paired.parquet")
    assert set(paired.recursive_group) == {"L1", "L2", "L3", "L4", "L5"}
    main = paired[paired.main].set_index("pr_mode")
    assert (main["n_pairs"] == 30).all() and main["d_z"].notna().all()
    controls = pd.read_parquet(run_dir / "controls.parquet")
    assert set(controls.other) == {"factual", "syntactic", "cliche", "novel", "nonsense",
                                   "pseudo_recursive", "repetitive", "long_nonrecursive"}  # fmt: skip
    trend = pd.read_parquet(run_dir / "trend.parquet")
    assert set(trend.series) == {"recursive", "twin", "paired_diff"}
    confounds = pd.read_parquet(run_dir / "confounds.parquet")
    assert confounds["adjusted_effect"].notna().all()
    covariates = pd.read_parquet(run_dir / "covariates.parquet")
    assert len(covariates) == 349 and (covariates["punctuation_share"] > 0).any()
    g = controls[controls.other == "factual"].set_index("pr_mode")["hedges_g"]
    print("\nbank v2 defaults:", json.dumps(headline, indent=1))
    print(main[["n_pairs", "mean_diff", "d_z", "d_z_ci_low", "d_z_ci_high", "wilcoxon_p",
                "sign_flip_p"]].to_string())  # fmt: skip
    print("L5 vs factual g:", g.to_dict())
    print(confounds[["pr_mode", "raw_gap", "adjusted_effect", "adjusted_ci_low",
                     "adjusted_ci_high", "share_explained", "covariates_used"]].to_string())  # fmt: skip
