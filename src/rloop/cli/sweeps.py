"""CLI commands across models: ``rloop gain``, ``rloop scaling``, ``rloop checkpoints``.

cli.py calls :func:`register` to add them to the main app.
"""

from __future__ import annotations

from pathlib import Path

import typer


def _names(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _settings(**kwargs):
    from rloop.cli import parse_int_list
    from rloop.experiments.sweeps import ContractionSettings

    pr_mode = kwargs.pop("pr_mode")
    layers = kwargs.pop("layers")
    groups = kwargs.pop("groups")
    prompts = kwargs.pop("prompts")
    return ContractionSettings(
        prompts=str(prompts) if prompts is not None else None,
        groups=_names(groups) or None,
        layers=parse_int_list(layers, "--layers", count=2),
        pr_modes=["per-head", "whole"] if pr_mode == "both" else [pr_mode],
        **kwargs,
    )


def _print_sweep(outcome) -> None:
    from rloop.cli import _print_outcome

    _print_outcome(outcome.run_dir, outcome.already_complete, outcome.headline)


def register(app: typer.Typer) -> None:
    """Add the gain, scaling and checkpoints commands to ``app``."""

    @app.command("gain")
    def gain(
        model: str = typer.Option(
            "smollm2-135m", "--model", "-m", help="One model (registry name, hub id, local dir)."
        ),
        models: str = typer.Option(None, help="Comma-separated models; replaces --model."),
        revision: str = typer.Option(None, help="Hub revision for every model."),
        prompts: Path = typer.Option(None, "--prompts", "-p", help="Prompt file; default: bank."),
        groups: str = typer.Option(None, help="Comma-separated prompt groups to keep."),
        batch_size: int = typer.Option(8, help="Prompts per forward pass."),
        rho_threshold: float = typer.Option(0.2, help="H25: rho >= this predicts gain < 1."),
        n_boot: int = typer.Option(2000, help="Bootstrap resamples for CIs."),
        seed: int = typer.Option(0, help="Seed of every bootstrap."),
        dtype: str = typer.Option(None, help="float32 | bfloat16 | float16 | float64."),
        device: str = typer.Option(None, help="cpu | cuda | auto (spread over all GPUs)."),
        out: Path = typer.Option(None, "--out", "-o", help="Run directory."),
        force: bool = typer.Option(False, help="Recompute even if the run is complete."),
    ) -> None:
        """Residual-stream gain of every block (hooks, not hidden_states), the final norm's
        effect, rho = n_heads / d_head and the H25 analysis across models.

        Examples:

          rloop gain                                   # embedded SmolLM2-135M

          rloop gain --models EleutherAI/pythia-70m,EleutherAI/pythia-160m,EleutherAI/pythia-410m
        """
        from rloop.cli import out_console, run_guarded
        from rloop.experiments.gain import GainConfig, run_gain

        def go():
            config = GainConfig(
                models=_names(models) or [model],
                revision=revision,
                prompts=str(prompts) if prompts is not None else None,
                groups=_names(groups) or None,
                batch_size=batch_size,
                rho_threshold=rho_threshold,
                n_boot=n_boot,
                seed=seed,
                dtype=dtype,
                device=device,
            )
            run_dir, already, headline = run_gain(config, out=out, force=force)
            from rloop.cli import _print_outcome

            _print_outcome(run_dir, already, headline)
            out_console.print(f"figure: {Path(run_dir) / 'plots' / 'h25.png'}")

        run_guarded(go)

    @app.command("scaling")
    def scaling(
        models: str = typer.Option(
            ..., help="Comma-separated models, e.g. pythia-70m,pythia-160m."
        ),
        revision: str = typer.Option(None, help="Hub revision for every model."),
        gain: bool = typer.Option(False, "--gain", help="Also measure residual gain (H25)."),
        executor: str = typer.Option("local", help="local (sequential) | ray."),
        ray_address: str = typer.Option(None, help="Ray cluster address (host:port or auto)."),
        gpus_per_job: float = typer.Option(None, help="GPUs per Ray job (default: 1 if any)."),
        prompts: Path = typer.Option(None, "--prompts", "-p", help="Prompt file; default: bank."),
        groups: str = typer.Option(None, help="Comma-separated prompt groups to keep."),
        layers: str = typer.Option(None, help="EARLY,LATE layers (default: by depth)."),
        window: int = typer.Option(16, help="Window: the last W real tokens."),
        pr_mode: str = typer.Option("both", help="per-head | whole | both."),
        point: str = typer.Option("v", help="Hook point."),
        recursive_group: str = typer.Option("L5", help="Recursive group of the contrast."),
        baseline_group: str = typer.Option("factual", help="Baseline group of the contrast."),
        batch_size: int = typer.Option(16, help="Prompts per forward pass."),
        n_boot: int = typer.Option(2000, help="Bootstrap resamples."),
        seed: int = typer.Option(0, help="Seed."),
        dtype: str = typer.Option(None, help="Model dtype."),
        device: str = typer.Option(None, help="cpu | cuda | auto (spread over all GPUs)."),
        out: Path = typer.Option(None, "--out", "-o", help="Sweep run directory."),
        force: bool = typer.Option(
            False, help="Rebuild the tables and retry failed jobs (finished job runs are reused)."
        ),
    ) -> None:
        """Contraction (R_V recursive vs baseline) across models, one loaded at a time; table
        and plot vs parameter count. Resumes where it stopped.

        Examples:

          rloop scaling --models EleutherAI/pythia-70m,EleutherAI/pythia-160m --gain

          rloop scaling --models a,b,c --executor ray --ray-address auto --gpus-per-job 1
        """
        from rloop.cli import run_guarded

        def go():
            from rloop.experiments.executors import make_executor
            from rloop.experiments.sweeps import ScalingConfig, run_scaling

            settings = _settings(
                prompts=prompts, groups=groups, layers=layers, window=window, pr_mode=pr_mode,
                point=point, recursive_group=recursive_group, baseline_group=baseline_group,
                batch_size=batch_size, n_boot=n_boot, seed=seed, dtype=dtype, device=device,
            )  # fmt: skip
            config = ScalingConfig(
                models=_names(models), revision=revision, gain=gain, settings=settings
            )
            runner = make_executor(executor, ray_address, gpus_per_job)
            _print_sweep(run_scaling(config, out=out, force=force, executor=runner))

        run_guarded(go)

    @app.command("checkpoints")
    def checkpoints(
        model: str = typer.Option(None, "--model", "-m", help="Hub id the revisions belong to."),
        revisions: str = typer.Option(None, help="Comma-separated revisions, e.g. step0,step1000."),
        checkpoint_dirs: str = typer.Option(None, help="Comma-separated local checkpoint dirs."),
        evict: bool = typer.Option(
            False,
            "--evict",
            help="Delete each checkpoint after measuring it (hub: its HF cache entry; "
            "--checkpoint-dirs: the directory itself).",
        ),
        executor: str = typer.Option("local", help="local (sequential) | ray."),
        ray_address: str = typer.Option(None, help="Ray cluster address (host:port or auto)."),
        gpus_per_job: float = typer.Option(None, help="GPUs per Ray job (default: 1 if any)."),
        prompts: Path = typer.Option(None, "--prompts", "-p", help="Prompt file; default: bank."),
        groups: str = typer.Option(None, help="Comma-separated prompt groups to keep."),
        layers: str = typer.Option(None, help="EARLY,LATE layers (default: by depth)."),
        window: int = typer.Option(16, help="Window: the last W real tokens."),
        pr_mode: str = typer.Option("both", help="per-head | whole | both."),
        point: str = typer.Option("v", help="Hook point."),
        recursive_group: str = typer.Option("L5", help="Recursive group of the contrast."),
        baseline_group: str = typer.Option("factual", help="Baseline group of the contrast."),
        batch_size: int = typer.Option(16, help="Prompts per forward pass."),
        n_boot: int = typer.Option(2000, help="Bootstrap resamples."),
        seed: int = typer.Option(0, help="Seed."),
        dtype: str = typer.Option(None, help="Model dtype."),
        device: str = typer.Option(None, help="cpu | cuda | auto."),
        out: Path = typer.Option(None, "--out", "-o", help="Sweep run directory."),
        force: bool = typer.Option(
            False, help="Rebuild the tables and retry failed jobs (finished job runs are reused)."
        ),
    ) -> None:
        """R_V per group and the recursive-baseline gap across training checkpoints.

        Examples:

          rloop checkpoints --model EleutherAI/pythia-410m \\
              --revisions step0,step1000,step5000,step10000,step143000 --evict

          rloop checkpoints --checkpoint-dirs ckpt/step100,ckpt/step200 --layers 1,2
        """
        from rloop.cli import run_guarded

        def go():
            from rloop.experiments.executors import make_executor
            from rloop.experiments.sweeps import CheckpointConfig, run_checkpoints

            settings = _settings(
                prompts=prompts, groups=groups, layers=layers, window=window, pr_mode=pr_mode,
                point=point, recursive_group=recursive_group, baseline_group=baseline_group,
                batch_size=batch_size, n_boot=n_boot, seed=seed, dtype=dtype, device=device,
            )  # fmt: skip
            config = CheckpointConfig(
                model=model,
                revisions=_names(revisions) or None,
                checkpoint_dirs=_names(checkpoint_dirs) or None,
                evict=evict,
                settings=settings,
            )
            runner = make_executor(executor, ray_address, gpus_per_job)
            _print_sweep(run_checkpoints(config, out=out, force=force, executor=runner))

        run_guarded(go)
