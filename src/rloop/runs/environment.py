"""What a run records about the software and machine it ran on: package versions, the git
commit of the rloop checkout (with a dirty flag), and the host.

Nothing here imports torch or transformers: versions come from installed package metadata,
so recording them costs milliseconds.
"""

from __future__ import annotations

import functools
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

RECORDED_PACKAGES = ("torch", "transformers", "numpy", "pandas", "pyarrow", "accelerate")


def package_version(name: str) -> str | None:
    """Installed version of distribution ``name``, or None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def package_versions() -> dict[str, str | None]:
    """Versions of python, rloop and the numerical stack, e.g. ``{"python": "3.11.7", ...}``."""

    versions: dict[str, str | None] = {
        "python": platform.python_version(),
        "rloop": package_version("rloop"),
    }
    for name in RECORDED_PACKAGES:
        versions[name] = package_version(name)
    return versions


def _git(repo: Path, *args: str) -> str | None:
    """Output of a read-only git command in ``repo``, or None when git or the repo is absent."""
    try:
        completed = subprocess.run(
            # --no-optional-locks: `status` must not rewrite the index of the checkout.
            ["git", "--no-optional-locks", "-C", str(repo), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if completed.returncode != 0:
        return None
    return completed.stdout.strip()


@functools.lru_cache(maxsize=1)
def code_commit() -> dict:
    """Git commit of the rloop source checkout: ``{"commit", "dirty", "repo"}``.

    ``commit`` is None when rloop is not running from a git checkout (e.g. installed from a
    wheel); ``dirty`` is True when tracked files differ from that commit.
    """
    package_dir = Path(__file__).resolve().parents[1]
    repo = _git(package_dir, "rev-parse", "--show-toplevel")
    if repo is None:
        return {"commit": None, "dirty": None, "repo": None}
    commit = _git(Path(repo), "rev-parse", "HEAD")
    status = _git(Path(repo), "status", "--porcelain", "--untracked-files=no")
    return {
        "commit": commit,
        "dirty": None if status is None else bool(status),
        "repo": repo,
    }


def host_info() -> dict:
    """Hostname, OS/platform, CPU count and process id of the writer."""
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "pid": os.getpid(),
        "python_executable": sys.executable,
    }
