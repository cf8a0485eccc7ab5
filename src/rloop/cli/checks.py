"""``rloop verify`` (fidelity on your model), ``rloop subspace`` (the contracted subspace) and
``rloop report`` (the HTML site over the run store)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rloop.cli.options import (
    AS_LAYER_PAIR,
    ContrastOptions,
    Layers,
    ModelOptions,
    NBoot,
    Point,
    Prompts,
    RunOptions,
    Seed,
    Window,
    command,
    experiment,
    out_console,
)
from rloop.experiments.subspace import SubspaceConfig, run_subspace
from rloop.experiments.verify import VerifyConfig, run_verify
from rloop.runs import runs_root
from rloop.runs.site import build_site


@experiment(VerifyConfig, run_verify)
def verify(
    *,
    loaded: ModelOptions,
    prompts: Prompts = None,
    layers: Annotated[
        str | None, typer.Option(help="EARLY,LATE layers of R_V."), AS_LAYER_PAIR
    ] = None,
    window: Window = 16,
    n_prompts: Annotated[int, typer.Option(help="Prompts of different lengths checked.")] = 4,
    heads_sample: Annotated[int, typer.Option(help="Heads checked for ablation.")] = 3,
    seed: Seed = 0,
    run: RunOptions,
) -> None:
    """Fidelity self-check on your model: PASS / FAIL and the measured error of each check.

    The checks run in the model's own dtype and device and are written as a run record.

    Examples:

      rloop verify                                   # the embedded SmolLM2-135M

      rloop verify --model ./my-finetune --dtype bfloat16 --device cuda
    """


@experiment(SubspaceConfig, run_subspace)
def subspace(
    *,
    loaded: ModelOptions,
    prompts: Prompts = None,
    layer: Annotated[
        int | None, typer.Option(help="Layer measured (default: late R_V layer).")
    ] = None,
    point: Point = "v",
    k: Annotated[int, typer.Option(help="Top directions per group.")] = 8,
    readout_top_n: Annotated[
        int, typer.Option(help="Tokens per direction and sign in the logit-lens read-out.")
    ] = 10,
    contrast: ContrastOptions,
    layers: Layers = None,
    window: Window = 16,
    n_boot: NBoot = 2000,
    seed: Seed = 0,
    run: RunOptions,
) -> None:
    """The contracted subspace: top-k directions, principal angles, stability, relay.

    Per group the top-k directions of the windows; principal angles between the recursive and
    baseline subspaces (bootstrap, random-halves null); split-half stability; layer-to-layer
    overlap.

    Examples:

      rloop subspace --k 8

      rloop subspace --point resid_post --layer 20 --layers 10-29 --readout-top-n 20
    """


@command()
def report(
    *,
    run_ids: Annotated[
        list[str] | None, typer.Argument(help="Runs to include (default all).")
    ] = None,
    runs: Annotated[
        Path | None, typer.Option(help="Run store (default: $RLOOP_RUNS or ./rloop-runs).")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Site directory.")] = Path(
        "rloop-report"
    ),
) -> None:
    """A self-contained static HTML site over the run store (index, run pages, comparisons).

    It works offline, opened from disk or served by `python -m http.server`.

    Examples:

      rloop report                          # every run, into ./rloop-report

      rloop report --runs /shared/rloop-runs --out site RUN_ID RUN_ID
    """
    index = build_site(runs if runs is not None else runs_root(), out, run_ids or None)
    out_console.print(f"report: {index}")


def register(app: typer.Typer) -> None:
    """Add ``verify``, ``subspace`` and ``report`` to ``app``."""
    app.command("verify")(verify)
    app.command("subspace")(subspace)
    app.command("report")(report)
