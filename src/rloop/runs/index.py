"""Index of a run store: one SQLite database, ``<runs_root>/index.sqlite``, one row per run.

The manifests are the source of truth; the index only makes list/show/compare fast and can
always be rebuilt from them with :func:`reindex`. SQLite runs in WAL mode with a busy
timeout, every write is one ``BEGIN IMMEDIATE`` transaction retried while the database is
locked, and rows are upserted by run id, so many processes (Ray workers) can write runs into
one store at once and a retried job never adds a duplicate row.
Note: SQLite locking needs a local file system (or one with working POSIX locks).

A directory whose ``manifest.json`` cannot be read (truncated, not JSON, no run id) is not
skipped: :func:`reindex` lists it with status ``corrupt`` and the reason in ``error``, under
the id ``corrupt:<directory name>``, so that it can be found and repaired or deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import pandas as pd

from rloop.errors import RunStoreError
from rloop.runs.layout import (
    MANIFEST_NAME,
    PARTIAL_DIR,
    STATUS_COMPLETE,
    STATUS_FAILED,
    STATUS_INTERRUPTED,
    STATUS_RUNNING,
    json_default,
    owner_state,
    read_manifest,
    runs_root,
)

INDEX_NAME = "index.sqlite"
STATUS_CORRUPT = "corrupt"  # a directory with a manifest that cannot be read
BUSY_TIMEOUT_SECONDS = 30.0
LOCK_RETRY_SECONDS = 120.0

INDEX_COLUMNS = (
    "id",
    "experiment",
    "model",
    "status",
    "started",
    "finished",
    "path",
    "config_hash",
    "error",
    "headline_json",
    "config_json",
)
LIST_COLUMNS = ["id", "experiment", "model", "status", "started", "finished", "path", "reason"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    experiment TEXT,
    model TEXT,
    status TEXT,
    started TEXT,
    finished TEXT,
    path TEXT NOT NULL,
    config_hash TEXT,
    error TEXT,
    headline_json TEXT,
    config_json TEXT,
    indexed_at REAL
);
CREATE INDEX IF NOT EXISTS runs_by_path ON runs(path);
"""

T = TypeVar("T")


def index_path(root: Path) -> Path:
    """``<root>/index.sqlite``."""
    return Path(root) / INDEX_NAME


def _is_lock_error(err: sqlite3.OperationalError) -> bool:
    text = str(err).lower()
    return "locked" in text or "busy" in text


def _retry_locked(action: Callable[[], T]) -> T:
    """Run ``action``, retrying with jittered backoff while SQLite reports a lock."""
    deadline = time.monotonic() + LOCK_RETRY_SECONDS
    delay = 0.01
    while True:
        try:
            return action()
        except sqlite3.OperationalError as err:
            if not _is_lock_error(err) or time.monotonic() > deadline:
                raise
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 1.0)


