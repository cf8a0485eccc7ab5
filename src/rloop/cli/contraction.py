"""``rloop contraction``: R_V per prompt and group on one model, with statistics and plots."""

from __future__ import annotations

import typer

from rloop.cli.options import (
    DEFAULT_MODEL,
    ContractionOptions,
    Force,
    Model,
    Out,
    Revision,
    command,
    print_outcome,
)
from rloop.experiments.contraction import ContractionConfig, run_contraction


@command()
def contraction(
    *,
    model: Model = DEFAULT_MODEL,
    revision: Revision = None,
    measure: ContractionOptions,
    out: Out = None,
    force: Force = False,
) -> None:
    """R_V per prompt and group, recursive-vs-baseline statistics, layer sweep and plots.

    Examples:

      rloop contraction                                   # embedded SmolLM2-135M, shipped bank

      rloop contraction --model EleutherAI/pythia-2.8b --layers 5,28 --window 16

      rloop contraction --prompts my_prompts.csv --groups recursive,baseline \\
          --recursive-group recursive --baseline-group baseline --pr-mode whole
    """
    config = ContractionConfig(model=model, revision=revision, **measure.settings())
    print_outcome(run_contraction(config, out=out, force=force))


def register(app: typer.Typer) -> None:
    """Add ``contraction`` to ``app``."""
    app.command("contraction")(contraction)
