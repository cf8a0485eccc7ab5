"""Robustness (specification curve) on tiny random-weight models: every specification's R_V
equals an independent per-prompt computation (plain HF forward, torch hooks, windows cut by
hand, PR from a numpy SVD or the U-statistic formula), effects equal hand-computed Hedges' g /
d_z, short prompts are left out and counted, paired contrasts link by pair_id, specifications
that cannot be estimated say why, and the run record is complete and resumable.

The joint test's calibration is tested in tests/test_specification.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

import rloop.experiments.robustness as robustness_module
from rloop.errors import ConfigError, PromptError
from rloop.experiments.robustness import (
    RobustnessConfig,
    build_grid,
    measure_robustness,
    run_robustness,
    third_layers,
)
from rloop.prompts import Prompt, PromptSet, load_prompt_file
from rloop.runs.figures import spec_curves
from tests.tiny_models import VOCAB, tiny_lm

# Token counts per group: W = 8 leaves out 2 L5 prompts (5, 7) and 1 factual (6); W = 13
# leaves out every prompt.
LENGTHS = {"L5": [5, 7, 9, 10, 12], "factual": [6, 8, 9, 11, 12]}
POINTS = ["v", "k", "resid_post", "attn_out"]


def text_of(length: int, rng: np.random.Generator) -> str:
    return " ".join(str(t) for t in rng.integers(1, VOCAB, length))


def prompt_set(seed: int = 0) -> PromptSet:
    rng = np.random.default_rng(seed)
    prompts = [
        Prompt(f"{group}_{i:02d}", group, "test", text_of(n, rng))
        for group, lengths in LENGTHS.items()
        for i, n in enumerate(lengths)
    ]
    return PromptSet(prompts, "test", None, "0" * 64)


def config(**overrides) -> RobustnessConfig:
    fields = dict(
        early_layers=[0, 1],
        late_layers=[1, 2],
        windows=[4, 8, 13],
        points=POINTS,
        window=4,
        n_perm=200,
        n_boot=200,
        batch_size=3,
    )
    return RobustnessConfig(**{**fields, **overrides})


# ---------------------------------------------------------------------------- reference


def numpy_pr(x: np.ndarray) -> float:
    s = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    return float((s**2).sum() ** 2 / (s**4).sum())


def numpy_pr_corrected(x: np.ndarray) -> float:
    """sum_{i!=j} G_ii G_jj / sum_{i!=j} G_ij^2 with G = X X^T, from the definition."""
    g = x.astype(np.float64) @ x.astype(np.float64).T
    d = np.diag(g)
    return float((d.sum() ** 2 - (d**2).sum()) / ((g**2).sum() - (d**2).sum()))


def reference_activations(lm, text: str) -> dict[tuple[str, int], np.ndarray]:
    """(point, layer) -> (T, ...) float32 of one prompt, batch size 1: V and K from the
    projection weights applied to the block input, resid_post and attn_out from plain torch
    forward hooks on the block and its attention module."""
    ids = torch.tensor([lm.tokenizer(text)["input_ids"]])
    layers = lm.model.model.layers
    kv_heads, d_head = lm.adapter.n_kv_heads, lm.adapter.d_head
    hooked: dict[tuple[str, int], np.ndarray] = {}
    handles = []
    for layer, block in enumerate(layers):

        def on_block(module, args, output, layer=layer):
            out = output[0] if isinstance(output, tuple) else output
            hooked[("resid_post", layer)] = out[0].detach().numpy()

        def on_attn(module, args, output, layer=layer):
            hooked[("attn_out", layer)] = output[0][0].detach().numpy()

        handles += [block.register_forward_hook(on_block)]
        handles += [block.self_attn.register_forward_hook(on_attn)]
    try:
        with torch.no_grad():
            hidden = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
            for layer, block in enumerate(layers):
                x = block.input_layernorm(hidden[layer])  # block input is hidden_states[l]
                for point, proj in (("v", block.self_attn.v_proj), ("k", block.self_attn.k_proj)):
                    hooked[(point, layer)] = proj(x)[0].reshape(-1, kv_heads, d_head).numpy()
    finally:
        for handle in handles:
            handle.remove()
    return hooked


def reference_pr(window: np.ndarray, point: str, mode: str, estimator: str) -> float:
    pr = numpy_pr if estimator == "plain" else numpy_pr_corrected
    if point not in ("v", "k"):
        return pr(window)
    if mode == "whole":
        return pr(window.reshape(window.shape[0], -1))
    return float(np.mean([pr(window[:, h]) for h in range(window.shape[1])]))


def reference_matrix(lm, prompts: list[Prompt], specs: pd.DataFrame) -> np.ndarray:
    """R_V (n_prompts, n_specs) computed prompt by prompt; NaN where the prompt is shorter
    than the specification's window."""
    out = np.full((len(prompts), len(specs)), np.nan)
    for i, prompt in enumerate(prompts):
        acts = reference_activations(lm, prompt.text)
        n = acts[("v", 0)].shape[0]
        for s, spec in enumerate(specs.itertuples()):
            if n < spec.window:
                continue
            early = acts[(spec.point, spec.layer_early)][-spec.window :]
            late = acts[(spec.point, spec.layer_late)][-spec.window :]
            out[i, s] = reference_pr(late, spec.point, spec.pr_mode, spec.estimator) / (
                reference_pr(early, spec.point, spec.pr_mode, spec.estimator)
            )
    return out


