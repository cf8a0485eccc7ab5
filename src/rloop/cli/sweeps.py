"""Commands across models: ``rloop gain``, ``rloop scaling``, ``rloop checkpoints``."""

from __future__ import annotations

from typing import Annotated

import typer

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
    out_console,
    with_help,
)
from rloop.cli.parsing import parse_names
from rloop.experiments.executors import make_executor
from rloop.experiments.gain import GainConfig, run_gain
from rloop.experiments.sweeps import (
    CheckpointConfig,
    ContractionSettings,
    ScalingConfig,
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


@command(helps={**SPREAD_DEVICE, "model": "One model (registry name, hub id, local dir)."})
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
    """
    model_settings = loaded.settings()
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
    """
    config = ScalingConfig(
        models=parse_names(models) or [],
        revision=revision,
        gain=gain,
        settings=ContractionSettings(**measure.settings(), **contrast.settings()),
    )
    executor = make_executor(runner.executor, runner.ray_address, runner.gpus_per_job)
    run.launch(run_scaling, config, executor=executor)


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
    """
    config = CheckpointConfig(
        model=model,
        revisions=parse_names(revisions),
        checkpoint_dirs=parse_names(checkpoint_dirs),
        evict=evict,
        settings=ContractionSettings(**measure.settings(), **contrast.settings()),
    )
    executor = make_executor(runner.executor, runner.ray_address, runner.gpus_per_job)
    run.launch(run_checkpoints, config, executor=executor)


def register(app: typer.Typer) -> None:
    """Add ``gain``, ``scaling`` and ``checkpoints`` to ``app``."""
    app.command("gain")(gain)
    app.command("scaling")(scaling)
    app.command("checkpoints")(checkpoints)
