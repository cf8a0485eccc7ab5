"""``rloop verify``: every check passes on a correct model of every family, and the checks
catch deliberately broken adapters (a wrong fused layout, V read from the key projection)."""

from __future__ import annotations

import dataclasses
import json
import math

import pandas as pd
import pytest
import torch

from rloop.adapters.base import FusedQKV, PointSpec
from rloop.errors import ConfigError, PromptError, RloopError
from rloop.experiments.verify import (
    CHECKS,
    FAIL,
    PASS,
    SKIP,
    Tolerance,
    VerificationError,
    VerifyConfig,
    compare,
    recompute_attention,
    require_verified,
    run_verify,
    sample_heads,
    select_prompts,
    verify_model,
)
from rloop.prompts import Prompt, PromptSet
from tests.tiny_models import FAMILIES, tiny_lm

LENGTHS = (17, 22, 28, 35)  # token counts of the tiny prompts (window 16)
CONFIG = VerifyConfig(model="tiny", window=16, max_new_tokens=6, heads_sample=3, seed=0)


def tiny_texts(lengths=LENGTHS) -> list[str]:
    """Word-tokenizer prompts: whitespace-separated token ids (1..96, no pad id 0)."""
    gen = torch.Generator().manual_seed(11)
    return [
        " ".join(str(int(t)) for t in torch.randint(1, 97, (n,), generator=gen)) for n in lengths
    ]


def by_check(checks: pd.DataFrame) -> dict[str, dict]:
    return {row["check"]: row for row in checks.to_dict(orient="records")}


# Checks known to fail on a correct tiny model of a family (none: Gemma-3's sliding-window
# caches, window 8 < the 16-34 token memories, are mixed on the columns they cache).
KNOWN_FAILURES: dict[str, dict[str, str]] = {}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_check_passes_on_a_correct_tiny_model(family: str) -> None:
    checks = verify_model(tiny_lm(family), CONFIG, tiny_texts())
    assert list(checks["check"]) == list(CHECKS)
    rows = by_check(checks)
    assert rows["dtype_drift"]["status"] == SKIP
    assert "float32" in rows["dtype_drift"]["reason"]
    known = KNOWN_FAILURES.get(family, {})
    for name, words in known.items():
        assert rows[name]["status"] == FAIL and words in rows[name]["reason"]
    for name in [c for c in CHECKS[:-1] if c not in known]:
        row = rows[name]
        assert row["status"] == PASS, (name, row["reason"])
        assert row["dtype"] == "float32"
        assert row["max_rel_error"] <= row["tolerance"] + 1e-12
        assert row["tolerance"] == 1e-4 and row["atol"] == 1e-5
    # hooks that only read, identity edits and the alpha end points are exact
    for name in ("hooked_forward", "identity_edit", "kv_mix_alpha0", "kv_mix_alpha1"):
        if name in known:
            continue
        assert rows[name]["max_abs_error"] == 0.0, name


def _broken_v(lm, spec: PointSpec):
    adapter = dataclasses.replace(lm.adapter, points={**lm.adapter.points, "v": spec})
    return dataclasses.replace(lm, adapter=adapter)


def test_gpt2_layout_for_neox_fails_the_attention_check() -> None:
    lm = tiny_lm("gpt_neox")
    assert lm.adapter.spec("v").fused == FusedQKV("heads_interleaved")
    broken = _broken_v(lm, PointSpec("attention.query_key_value", "output", FusedQKV("blocks")))
    rows = by_check(verify_model(broken, CONFIG, tiny_texts()))
    attention = rows["attention_recompute"]
    assert attention["status"] == FAIL
    assert attention["max_rel_error"] > 0.1  # O(1), not a rounding difference
    assert "exceeds" in attention["reason"]


def test_v_read_from_the_key_projection_fails_the_attention_check() -> None:
    lm = tiny_lm("llama")
    broken = _broken_v(lm, PointSpec("self_attn.k_proj", "output"))
    rows = by_check(verify_model(broken, CONFIG, tiny_texts()))
    assert rows["attention_recompute"]["status"] == FAIL
    assert rows["attention_recompute"]["max_rel_error"] > 0.1
    # the same wrong V is still read consistently: padding and caching checks cannot see it
    assert rows["batched_r_v"]["status"] == PASS