def hedges_g_by_hand(a: np.ndarray, b: np.ndarray) -> float:
    n1, n2 = a.size, b.size
    pooled = ((n1 - 1) * a.var(ddof=1) + (n2 - 1) * b.var(ddof=1)) / (n1 + n2 - 2)
    df = n1 + n2 - 2
    j = math.exp(math.lgamma(df / 2) - math.lgamma((df - 1) / 2)) / math.sqrt(df / 2)
    return j * (a.mean() - b.mean()) / math.sqrt(pooled)


@pytest.fixture(scope="module")
def measured():
    lm = tiny_lm("llama")
    prompts = prompt_set()
    return lm, prompts, measure_robustness(lm, prompts, config())


# ---------------------------------------------------------------------------- tests


def test_every_spec_r_v_equals_an_independent_computation(measured) -> None:
    lm, prompts, result = measured
    specs = result.specs
    # 4 points: v, k with 2 modes, resid_post, attn_out whole -> 6 streams; 2 estimators;
    # 3 windows; layer pairs (0,1), (0,2), (1,2).
    assert len(specs) == 6 * 2 * 3 * 3
    assert set(zip(specs.point, specs.pr_mode, strict=True)) == {
        ("v", "per-head"), ("v", "whole"), ("k", "per-head"), ("k", "whole"),
        ("resid_post", "whole"), ("attn_out", "whole"),
    }  # fmt: skip
    assert list(result.rows["prompt_id"]) == [p.id for p in prompts]
    expected = reference_matrix(lm, list(prompts), specs)
    np.testing.assert_array_equal(np.isnan(result.values), np.isnan(expected))
    np.testing.assert_allclose(result.values, expected, rtol=1e-4)
    # The corrected estimator really differs from the plain one (not the same numbers twice).
    plain = specs.index[(specs.estimator == "plain") & (specs.window == 8)]
    corrected = specs.index[(specs.estimator == "corrected") & (specs.window == 8)]
    assert not np.allclose(result.values[:, plain], result.values[:, corrected], equal_nan=True)


def test_effects_are_hedges_g_over_the_prompts_long_enough(measured) -> None:
    _, prompts, result = measured
    specs = result.specs
    labels = np.array([p.group == "L5" for p in prompts])
    for spec_id in specs.index[specs.estimable][::7]:
        column = result.values[:, spec_id]
        keep = np.isfinite(column)
        a, b = column[keep & labels], column[keep & ~labels]
        row = specs.loc[spec_id]
        np.testing.assert_allclose(row.effect, hedges_g_by_hand(a, b), rtol=1e-9)
        np.testing.assert_allclose(row.p, scipy.stats.ttest_ind(a, b).pvalue, rtol=1e-7)
        assert row.n == a.size + b.size
        assert row.significant == (row.p < 0.05)
    joint = result.joint.iloc[0]
    finite = specs.effect[specs.estimable]
    np.testing.assert_allclose(joint.median_effect, np.median(finite), rtol=1e-12)
    assert joint.n_estimable == specs.estimable.sum()


def test_short_prompts_are_left_out_and_counted(measured) -> None:
    _, _, result = measured
    specs, details = result.specs, result.details
    w8 = specs.window == 8
    assert (specs.n[w8 & specs.estimable] == 7).all()  # 10 prompts, 3 shorter than 8 tokens
    assert (details.n_too_short[w8] == 3).all()
    assert (details.n_too_short[specs.window == 4] == 0).all()
    w13 = specs.window == 13
    assert not specs.estimable[w13].any()
    assert specs.reason[w13].str.contains("no prompt has 13 real tokens").all()
    assert specs.effect[w13].isna().all()
    assert result.joint.iloc[0].n_not_estimable == w13.sum()
    windows = result.windows.set_index(["window", "group"])
    assert windows.loc[(8, "L5"), "n_too_short"] == 2
    assert windows.loc[(8, "factual"), "n_too_short"] == 1
    assert windows.loc[(8, "L5"), "too_short_ids"] == "L5_00, L5_01"
    # The PR table says why each left-out row is NaN.
    pr = result.pr
    short = pr[(pr.window == 8) & (pr.n_tokens < 8)]
    assert short.pr.isna().all()
    assert short.nan_reason.str.contains("fewer than the 8-token window").all()


