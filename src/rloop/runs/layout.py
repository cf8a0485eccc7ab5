"""Layout of the run store: file names, statuses, the store root, run-directory names,
canonical JSON and config hashes, atomic writes and reading a manifest. Shared by the store
(which writes runs) and the index (which reads them), so neither imports the other's
internals."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import secrets
import socket
from collections.abc import Callable
from pathlib import Path

from rloop.errors import RunStoreError

MANIFEST_NAME = "manifest.json"
PARTIAL_DIR = "partial"
PLOTS_DIR = "plots"
MANIFEST_SCHEMA = 1
RUNS_ROOT_ENV = "RLOOP_RUNS"
DEFAULT_RUNS_ROOT = "rloop-runs"

STATUS_RUNNING = "running"
STATUS_COMPLETE = "complete"
STATUS_FAILED = "failed"


# ---------------------------------------------------------------------------- JSON and hashing


def json_default(value: object) -> object:
    """Make config/manifest values JSON-serialisable: paths, numpy scalars/arrays, sets."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays, torch tensors
        return value.tolist()
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return str(value)


def canonical_json(value: object) -> str:
    """Compact JSON with sorted keys: equal configs give equal strings."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), default=json_default, ensure_ascii=False
    )


def config_hash(config: dict) -> str:
    """First 12 hex digits of the sha256 of the canonical JSON of ``config``.

    Key order does not matter; tuples hash like lists and paths like their strings, so a
    config read back from a manifest hashes like the one that wrote it.
    """
    return hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()[:12]


def now_iso() -> str:
    """Current UTC time, ISO 8601 with milliseconds, e.g. ``2025-01-31T12:00:00.123+00:00``."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


# ---------------------------------------------------------------------------- paths


def runs_root() -> Path:
    """Root of the run store: ``$RLOOP_RUNS`` if set, else ``./rloop-runs``."""
    return Path(os.environ.get(RUNS_ROOT_ENV) or DEFAULT_RUNS_ROOT).expanduser()


def path_slug(text: str, max_length: int = 80) -> str:
    """A file-name-safe version of a model name: ``org/model`` -> ``org--model``."""
    slug = text.strip().replace("/", "--").replace("\\", "--")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", slug).strip("._-")
    return slug[:max_length] or "model"


def default_run_dir(root: Path, experiment: str, model_name: str, config: dict) -> Path:
    """``root/<experiment>-<model>-<config hash>``: the same request always lands in the same
    directory, which is what lets an interrupted run resume."""
    return Path(root) / f"{path_slug(experiment)}-{path_slug(model_name)}-{config_hash(config)}"


# ---------------------------------------------------------------------------- atomic writes


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then move it into place.

    If ``write`` raises (or the process dies), ``path`` keeps its previous content; the
    temporary file is removed on exceptions (a killed process may leave a hidden ``.*.tmp``).
    """
    path = Path(path)
    tmp_path = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    # os.open with mode 0o666 honours the umask (tempfile.mkstemp would force 0o600).
    os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_manifest(run_dir: Path) -> dict:
    """The manifest of ``run_dir``; RunStoreError if it is missing or unreadable."""
    manifest_path = Path(run_dir) / MANIFEST_NAME
    try:
        return json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunStoreError(
            f"{run_dir} is not a run directory (no {MANIFEST_NAME}); "
            "list runs with `rloop runs list`"
        ) from None
    except (OSError, ValueError) as err:
        raise RunStoreError(f"cannot read {manifest_path}: {err}") from None


def one_line_error(error: BaseException, max_length: int = 500) -> str:
    """``"ValueError: first line of the message"``, at most ``max_length`` characters."""
    message = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {message[0]}" if message else type(error).__name__
    return text if len(text) <= max_length else text[: max_length - 3] + "..."


STATUS_INTERRUPTED = "interrupted"


def owner_state(manifest: dict) -> tuple[str, str | None]:
    """The live status of a run: a manifest that says "running" whose writing process is gone
    (same host, pid no longer alive) is "interrupted"; otherwise the manifest's status. The
    second value says why, when the status was judged from the process."""
    status = manifest.get("status")
    if status != STATUS_RUNNING:
        return status, None
    host = manifest.get("host") if isinstance(manifest.get("host"), dict) else {}
    hostname, pid = host.get("hostname"), host.get("pid")
    if hostname and hostname != socket.gethostname():
        return STATUS_RUNNING, f"written on host {hostname}; its process cannot be checked here"
    if not isinstance(pid, int) or pid <= 0:
        return STATUS_INTERRUPTED, "no owning process recorded"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return STATUS_INTERRUPTED, f"its process {pid} is no longer running"
    except OSError:
        pass  # alive, owned by another user
    return STATUS_RUNNING, f"process {pid} is alive"
