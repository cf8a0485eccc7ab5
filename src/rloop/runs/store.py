"""A run directory being written: manifest, tables, summary, plots and resume checkpoints.

Layout of a run directory::

    <run_dir>/
      manifest.json        status ("running" | "complete" | "failed"), experiment, config,
                           config_hash, model, prompts, seed, tokens, timings, versions,
                           code commit, host, run id, headline metrics
      <name>.parquet/.csv  tidy tables (``results`` first of all)
      summary.md
      plots/<name>.png
      partial/<key>.parquet  resume checkpoints while running; removed on completion

Every file is written to a temporary file in the same directory and moved into place with
``os.replace``, so a crash mid-write leaves the previous version intact, never half a file.
A write that fails (a full disk, a quota, a read-only file system) is one line naming the
file (:func:`write_error`); the run is marked failed and keeps its checkpoints, so running
the same command again after freeing space resumes it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pandas as pd

from rloop.errors import RunStoreError
from rloop.runs import environment
from rloop.runs.index import register_run
from rloop.runs.layout import (
    MANIFEST_NAME,
    MANIFEST_SCHEMA,
    PARTIAL_DIR,
    PLOTS_DIR,
    STATUS_COMPLETE,
    STATUS_FAILED,
    STATUS_RUNNING,
    atomic_write,
    atomic_write_text,
    canonical_json,
    config_hash,
    json_default,
    now_iso,
    one_line_error,
    read_manifest,
    runs_root,
)

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left / disk quota exceeded
LOCK_NAME = ".lock"
JOBS_DIR = "jobs"  # child runs of a sweep
_HELD_LOCKS: dict[Path, int] = {}  # run directory -> lock fd held by this process
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _check_name(name: str, what: str) -> str:
    if not _SAFE_NAME.match(name):
        raise RunStoreError(
            f"bad {what} name {name!r}: use letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit)"
        )
    return name


def _new_run_id() -> str:
    """Sortable and unique across processes, e.g. ``20250131-120000-3fa9c1``."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(3)}"


def write_error(path: Path, error: OSError) -> RunStoreError:
    """The one-line error of a failed write of ``path``: a full disk (or quota) says so and how
    to go on; anything else names the system's reason."""
    if error.errno in DISK_FULL:
        return RunStoreError(
            f"no space left on the device to write {path} ({error.strerror}); free space or "
            "choose another --out, then run the same command again: finished work is resumed"
        )
    return RunStoreError(
        f"cannot write {path}: {error.strerror or error}; choose another run directory with --out"
    )


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """An OSError raised while writing ``path`` becomes :func:`write_error`'s one line."""
    try:
        yield
    except OSError as err:
        raise write_error(path, err) from None


# ---------------------------------------------------------------------------- the run


def _refuse_nested(run_dir: Path) -> None:
    """A run directory inside another run would be listed as part of it: refuse (except the
    child runs a sweep keeps under its own ``jobs/``)."""
    for parent in run_dir.parents:
        if (parent / MANIFEST_NAME).is_file() and run_dir.relative_to(parent).parts[0] != JOBS_DIR:
            raise RunStoreError(
                f"--out {run_dir} is inside the run directory {parent}; "
                "choose a directory outside any run"
            )


def _lock_run_dir(run_dir: Path) -> int:
    """An exclusive lock on ``run_dir/.lock`` for this process; a second process that opens
    the same run directory gets a one-line error naming the owner. Reopening in the same
    process (the earlier Run was abandoned, e.g. after an exception) reuses the lock."""
    if run_dir in _HELD_LOCKS:
        return _HELD_LOCKS[run_dir]
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        owner = ""
        with contextlib.suppress(Exception):
            host = read_manifest(run_dir).get("host", {})
            owner = f" (pid {host.get('pid')} on {host.get('hostname')})"
        raise RunStoreError(
            f"run directory {run_dir} is already in use by another rloop process{owner}; "
            "wait for it to finish, or choose another --out"
        ) from None
    _HELD_LOCKS[run_dir] = fd
    return fd


