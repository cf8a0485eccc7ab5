"""The README's Python examples run as written: the measurement example's two R_V numbers
agree, the five-line notebook example runs on the embedded model (its R_V equals the
measurement pieces' on the same prompt), and the verbs it names exist."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.slow
def test_readme_python_example_runs_and_agrees_with_the_engine(capsys) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    code = next(block for block in blocks if "measure_r_v" in block)
    exec(compile(code, str(README), "exec"), {})
    printed = capsys.readouterr().out
    values = [float(v) for v in re.findall(r"\d+\.\d+", printed)]
    assert len(values) == 2 and 0 < values[0] < 5
    np.testing.assert_allclose(values[0], values[1], rtol=1e-3)  # the tensor prints 4 decimals


def test_readme_notebook_example_names_real_verbs() -> None:
    import rloop

    text = README.read_text(encoding="utf-8")
    for verb in re.findall(r"rloop\.([a-z_]+)\(", text):
        assert callable(getattr(rloop, verb, None)), verb


@pytest.mark.slow
def test_readme_five_line_api_runs_on_the_embedded_model(tmp_path, monkeypatch) -> None:
    import matplotlib.figure

    from rloop.capture import Trace
    from rloop.capture.batching import encode, gather_windows
    from rloop.metrics import r_v, window_pr

    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "runs"))
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    code = next(block for block in blocks if "rloop.contraction(lm" in block)
    lines = [line for line in code.splitlines() if line.strip()]
    assert len(lines) == 5 and lines[0] == "import rloop"
    # Run it as a notebook would, keeping each line's value (the cells' outputs).
    namespace: dict = {}
    values = []
    for line in lines:
        statement = line.split("#")[0].strip()
        if "=" in statement or statement.startswith("import"):
            exec(compile(statement, str(README), "exec"), namespace)
        else:
            values.append(eval(compile(statement, str(README), "eval"), namespace))
    summary, figure = values
    assert summary.startswith("# Contraction") and isinstance(figure, matplotlib.figure.Figure)
    res, lm = namespace["res"], namespace["lm"]
    results = res["results"]
    assert set(results["group"]) == {"L5", "L5_twin", "factual"}
    # One prompt's R_V recomputed with the measurement pieces (capture, window, PR).
    row = results[results.pr_mode == "per-head"].iloc[0]
    text = _prompt_text(res.manifest["prompts"]["version"], row.prompt_id)
    batch = encode(lm.tokenizer, [text], lm.device)
    early, late = int(row.layer_early), int(row.layer_late)
    points = [f"blocks.{early}.v", f"blocks.{late}.v"]
    with Trace(lm.model, lm.adapter, capture=points, stop_after_layer=late) as trace:
        lm.model(**batch.model_inputs(), use_cache=False)
    windows = [gather_windows(trace[p], batch.n_tokens, 16) for p in points]
    expected = r_v(window_pr(windows[1], "per-head"), window_pr(windows[0], "per-head"))
    np.testing.assert_allclose(float(expected[0]), row.r_v, rtol=1e-4)


def _prompt_text(version: str, prompt_id: str) -> str:
    from rloop.prompts import load_bank

    return next(p.text for p in load_bank(version) if p.id == prompt_id)
