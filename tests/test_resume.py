"""Interrupted runs resume through the shared runner: every experiment saves each finished
unit (layers, prompt batches, generation chunks) and a rerun of the same command computes only
the rest, giving the same tables as a fresh run, with the progress bar starting at what was
already done."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import contextmanager

import pandas as pd
import pytest

import rloop.experiments.ablate as ablate_module
import rloop.experiments.ablate_layer as ablate_layer_module
import rloop.experiments.attribution as attribution_module
import rloop.experiments.heads as heads_module
import rloop.experiments.patch as patch_module
import rloop.experiments.runner as runner_module
import rloop.experiments.saliency as saliency_module
import rloop.experiments.temporal as temporal_module
from rloop.experiments.ablate import run_head_sweep
from rloop.experiments.ablate_layer import LayerAblationConfig, run_layer_ablation
from rloop.experiments.attribution import AttributionConfig, run_attribution
from rloop.experiments.heads import HeadDiagnosticsConfig, run_head_diagnostics
from rloop.experiments.patch import PatchConfig, run_patching
from rloop.experiments.temporal import TemporalConfig, run_temporal
from tests.test_ablation_experiment import _l5_config, _prompt_file
from tests.test_causal_experiments import write_prompts
from tests.test_validate import _prompt_file as _two_group_prompt_file
from tests.test_validate import _tiny
from tests.tiny_models import tiny_lm


def _interrupt_on_call(monkeypatch, module, name: str, on_call: int) -> list:
    """Make ``module.name`` raise KeyboardInterrupt on call number ``on_call``; count calls."""
    real = getattr(module, name)
    calls: list = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == on_call:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the run
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def _sorted_csv(path, keys) -> pd.DataFrame:
    return pd.read_csv(path).sort_values(keys, ignore_index=True)


def test_interrupted_head_sweep_resumes_equal_to_a_fresh_run(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    monkeypatch.setattr(ablate_module, "LAYERS_PER_UNIT", 1)  # 3 layers -> 3 checkpoints
    lm = tiny_lm("llama")
    config = _l5_config(tmp_path)
    out = tmp_path / "run"
    _interrupt_on_call(monkeypatch, ablate_module, "head_sweep", on_call=3)
    with pytest.raises(KeyboardInterrupt):
        run_head_sweep(config, out=out, lm=lm)
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"
    assert len(list((out / "partial").glob("*.parquet"))) == 2

    monkeypatch.undo()
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    monkeypatch.setattr(ablate_module, "LAYERS_PER_UNIT", 1)
    calls = _interrupt_on_call(monkeypatch, ablate_module, "head_sweep", on_call=0)
    run_head_sweep(config, out=out, lm=lm)
    assert len(calls) == 1  # only the unfinished layer is computed again
    fresh_dir, _, _ = run_head_sweep(config, out=tmp_path / "fresh", lm=lm)
    keys = ["prompt_id", "layer", "head"]
    pd.testing.assert_frame_equal(
        _sorted_csv(out / "results.csv", keys), _sorted_csv(fresh_dir / "results.csv", keys)
    )
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "heads.csv"), pd.read_csv(fresh_dir / "heads.csv")
    )


def test_interrupted_patching_resumes_equal_to_a_fresh_run(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    config = PatchConfig(
        prompts=str(_prompt_file(tmp_path, n=4)),
        heads="1.2",
        measure_layers=[1, 2],
        window=5,
        n_boot=200,
        batch_size=1,
    )
    out = tmp_path / "run"
    _interrupt_on_call(monkeypatch, patch_module, "patched_r_v_batch", on_call=3)
    with pytest.raises(KeyboardInterrupt):
        run_patching(config, out=out, lm=lm)
    assert len(list((out / "partial").glob("*.parquet"))) == 2

    monkeypatch.undo()
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    calls = _interrupt_on_call(monkeypatch, patch_module, "patched_r_v_batch", on_call=0)
    run_patching(config, out=out, lm=lm)
    assert len(calls) == 2  # 4 pairs, one per chunk, 2 were done
    fresh_dir, _, _ = run_patching(config, out=tmp_path / "fresh", lm=lm)
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "results.csv"), pd.read_csv(fresh_dir / "results.csv")
    )


# ------------------------------------------------------------ every experiment's main loop
def _record_bars(monkeypatch) -> list[dict]:
    """Replace the runner's progress bar with one that records its label, total and steps."""
    bars: list[dict] = []

    @contextmanager
    def recording_bar(label: str, total: int):
        bar = {"label": label, "total": total, "steps": []}
        bars.append(bar)
        yield bar["steps"].append

    monkeypatch.setattr(runner_module, "progress_bar", recording_bar)
    return bars


def _kill_then_resume(
    monkeypatch, module, name: str, on_call: int, start: Callable[[], object], out,
    checkpoints: int | None = None,
) -> tuple[list, list[dict]]:  # fmt: skip
    """Run ``start()`` with ``module.name`` interrupted on call ``on_call``, check the run is
    left ``failed`` with ``checkpoints`` (default ``on_call - 1``) saved units, then run it
    again; returns the calls of the rerun and its progress bars."""
    real = getattr(module, name)
    _interrupt_on_call(monkeypatch, module, name, on_call)
    with pytest.raises(KeyboardInterrupt):
        start()
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"
    saved = on_call - 1 if checkpoints is None else checkpoints
    assert len(list((out / "partial").glob("*.parquet"))) == saved
    monkeypatch.setattr(module, name, real)
    calls = _interrupt_on_call(monkeypatch, module, name, on_call=0)
    bars = _record_bars(monkeypatch)
    start()
    monkeypatch.setattr(module, name, real)
    monkeypatch.setattr(runner_module, "progress_bar", runner_module.progress_bar)
    return calls, bars


