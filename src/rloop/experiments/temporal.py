"""Temporal profile of R_V during generation (seed 003, "temporal cinematography").

For every prompt: generate N tokens capturing V at the early and late layer at every step,
then R_V at step 0 (end of encoding: the last W prompt tokens) and after every step s
(scope "prompt+generated": the last W tokens of prompt + first s generated tokens; scope
"generated": the last W of the first s generated tokens, once s >= W). Per group: mean curve
with standard error, and a plot. Each generation chunk (``batch_size`` prompts, sampling
seeded per chunk) is a resume checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from rloop.capture.generation import generate, pad_id_of, tokenize_rows
from rloop.capture.trace import address
from rloop.experiments.runner import (
    execute,
    model_manifest,
    prompts_manifest,
    run_identity,
    run_units,
)
from rloop.experiments.settings import (
    GenerationSettings,
    check_context,
    check_settings,
    limit_per_group,
    load,
    load_prompt_set,
    verify_if_asked,
)
from rloop.interventions.engine import check_mode_for_point, resolve_layers
from rloop.metrics import r_v, window_pr
from rloop.prompts import check_window
from rloop.runs.markdown import markdown_table
from rloop.runs.plots import _save, plt

EXPERIMENT = "temporal"
SCOPE_ALL = "prompt+generated"
SCOPE_GENERATED = "generated"


@dataclass
class TemporalConfig(GenerationSettings):
    """R_V after every generated token (defaults match ``rloop temporal``); ``groups`` None =
    recursive_group and baseline_group."""

    batch_size: int = 24


def chunk_profile(lm, prompts: list, rows: list, config: TemporalConfig, early: int, late: int):
    """Per prompt x step x scope R_V of one generation chunk (``prompts`` and their token
    ``rows``), in the order step, scope, prompt. Sampling is seeded per chunk (the seed of
    :func:`rloop.capture.generation.generate`), so a chunk's tokens do not depend on the
    chunks generated before it."""
    points = [address(early, "v"), address(late, "v")]
    result = generate(
        lm.model, lm.adapter, rows, config.sampling(), points, pad_id_of(lm.tokenizer)
    )
    records = []
    for step in range(result.new_tokens.shape[1] + 1):
        scopes = [(SCOPE_ALL, [result.prompt_window(a, config.window, step) for a in points])]
        if step >= config.window:
            scopes.append(
                (SCOPE_GENERATED, [result.generated_window(a, config.window, step) for a in points])
            )
        for scope, (win_early, win_late) in scopes:
            value = r_v(window_pr(win_late, config.pr_mode), window_pr(win_early, config.pr_mode))
            for i, p in enumerate(prompts):
                records.append(
                    {
                        "prompt_id": p.id,
                        "group": p.group,
                        "step": step,
                        "scope": scope,
                        "r_v": float(value[i]),
                    }
                )
    return pd.DataFrame(records)


def temporal_profile(lm, prompt_set, config: TemporalConfig, early: int, late: int, run=None):
    """(per_step, curves): per prompt x step x scope R_V, and per group x step x scope mean.

    Prompts are generated ``batch_size`` at a time; with ``run`` each chunk is a resume
    checkpoint."""
    prompts = list(prompt_set)
    rows = tokenize_rows(lm.tokenizer, [p.text for p in prompts])
    size = config.batch_size

    def chunk_rows(start: int) -> pd.DataFrame:
        return chunk_profile(
            lm, prompts[start : start + size], rows[start : start + size], config, early, late
        )

    per_step = run_units(
        run, list(range(0, len(prompts), size)), chunk_rows,
        key=lambda start: f"prompts-{start:05d}", label="generating",
        weight=lambda start: len(prompts[start : start + size]),
    )  # fmt: skip
    curves = (
        per_step.groupby(["group", "scope", "step"])["r_v"]
        .agg(n="count", mean="mean", sd="std", sem="sem")
        .reset_index()
    )
    return per_step, curves


def plot_curves(curves: pd.DataFrame, path):
    """R_V by generation step per group, one panel per window scope that has values. With
    fewer than W generated tokens there is no generated-only window: that panel is left out
    and the title says why."""
    scopes = [s for s in (SCOPE_ALL, SCOPE_GENERATED) if (curves.scope == s).any()]
    scopes = scopes or [SCOPE_ALL]
    fig, axes = plt.subplots(
        1, len(scopes), figsize=(5.5 * len(scopes) + 0.5, 4), sharey=True, squeeze=False
    )
    for ax, scope in zip(axes[0], scopes, strict=True):
        frame = curves[curves.scope == scope]
        for group, g in frame.groupby("group"):
            (line,) = ax.plot(g["step"], g["mean"], label=group)
            ax.fill_between(g["step"], g["mean"] - g["sem"], g["mean"] + g["sem"], alpha=0.2,
                            color=line.get_color())  # fmt: skip
        title = f"R_V over the last W tokens ({scope})"
        if SCOPE_GENERATED not in scopes:
            title += "\nno generated-only window: fewer than W tokens generated"
        ax.set_title(title)
        ax.set_xlabel("generation step (0 = end of encoding)")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("R_V (mean +- s.e.)")
    return _save(fig, path)


def run_temporal(config: TemporalConfig, out=None, force: bool = False, lm=None):
    """Full pipeline with a run record; checks happen before anything is written."""

    config.sampling()
    check_settings(config)
    check_mode_for_point("v", [config.pr_mode])
    groups = config.groups or [config.recursive_group, config.baseline_group]
    prompt_set = load_prompt_set(config.prompts, config.bank_version, groups)
    prompt_set = limit_per_group(prompt_set, config.max_prompts)
    lm = load(config, lm, verify=False)
    early, late, _ = resolve_layers(lm.adapter, config.layers)
    check_window(prompt_set, lm.tokenizer, config.window)
    check_context(prompt_set, lm, config.max_new_tokens)
    verify_if_asked(config, lm, prompt_set, [early, late])

    def body(run) -> dict:
        run.set_model(model_manifest(lm))
        run.set_prompts(prompts_manifest(prompt_set, lm.tokenizer))
        per_step, curves = temporal_profile(lm, prompt_set, config, early, late, run=run)
        run.write_table("per_step", per_step)
        run.write_table("curves", curves)
        plot_curves(curves, run.plot_path("temporal_r_v"))
        last = int(curves["step"].max())
        marks = curves[(curves.scope == SCOPE_ALL) & curves.step.isin([0, last])]
        summary = [
            "# Temporal R_V profile",
            "",
            f"- model: {lm.name}; R_V = PR(V L{late}) / PR(V L{early}), {config.pr_mode}, "
            f"window {config.window}; {config.max_new_tokens} tokens, seed {config.seed}",
            "",
            "## R_V at step 0 (end of encoding) and at the last step",
            "",
            markdown_table(marks),
            "",
            "Files: `per_step.*` (prompt x step x scope), `curves.*`, `plots/temporal_r_v.png`.",
        ]
        run.write_summary("\n".join(summary) + "\n")
        run.update_manifest(
            layers={"early": early, "late": late}, sampling=config.sampling().to_dict()
        )
        head = {}
        for row in marks.itertuples():
            head[f"{row.group}:step{row.step}"] = row.mean
        return head

    identity = run_identity(config, layers=[early, late])
    return execute(EXPERIMENT, identity, lm.name, out, body, force=force).as_tuple()


def mean_curve(per_step: pd.DataFrame, group: str, scope: str = SCOPE_ALL) -> np.ndarray:
    """Mean R_V by step for one group and scope -> (steps,)."""
    frame = per_step[(per_step.group == group) & (per_step.scope == scope)]
    return frame.groupby("step")["r_v"].mean().to_numpy()
