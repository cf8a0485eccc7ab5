"""The causal battery on tiny models, each value against an independent computation:
raw PyTorch hooks on the Hugging Face modules, weight surgery, numpy SVD in float64."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pandas as pd
import pytest
import torch

from rloop.capture.batching import encode
from rloop.errors import ConfigError, PromptError
from rloop.experiments.ablate import AblationConfig, run_head_sweep
from rloop.experiments.ablate_group import (
    GroupAblationConfig,
    random_head_sets,
    run_group_ablation,
)
from rloop.experiments.ablate_layer import LayerAblationConfig, run_layer_ablation
from rloop.experiments.attn_vs_mlp import ComponentsConfig, component_pr, run_components
from rloop.experiments.attribution import AttributionConfig, run_attribution
from rloop.experiments.heads import measure_heads
from rloop.experiments.patch import PatchConfig, circularity, patched_r_v, run_patching
from rloop.experiments.saliency import SaliencyConfig, run_saliency
from rloop.interventions.edits import PatchSpec, parse_heads
from rloop.interventions.engine import head_set_r_v
from tests.tiny_models import tiny_lm

WINDOW = 4
EARLY, LATE = 0, 2


def svd_pr(x: np.ndarray) -> float:
    """PR of a (W, d) matrix from numpy's SVD in float64."""
    s = np.linalg.svd(np.asarray(x, dtype=np.float64), compute_uv=False)
    return float((s**2).sum() ** 2 / (s**4).sum())


def write_prompts(tmp_path, n_per_group=4, lengths=(9, 13), seed=0, groups=("L5", "factual")):
    rng = random.Random(seed)
    path = tmp_path / "prompts.jsonl"
    with path.open("w") as f:
        for group in groups:
            for i in range(n_per_group):
                n = rng.randint(*lengths)
                text = " ".join(str(rng.randint(1, 96)) for _ in range(n))
                f.write(json.dumps({"id": f"{group}_{i}", "group": group, "text": text}) + "\n")
    return path


def texts_of(path, group):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["text"] for r in rows if r["group"] == group]


def ids(text: str) -> torch.Tensor:
    return torch.tensor([[int(w) for w in text.split()]])  # (1, T)


