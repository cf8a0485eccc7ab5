"""``rloop contraction``: R_V per prompt and group on one model, with statistics and plots."""

from __future__ import annotations

from typing import Annotated

import typer

from rloop.cli.options import (
    DEFAULT_MODEL,
    ContractionOptions,
    ContrastOptions,
    Model,
    ReadAs,
    Revision,
    RunOptions,
    experiment,
)
from rloop.experiments.contraction import DEFAULT_TWIN_GROUP, ContractionConfig, run_contraction


@experiment(ContractionConfig, run_contraction)
def contraction(
    *,
    model: Model = DEFAULT_MODEL,
    revision: Revision = None,
    measure: ContractionOptions,
    contrast: ContrastOptions,
    twin_group: Annotated[
        str,
        typer.Option(
            help="Structural twins of --recursive-group for the paired contrast "
            "(none = no paired contrast)."
        ),
        ReadAs(lambda name, _flag: None if name.lower() == "none" else name),
    ] = DEFAULT_TWIN_GROUP,
    run: RunOptions,
) -> None:
    """R_V per prompt and group, recursive-vs-baseline statistics, layer sweep and plots.

    Examples:

      rloop contraction                                   # embedded SmolLM2-135M, shipped bank

      rloop contraction --model EleutherAI/pythia-2.8b --layers 5,28 --window 16

      rloop contraction --prompts my_prompts.csv --groups recursive,baseline \\
          --recursive-group recursive --baseline-group baseline --pr-mode whole
    """


def register(app: typer.Typer) -> None:
    """Add ``contraction`` to ``app``."""
    app.command("contraction")(contraction)
