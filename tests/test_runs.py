"""Run store: atomic writes, resume, errors, failure marking, the SQLite index under concurrent
writers, reindex, list/show/compare and the `rloop runs` CLI."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from rloop.cli.runs import runs_app
from rloop.errors import RloopError, RunStoreError
from rloop.runs import (
    Run,
    atomic_write,
    atomic_write_text,
    compare_runs,
    config_hash,
    default_run_dir,
    environment,
    index_path,
    list_runs,
    read_manifest,
    register_run,
    reindex,
    runs_root,
    show_run,
)

CONFIG = {"model": "tiny", "window": 16, "layers": [5, 28], "seed": 0}


def _open(run_dir: Path, root: Path, config: dict = CONFIG, **kwargs) -> Run:
    return Run.open(run_dir, experiment="contraction", config=config, index_root=root, **kwargs)


def _index_rows(root: Path) -> list[tuple]:
    with sqlite3.connect(index_path(root)) as connection:
        return connection.execute("SELECT id, status, path FROM runs ORDER BY id").fetchall()


# ---------------------------------------------------------------------------- hashing and paths


def test_config_hash_is_sha256_of_sorted_compact_json():
    expected = hashlib.sha256(b'{"a":1,"b":[1,2],"c":"x"}').hexdigest()[:12]
    assert config_hash({"c": "x", "b": [1, 2], "a": 1}) == expected
    # tuples hash like lists, paths like their strings: a manifest round trip keeps the hash
    assert config_hash({"a": 1, "b": (1, 2), "c": Path("x")}) == expected
    assert config_hash({"a": 2, "b": [1, 2], "c": "x"}) != expected


def test_default_run_dir_and_runs_root(tmp_path, monkeypatch):
    path = default_run_dir(tmp_path, "contraction", "HuggingFaceTB/SmolLM2-135M", CONFIG)
    assert path == tmp_path / f"contraction-HuggingFaceTB--SmolLM2-135M-{config_hash(CONFIG)}"
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    assert runs_root() == tmp_path / "store"
    monkeypatch.delenv("RLOOP_RUNS")
    assert runs_root() == Path("rloop-runs")


# ---------------------------------------------------------------------------- atomic writes


def test_atomic_write_keeps_old_file_when_writer_raises(tmp_path):
    target = tmp_path / "table.csv"
    atomic_write_text(target, "old,content\n")

    def half_then_crash(tmp: Path) -> None:
        tmp.write_text("new,cont")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_crash)
    assert target.read_text() == "old,content\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]  # temp file cleaned


def test_atomic_write_survives_process_killed_mid_write(tmp_path):
    target = tmp_path / "manifest.json"
    atomic_write_text(target, '{"status": "running"}')
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from rloop.runs import atomic_write\n"
        "def die(tmp):\n"
        '    tmp.write_text(\'{"status": "comp\')\n'
        "    os._exit(9)\n"
        "atomic_write(Path(sys.argv[1]), die)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script, str(target)], capture_output=True, check=False
    )
    assert completed.returncode == 9
    assert json.loads(target.read_text()) == {"status": "running"}


def test_write_table_crash_keeps_previous_table(tmp_path, monkeypatch):
    run = _open(tmp_path / "run", tmp_path)
    first = pd.DataFrame({"layer": [5, 28], "pr": [3.5, 2.25]})
    run.write_table("results", first)

    def broken_to_csv(self, path, **kwargs):
        Path(path).write_text("layer,p")
        raise RuntimeError("killed")

    monkeypatch.setattr(pd.DataFrame, "to_csv", broken_to_csv)
    with pytest.raises(RuntimeError):
        run.write_table("results", pd.DataFrame({"layer": [1], "pr": [9.0]}))
    monkeypatch.undo()
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "run" / "results.csv"), first)
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------- lifecycle


def test_resume_keeps_partials_and_complete_removes_them(tmp_path):
    run_dir = tmp_path / "run"
    run = _open(run_dir, tmp_path)
    assert run.status == "running" and not run.resumed and not run.already_complete
    run.save_partial("batch-00000", [{"prompt_id": "a", "pr": 1.5}, {"prompt_id": "b", "pr": 2.0}])
    run.save_partial("batch-00001", pd.DataFrame({"prompt_id": ["c"], "pr": [4.25]}))
    first_id = run.run_id
    # the process dies here: no complete(), no fail()

    resumed = _open(run_dir, tmp_path)
    assert resumed.resumed and resumed.run_id == first_id
    assert resumed.finished_keys() == {"batch-00000", "batch-00001"}
    resumed.save_partial("batch-00002", [{"prompt_id": "d", "pr": 0.5}])
    expected = pd.DataFrame({"prompt_id": ["a", "b", "c", "d"], "pr": [1.5, 2.0, 4.25, 0.5]})
    pd.testing.assert_frame_equal(resumed.load_partials(), expected)
    assert len(read_manifest(run_dir)["resumes"]) == 1

    resumed.write_table("results", expected)
    resumed.complete()
    assert not (run_dir / "partial").exists()
    manifest = read_manifest(run_dir)
    assert manifest["status"] == "complete" and manifest["timings"]["finished"] is not None
    assert _index_rows(tmp_path) == [(first_id, "complete", str(run_dir))]

    again = _open(run_dir, tmp_path)
    assert again.already_complete and again.run_id == first_id


def test_forced_rerun_starts_clean_with_new_id(tmp_path):
    run_dir = tmp_path / "run"
    with _open(run_dir, tmp_path) as run:
        run.write_table("extra", pd.DataFrame({"x": [1]}))
        run.complete()
    forced = _open(run_dir, tmp_path, resume=False)
    assert not forced.already_complete and forced.run_id != run.run_id
    assert not (run_dir / "extra.parquet").exists() and not (run_dir / "extra.csv").exists()
    # one directory, one index row
    assert _index_rows(tmp_path) == [(forced.run_id, "running", str(run_dir))]


def test_update_manifest_merges_dicts_and_records_environment(tmp_path):
    run = _open(tmp_path / "run", tmp_path)
    run.set_model({"name": "tiny", "dtype": "float32", "device": "cpu"})
    run.update_manifest(timings={"measure": 1.25}, headline={"rv": np.float64(0.75)})
    manifest = read_manifest(tmp_path / "run")
    assert manifest["timings"]["measure"] == 1.25 and manifest["timings"]["started"]
    assert manifest["headline"] == {"rv": 0.75}
    assert manifest["model"] == {"name": "tiny", "dtype": "float32", "device": "cpu"}
    assert manifest["config"] == CONFIG and manifest["seed"] == 0
    assert manifest["versions"]["numpy"] == np.__version__
    assert manifest["versions"]["pandas"] == pd.__version__


def test_code_commit_matches_git(tmp_path):
    source = Path(environment.__file__).resolve().parent
    head = subprocess.run(
        ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    commit = environment.code_commit()
    if head.returncode == 0:
        assert commit["commit"] == head.stdout.strip()
        assert isinstance(commit["dirty"], bool)
    else:  # rloop installed outside a git checkout
        assert commit == {"commit": None, "dirty": None, "repo": None}


def test_different_config_in_directory_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    _open(run_dir, tmp_path).complete()
    with pytest.raises(RunStoreError, match="holds another run.*--out") as info:
        _open(run_dir, tmp_path, config={**CONFIG, "window": 8})
    assert "\n" not in str(info.value)
    with pytest.raises(RunStoreError, match="holds another run"):
        Run.open(run_dir, experiment="ablation", config=CONFIG, index_root=tmp_path)


def test_unwritable_or_foreign_directory_is_refused(tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    with pytest.raises(
        RunStoreError, match="cannot write run directory .*choose another with --out"
    ):
        _open(tmp_path / "afile" / "run", tmp_path)
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("...")
    with pytest.raises(RunStoreError, match="not an rloop run directory"):
        _open(foreign, tmp_path)


def test_exception_in_block_marks_failed_and_reraises(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match="layer 40"), _open(run_dir, tmp_path) as run:
        run.save_partial("batch-00000", [{"pr": 1.0}])
        raise ValueError("layer 40 out of range\nsecond line")
    manifest = read_manifest(run_dir)
    assert manifest["status"] == "failed"
    assert manifest["error"] == "ValueError: layer 40 out of range"
    assert "Traceback" in manifest["error_traceback"]
    assert _index_rows(tmp_path) == [(run.run_id, "failed", str(run_dir))]
    # a failed run resumes with its checkpoints
    resumed = _open(run_dir, tmp_path)
    assert resumed.resumed and resumed.finished_keys() == {"batch-00000"}
    assert read_manifest(run_dir)["status"] == "running"


def test_exception_after_reading_complete_run_leaves_it_complete(tmp_path):
    run_dir = tmp_path / "run"
    _open(run_dir, tmp_path).complete()
    with pytest.raises(KeyError), _open(run_dir, tmp_path) as run:
        assert run.already_complete
        raise KeyError("caller bug after finding the results")
    assert read_manifest(run_dir)["status"] == "complete"


# ---------------------------------------------------------------------------- index


def _write_runs(root: str, worker: int, count: int) -> None:
    for number in range(count):
        config = {**CONFIG, "worker": worker, "number": number}
        run_dir = default_run_dir(Path(root), "contraction", "tiny", config)
        with Run.open(run_dir, experiment="contraction", config=config, index_root=root) as run:
            run.write_table("results", pd.DataFrame({"worker": [worker], "number": [number]}))
            run.update_manifest(headline={"value": worker * 10 + number})
            run.complete()


def test_concurrent_writers_index_every_run_once(tmp_path):
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_runs, args=(str(tmp_path), w, 5)) for w in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=120)
    assert [process.exitcode for process in workers] == [0, 0, 0, 0]
    runs = list_runs(tmp_path)
    assert len(runs) == 20 and runs["id"].is_unique
    assert set(runs["status"]) == {"complete"}
    assert sorted(runs["value"]) == [w * 10 + n for w in range(4) for n in range(5)]
    # a retried job re-registers its run: still one row
    manifest = read_manifest(Path(runs["path"].iloc[0]))
    register_run(tmp_path, manifest, Path(runs["path"].iloc[0]))
    assert len(list_runs(tmp_path)) == 20


def test_reindex_recovers_deleted_index_and_copied_runs(tmp_path):
    root = tmp_path / "store"
    for window in (8, 16):
        config = {**CONFIG, "window": window}
        with _open(default_run_dir(root, "contraction", "tiny", config), root, config) as run:
            run.update_manifest(headline={"rv": window / 32})
            run.complete()
    before = list_runs(root)
    index_path(root).unlink()
    for suffix in ("-wal", "-shm"):
        Path(str(index_path(root)) + suffix).unlink(missing_ok=True)
    after = list_runs(root)  # reindexes because the index is missing
    pd.testing.assert_frame_equal(before, after)
    assert sorted(after["rv"]) == [0.25, 0.5]

    # a run written elsewhere and copied into the store appears after reindex
    other = tmp_path / "other"
    config = {**CONFIG, "window": 4}
    _open(other / "run4", other, config).complete()
    (root / "nested").mkdir()
    shutil.copytree(other / "run4", root / "nested" / "run4")
    shutil.rmtree(other)
    assert len(list_runs(root)) == 2
    assert reindex(root) == 3
    assert len(list_runs(root)) == 3
    # a deleted run disappears on reindex
    shutil.rmtree(root / "nested")
    assert reindex(root) == 2


def test_list_filters_show_and_compare(tmp_path):
    configs = [{**CONFIG, "window": 8}, {**CONFIG, "window": 16}]
    ids = []
    for config, rv in zip(configs, (0.9, 0.7), strict=True):
        run_dir = default_run_dir(tmp_path, "contraction", "tiny", config)
        with _open(run_dir, tmp_path, config) as run:
            run.update_manifest(headline={"rv_late": rv})
            run.complete()
        ids.append(run.run_id)
    with pytest.raises(RuntimeError), _open(tmp_path / "broken", tmp_path, {"model": "x"}):
        raise RuntimeError("boom")

    assert len(list_runs(tmp_path)) == 3
    assert list(list_runs(tmp_path, status="failed")["path"]) == [str(tmp_path / "broken")]
    assert len(list_runs(tmp_path, experiment="contraction", status="complete")) == 2
    assert list_runs(tmp_path, experiment="ablation").empty

    by_id = show_run(ids[0], tmp_path)
    assert by_id["config"]["window"] == 8 and by_id["path"] == str(
        default_run_dir(tmp_path, "contraction", "tiny", configs[0])
    )
    assert show_run("broken", tmp_path)["status"] == "failed"  # by directory name
    assert show_run(by_id["path"])["run_id"] == ids[0]  # by path, no store needed
    with pytest.raises(RunStoreError, match="no run 'nope'"):
        show_run("nope", tmp_path)

    comparison = compare_runs(ids, tmp_path)
    assert list(comparison.columns) == ids
    assert list(comparison.loc["config.window"]) == [8, 16]
    assert list(comparison.loc["headline.rv_late"]) == [0.9, 0.7]
    assert "config.seed" not in comparison.index  # equal fields are not differences
    assert "config.layers" not in comparison.index
    with pytest.raises(RunStoreError, match="at least two"):
        compare_runs(ids[:1], tmp_path)


# ---------------------------------------------------------------------------- CLI


def test_cli_list_show_compare_and_bad_id(tmp_path):
    ids = []
    for window, rv in ((8, 0.875), (16, 0.625)):
        config = {**CONFIG, "window": window}
        with _open(default_run_dir(tmp_path, "contraction", "tiny", config), tmp_path, config) as r:
            r.update_manifest(headline={"rv_late": rv})
            r.complete()
        ids.append(r.run_id)
    runner = CliRunner()
    wide = {"COLUMNS": "300"}

    listed = runner.invoke(runs_app, ["list", "--root", str(tmp_path), "--metrics"], env=wide)
    assert listed.exit_code == 0, listed.output
    assert all(run_id in listed.output for run_id in ids)
    assert "0.875" in listed.output and "0.625" in listed.output

    failed_only = runner.invoke(runs_app, ["list", "--root", str(tmp_path), "--status", "failed"])
    assert failed_only.exit_code == 0 and "no runs" in failed_only.output

    shown = runner.invoke(runs_app, ["show", ids[1], "--root", str(tmp_path)], env=wide)
    assert shown.exit_code == 0, shown.output
    assert "config.window" in shown.output and "16" in shown.output

    compared = runner.invoke(runs_app, ["compare", *ids, "--root", str(tmp_path)], env=wide)
    assert compared.exit_code == 0, compared.output
    line = next(text for text in compared.output.splitlines() if "config.window" in text)
    assert line.index("8") < line.index("16")

    bad = runner.invoke(runs_app, ["show", "no-such-run", "--root", str(tmp_path)])
    assert bad.exit_code == 2
    assert "no run 'no-such-run'" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert issubclass(RunStoreError, RloopError)


def test_cli_list_shows_why_a_run_is_corrupt_or_failed(tmp_path):
    wide = {"COLUMNS": "300"}
    runner = CliRunner()
    with _open(tmp_path / "good", tmp_path) as run:
        run.complete()
    plain = runner.invoke(runs_app, ["list", "--root", str(tmp_path)], env=wide)
    assert plain.exit_code == 0, plain.output
    assert "reason" not in plain.output  # nothing to explain: no reason column

    with pytest.raises(RuntimeError), _open(tmp_path / "failed-run", tmp_path, {"model": "x"}):
        raise RuntimeError("boom at step 3")
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "manifest.json").write_text('{"run_id": "x", "status": ')  # truncated
    try:
        json.loads('{"run_id": "x", "status": ')
    except ValueError as err:
        json_error = str(err)

    for args in (["--reindex"], []):  # the corrupt row stays in the index after --reindex
        listed = runner.invoke(runs_app, ["list", "--root", str(tmp_path), *args], env=wide)
        assert listed.exit_code == 0, listed.output
        lines = listed.output.splitlines()
        header = next(line for line in lines if "status" in line and "directory" in line)
        assert "reason" in header
        torn = next(line for line in lines if "corrupt:torn" in line)
        assert f"corrupt: cannot read manifest.json: {json_error}" in torn
        failed = next(line for line in lines if "failed-run" in line)
        assert "failed" in failed and "boom at step 3" in failed
        good = next(line for line in lines if " good " in line)
        assert "complete" in good
