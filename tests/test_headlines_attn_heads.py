"""Headlines that count what their tables show: ``attn-vs-mlp`` counts layers (not group x
layer rows) and ``heads`` counts and ranks differential heads by the measure its summary
table ranks by (per-head PR of z)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from rloop.experiments.attn_vs_mlp import ComponentsConfig, lower_pr_headline, run_components
from rloop.experiments.heads import heads_headline
from tests.test_causal_experiments import write_prompts
from tests.tiny_models import tiny_lm


def test_attn_vs_mlp_headline_counts_layers() -> None:
    # two groups x three layers: layer 0 attention lower in both groups, layer 1 the MLP in
    # both, layer 2 attention in one group and the MLP in the other
    table = pd.DataFrame(
        {
            "group": ["L5"] * 3 + ["factual"] * 3,
            "layer": [0, 1, 2] * 2,
            "lower_pr": ["attn", "mlp", "attn", "attn", "mlp", "mlp"],
        }
    )
    assert lower_pr_headline(table, [0, 1, 2]) == {
        "n_layers": 3,
        "layers_attn_lower": 1,
        "layers_mlp_lower": 1,
        "layers_mixed": 1,
    }


def test_attn_vs_mlp_run_headline_never_exceeds_the_layers(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    config = ComponentsConfig(prompts=str(write_prompts(tmp_path)), window=4, n_boot=200)
    run_dir, _, headline = run_components(config, out=tmp_path / "c", lm=tiny_lm("llama"))
    by_group = pd.read_csv(run_dir / "by_group.csv")
    winners = by_group.groupby("layer")["lower_pr"].agg(lambda w: "/".join(sorted(set(w))))
    assert headline["n_layers"] == 3 == len(winners)
    assert headline["layers_attn_lower"] == int((winners == "attn").sum())
    assert headline["layers_mlp_lower"] == int((winners == "mlp").sum())
    assert (
        headline["layers_attn_lower"] + headline["layers_mlp_lower"] + headline["layers_mixed"] == 3
    )


def test_heads_headline_counts_and_ranks_by_pr_z() -> None:
    heads = pd.DataFrame(
        {
            "layer": [0, 0, 1, 1],
            "head": [0, 1, 0, 1],
            "output_norm_mean": [1.0, 4.0, 2.0, 3.0],
            "pr_z_hedges_g": [0.2, -1.5, 0.9, 0.1],
            "pr_z_p_bh": [0.5, 0.01, 0.04, 0.9],
            # another quantity differential where PR(z) is not: must not be counted
            "entropy_p_bh": [0.001, 0.5, 0.5, 0.001],
        }
    )
    headline = heads_headline(heads)
    assert headline["loudest_head"] == "L0H1" and headline["loudest_norm"] == 4.0
    assert headline["most_differential_head"] == "L0H1"  # |g| = 1.5, the largest
    assert headline["most_differential_pr_z_hedges_g"] == -1.5
    assert headline["n_differential_pr_z_bh05"] == 2


def test_heads_headline_without_both_groups_names_only_the_loudest() -> None:
    heads = pd.DataFrame(
        {"layer": [0, 1], "head": [0, 0], "output_norm_mean": [np.float64(2.0), 5.0]}
    )
    assert heads_headline(heads) == {"loudest_head": "L1H0", "loudest_norm": 5.0}
