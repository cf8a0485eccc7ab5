"""Progress for anything that takes more than a second: a rich bar on stderr in a terminal,
periodic plain lines when stderr is not a terminal (nohup, SLURM logs, CI)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

_console = Console(stderr=True)
PLAIN_INTERVAL_SECONDS = float(os.environ.get("RLOOP_PROGRESS_INTERVAL", "10"))


def progress_enabled() -> bool:
    return os.environ.get("RLOOP_PROGRESS", "1") != "0"


@contextmanager
def _plain_lines(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """Print 'description: done/total (elapsed)' every PLAIN_INTERVAL_SECONDS and at the end."""
    started = last = time.monotonic()
    done = 0

    def line() -> None:
        print(
            f"{description}: {done}/{total} ({time.monotonic() - started:.0f} s)", file=sys.stderr
        )

    def advance(n: int = 1) -> None:
        nonlocal done, last
        done += n
        if time.monotonic() - last >= PLAIN_INTERVAL_SECONDS:
            last = time.monotonic()
            line()

    yield advance
    if time.monotonic() - started >= 1.0:
        line()


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; shows progress on stderr (set RLOOP_PROGRESS=0 to hide it)."""
    if not progress_enabled():
        yield lambda n=1: None
        return
    if not sys.stderr.isatty():
        with _plain_lines(description, total) as advance:
            yield advance
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=_console,
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)
