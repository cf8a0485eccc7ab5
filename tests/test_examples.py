"""The example notebooks of ``examples/`` execute from top to bottom without an error.

Each notebook runs in a fresh ``python3`` kernel of this interpreter (the venv) through
nbclient, in a temporary working directory with its own run store, with progress bars on (the
notebook bar is checked in the outputs). They use the embedded model, so they take minutes:
deselect them with ``-m "not notebooks"``. Also checked: the committed ``.ipynb`` files are
exactly what ``examples/build_notebooks.py`` writes, and carry no outputs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
CELL_TIMEOUT_SECONDS = 600


def _builder():
    spec = importlib.util.spec_from_file_location(
        "build_notebooks", EXAMPLES / "build_notebooks.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebooks_are_built_from_the_script_without_outputs(tmp_path) -> None:
    built = _builder().build(tmp_path)
    assert sorted(p.name for p in built) == [p.name for p in NOTEBOOKS] and len(built) == 3
    for path in built:
        committed = json.loads((EXAMPLES / path.name).read_text(encoding="utf-8"))
        assert committed == json.loads(path.read_text(encoding="utf-8")), (
            f"{path.name} differs from examples/build_notebooks.py: run it and commit the result"
        )
        for cell in committed["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the kernel, once it has exited
    return usage.ru_utime + usage.ru_stime


def _html_outputs(notebook) -> list[str]:
    return [
        output.get("data", {}).get("text/html", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    ]


@pytest.mark.notebooks
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path: Path, tmp_path) -> None:
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_SECONDS,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    env = {
        **os.environ,
        "RLOOP_RUNS": str(tmp_path / "rloop-runs"),
        "RLOOP_PROGRESS": "1",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    started, cpu = time.monotonic(), _children_cpu_seconds()
    try:
        client.execute(env=env)
    except CellExecutionError as err:
        pytest.fail(f"{path.name}: a cell raised\n{str(err)[-3000:]}")
    seconds, cpu = time.monotonic() - started, _children_cpu_seconds() - cpu
    print(f"{path.name}: executed in {seconds:.0f} s wall, {cpu:.0f} s CPU of its kernel")
    artefacts = os.environ.get("RLOOP_TEST_ARTIFACTS")
    if artefacts:
        Path(artefacts).mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, Path(artefacts) / path.name)  # the executed copy
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert errors == []
    html = _html_outputs(notebook)
    assert any("<progress" in h for h in html), "no notebook progress bar was shown"
    assert any("<b>" in h and "run <code>" in h for h in html), "no result was displayed"
    assert (tmp_path / "rloop-runs").is_dir()
    reports = list((tmp_path / "rloop-runs").glob("*/report.html"))
    assert reports, "the runs wrote no report.html"