def test_reference_spec_and_factors(measured) -> None:
    _, _, result = measured
    # 3 layers: the depth-fraction layers are 0 and 2; window 4 is the reference window.
    assert result.reference_layers == (0, 2)
    reference = result.details[result.details.reference]
    assert len(reference) == 1
    spec = result.specs.loc[int(reference.spec_id.iloc[0])]
    assert (spec.point, spec.pr_mode, spec.estimator, spec.window) == ("v", "per-head", "plain", 4)
    full = result.reference.iloc[0]
    np.testing.assert_allclose(full.hedges_g, spec.effect, rtol=1e-9)
    factors = result.factors.set_index("factor")
    assert set(factors.index) == {
        "point", "pr_mode", "estimator", "window", "layer_early", "layer_late",
    }  # fmt: skip
    # eta^2 of the window factor from the estimable effects, by hand.
    used = result.specs[result.specs.estimable]
    grand = used.effect.mean()
    between = sum(len(g) * (g.effect.mean() - grand) ** 2 for _, g in used.groupby("window"))
    total = ((used.effect - grand) ** 2).sum()
    np.testing.assert_allclose(factors.loc["window", "eta_squared"], between / total, rtol=1e-9)


def write_prompts(path: Path, prompts: list[Prompt]) -> Path:
    with path.open("w") as f:
        for p in prompts:
            record = {"id": p.id, "group": p.group, "text": p.text}
            if p.pair_id is not None:
                record["pair_id"] = p.pair_id
            f.write(json.dumps(record) + "\n")
    return path


def test_paired_contrast_over_pairs_from_a_file(tmp_path) -> None:
    rng = np.random.default_rng(3)
    lengths = [(9, 9), (10, 10), (6, 9), (11, 11), (8, 8), (12, 12)]  # pair 2 is short on W=8
    prompts = []
    for i, (n_rec, n_twin) in enumerate(lengths):
        prompts.append(Prompt(f"r{i}", "L5", "test", text_of(n_rec, rng), pair_id=f"p{i}"))
        prompts.append(Prompt(f"t{i}", "L5_twin", "test", text_of(n_twin, rng), pair_id=f"p{i}"))
    rng.shuffle(prompts)  # pairs are linked by pair_id, not by order
    path = write_prompts(tmp_path / "pairs.jsonl", prompts)
    lm = tiny_lm("llama")
    cfg = config(twin_group="L5_twin", windows=[4, 8], points=["v", "resid_post"])
    result = measure_robustness(lm, load_prompt_file(path), cfg)
    assert result.design.design == "paired"
    assert result.joint.iloc[0].effect == "d_z"
    order = {p.id: i for i, p in enumerate(result.design.prompts)}
    rec = np.array([order[f"r{i}"] for i in range(6)])
    twin = np.array([order[f"t{i}"] for i in range(6)])
    expected = reference_matrix(lm, result.design.prompts, result.specs)
    np.testing.assert_allclose(result.values, expected, rtol=1e-4)
    for spec in result.specs.itertuples():
        diffs = result.values[rec, spec.Index] - result.values[twin, spec.Index]
        diffs = diffs[np.isfinite(diffs)]
        assert spec.n == (6 if spec.window == 4 else 5)
        np.testing.assert_allclose(spec.effect, diffs.mean() / diffs.std(ddof=1), rtol=1e-9)
        np.testing.assert_allclose(spec.p, scipy.stats.ttest_1samp(diffs, 0.0).pvalue, rtol=1e-7)
    assert (result.details.n_too_short[result.specs.window == 8] == 1).all()
    # The reference spec's full paired contrast has the same d_z.
    ref = result.details[result.details.reference].spec_id.iloc[0]
    np.testing.assert_allclose(
        result.reference.iloc[0].d_z, result.specs.loc[ref, "effect"], rtol=1e-9
    )


def test_paired_contrast_needs_pair_ids() -> None:
    lm = tiny_lm("llama")
    with pytest.raises(PromptError, match="pair_id"):
        measure_robustness(lm, prompt_set(), config(twin_group="factual"))


def test_nan_windows_make_specs_not_estimable_with_a_reason() -> None:
    lm = tiny_lm("llama")
    with torch.no_grad():  # V of layer 2 is exactly zero: its PR is NaN, never 0
        lm.model.model.layers[2].self_attn.v_proj.weight.zero_()
    result = measure_robustness(lm, prompt_set(), config(windows=[4], points=["v", "k"]))
    specs = result.specs
    dead = (specs.point == "v") & (specs.layer_late == 2)
    assert not specs.estimable[dead].any()
    assert specs.reason[dead].str.contains("no finite values").all()
    assert specs.reason[dead].str.contains("10 prompts with NaN R_V").all()
    assert specs.estimable[~dead].all()
    assert (result.details.n_nan[dead] == 10).all()
    pr = result.pr
    assert pr[(pr.point == "v") & (pr.layer == 2)].nan_reason.str.contains("zero window").all()
    text = robustness_module.report_markdown(result, config(), "tiny")
    assert f"{int(dead.sum())} specifications: no finite values" in text


