"""Commands over generation: ``rloop validate``, ``rloop temporal``, ``rloop kv-patch``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rloop.cli.options import (
    DEFAULT_MODEL,
    BaselineGroup,
    BatchSize,
    Device,
    Dtype,
    EarlyLate,
    Force,
    Groups,
    MaxNewTokens,
    Model,
    NPairs,
    Out,
    PrMode,
    Prompts,
    RecursiveGroup,
    SamplingOptions,
    Window,
    command,
    print_outcome,
    with_help,
)
from rloop.cli.parsing import (
    parse_float_list,
    parse_layer_pair,
    parse_layer_ranges,
    parse_names,
    path_text,
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
    out: Out = None,
    force: Force = False,
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
    print_outcome(run_validate(settings, out=out, force=force))


ProfiledGroups = with_help(Groups, "Groups to profile; default L5,factual.")
GenerationBatch = with_help(BatchSize, "Prompts per batched generation.")
StepWindow = with_help(Window, "Window W (tokens).")


@command()
def temporal(
    *,
    model: Model = DEFAULT_MODEL,
    prompts: Prompts = None,
    groups: ProfiledGroups = None,
    layers: EarlyLate = None,
    window: StepWindow = 16,
    pr_mode: PrMode = "per-head",
    sampling: SamplingOptions,
    batch_size: GenerationBatch = 24,
    dtype: Dtype = None,
    device: Device = None,
    out: Out = None,
    force: Force = False,
) -> None:
    """R_V at the end of encoding (step 0) and after every generated token, per group.

    Examples:

      rloop temporal

      rloop temporal --groups L1,L5,factual --max-new-tokens 40 --window 16
    """
    settings = TemporalConfig(
        model=model,
        prompts=path_text(prompts),
        groups=parse_names(groups),
        layers=parse_layer_pair(layers, "--layers"),
        window=window,
        pr_mode=pr_mode,
        **sampling.settings(),
        batch_size=batch_size,
        dtype=dtype,
        device=device,
    )
    print_outcome(run_temporal(settings, out=out, force=force))


SourceGroup = with_help(RecursiveGroup, "Source group.")
TargetGroup = with_help(BaselineGroup, "Target group.")
GeneratedWindow = with_help(Window, "Window W over generated tokens.")


@command()
def kv_patch(
    *,
    model: Model = DEFAULT_MODEL,
    prompts: Prompts = None,
    recursive_group: SourceGroup = "L5",
    baseline_group: TargetGroup = "factual",
    n_pairs: NPairs = 10,
    ranges: Annotated[
        str | None,
        typer.Option(
            help="Layer ranges separated by ';', e.g. '15-29;23-27;25' (default: 2nd half)."
        ),
    ] = None,
    alphas: Annotated[str, typer.Option(help="Mixing weights in [0, 1].")] = "0,0.25,0.5,0.75,1",
    layers: EarlyLate = None,
    window: GeneratedWindow = 16,
    pr_mode: PrMode = "per-head",
    sampling: SamplingOptions,
    max_batch_rows: Annotated[int, typer.Option(help="Generations per batched call.")] = 128,
    semantic: Annotated[
        str, typer.Option(help="Behaviour semantic component: auto | off.")
    ] = "auto",
    dtype: Dtype = None,
    device: Device = None,
    out: Out = None,
    force: Force = False,
) -> None:
    """KV-cache patching of recursive sources into baseline targets: transfer of R_V and
    behaviour per layer range and alpha, dose-response, R_V-behaviour correlation.

    Examples:

      rloop kv-patch                                  # second half of layers, alpha grid

      rloop kv-patch --ranges '15-29;23-27;25' --alphas 1   # seed 003's range table
    """
    settings = KVPatchConfig(
        model=model,
        prompts=path_text(prompts),
        recursive_group=recursive_group,
        baseline_group=baseline_group,
        n_pairs=n_pairs,
        ranges=parse_layer_ranges(ranges, "--ranges"),
        alphas=parse_float_list(alphas, "--alphas"),
        layers=parse_layer_pair(layers, "--layers"),
        window=window,
        pr_mode=pr_mode,
        **sampling.settings(),
        max_batch_rows=max_batch_rows,
        semantic=semantic,
        dtype=dtype,
        device=device,
    )
    print_outcome(run_kv_patching(settings, out=out, force=force))


def register(app: typer.Typer) -> None:
    """Add ``validate``, ``temporal`` and ``kv-patch`` to ``app``."""
    app.command("validate")(validate)
    app.command("temporal")(temporal)
    app.command("kv-patch")(kv_patch)
