"""Run status that tells live runs from dead ones, a lock per run directory, no nested runs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from rloop.errors import RunStoreError
from rloop.runs import list_runs
from rloop.runs.store import Run


def _open_run(path, store):
    return Run.open(path, experiment="demo", config={"a": 1}, index_root=store)


def test_a_killed_run_is_listed_as_interrupted(tmp_path) -> None:
    store = tmp_path / "store"
    run = _open_run(store / "r1", store)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    manifest = json.loads((run.path / "manifest.json").read_text())
    manifest["host"]["pid"] = int(dead.stdout)  # the owner has exited: a kill -9 looks the same
    (run.path / "manifest.json").write_text(json.dumps(manifest))
    assert list_runs(store)["status"].tolist() == ["interrupted"]
    assert len(list_runs(store, status="interrupted")) == 1
    live = _open_run(store / "r2", store)  # owned by this (live) process
    assert list_runs(store, status="running")["path"].tolist() == [str(live.path)]


def test_unknown_status_filter_is_an_error(tmp_path) -> None:
    _open_run(tmp_path / "store" / "r", tmp_path / "store")
    with pytest.raises(RunStoreError, match="unknown status 'foo'"):
        list_runs(tmp_path / "store", status="foo")


def test_second_process_on_the_same_run_directory_gets_a_clear_error(tmp_path) -> None:
    store, path = tmp_path / "store", tmp_path / "store" / "r"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import time
                from pathlib import Path
                from rloop.runs.store import Run
                Run.open(Path({str(path)!r}), experiment="demo", config={{"a": 1}},
                         index_root=Path({str(store)!r}))
                print("locked", flush=True)
                time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RunStoreError, match=r"already in use by another rloop process \(pid"):
            _open_run(path, store)
    finally:
        child.kill()
        child.wait()
    _open_run(path, store)  # the lock died with its process


def test_out_inside_an_existing_run_is_refused(tmp_path) -> None:
    store = tmp_path / "store"
    run = _open_run(store / "r", store)
    with pytest.raises(RunStoreError, match="inside the run directory"):
        _open_run(run.path / "plots" / "nested", store)
    assert not (run.path / "plots" / "nested").exists()
