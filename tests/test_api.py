"""The notebook API: verbs at the top level, prompts in any form, results with tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import rloop
import rloop.api
from rloop.api import prompts_file
from rloop.errors import ConfigError
from rloop.experiments.ablate_group import GroupAblationConfig, run_group_ablation
from rloop.experiments.contraction import ContractionConfig, run_contraction
from rloop.prompts import load_prompt_file
from tests.test_contraction import prompt_set
from tests.tiny_models import tiny_lm

SETTINGS = {"layers": [0, 2], "window": 5, "n_boot": 200}


def _groups() -> dict[str, list[str]]:
    by_group: dict[str, list[str]] = {}
    for p in prompt_set(4):
        by_group.setdefault(p.group, []).append(p.text)
    return by_group


def test_contraction_verb_equals_the_experiment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    monkeypatch.setenv("RLOOP_CACHE", str(tmp_path / "cache"))
    lm = tiny_lm()
    result = rloop.contraction(lm, prompts=_groups(), out=tmp_path / "api", **SETTINGS)
    config = ContractionConfig(prompts=prompts_file(_groups()), **SETTINGS)
    run_dir, _, headline = run_contraction(config, out=tmp_path / "direct", lm=lm)
    pd.testing.assert_frame_equal(result["results"], pd.read_parquet(run_dir / "results.parquet"))
    assert result.headline == pytest.approx(headline)
    assert result.summary().startswith("# Contraction experiment")
    assert "contrasts" in result.table_names and "r_v_by_group" in result.plot_names
    assert "<b>contraction</b>" in result._repr_html_()
    copy = result.save(tmp_path / "copy")
    assert (copy / "manifest.json").exists()


def test_prompts_in_every_form_become_the_same_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_CACHE", str(tmp_path / "cache"))
    texts = ["one two three", "four five six"]
    from_list = prompts_file(texts)
    assert from_list == prompts_file(list(texts))  # content-addressed: same prompts, same file
    frame = pd.DataFrame({"text": texts, "group": ["a", "b"]})
    assert prompts_file(frame) == prompts_file({"a": [texts[0]], "b": [texts[1]]})
    assert prompts_file("mine.csv") == "mine.csv" and prompts_file(None) is None


def test_unknown_setting_is_a_one_line_error() -> None:
    with pytest.raises(ConfigError, match="unknown setting"):
        rloop.contraction(tiny_lm(), windwo=5)


def test_verbs_reach_their_experiments(tmp_path, monkeypatch) -> None:
    """sweep -> group ablation (heads as (layer, head) pairs) -> attribution (from_sweep a
    Result): each verb's tables equal the experiment run directly with the CLI's text forms,
    and the group's ablated R_V equals a plain forward with those heads' z zeroed."""
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    monkeypatch.setenv("RLOOP_CACHE", str(tmp_path / "cache"))
    lm = tiny_lm()
    texts = {"L5": _groups()["L5"]}
    common = {"measure_layers": [0, 2], "window": 5, "n_boot": 200}
    sweep = rloop.api.ablate(lm, prompts=texts, out=tmp_path / "sweep", **common)
    heads = sweep["heads"]
    assert sweep.manifest["experiment"] == "ablate" and len(heads) == 3 * 4
    late = heads[heads["layer"] == 2]  # at the measured layer: zero by causality, not run
    assert (late["mean_impact"] == 0).all() and not late["computed"].any()

    group = rloop.api.ablate_group(
        lm, prompts=texts, heads=[(0, 1), (1, 2)], n_random=3, out=tmp_path / "group", **common
    )
    config = GroupAblationConfig(prompts=prompts_file(texts), heads="0.1,1.2", n_random=3, **common)
    direct, _, _ = run_group_ablation(config, out=tmp_path / "group-direct", lm=lm)
    pd.testing.assert_frame_equal(group["results"], pd.read_parquet(direct / "results.parquet"))
    expected = [_r_v_with_heads_zeroed(lm, t, {0: [1], 1: [2]}) for t in texts["L5"]]
    np.testing.assert_allclose(group["results"]["r_v_ablated"], expected, rtol=1e-5)

    attr = rloop.api.attribution(lm, prompts=texts, from_sweep=sweep, out=tmp_path / "a", **common)
    assert attr.manifest["config"]["from_sweep"] == str(sweep.path)
    merged = attr["heads"].merge(sweep["heads"], on=["layer", "head"])
    np.testing.assert_allclose(merged["exact_mean"], merged["mean_impact"], rtol=1e-6, atol=1e-12)


def _r_v_with_heads_zeroed(lm, text: str, heads: dict[int, list[int]]) -> float:
    """Per-head R_V (layers 0 -> 2, window 5) from a plain HF forward in float64: z of the
    listed heads zeroed by a pre-hook on o_proj, V from v_proj's output."""
    model, n_kv, d_head = lm.model, lm.adapter.n_kv_heads, lm.adapter.d_head
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for layer, attention in enumerate(model.model.layers):
        attn = attention.self_attn

        def keep_v(_module, _inputs, output, layer=layer):
            captured[layer] = output.detach()

        def zero_z(_module, inputs, layer=layer):
            z = inputs[0].clone()  # (1, T, n_heads * d_head)
            for head in heads.get(layer, []):
                z[..., head * d_head : (head + 1) * d_head] = 0
            return (z,)

        handles += [attn.v_proj.register_forward_hook(keep_v)]
        handles += [attn.o_proj.register_forward_pre_hook(zero_z)]
    ids = torch.tensor([lm.tokenizer(text)["input_ids"]])
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()

    def per_head_pr(layer: int) -> float:
        v = captured[layer][0, -5:].double().reshape(5, n_kv, d_head)  # (W, kv_heads, d_head)
        prs = []
        for h in range(n_kv):
            gram = v[:, h] @ v[:, h].T  # (W, W)
            prs.append(float(torch.trace(gram) ** 2 / (gram**2).sum()))
        return float(np.mean(prs))

    return per_head_pr(2) / per_head_pr(0)


def test_dataframe_prompts_with_missing_cells(tmp_path, monkeypatch) -> None:
    """A NaN cell (a baseline prompt has no pair_id) is left out of the prompt file."""
    monkeypatch.setenv("RLOOP_CACHE", str(tmp_path / "cache"))
    frame = pd.DataFrame(
        [
            {"group": "rec", "pair_id": "a", "text": "one two three four"},
            {"group": "rec_twin", "pair_id": "a", "text": "five six seven eight"},
            {"group": "base", "text": "nine ten eleven twelve"},
        ]
    )
    path = prompts_file(frame)
    records = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
    assert records[2] == {"group": "base", "text": "nine ten eleven twelve"}
    assert records[0]["pair_id"] == records[1]["pair_id"] == "a"
    assert [p.pair_id for p in load_prompt_file(path)] == ["a", "a", None]


@pytest.mark.parametrize("verb", [v for v in rloop.api.VERBS if v not in ("load", "gain")])
def test_every_verb_checks_its_settings(verb: str) -> None:
    with pytest.raises(ConfigError, match="unknown .*setting.*not_a_setting"):
        getattr(rloop.api, verb)(tiny_lm(), not_a_setting=1)
