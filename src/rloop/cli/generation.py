"""CLI commands over generation: ``rloop validate``, ``rloop temporal``, ``rloop kv-patch``.

cli.py calls :func:`register` to add them to the main app.
"""

from __future__ import annotations

from pathlib import Path

import typer


def _floats(text: str | None, what: str) -> list[float] | None:
    from rloop.errors import ConfigError

    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"cannot read {what} {text!r}: write numbers like 0,0.5,1") from None


def register(app: typer.Typer) -> None:
    """Add the validate, temporal and kv-patch commands to ``app``."""

    @app.command("validate")
    def validate(
        config: Path = typer.Option(
            None,
            "--config",
            "-c",
            help="TOML config; default: rloop/configs/validate_default.toml.",
        ),
        model: str = typer.Option(None, "--model", "-m", help="Override [model] name."),
        n_pairs: int = typer.Option(None, help="Override [prompts] n_pairs."),
        max_new_tokens: int = typer.Option(None, help="Override [generation] max_new_tokens."),
        dtype: str = typer.Option(None, help="float32 | bfloat16 | float16 | float64."),
        device: str = typer.Option(None, help="cpu | cuda | cuda:1 ..."),
        out: Path = typer.Option(None, "--out", "-o", help="Run directory."),
        force: bool = typer.Option(False, help="Recompute even if the run is complete."),
    ) -> None:
        """The 4-phase validation run (R_V phenomenon, V-patching null, KV-patching
        mechanism, alpha dose-response) with a verdict per phase computed against the
        config's thresholds.

        Examples:

          rloop validate                       # embedded SmolLM2-135M, default config

          rloop validate --config my.toml --model mistralai/Mistral-7B-v0.1 --device cuda
        """
        from rloop.cli import _print_outcome, run_guarded
        from rloop.experiments.validate import load_validate_config, run_validate

        def go():
            settings = load_validate_config(
                config,
                model=model,
                n_pairs=n_pairs,
                max_new_tokens=max_new_tokens,
                dtype=dtype,
                device=device,
            )
            run_dir, already, headline = run_validate(settings, out=out, force=force)
            _print_outcome(run_dir, already, headline)

        run_guarded(go)

    @app.command("temporal")
    def temporal(
        model: str = typer.Option("smollm2-135m", "--model", "-m", help="Model to load."),
        prompts: Path = typer.Option(None, "--prompts", "-p", help="Prompt file; default: bank."),
        groups: str = typer.Option(None, help="Groups to profile; default L5,factual."),
        layers: str = typer.Option(None, help="EARLY,LATE layers of R_V."),
        window: int = typer.Option(16, help="Window W (tokens)."),
        pr_mode: str = typer.Option("per-head", help="per-head | whole."),
        max_new_tokens: int = typer.Option(64, help="Tokens to generate."),
        temperature: float = typer.Option(0.0, help="0 = greedy."),
        top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
        seed: int = typer.Option(0, help="Sampling seed (recorded)."),
        batch_size: int = typer.Option(24, help="Prompts per batched generation."),
        dtype: str = typer.Option(None, help="float32 | bfloat16 | float16 | float64."),
        device: str = typer.Option(None, help="cpu | cuda ..."),
        out: Path = typer.Option(None, "--out", "-o", help="Run directory."),
        force: bool = typer.Option(False, help="Recompute even if the run is complete."),
    ) -> None:
        """R_V at the end of encoding (step 0) and after every generated token, per group.

        Examples:

          rloop temporal

          rloop temporal --groups L1,L5,factual --max-new-tokens 40 --window 16
        """
        from rloop.cli import _print_outcome, parse_int_list, run_guarded
        from rloop.experiments.temporal import TemporalConfig, run_temporal

        def go():
            settings = TemporalConfig(
                model=model,
                prompts=str(prompts) if prompts is not None else None,
                groups=[g.strip() for g in groups.split(",")] if groups else None,
                layers=parse_int_list(layers, "--layers", count=2),
                window=window,
                pr_mode=pr_mode,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                batch_size=batch_size,
                dtype=dtype,
                device=device,
            )
            run_dir, already, headline = run_temporal(settings, out=out, force=force)
            _print_outcome(run_dir, already, headline)

        run_guarded(go)

    @app.command("kv-patch")
    def kv_patch(
        model: str = typer.Option("smollm2-135m", "--model", "-m", help="Model to load."),
        prompts: Path = typer.Option(None, "--prompts", "-p", help="Prompt file; default: bank."),
        recursive_group: str = typer.Option("L5", help="Source group."),
        baseline_group: str = typer.Option("factual", help="Target group."),
        n_pairs: int = typer.Option(10, help="(target, source) pairs."),
        ranges: str = typer.Option(
            None, help="Layer ranges separated by ';', e.g. '15-29;23-27;25' (default: 2nd half)."
        ),
        alphas: str = typer.Option("0,0.25,0.5,0.75,1", help="Mixing weights in [0, 1]."),
        layers: str = typer.Option(None, help="EARLY,LATE layers of R_V."),
        window: int = typer.Option(16, help="Window W over generated tokens."),
        pr_mode: str = typer.Option("per-head", help="per-head | whole."),
        max_new_tokens: int = typer.Option(64, help="Tokens to generate."),
        temperature: float = typer.Option(0.0, help="0 = greedy."),
        top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
        seed: int = typer.Option(0, help="Sampling and bootstrap seed."),
        max_batch_rows: int = typer.Option(128, help="Generations per batched call."),
        semantic: str = typer.Option("auto", help="Behaviour semantic component: auto | off."),
        dtype: str = typer.Option(None, help="float32 | bfloat16 | float16 | float64."),
        device: str = typer.Option(None, help="cpu | cuda ..."),
        out: Path = typer.Option(None, "--out", "-o", help="Run directory."),
        force: bool = typer.Option(False, help="Recompute even if the run is complete."),
    ) -> None:
        """KV-cache patching of recursive sources into baseline targets: transfer of R_V and
        behaviour per layer range and alpha, dose-response, R_V-behaviour correlation.

        Examples:

          rloop kv-patch                                  # second half of layers, alpha grid

          rloop kv-patch --ranges '15-29;23-27;25' --alphas 1   # seed 003's range table
        """
        from rloop.cli import _print_outcome, parse_int_list, run_guarded
        from rloop.experiments.kv_patch import KVPatchConfig, run_kv_patching

        def go():
            settings = KVPatchConfig(
                model=model,
                prompts=str(prompts) if prompts is not None else None,
                recursive_group=recursive_group,
                baseline_group=baseline_group,
                n_pairs=n_pairs,
                ranges=[r.strip() for r in ranges.split(";") if r.strip()] if ranges else None,
                alphas=_floats(alphas, "--alphas"),
                layers=parse_int_list(layers, "--layers", count=2),
                window=window,
                pr_mode=pr_mode,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                max_batch_rows=max_batch_rows,
                semantic=semantic,
                dtype=dtype,
                device=device,
            )
            run_dir, already, headline = run_kv_patching(settings, out=out, force=force)
            _print_outcome(run_dir, already, headline)

        run_guarded(go)