def test_recompute_attention_matches_a_hand_computed_head() -> None:
    """One batch row, T = 3, GQA (4 query heads on 2 KV heads), against explicit sums."""
    lm = tiny_lm("llama")
    adapter = lm.adapter
    gen = torch.Generator().manual_seed(5)
    weights = torch.softmax(torch.randn(1, 4, 3, 3, generator=gen), dim=-1)  # (B, H, T, T)
    v = torch.randn(1, 3, 2, adapter.d_head, generator=gen)  # (B, T, Hkv, D)
    z, out = recompute_attention(lm.model, adapter, 1, weights, v)
    for h in range(4):
        kv = h // 2
        for t in range(3):
            expected = sum(weights[0, h, t, s] * v[0, s, kv] for s in range(3))  # (D,)
            torch.testing.assert_close(z[0, t, h], expected, atol=1e-6, rtol=1e-6)
    o_proj = lm.model.model.layers[1].self_attn.o_proj
    reference = z.flatten(-2) @ o_proj.weight.T  # (B, T, d_model), Llama o_proj has no bias
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=1e-6)


def test_compare_against_hand_computed_errors() -> None:
    tol = Tolerance(rtol=1e-2, atol=0.0)
    want = torch.tensor([10.0, -4.0, 0.0], dtype=torch.float64)
    got = torch.tensor([10.05, -4.0, 0.02], dtype=torch.float64)
    result = compare(got, want, tol)
    assert result.max_abs == pytest.approx(0.05)
    assert result.max_rel == pytest.approx(0.05 / 10.0)
    assert result.passed  # 0.05 <= 1e-2 * 10
    assert not result.bit_identical
    # elementwise: the 0.02 on a zero reference is an infinite relative error
    each = compare(got, want, tol, elementwise=True)
    assert not each.passed and math.isinf(each.max_rel)
    assert compare(want, want.clone(), tol).bit_identical
    nan = compare(torch.tensor([math.nan]), torch.tensor([1.0]), tol)
    assert not nan.passed and not nan.finite
    with pytest.raises(ConfigError, match="cannot compare"):
        compare(torch.zeros(2), torch.zeros(3), tol)


def test_select_prompts_spreads_lengths_and_rejects_too_short() -> None:
    lm = tiny_lm("llama")
    lengths = (5, 16, 30, 18, 40, 25, 16)
    texts = tiny_texts(lengths)
    prompts = [Prompt(id=f"p{i}", group="user", family="user", text=t) for i, t in enumerate(texts)]
    prompt_set = PromptSet(prompts, "test", None, "0" * 64)
    chosen = select_prompts(prompt_set, lm.tokenizer, 4, 16)
    # eligible by (length, id): p1 16, p6 16, p3 18, p5 25, p2 30, p4 40 -> ranks 0, 2, 3, 5
    assert [p.id for p in chosen] == ["p1", "p3", "p5", "p4"]
    with pytest.raises(PromptError, match="at least 2 prompts of at least 41 tokens"):
        select_prompts(prompt_set, lm.tokenizer, 4, 41)


def test_sample_heads_is_seeded_and_in_range() -> None:
    adapter = tiny_lm("llama").adapter
    heads = sample_heads(adapter, 3, seed=0)
    assert heads == sample_heads(adapter, 3, seed=0)
    assert len(set(heads)) == 3
    assert all(0 <= layer < 3 and 0 <= head < 4 for layer, head in heads)
    assert len(sample_heads(adapter, 100, seed=1)) == 12  # every (layer, head) once


def test_bfloat16_model_reports_drift_against_float32() -> None:
    lm = tiny_lm("llama")
    lm.model.to(torch.bfloat16)
    lm.dtype = torch.bfloat16
    rows = by_check(verify_model(lm, CONFIG, tiny_texts()))
    drift = rows["dtype_drift"]
    assert drift["dtype"] == "bfloat16"
    assert all(row["status"] == PASS for row in rows.values()), rows
    assert "SCIENCE.md §7" in drift["detail"]
    assert drift["tolerance"] == 5e-2
    assert 0 < drift["max_rel_error"] < 1  # a real, finite, non-zero drift was measured
    assert rows["hooked_forward"]["tolerance"] == 2e-2
    assert next(lm.model.parameters()).dtype == torch.bfloat16  # the model is left as it was