class Run:
    """A run directory being written. Open with :meth:`Run.open`, preferably as a context
    manager, which marks the run failed if the block raises (and re-raises)::

        with Run.open(run_dir, experiment="contraction", config=cfg) as run:
            if run.already_complete:
                ...  # results are already there
            run.save_partial("batch-00000", rows)
            run.write_table("results", df)
            run.complete()

    Attributes: ``path`` (the run directory), ``manifest`` (the manifest dict as written),
    ``already_complete`` (True when the directory held a complete run of the same config),
    ``resumed`` (True when an unfinished run of the same config was picked up).
    """

    def __init__(self, path: Path, manifest: dict, *, index_root: Path | None) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.index_root = index_root
        self.already_complete = manifest.get("status") == STATUS_COMPLETE
        self.resumed = False
        self._written_since_open = False
        self._completed_here = False
        self._lock: int | None = None

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        run_dir: Path,
        *,
        experiment: str,
        config: dict,
        resume: bool = True,
        index_root: Path | None = None,
    ) -> Run:
        """Create (or reopen) the run directory ``run_dir`` for ``experiment`` with ``config``.

        - new or empty directory: a fresh run with status "running";
        - same experiment and config hash, not complete: resumed (``partial/`` is kept) when
          ``resume`` is True, else started afresh (previous checkpoints, tables and plots are
          removed);
        - same experiment and config, complete: ``already_complete`` is True and nothing is
          changed when ``resume`` is True; started afresh when ``resume`` is False;
        - anything else in the directory: RunStoreError (pick another ``--out``).

        ``index_root`` is the run store whose index records this run (default: runs_root()).
        """
        run_dir = Path(run_dir).expanduser().absolute()
        _refuse_nested(run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunStoreError(
                f"cannot write run directory {run_dir}: {err.strerror or err}; "
                "choose another with --out"
            ) from None
        lock = _lock_run_dir(run_dir)
        index_root = Path(index_root) if index_root is not None else runs_root()
        wanted_hash = config_hash(config)
        manifest_path = run_dir / MANIFEST_NAME

        if manifest_path.exists():
            manifest = read_manifest(run_dir)
            same = (
                manifest.get("experiment") == experiment
                and manifest.get("config_hash") == wanted_hash
            )
            if not same:
                raise RunStoreError(
                    f"run directory {run_dir} holds another run "
                    f"({manifest.get('experiment')}, config {manifest.get('config_hash')}; "
                    f"this one is {experiment}, config {wanted_hash}); "
                    "choose another with --out or delete that directory"
                )
            run = cls(run_dir, manifest, index_root=index_root)
            run._lock = lock
            if resume and run.already_complete:
                # A crash between writing "complete" and removing checkpoints leaves them.
                shutil.rmtree(run_dir / PARTIAL_DIR, ignore_errors=True)
                return run
            if resume:
                run.resumed = True
                run.manifest["host"] = environment.host_info()  # the new owner
                run.manifest["status"] = STATUS_RUNNING
                run.manifest["error"] = None
                run.manifest.setdefault("resumes", []).append(
                    {"time": now_iso(), "host": environment.host_info()["hostname"]}
                )
                run._write_manifest()
                run._register()
                return run
            run._clear_outputs()
        elif any(not entry.name.startswith(".") for entry in run_dir.iterdir()):
            raise RunStoreError(
                f"{run_dir} exists and is not an rloop run directory (no {MANIFEST_NAME}); "
                "choose another with --out"
            )

        run = cls(
            run_dir, cls._fresh_manifest(experiment, config, wanted_hash), index_root=index_root
        )
        run._lock = lock
        run._write_manifest()
        run._register()
        return run

    @staticmethod
    def _fresh_manifest(experiment: str, config: dict, hash12: str) -> dict:
        # A JSON round trip stores exactly what will be read back (paths as strings, ...).
        config_plain = json.loads(canonical_json(config))
        return {
            "schema": MANIFEST_SCHEMA,
            "run_id": _new_run_id(),
            "experiment": experiment,
            "status": STATUS_RUNNING,
            "error": None,
            "config": config_plain,
            "config_hash": hash12,
            "model": {"name": config_plain.get("model")},
            "prompts": {},
            "seed": config_plain.get("seed"),
            "tokens": {},
            "timings": {"started": now_iso(), "finished": None},
            "versions": environment.package_versions(),
            "code": environment.code_commit(),
            "host": environment.host_info(),
            "tables": [],
            "headline": {},
        }

    def _clear_outputs(self) -> None:
        """Remove what a previous run of this config wrote (a forced re-run starts clean)."""
        shutil.rmtree(self.path / PARTIAL_DIR, ignore_errors=True)
        shutil.rmtree(self.path / PLOTS_DIR, ignore_errors=True)
        for name in self.manifest.get("tables", []):
            for suffix in (".parquet", ".csv"):
                with contextlib.suppress(FileNotFoundError):
                    (self.path / f"{name}{suffix}").unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.path / "summary.md").unlink()

    # ------------------------------------------------------------------ manifest

    @property
    def run_id(self) -> str:
        return self.manifest["run_id"]

    @property
    def status(self) -> str:
        return self.manifest["status"]

    def _write_manifest(self) -> None:
        text = json.dumps(self.manifest, indent=2, sort_keys=False, default=json_default)
        with _writing(self.path / MANIFEST_NAME):
            atomic_write_text(self.path / MANIFEST_NAME, text + "\n")

    def _register(self) -> None:
        """Record the run in the index. Best effort: the manifest is the source of truth and
        ``reindex`` rebuilds the index from manifests, so an index error only warns."""
        try:
            register_run(self.index_root, self.manifest, self.path)
        except Exception as err:  # the run itself must not die because of the index
            warnings.warn(
                f"run {self.run_id} not recorded in the index of {self.index_root} "
                f"({one_line_error(err)}); run `rloop runs list --reindex` to recover",
                RuntimeWarning,
                stacklevel=3,
            )

    def update_manifest(self, **fields: object) -> None:
        """Set manifest fields and rewrite it atomically. A dict value is merged into an
        existing dict field (``update_manifest(timings={"measure": 3.2})`` keeps ``started``);
        anything else replaces the field."""
        for key, value in fields.items():
            current = self.manifest.get(key)
            if isinstance(value, dict) and isinstance(current, dict):
                current.update(json.loads(json.dumps(value, default=json_default)))
            else:
                self.manifest[key] = json.loads(json.dumps(value, default=json_default))
        self._written_since_open = True
        self._write_manifest()

    def set_model(self, loaded_model_info: dict) -> None:
        """Record the model: name, source, path, revision, weights_sha256, dtype, device, ..."""
        self.update_manifest(model=dict(loaded_model_info))

    def set_prompts(self, info: dict) -> None:
        """Record the prompt bank: source, version, sha256, n (and token counts if given)."""
        self.update_manifest(prompts=dict(info))

    # ------------------------------------------------------------------ checkpoints

    @property
    def partial_dir(self) -> Path:
        return self.path / PARTIAL_DIR

    def save_partial(self, key: str, rows: list[dict] | pd.DataFrame) -> None:
        """Save one resume checkpoint (e.g. the rows of one batch) as ``partial/<key>.parquet``.

        Atomic: after a crash a key is either fully saved or absent from ``finished_keys``.
        """
        _check_name(key, "checkpoint")
        frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
        self._written_since_open = True
        path = self.partial_dir / f"{key}.parquet"
        with _writing(path):
            self.partial_dir.mkdir(exist_ok=True)
            atomic_write(path, lambda tmp: frame.to_parquet(tmp))
        self.manifest["heartbeat"] = now_iso()  # shows the owner is alive and working
        self._write_manifest()

    def finished_keys(self) -> set[str]:
        """Keys of the checkpoints saved so far (this session or before an interruption)."""
        if not self.partial_dir.is_dir():
            return set()
        return {p.stem for p in self.partial_dir.glob("*.parquet") if not p.name.startswith(".")}

    def load_partial_frames(self, keys: set[str]) -> dict[str, pd.DataFrame]:
        """The checkpoints ``keys`` (those that exist), each as its own frame."""
        found = self.finished_keys() & set(keys)
        return {key: pd.read_parquet(self.partial_dir / f"{key}.parquet") for key in sorted(found)}

    def load_partials(self) -> pd.DataFrame:
        """All checkpoints concatenated in key order; an empty frame when there are none."""
        keys = sorted(self.finished_keys())
        frames = [pd.read_parquet(self.partial_dir / f"{key}.parquet") for key in keys]
        frames = [frame for frame in frames if len(frame.columns)]
        if not frames:
            return pd.DataFrame()
        return pd.concat(frames, ignore_index=True)

    # ------------------------------------------------------------------ outputs

    def write_table(self, name: str, df: pd.DataFrame) -> None:
        """Write ``<name>.parquet`` and ``<name>.csv`` atomically and list the table in the
        manifest."""
        _check_name(name, "table")
        self._written_since_open = True
        with _writing(self.path / f"{name}.parquet"):
            atomic_write(self.path / f"{name}.parquet", lambda tmp: df.to_parquet(tmp, index=False))
        with _writing(self.path / f"{name}.csv"):
            atomic_write(self.path / f"{name}.csv", lambda tmp: df.to_csv(tmp, index=False))
        if name not in self.manifest.setdefault("tables", []):
            self.manifest["tables"].append(name)
            self._write_manifest()

    def write_summary(self, markdown: str) -> None:
        """Write ``summary.md`` atomically."""
        self._written_since_open = True
        with _writing(self.path / "summary.md"):
            atomic_write_text(self.path / "summary.md", markdown)

    def plot_path(self, name: str) -> Path:
        """``plots/<name>.png`` (the directory is created). Save with
        ``atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))`` to stay atomic."""
        _check_name(name, "plot")
        self._written_since_open = True
        plots = self.path / PLOTS_DIR
        with _writing(plots):
            plots.mkdir(exist_ok=True)
        return plots / f"{name}.png"

    # ------------------------------------------------------------------ ending

    def complete(self) -> None:
        """Mark the run complete, record the finish time, drop ``partial/``, index it."""
        finished = now_iso()
        timings = self.manifest.setdefault("timings", {})
        timings["finished"] = finished
        started = timings.get("started")
        if started:
            elapsed = dt.datetime.fromisoformat(finished) - dt.datetime.fromisoformat(started)
            timings["elapsed_seconds"] = elapsed.total_seconds()
        self.manifest["status"] = STATUS_COMPLETE
        self.manifest["error"] = None
        self._completed_here = True
        self._write_manifest()  # first: a crash after this leaves a complete run + stale checkpoints
        shutil.rmtree(self.partial_dir, ignore_errors=True)
        self._register()

    def fail(self, error: BaseException) -> None:
        """Mark the run failed with a one-line error (full traceback kept in the manifest)."""
        self.manifest["status"] = STATUS_FAILED
        self.manifest["error"] = one_line_error(error)
        self.manifest["error_traceback"] = "".join(
            traceback.format_exception(type(error), error, error.__traceback__)
        )[-20000:]
        self.manifest.setdefault("timings", {})["failed"] = now_iso()
        self._write_manifest()
        self._register()

    def release(self) -> None:
        """Release the run directory's lock (also released when the process exits)."""
        if self._lock is not None and _HELD_LOCKS.get(self.path) == self._lock:
            del _HELD_LOCKS[self.path]
            with contextlib.suppress(OSError):
                os.close(self._lock)
        self._lock = None

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        self.release()
        if exc is None:
            return False
        # A write outside the store's own writers (a plot, a report) that found the disk full
        # is the same one line as the store's, naming the file; the run stays resumable.
        disk_full = isinstance(exc, OSError) and exc.errno in DISK_FULL
        reported = write_error(_written_path(exc, self.path), exc) if disk_full else exc
        # A complete run stays complete only if its outputs are the ones it completed with.
        still_complete = self.manifest.get("status") == STATUS_COMPLETE and (
            self._completed_here or not self._written_since_open
        )
        if not still_complete:
            with contextlib.suppress(Exception):  # never mask the original error
                self.fail(reported)
        if reported is not exc:
            raise reported from None
        return False


_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{12}\.tmp$")  # atomic_write's temporary files


def _written_path(error: OSError, run_dir: Path) -> Path:
    """The file a failed write was for (an atomic write's temporary name mapped back to the
    target), or the run directory when the error names none."""
    if not error.filename:
        return run_dir
    path = Path(os.fsdecode(error.filename))
    match = _TMP_NAME.match(path.name)
    return path.with_name(match.group("name")) if match else path