def reference_r_v(model, text, zero_heads=(), zero_modules=(), mode="per-head"):
    """R_V of one prompt by plain HF forwards and raw hooks (llama layout), numpy SVD PR.

    zero_heads: (layer, head) whose slice of the o_proj input is zeroed (z ablation);
    zero_modules: modules whose output is replaced by zeros.
    """
    layers = model.model.layers
    n_heads, d_head = model.config.num_attention_heads, model.config.head_dim
    captured, handles = {}, []
    for layer in (EARLY, LATE):

        def keep(module, args, output, layer=layer):
            captured[layer] = output.detach()[0].numpy()  # (T, Hkv*D)

        handles.append(layers[layer].self_attn.v_proj.register_forward_hook(keep))
    for layer in {lay for lay, _ in zero_heads}:
        heads = [h for lay, h in zero_heads if lay == layer]

        def zero(module, args, heads=heads):
            x = args[0].clone()
            for h in heads:
                x[..., h * d_head : (h + 1) * d_head] = 0
            return (x,)

        handles.append(layers[layer].self_attn.o_proj.register_forward_pre_hook(zero))
    for module in zero_modules:

        def zero_out(mod, args, output):
            if isinstance(output, tuple):
                return (torch.zeros_like(output[0]), *output[1:])
            return torch.zeros_like(output)

        handles.append(module.register_forward_hook(zero_out))
    try:
        with torch.no_grad():
            model(input_ids=ids(text), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    n_kv = model.config.num_key_value_heads

    def pr(v):  # (T, Hkv*D) -> PR of the last W rows
        win = v[-WINDOW:]
        if mode == "whole":
            return svd_pr(win)
        return float(np.mean([svd_pr(win[:, k * d_head : (k + 1) * d_head]) for k in range(n_kv)]))

    del n_heads
    return pr(captured[LATE]) / pr(captured[EARLY])


# ---------------------------------------------------------------------------- group ablation
def test_group_ablation_equals_plain_forward_with_heads_zeroed(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    path = write_prompts(tmp_path)
    config = GroupAblationConfig(
        prompts=str(path),
        groups=["L5"],
        heads="0.1,1.2,1.3",
        measure_layers=[EARLY, LATE],
        window=WINDOW,
        n_random=4,
        n_boot=200,
    )
    run_dir, _, headline = run_group_ablation(config, out=tmp_path / "g", lm=lm)
    results = pd.read_csv(run_dir / "results.csv")
    for text, row in zip(texts_of(path, "L5"), results.itertuples(), strict=True):
        ref = reference_r_v(lm.model, text, zero_heads=[(0, 1), (1, 2), (1, 3)])
        assert row.r_v_ablated == pytest.approx(ref, rel=1e-5)
        assert row.r_v_clean == pytest.approx(reference_r_v(lm.model, text), rel=1e-5)
    assert headline["mean_change"] == pytest.approx(results["change"].mean(), rel=1e-9)
    # Every random draw equals its own plain forward too (stacked variants = one forward each).
    controls = pd.read_csv(run_dir / "random_controls.csv")
    first = controls[controls.draw == 0]
    drawn = parse_heads(first["heads"].iloc[0])
    assert sorted(layer for layer, _ in drawn) == [0, 1, 1]  # same layers as the group
    assert not {(0, 1), (1, 2), (1, 3)} & set(drawn)  # heads outside the group
    for text, row in zip(texts_of(path, "L5"), first.itertuples(), strict=True):
        assert row.r_v_ablated == pytest.approx(
            reference_r_v(lm.model, text, zero_heads=drawn), rel=1e-5
        )
    summary = pd.read_csv(run_dir / "summary.csv").iloc[0]
    draws = controls.groupby("draw")["change"].mean()
    assert summary["random_mean_change"] == pytest.approx(draws.mean())
    extreme = (draws.abs() >= abs(results["change"].mean())).sum()
    assert summary["random_p"] == pytest.approx((extreme + 1) / (len(draws) + 1))


def test_stacked_variants_chunked_equal_single_variants() -> None:
    lm = tiny_lm("llama")
    texts = ["5 9 3 7 1 8 2", "4 4 6 1 9 2 7 3 5"]
    batch = encode(lm.tokenizer, texts)
    sets = [[(0, 0)], [(1, 1), (0, 3)], [(1, 0)]]
    stacked = head_set_r_v(
        lm.model, lm.adapter, batch, sets, EARLY, LATE, WINDOW, "per-head", max_rows=2
    )  # forces one variant per chunk... and more
    together = head_set_r_v(lm.model, lm.adapter, batch, sets, EARLY, LATE, WINDOW, "per-head")
    np.testing.assert_allclose(stacked, together, rtol=1e-5)
    for v, heads in enumerate(sets):
        for p, text in enumerate(texts):
            assert together[v, p] == pytest.approx(
                reference_r_v(lm.model, text, zero_heads=heads), rel=1e-5
            )


def test_random_head_sets_are_seeded_and_layer_matched() -> None:
    group = [(3, 1), (3, 4), (7, 0)]
    a = random_head_sets(group, 8, 10, seed=1)
    assert a == random_head_sets(group, 8, 10, seed=1)
    assert a != random_head_sets(group, 8, 10, seed=2)
    for drawn in a:
        assert sorted(layer for layer, _ in drawn) == [3, 3, 7]
        assert not set(drawn) & set(group)


def test_group_from_sweep_takes_the_top_heads(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    path = write_prompts(tmp_path)
    sweep_dir, _, _ = run_head_sweep(
        AblationConfig(
            prompts=str(path),
            groups=["L5"],
            measure_layers=[EARLY, LATE],
            window=WINDOW,
            n_boot=200,
        ),
        out=tmp_path / "sweep",
        lm=lm,
    )
    heads = pd.read_csv(sweep_dir / "heads.csv")
    expanders = heads[heads.computed].nsmallest(2, "mean_impact")
    config = GroupAblationConfig(
        prompts=str(path),
        groups=["L5"],
        from_sweep=str(sweep_dir),
        top_k=2,
        select="negative",
        measure_layers=[EARLY, LATE],
        window=WINDOW,
        n_random=2,
        n_boot=200,
    )
    run_dir, _, _ = run_group_ablation(config, out=tmp_path / "g", lm=lm)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert sorted(manifest["heads"]) == sorted(
        f"{r.layer}.{r.head}" for r in expanders.itertuples()
    )
    with pytest.raises(ConfigError, match="only"):
        run_group_ablation(
            GroupAblationConfig(**{**config.to_dict(), "top_k": 99}), out=tmp_path / "x", lm=lm
        )
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------- layer ablation
def test_layer_ablation_equals_zeroed_projection_weights(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    path = write_prompts(tmp_path)
    config = LayerAblationConfig(
        prompts=str(path),
        groups=["L5"],
        layers=[0, 1, 2],
        components=["attn", "mlp"],
        measure_layers=[EARLY, LATE],
        window=WINDOW,
        n_boot=200,
    )
    run_dir, _, _ = run_layer_ablation(config, out=tmp_path / "l", lm=lm)
    results = pd.read_csv(run_dir / "results.csv")
    for layer, component, weight in [(1, "attn", "self_attn.o_proj"), (0, "mlp", "mlp.down_proj")]:
        surgery = copy.deepcopy(lm.model)
        with torch.no_grad():
            surgery.model.layers[layer].get_submodule(weight).weight.zero_()
        rows = results[(results.layer == layer) & (results.component == component)]
        for text, row in zip(texts_of(path, "L5"), rows.itertuples(), strict=True):
            assert row.r_v_ablated == pytest.approx(reference_r_v(surgery, text), rel=1e-5)
    # Causality: a component at the late layer cannot change V there.
    late = results[results.layer == LATE]
    assert (late["change"] == 0).all() and (~late["computed"]).all()


def test_mean_layer_ablation_and_short_reference_rejected(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    path = write_prompts(tmp_path)
    run_dir, _, _ = run_layer_ablation(
        LayerAblationConfig(
            prompts=str(path),
            groups=["L5"],
            layers=[1],
            mode="mean",
            measure_layers=[EARLY, LATE],
            window=WINDOW,
            n_boot=200,
        ),
        out=tmp_path / "m",
        lm=lm,
    )
    # Independent: the attention output replaced by its mean over the factual prompts' tokens.
    attn = lm.model.model.layers[1].self_attn
    outs = []
    h = attn.register_forward_hook(lambda m, a, o: outs.append(o[0][0].detach()))
    with torch.no_grad():
        for text in texts_of(path, "factual"):
            lm.model(input_ids=ids(text), use_cache=False)
    h.remove()
    mean = torch.cat(outs).to(torch.float64).mean(dim=0).to(torch.float32)  # (d,)
    h = attn.register_forward_hook(lambda m, a, o: (mean.expand_as(o[0]).clone(), *o[1:]))
    try:
        refs = [reference_r_v(lm.model, t) for t in texts_of(path, "L5")]
    finally:
        h.remove()
    np.testing.assert_allclose(pd.read_csv(run_dir / "results.csv")["r_v_ablated"], refs, rtol=1e-5)
    (tmp_path / "short").mkdir()
    short = write_prompts(tmp_path / "short", lengths=(3, 3), groups=("factual",))
    long_ = texts_of(path, "L5")
    with short.open("a") as f:
        for i, text in enumerate(long_):
            f.write(json.dumps({"id": f"L5_{i}", "group": "L5", "text": text}) + "\n")
    with pytest.raises(PromptError, match="fewer than 4 tokens"):
        run_layer_ablation(
            LayerAblationConfig(
                prompts=str(short),
                groups=["L5"],
                layers=[1],
                mode="mean",
                measure_layers=[EARLY, LATE],
                window=WINDOW,
            ),
            out=tmp_path / "never",
            lm=lm,
        )
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------------------- attn vs mlp
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_attn_vs_mlp_pr_equals_numpy_svd(family: str) -> None:
    lm = tiny_lm(family)
    texts = ["5 9 3 7 1 8 2", "4 4 6 1 9 2 7 3 5"]
    pr = component_pr(lm, texts, [0, 1, 2], WINDOW, batch_size=2)
    blocks = lm.adapter.blocks(lm.model)
    for p, text in enumerate(texts):
        captured, handles = {}, []
        for layer, block in enumerate(blocks):
            attn = block.attn if family == "gpt2" else block.self_attn
            handles.append(
                attn.register_forward_hook(
                    lambda m, a, o, layer=layer, store=captured: store.__setitem__(
                        ("attn", layer), o[0][0]
                    )
                )
            )
            handles.append(
                block.mlp.register_forward_hook(
                    lambda m, a, o, layer=layer, store=captured: store.__setitem__(
                        ("mlp", layer), o[0]
                    )
                )
            )
        with torch.no_grad():
            lm.model(input_ids=ids(text), use_cache=False)
        for h in handles:
            h.remove()
        for (component, layer), value in captured.items():
            expected = svd_pr(value[-WINDOW:].numpy())
            assert pr[component][p, layer] == pytest.approx(expected, rel=1e-6)


def test_components_run_record(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    path = write_prompts(tmp_path)
    run_dir, _, _ = run_components(
        ComponentsConfig(prompts=str(path), window=WINDOW, n_boot=200), out=tmp_path / "c", lm=lm
    )
    results = pd.read_csv(run_dir / "results.csv")
    table = pd.read_csv(run_dir / "by_group.csv")
    row = table[(table.group == "L5") & (table.layer == 1)].iloc[0]
    frame = results[(results.group == "L5") & (results.layer == 1)]
    assert row["attn_pr"] == pytest.approx(frame[frame.component == "attn"]["pr"].mean())
    assert row["lower_pr"] == ("attn" if row["attn_pr"] < row["mlp_pr"] else "mlp")
    assert (run_dir / "plots" / "attn_vs_mlp.png").exists()
    assert len(pd.read_csv(run_dir / "contrasts.csv")) == 3 * 2


# ---------------------------------------------------------------------------- head diagnostics
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_head_diagnostics_by_hand(family: str) -> None:
    lm = tiny_lm(family)
    text = "5 9 3 7 1 8 2 6 4"
    other = "3 3 8 1"  # shorter: right padding in the batch
    values = measure_heads(lm, [text, other], [0, 1], WINDOW, batch_size=2)
    model = lm.model
    z_in = {}
    blocks = lm.adapter.blocks(model)
    o_projs = [b.attn.c_proj if family == "gpt2" else b.self_attn.o_proj for b in blocks]
    handles = [
        o.register_forward_pre_hook(lambda m, a, layer=layer: z_in.__setitem__(layer, a[0][0]))
        for layer, o in enumerate(o_projs)
    ]
    with torch.no_grad():
        out = model(input_ids=ids(text), use_cache=False, output_attentions=True)
    for h in handles:
        h.remove()
    n_heads, d_head = lm.adapter.n_heads, lm.adapter.d_head
    t = len(text.split())
    for layer in (0, 1):
        attn = out.attentions[layer][0].double().numpy()  # (H, T, T)
        z = z_in[layer].double().numpy()  # (T, H*D)
        weight = o_projs[layer].weight.detach().double().numpy()
        w_o = weight if family == "gpt2" else weight.T  # (H*D, d_model)
        for h in range(n_heads):
            rows = attn[h, t - WINDOW :]  # (W, T)
            self_score = np.mean([rows[i, t - WINDOW + i] for i in range(WINDOW)])
            entropy = np.mean([-(r[r > 0] * np.log(r[r > 0])).sum() for r in rows])
            assert values["self_score"][0, layer, h] == pytest.approx(self_score, rel=1e-5)
            assert values["entropy"][0, layer, h] == pytest.approx(entropy, rel=1e-5)
            zh = z[t - WINDOW :, h * d_head : (h + 1) * d_head]  # (W, D)
            contribution = zh @ w_o[h * d_head : (h + 1) * d_head]  # (W, d_model)
            norm = np.linalg.norm(contribution, axis=1).mean()
            assert values["output_norm"][0, layer, h] == pytest.approx(norm, rel=1e-5)
            assert values["pr_z"][0, layer, h] == pytest.approx(svd_pr(zh), rel=1e-6)


# ---------------------------------------------------------------------------- saliency
def test_saliency_equals_independent_autograd(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    path = write_prompts(tmp_path, n_per_group=2)
    run_dir, _, _ = run_saliency(
        SaliencyConfig(
            prompts=str(path),
            groups=["L5"],
            measure_layers=[EARLY, LATE],
            window=WINDOW,
            batch_size=1,
            n_boot=200,
        ),
        out=tmp_path / "s",
        lm=lm,
    )
    results = pd.read_csv(run_dir / "results.csv")
    assert (results[results.layer >= LATE]["saliency"] == 0).all()
    model, d_head = lm.model, lm.adapter.d_head
    layers = model.model.layers
    for p, text in enumerate(texts_of(path, "L5")):
        leaf, captured = {}, {}

        def make_leaf(module, args, leaf=leaf):
            leaf["z"] = args[0].detach().requires_grad_(True)
            return (leaf["z"],)

        handles = [
            layers[1].self_attn.o_proj.register_forward_pre_hook(make_leaf),
            layers[LATE].self_attn.v_proj.register_forward_hook(
                lambda m, a, o, store=captured: store.__setitem__("late", o[0])
            ),
            layers[EARLY].self_attn.v_proj.register_forward_hook(
                lambda m, a, o, store=captured: store.__setitem__("early", o[0])
            ),
        ]
        with torch.enable_grad():
            model(input_ids=ids(text), use_cache=False)
        for h in handles:
            h.remove()

        def pr(v):  # (T, Hkv*D) -> mean per-head PR of the last W rows, float64 torch
            win = v[-WINDOW:].double().unflatten(-1, (-1, d_head)).transpose(0, 1)  # (Hkv, W, D)
            gram = win @ win.mT
            return (
                gram.diagonal(dim1=-2, dim2=-1).sum(-1) ** 2 / gram.square().sum((-2, -1))
            ).mean()

        (pr(captured["late"]) / pr(captured["early"])).backward()
        grad = leaf["z"].grad[0]  # (T, H*D)
        pid = f"L5_{p}"
        for h in range(lm.adapter.n_heads):
            expected = grad[:, h * d_head : (h + 1) * d_head].norm().item()
            got = results[
                (results.prompt_id == pid) & (results.layer == 1) & (results["head"] == h)
            ]
            assert got["saliency"].iloc[0] == pytest.approx(expected, rel=1e-4)


# ---------------------------------------------------------------------------- attribution
def test_attribution_against_sweep_same_command_and_finished_run(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    path = write_prompts(tmp_path)
    common = dict(
        prompts=str(path), groups=["L5"], measure_layers=[EARLY, LATE], window=WINDOW, n_boot=200
    )
    sweep_dir, _, _ = run_head_sweep(AblationConfig(**common), out=tmp_path / "sweep", lm=lm)
    a_dir, _, a = run_attribution(AttributionConfig(**common), out=tmp_path / "a", lm=lm)
    b_dir, _, b = run_attribution(
        AttributionConfig(**common, from_sweep=str(sweep_dir)), out=tmp_path / "b", lm=lm
    )
    assert a["spearman_r"] == pytest.approx(b["spearman_r"])
    heads = pd.read_csv(a_dir / "heads.csv")
    sweep_heads = pd.read_csv(sweep_dir / "heads.csv")
    merged = heads.merge(sweep_heads, on=["layer", "head"])
    np.testing.assert_allclose(merged["exact_mean"], merged["mean_impact"], rtol=1e-6, atol=1e-12)
    from scipy.stats import spearmanr

    computed = heads[heads.computed]
    expected = spearmanr(computed["attribution_mean"], computed["exact_mean"]).statistic
    assert a["spearman_r"] == pytest.approx(expected)
    with pytest.raises(ConfigError, match="window"):
        run_attribution(
            AttributionConfig(**{**common, "window": 3}, from_sweep=str(sweep_dir)),
            out=tmp_path / "never",
            lm=lm,
        )
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------------------- patching
def test_patching_a_head_from_a_prompt_into_itself_changes_nothing() -> None:
    lm = tiny_lm("llama")
    text = "5 9 3 7 1 8 2 6 4"
    clean = reference_r_v(lm.model, text)
    specs = [PatchSpec(1, "z", (2, 3)), PatchSpec(0, "z", (0,))]
    for positions in ("window", "all"):
        rv, _ = patched_r_v(lm, text, text, specs, EARLY, LATE, WINDOW, "per-head", positions)
        assert rv == pytest.approx(clean, rel=1e-6)


def test_full_residual_patch_makes_later_v_the_sources() -> None:
    lm = tiny_lm("llama")
    source, target = "5 9 3 7 1 8 2 6 4", "4 4 6 1 9 2 7 3 5"
    _, windows = patched_r_v(
        lm, source, target, [PatchSpec(1, "resid_pre")], EARLY, LATE, WINDOW, "per-head", "all"
    )
    v_late = {}
    h = lm.model.model.layers[LATE].self_attn.v_proj.register_forward_hook(
        lambda m, a, o: v_late.__setitem__("v", o[0])
    )
    with torch.no_grad():
        lm.model(input_ids=ids(source), use_cache=False)
    h.remove()
    expected = v_late["v"][-WINDOW:].unflatten(-1, (lm.adapter.n_kv_heads, -1))  # (W, Hkv, D)
    torch.testing.assert_close(windows["late"][0], expected, rtol=1e-5, atol=1e-6)
    assert circularity([PatchSpec(1, "resid_pre")], EARLY, LATE, every_position=True).circular


def test_window_patch_aligns_from_the_end() -> None:
    """Patching z of every head at the window positions from a longer source: the target's
    window rows of z equal the source's last W rows of z."""
    lm = tiny_lm("llama")
    source, target = "5 9 3 7 1 8 2 6 4 2 2", "4 4 6 1 9 2 7"
    layers = lm.model.model.layers
    seen = {}

    def grab(module, args, output):  # a forward hook sees the input after every pre-hook edit
        seen.setdefault("z", []).append(args[0][0].detach())

    h = layers[1].self_attn.o_proj.register_forward_hook(grab)
    try:
        patched_r_v(
            lm,
            source,
            target,
            [PatchSpec(1, "z", (0, 1, 2, 3))],
            EARLY,
            LATE,
            WINDOW,
            "per-head",
            "window",
        )
        with torch.no_grad():
            lm.model(input_ids=ids(target), use_cache=False)
    finally:
        h.remove()
    src_z, patched_z, clean_target_z = seen["z"]  # source run, patched target, clean target
    torch.testing.assert_close(patched_z[-WINDOW:], src_z[-WINDOW:])
    torch.testing.assert_close(patched_z[:-WINDOW], clean_target_z[:-WINDOW])


def test_circular_patches_are_named() -> None:
    assert circularity([PatchSpec(LATE, "v")], EARLY, LATE, False).circular
    assert circularity([PatchSpec(LATE - 1, "resid_post")], EARLY, LATE, False).circular
    assert circularity([PatchSpec(EARLY, "resid_pre")], EARLY, LATE, False).circular
    assert not circularity([PatchSpec(1, "resid_pre")], EARLY, LATE, False).circular
    assert not circularity([PatchSpec(1, "z", (2,))], EARLY, LATE, True).circular
    late_z = circularity([PatchSpec(LATE, "z", (1,))], EARLY, LATE, False)
    assert late_z.no_effect and not late_z.circular


def test_patching_run_reports_circularity_instead_of_transfer(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    path = write_prompts(tmp_path)
    common = dict(prompts=str(path), measure_layers=[EARLY, LATE], window=WINDOW, n_boot=200)
    run_dir, _, headline = run_patching(
        PatchConfig(**common, layers=[LATE], point="v"), out=tmp_path / "circ", lm=lm
    )
    assert np.isnan(headline["transfer_pct"]) and "circular" in headline["note"]
    assert "circular patch" in (run_dir / "summary.md").read_text()
    run_dir, _, headline = run_patching(
        PatchConfig(**common, heads="1.2"), out=tmp_path / "head", lm=lm
    )
    results = pd.read_csv(run_dir / "results.csv")
    for row, (s, t) in zip(
        results.itertuples(),
        zip(texts_of(path, "L5"), texts_of(path, "factual"), strict=True),
        strict=True,
    ):
        assert row.r_v_target == pytest.approx(reference_r_v(lm.model, t), rel=1e-5)
        assert row.r_v_source == pytest.approx(reference_r_v(lm.model, s), rel=1e-5)
    assert not results["circular"].any()
    with pytest.raises(PromptError, match="different lengths"):
        run_patching(PatchConfig(**common, heads="1.2", positions="all"), out=tmp_path / "n", lm=lm)
    assert not (tmp_path / "n").exists()


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2"])
def test_batched_patching_equals_one_pair_at_a_time(family: str) -> None:
    from rloop.experiments.patch import patched_r_v_batch

    lm = tiny_lm(family)
    pairs = [
        ("5 9 3 7 1 8 2 6 4 2 2", "4 4 6 1 9 2 7"),  # longer source
        ("3 1 4 1 5 9 2", "2 7 1 8 2 8 1 8 2 8"),  # longer target
        ("6 2 8 3 1 8 5 3", "9 9 8 7 6 5 4 3"),  # equal lengths
    ]
    cases = [
        [PatchSpec(1, "z", (0, 2)), PatchSpec(0, "v", (1,))],
        [PatchSpec(1, "resid_pre")],
        [PatchSpec(0, "attn_out"), PatchSpec(1, "mlp_out")],
    ]
    for specs in cases:
        batched, windows = patched_r_v_batch(lm, pairs, specs, EARLY, LATE, WINDOW, "per-head")
        for i, (source, target) in enumerate(pairs):
            single, single_windows = patched_r_v(
                lm, source, target, specs, EARLY, LATE, WINDOW, "per-head"
            )
            assert batched[i] == pytest.approx(single, rel=1e-5)
            torch.testing.assert_close(
                windows["late"][i], single_windows["late"][0], rtol=1e-4, atol=1e-5
            )
    with pytest.raises(PromptError, match="pair 0: source has 11 tokens and target 7"):
        patched_r_v_batch(lm, pairs, cases[0], EARLY, LATE, WINDOW, "per-head", "all")