def test_the_model_is_left_as_it_was() -> None:
    """An sdpa model is switched to eager attention for the weights and switched back; no
    rloop hook stays registered and no weight is changed."""
    from rloop.adapters import adapter_for
    from tests.tiny_models import TinyLM, WordTokenizer, tiny_model

    model = tiny_model("gpt2", attn="sdpa")
    lm = TinyLM(model, WordTokenizer(), adapter_for(model))
    before = {name: p.clone() for name, p in model.named_parameters()}
    rows = by_check(verify_model(lm, CONFIG, tiny_texts()))
    assert rows["attention_recompute"]["status"] == PASS
    assert model.config._attn_implementation == "sdpa"
    # transformers installs its own output-capturing hooks when attention weights are first
    # asked for; none of rloop's may stay
    hooks = [
        h
        for m in model.modules()
        for h in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
    ]
    assert not [h for h in hooks if h.__module__.startswith("rloop")]
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_bad_settings_and_short_prompts() -> None:
    lm = tiny_lm("llama")
    with pytest.raises(ConfigError, match="at least 2 prompts"):
        verify_model(lm, dataclasses.replace(CONFIG, n_prompts=1), tiny_texts())
    with pytest.raises(ConfigError, match="window"):
        verify_model(lm, dataclasses.replace(CONFIG, window=1), tiny_texts())
    with pytest.raises(PromptError, match="row 0 has 17 real tokens"):
        verify_model(lm, dataclasses.replace(CONFIG, window=20), tiny_texts())


def _prompt_file(tmp_path) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(tiny_texts()) + "\n")
    return str(path)


def test_run_verify_writes_a_complete_record(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    config = dataclasses.replace(CONFIG, prompts=_prompt_file(tmp_path))
    run_dir, already, headline = run_verify(config, out=tmp_path / "run", lm=tiny_lm("gpt2"))
    assert not already
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["experiment"] == "verify"
    assert "checks" in manifest["tables"]
    assert manifest["verify"]["wall_seconds"] > 0
    assert manifest["verify"]["tolerance"] == {"rtol": 1e-4, "atol": 1e-5}
    checks = pd.read_csv(run_dir / "checks.csv")
    assert list(checks["check"]) == list(CHECKS)
    assert set(checks["status"]) == {PASS, SKIP}
    assert headline["all_pass"] and headline["n_fail"] == 0 and headline["n_pass"] == 8
    assert "all checks pass" in (run_dir / "summary.md").read_text()
    again = run_verify(config, out=tmp_path / "run", lm=tiny_lm("gpt2"))
    assert again[1] is True


def test_run_verify_records_failures_and_require_verified_raises(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    broken = _broken_v(lm, PointSpec("self_attn.k_proj", "output"))
    config = dataclasses.replace(CONFIG, prompts=_prompt_file(tmp_path))
    run_dir, _, headline = run_verify(config, out=tmp_path / "run", lm=broken)
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "complete"
    checks = pd.read_csv(run_dir / "checks.csv")
    assert checks.set_index("check").loc["attention_recompute", "status"] == FAIL
    assert not headline["all_pass"] and headline["status:attention_recompute"] == FAIL
    with pytest.raises(VerificationError, match="attention_recompute") as err:
        require_verified(broken, config, tiny_texts())
    assert isinstance(err.value, RloopError)
    assert "\n" not in str(err.value)
    table = require_verified(lm, config, tiny_texts())
    assert (table["status"] != FAIL).all()


@pytest.mark.slow
def test_embedded_model_passes_every_check(tmp_path, monkeypatch) -> None:
    from rloop.models import load_model

    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = load_model("smollm2-135m", device="cpu")
    run_dir, _, headline = run_verify(VerifyConfig(), out=tmp_path / "run", lm=lm)
    checks = pd.read_csv(run_dir / "checks.csv")
    assert set(checks["status"]) == {PASS, SKIP}
    assert checks.set_index("check").loc["dtype_drift", "status"] == SKIP  # float32 on CPU
    assert headline["all_pass"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["verify"]["wall_seconds"] > 0
    assert len(manifest["verify"]["prompt_ids"]) == 4
