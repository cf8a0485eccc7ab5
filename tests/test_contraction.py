"""Contraction experiment on tiny random-weight models: batched equals batch size 1,
R_V equals an independent float64 numpy computation, and the run record is complete."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from rloop.errors import ConfigError, PromptError
from rloop.experiments.contraction import ContractionConfig, measure_contraction, run_contraction
from rloop.prompts import Prompt, PromptSet
from tests.tiny_models import VOCAB, tiny_lm


def prompt_set(n_per_group: int = 4, seed: int = 0) -> PromptSet:
    rng = np.random.default_rng(seed)
    prompts = []
    for group in ("L5", "factual"):
        for i in range(n_per_group):
            n = int(rng.integers(8, 15))
            text = " ".join(str(t) for t in rng.integers(1, VOCAB, n))
            prompts.append(Prompt(f"{group}_{i:03d}", group, "test", text))
    return PromptSet(prompts, "test", None, "0" * 64)


def numpy_pr(x: np.ndarray) -> float:
    s = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    return float((s**2).sum() ** 2 / (s**4).sum())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_equals_batch_size_one_and_numpy_reference(family: str) -> None:
    lm = tiny_lm(family)
    prompts = prompt_set()
    common = dict(layers=[0, 2], window=6, n_boot=200)
    batched = measure_contraction(lm, prompts, ContractionConfig(batch_size=8, **common))
    single = measure_contraction(lm, prompts, ContractionConfig(batch_size=1, **common))
    a = batched.results.sort_values(["pr_mode", "prompt_id"]).reset_index(drop=True)
    b = single.results.sort_values(["pr_mode", "prompt_id"]).reset_index(drop=True)
    np.testing.assert_allclose(a["r_v"], b["r_v"], rtol=1e-5)
    np.testing.assert_allclose(batched.profile["pr"], single.profile["pr"], rtol=1e-5)

    # Independent reference: plain HF forward of one prompt, V from the projection weights.
    p = list(prompts)[3]
    ids = torch.tensor([lm.tokenizer(p.text)["input_ids"]])
    with torch.no_grad():
        hidden = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
    prs = {}
    for layer in (0, 2):
        block = lm.adapter.blocks(lm.model)[layer]
        if family == "llama":
            x = block.input_layernorm(hidden[layer])
            v = block.self_attn.v_proj(x)[0]  # (T, Hkv*D)
        else:
            x = block.ln_1(hidden[layer])
            v = block.attn.c_attn(x)[0][:, 2 * 64 :]  # GPT-2: [q | k | v] blocks
        v = v.detach().numpy()[-6:]  # (W, Hkv*D)
        heads = v.reshape(6, lm.adapter.n_kv_heads, lm.adapter.d_head)
        prs[("per-head", layer)] = np.mean([numpy_pr(heads[:, h]) for h in range(heads.shape[1])])
        prs[("whole", layer)] = numpy_pr(v)
    for mode in ("per-head", "whole"):
        row = a[(a.prompt_id == p.id) & (a.pr_mode == mode)].iloc[0]
        assert row.layer_early == 0 and row.layer_late == 2
        np.testing.assert_allclose(row.pr_early, prs[(mode, 0)], rtol=1e-5)
        np.testing.assert_allclose(row.r_v, prs[(mode, 2)] / prs[(mode, 0)], rtol=1e-5)


def test_statistics_tables_and_layer_sweep() -> None:
    lm = tiny_lm()
    result = measure_contraction(
        lm, prompt_set(6), ContractionConfig(layers=[0, 1], window=5, n_boot=200)
    )
    assert set(result.groups["group"]) == {"L5", "factual"}
    per_head = result.results[result.results.pr_mode == "per-head"]
    l5 = per_head[per_head.group == "L5"]["r_v"].to_numpy()
    g = result.groups.set_index(["pr_mode", "group"]).loc[("per-head", "L5")]
    assert g["n"] == 6
    np.testing.assert_allclose(g["mean"], l5.mean(), rtol=1e-12)
    c = result.contrasts.set_index("pr_mode").loc["per-head"]
    base = per_head[per_head.group == "factual"]["r_v"].to_numpy()
    np.testing.assert_allclose(c["diff"], l5.mean() - base.mean(), rtol=1e-12)
    # Layer sweep covers every layer above the early one; the late-layer row matches.
    sweep = result.layer_sweep[result.layer_sweep.pr_mode == "per-head"]
    assert sorted(sweep["layer_late"]) == [1, 2]
    np.testing.assert_allclose(
        sweep.set_index("layer_late").loc[1, "mean_recursive"], l5.mean(), rtol=1e-12
    )
    assert sweep["post_hoc_best"].sum() == 1


def test_short_prompt_rejected_by_name() -> None:
    lm = tiny_lm()
    prompts = PromptSet([Prompt("short_one", "L5", "test", "1 2 3")], "t", None, "0")
    with pytest.raises(PromptError, match=r"3 tokens"):
        measure_contraction(lm, prompts, ContractionConfig(layers=[0, 1], window=4))


def test_zero_window_is_nan_with_reason() -> None:
    lm = tiny_lm()
    # Zero the V projection of layer 2: every late window is exactly zero -> PR NaN, not 0.
    with torch.no_grad():
        lm.adapter.blocks(lm.model)[2].self_attn.v_proj.weight.zero_()
    result = measure_contraction(
        lm, prompt_set(2), ContractionConfig(layers=[0, 2], window=5, n_boot=200)
    )
    assert result.results["r_v"].isna().all()
    assert result.results["nan_reason"].str.contains("zero window").all()
    g = result.groups.iloc[0]
    assert g["n"] == 0 and g["n_nan"] == 2


def test_run_record_and_resume(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = tiny_lm()
    prompts_file = tmp_path / "prompts.jsonl"
    with prompts_file.open("w") as f:
        for p in prompt_set(3):
            f.write(json.dumps({"id": p.id, "group": p.group, "text": p.text}) + "\n")
    config = ContractionConfig(
        prompts=str(prompts_file), layers=[0, 2], window=5, n_boot=200, batch_size=2
    )
    out = tmp_path / "run"
    run_dir, already, headline = run_contraction(config, out=out, lm=lm)
    assert not already and run_dir == out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["model"]["weights_sha256"] == "0" * 64
    results = pd.read_csv(out / "results.csv")
    required = [
        "prompt_id",
        "group",
        "n_tokens",
        "layer_early",
        "layer_late",
        "pr_mode",
        "pr_early",
        "pr_late",
        "r_v",
    ]
    assert set(required) <= set(results.columns)
    assert len(results) == 6 * 2
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "results.parquet")[required], results[required]
    )
    for plot in ("r_v_by_group", "pr_profile", "effect_by_layer"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 1000
    assert "Recursive vs baseline" in (out / "summary.md").read_text()
    # Same config again: reported complete, nothing recomputed.
    _, already, _ = run_contraction(config, out=out, lm=lm)
    assert already


def test_bad_settings_write_nothing(tmp_path) -> None:
    lm = tiny_lm()
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="out of range"):
        run_contraction(ContractionConfig(layers=[0, 9]), out=out, lm=lm)
    with pytest.raises(ConfigError, match="window"):
        run_contraction(ContractionConfig(window=1), out=out, lm=lm)
    with pytest.raises(PromptError):
        run_contraction(ContractionConfig(prompts=str(tmp_path / "missing.csv")), out=out, lm=lm)
    assert not out.exists()


def test_interrupted_run_resumes_without_recomputing(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    import rloop.experiments.contraction as contraction_module

    lm = tiny_lm()
    prompts_file = tmp_path / "prompts.jsonl"
    with prompts_file.open("w") as f:
        for p in prompt_set(4):
            f.write(json.dumps({"id": p.id, "group": p.group, "text": p.text}) + "\n")
    config = ContractionConfig(
        prompts=str(prompts_file), layers=[0, 2], window=5, n_boot=200, batch_size=2
    )
    out = tmp_path / "run"
    real_table = contraction_module.measure_pr
    calls = []

    def failing_table(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during the third batch
        return real_table(*args, **kwargs)

    monkeypatch.setattr(contraction_module, "measure_pr", failing_table)
    with pytest.raises(KeyboardInterrupt):
        run_contraction(config, out=out, lm=lm)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert not (out / "results.csv").exists()  # nothing that looks complete
    assert len(list((out / "partial").iterdir())) == 2

    calls.clear()
    monkeypatch.setattr(
        contraction_module,
        "measure_pr",
        lambda *a, **k: (calls.append(1), real_table(*a, **k))[1],
    )
    run_contraction(config, out=out, lm=lm)
    assert len(calls) == 2  # 4 batches in all, 2 were already done
    resumed = pd.read_csv(out / "results.csv").sort_values(
        ["pr_mode", "prompt_id"], ignore_index=True
    )
    fresh_dir, _, _ = run_contraction(config, out=tmp_path / "fresh", lm=lm)
    fresh = pd.read_csv(fresh_dir / "results.csv").sort_values(
        ["pr_mode", "prompt_id"], ignore_index=True
    )
    pd.testing.assert_frame_equal(resumed, fresh)
