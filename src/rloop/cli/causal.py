"""CLI commands of the causal battery.

``rloop ablate`` (head sweep), ``ablate-group``, ``ablate-layer``, ``attn-vs-mlp``, ``heads``,
``saliency``, ``patch`` and ``attribution``. cli.py calls :func:`register` to add them.
Every command validates its input before it writes anything; bad input is one line on stderr
and exit code 2.
"""

from __future__ import annotations

from pathlib import Path

import typer

# Options shared by every command (OptionInfo objects are plain metadata: safe to reuse).
MODEL = typer.Option(
    "smollm2-135m", "--model", "-m", help="Registry name, hub id, local dir or .gguf file."
)
REVISION = typer.Option(None, help="Hub revision, e.g. step5000 for Pythia checkpoints.")
PROMPTS = typer.Option(
    None, "--prompts", "-p", help="Prompt file (.json/.jsonl/.csv/.txt); default: shipped bank."
)
GROUPS = typer.Option(None, help="Comma-separated prompt groups (default: per command).")
MAX_PROMPTS = typer.Option(10, help="At most this many prompts per group (0 = all).")
MEASURE_LAYERS = typer.Option(None, help="EARLY,LATE layers of R_V, e.g. 5,28 (default by depth).")
WINDOW = typer.Option(16, help="Window: the last W real tokens of each prompt.")
PR_MODE = typer.Option("per-head", help="per-head | whole.")
N_BOOT = typer.Option(2000, help="Bootstrap resamples for CIs.")
SEED = typer.Option(0, help="Seed of every bootstrap and random draw.")
DTYPE = typer.Option(None, help="float32 | bfloat16 | float16 | float64.")
DEVICE = typer.Option(None, help="cpu | cuda | cuda:N (default: auto).")
OUT = typer.Option(
    None, "--out", "-o", help="Run directory (default: rloop-runs/<experiment>-...)."
)
FORCE = typer.Option(False, help="Recompute even if the run directory holds a complete run.")
MODE = typer.Option("zero", help="zero | mean (mean over --reference-group).")
REFERENCE_GROUP = typer.Option("factual", help="Mean-ablation reference prompt group.")


def _names(text: str | None) -> list[str] | None:
    names = [part.strip() for part in (text or "").split(",") if part.strip()]
    return names or None


def _common(
    model,
    revision,
    prompts,
    groups,
    max_prompts,
    measure_layers,
    window,
    pr_mode,
    n_boot,
    seed,
    dtype,
    device,
) -> dict:
    from rloop.cli import parse_int_list

    return {
        "model": model,
        "revision": revision,
        "prompts": str(prompts) if prompts is not None else None,
        "groups": _names(groups),
        "max_prompts": max_prompts or None,
        "measure_layers": parse_int_list(measure_layers, "--measure-layers", count=2),
        "window": window,
        "pr_mode": pr_mode,
        "n_boot": n_boot,
        "seed": seed,
        "dtype": dtype,
        "device": device,
    }


def _finish(result) -> None:
    from rloop.cli import _print_outcome

    run_dir, already, headline = result
    _print_outcome(run_dir, already, headline)


