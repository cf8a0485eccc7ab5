"""Resample ablation and several ablation modes in one `rloop ablate` run, against plain
forwards: the drawn reference prompts' z means come from a hook on the output projection of
a plain Hugging Face forward, the ablated R_V from a plain forward per head."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps

from rloop.capture.batching import encode
from rloop.experiments.ablate import run_head_sweep, sweep_modes
from rloop.interventions.head_sweep import single_head_reference
from rloop.metrics import r_v
from tests.test_ablation_experiment import _l5_config
from tests.test_contraction import prompt_set
from tests.tiny_models import tiny_lm

EARLY, LATE, WINDOW = 1, 2, 5


def _token_mean_z(lm, text: str, layer: int) -> torch.Tensor:
    """(H, D) mean over the prompt's tokens of the input of layer's o_proj (the heads' z)."""
    seen = {}
    o_proj = lm.model.model.layers[layer].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(lambda _m, args: seen.update(z=args[0]))
    try:
        with torch.no_grad():
            lm.model(**encode(lm.tokenizer, [text]).model_inputs(), use_cache=False)
    finally:
        handle.remove()
    z = seen["z"][0].double()  # (T, H * D)
    return z.mean(0).view(lm.adapter.n_heads, lm.adapter.d_head).float()


def test_resample_rows_equal_plain_forwards_averaged_over_draws(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    config = _l5_config(tmp_path, mode="zero,mean,resample", n_resample=2, layers=[0, 1])
    run_dir, _, headline = run_head_sweep(config, out=tmp_path / "run", lm=lm)
    table = pd.read_parquet(run_dir / "results.parquet")
    assert list(dict.fromkeys(table["mode"])) == ["zero", "mean", "resample"]

    references = [p.text for p in prompt_set(3) if p.group == "factual"]
    drawn = sorted(np.random.default_rng(config.seed).choice(3, size=2, replace=False))
    texts = [p.text for p in prompt_set(3) if p.group == "L5"]
    ids = [p.id for p in prompt_set(3) if p.group == "L5"]
    batch = encode(lm.tokenizer, texts)
    for layer in (0, 1):
        means = [_token_mean_z(lm, references[i], layer) for i in drawn]
        for head in range(lm.adapter.n_heads):
            expected = np.mean(
                [
                    r_v(lt.numpy(), e.numpy())
                    for e, lt in (
                        single_head_reference(
                            lm.model,
                            lm.adapter,
                            batch,
                            layer,
                            head,
                            EARLY,
                            LATE,
                            WINDOW,
                            mean_z=mean,
                        )  # fmt: skip
                        for mean in means
                    )
                ],
                axis=0,
            )  # (P,)
            rows = table[(table["mode"] == "resample") & (table["layer"] == layer)]
            got = rows[rows["head"] == head].set_index("prompt_id").loc[ids, "r_v_ablated"]
            np.testing.assert_allclose(got.to_numpy(), expected, rtol=1e-5)

    # The zero rows of the three-mode run equal a zero-only run.
    zero_dir, _, _ = run_head_sweep(
        _l5_config(tmp_path, layers=[0, 1]), out=tmp_path / "zero", lm=lm
    )
    zero = pd.read_parquet(zero_dir / "results.parquet")
    both = table[table["mode"] == "zero"].reset_index(drop=True)
    np.testing.assert_allclose(both["r_v_ablated"], zero["r_v_ablated"], rtol=1e-6)

    # Mode agreement: Spearman of the computed heads' mean impacts, as scipy computes it.
    heads = pd.read_parquet(run_dir / "heads.parquet")
    agreement = pd.read_parquet(run_dir / "mode_agreement.parquet")
    assert len(agreement) == 3
    impacts = {
        m: f[f["computed"]].set_index(["layer", "head"])["mean_impact"].sort_index()
        for m, f in heads.groupby("mode")
    }
    row = agreement[(agreement.mode_a == "zero") & (agreement.mode_b == "resample")].iloc[0]
    want = sps.spearmanr(impacts["zero"], impacts["resample"]).statistic
    assert abs(row["spearman"] - want) < 1e-12
    assert headline["min_mode_spearman"] == agreement["spearman"].min()
    assert (run_dir / "plots" / "impact_heatmap_resample.png").exists()
    assert "Do the ablation modes agree?" in (run_dir / "summary.md").read_text()


def test_mode_list_reading() -> None:
    assert sweep_modes(" zero, resample ") == ["zero", "resample"]