@contextlib.contextmanager
def _connect(root: Path) -> Iterator[sqlite3.Connection]:
    """A connection to the index of ``root`` (created with its schema if missing)."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(
            index_path(root), timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None
        )
    except (OSError, sqlite3.Error) as err:
        raise RunStoreError(
            f"cannot open the run index {index_path(root)}: {err}; "
            "set RLOOP_RUNS (or --root) to a writable directory"
        ) from None
    try:
        connection.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_SECONDS * 1000)}")
        _retry_locked(lambda: connection.execute("PRAGMA journal_mode=WAL"))
        _retry_locked(lambda: connection.executescript(_SCHEMA))
        yield connection
    finally:
        connection.close()


def _write_transaction(root: Path, body: Callable[[sqlite3.Connection], T]) -> T:
    """Run ``body`` inside one ``BEGIN IMMEDIATE`` transaction, retried while locked."""
    with _connect(root) as connection:

        def attempt() -> T:
            connection.execute("BEGIN IMMEDIATE")
            try:
                result = body(connection)
                connection.execute("COMMIT")
                return result
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise

        return _retry_locked(attempt)


def _row_from_manifest(manifest: dict, run_dir: Path) -> tuple:
    model = manifest.get("model") or {}
    config = manifest.get("config") or {}
    timings = manifest.get("timings") or {}
    return (
        manifest["run_id"],
        manifest.get("experiment"),
        model.get("name") or config.get("model"),
        manifest.get("status"),
        timings.get("started"),
        timings.get("finished"),
        str(Path(run_dir).absolute()),
        manifest.get("config_hash"),
        manifest.get("error"),
        json.dumps(manifest.get("headline") or {}, sort_keys=True, default=json_default),
        json.dumps(config, sort_keys=True, default=json_default),
    )


def _corrupt_row(run_dir: Path, reason: str) -> tuple:
    """The index row of a run directory whose manifest cannot be read."""
    run_dir = Path(run_dir).absolute()
    return (f"{STATUS_CORRUPT}:{run_dir.name}", None, None, STATUS_CORRUPT, None, None,
            str(run_dir), None, f"{STATUS_CORRUPT}: {reason}", "{}", "{}")  # fmt: skip


def _manifest_problem(run_dir: Path) -> str | None:
    """Why the manifest of ``run_dir`` (which exists) is not a usable run record, or None."""
    try:
        manifest = read_manifest(run_dir)
    except RunStoreError as err:
        detail = str(err).split(f"{MANIFEST_NAME}: ", 1)[-1]  # the JSON or OS error
        return f"cannot read {MANIFEST_NAME}: {detail}"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("run_id"), str):
        return f"{MANIFEST_NAME} has no run_id"
    return None


def _upsert(connection: sqlite3.Connection, row: tuple) -> None:
    placeholders = ", ".join("?" for _ in INDEX_COLUMNS)
    updates = ", ".join(f"{name}=excluded.{name}" for name in INDEX_COLUMNS[1:])
    # One directory holds one run: a forced re-run (new id) replaces the old row.
    connection.execute("DELETE FROM runs WHERE path = ? AND id != ?", (row[6], row[0]))
    connection.execute(
        f"INSERT INTO runs ({', '.join(INDEX_COLUMNS)}, indexed_at) "
        f"VALUES ({placeholders}, ?) ON CONFLICT(id) DO UPDATE SET {updates}, "
        "indexed_at=excluded.indexed_at",
        (*row, time.time()),
    )


def register_run(root: Path, manifest: dict, run_dir: Path) -> None:
    """Insert or update (by run id) the index row of the run in ``run_dir``."""
    row = _row_from_manifest(manifest, run_dir)
    _write_transaction(root, lambda connection: _upsert(connection, row))


def _scan_run_dirs(root: Path) -> Iterator[Path]:
    """Directories under ``root`` holding a manifest (not descending into a run directory)."""
    for directory, subdirs, files in os.walk(root):
        if MANIFEST_NAME in files:
            subdirs.clear()
            yield Path(directory)
        else:
            subdirs[:] = [d for d in subdirs if not d.startswith(".") and d != PARTIAL_DIR]


def reindex(root: Path | None = None) -> int:
    """Rebuild the index of ``root`` from the manifests on disk; returns the number of runs.

    Runs found under ``root`` are upserted (so a deleted index, or runs copied in, are
    recovered); indexed runs outside ``root`` (written with ``--out`` elsewhere) are kept if
    their manifest still exists; rows whose directory is gone are dropped.
    """
    root = Path(root) if root is not None else runs_root()
    if not root.is_dir():
        raise RunStoreError(f"run store {root} does not exist; set RLOOP_RUNS or pass --root")
    scanned = [run_dir.absolute() for run_dir in _scan_run_dirs(root)]

    def rebuild(connection: sqlite3.Connection) -> int:
        # Manifests are read while holding the write lock: a writer writes its manifest before
        # registering, so what is read here is never older than a row already committed.
        indexed = connection.execute("SELECT id, path FROM runs").fetchall()
        rows: dict[str, tuple] = {}
        for run_dir in dict.fromkeys([*scanned, *(Path(path) for _, path in indexed)]):
            if not (run_dir / MANIFEST_NAME).is_file():
                continue  # gone: dropped from the index
            problem = _manifest_problem(run_dir)
            if problem is not None:
                row = _corrupt_row(run_dir, problem)
            else:
                manifest = read_manifest(run_dir)
                row = _row_from_manifest(manifest, run_dir)
            rows.setdefault(row[0], row)
        for run_id, _ in indexed:
            if run_id not in rows:
                connection.execute("DELETE FROM runs WHERE id = ?", (run_id,))
        for row in rows.values():
            _upsert(connection, row)
        return len(rows)

    return _write_transaction(root, rebuild)


def _read_index(root: Path) -> pd.DataFrame:
    if not index_path(root).exists():
        reindex(root)
    with _connect(root) as connection:
        records = _retry_locked(
            lambda: connection.execute(
                f"SELECT {', '.join(INDEX_COLUMNS)} FROM runs ORDER BY started, id"
            ).fetchall()
        )
    return pd.DataFrame.from_records(records, columns=list(INDEX_COLUMNS))


LIST_STATUSES = (
    STATUS_RUNNING,
    STATUS_INTERRUPTED,
    STATUS_COMPLETE,
    STATUS_FAILED,
    STATUS_CORRUPT,
)


def _live_status(status: str, path: str, error: str | None) -> tuple[str, str | None]:
    """The listed status and its reason: a "running" run whose owning process is dead is
    "interrupted"; a failed or corrupt run's reason is its one-line error."""
    if status != STATUS_RUNNING:
        return status, error if status in (STATUS_FAILED, STATUS_CORRUPT) else None
    try:
        return owner_state(read_manifest(Path(path)))
    except RunStoreError as err:
        return status, str(err)


