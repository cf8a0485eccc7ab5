"""`rloop ablate-group --mode zero,mean,resample` against plain forwards: the heads' z at the
input of o_proj replaced by zeros, by the reference group's token mean, or by one drawn
reference prompt's token mean (R_V averaged over the draws), V from v_proj's output and PR
from numpy's SVD in float64; and an interrupted group ablation resumes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import typer
from typer.testing import CliRunner

import rloop.experiments.ablate_group as ablate_group_module
from rloop.errors import ConfigError
from rloop.experiments.ablate_group import GroupAblationConfig, run_group_ablation
from rloop.interventions.edits import parse_heads
from tests.test_causal_experiments import ids, svd_pr, texts_of, write_prompts
from tests.tiny_models import tiny_lm

EARLY, LATE, WINDOW = 0, 2, 4
GROUP = "0.1,1.2"


def _token_z(model, text: str, layer: int) -> np.ndarray:
    """(T, H * D) float64: the input of layer's o_proj (every head's z) in a plain forward."""
    seen = {}
    o_proj = model.model.layers[layer].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(lambda _m, args: seen.update(z=args[0]))
    try:
        with torch.no_grad():
            model(input_ids=ids(text), use_cache=False)
    finally:
        handle.remove()
    return seen["z"][0].double().numpy()


def _r_v_with_z(model, text: str, heads, fill: dict[int, np.ndarray]) -> float:
    """Per-head R_V (KV heads) of one prompt with each listed head's z slice replaced at
    every token by ``fill[layer]`` ((H * D,) float64) of the same slice."""
    d_head, n_kv = model.config.head_dim, model.config.num_key_value_heads
    layers = model.model.layers
    captured, handles = {}, []
    for layer in (EARLY, LATE):

        def keep(_m, _args, output, layer=layer):
            captured[layer] = output.detach()[0].double().numpy()  # (T, Hkv * D)

        handles.append(layers[layer].self_attn.v_proj.register_forward_hook(keep))
    for layer in sorted({lay for lay, _ in heads}):
        chosen = [h for lay, h in heads if lay == layer]

        def replace(_m, args, layer=layer, chosen=chosen):
            x = args[0].clone()  # (1, T, H * D)
            for h in chosen:
                part = slice(h * d_head, (h + 1) * d_head)
                x[..., part] = torch.as_tensor(fill[layer][part], dtype=x.dtype)
            return (x,)

        handles.append(layers[layer].self_attn.o_proj.register_forward_pre_hook(replace))
    try:
        with torch.no_grad():
            model(input_ids=ids(text), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()

    def pr(v):  # (T, Hkv * D) -> mean over KV heads of the PR of the last W rows
        win = v[-WINDOW:]
        return float(np.mean([svd_pr(win[:, k * d_head : (k + 1) * d_head]) for k in range(n_kv)]))

    return pr(captured[LATE]) / pr(captured[EARLY])


def _config(path, **overrides) -> GroupAblationConfig:
    values = dict(
        prompts=str(path), groups=["L5"], heads=GROUP, measure_layers=[EARLY, LATE],
        window=WINDOW, n_random=2, n_boot=200, mode="zero,mean,resample", n_resample=2,
    )  # fmt: skip
    return GroupAblationConfig(**{**values, **overrides})


def test_group_ablation_modes_equal_plain_forwards(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    path = write_prompts(tmp_path)
    config = _config(path)
    run_dir, _, headline = run_group_ablation(config, out=tmp_path / "g", lm=lm)
    results = pd.read_parquet(run_dir / "results.parquet")
    controls = pd.read_parquet(run_dir / "random_controls.parquet")
    summary = pd.read_parquet(run_dir / "summary.parquet")
    assert summary["mode"].tolist() == ["zero", "mean", "resample"]

    model, reference = lm.model, texts_of(path, "factual")
    layers = (0, 1)
    zeros = {layer: np.zeros(lm.adapter.n_heads * lm.adapter.d_head) for layer in layers}
    mean = {
        layer: np.concatenate([_token_z(model, t, layer) for t in reference]).mean(0)
        for layer in layers
    }  # every token of the reference group
    drawn = sorted(np.random.default_rng(config.seed).choice(len(reference), 2, replace=False))
    resampled = [
        {layer: _token_z(model, reference[i], layer).mean(0) for layer in layers} for i in drawn
    ]  # one reference prompt each
    fills = {"zero": [zeros], "mean": [mean], "resample": resampled}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["mean_reference"]["resample_prompts"] == [f"factual_{i}" for i in drawn]

    first_draw = parse_heads(controls[controls.draw == 0]["heads"].iloc[0])
    for mode, mode_fills in fills.items():
        for heads, rows in (
            (parse_heads(GROUP), results[results["mode"] == mode]),
            (first_draw, controls[(controls["mode"] == mode) & (controls.draw == 0)]),
        ):
            expected = [
                np.mean([_r_v_with_z(model, text, heads, fill) for fill in mode_fills])
                for text in texts_of(path, "L5")
            ]
            np.testing.assert_allclose(rows["r_v_ablated"], expected, rtol=1e-5)
        row = summary[summary["mode"] == mode].iloc[0]
        group = results[results["mode"] == mode]
        assert row["mean_change"] == pytest.approx(group["change"].mean(), rel=1e-9)
    assert headline["mean_change"] == pytest.approx(summary["mean_change"].iloc[0])
    assert headline["mean_change_resample"] == pytest.approx(summary["mean_change"].iloc[2])
    assert (run_dir / "plots" / "group_vs_random_resample.png").is_file()
    assert "## resample ablation" in (run_dir / "summary.md").read_text()


def test_interrupted_group_ablation_resumes_equal_to_a_fresh_run(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    config = _config(write_prompts(tmp_path))  # units: zero, mean, resample x 2 -> 4
    real = ablate_group_module.head_set_r_v
    calls: list = []

    def counted(*args, interrupt_on=None, **kwargs):
        calls.append(1)
        if len(calls) == interrupt_on:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(
        ablate_group_module, "head_set_r_v", lambda *a, **k: counted(*a, interrupt_on=3, **k)
    )
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_group_ablation(config, out=out, lm=lm)
    assert len(list((out / "partial").glob("*.parquet"))) == 2

    calls.clear()
    monkeypatch.setattr(ablate_group_module, "head_set_r_v", counted)
    run_group_ablation(config, out=out, lm=lm)
    assert len(calls) == 2  # only the unfinished (mode, draw) units
    fresh, _, _ = run_group_ablation(config, out=tmp_path / "fresh", lm=lm)
    for name in ("results", "random_controls", "summary"):
        pd.testing.assert_frame_equal(
            pd.read_csv(out / f"{name}.csv"), pd.read_csv(fresh / f"{name}.csv")
        )


def test_group_ablation_mode_errors_before_loading(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    path = write_prompts(tmp_path)  # 4 factual reference prompts
    unknown = "no-such-model-anywhere"
    for overrides, match in (
        ({"n_resample": 5}, "--n-resample 5 exceeds the 4 prompts"),
        ({"mode": "zero,bogus"}, "unknown ablation mode 'bogus'"),
        ({"mode": "zero,zero"}, "names a mode twice"),
    ):
        with pytest.raises(ConfigError, match=match):
            run_group_ablation(_config(path, model=unknown, **overrides), out=tmp_path / "x")
    assert not (tmp_path / "x").exists()

    from rloop.cli.causal import register

    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(
        app,
        ["ablate-group", "--heads", GROUP, "--prompts", str(path), "--mode", "zero,resample",
         "--n-resample", "0", "--model", unknown],
    )  # fmt: skip
    assert result.exit_code == 2 and "--n-resample must be at least 1" in result.output
