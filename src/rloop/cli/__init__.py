"""rloop command line: ``app`` is the console entry point (``rloop = "rloop.cli:app"``).

Modules: ``app`` (the typer app and its command table), ``options`` (options declared once,
option groups, error and result printing), ``parsing`` (list and range readers), and one
module per command group: ``contraction``, ``causal``, ``generation``, ``sweeps``, ``runs``,
``models``. Bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

from rloop.cli.app import app

__all__ = ["app"]