def list_runs(
    root: Path | None = None, experiment: str | None = None, status: str | None = None
) -> pd.DataFrame:
    """One row per run, oldest first: id, experiment, model, status, started, finished, path,
    reason (why a run is failed, interrupted or corrupt; None otherwise), plus one column per
    headline metric the experiments recorded (NaN where a run has none).

    Reindexes from the manifests first if the index file is missing.
    """
    root = Path(root) if root is not None else runs_root()
    if not root.is_dir():
        return pd.DataFrame(columns=LIST_COLUMNS)
    index = _read_index(root)
    if experiment is not None:
        index = index[index["experiment"] == experiment]
    live = [
        _live_status(s, path, error)
        for s, path, error in zip(index["status"], index["path"], index["error"], strict=True)
    ]
    index = index.assign(
        status=[status for status, _ in live],
        reason=[reason if status != STATUS_RUNNING else None for status, reason in live],
    )
    if status is not None:
        if status not in LIST_STATUSES:
            raise RunStoreError(
                f"unknown status {status!r}: choose one of {', '.join(LIST_STATUSES)}"
            )
        index = index[index["status"] == status]
    headlines = pd.DataFrame.from_records(
        [json.loads(text or "{}") for text in index["headline_json"]], index=index.index
    )
    table = index[LIST_COLUMNS]
    if len(headlines.columns):
        table = pd.concat([table, headlines], axis=1)
    return table.reset_index(drop=True)


def resolve_run(path_or_id: str | Path, root: Path | None = None) -> Path:
    """The directory of a run given its path, run id, directory name or a unique id prefix."""
    candidate = Path(path_or_id).expanduser()
    if (candidate / MANIFEST_NAME).is_file():
        return candidate.absolute()
    root = Path(root) if root is not None else runs_root()
    text = str(path_or_id)
    index = _read_index(root) if root.is_dir() else pd.DataFrame(columns=list(INDEX_COLUMNS))
    names = index["path"].map(lambda p: Path(p).name)
    for matches in (
        index[index["id"] == text],
        index[names == text],
        index[index["id"].str.startswith(text)] if text else index.iloc[:0],
    ):
        if len(matches) == 1:
            return Path(matches["path"].iloc[0])
        if len(matches) > 1:
            raise RunStoreError(
                f"{text!r} matches {len(matches)} runs in {root}; give a longer id or the path"
            )
    raise RunStoreError(
        f"no run {text!r} in {root}: give a run id, directory name or path (see `rloop runs list`)"
    )


def run_files(run_dir: Path) -> dict[str, list[str]]:
    """Tables (names with a .parquet file), plots (file names) and other files of a run."""
    run_dir = Path(run_dir)
    tables = sorted(p.stem for p in run_dir.glob("*.parquet") if not p.name.startswith("."))
    plots_dir = run_dir / "plots"
    plots = sorted(p.name for p in plots_dir.glob("*.png")) if plots_dir.is_dir() else []
    return {"tables": tables, "plots": plots}


def show_run(path_or_id: str | Path, root: Path | None = None) -> dict:
    """The manifest of a run plus ``path`` and ``files`` (tables and plots present)."""
    run_dir = resolve_run(path_or_id, root)
    manifest = read_manifest(run_dir)
    manifest["path"] = str(run_dir)
    manifest["files"] = run_files(run_dir)
    return manifest


def flatten(mapping: dict, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    flat: dict[str, object] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _comparable(value: object) -> str:
    return json.dumps(value, sort_keys=True, default=json_default)


def compare_runs(ids_or_paths: Sequence[str | Path], root: Path | None = None) -> pd.DataFrame:
    """Runs side by side: one column per run (labelled by run id), one row per field.

    Rows: experiment, model, status, started; every headline metric (``headline.<name>``);
    then the config fields whose values differ between the runs (``config.<name>``; nested
    config dicts are flattened with dots). Missing values are None.
    """
    if len(ids_or_paths) < 2:
        raise RunStoreError("compare needs at least two runs: rloop runs compare RUN RUN ...")
    manifests = [show_run(item, root) for item in ids_or_paths]
    labels = [m.get("run_id") or Path(m["path"]).name for m in manifests]
    if len(set(labels)) < len(labels):
        raise RunStoreError("the same run was given twice; pass different runs to compare")

    rows: dict[str, list[object]] = {}
    for field in ("experiment", "status"):
        rows[field] = [m.get(field) for m in manifests]
    rows["model"] = [(m.get("model") or {}).get("name") for m in manifests]
    rows["started"] = [(m.get("timings") or {}).get("started") for m in manifests]

    headlines = [flatten(m.get("headline") or {}) for m in manifests]
    for name in dict.fromkeys(k for h in headlines for k in h):
        rows[f"headline.{name}"] = [h.get(name) for h in headlines]

    configs = [flatten(m.get("config") or {}) for m in manifests]
    for name in dict.fromkeys(k for c in configs for k in c):
        values = [c.get(name) for c in configs]
        present = [name in c for c in configs]
        if not all(present) or len({_comparable(v) for v in values}) > 1:
            rows[f"config.{name}"] = values

    table = pd.DataFrame.from_dict(rows, orient="index", columns=labels, dtype=object)
    table.index.name = "field"
    return table
