"""``rloop contraction`` (R_V per prompt and group on one model, with statistics and plots)
and ``rloop robustness`` (the same contrast over every defensible analysis choice)."""

from __future__ import annotations

from typing import Annotated

import typer

from rloop.cli.options import (
    AS_INTS,
    DEFAULT_MODEL,
    BankVersion,
    BatchSize,
    ContractionOptions,
    ContrastOptions,
    Layers,
    MaxPrompts,
    Model,
    ModelOptions,
    NBoot,
    Prompts,
    ReadAs,
    Revision,
    RunOptions,
    Seed,
    Window,
    experiment,
)
from rloop.cli.parsing import parse_names
from rloop.experiments.contraction import DEFAULT_TWIN_GROUP, ContractionConfig, run_contraction
from rloop.experiments.nulls import canonical_nulls
from rloop.experiments.robustness import (
    DEFAULT_POINTS,
    DEFAULT_WINDOWS,
    ESTIMATORS,
    RobustnessConfig,
    run_robustness,
)
from rloop.prompts import DEFAULT_BANK_VERSION


@experiment(ContractionConfig, run_contraction)
def contraction(
    *,
    model: Model = DEFAULT_MODEL,
    revision: Revision = None,
    measure: ContractionOptions,
    max_prompts: MaxPrompts = 0,
    contrast: ContrastOptions,
    twin_group: Annotated[
        str,
        typer.Option(
            help="Structural twins of --recursive-group for the paired contrast "
            "(none = no paired contrast)."
        ),
        ReadAs(lambda name, _flag: None if name.lower() == "none" else name),
    ] = DEFAULT_TWIN_GROUP,
    null: Annotated[
        str | None,
        typer.Option(
            "--null",
            help="Null models of the main contrast, KIND:K comma-separated: random-init:K "
            "(K random-weight models of the same architecture), token-shuffle:K (K shuffles "
            "of each prompt's words on this model), e.g. random-init:3,token-shuffle:2.",
        ),
        ReadAs(canonical_nulls),
    ] = None,
    run: RunOptions,
) -> dict:
    """R_V per prompt and group, recursive-vs-baseline statistics, layer sweep and plots.

    Examples:

      rloop contraction                                   # embedded SmolLM2-135M, shipped bank

      rloop contraction --model EleutherAI/pythia-2.8b --layers 5,28 --window 16

      rloop contraction --prompts my_prompts.csv --groups recursive,baseline \\
          --recursive-group recursive --baseline-group baseline --pr-mode whole

      rloop contraction --null random-init:3,token-shuffle:2   # the same contrast on nulls
    """
    return {"nulls": null}


def _joined(values) -> str:
    return ",".join(str(value) for value in values)


AS_LIST = ReadAs(lambda text, _flag: parse_names(text) or [])


@experiment(
    RobustnessConfig,
    run_robustness,
    helps={
        "early_layers": "Early layers of the grid (default: every layer of the first third).",
        "late_layers": "Late layers of the grid (default: every layer of the last third).",
        "window": "Window of the reference specification (the one contraction measures).",
    },
)
def robustness(
    *,
    loaded: ModelOptions,
    prompts: Prompts = None,
    bank_version: BankVersion = DEFAULT_BANK_VERSION,
    max_prompts: MaxPrompts = 0,
    contrast: ContrastOptions,
    twin_group: Annotated[
        str | None,
        typer.Option(help="Twins of --recursive-group: the paired contrast (default unpaired)."),
    ] = None,
    early_layers: Layers = None,
    late_layers: Layers = None,
    layer_step: Annotated[
        int, typer.Option(help="Keep every n-th layer of the default ranges.")
    ] = 1,
    windows: Annotated[
        str, typer.Option(help="Windows W of the grid, e.g. 8,16,32."), AS_INTS
    ] = _joined(DEFAULT_WINDOWS),
    window: Window = 16,
    points: Annotated[str, typer.Option(help="Hook points of the grid."), AS_LIST] = _joined(
        DEFAULT_POINTS
    ),
    pr_modes: Annotated[str, typer.Option(help="PR modes: per-head, whole."), AS_LIST] = (
        "per-head,whole"
    ),
    estimators: Annotated[
        str, typer.Option(help="PR estimators (plain, corrected)."), AS_LIST
    ] = _joined(ESTIMATORS),
    n_perm: Annotated[int, typer.Option(help="Permutations of the joint tests.")] = 1000,
    alpha: Annotated[float, typer.Option(help="Significance level of each specification.")] = 0.05,
    batch_size: BatchSize = 16,
    n_boot: NBoot = 2000,
    seed: Seed = 0,
    run: RunOptions,
) -> None:
    """Multiverse (specification curve): the recursive-vs-baseline R_V contrast over every
    layer pair, window, hook point, PR mode and estimator, with joint permutation tests.

    Examples:

      rloop robustness                                # L5 vs factual, the default grid

      rloop robustness --twin-group L5_twin --windows 8,16 --points v --n-perm 500
    """


def register(app: typer.Typer) -> None:
    """Add ``contraction`` and ``robustness`` to ``app``."""
    app.command("contraction")(contraction)
    app.command("robustness")(robustness)
