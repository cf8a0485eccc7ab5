"""Run store: every experiment run writes a self-describing directory (manifest, tables,
summary, plots, resume checkpoints), and an SQLite index over a store answers list / show /
compare. See :mod:`rloop.runs.store` for the directory layout."""

from rloop.runs.index import (
    compare_runs,
    index_path,
    list_runs,
    register_run,
    reindex,
    resolve_run,
    show_run,
)
from rloop.runs.layout import (
    atomic_write,
    atomic_write_text,
    config_hash,
    default_run_dir,
    read_manifest,
    runs_root,
)
from rloop.runs.store import Run

__all__ = [
    "Run",
    "atomic_write",
    "atomic_write_text",
    "compare_runs",
    "config_hash",
    "default_run_dir",
    "index_path",
    "list_runs",
    "read_manifest",
    "register_run",
    "reindex",
    "resolve_run",
    "runs_root",
    "show_run",
]
