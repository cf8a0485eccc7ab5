"""Progress without a terminal: periodic plain lines on stderr (nohup, SLURM logs)."""

from __future__ import annotations

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
