"""Progress for anything that takes more than a second, wherever rloop runs:

- in a Jupyter notebook (JupyterLab, classic, VS Code, Colab): an HTML progress bar in the
  cell's output, updated in place through IPython's display handles (no ipywidgets needed),
  left showing the final count and time;
- in a terminal: a rich bar on stderr, removed when done;
- anywhere else (nohup, SLURM logs, CI): periodic plain lines on stderr.

``RLOOP_PROGRESS=0`` hides all of them. :func:`quiet_transformers` silences transformers' own
bars and logs (e.g. "Loading weights") while rloop loads a model, so they do not interleave.
"""

from __future__ import annotations

import html
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

_console = Console(stderr=True)
PLAIN_INTERVAL_SECONDS = float(os.environ.get("RLOOP_PROGRESS_INTERVAL", "10"))
NOTEBOOK_INTERVAL_SECONDS = 0.25  # at most four redraws a second: a kernel message each


def progress_enabled() -> bool:
    return os.environ.get("RLOOP_PROGRESS", "1") != "0"


def in_notebook() -> bool:
    """True inside a Jupyter kernel (a ZMQ shell or Colab), False in a terminal IPython."""
    ipython = sys.modules.get("IPython")  # never imported here: only present in IPython
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is None:
        return False
    kind = type(shell)
    return kind.__name__ == "ZMQInteractiveShell" or "google.colab" in kind.__module__


def _status(description: str, done: int, total: int, started: float) -> str:
    return f"{description}: {done}/{total} ({time.monotonic() - started:.0f} s)"


def notebook_bundle(description: str, done: int, total: int, started: float) -> dict[str, str]:
    """The display data of a notebook bar: an HTML ``<progress>`` element and the same
    status as plain text (what nbconvert or a text-only front end shows)."""
    text = _status(description, done, total, started)
    bar = f'<progress value="{done}" max="{max(total, 1)}" style="width: 24em"></progress>'
    return {
        "text/html": f'<div class="rloop-progress">{bar} <code>{html.escape(text)}</code></div>',
        "text/plain": text,
    }


@contextmanager
def _notebook_bar(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """An HTML bar in the running cell's output, redrawn at most every
    NOTEBOOK_INTERVAL_SECONDS and once at the end."""
    from IPython.display import display  # noqa: PLC0415 - IPython exists only in a kernel

    started = last = time.monotonic()
    done = 0
    handle = display(notebook_bundle(description, 0, total, started), raw=True, display_id=True)

    def advance(n: int = 1) -> None:
        nonlocal done, last
        done += n
        if time.monotonic() - last >= NOTEBOOK_INTERVAL_SECONDS:
            last = time.monotonic()
            handle.update(notebook_bundle(description, done, total, started), raw=True)

    try:
        yield advance
    finally:
        handle.update(notebook_bundle(description, done, total, started), raw=True)


@contextmanager
def _plain_lines(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """Print 'description: done/total (elapsed)' every PLAIN_INTERVAL_SECONDS and at the end."""
    started = last = time.monotonic()
    done = 0
    shown = -1  # the count of the last line printed

    def line() -> None:
        nonlocal shown
        shown = done
        print(_status(description, done, total, started), file=sys.stderr)

    def advance(n: int = 1) -> None:
        nonlocal done, last
        done += n
        if time.monotonic() - last >= PLAIN_INTERVAL_SECONDS:
            last = time.monotonic()
            line()

    yield advance
    if time.monotonic() - started >= 1.0 and done != shown:
        line()


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; shows progress in a notebook's output or on stderr (set
    RLOOP_PROGRESS=0 to hide it)."""
    if not progress_enabled():
        yield lambda n=1: None
        return
    if in_notebook():
        with _notebook_bar(description, total) as advance:
            yield advance
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


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Inside: transformers logs errors only and shows no progress bars of its own (its
    "Loading weights" bar would interleave with rloop's). The caller's verbosity and
    progress-bar setting are restored on exit, also on error."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        else:
            hf_logging.disable_progress_bar()
