"""The contraction experiment: R_V = PR(late) / PR(early) per prompt, per group, and contrasts.

Seeds 000 (cells 2, 14) and 003 (layer sweep). For every prompt: token count, PR of the
hook point (V by default) at the early and late layer in both modes (per-head mean and
whole), R_V, and the PR profile over all layers, from one forward pass per batch. Then per
group: n, mean, sd, bootstrap CI; recursive vs baseline: gap, contraction %, Cohen's d and
Hedges' g with bootstrap CI, Welch t, Mann-Whitney and permutation p; and a layer sweep:
the effect size of R_V with the late layer moved over every layer above the early one.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rloop.errors import PromptError
from rloop.experiments.runner import (
    PromptBatch,
    execute,
    model_manifest,
    prompt_batches,
    prompts_manifest,
    run_units,
)
from rloop.experiments.settings import (
    Settings,
    check_settings,
    limit_per_group,
    load,
    load_prompt_set,
)
from rloop.interventions.engine import check_mode_for_point, measure_pr, resolve_layers
from rloop.metrics import r_v
from rloop.metrics.stats import contrast, describe_group
from rloop.prompts import check_window
from rloop.runs import plots as plotting

EXPERIMENT = "contraction"


@dataclass
class ContractionConfig(Settings):
    """Settings of the contraction experiment (defaults match the CLI and the docs)."""

    layers: list[int] | None = None  # [early, late]; None = depth fractions
    pr_modes: list[str] = field(default_factory=lambda: ["per-head", "whole"])
    point: str = "v"
    recursive_group: str = "L5"
    baseline_group: str = "factual"
    batch_size: int = 16


@dataclass
class ContractionResult:
    results: pd.DataFrame  # one row per prompt x pr_mode
    profile: pd.DataFrame  # one row per prompt x layer x pr_mode
    groups: pd.DataFrame  # per group x pr_mode summary
    contrasts: pd.DataFrame  # recursive vs baseline per pr_mode
    layer_sweep: pd.DataFrame  # effect size per late layer x pr_mode
    layer_early: int
    layer_late: int
    layer_rule: str
    timings: dict[str, float]


def measure_contraction(lm, prompt_set, config: ContractionConfig, run=None) -> ContractionResult:
    """Run the contraction measurement on a loaded model and a prompt set.

    ``run`` (an open :class:`rloop.runs.Run`) makes it resumable: finished batches are saved
    as partial results and skipped when the run is resumed.
    """
    if len(prompt_set) == 0:
        raise PromptError("the prompt set is empty: pass a file with at least one prompt")
    adapter = lm.adapter
    check_mode_for_point(config.point, config.pr_modes)
    early, late, rule = resolve_layers(adapter, config.layers, "--layers")
    check_window(prompt_set, lm.tokenizer, config.window)
    all_layers = list(range(max(late, adapter.n_layers - 1) + 1))

    def measure(batch: PromptBatch) -> pd.DataFrame:
        measured = measure_pr(
            lm.model,
            adapter,
            batch.encode(lm),
            all_layers,
            config.window,
            point=config.point,
            modes=config.pr_modes,
            reasons=True,
        )
        table = measured.table()
        table.insert(0, "prompt_id", [batch.prompts[i].id for i in table.pop("row")])
        return table

    started = time.perf_counter()
    batches = prompt_batches(lm, list(prompt_set), config.batch_size)
    profile = run_units(
        run,
        batches,
        measure,
        key=lambda b: b.key,
        label="measuring PR",
        weight=lambda b: len(b.prompts),
    )
    measured = time.perf_counter() - started
    prompts = list(prompt_set)

    meta = pd.DataFrame({"prompt_id": [p.id for p in prompts], "group": [p.group for p in prompts]})
    profile = meta.merge(profile, on="prompt_id", how="inner")
    profile = profile.sort_values(["prompt_id", "pr_mode", "layer"], ignore_index=True)

    results = _r_v_rows(profile, early, late, meta)
    groups = _group_table(results, config)
    contrasts = _contrast_table(results, config)
    sweep = _layer_sweep(profile, early, config)
    timings = {"measure_s": measured, "stats_s": time.perf_counter() - started - measured}
    return ContractionResult(results, profile, groups, contrasts, sweep, early, late, rule, timings)


def _r_v_rows(profile: pd.DataFrame, early: int, late: int, meta: pd.DataFrame) -> pd.DataFrame:
    keys = ["prompt_id", "pr_mode"]
    e = profile[profile.layer == early].set_index(keys)
    lt = profile[profile.layer == late].set_index(keys)
    out = pd.DataFrame(
        {
            "n_tokens": e["n_tokens"],
            "pr_early": e["pr"],
            "pr_late": lt["pr"],
        }
    ).reset_index()
    out["layer_early"] = early
    out["layer_late"] = late
    out["r_v"] = r_v(out["pr_late"].to_numpy(), out["pr_early"].to_numpy())
    reasons = []
    for (pid, mode), row in zip(out[keys].itertuples(index=False), out.itertuples(), strict=True):
        reason = None
        if math.isnan(row.r_v):
            candidates = [e.loc[(pid, mode), "nan_reason"], lt.loc[(pid, mode), "nan_reason"]]
            known = [
                f"layer {layer}: {c}"
                for layer, c in zip((early, late), candidates, strict=True)
                if isinstance(c, str)
            ]
            reason = "; ".join(known) or "PR of the early layer is zero"
        reasons.append(reason)
    out["nan_reason"] = reasons
    out = meta.merge(out, on="prompt_id")
    columns = [
        "prompt_id",
        "group",
        "n_tokens",
        "layer_early",
        "layer_late",
        "pr_mode",
        "pr_early",
        "pr_late",
        "r_v",
        "nan_reason",
    ]
    return out[columns].sort_values(["pr_mode", "group", "prompt_id"], ignore_index=True)


def _group_table(results: pd.DataFrame, config: ContractionConfig) -> pd.DataFrame:
    rows = []
    for (mode, group), frame in results.groupby(["pr_mode", "group"], sort=True):
        summary = describe_group(frame["r_v"].to_numpy(), n_boot=config.n_boot, seed=config.seed)
        rows.append({"pr_mode": mode, "group": group, **asdict(summary)})
    return pd.DataFrame(rows)


def _contrast_table(results: pd.DataFrame, config: ContractionConfig) -> pd.DataFrame:
    rows = []
    groups = set(results["group"])
    if not {config.recursive_group, config.baseline_group} <= groups:
        return pd.DataFrame()
    for mode, frame in results.groupby("pr_mode", sort=True):
        rec = frame.loc[frame.group == config.recursive_group, "r_v"].to_numpy()
        base = frame.loc[frame.group == config.baseline_group, "r_v"].to_numpy()
        c = contrast(rec, base, n_boot=config.n_boot, seed=config.seed)
        rows.append(
            {
                "pr_mode": mode,
                "recursive_group": config.recursive_group,
                "baseline_group": config.baseline_group,
                **c.to_dict(),
            }
        )
    return pd.DataFrame(rows)


def _layer_sweep(profile: pd.DataFrame, early: int, config: ContractionConfig) -> pd.DataFrame:
    """Hedges' g of R_V (recursive vs baseline) with the late layer at every layer > early."""
    rows = []
    groups = set(profile["group"])
    if not {config.recursive_group, config.baseline_group} <= groups:
        return pd.DataFrame()
    base_pr = profile[profile.layer == early].set_index(["prompt_id", "pr_mode"])["pr"]
    for (mode, layer), frame in profile[profile.layer > early].groupby(["pr_mode", "layer"]):
        frame = frame.set_index(["prompt_id", "pr_mode"])
        ratio = r_v(frame["pr"].to_numpy(), base_pr.loc[frame.index].to_numpy())
        group = frame["group"].to_numpy()
        rec = ratio[group == config.recursive_group]
        base = ratio[group == config.baseline_group]
        c = contrast(rec, base, n_boot=min(config.n_boot, 500), n_perm=1000, seed=config.seed)
        d = c.to_dict()
        rows.append(
            {
                "pr_mode": mode,
                "layer_late": layer,
                "layer_early": early,
                "mean_recursive": d["mean_recursive"],
                "mean_baseline": d["mean_baseline"],
                "hedges_g": d["hedges_g"],
                "hedges_g_ci_low": d["hedges_g_ci_low"],
                "hedges_g_ci_high": d["hedges_g_ci_high"],
                "welch_p": d["welch_p"],
            }
        )
    sweep = pd.DataFrame(rows)
    if not sweep.empty:
        sweep["best"] = False
        for _mode, frame in sweep.groupby("pr_mode"):
            g = frame["hedges_g"].to_numpy(dtype=float)
            if np.isfinite(g).any():
                # Contraction means recursive R_V below baseline: the most negative g.
                sweep.loc[frame.index[int(np.nanargmin(g))], "best"] = True
    return sweep


