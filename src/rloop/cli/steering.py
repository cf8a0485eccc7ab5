"""``rloop steer`` (push baseline prompts along the contracted direction) and ``rloop sae``
(``train`` a small sparse autoencoder; ``features`` that differ between the groups)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from rloop.cli.options import (
    BatchSize,
    ContrastOptions,
    Groups,
    MaxNewTokens,
    MaxPrompts,
    ModelOptions,
    NBoot,
    Point,
    Prompts,
    ReadAs,
    RunOptions,
    Seed,
    Temperature,
    TopP,
    Window,
    WindowOptions,
    experiment,
)
from rloop.cli.parsing import parse_float_list
from rloop.experiments.sae_runs import (
    SAEFeaturesConfig,
    SAETrainConfig,
    run_sae_features,
    run_sae_train,
)
from rloop.experiments.steer import DEFAULT_ALPHAS, SteerConfig, run_steer

Semantic = Annotated[str, typer.Option(help="Behaviour semantic component: auto | off.")]

sae_app = typer.Typer(
    help="Sparse autoencoders (SAELens format): train a small one; find differential features.",
    no_args_is_help=True,
)


@experiment(SteerConfig, run_steer, helps={"pr_mode": "per-head | whole (PR of V in R_V)."})
def steer(
    *,
    loaded: ModelOptions,
    prompts: Prompts = None,
    contrast: ContrastOptions,
    layer: Annotated[
        int | None, typer.Option(help="Layer steered (default: midway between the R_V layers).")
    ] = None,
    point: Annotated[str, typer.Option(help="resid_post | resid_pre of that layer.")] = (
        "resid_post"
    ),
    direction: Annotated[
        str, typer.Option(help="mean-diff (recursive - baseline) | subspace (top direction).")
    ] = "mean-diff",
    direction_index: Annotated[
        int, typer.Option(help="Which top direction with --direction subspace (1 = first).")
    ] = 1,
    alphas: Annotated[
        str,
        typer.Option(help="Push sizes in units of the median residual norm there."),
        ReadAs(parse_float_list),
    ] = ",".join(f"{a:g}" for a in DEFAULT_ALPHAS),
    steer_group: Annotated[
        str | None, typer.Option(help="Group steered (default: the baseline group).")
    ] = None,
    n_random: Annotated[
        int, typer.Option(help="Random directions of the same norm (control seeds).")
    ] = 3,
    max_prompts: MaxPrompts = 10,
    measure: WindowOptions,
    max_new_tokens: MaxNewTokens = 32,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    max_batch_rows: Annotated[
        int,
        typer.Option(help="Generations per batched call (0 = as the memory budget fits)."),
        ReadAs(lambda rows, _flag: rows or None),
    ] = 0,
    semantic: Semantic = "auto",
    n_boot: NBoot = 2000,
    seed: Seed = 0,
    run: RunOptions,
) -> None:
    """Steer baseline prompts along the contracted direction: R_V, behaviour, dose-response.

    Adds alpha * u to the residual stream at every prompt position and every generated token;
    measures R_V of the prompt window and of the generated tokens and the behaviour score,
    with Spearman of alpha against each, next to random directions of the same norm.

    Examples:

      rloop steer --alphas 0,0.25,0.5,1

      rloop steer --baseline-group L5_twin --direction subspace --layer 12 --max-prompts 20
    """


@experiment(
    SAETrainConfig, run_sae_train, helps={"groups": "Prompt groups to keep (default: all)."}
)
def train(
    *,
    loaded: ModelOptions,
    prompts: Prompts = None,
    groups: Groups = None,
    layer: Annotated[int | None, typer.Option(help="Layer (default: the late R_V layer).")] = None,
    point: Point = "resid_post",
    architecture: Annotated[str, typer.Option(help="topk | relu (ReLU + L1).")] = "topk",
    d_sae: Annotated[int, typer.Option(help="Number of features.")] = 2048,
    k: Annotated[int, typer.Option(help="Active features per token (topk).")] = 32,
    l1: Annotated[float, typer.Option(help="L1 coefficient (relu), normalised units.")] = 1.0,
    steps: Annotated[int, typer.Option(help="Adam steps.")] = 4000,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    train_batch_size: Annotated[int, typer.Option(help="Tokens per Adam step.")] = 256,
    continuation_tokens: Annotated[
        int, typer.Option(help="Sampled tokens after each prompt added to the data (0 = none).")
    ] = 16,
    temperature: Temperature = 1.0,
    top_p: TopP = 0.9,
    heldout_prompts: Annotated[
        float, typer.Option(help="Share of prompts held out for the metrics.")
    ] = 0.1,
    batch_size: BatchSize = 64,
    seed: Seed = 0,
    run: RunOptions,
) -> dict[str, Any]:
    """Train a small SAE on the prompt banks' activations; save it in the SAELens format.

    The data: every token of the shipped prompt banks (or --prompts) and of sampled
    continuations. Reports explained variance, L0 and dead features on held-out prompts. A small-scale
    tool: tens of thousands of tokens, not the 10^8+ of published SAEs.

    Examples:

      rloop sae train --layer 15 --point resid_post

      rloop sae train --layer 20 --point v --architecture relu --l1 2 --d-sae 1024
    """
    return {"point": point or "resid_post"}


@experiment(SAEFeaturesConfig, run_sae_features)
def features(
    *,
    sae: Annotated[Path, typer.Option(help="SAE directory (cfg.json + sae_weights.safetensors).")],
    loaded: ModelOptions,
    prompts: Prompts = None,
    contrast: ContrastOptions,
    layer: Annotated[
        int | None, typer.Option(help="Layer (default: from the SAE's hook name).")
    ] = None,
    point: Annotated[
        str | None, typer.Option(help="Hook point (default: from the SAE's hook name).")
    ] = None,
    max_prompts: MaxPrompts = 0,
    window: Window = 16,
    k: Annotated[int, typer.Option(help="Dimensions of the contracted subspace.")] = 8,
    top_n: Annotated[
        int, typer.Option(help="Top differential features whose decoders span the subspace.")
    ] = 16,
    n_features_shown: Annotated[int, typer.Option(help="Features with examples.")] = 10,
    n_examples: Annotated[int, typer.Option(help="Top-activating tokens per feature.")] = 10,
    test: Annotated[str, typer.Option(help="welch | mann-whitney.")] = "welch",
    batch_size: BatchSize = 16,
    n_boot: NBoot = 2000,
    seed: Seed = 0,
    run: RunOptions,
) -> dict[str, Any]:
    """SAE features that differ between recursive and baseline (or twin) windows.

    With bootstrap CIs and BH-adjusted p; where the top features fire; and how much of the
    contracted subspace their decoder directions span, against random feature sets.

    Examples:

      rloop sae features --sae rloop-runs/sae-train-.../sae

      rloop sae features --sae ./gemma-scope-l12 --model gemma-3-270m --baseline-group L5_twin
    """
    return {"sae": str(sae)}


sae_app.command("train")(train)
sae_app.command("features")(features)


def register(app: typer.Typer) -> None:
    """Add ``steer`` and the ``sae`` group (``train``, ``features``) to ``app``."""
    app.command("steer")(steer)
    app.add_typer(sae_app, name="sae")