def test_no_estimable_spec_is_a_one_line_error(tmp_path) -> None:
    lm = tiny_lm("llama")
    path = write_prompts(tmp_path / "prompts.jsonl", list(prompt_set()))
    out = tmp_path / "run"
    with pytest.raises(PromptError, match="no specification is estimable"):
        run_robustness(config(prompts=str(path), windows=[13, 20]), out=out, lm=lm)
    assert not out.exists()
    # Every window NaN (found only after measuring): the run fails with one line.
    with torch.no_grad():
        lm.model.model.layers[2].self_attn.v_proj.weight.zero_()
    cfg = config(prompts=str(path), windows=[4], points=["v"], late_layers=[2])
    with pytest.raises(ConfigError, match="no specification is estimable") as err:
        run_robustness(cfg, out=out, lm=lm)
    assert "\n" not in str(err.value)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert not pd.read_csv(out / "spec_curve.csv")["estimable"].any()


def test_bad_settings_write_nothing(tmp_path) -> None:
    lm = tiny_lm("llama")
    out = tmp_path / "run"
    cases = [
        (config(groups=["L5"]), "recursive_group"),
        (config(estimators=["jackknife"]), "unknown PR estimator"),
        (config(points=["resid_post"], pr_modes=["per-head"]), "no heads"),
        (config(early_layers=[0, 7]), "out of range"),
        (config(early_layers=[2], late_layers=[1]), "early < late"),
        (config(windows=[1]), "at least 2 tokens"),
        (config(alpha=1.5), "alpha"),
        (config(baseline_group="L5"), "both"),
    ]
    for cfg, message in cases:
        with pytest.raises(ConfigError, match=message):
            run_robustness(cfg, out=out, lm=lm)
    assert not out.exists()


def test_default_grid_uses_the_first_and_last_third() -> None:
    assert third_layers(30) == (list(range(10)), list(range(20, 30)))
    assert third_layers(30, step=3) == ([0, 3, 6, 9], [20, 23, 26, 29])
    lm = tiny_lm("llama")  # 3 layers
    grid = build_grid(RobustnessConfig(), lm.adapter)
    assert grid.early_layers == (0,) and grid.late_layers == (2,)
    assert grid.windows == (8, 12, 16, 24, 32)
    assert grid.n_specs == 6 * 2 * 5 * 1


def test_run_record_resume_and_report(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    path = write_prompts(tmp_path / "prompts.jsonl", list(prompt_set()))
    cfg = config(prompts=str(path), points=["v", "attn_out"])
    out = tmp_path / "run"
    real = robustness_module.measure_batch
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C during the third batch
        return real(*args, **kwargs)

    monkeypatch.setattr(robustness_module, "measure_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_robustness(cfg, out=out, lm=lm)
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"
    assert len(list((out / "partial").iterdir())) == 2

    calls.clear()
    run_dir, already, headline = run_robustness(cfg, out=out, lm=lm)
    assert not already and run_dir == out
    assert len(calls) == 2  # 4 batches of at most 3 prompts; 2 were saved before
    monkeypatch.setattr(robustness_module, "measure_batch", real)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["grid"]["n_specs"] == len(pd.read_csv(out / "spec_curve.csv"))
    for table in ("spec_curve", "spec_details", "joint", "factors", "windows", "pr", "reference"):
        assert (out / f"{table}.parquet").exists(), table
    spec_curve = pd.read_parquet(out / "spec_curve.parquet")
    fresh = measure_robustness(lm, load_prompt_file(path), cfg)
    pd.testing.assert_frame_equal(
        spec_curve.drop(columns="reason"), fresh.specs.drop(columns="reason"), check_dtype=False
    )
    assert list(spec_curve.reason.fillna("")) == list(fresh.specs.reason.fillna(""))
    joint = pd.read_csv(out / "joint.csv").iloc[0]
    assert headline["median_effect"] == pytest.approx(joint.median_effect)
    assert headline["p_median"] == pytest.approx(joint.p_median)
    assert (out / "plots" / "spec_curve.png").stat().st_size > 5000
    summary = (out / "summary.md").read_text()
    assert "median effect over estimable specifications" in summary
    assert "no prompt has 13 real tokens" in summary
    # The HTML report's specification-curve figure reads this table.
    figures = spec_curves({"spec_curve": spec_curve}, manifest)
    assert len(figures) == 1
    _, already, _ = run_robustness(cfg, out=out, lm=lm)
    assert already