def _same_bytes(resumed, fresh, *tables: str) -> None:
    for table in tables:
        assert (resumed / table).read_bytes() == (fresh / table).read_bytes(), table


def test_interrupted_generation_resumes_equal_to_a_fresh_run(tmp_path, monkeypatch) -> None:
    """temporal, with seeded sampling: 6 prompts in 3 generation chunks, killed in the 2nd."""
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = _tiny("llama")
    config = TemporalConfig(
        prompts=str(_two_group_prompt_file(tmp_path, n=3)), groups=["rec", "base"],
        layers=[0, 2], window=4, max_new_tokens=6, batch_size=2, temperature=1.0, seed=5,
    )  # fmt: skip
    out = tmp_path / "run"
    calls, bars = _kill_then_resume(
        monkeypatch, temporal_module, "generate", 2, lambda: run_temporal(config, out=out, lm=lm),
        out,
    )  # fmt: skip
    assert len(calls) == 2  # the first chunk was not generated again
    assert bars[0]["total"] == 6 and bars[0]["steps"] == [2, 2, 2]  # starts at 2 of 6 done
    fresh, _, _ = run_temporal(config, out=tmp_path / "fresh", lm=lm)
    _same_bytes(out, fresh, "per_step.csv", "curves.csv")
    per_step = pd.read_csv(out / "per_step.csv")
    assert per_step["prompt_id"].nunique() == 6 and set(per_step["step"]) == set(range(7))


def test_interrupted_head_diagnostics_resume_equal_to_a_fresh_run(tmp_path, monkeypatch) -> None:
    """heads: 8 prompts in 4 batches of 2, killed in the 3rd batch."""
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    config = HeadDiagnosticsConfig(
        prompts=str(write_prompts(tmp_path)), window=4, n_boot=200, batch_size=2
    )
    out = tmp_path / "run"
    calls, bars = _kill_then_resume(
        monkeypatch, heads_module, "measure_heads_batch", 3,
        lambda: run_head_diagnostics(config, out=out, lm=lm), out,
    )  # fmt: skip
    assert len(calls) == 2
    assert bars[0]["total"] == 8 and bars[0]["steps"][0] == 4
    fresh, _, fresh_headline = run_head_diagnostics(config, out=tmp_path / "fresh", lm=lm)
    _same_bytes(out, fresh, "results.csv", "heads.csv")
    resumed_headline = json.loads((out / "manifest.json").read_text())["headline"]
    assert resumed_headline == fresh_headline


def test_interrupted_layer_ablation_resumes_equal_to_a_fresh_run(tmp_path, monkeypatch) -> None:
    """ablate-layer: 3 layers x 2 components, R_V L2/L0 (layer 2 is not computed), killed in
    the 3rd ablation."""
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    config = LayerAblationConfig(
        prompts=str(write_prompts(tmp_path)), layers=[0, 1, 2], components=["attn", "mlp"],
        measure_layers=[0, 2], window=4, n_boot=200,
    )  # fmt: skip
    out = tmp_path / "run"
    calls, bars = _kill_then_resume(
        monkeypatch, ablate_layer_module, "layer_ablation_r_v", 3,
        lambda: run_layer_ablation(config, out=out, lm=lm), out,
    )  # fmt: skip
    assert len(calls) == 2  # layer 1's two components; layer 0's were checkpointed
    assert bars[0]["total"] == 6 and bars[0]["steps"][0] == 2
    fresh, _, _ = run_layer_ablation(config, out=tmp_path / "fresh", lm=lm)
    _same_bytes(out, fresh, "results.csv", "summary.csv")


def test_interrupted_attribution_keeps_its_gradients(tmp_path, monkeypatch) -> None:
    """attribution: 2 gradient batches, then the exact sweep one layer per unit, killed in the
    sweep's 2nd layer: the rerun computes no gradient and only the 2 layers left."""
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    monkeypatch.setattr(attribution_module, "LAYERS_PER_UNIT", 1)
    lm = tiny_lm("llama")
    config = AttributionConfig(
        prompts=str(write_prompts(tmp_path)), groups=["L5"], measure_layers=[0, 2], window=4,
        n_boot=200, batch_size=2,
    )  # fmt: skip
    out = tmp_path / "run"
    gradients = _interrupt_on_call(monkeypatch, saliency_module, "head_gradients", on_call=0)
    calls, _ = _kill_then_resume(
        monkeypatch, attribution_module, "head_sweep", 2,
        lambda: run_attribution(config, out=out, lm=lm), out, checkpoints=2 + 1,
    )  # fmt: skip
    assert len(gradients) == 2  # both batches in the first session, none in the rerun
    assert len(calls) == 2
    fresh, _, _ = run_attribution(config, out=tmp_path / "fresh", lm=lm)
    _same_bytes(out, fresh, "results.csv", "heads.csv")
    timing = ["gradient_seconds", "exact_seconds"]
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "agreement.csv").drop(columns=timing),
        pd.read_csv(fresh / "agreement.csv").drop(columns=timing),
    )