def validate_config(config: ContractionConfig) -> None:
    check_settings(config)


def report_markdown(result: ContractionResult, config: ContractionConfig, model_line: str) -> str:
    """summary.md of a contraction run."""
    lines = [
        "# Contraction experiment",
        "",
        f"- model: {model_line}",
        f"- hook point: `{config.point}`; window: last {config.window} real tokens",
        f"- layers: early {result.layer_early}, late {result.layer_late} ({result.layer_rule})",
        f"- contrast: {config.recursive_group} (recursive) vs {config.baseline_group} (baseline)",
        "",
        "## R_V by group",
        "",
        _markdown_table(result.groups),
        "",
    ]
    if not result.contrasts.empty:
        lines += [
            "## Recursive vs baseline",
            "",
            _markdown_table(result.contrasts.T.reset_index()),
            "",
        ]
    if not result.layer_sweep.empty:
        best = result.layer_sweep[result.layer_sweep["best"]]
        lines += ["## Layer sweep (late layer moved, early fixed)", ""]
        for row in best.itertuples():
            lines.append(
                f"- {row.pr_mode}: strongest contraction at late layer {row.layer_late} "
                f"(Hedges g {row.hedges_g:.2f}, "
                f"CI {row.hedges_g_ci_low:.2f}..{row.hedges_g_ci_high:.2f})"
            )
        lines.append("")
    n_nan = int(result.results["r_v"].isna().sum())
    if n_nan:
        lines += [
            f"**{n_nan} R_V values are NaN** (see `nan_reason` in results.csv); "
            "they are excluded from every mean and counted in `n_nan`.",
            "",
        ]
    lines += [
        "Files: `results.csv/.parquet` (per prompt), `profile.*` (PR per layer), `groups.*`, "
        "`contrasts.*`, `layer_sweep.*`, `plots/`.",
    ]
    return "\n".join(lines) + "\n"


