"""`rloop runs ...`: list, show and compare the runs of a run store."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from rloop.cli.options import out_console, run_guarded
from rloop.runs import compare_runs, list_runs, reindex, show_run
from rloop.runs.index import flatten

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

Root = Annotated[
    Path | None,
    typer.Option("--root", help="Run store to read (default: $RLOOP_RUNS or ./rloop-runs)."),
]


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
    root: Root = None,
    experiment: Annotated[
        str | None, typer.Option("--experiment", "-e", help="Only this experiment.")
    ] = None,
    status: Annotated[
        str | None,
        typer.Option("--status", "-s", help="running | interrupted | complete | failed | corrupt."),
    ] = None,
    rebuild: Annotated[
        bool, typer.Option("--reindex", help="Rebuild the index from the manifests on disk first.")
    ] = False,
    metrics: Annotated[
        bool, typer.Option("--metrics", help="Add every run's headline metrics as columns (wide).")
    ] = False,
) -> None:
    """List runs, oldest first (add --metrics for their headline metrics). A failed,
    interrupted or corrupt run shows why in the reason column.

    Example: rloop runs list --experiment contraction --status complete
    """
    if rebuild:
        run_guarded(reindex, root)
    runs = run_guarded(list_runs, root, experiment=experiment, status=status)
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
        if "reason" in runs.columns and runs["reason"].map(_cell).any():
            base.append("reason")  # why a run failed, was interrupted or is corrupt
        runs = runs[[c for c in base if c in runs.columns]]
    table = Table(title=f"{len(runs)} run(s)")
    for column in runs.columns:
        table.add_column(str(column), overflow="fold", no_wrap=column == "id")
    for record in runs.itertuples(index=False):
        table.add_row(*(_cell(value) for value in record))
    out_console.print(table)


@runs_app.command("show")
def show_command(
    run: Annotated[str, typer.Argument(help="Run id, directory name, unique id prefix or path.")],
    root: Root = None,
) -> None:
    """Show one run: status, model, prompts, versions, headline metrics, config and files.

    Example: rloop runs show rloop-runs/contraction-smollm2-135m-1a2b3c4d5e6f
    """
    manifest = run_guarded(show_run, run, root)
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
    runs: Annotated[list[str], typer.Argument(help="Two or more run ids, names or paths.")],
    root: Root = None,
) -> None:
    """Compare runs side by side: headline metrics and the config fields that differ.

    Example: rloop runs compare 20250131-120000-3fa9c1 20250131-130000-77b0e2
    """
    comparison = run_guarded(compare_runs, runs, root)
    table = Table(title=f"{comparison.shape[1]} runs")
    table.add_column("field", style="bold")
    for label in comparison.columns:
        table.add_column(str(label), overflow="fold")
    for field, values in comparison.iterrows():
        table.add_row(str(field), *(_cell(value) for value in values))
    out_console.print(table)
