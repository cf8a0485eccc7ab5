"""The notebook API: verbs at the top level, prompts in any form, results with tables."""

from __future__ import annotations

import pandas as pd
import pytest

import rloop
from rloop.api import prompts_file
from rloop.errors import ConfigError
from rloop.experiments.contraction import ContractionConfig, run_contraction
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
    pd.testing.assert_frame_equal(
        result["results"], pd.read_parquet(run_dir / "results.parquet")
    )
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
