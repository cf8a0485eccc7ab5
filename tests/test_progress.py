"""Progress without a terminal: periodic plain lines on stderr (nohup, SLURM logs); in a
Jupyter kernel: one HTML bar updated in place (IPython replaced by a recording fake)."""

from __future__ import annotations

import re
import sys
import types

import rloop.progress as progress


def test_plain_lines_when_stderr_is_not_a_terminal(monkeypatch, capsys) -> None:
    monkeypatch.setenv("RLOOP_PROGRESS", "1")
    monkeypatch.setattr(progress, "PLAIN_INTERVAL_SECONDS", 0.0)  # a line on every advance
    with progress.progress_bar("measuring PR", total=3) as advance:
        for _ in range(3):
            advance(1)
    lines = capsys.readouterr().err.splitlines()  # capsys' stderr is not a TTY
    assert [line.split(" (")[0] for line in lines] == [
        "measuring PR: 1/3",
        "measuring PR: 2/3",
        "measuring PR: 3/3",
    ]


def test_progress_can_be_switched_off(monkeypatch, capsys) -> None:
    monkeypatch.setenv("RLOOP_PROGRESS", "0")
    with progress.progress_bar("quiet", total=2) as advance:
        advance(2)
    assert capsys.readouterr().err == ""


class ZMQInteractiveShell:  # the class name IPython's Jupyter kernel shell has
    pass


class TerminalInteractiveShell:
    pass


class _Handle:
    def __init__(self, shown: list[dict]) -> None:
        self.shown = shown

    def update(self, bundle: dict, raw: bool = False) -> None:
        assert raw
        self.shown.append(bundle)


def _fake_ipython(monkeypatch, shell: object) -> list[dict]:
    """IPython with ``shell`` as the running shell; returns the list of displayed bundles."""
    shown: list[dict] = []
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: shell
    display_module = types.ModuleType("IPython.display")

    def display(bundle: dict, raw: bool = False, display_id: bool = False) -> _Handle:
        assert raw and display_id
        shown.append(bundle)
        return _Handle(shown)

    display_module.display = display
    ipython.display = display_module
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", display_module)
    return shown


def test_notebook_bar_updates_one_display_in_place(monkeypatch, capsys) -> None:
    monkeypatch.setenv("RLOOP_PROGRESS", "1")
    monkeypatch.setattr(progress, "NOTEBOOK_INTERVAL_SECONDS", 0.0)  # redraw on every advance
    shown = _fake_ipython(monkeypatch, ZMQInteractiveShell())
    assert progress.in_notebook()
    with progress.progress_bar("ablating <heads>", total=4) as advance:
        advance(1)
        advance(3)
    # first display at 0, a redraw per advance, the final state once more
    values = [re.search(r'value="(\d+)" max="(\d+)"', b["text/html"]).groups() for b in shown]
    assert values == [("0", "4"), ("1", "4"), ("4", "4"), ("4", "4")]
    assert [b["text/plain"].split(" (")[0] for b in shown] == [
        "ablating <heads>: 0/4",
        "ablating <heads>: 1/4",
        "ablating <heads>: 4/4",
        "ablating <heads>: 4/4",
    ]
    assert "ablating &lt;heads&gt;: 4/4" in shown[-1]["text/html"]  # escaped in HTML
    assert capsys.readouterr().err == ""  # nothing on stderr in a notebook


def test_notebook_bar_is_throttled_and_ends_on_the_final_count(monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_PROGRESS", "1")
    monkeypatch.setattr(progress, "NOTEBOOK_INTERVAL_SECONDS", 3600.0)
    shown = _fake_ipython(monkeypatch, ZMQInteractiveShell())
    with progress.progress_bar("many", total=1000) as advance:
        for _ in range(1000):
            advance(1)
    assert len(shown) == 2  # the first draw and the last, not 1000 kernel messages
    assert 'value="1000" max="1000"' in shown[-1]["text/html"]


def test_notebook_bar_off_and_terminal_ipython(monkeypatch, capsys) -> None:
    shown = _fake_ipython(monkeypatch, ZMQInteractiveShell())
    monkeypatch.setenv("RLOOP_PROGRESS", "0")
    with progress.progress_bar("quiet", total=2) as advance:
        advance(2)
    assert shown == [] and capsys.readouterr().err == ""
    # IPython in a terminal is not a notebook: the plain/terminal paths apply
    monkeypatch.setenv("RLOOP_PROGRESS", "1")
    _fake_ipython(monkeypatch, TerminalInteractiveShell())
    assert not progress.in_notebook()
    monkeypatch.delitem(sys.modules, "IPython")
    assert not progress.in_notebook()


def test_a_slow_step_ends_with_one_final_line(monkeypatch, capsys) -> None:
    """After a step of over a second the final count is printed once: not repeated when the
    last periodic line already showed it, and printed when no periodic line did."""
    monkeypatch.setenv("RLOOP_PROGRESS", "1")
    clock = iter(range(0, 100, 2))  # every reading of the clock is 2 s later
    monkeypatch.setattr(progress.time, "monotonic", lambda: float(next(clock)))
    monkeypatch.setattr(progress, "PLAIN_INTERVAL_SECONDS", 0.0)
    with progress.progress_bar("generating", total=2) as advance:
        advance(1)
        advance(1)
    counts = [line.split(" (")[0] for line in capsys.readouterr().err.splitlines()]
    assert counts == ["generating: 1/2", "generating: 2/2"]
    monkeypatch.setattr(progress, "PLAIN_INTERVAL_SECONDS", 1000.0)
    with progress.progress_bar("generating", total=2) as advance:
        advance(2)
    counts = [line.split(" (")[0] for line in capsys.readouterr().err.splitlines()]
    assert counts == ["generating: 2/2"]
