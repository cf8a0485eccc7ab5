"""rloop command line. Every command prints one-line errors for bad input and exits 2."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from rloop.errors import ConfigError, RloopError

app = typer.Typer(
    help=(
        "rloop: geometry (participation ratio, R_V) of transformer activations and the causal "
        "experiments around it.\n\nExample: rloop contraction --model smollm2-135m"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="List the model registry; fetch models that are not embedded.")
app.add_typer(models_app, name="models")

out_console = Console()
err_console = Console(stderr=True)


def fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def parse_int_list(text: str | None, what: str, count: int | None = None) -> list[int] | None:
    """'5,28' -> [5, 28]; 'A-B' ranges allowed when count is None."""
    if text is None:
        return None
    values: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part and count is None:
                lo, hi = part.split("-")
                values.extend(range(int(lo), int(hi) + 1))
            else:
                values.append(int(part))
    except ValueError:
        raise ConfigError(f"cannot read {what} {text!r}: write integers like 5,28") from None
    if count is not None and len(values) != count:
        raise ConfigError(f"{what} needs {count} integers separated by a comma, got {text!r}")
    return values


def run_guarded(fn, *args, **kwargs):
    """Call fn; RloopError (and a few library errors with clear meaning) become one line."""
    try:
        return fn(*args, **kwargs)
    except RloopError as err:
        fail(str(err))
    except KeyboardInterrupt:
        fail("interrupted; run the same command again to resume where it stopped")


@app.command()
def contraction(
    model: str = typer.Option(
        "smollm2-135m", "--model", "-m", help="Registry name, hub id, local dir or .gguf file."
    ),
    revision: str = typer.Option(None, help="Hub revision, e.g. step5000 for Pythia checkpoints."),
    prompts: Path = typer.Option(
        None,
        "--prompts",
        "-p",
        help="Prompt file (.json/.jsonl/.csv/.txt); default: the shipped bank.",
    ),
    groups: str = typer.Option(None, help="Comma-separated groups to keep, e.g. L5,factual."),
    layers: str = typer.Option(
        None, help="EARLY,LATE layer indices, e.g. 5,28; default by depth (15%/84%)."
    ),
    window: int = typer.Option(16, help="Window: the last W real tokens of each prompt."),
    pr_mode: str = typer.Option("both", help="per-head | whole | both."),
    point: str = typer.Option(
        "v", help="Hook point: v, k, q, z, attn_out, mlp_out, resid_pre, resid_post."
    ),
    recursive_group: str = typer.Option("L5", help="Recursive group of the contrast."),
    baseline_group: str = typer.Option("factual", help="Baseline group of the contrast."),
    batch_size: int = typer.Option(16, help="Prompts per forward pass."),
    n_boot: int = typer.Option(2000, help="Bootstrap resamples for CIs."),
    seed: int = typer.Option(0, help="Seed of every bootstrap and permutation."),
    dtype: str = typer.Option(
        None, help="float32 | bfloat16 | float16 | float64 (default: float32 CPU, bfloat16 GPU)."
    ),
    device: str = typer.Option(None, help="cpu | cuda | cuda:1 ... (default: auto)."),
    out: Path = typer.Option(
        None,
        "--out",
        "-o",
        help="Run directory (default: rloop-runs/contraction-<model>-<config hash>).",
    ),
    force: bool = typer.Option(
        False, help="Recompute even if the run directory holds a complete run."
    ),
) -> None:
    """R_V per prompt and group, recursive-vs-baseline statistics, layer sweep and plots.

    Examples:

      rloop contraction                                   # embedded SmolLM2-135M, shipped bank

      rloop contraction --model EleutherAI/pythia-2.8b --layers 5,28 --window 16

      rloop contraction --prompts my_prompts.csv --groups recursive,baseline \\
          --recursive-group recursive --baseline-group baseline --pr-mode whole
    """
    from rloop.experiments.contraction import ContractionConfig, run_contraction

    def go():
        modes = ["per-head", "whole"] if pr_mode == "both" else [pr_mode]
        config = ContractionConfig(
            model=model,
            revision=revision,
            prompts=str(prompts) if prompts is not None else None,
            groups=[g.strip() for g in groups.split(",")] if groups else None,
            layers=parse_int_list(layers, "--layers", count=2),
            window=window,
            pr_modes=modes,
            point=point,
            recursive_group=recursive_group,
            baseline_group=baseline_group,
            batch_size=batch_size,
            n_boot=n_boot,
            seed=seed,
            dtype=dtype,
            device=device,
        )
        run_dir, already, headline = run_contraction(config, out=out, force=force)
        _print_outcome(run_dir, already, headline)

    run_guarded(go)


def _print_outcome(run_dir: Path, already: bool, headline: dict) -> None:
    if already:
        out_console.print(f"already complete (use --force to recompute): {run_dir}")
    for key, value in headline.items():
        if isinstance(value, float):
            out_console.print(f"  {key}: {value:.4f}")
        else:
            out_console.print(f"  {key}: {value}")
    out_console.print(f"report: {Path(run_dir) / 'summary.md'}")


@models_app.callback(invoke_without_command=True)
def models(ctx: typer.Context) -> None:
    """List registered models and whether each is available offline now."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from rloop.models import list_models

    table = Table("name", "family", "source", "available offline", "notes")
    for info in run_guarded(list_models):
        table.add_row(
            info.name,
            info.family,
            info.source,
            "yes" if info.available else "no",
            info.notes,
        )
    out_console.print(table)


@models_app.command("fetch")
def models_fetch(name: str = typer.Argument(..., help="Registry name, e.g. gemma-3-270m.")) -> None:
    """Download (from PyPI) and cache a model the registry can fetch, e.g. gemma-3-270m."""
    from rloop.models import fetch_model

    path = run_guarded(fetch_model, name)
    out_console.print(f"cached: {path}")


def _mount_optional_apps() -> None:
    from rloop.cli.runs import runs_app

    app.add_typer(runs_app, name="runs", help="List, show and compare runs in the run store.")
    from rloop.cli import causal as cli_causal
    from rloop.cli import generation as cli_generation
    from rloop.cli import sweeps as cli_sweeps

    cli_causal.register(app)
    cli_sweeps.register(app)
    cli_generation.register(app)


_mount_optional_apps()


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