def _markdown_table(frame: pd.DataFrame) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def write_plots(result: ContractionResult, config: ContractionConfig, plot_path) -> list[Path]:
    """R_V by group, PR-by-layer profile per group, effect size by layer (PNG)."""

    paths = [
        plotting.r_v_by_group(result.results, plot_path("r_v_by_group")),
        plotting.pr_profile(
            result.profile, plot_path("pr_profile"), result.layer_early, result.layer_late
        ),
    ]
    if not result.layer_sweep.empty:
        paths.append(plotting.effect_by_layer(result.layer_sweep, plot_path("effect_by_layer")))
    return paths


def run_contraction(
    config: ContractionConfig, out: Path | None = None, force: bool = False, lm=None
) -> tuple[Path, bool, dict]:
    """Full pipeline with a run record. Returns (run_dir, already_complete, headline).

    All checks (settings, prompt file, model, layers, window vs prompt lengths) happen
    before the run directory is created, so bad input writes nothing.
    """
    validate_config(config)
    prompt_set = load_prompt_set(config.prompts, config.bank_version, config.groups)
    prompt_set = limit_per_group(prompt_set, config.max_prompts)
    lm = load(config, lm)
    check_mode_for_point(config.point, config.pr_modes)
    resolve_layers(lm.adapter, config.layers, "--layers")
    check_window(prompt_set, lm.tokenizer, config.window)

    def body(run) -> dict:
        run.set_model(model_manifest(lm))
        run.set_prompts(prompts_manifest(prompt_set, lm.tokenizer))
        result = measure_contraction(lm, prompt_set, config, run=run)
        run.write_table("results", result.results)
        run.write_table("profile", result.profile)
        run.write_table("groups", result.groups)
        if not result.contrasts.empty:
            run.write_table("contrasts", result.contrasts)
        if not result.layer_sweep.empty:
            run.write_table("layer_sweep", result.layer_sweep)
        write_plots(result, config, run.plot_path)
        model_line = f"{lm.name} ({lm.adapter.family}, {lm.adapter.n_layers} layers, {lm.dtype})"
        run.write_summary(report_markdown(result, config, model_line))
        run.update_manifest(
            layers={
                "early": result.layer_early,
                "late": result.layer_late,
                "rule": result.layer_rule,
            },
            timings=result.timings,
        )
        return _headline(result, config)

    outcome = execute(EXPERIMENT, config.to_dict(), lm.name, out, body, force=force)
    return outcome.run_dir, outcome.already_complete, outcome.headline


def _headline(result: ContractionResult, config: ContractionConfig) -> dict:
    headline: dict = {"layer_early": result.layer_early, "layer_late": result.layer_late}
    for row in result.contrasts.to_dict(orient="records"):
        mode = row["pr_mode"]
        headline[f"{mode}:r_v_recursive"] = row.get("mean_recursive")
        headline[f"{mode}:r_v_baseline"] = row.get("mean_baseline")
        headline[f"{mode}:hedges_g"] = row.get("hedges_g")
        headline[f"{mode}:contraction_pct"] = row.get("contraction_pct")
    return headline
