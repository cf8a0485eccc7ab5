"""Commands of the causal battery: ablate (head sweep), ablate-group, ablate-layer,
attn-vs-mlp, heads, saliency, patch and attribution.

Each command reads and checks its options, builds its experiment's config and calls the
experiment's run function; bad input is one line on stderr and exit code 2, before any model
is loaded or anything is written. The options every command shares are
:class:`~rloop.cli.options.CausalOptions`.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from rloop.cli.options import (
    AblationOptions,
    BackwardBatchSize,
    BatchSize,
    CausalOptions,
    ContrastOptions,
    FromSweep,
    Heads,
    Layers,
    MaxRows,
    Point,
    RunOptions,
    TopK,
    Unit,
    experiment,
    with_help,
)
from rloop.experiments.ablate import AblationConfig, run_head_sweep
from rloop.experiments.ablate_group import GroupAblationConfig, run_group_ablation
from rloop.experiments.ablate_layer import LayerAblationConfig, run_layer_ablation
from rloop.experiments.attn_vs_mlp import ComponentsConfig, run_components
from rloop.experiments.attribution import AttributionConfig, run_attribution
from rloop.experiments.heads import HeadDiagnosticsConfig, run_head_diagnostics
from rloop.experiments.patch import PatchConfig, run_patching
from rloop.experiments.saliency import SaliencyConfig, run_saliency

# Commands without R_V measurement layers: they measure PR, not R_V.
NO_R_V = ("measure_layers", "pr_mode")


SweptLayers = with_help(Layers, "Layers whose heads are swept, e.g. 15-30 or 3,7 (default all).")


@experiment(
    AblationConfig,
    run_head_sweep,
    helps={
        "groups": "Comma-separated groups (default L5 from the bank, all of a file).",
        "max_prompts": "Use at most this many prompts (0 = all).",
        "mode": "zero | mean | resample, or several to compare, e.g. zero,mean,resample.",
        "reference_group": "Reference prompts of mean and resample ablation.",
    },
)
def ablate(
    *,
    layers: SweptLayers = None,
    ablation: AblationOptions,
    n_resample: Annotated[
        int, typer.Option(help="Resample: reference prompts drawn (seeded); impacts averaged.")
    ] = 3,
    unit: Unit = "query",
    top_k: TopK = 10,
    max_rows: MaxRows = None,
    kl: Annotated[
        bool,
        typer.Option(
            "--kl",
            help="Also the last-token KL(clean || ablated) per head, a behaviour proxy (runs "
            "every layer, the LM head at one token; slower).",
        ),
    ] = False,
    compile: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="Run the sweep's blocks through torch.compile (equal to eager up to rounding; "
            "default: off on every device until a GPU benchmark shows it faster). Not part "
            "of the run's config; the manifest records it.",
        ),
    ] = None,
    inputs: CausalOptions,
    run: RunOptions,
) -> None:
    """Exact head-ablation sweep: R_V with each head ablated, per prompt x head.

    Writes results (prompt_id, layer, head, r_v_base, r_v_ablated, impact, ...; kl with
    --kl), heads (mean impact, bootstrap CI, BH-adjusted p, noise floor; mean KL) and
    heatmaps.

    Examples:

      rloop ablate                                   # every head, 10 L5 prompts

      rloop ablate --layers 15-28 --measure-layers 5,28 --mode mean

      rloop ablate --unit kv_group --pr-mode whole --out runs/kv-sweep

      rloop ablate --layers 20-29 --kl               # + last-token KL per head

      rloop ablate --mode zero,mean,resample         # is the ranking robust to the ablation?
    """


@experiment(
    GroupAblationConfig,
    run_group_ablation,
    helps={
        "mode": "zero | mean | resample, or several to compare, e.g. zero,mean,resample.",
        "reference_group": "Reference prompts of mean and resample ablation.",
    },
)
def ablate_group(
    *,
    heads: Heads = None,
    from_sweep: FromSweep = None,
    top_k: Annotated[int, typer.Option(help="With --from-sweep: how many heads.")] = 10,
    select: Annotated[
        str, typer.Option(help="With --from-sweep: abs | negative (the 'expanders') | positive.")
    ] = "abs",
    unit: Unit = "query",
    n_random: Annotated[int, typer.Option(help="Random same-layer head groups (control).")] = 20,
    ablation: AblationOptions,
    n_resample: Annotated[
        int, typer.Option(help="Resample: reference prompts drawn (seeded); R_V averaged.")
    ] = 3,
    inputs: CausalOptions,
    run: RunOptions,
) -> None:
    """Ablate several heads together; R_V clean vs ablated, vs random head groups.

    Examples:

      rloop ablate-group --heads 15.4,16.2,17.24

      rloop ablate-group --heads 15.4,16.2 --mode zero,mean,resample

      rloop ablate-group --from-sweep rloop-runs/ablate-smollm2-135m-ab12cd --top-k 10 \\
          --select negative --n-random 50
    """


AblatedLayers = with_help(Layers, "Layers to ablate one at a time, e.g. 19 or 10-20.")


@experiment(LayerAblationConfig, run_layer_ablation)
def ablate_layer(
    *,
    layers: AblatedLayers,
    component: Annotated[str, typer.Option(help="attn | mlp | both.")] = "attn",
    ablation: AblationOptions,
    inputs: CausalOptions,
    run: RunOptions,
) -> dict[str, Any]:
    """Ablate a whole layer's attention output (or MLP output); R_V clean vs ablated.

    Examples:

      rloop ablate-layer --layers 19 --measure-layers 5,28

      rloop ablate-layer --layers 0-25 --component both --mode mean
    """
    return {"components": ["attn", "mlp"] if component == "both" else [component]}


@experiment(ComponentsConfig, run_components, without=NO_R_V)
def attn_vs_mlp(
    *,
    layers: Layers = None,
    contrast: ContrastOptions,
    batch_size: BatchSize = 16,
    inputs: CausalOptions,
    run: RunOptions,
) -> None:
    """PR of the attention-block output vs the MLP output per layer and prompt group.

    Examples:

      rloop attn-vs-mlp

      rloop attn-vs-mlp --layers 15,18,21,24,27,30 --groups L5,factual
    """


@experiment(HeadDiagnosticsConfig, run_head_diagnostics, without=NO_R_V)
def heads(
    *,
    layers: Layers = None,
    contrast: ContrastOptions,
    batch_size: BatchSize = 8,
    top_k: TopK = 10,
    inputs: CausalOptions,
    run: RunOptions,
) -> None:
    """Per-head diagnostics: output norm and rank, per-head PR, attention self-score and
    entropy, each recursive vs baseline with effect sizes.

    Examples:

      rloop heads --layers 28

      rloop heads --groups L5,factual --max-prompts 20
    """


@experiment(SaliencyConfig, run_saliency)
def saliency(
    *,
    layers: Layers = None,
    batch_size: BackwardBatchSize = 4,
    top_k: TopK = 10,
    inputs: CausalOptions,
    run: RunOptions,
) -> None:
    """Gradient saliency ||dR_V/dz|| of every head (layer x head heatmap).

    Examples:

      rloop saliency

      rloop saliency --measure-layers 5,28 --groups L5,factual
    """


PatchedHeads = with_help(Heads, "Patch these heads: LAYER.HEAD,... e.g. 28.11")
PatchedLayers = with_help(Layers, "Patch the whole --point at these layers.")
PatchedPoint = with_help(Point, "Hook point (default z with --heads, resid_pre with --layers).")


@experiment(PatchConfig, run_patching)
def patch(
    *,
    heads: PatchedHeads = None,
    layers: PatchedLayers = None,
    point: PatchedPoint = None,
    positions: Annotated[
        str,
        typer.Option(help="window (last W positions, aligned from the end) | all (equal lengths)."),
    ] = "window",
    source_group: Annotated[str, typer.Option(help="Source (recursive) group.")] = "L5",
    target_group: Annotated[str, typer.Option(help="Target (baseline) group.")] = "factual",
    batch_size: Annotated[int, typer.Option(help="Pairs per stacked forward.")] = 16,
    inputs: CausalOptions,
    run: RunOptions,
) -> None:
    """Activation patching from source (recursive) into target (baseline) prompts; transfer %.

    Circular patches (writing what R_V then reads) are reported as such, not as a transfer.

    Examples:

      rloop patch --heads 28.11 --measure-layers 5,28      # the seed's "Head 11" test

      rloop patch --layers 19 --point attn_out

      rloop patch --layers 10-12 --point mlp_out --source-group L5 --target-group factual
    """


ComparedSweep = with_help(
    FromSweep, "Compare with this finished `rloop ablate` run (default: run the sweep)."
)


@experiment(AttributionConfig, run_attribution)
def attribution(
    *,
    from_sweep: ComparedSweep = None,
    layers: Layers = None,
    ablation: AblationOptions,
    batch_size: BackwardBatchSize = 4,
    max_rows: MaxRows = None,
    top_k: Annotated[
        int, typer.Option(help="Heads listed; top-k overlap of the two rankings.")
    ] = 10,
    inputs: CausalOptions,
    run: RunOptions,
) -> None:
    """Attribution patching: every head's ablation effect from one backward, with its rank
    correlation to the exact sweep.

    Examples:

      rloop attribution                                  # gradients + exact sweep

      rloop attribution --from-sweep rloop-runs/ablate-smollm2-135m-ab12cd
    """


def register(app: typer.Typer) -> None:
    """Add the causal-battery commands to ``app``, in the order ``rloop --help`` lists them."""
    app.command("ablate")(ablate)
    app.command("ablate-group")(ablate_group)
    app.command("ablate-layer")(ablate_layer)
    app.command("attn-vs-mlp")(attn_vs_mlp)
    app.command("heads")(heads)
    app.command("saliency")(saliency)
    app.command("patch")(patch)
    app.command("attribution")(attribution)
