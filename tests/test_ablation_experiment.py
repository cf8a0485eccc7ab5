"""`rloop ablate` as an experiment: tidy table, per-head statistics, run record, and the
group / layer ablation edits against independent weight surgery."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from rloop.capture.batching import encode
from rloop.errors import ConfigError
from rloop.experiments.ablate import AblationConfig, run_head_sweep
from rloop.interventions.edits import group_ablation_edits, layer_ablation_edits
from rloop.interventions.engine import ablated_r_v
from rloop.interventions.head_sweep import single_head_reference
from rloop.metrics import r_v
from tests.test_contraction import prompt_set
from tests.tiny_models import tiny_lm


def _prompt_file(tmp_path, n=3):
    path = tmp_path / "prompts.jsonl"
    with path.open("w") as f:
        for p in prompt_set(n):
            f.write(json.dumps({"id": p.id, "group": p.group, "text": p.text}) + "\n")
    return path


def _l5_config(tmp_path, **overrides) -> AblationConfig:
    """The sweep over the 3-prompt L5 file on the tiny model, R_V at layers 1 and 2."""
    settings = {"groups": ["L5"], "measure_layers": [1, 2], "window": 5, "n_boot": 200}
    return AblationConfig(prompts=str(_prompt_file(tmp_path)), **{**settings, **overrides})


def test_sweep_run_record_matches_plain_forwards(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    config = _l5_config(tmp_path)
    run_dir, already, headline = run_head_sweep(config, out=tmp_path / "run", lm=lm)
    assert not already
    table = pd.read_csv(run_dir / "results.csv")
    required = {"prompt_id", "layer", "head", "r_v_base", "r_v_ablated", "impact"}
    assert required <= set(table.columns)
    assert len(table) == 3 * lm.adapter.n_layers * lm.adapter.n_heads
    # Heads at the late layer (2) and above: exactly 0, not computed.
    late_rows = table[table.layer >= 2]
    assert (late_rows["impact"] == 0).all() and (~late_rows["computed"]).all()
    # Every computed impact equals a plain forward with that head zeroed.
    texts = [p.text for p in prompt_set(3) if p.group == "L5"]
    batch = encode(lm.tokenizer, texts)
    for layer in (0, 1):
        for head in range(lm.adapter.n_heads):
            e, lt = single_head_reference(lm.model, lm.adapter, batch, layer, head, 1, 2, 5)
            rows = table[(table["layer"] == layer) & (table["head"] == head)].sort_values(
                "prompt_id"
            )
            np.testing.assert_allclose(rows["r_v_ablated"], r_v(lt.numpy(), e.numpy()), rtol=1e-5)
    heads = pd.read_csv(run_dir / "heads.csv")
    assert len(heads) == lm.adapter.n_layers * lm.adapter.n_heads
    assert heads["p_bh"].notna().sum() == 2 * lm.adapter.n_heads
    assert (run_dir / "plots" / "impact_heatmap.png").exists()
    assert "noise floor" in (run_dir / "summary.md").read_text()
    assert headline["top_head"].startswith("L")


def test_sweep_kl_column_matches_plain_forward_logits(tmp_path, monkeypatch) -> None:
    from rloop.capture.trace import Trace
    from rloop.interventions.edits import head_ablation_edit, keep_mask
    from rloop.metrics import kl_divergence

    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    config = _l5_config(tmp_path, kl=True)
    run_dir, _, _ = run_head_sweep(config, out=tmp_path / "run", lm=lm)
    table = pd.read_csv(run_dir / "results.csv")
    texts = [p.text for p in prompt_set(3) if p.group == "L5"]
    ids = [p.id for p in prompt_set(3) if p.group == "L5"]
    batch = encode(lm.tokenizer, texts)
    last = torch.tensor(batch.n_tokens) - 1

    def last_logits(edits):
        with torch.no_grad(), Trace(lm.model, lm.adapter, edits=edits):
            logits = lm.model(**batch.model_inputs(), use_cache=False).logits  # (P, T, V)
        return logits[torch.arange(len(texts)), last]  # (P, V)

    clean = last_logits({})
    for layer in range(lm.adapter.n_layers):  # the late layer 2 included: KL is computed there
        for head in range(lm.adapter.n_heads):
            edit = head_ablation_edit(keep_mask(lm.adapter, [[head]]))
            expected = kl_divergence(clean, last_logits({f"blocks.{layer}.z": edit})).numpy()
            rows = table[(table["layer"] == layer) & (table["head"] == head)]
            got = rows.set_index("prompt_id").loc[ids, "kl"].to_numpy()
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-8)
    heads = pd.read_csv(run_dir / "heads.csv")
    assert {"mean_kl", "kl_ci_low", "kl_ci_high"} <= set(heads.columns)
    assert (run_dir / "plots" / "kl_heatmap.png").exists()
    assert "last-token KL" in (run_dir / "summary.md").read_text()


def test_bad_heads_and_modes(tmp_path) -> None:
    lm = tiny_lm("llama")
    with pytest.raises(ConfigError, match="out of range"):
        group_ablation_edits(lm.adapter, [(0, 9)])
    with pytest.raises(ConfigError, match="choose from zero, mean, resample"):
        run_head_sweep(AblationConfig(mode="half"), out=tmp_path / "x", lm=lm)
    with pytest.raises(ConfigError, match="names a mode twice"):
        run_head_sweep(AblationConfig(mode="zero,zero"), out=tmp_path / "x", lm=lm)
    with pytest.raises(ConfigError, match="exceeds the 3 prompts"):
        run_head_sweep(
            _l5_config(tmp_path, mode="resample", n_resample=4), out=tmp_path / "x", lm=lm
        )
    with pytest.raises(ConfigError, match="out of range"):
        run_head_sweep(
            AblationConfig(prompts=str(_prompt_file(tmp_path)), layers=[7], window=5),
            out=tmp_path / "x",
            lm=lm,
        )
    assert not (tmp_path / "x").exists()


def test_group_ablation_equals_zeroed_output_projection_columns() -> None:
    lm = tiny_lm("gpt_neox")
    texts = [p.text for p in prompt_set(2)]
    heads = [(0, 1), (0, 3), (1, 2)]
    clean, ablated = ablated_r_v(lm, texts, group_ablation_edits(lm.adapter, heads), 1, 2, 5)
    d = lm.adapter.d_head
    with torch.no_grad():
        for layer, head in heads:
            dense = lm.adapter.module_for(lm.model, layer, "z")  # output projection
            dense.weight[:, head * d : (head + 1) * d] = 0
        reference, _ = ablated_r_v(lm, texts, {}, 1, 2, 5)
    np.testing.assert_allclose(ablated, reference, rtol=1e-5)
    assert not np.allclose(clean, ablated)


def test_layer_ablation_equals_zeroed_attention_output() -> None:
    lm = tiny_lm("llama")
    texts = [p.text for p in prompt_set(2)]
    _, ablated = ablated_r_v(lm, texts, layer_ablation_edits(0, "attn_out"), 1, 2, 5)
    with torch.no_grad():
        lm.adapter.module_for(lm.model, 0, "z").weight.zero_()  # o_proj of layer 0
        reference, _ = ablated_r_v(lm, texts, {}, 1, 2, 5)
    np.testing.assert_allclose(ablated, reference, rtol=1e-5)
