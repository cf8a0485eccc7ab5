"""Commands over generation: ``rloop validate``, ``rloop temporal``, ``rloop kv-patch``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rloop.cli.options import (
    BatchSize,
    ContrastOptions,
    Device,
    Dtype,
    MaxNewTokens,
    Model,
    ModelOptions,
    NPairs,
    PromptOptions,
    Prompts,
    ReadAs,
    RunOptions,
    SamplingOptions,
    WindowOptions,
    command,
    experiment,
    with_help,
)
from rloop.cli.parsing import (
    parse_float_list,
    parse_layer_ranges,
)
from rloop.experiments.kv_patch import KVPatchConfig, run_kv_patching
from rloop.experiments.temporal import TemporalConfig, run_temporal
from rloop.experiments.validate import load_validate_config, run_validate

# Rich reads [model] in a help text as markup: the backslash keeps it as text.
ModelOverride = with_help(Model, "Override \\[model] name.")
NPairsOverride = with_help(NPairs, "Override \\[prompts] n_pairs.")
MaxNewTokensOverride = with_help(MaxNewTokens, "Override \\[generation] max_new_tokens.")


@command()
def validate(
    *,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="TOML config; default: rloop/configs/validate_default.toml."
        ),
    ] = None,
    model: ModelOverride = None,
    n_pairs: NPairsOverride = None,
    max_new_tokens: MaxNewTokensOverride = None,
    dtype: Dtype = None,
    device: Device = None,
    run: RunOptions,
) -> None:
    """The 4-phase validation run (R_V phenomenon, V-patching null, KV-patching
    mechanism, alpha dose-response) with a verdict per phase computed against the
    config's thresholds.

    Examples:

      rloop validate                       # embedded SmolLM2-135M, default config

      rloop validate --config my.toml --model mistralai/Mistral-7B-v0.1 --device cuda
    """
    settings = load_validate_config(
        config,
        model=model,
        n_pairs=n_pairs,
        max_new_tokens=max_new_tokens,
        dtype=dtype,
        device=device,
    )
    run.launch(run_validate, settings)


GenerationBatch = with_help(BatchSize, "Prompts per batched generation.")


@experiment(
    TemporalConfig,
    run_temporal,
    helps={"groups": "Groups to profile; default L5,factual.", "window": "Window W (tokens)."},
)
def temporal(
    *,
    loaded: ModelOptions,
    source: PromptOptions,
    measure: WindowOptions,
    sampling: SamplingOptions,
    batch_size: GenerationBatch = 24,
    run: RunOptions,
) -> None:
    """R_V at the end of encoding (step 0) and after every generated token, per group.

    Examples:

      rloop temporal

      rloop temporal --groups L1,L5,factual --max-new-tokens 40 --window 16
    """


@experiment(
    KVPatchConfig,
    run_kv_patching,
    helps={
        "recursive_group": "Source group.",
        "baseline_group": "Target group.",
        "window": "Window W over generated tokens.",
    },
)
def kv_patch(
    *,
    loaded: ModelOptions,
    prompts: Prompts = None,
    contrast: ContrastOptions,
    n_pairs: NPairs = 10,
    ranges: Annotated[
        str | None,
        typer.Option(
            help="Layer ranges separated by ';', e.g. '15-29;23-27;25' (default: 2nd half)."
        ),
        ReadAs(parse_layer_ranges),
    ] = None,
    alphas: Annotated[
        str, typer.Option(help="Mixing weights in [0, 1]."), ReadAs(parse_float_list)
    ] = "0,0.25,0.5,0.75,1",
    measure: WindowOptions,
    sampling: SamplingOptions,
    max_batch_rows: Annotated[int, typer.Option(help="Generations per batched call.")] = 128,
    semantic: Annotated[
        str, typer.Option(help="Behaviour semantic component: auto | off.")
    ] = "auto",
    run: RunOptions,
) -> None:
    """KV-cache patching of recursive sources into baseline targets: transfer of R_V and
    behaviour per layer range and alpha, dose-response, R_V-behaviour correlation.

    Examples:

      rloop kv-patch                                  # second half of layers, alpha grid

      rloop kv-patch --ranges '15-29;23-27;25' --alphas 1   # seed 003's range table
    """


def register(app: typer.Typer) -> None:
    """Add ``validate``, ``temporal`` and ``kv-patch`` to ``app``."""
    app.command("validate")(validate)
    app.command("temporal")(temporal)
    app.command("kv-patch")(kv_patch)
