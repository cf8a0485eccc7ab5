"""The compiled head sweep (``compile=True``) equals the eager sweep, with few compilations.

Inductor (real code generation) is exercised on two families with prompts of mixed lengths in
one chunk; the chunk-shape and recompilation behaviour is checked with dynamo's ``aot_eager``
backend (same tracing, guards and recompilations, no C++ compile), which keeps those tests fast.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from rloop.adapters import adapter_for
from rloop.capture.batching import EncodedBatch
from rloop.errors import ConfigError
from rloop.experiments.ablate import run_head_sweep
from rloop.interventions import head_sweep as hs
from rloop.interventions.edits import mean_activations
from rloop.interventions.head_sweep import head_sweep, resolve_compile
from tests.test_ablation_experiment import _l5_config
from tests.tiny_models import VOCAB, WordTokenizer, tiny_lm, tiny_model

WINDOW = 4
MODES = ("per-head", "whole")


def _ragged_batch(lengths, seed: int = 11) -> EncodedBatch:
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)  # (P, T) right padded
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, VOCAB, (n,), generator=gen)
        mask[i, :n] = 1
    return EncodedBatch(ids, mask, list(lengths))


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture
def backend(monkeypatch):
    """Fresh dynamo caches; returns a setter of the compile backend for the test."""
    torch._dynamo.reset()

    def use(name: str) -> None:
        monkeypatch.setattr(hs, "COMPILE_OPTIONS", {"backend": name})

    yield use
    torch._dynamo.reset()


def _assert_same_sweep(got, ref, rtol: float) -> None:
    assert got.computed_layers == ref.computed_layers
    for m in ref.pr_late:
        torch.testing.assert_close(got.pr_late[m], ref.pr_late[m], rtol=rtol, atol=0)
        torch.testing.assert_close(got.pr_early[m], ref.pr_early[m], rtol=rtol, atol=0)
        assert torch.equal(got.clean_late[m], ref.clean_late[m])  # same eager clean forward
    if ref.kl is not None:
        torch.testing.assert_close(got.kl, ref.kl, rtol=1e-4, atol=1e-7)


def _has_cxx() -> bool:
    return any(shutil.which(c) for c in (os.environ.get("CXX") or "", "g++", "c++", "clang++"))


@pytest.mark.slow
@pytest.mark.skipif(not _has_cxx(), reason="inductor on the CPU needs a C++ compiler")
@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_inductor_sweep_equals_eager(family: str, backend) -> None:
    backend("inductor")
    model = tiny_model(family)
    adapter = adapter_for(model)
    # Mixed lengths in one chunk: rows are right-padded to 13, then to 16 columns (a multiple
    # of COMPILE_WIDTH_STEP) in the compiled path; one shape, so one compilation.
    batch = _ragged_batch((9, 13, 7))
    layers, early, late = [0, 1, 2], 1, 2
    kl = family == "gpt_neox"  # kl runs the blocks past the late layer compiled too
    ref = head_sweep(model, adapter, batch, layers, early, late, WINDOW, modes=MODES, kl=kl)
    before = _graphs()
    got = head_sweep(
        model, adapter, batch, layers, early, late, WINDOW, modes=MODES, kl=kl, compile=True
    )
    assert _graphs() - before == 1  # one graph shared by every block of the model
    _assert_same_sweep(got, ref, rtol=1e-5)
    # The ablation really happened: ablated R_V differs from clean for most heads.
    moved = (got.pr_late["per-head"][0] - got.clean_late["per-head"]).abs() > 1e-6
    assert moved.float().mean() > 0.5


def test_chunk_shapes_compile_a_bounded_number_of_graphs(backend) -> None:
    backend("aot_eager")
    model = tiny_model("gpt_neox")
    adapter = adapter_for(model)
    # Widths 4..23 fall in three buckets of 8 columns; max_rows=3 gives chunks of 4, 3, 2
    # of 2 rows: several (rows, width) shapes.
    batch = _ragged_batch((4, 6, 9, 11, 15, 17, 20, 23))
    before = _graphs()
    ref = head_sweep(model, adapter, batch, [0, 1, 2], 1, 2, WINDOW, modes=MODES, max_rows=3)
    got = head_sweep(
        model, adapter, batch, [0, 1, 2], 1, 2, WINDOW, modes=MODES, max_rows=3, compile=True
    )
    first = _graphs() - before
    # The first shape compiles statically, the first change recompiles with dynamic sizes,
    # which then serves every later shape (a 1-row chunk could add one specialised graph).
    assert 1 <= first <= 3
    _assert_same_sweep(got, ref, rtol=1e-5)
    # Another measurement-layer setting and another layer list reuse the graphs.
    ref2 = head_sweep(model, adapter, batch, [0, 1], 0, 2, WINDOW, modes=MODES, max_rows=3)
    got2 = head_sweep(
        model, adapter, batch, [0, 1], 0, 2, WINDOW, modes=MODES, max_rows=3, compile=True
    )
    assert _graphs() - before == first
    _assert_same_sweep(got2, ref2, rtol=1e-5)


def test_compiled_mean_ablation_of_kv_groups_equals_eager(backend) -> None:
    backend("aot_eager")
    model = tiny_model("llama")
    adapter = adapter_for(model)
    texts = [" ".join(str(t) for t in range(3, 3 + n)) for n in (6, 9, 5)]
    mean_z = mean_activations(model, adapter, WordTokenizer(), texts, [0, 1], "z")
    batch = _ragged_batch((10, 8, 12))
    kwargs = {"unit": "kv_group", "mean_z": mean_z, "max_rows": 3}
    ref = head_sweep(model, adapter, batch, [0, 1], 1, 2, WINDOW, **kwargs)
    got = head_sweep(model, adapter, batch, [0, 1], 1, 2, WINDOW, compile=True, **kwargs)
    _assert_same_sweep(got, ref, rtol=1e-5)


def test_a_block_holding_a_hook_runs_eagerly_and_the_model_is_restored(backend) -> None:
    """dynamo does not guard on hooks: a hook inside a compiled block would be skipped
    silently. Such a block must run eagerly (the hook fires); afterwards the model holds
    its own modules and forwards again."""
    backend("aot_eager")
    model = tiny_model("gpt2")
    adapter = adapter_for(model)
    batch = _ragged_batch((9, 12, 7))
    types_before = [(name, type(m)) for name, m in model.named_modules()]
    ref = head_sweep(model, adapter, batch, [0, 1, 2], 1, 2, WINDOW)
    calls = []
    mlp = adapter.module_for(model, 1, "mlp_out")
    handle = mlp.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        got = head_sweep(model, adapter, batch, [0, 1, 2], 1, 2, WINDOW, compile=True)
    finally:
        handle.remove()
    # Block 1 runs (unhooked or not) in the clean forward and in the layer-0 and layer-1
    # forwards: 1 + 2 * (number of chunks, here 1).
    assert len(calls) == 3
    _assert_same_sweep(got, ref, rtol=1e-5)
    assert [(name, type(m)) for name, m in model.named_modules()] == types_before
    assert not any("forward" in vars(block) for block in adapter.blocks(model))

    def fail(layer: int) -> None:
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        head_sweep(model, adapter, batch, [0, 1], 1, 2, WINDOW, compile=True, on_layer=fail)
    assert [(name, type(m)) for name, m in model.named_modules()] == types_before
    assert not any("forward" in vars(block) for block in adapter.blocks(model))


def test_compile_setting_defaults_and_refusals(monkeypatch) -> None:
    assert resolve_compile(None, "cpu") is False
    assert resolve_compile(None, torch.device("cuda")) is False  # until measured on a GPU
    assert resolve_compile(True, "cpu") is True
    assert resolve_compile(False, "cuda") is False
    model = tiny_model("llama")
    adapter = adapter_for(model)
    batch = _ragged_batch((6, 8))
    block = adapter.blocks(model)[1]
    block.forward = block.forward  # what accelerate's dispatch hooks do
    try:
        with pytest.raises(ConfigError, match="block 1 has a replaced forward"):
            head_sweep(model, adapter, batch, [0], 1, 2, WINDOW, compile=True)
        # Where compile=None means "on", such a model falls back to the eager sweep.
        monkeypatch.setattr(hs, "COMPILE_BY_DEFAULT", {"cpu": True})
        assert resolve_compile(None, "cpu") is True
        result = head_sweep(model, adapter, batch, [0], 1, 2, WINDOW, compile=None)
        ref = head_sweep(model, adapter, batch, [0], 1, 2, WINDOW, compile=False)
        assert torch.equal(result.pr_late["per-head"], ref.pr_late["per-head"])
    finally:
        del block.forward


def test_ablate_experiment_compiled_equals_eager_and_records_it(backend, tmp_path, monkeypatch):
    """`rloop ablate --compile` (AblationConfig.compile): the same tables as the eager run to
    float32 rounding, the same run identity (config hash), and the manifest says it compiled.
    A model that cannot be compiled is refused before the run directory exists."""
    backend("aot_eager")
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    eager_config = _l5_config(tmp_path)
    compiled_config = _l5_config(tmp_path, compile=True)
    assert compiled_config.to_dict() == eager_config.to_dict()
    eager_dir, _, _ = run_head_sweep(eager_config, out=tmp_path / "eager", lm=lm)
    compiled_dir, _, _ = run_head_sweep(compiled_config, out=tmp_path / "compiled", lm=lm)
    eager = pd.read_parquet(eager_dir / "results.parquet")
    compiled = pd.read_parquet(compiled_dir / "results.parquet")
    assert list(compiled.columns) == list(eager.columns) and len(compiled) == len(eager)
    np.testing.assert_allclose(compiled["r_v_ablated"], eager["r_v_ablated"], rtol=1e-5)
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (eager_dir, compiled_dir)]
    assert [m["compiled"] for m in manifests] == [False, True]
    assert manifests[0]["config_hash"] == manifests[1]["config_hash"]

    block = lm.adapter.blocks(lm.model)[0]
    block.forward = block.forward  # what accelerate's dispatch hooks do
    try:
        with pytest.raises(ConfigError, match="--compile: .*block 0 has a replaced forward"):
            run_head_sweep(compiled_config, out=tmp_path / "refused", lm=lm, force=True)
        assert not (tmp_path / "refused").exists()
    finally:
        del block.forward
