"""Commands across models: ``rloop gain``, ``rloop scaling``, ``rloop checkpoints``.

A job (one model or checkpoint) that fails is recorded in the run and the others go on; the
command then lists the failed jobs on stderr and exits with code 3 (:data:`FAILED_JOBS_EXIT`)
instead of 0, so a script or a cluster scheduler sees it. Bad input is exit code 2, before
anything is written, as everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from rloop.cli.options import (
    BatchSize,
    ContractionOptions,
    ContrastOptions,
    ExecutorOptions,
    Model,
    ModelOptions,
    Models,
    NBoot,
    PromptOptions,
    Revision,
    RunOptions,
    Seed,
    command,
    err_console,
    out_console,
    with_help,
)
from rloop.cli.parsing import parse_names
from rloop.experiments.executors import make_executor
from rloop.experiments.gain import GainConfig, run_gain
from rloop.experiments.sweeps import (
    FAILED_JOBS_EXIT,
    CheckpointConfig,
    ContractionSettings,
    ScalingConfig,
    failed_jobs,
    run_checkpoints,
    run_scaling,
)

# Across models, --device auto spreads each model over every GPU (device_map="auto").
SPREAD_DEVICE = {"device": "cpu | cuda | auto (spread over all GPUs)."}
ManyModels = with_help(Models, "Comma-separated models; replaces --model.")
RevisionsOf = with_help(Model, "Hub id the revisions belong to.")
# A sweep's --force rebuilds its tables; the runs of finished jobs are kept.
SWEEP_RUN = {
    "out": "Sweep run directory.",
    "force": "Rebuild the tables and retry failed jobs (finished job runs are reused).",
}


def exit_on_failed_jobs(run_dir: Path, what: str = "job") -> None:
    """List the failed jobs of a finished sweep on stderr and exit with code 3, if any."""
    failures = failed_jobs(run_dir)
    if not failures:
        return
    err_console.print(
        f"[bold red]{len(failures)} {what}(s) failed[/] (recorded in the run; rerun with "
        "--force to retry them, finished ones are reused):",
        highlight=False,
    )
    for failure in failures:
        err_console.print(
            f"  {escape(str(failure['label']))}: {escape(str(failure['error']))}",
            highlight=False,
            soft_wrap=True,
        )
    raise typer.Exit(FAILED_JOBS_EXIT)


@command(
    helps={**SPREAD_DEVICE, "model": "One model (registry name, hub id, local dir)."},
    without=("verify",),
)
def gain(
    *,
    loaded: ModelOptions,
    models: ManyModels = None,
    source: PromptOptions,
    batch_size: BatchSize = 8,
    rho_threshold: Annotated[float, typer.Option(help="H25: rho >= this predicts gain < 1.")] = 0.2,
    n_boot: NBoot = 2000,
    seed: Seed = 0,
    run: RunOptions,
) -> None:
    """Residual-stream gain of every block (hooks, not hidden_states), the final norm's
    effect, rho = n_heads / d_head and the H25 analysis across models.

    Examples:

      rloop gain                                   # embedded SmolLM2-135M

      rloop gain --models EleutherAI/pythia-70m,EleutherAI/pythia-160m,EleutherAI/pythia-410m

    A model that fails to load or measure is recorded and the others go on; the command then
    exits with code 3 and lists it (2: bad input, or no model could be measured).
    """
    model_settings = loaded.settings()
    model_settings.pop("verify")
    single_model = model_settings.pop("model")
    config = GainConfig(
        models=parse_names(models) or [single_model],
        **model_settings,
        **source.settings(),
        batch_size=batch_size,
        rho_threshold=rho_threshold,
        n_boot=n_boot,
        seed=seed,
    )
    run_dir = run.launch(run_gain, config)
    out_console.print(f"figure: {run_dir / 'plots' / 'h25.png'}", markup=False)
    exit_on_failed_jobs(run_dir, "model")


@command(helps={**SPREAD_DEVICE, **SWEEP_RUN})
def scaling(
    *,
    models: Models,
    revision: Revision = None,
    gain: Annotated[bool, typer.Option("--gain", help="Also measure residual gain (H25).")] = False,
    runner: ExecutorOptions,
    measure: ContractionOptions,
    contrast: ContrastOptions,
    run: RunOptions,
) -> None:
    """Contraction (R_V recursive vs baseline) across models, one loaded at a time; table
    and plot vs parameter count. Resumes where it stopped.

    Examples:

      rloop scaling --models EleutherAI/pythia-70m,EleutherAI/pythia-160m --gain

      rloop scaling --models a,b,c --executor ray --ray-address auto --gpus-per-job 1

    With --verify each model gets the fidelity self-check first; a FAIL fails its job.
    Exit codes: 0 every job finished; 3 the sweep completed but some jobs failed (listed on
    stderr and in failures.csv; --force retries them); 2 bad input, or every job failed.
    """
    config = ScalingConfig(
        models=parse_names(models) or [],
        revision=revision,
        gain=gain,
        settings=ContractionSettings(**measure.settings(), **contrast.settings()),
    )
    executor = make_executor(runner.executor, runner.ray_address, runner.gpus_per_job)
    exit_on_failed_jobs(run.launch(run_scaling, config, executor=executor))


@command(helps={**SPREAD_DEVICE, **SWEEP_RUN})
def checkpoints(
    *,
    model: RevisionsOf = None,
    revisions: Annotated[
        str | None, typer.Option(help="Comma-separated revisions, e.g. step0,step1000.")
    ] = None,
    checkpoint_dirs: Annotated[
        str | None, typer.Option(help="Comma-separated local checkpoint dirs.")
    ] = None,
    evict: Annotated[
        bool,
        typer.Option(
            "--evict",
            help="Delete each checkpoint after measuring it (hub: its HF cache entry; "
            "--checkpoint-dirs: the directory itself).",
        ),
    ] = False,
    runner: ExecutorOptions,
    measure: ContractionOptions,
    contrast: ContrastOptions,
    run: RunOptions,
) -> None:
    """R_V per group and the recursive-baseline gap across training checkpoints.

    Examples:

      rloop checkpoints --model EleutherAI/pythia-410m \\
          --revisions step0,step1000,step5000,step10000,step143000 --evict

      rloop checkpoints --checkpoint-dirs ckpt/step100,ckpt/step200 --layers 1,2

    A rerun reuses every checkpoint already measured, even one that --evict deleted.
    Exit codes: 0 every checkpoint measured; 3 the sweep completed but some failed (listed on
    stderr and in failures.csv; --force retries them); 2 bad input, or every one failed.
    """
    config = CheckpointConfig(
        model=model,
        revisions=parse_names(revisions),
        checkpoint_dirs=parse_names(checkpoint_dirs),
        evict=evict,
        settings=ContractionSettings(**measure.settings(), **contrast.settings()),
    )
    executor = make_executor(runner.executor, runner.ray_address, runner.gpus_per_job)
    exit_on_failed_jobs(run.launch(run_checkpoints, config, executor=executor), "checkpoint")


def register(app: typer.Typer) -> None:
    """Add ``gain``, ``scaling`` and ``checkpoints`` to ``app``."""
    app.command("gain")(gain)
    app.command("scaling")(scaling)
    app.command("checkpoints")(checkpoints)