def register(app: typer.Typer) -> None:
    """Add the causal-battery commands (ablate, ablate-group, ..., attribution) to ``app``."""
    from rloop.cli import parse_int_list, run_guarded

    command = app.command

    @app.command("ablate")
    def ablate(
        model: str = MODEL,
        revision: str = REVISION,
        prompts: Path = PROMPTS,
        groups: str = typer.Option(
            None, help="Comma-separated groups (default L5 from the bank, all of a file)."
        ),
        max_prompts: int = typer.Option(10, help="Use at most this many prompts (0 = all)."),
        layers: str = typer.Option(
            None, help="Layers whose heads are swept, e.g. 15-30 or 3,7 (default all)."
        ),
        mode: str = MODE,
        reference_group: str = REFERENCE_GROUP,
        unit: str = typer.Option("query", help="query | kv_group (GQA: a whole KV group)."),
        measure_layers: str = MEASURE_LAYERS,
        window: int = WINDOW,
        pr_mode: str = PR_MODE,
        top_k: int = typer.Option(10, help="Heads listed in the summary."),
        max_rows: int = typer.Option(
            None,
            help="Cap on rows (head x prompt) per stacked forward (default: as many as fit a "
            "quarter of free GPU memory, or 1 GiB of activations on the CPU).",
        ),
        kl: bool = typer.Option(
            False,
            "--kl",
            help="Also the last-token KL(clean || ablated) per head, a behaviour proxy (runs "
            "every layer, the LM head at one token; slower).",
        ),
        n_boot: int = N_BOOT,
        seed: int = SEED,
        dtype: str = DTYPE,
        device: str = DEVICE,
        out: Path = OUT,
        force: bool = FORCE,
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
        """
        from rloop.experiments.ablate import AblationConfig, run_head_sweep

        def go():
            config = AblationConfig(
                model=model,
                revision=revision,
                prompts=str(prompts) if prompts is not None else None,
                groups=_names(groups),
                max_prompts=max_prompts or None,
                layers=parse_int_list(layers, "--layers"),
                mode=mode,
                reference_group=reference_group,
                unit=unit,
                measure_layers=parse_int_list(measure_layers, "--measure-layers", count=2),
                window=window,
                pr_mode=pr_mode,
                top_k=top_k,
                max_rows=max_rows,
                kl=kl,
                n_boot=n_boot,
                seed=seed,
                dtype=dtype,
                device=device,
            )
            _finish(run_head_sweep(config, out=out, force=force))

        run_guarded(go)

    @command("ablate-group")
    def ablate_group(
        heads: str = typer.Option(
            None, help="Heads to ablate together: LAYER.HEAD,... e.g. 15.4,16.2"
        ),
        from_sweep: Path = typer.Option(
            None, help="Run directory of a finished `rloop ablate`: take its top heads."
        ),
        top_k: int = typer.Option(10, help="With --from-sweep: how many heads."),
        select: str = typer.Option(
            "abs", help="With --from-sweep: abs | negative (the 'expanders') | positive."
        ),
        unit: str = typer.Option("query", help="query | kv_group."),
        n_random: int = typer.Option(20, help="Random same-layer head groups (control)."),
        mode: str = MODE,
        reference_group: str = REFERENCE_GROUP,
        model: str = MODEL,
        revision: str = REVISION,
        prompts: Path = PROMPTS,
        groups: str = GROUPS,
        max_prompts: int = MAX_PROMPTS,
        measure_layers: str = MEASURE_LAYERS,
        window: int = WINDOW,
        pr_mode: str = PR_MODE,
        n_boot: int = N_BOOT,
        seed: int = SEED,
        dtype: str = DTYPE,
        device: str = DEVICE,
        out: Path = OUT,
        force: bool = FORCE,
    ) -> None:
        """Ablate several heads together; R_V clean vs ablated, vs random head groups.

        Examples:

          rloop ablate-group --heads 15.4,16.2,17.24

          rloop ablate-group --from-sweep rloop-runs/ablate-smollm2-135m-ab12cd --top-k 10 \\
              --select negative --n-random 50
        """
        from rloop.experiments.ablate_group import GroupAblationConfig, run_group_ablation

        def go():
            config = GroupAblationConfig(
                **_common(
                    model,
                    revision,
                    prompts,
                    groups,
                    max_prompts,
                    measure_layers,
                    window,
                    pr_mode,
                    n_boot,
                    seed,
                    dtype,
                    device,
                ),
                heads=heads,
                from_sweep=str(from_sweep) if from_sweep is not None else None,
                top_k=top_k,
                select=select,
                mode=mode,
                reference_group=reference_group,
                unit=unit,
                n_random=n_random,
            )
            _finish(run_group_ablation(config, out=out, force=force))

        run_guarded(go)

    @command("ablate-layer")
    def ablate_layer(
        layers: str = typer.Option(..., help="Layers to ablate one at a time, e.g. 19 or 10-20."),
        component: str = typer.Option("attn", help="attn | mlp | both."),
        mode: str = MODE,
        reference_group: str = REFERENCE_GROUP,
        model: str = MODEL,
        revision: str = REVISION,
        prompts: Path = PROMPTS,
        groups: str = GROUPS,
        max_prompts: int = MAX_PROMPTS,
        measure_layers: str = MEASURE_LAYERS,
        window: int = WINDOW,
        pr_mode: str = PR_MODE,
        n_boot: int = N_BOOT,
        seed: int = SEED,
        dtype: str = DTYPE,
        device: str = DEVICE,
        out: Path = OUT,
        force: bool = FORCE,
    ) -> None:
        """Ablate a whole layer's attention output (or MLP output); R_V clean vs ablated.

        Examples:

          rloop ablate-layer --layers 19 --measure-layers 5,28

          rloop ablate-layer --layers 0-25 --component both --mode mean
        """
        from rloop.experiments.ablate_layer import LayerAblationConfig, run_layer_ablation

        def go():
            components = ["attn", "mlp"] if component == "both" else [component]
            config = LayerAblationConfig(
                **_common(
                    model,
                    revision,
                    prompts,
                    groups,
                    max_prompts,
                    measure_layers,
                    window,
                    pr_mode,
                    n_boot,
                    seed,
                    dtype,
                    device,
                ),
                layers=parse_int_list(layers, "--layers"),
                components=components,
                mode=mode,
                reference_group=reference_group,
            )
            _finish(run_layer_ablation(config, out=out, force=force))

        run_guarded(go)

    @command("attn-vs-mlp")
    def attn_vs_mlp(
        layers: str = typer.Option(None, help="Layers, e.g. 15,18,21 or 10-29 (default all)."),
        recursive_group: str = typer.Option("L5", help="Recursive group of the contrast."),
        baseline_group: str = typer.Option("factual", help="Baseline group of the contrast."),
        batch_size: int = typer.Option(16, help="Prompts per forward pass."),
        model: str = MODEL,
        revision: str = REVISION,
        prompts: Path = PROMPTS,
        groups: str = GROUPS,
        max_prompts: int = MAX_PROMPTS,
        window: int = WINDOW,
        n_boot: int = N_BOOT,
        seed: int = SEED,
        dtype: str = DTYPE,
        device: str = DEVICE,
        out: Path = OUT,
        force: bool = FORCE,
    ) -> None:
        """PR of the attention-block output vs the MLP output per layer and prompt group.

        Examples:

          rloop attn-vs-mlp

          rloop attn-vs-mlp --layers 15,18,21,24,27,30 --groups L5,factual
        """
        from rloop.experiments.attn_vs_mlp import ComponentsConfig, run_components

        def go():
            common = _common(
                model,
                revision,
                prompts,
                groups,
                max_prompts,
                None,
                window,
                "per-head",
                n_boot,
                seed,
                dtype,
                device,
            )
            config = ComponentsConfig(
                **common,
                layers=parse_int_list(layers, "--layers"),
                recursive_group=recursive_group,
                baseline_group=baseline_group,
                batch_size=batch_size,
            )
            _finish(run_components(config, out=out, force=force))

        run_guarded(go)

    @command("heads")
    def heads_command(
        layers: str = typer.Option(None, help="Layers, e.g. 28 or 15-30 (default all)."),
        recursive_group: str = typer.Option("L5", help="Recursive group of the contrast."),
        baseline_group: str = typer.Option("factual", help="Baseline group of the contrast."),
        batch_size: int = typer.Option(8, help="Prompts per forward pass."),
        top_k: int = typer.Option(10, help="Heads listed in the summary."),
        model: str = MODEL,
        revision: str = REVISION,
        prompts: Path = PROMPTS,
        groups: str = GROUPS,
        max_prompts: int = MAX_PROMPTS,
        window: int = WINDOW,
        n_boot: int = N_BOOT,
        seed: int = SEED,
        dtype: str = DTYPE,
        device: str = DEVICE,
        out: Path = OUT,
        force: bool = FORCE,
    ) -> None:
        """Per-head diagnostics: output norm and rank, per-head PR, attention self-score and
        entropy, each recursive vs baseline with effect sizes.

        Examples:

          rloop heads --layers 28

          rloop heads --groups L5,factual --max-prompts 20
        """
        from rloop.experiments.heads import HeadDiagnosticsConfig, run_head_diagnostics

        def go():
            common = _common(
                model,
                revision,
                prompts,
                groups,
                max_prompts,
                None,
                window,
                "per-head",
                n_boot,
                seed,
                dtype,
                device,
            )
            config = HeadDiagnosticsConfig(
                **common,
                layers=parse_int_list(layers, "--layers"),
                recursive_group=recursive_group,
                baseline_group=baseline_group,
                batch_size=batch_size,
                top_k=top_k,
            )
            _finish(run_head_diagnostics(config, out=out, force=force))

        run_guarded(go)

    @command("saliency")
    def saliency(
        layers: str = typer.Option(None, help="Layers, e.g. 0-10 (default all, layer 0 included)."),
        batch_size: int = typer.Option(4, help="Prompts per forward + backward."),
        top_k: int = typer.Option(10, help="Heads listed in the summary."),
        model: str = MODEL,
        revision: str = REVISION,
        prompts: Path = PROMPTS,
        groups: str = GROUPS,
        max_prompts: int = MAX_PROMPTS,
        measure_layers: str = MEASURE_LAYERS,
        window: int = WINDOW,
        pr_mode: str = PR_MODE,
        n_boot: int = N_BOOT,
        seed: int = SEED,
        dtype: str = DTYPE,
        device: str = DEVICE,
        out: Path = OUT,
        force: bool = FORCE,
    ) -> None:
        """Gradient saliency ||dR_V/dz|| of every head (layer x head heatmap).

        Examples:

          rloop saliency

          rloop saliency --measure-layers 5,28 --groups L5,factual
        """
        from rloop.experiments.saliency import SaliencyConfig, run_saliency

        def go():
            config = SaliencyConfig(
                **_common(
                    model,
                    revision,
                    prompts,
                    groups,
                    max_prompts,
                    measure_layers,
                    window,
                    pr_mode,
                    n_boot,
                    seed,
                    dtype,
                    device,
                ),
                layers=parse_int_list(layers, "--layers"),
                batch_size=batch_size,
                top_k=top_k,
            )
            _finish(run_saliency(config, out=out, force=force))

        run_guarded(go)

    @command("patch")
    def patch(
        heads: str = typer.Option(None, help="Patch these heads: LAYER.HEAD,... e.g. 28.11"),
        layers: str = typer.Option(None, help="Patch the whole --point at these layers."),
        point: str = typer.Option(
            None, help="Hook point (default z with --heads, resid_pre with --layers)."
        ),
        positions: str = typer.Option(
            "window", help="window (last W positions, aligned from the end) | all (equal lengths)."
        ),
        source_group: str = typer.Option("L5", help="Source (recursive) group."),
        target_group: str = typer.Option("factual", help="Target (baseline) group."),
        batch_size: int = typer.Option(16, help="Pairs per stacked forward."),
        model: str = MODEL,
        revision: str = REVISION,
        prompts: Path = PROMPTS,
        groups: str = GROUPS,
        max_prompts: int = MAX_PROMPTS,
        measure_layers: str = MEASURE_LAYERS,
        window: int = WINDOW,
        pr_mode: str = PR_MODE,
        n_boot: int = N_BOOT,
        seed: int = SEED,
        dtype: str = DTYPE,
        device: str = DEVICE,
        out: Path = OUT,
        force: bool = FORCE,
    ) -> None:
        """Activation patching from source (recursive) into target (baseline) prompts; transfer %.

        Circular patches (writing what R_V then reads) are reported as such, not as a transfer.

        Examples:

          rloop patch --heads 28.11 --measure-layers 5,28      # the seed's "Head 11" test

          rloop patch --layers 19 --point attn_out

          rloop patch --layers 10-12 --point mlp_out --source-group L5 --target-group factual
        """
        from rloop.experiments.patch import PatchConfig, run_patching

        def go():
            config = PatchConfig(
                **_common(
                    model,
                    revision,
                    prompts,
                    groups,
                    max_prompts,
                    measure_layers,
                    window,
                    pr_mode,
                    n_boot,
                    seed,
                    dtype,
                    device,
                ),
                heads=heads,
                layers=parse_int_list(layers, "--layers"),
                point=point,
                positions=positions,
                source_group=source_group,
                target_group=target_group,
                batch_size=batch_size,
            )
            _finish(run_patching(config, out=out, force=force))

        run_guarded(go)

    @command("attribution")
    def attribution(
        from_sweep: Path = typer.Option(
            None, help="Compare with this finished `rloop ablate` run (default: run the sweep)."
        ),
        layers: str = typer.Option(None, help="Layers, e.g. 15-28 (default all)."),
        mode: str = MODE,
        reference_group: str = REFERENCE_GROUP,
        batch_size: int = typer.Option(4, help="Prompts per forward + backward."),
        max_rows: int = typer.Option(
            None, help="Cap on rows per stacked forward of the exact sweep (default: memory)."
        ),
        top_k: int = typer.Option(10, help="Heads listed; top-k overlap of the two rankings."),
        model: str = MODEL,
        revision: str = REVISION,
        prompts: Path = PROMPTS,
        groups: str = GROUPS,
        max_prompts: int = MAX_PROMPTS,
        measure_layers: str = MEASURE_LAYERS,
        window: int = WINDOW,
        pr_mode: str = PR_MODE,
        n_boot: int = N_BOOT,
        seed: int = SEED,
        dtype: str = DTYPE,
        device: str = DEVICE,
        out: Path = OUT,
        force: bool = FORCE,
    ) -> None:
        """Attribution patching: every head's ablation effect from one backward, with its rank
        correlation to the exact sweep.

        Examples:

          rloop attribution                                  # gradients + exact sweep

          rloop attribution --from-sweep rloop-runs/ablate-smollm2-135m-ab12cd
        """
        from rloop.experiments.attribution import AttributionConfig, run_attribution

        def go():
            config = AttributionConfig(
                **_common(
                    model,
                    revision,
                    prompts,
                    groups,
                    max_prompts,
                    measure_layers,
                    window,
                    pr_mode,
                    n_boot,
                    seed,
                    dtype,
                    device,
                ),
                layers=parse_int_list(layers, "--layers"),
                mode=mode,
                reference_group=reference_group,
                from_sweep=str(from_sweep) if from_sweep is not None else None,
                batch_size=batch_size,
                max_rows=max_rows,
                top_k=top_k,
            )
            _finish(run_attribution(config, out=out, force=force))

        run_guarded(go)
