"""The ``rloop`` typer app: every command group added in the order ``rloop --help`` lists."""

from __future__ import annotations

import typer

from rloop.cli import causal, checks, contraction, generation, steering, sweeps
from rloop.cli.models import models_app
from rloop.cli.runs import runs_app

app = typer.Typer(
    help=(
        "rloop: geometry (participation ratio, R_V) of transformer activations and the causal "
        "experiments around it.\n\nExample: rloop contraction --model smollm2-135m"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

contraction.register(app)
causal.register(app)
sweeps.register(app)
generation.register(app)
checks.register(app)
steering.register(app)
app.add_typer(models_app, name="models")
app.add_typer(runs_app, name="runs", help="List, show and compare runs in the run store.")
