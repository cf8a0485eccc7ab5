"""`rloop runs ...`: list, show and compare the runs of a run store."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import typer
from rich.console import Console
from rich.table import Table

from rloop.errors import RloopError

runs_app = typer.Typer(
    help=(
        "List, show and compare runs in the run store ($RLOOP_RUNS or ./rloop-runs).\n\n"
        "Examples: rloop runs list --experiment contraction; rloop runs show <id>; "
        "rloop runs compare <id> <id>"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

out_console = Console()
err_console = Console(stderr=True)

T = TypeVar("T")

ROOT_OPTION_HELP = "Run store to read (default: $RLOOP_RUNS or ./rloop-runs)."


def _guarded(action: Callable[[], T]) -> T:
    """Run ``action``; an RloopError becomes a one-line message on stderr and exit code 2."""
    try:
        return action()
    except RloopError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return str(value)


def _short_time(iso: object) -> str:
    """``2025-01-31T12:00:00.123+00:00`` -> ``2025-01-31 12:00:00`` (UTC)."""
    return str(iso)[:19].replace("T", " ") if isinstance(iso, str) else ""


@runs_app.command("list")
def list_command(
    root: Path = typer.Option(None, "--root", help=ROOT_OPTION_HELP),
    experiment: str = typer.Option(None, "--experiment", "-e", help="Only this experiment."),
    status: str = typer.Option(None, "--status", "-s", help="running | complete | failed."),
    rebuild: bool = typer.Option(
        False, "--reindex", help="Rebuild the index from the manifests on disk first."
    ),
    metrics: bool = typer.Option(
        False, "--metrics", help="Add every run's headline metrics as columns (wide)."
    ),
) -> None:
    """List runs, oldest first (add --metrics for their headline metrics).

    Example: rloop runs list --experiment contraction --status complete
    """
    from rloop.runs import list_runs, reindex

    if rebuild:
        _guarded(lambda: reindex(root))
    runs = _guarded(lambda: list_runs(root, experiment=experiment, status=status))
    if runs.empty:
        out_console.print("no runs")
        return
    # The directory name (under the store) is shorter than the path and `show` accepts it.
    runs = runs.assign(path=runs["path"].map(lambda path: Path(path).name))
    runs = runs.rename(columns={"path": "directory"})
    for column in ("started", "finished"):
        runs[column] = runs[column].map(_short_time)
    if not metrics:
        base = ["id", "experiment", "model", "status", "finished", "directory"]
        runs = runs[[c for c in base if c in runs.columns]]
    table = Table(title=f"{len(runs)} run(s)")
    for column in runs.columns:
        table.add_column(str(column), overflow="fold", no_wrap=column == "id")
    for record in runs.itertuples(index=False):
        table.add_row(*(_cell(value) for value in record))
    out_console.print(table)


@runs_app.command("show")
def show_command(
    run: str = typer.Argument(..., help="Run id, directory name, unique id prefix or path."),
    root: Path = typer.Option(None, "--root", help=ROOT_OPTION_HELP),
) -> None:
    """Show one run: status, model, prompts, versions, headline metrics, config and files.

    Example: rloop runs show rloop-runs/contraction-smollm2-135m-1a2b3c4d5e6f
    """
    from rloop.runs import show_run
    from rloop.runs.index import flatten

    manifest = _guarded(lambda: show_run(run, root))
    table = Table(title=f"run {manifest.get('run_id')}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for field in ("experiment", "status", "error", "path", "config_hash", "seed"):
        if manifest.get(field) is not None:
            table.add_row(field, _cell(manifest[field]))
    sections = ("model", "prompts", "timings", "headline", "config", "versions", "code", "files")
    for section in sections:
        values = manifest.get(section) or {}
        flat = flatten(values) if isinstance(values, dict) else {"": values}
        for name, value in flat.items():
            if section == "prompts" and name == "token_lengths":
                continue  # a per-group table; it is in manifest.json
            table.add_row(f"{section}.{name}".rstrip("."), _cell(value))
    out_console.print(table)


@runs_app.command("compare")
def compare_command(
    runs: list[str] = typer.Argument(..., help="Two or more run ids, names or paths."),
    root: Path = typer.Option(None, "--root", help=ROOT_OPTION_HELP),
) -> None:
    """Compare runs side by side: headline metrics and the config fields that differ.

    Example: rloop runs compare 20250131-120000-3fa9c1 20250131-130000-77b0e2
    """
    from rloop.runs import compare_runs

    comparison = _guarded(lambda: compare_runs(runs, root))
    table = Table(title=f"{comparison.shape[1]} runs")
    table.add_column("field", style="bold")
    for label in comparison.columns:
        table.add_column(str(label), overflow="fold")
    for field, values in comparison.iterrows():
        table.add_row(str(field), *(_cell(value) for value in values))
    out_console.print(table)
