"""A run's identity uses the settings as resolved against the model: the default R_V layers
and the same layers given explicitly name one run (reused), other layers another."""

from __future__ import annotations

import pytest

from rloop.experiments.ablate import AblationConfig, run_head_sweep
from rloop.experiments.contraction import ContractionConfig, run_contraction
from rloop.experiments.runner import run_identity
from rloop.interventions.engine import resolve_layers
from tests.test_ablation_experiment import _l5_config, _prompt_file
from tests.tiny_models import tiny_lm


def test_explicit_default_layers_reuse_the_default_run(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    early, late, rule = resolve_layers(lm.adapter, None)
    assert rule  # the depth rule picked them
    default = _l5_config(tmp_path, measure_layers=None, window=4)
    first_dir, first_done, _ = run_head_sweep(default, lm=lm)
    explicit = _l5_config(tmp_path, measure_layers=[early, late], window=4)
    second_dir, second_done, _ = run_head_sweep(explicit, lm=lm)
    assert (first_done, second_done) == (False, True) and second_dir == first_dir
    other = _l5_config(tmp_path, measure_layers=[early + 1, late], window=4)
    third_dir, third_done, _ = run_head_sweep(other, lm=lm)
    assert not third_done and third_dir != first_dir


def test_contraction_layers_resolve_into_the_identity(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    early, late, _ = resolve_layers(lm.adapter, None, "--layers")
    prompts = str(_prompt_file(tmp_path, n=4))
    settings = {"prompts": prompts, "window": 4, "n_boot": 200, "pr_modes": ["per-head"]}
    first_dir, _, _ = run_contraction(ContractionConfig(**settings), lm=lm)
    second_dir, done, _ = run_contraction(
        ContractionConfig(**settings, layers=[early, late]), lm=lm
    )
    assert done and second_dir == first_dir


def test_run_identity_refuses_an_unknown_setting() -> None:
    config = AblationConfig()
    assert run_identity(config, measure_layers=(1, 2))["measure_layers"] == [1, 2]
    assert config.measure_layers is None  # the config itself is left alone
    with pytest.raises(KeyError, match="no setting 'late_layer'"):
        run_identity(config, late_layer=2)
