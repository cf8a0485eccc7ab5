"""The contraction experiment: R_V = PR(late) / PR(early) per prompt, per group, and contrasts.

Seeds 000 (cells 2, 14) and 003 (layer sweep). For every prompt: token count, PR of the
hook point (V by default) at the early and late layer in both modes (per-head mean and
whole), R_V, and the PR profile over all layers, from one forward pass per batch. Then per
group: n, mean, sd, bootstrap CI; recursive vs baseline: gap, contraction %, Cohen's d and
Hedges' g with bootstrap CI, Welch t, Mann-Whitney and permutation p; and a layer sweep:
the effect size of R_V with the late layer moved over every layer above the early one.

The experiment design layer (SCIENCE.md §9), from whatever groups the prompt set has:

- ``paired``: the recursive group against its structural twins (minimal pairs linked by
  ``pair_id``, default ``L5`` vs ``L5_twin``), and every level ``Lk`` against ``Lk_twin``:
  mean paired difference, d_z, Wilcoxon and sign-flip p
  (:func:`rloop.metrics.contrasts.paired_contrast`); ``pair_values`` holds the pairs' R_V.
- ``controls``: the recursive group against the baseline and every other baseline / control
  group, Benjamini-Hochberg adjusted (:func:`rloop.metrics.contrasts.contrasts_against_groups`).
- ``trend``: R_V over the recursion levels L1..L5 (Spearman and Jonckheere-Terpstra), and the
  same for the twins and the paired differences, when at least 3 levels are present.
- confounds, on every run: per-prompt covariates from the text and the window's tokens
  (``covariates``), their correlation with R_V (``covariate_correlations``) and the
  recursive-vs-baseline gap adjusted for them by OLS with HC3 errors (``confounds``).

A contrast the prompt set cannot support is skipped with a sentence saying why (``notes``),
never a silent NaN.

Controls of the claim itself:

- ``nulls`` (``--null random-init:K,token-shuffle:K``, :mod:`rloop.experiments.nulls`): the
  run's main contrast (the main paired contrast, else recursive vs baseline) on K random-init
  models of the same architecture and on K word shuffles of the prompts, beside the trained
  model's value (``null_results`` holds their per-prompt R_V); each null is a resume unit.
- the layer sweep's most negative g is labelled ``post_hoc_best`` (chosen after the fact) and
  carries its selection-adjusted p (max-statistic permutation over the late layers searched,
  :func:`rloop.metrics.contrasts.max_statistic_permutation`); it is never a headline layer.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd

from rloop.errors import ConfigError, PromptError
from rloop.experiments import nulls as null_models
from rloop.experiments.runner import (
    PromptBatch,
    execute,
    prompt_batches,
    record_model_and_prompts,
    run_identity,
    run_units,
)
from rloop.experiments.settings import (
    Settings,
    check_context,
    check_groups,
    check_point_name,
    check_settings,
    contrasted_groups,
    limit_per_group,
    load,
    load_prompt_set,
    verify_if_asked,
)
from rloop.interventions.engine import check_mode_for_point, measure_pr, resolve_layers
from rloop.metrics import r_v
from rloop.metrics.confounds import (
    AdjustedGroupEffect,
    adjusted_group_effect,
    covariate_correlations,
    prompt_covariates,
)
from rloop.metrics.contrasts import (
    MaxStatisticTest,
    PairedContrast,
    TrendTest,
    contrasts_against_groups,
    max_statistic_permutation,
    paired_contrast,
    trend_test,
)
from rloop.metrics.stats import contrast, describe_group
from rloop.prompts import (
    DEFAULT_PAIRED_CONTRAST,
    RECURSIVE_GROUPS,
    TWIN_GROUPS,
    Prompt,
    PromptSet,
    check_window,
)
from rloop.runs import plots as plotting
from rloop.runs.markdown import markdown_table, model_line

EXPERIMENT = "contraction"
DEFAULT_TWIN_GROUP = DEFAULT_PAIRED_CONTRAST[1]
N_PERM = 10_000  # permutations / sign vectors of the design contrasts
MIN_TREND_LEVELS = 3
CONTROL_FAMILIES = ("baseline", "control")
LEVEL_OF_GROUP = {
    **{group: level for level, group in enumerate(RECURSIVE_GROUPS, 1)},
    **{group: level for level, group in enumerate(TWIN_GROUPS, 1)},
}
# Per-prompt covariates (rloop.metrics.confounds.prompt_covariates) and which of them enter
# the correlations and the regression. Without context tokens repeated_token_share is exactly
# 1 - type_token_ratio, so the regression takes only the ratio; level is NaN outside L1..L5
# and their twins and constant within one group, so it is correlated but not regressed on.
COVARIATES = (
    "n_tokens",
    "type_token_ratio",
    "repeated_token_share",
    "punctuation_share",
    "sentence_count",
)
CORRELATED_COVARIATES = (*COVARIATES, "level")
REGRESSION_COVARIATES = ("n_tokens", "type_token_ratio", "punctuation_share", "sentence_count")


@dataclass
class ContractionConfig(Settings):
    """Settings of the contraction experiment (defaults match the CLI and the docs).

    twin_group: the structural twins of ``recursive_group`` for the paired contrast (None: no
    paired contrast; the default ``L5_twin`` is skipped with a note when the prompt set has
    no such group, any other name must be in the prompt set).
    """

    layers: list[int] | None = None  # [early, late]; None = depth fractions
    pr_modes: list[str] = field(default_factory=lambda: ["per-head", "whole"])
    point: str = "v"
    recursive_group: str = "L5"
    baseline_group: str = "factual"
    twin_group: str | None = DEFAULT_TWIN_GROUP
    batch_size: int = 16
    # Null models (rloop.experiments.nulls): ["random-init:K", "token-shuffle:K"]; a comma
    # string such as "random-init:3,token-shuffle:2" is read into that form.
    nulls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.nulls = null_models.canonical_nulls(self.nulls)

    def to_dict(self) -> dict:
        """The run's identity; ``nulls`` only when there are any, so that runs without nulls
        keep the config hash (and run directory) they had before nulls existed."""
        values = super().to_dict()
        if not values["nulls"]:
            values.pop("nulls")
        return values


@dataclass(frozen=True)
class PairedDesign:
    """One paired contrast: ``pairs`` are (recursive prompt, twin prompt) tuples."""

    recursive_group: str
    twin_group: str
    level: int | None  # 1..5 for Lk vs Lk_twin, None otherwise
    main: bool  # the configured recursive_group vs twin_group
    pairs: list[tuple[Prompt, Prompt]]


@dataclass(frozen=True)
class Design:
    """The contrasts a prompt set supports (resolved before any compute).

    paired: the main paired contrast first (if any), then each level Lk vs Lk_twin present;
    controls: the groups the recursive group is contrasted with (the baseline first);
    levels / twin_levels: level groups present -> level 1..5; notes: one sentence per
    contrast that was skipped, saying why.
    """

    paired: list[PairedDesign]
    controls: list[str]
    levels: dict[str, int]
    twin_levels: dict[str, int]
    notes: list[str]


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
    paired: pd.DataFrame = field(default_factory=pd.DataFrame)  # per paired contrast x mode
    pair_values: pd.DataFrame = field(default_factory=pd.DataFrame)  # per pair x mode
    controls: pd.DataFrame = field(default_factory=pd.DataFrame)  # per control group x mode
    trend: pd.DataFrame = field(default_factory=pd.DataFrame)  # per series x mode
    covariates: pd.DataFrame = field(default_factory=pd.DataFrame)  # per prompt
    covariate_correlations: pd.DataFrame = field(default_factory=pd.DataFrame)  # cov x mode
    confounds: pd.DataFrame = field(default_factory=pd.DataFrame)  # per mode
    notes: list[str] = field(default_factory=list)  # contrasts skipped, and why
    nulls: pd.DataFrame = field(default_factory=pd.DataFrame)  # per mode x (trained, null)
    null_results: pd.DataFrame = field(default_factory=pd.DataFrame)  # per null x prompt x mode


# --------------------------------------------------------------------------- design


def resolve_design(prompt_set: PromptSet, config: ContractionConfig) -> Design:
    """Which contrasts ``prompt_set`` supports under ``config``; PromptError for a design that
    cannot work (a recursive or baseline group that is not in the set, a named twin group
    that is not there, twins without matching pair ids)."""
    groups = prompt_set.groups()
    missing = [
        f"{name!r} ({flag})"
        for flag, name in (
            ("--recursive-group", config.recursive_group),
            ("--baseline-group", config.baseline_group),
        )
        if name not in groups
    ]
    if missing:
        raise PromptError(
            f"group(s) {', '.join(missing)} not in the prompt set; available: "
            f"{', '.join(groups)}; name the file's groups with --recursive-group and "
            "--baseline-group"
        )
    notes: list[str] = []
    paired = _paired_designs(prompt_set, config, notes)
    levels = {g: LEVEL_OF_GROUP[g] for g in RECURSIVE_GROUPS if g in groups}
    twin_levels = {g: LEVEL_OF_GROUP[g] for g in TWIN_GROUPS if g in groups}
    if len(levels) < MIN_TREND_LEVELS:
        notes.append(
            f"trend over recursion levels not computed: the prompt set has {len(levels)} of "
            f"the level groups {', '.join(RECURSIVE_GROUPS)} (needs at least {MIN_TREND_LEVELS})"
        )
    return Design(paired, _control_groups(prompt_set, config), levels, twin_levels, notes)


def _paired_designs(
    prompt_set: PromptSet, config: ContractionConfig, notes: list[str]
) -> list[PairedDesign]:
    groups = prompt_set.groups()
    rec, twin = config.recursive_group, config.twin_group
    if twin is None:
        notes.append("paired contrasts not computed: no twin group was chosen (twin_group None)")
        return []
    designs: list[PairedDesign] = []
    if twin in groups:
        designs.append(
            PairedDesign(
                rec, twin, LEVEL_OF_GROUP.get(rec), True, _main_pairs(prompt_set, rec, twin)
            )
        )
    elif twin == DEFAULT_TWIN_GROUP:
        notes.append(
            f"paired contrast {rec} vs {twin} not computed: the prompt set has no group "
            f"{twin!r} (bank v2 has minimal pairs; a prompt file needs the twin group and the "
            "same pair_id on each prompt and its twin)"
        )
    else:
        raise PromptError(
            f"twin group {twin!r} (--twin-group) is not in the prompt set; available: "
            f"{', '.join(groups)}"
        )
    for level, group in enumerate(RECURSIVE_GROUPS, 1):
        twin_of = f"{group}_twin"
        if group in groups and twin_of in groups and (group, twin_of) != (rec, twin):
            designs.append(
                PairedDesign(group, twin_of, level, False, prompt_set.pairs(group, twin_of))
            )
    return designs


def _main_pairs(prompt_set: PromptSet, rec: str, twin: str) -> list[tuple[Prompt, Prompt]]:
    """``prompt_set.pairs(rec, twin)`` with a hint when the twins of ``rec`` are elsewhere."""
    try:
        return prompt_set.pairs(rec, twin)
    except PromptError as err:
        own = f"{rec}_twin"
        hint = f"; did you mean --twin-group {own}?" if own in prompt_set.groups() else ""
        raise PromptError(f"paired contrast {rec} vs {twin}: {err}{hint}") from None


def _control_groups(prompt_set: PromptSet, config: ContractionConfig) -> list[str]:
    """The baseline, then every other group of the baseline or control family, in set order."""
    family: dict[str, str] = {}
    for prompt in prompt_set:
        family.setdefault(prompt.group, prompt.family)
    skip = {config.recursive_group, config.baseline_group}
    others = [g for g, f in family.items() if g not in skip and f in CONTROL_FAMILIES]
    return [config.baseline_group, *others]


# --------------------------------------------------------------------------- measurement


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
    design = resolve_design(prompt_set, config)
    main = main_contrast(design, config)
    check_nulls(lm, prompt_set, config, main)
    all_layers = list(range(max(late, adapter.n_layers - 1) + 1))

    started = time.perf_counter()
    batches = prompt_batches(lm, list(prompt_set), config.batch_size)
    profile = run_units(
        run,
        batches,
        lambda batch: _batch_profile(lm, batch, all_layers, config),
        key=lambda b: b.key,
        label="measuring PR",
        weight=lambda b: len(b.prompts),
    )
    prompts = list(prompt_set)
    meta = _prompt_meta(prompts)
    profile = meta.merge(profile, on="prompt_id", how="inner")
    profile = profile.sort_values(["prompt_id", "pr_mode", "layer"], ignore_index=True)
    results = _r_v_rows(profile, early, late, meta)
    measured = time.perf_counter() - started
    null_results = _measure_nulls(lm, prompt_set, config, main, (early, late), run)
    nulls_measured = time.perf_counter() - started - measured
    result = ContractionResult(
        results,
        profile,
        _group_table(results, config),
        _contrast_table(results, config),
        _layer_sweep(profile, early, config),
        early,
        late,
        rule,
        {},
    )
    _add_design_tables(
        result, design, covariate_table(prompts, lm.tokenizer, config.window), config
    )
    if config.nulls:
        result.null_results = null_results
        result.nulls = _null_comparison_table(results, null_results, main, config)
    stats_s = time.perf_counter() - started - measured - nulls_measured
    result.timings = {"measure_s": measured, "nulls_s": nulls_measured, "stats_s": stats_s}
    return result


def _batch_profile(lm, batch: PromptBatch, layers: list[int], config: ContractionConfig):
    """PR of the hook point at ``layers`` for one batch: the rows of
    :meth:`rloop.interventions.engine.PRMeasurement.table` with the prompt ids."""
    measured = measure_pr(
        lm.model,
        lm.adapter,
        batch.encode(lm),
        layers,
        config.window,
        point=config.point,
        modes=config.pr_modes,
        reasons=True,
    )
    table = measured.table()
    table.insert(0, "prompt_id", [batch.prompts[i].id for i in table.pop("row")])
    return table


def _prompt_meta(prompts: list[Prompt]) -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": [p.id for p in prompts], "group": [p.group for p in prompts]})


# --------------------------------------------------------------------------- null models


def main_contrast(design: Design, config: ContractionConfig) -> null_models.MainContrast:
    """The run's main contrast, the one the nulls repeat: the main paired contrast (recursive
    vs twin, over its pairs) when the design has one, else recursive vs baseline."""
    for paired in design.paired:
        if paired.main:
            pairs = tuple((rec.id, twin.id) for rec, twin in paired.pairs)
            return null_models.MainContrast(paired.recursive_group, paired.twin_group, pairs)
    return null_models.MainContrast(config.recursive_group, config.baseline_group)


def check_nulls(
    lm, prompt_set: PromptSet, config: ContractionConfig, main: null_models.MainContrast
) -> None:
    """Before any compute: a random-init null needs a model on one device, and every shuffled
    prompt still needs ``window`` tokens and must fit the context (shuffling words changes
    the token count a little). PromptError / ConfigError naming the null otherwise."""
    units = null_models.null_units(config.nulls, config.seed)
    if any(unit.kind == null_models.RANDOM_INIT for unit in units):
        null_models.check_random_init_supported(lm)
    for unit in units:
        if unit.kind != null_models.TOKEN_SHUFFLE:
            continue
        shuffled = null_models.shuffled_prompt_set(main.prompts(prompt_set), unit.seed)
        try:
            check_window(shuffled, lm.tokenizer, config.window)
            check_context(shuffled, lm)
        except PromptError as err:
            raise PromptError(f"--null {unit.label}, words shuffled: {err}") from None


def _measure_nulls(
    lm,
    prompt_set: PromptSet,
    config: ContractionConfig,
    main: null_models.MainContrast,
    layers: tuple[int, int],
    run=None,
) -> pd.DataFrame:
    """Per-prompt R_V of every null (one resume unit each) on the main contrast's prompts:
    the rows of :func:`_r_v_rows` with the null's kind, replicate and seed in front."""
    units = null_models.null_units(config.nulls, config.seed)
    if not units:
        return pd.DataFrame()
    prompts = main.prompts(prompt_set)

    def compute(unit: null_models.NullUnit) -> pd.DataFrame:
        rows = _null_r_v_rows(lm, prompts, unit, layers, config)
        if unit.kind == null_models.RANDOM_INIT:
            null_models.free_memory(lm.device)  # the random copy is dropped with its rows
        return rows

    return run_units(
        run, units, compute, key=lambda u: u.key, label="null models",
        weight=lambda u: len(prompts),
    )  # fmt: skip


def _null_r_v_rows(
    lm,
    prompts: PromptSet,
    unit: null_models.NullUnit,
    layers: tuple[int, int],
    config: ContractionConfig,
) -> pd.DataFrame:
    """R_V per prompt of one null: a random-init copy of ``lm`` on ``prompts``, or ``lm`` on
    ``prompts`` with their words shuffled (only the early and late layer are measured)."""
    if unit.kind == null_models.RANDOM_INIT:
        null_lm, null_prompts = null_models.random_init_model(lm, unit.seed), prompts
    else:
        null_lm, null_prompts = lm, null_models.shuffled_prompt_set(prompts, unit.seed)
    early, late = layers
    batches = prompt_batches(null_lm, list(null_prompts), config.batch_size)
    profile = pd.concat(
        [_batch_profile(null_lm, batch, [early, late], config) for batch in batches],
        ignore_index=True,
    )
    meta = _prompt_meta(list(null_prompts))
    rows = _r_v_rows(meta.merge(profile, on="prompt_id"), early, late, meta)
    rows.insert(0, "seed", unit.seed)
    rows.insert(0, "replicate", unit.replicate)
    rows.insert(0, "null", unit.kind)
    return rows


def _null_comparison_table(
    results: pd.DataFrame,
    null_results: pd.DataFrame,
    main: null_models.MainContrast,
    config: ContractionConfig,
) -> pd.DataFrame:
    """The ``nulls`` table: the main contrast on the trained model and on every null, per
    pr_mode, with the same statistics (:func:`rloop.experiments.nulls.main_contrast_row`)."""
    stats = dict(n_boot=config.n_boot, n_perm=N_PERM, seed=config.seed)
    rows = []
    for mode in config.pr_modes:
        trained = results[results.pr_mode == mode]
        head = {"pr_mode": mode, "null": null_models.TRAINED, "replicate": None, "seed": None}
        rows.append({**head, **null_models.main_contrast_row(trained, main, **stats)})
        frames = null_results[null_results.pr_mode == mode]
        for (kind, replicate, seed), frame in frames.groupby(
            ["null", "replicate", "seed"], sort=False
        ):
            head = {"pr_mode": mode, "null": kind, "replicate": replicate, "seed": seed}
            rows.append({**head, **null_models.main_contrast_row(frame, main, **stats)})
    return null_models.null_table(rows, main)


def _add_design_tables(
    result: ContractionResult, design: Design, covariates: pd.DataFrame, config: ContractionConfig
) -> None:
    """The paired, controls, trend and confound tables of ``result`` (in place)."""
    notes = list(design.notes)
    result.pair_values = _pair_values(result.results, design)
    result.paired = _paired_table(result.pair_values, design, config)
    result.controls = _controls_table(result.results, design, config)
    result.trend = _trend_table(result.results, result.pair_values, design, config)
    result.covariates = covariates
    usable = [c for c in CORRELATED_COVARIATES if np.isfinite(covariates[c]).any()]
    for name in sorted(set(CORRELATED_COVARIATES) - set(usable), key=CORRELATED_COVARIATES.index):
        notes.append(f"covariate {name} not used: {_why_missing(name)}")
    result.covariate_correlations = _correlation_table(
        result.results, covariates, usable, config, notes
    )
    regressors = [c for c in REGRESSION_COVARIATES if c in usable]
    result.confounds = _confound_table(result.results, covariates, regressors, config)
    result.notes = notes


def _why_missing(covariate: str) -> str:
    if covariate == "punctuation_share":
        return "the tokenizer has no convert_ids_to_tokens, so window tokens have no strings"
    if covariate == "level":
        return f"no prompt has a level (no group of {', '.join(RECURSIVE_GROUPS)} or their twins)"
    return "no prompt has a finite value"


# --------------------------------------------------------------------------- design tables


def covariate_table(prompts, tokenizer, window: int) -> pd.DataFrame:
    """Per-prompt covariates: one row per prompt with prompt_id, group, family, style, level,
    pair_id and :func:`rloop.metrics.confounds.prompt_covariates` of the prompt's text and the
    last ``window`` tokens the model sees (token strings from
    ``tokenizer.convert_ids_to_tokens``; without it punctuation_share is NaN). level is the
    prompt's own level, else the level of its group name (L1..L5 and their twins), else NaN.
    """
    prompts = list(prompts)
    encoded = tokenizer([p.text for p in prompts])["input_ids"]
    rows = []
    for prompt, ids in zip(prompts, encoded, strict=True):
        window_ids = [int(i) for i in ids[-window:]]
        level = prompt.level if prompt.level is not None else LEVEL_OF_GROUP.get(prompt.group)
        rows.append(
            {
                "prompt_id": prompt.id,
                "group": prompt.group,
                "family": prompt.family,
                "style": prompt.style,
                "level": float(level) if level is not None else math.nan,
                "pair_id": prompt.pair_id,
                **prompt_covariates(
                    prompt.text, window_ids, len(ids), _token_strings(tokenizer, window_ids)
                ),
            }
        )
    table = pd.DataFrame(rows)
    for column in ("style", "pair_id"):
        table[column] = table[column].astype(object)
    return table


def _token_strings(tokenizer, ids: list[int]) -> list[str] | None:
    """The raw token string of each id (``convert_ids_to_tokens``), or None if unavailable."""
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if convert is None:
        return None
    return [str(token) for token in convert(ids)]


def _pair_values(results: pd.DataFrame, design: Design) -> pd.DataFrame:
    """R_V of both prompts of every pair: one row per paired contrast x pair x pr_mode."""
    columns = ["pr_mode", "recursive_group", "twin_group", "level", "main", "pair_id",
               "recursive_id", "twin_id", "r_v_recursive", "r_v_twin", "diff"]  # fmt: skip
    rows = []
    by_prompt = results.set_index(["pr_mode", "prompt_id"])["r_v"]
    for mode in sorted(results["pr_mode"].unique()):
        for paired in design.paired:
            for rec, twin in paired.pairs:
                a, b = float(by_prompt[(mode, rec.id)]), float(by_prompt[(mode, twin.id)])
                rows.append(
                    [mode, paired.recursive_group, paired.twin_group, paired.level, paired.main,
                     rec.pair_id, rec.id, twin.id, a, b, a - b]
                )  # fmt: skip
    table = pd.DataFrame(rows, columns=columns)
    table["level"] = table["level"].astype("Int64")
    return table


def _paired_table(
    pair_values: pd.DataFrame, design: Design, config: ContractionConfig
) -> pd.DataFrame:
    """paired_contrast of each paired contrast and pr_mode (recursive - twin)."""
    rows = []
    if pair_values.empty:
        return pd.DataFrame()
    keys = ["pr_mode", "recursive_group", "twin_group"]
    for (mode, rec, twin), frame in pair_values.groupby(keys, sort=False):
        result: PairedContrast = paired_contrast(
            frame["r_v_recursive"].to_numpy(),
            frame["r_v_twin"].to_numpy(),
            n_boot=config.n_boot,
            n_perm=N_PERM,
            seed=config.seed,
        )
        first = frame.iloc[0]
        rows.append(
            {
                "pr_mode": mode,
                "recursive_group": rec,
                "twin_group": twin,
                "level": first["level"],
                "main": bool(first["main"]),
                **result.to_dict(),
            }
        )
    table = pd.DataFrame(rows)
    table["level"] = table["level"].astype("Int64")
    table["reason"] = table["reason"].astype(object)
    return table


def _controls_table(results: pd.DataFrame, design: Design, config: ContractionConfig):
    """The recursive group against every control group (BH over the controls, per mode)."""
    tables = []
    for mode, frame in results.groupby("pr_mode", sort=True):
        values = {
            group: frame.loc[frame.group == group, "r_v"].to_numpy()
            for group in [config.recursive_group, *design.controls]
        }
        table = contrasts_against_groups(
            values,
            config.recursive_group,
            design.controls,
            n_boot=config.n_boot,
            n_perm=N_PERM,
            seed=config.seed,
        )
        table.insert(0, "pr_mode", mode)
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def _trend_table(
    results: pd.DataFrame, pair_values: pd.DataFrame, design: Design, config: ContractionConfig
) -> pd.DataFrame:
    """Trend of R_V over the levels L1..L5 (and of the twins and the paired differences, when
    at least 3 of their levels are present), per pr_mode."""
    if len(design.levels) < MIN_TREND_LEVELS:
        return pd.DataFrame()
    level_pairs = pair_values[
        pair_values["level"].notna()
        & (pair_values["twin_group"] == pair_values["recursive_group"] + "_twin")
    ]
    rows = []
    for mode, frame in results.groupby("pr_mode", sort=True):
        series = [("recursive", design.levels)]
        if len(design.twin_levels) >= MIN_TREND_LEVELS:
            series.append(("twin", design.twin_levels))
        for name, levels in series:
            chosen = frame[frame.group.isin(list(levels))]
            values, level = chosen["r_v"].to_numpy(), chosen["group"].map(levels).to_numpy()
            rows.append(_trend_row(mode, name, list(levels), values, level, config))
        diffs = level_pairs[level_pairs.pr_mode == mode]
        groups = sorted(set(diffs["recursive_group"]), key=LEVEL_OF_GROUP.__getitem__)
        if len(groups) >= MIN_TREND_LEVELS:
            rows.append(
                _trend_row(
                    mode,
                    "paired_diff",
                    groups,
                    diffs["diff"].to_numpy(),
                    diffs["level"].to_numpy(dtype=np.float64),
                    config,
                )
            )
    table = pd.DataFrame(rows)
    table["reason"] = table["reason"].astype(object)
    return table


def _trend_row(mode, series, groups, values, levels, config: ContractionConfig) -> dict:
    head = {"pr_mode": mode, "series": series, "groups": ",".join(groups)}
    try:
        result: TrendTest = trend_test(
            values, levels, n_boot=config.n_boot, n_perm=N_PERM, seed=config.seed
        )
    except ConfigError as err:  # too few finite values over too few levels
        undefined = {f.name: math.nan for f in fields(TrendTest)}
        return {**head, **undefined, "jt_method": "normal", "direction": "none",
                "alternative": "two-sided", "reason": str(err)}  # fmt: skip
    return {**head, **result.to_dict()}


def _correlation_table(
    results: pd.DataFrame,
    covariates: pd.DataFrame,
    usable: list[str],
    config: ContractionConfig,
    notes: list[str],
) -> pd.DataFrame:
    """Spearman of R_V with each usable covariate over all prompts, per pr_mode."""
    if len(covariates) < 3 or not usable:
        why = "fewer than 3 prompts" if len(covariates) < 3 else "no usable covariate"
        notes.append(f"covariate correlations not computed: {why}")
        return pd.DataFrame()
    tables = []
    for mode, frame in results.groupby("pr_mode", sort=True):
        merged = frame[["prompt_id", "r_v"]].merge(covariates, on="prompt_id")
        table = covariate_correlations(
            merged, "r_v", usable, n_boot=config.n_boot, seed=config.seed
        )
        table.insert(0, "pr_mode", mode)
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def _confound_table(
    results: pd.DataFrame,
    covariates: pd.DataFrame,
    regressors: list[str],
    config: ContractionConfig,
) -> pd.DataFrame:
    """R_V ~ group + covariates (OLS, HC3) for recursive vs baseline, per pr_mode."""
    rows = []
    groups = (config.recursive_group, config.baseline_group)
    for mode, frame in results.groupby("pr_mode", sort=True):
        merged = frame[["prompt_id", "r_v"]].merge(covariates, on="prompt_id")
        head = {"pr_mode": mode, "recursive_group": groups[0], "baseline_group": groups[1]}
        try:
            effect = adjusted_group_effect(merged, "r_v", "group", groups, regressors)
        except ConfigError as err:  # fewer than 2 usable rows in a group
            rows.append({**head, **_undefined_effect(str(err), merged, groups, regressors)})
            continue
        rows.append({**head, **_effect_fields(effect)})
    table = pd.DataFrame(rows)
    for column in ("reason", "share_reason"):
        table[column] = table[column].astype(object)
    return table


def _effect_fields(effect: AdjustedGroupEffect) -> dict:
    """An AdjustedGroupEffect as flat table columns (covariate lists and maps as JSON)."""
    values = effect.to_dict()
    values.pop("groups")
    values["covariates_used"] = ",".join(effect.covariates_used)
    values["covariates_dropped"] = json.dumps(effect.covariates_dropped)
    values["covariate_coefficients"] = json.dumps(effect.covariate_coefficients)
    return values


def _undefined_effect(
    reason: str, merged: pd.DataFrame, groups: tuple[str, str], regressors: list[str]
) -> dict:
    """The columns of an adjusted effect that could not be fitted: NaN numbers, the counts
    of finite R_V per group, and ``reason``."""
    values = {f.name: math.nan for f in fields(AdjustedGroupEffect) if f.name != "groups"}
    finite = merged[np.isfinite(merged["r_v"].to_numpy(dtype=np.float64))]
    n_group = int((finite["group"] == groups[0]).sum())
    n_reference = int((finite["group"] == groups[1]).sum())
    values.update(
        n=n_group + n_reference, n_dropped=int(merged["group"].isin(groups).sum())
        - n_group - n_reference, n_group=n_group, n_reference=n_reference,
        share_reason="adjusted effect undefined", reason=reason,
        covariates_used=",".join(regressors), covariates_dropped="{}",
        covariate_coefficients="{}", ci=0.95,
    )  # fmt: skip
    return values


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
        _mark_post_hoc_best(sweep, profile, early, config)
    return sweep


def _mark_post_hoc_best(
    sweep: pd.DataFrame, profile: pd.DataFrame, early: int, config: ContractionConfig
) -> None:
    """Mark the late layer with the most negative g per pr_mode (``post_hoc_best``: chosen
    after the fact) and give it its selection-adjusted p (``selection_adjusted_p``: the
    max-statistic permutation test of "the most negative g over every late layer",
    :func:`rloop.metrics.contrasts.max_statistic_permutation`), next to the permutation p of
    that layer alone from the same relabellings (``naive_permutation_p``)."""
    sweep["post_hoc_best"] = False
    for column in ("selection_adjusted_p", "naive_permutation_p"):
        sweep[column] = math.nan
    sweep["n_layers_searched"] = 0
    for mode, frame in sweep.groupby("pr_mode"):
        test = _post_hoc_test(profile, early, mode, frame["layer_late"].tolist(), config)
        sweep.loc[frame.index, "n_layers_searched"] = len(frame)
        if test.selected_column < 0:
            continue
        # Contraction means recursive R_V below baseline: the most negative g.
        best = frame.index[test.selected_column]
        sweep.loc[best, "post_hoc_best"] = True
        sweep.loc[best, "selection_adjusted_p"] = test.adjusted_p
        sweep.loc[best, "naive_permutation_p"] = test.column_p[test.selected_column]


def _post_hoc_test(
    profile: pd.DataFrame, early: int, mode: str, lates: list[int], config: ContractionConfig
) -> MaxStatisticTest:
    """The max-statistic test of min Hedges g over ``lates`` (columns: R_V with that late
    layer; rows: the recursive and baseline prompts; labels: recursive)."""
    contrasted = [config.recursive_group, config.baseline_group]
    frame = profile[(profile.pr_mode == mode) & profile.group.isin(contrasted)]
    pr = frame.pivot(index="prompt_id", columns="layer", values="pr")  # (prompts, layers)
    groups = frame.drop_duplicates("prompt_id").set_index("prompt_id")["group"]
    ratios = r_v(pr[lates].to_numpy(np.float64), pr[[early]].to_numpy(np.float64))
    labels = (groups.loc[pr.index] == config.recursive_group).to_numpy()
    return max_statistic_permutation(
        ratios, labels, statistic="hedges_g", select="min", n_perm=N_PERM, seed=config.seed
    )


def validate_config(config: ContractionConfig) -> None:
    """One-line ConfigErrors for settings that cannot work (before anything is loaded)."""
    check_settings(config)
    null_models.parse_nulls(config.nulls, "nulls")
    if config.recursive_group == config.baseline_group:
        raise ConfigError(
            f"the recursive and the baseline group are both {config.recursive_group!r}: "
            "pass two different groups"
        )
    twin = config.twin_group
    if twin is not None and (
        not twin.strip() or twin in (config.recursive_group, config.baseline_group)
    ):
        raise ConfigError(
            f"twin group {twin!r} must be a group other than the recursive and the baseline "
            "group (or None for no paired contrast)"
        )


# --------------------------------------------------------------------------- summary.md

PAIRED_COLUMNS = ["pr_mode", "recursive_group", "twin_group", "n_pairs", "n_dropped",
                  "mean_recursive", "mean_twin", "mean_diff", "mean_diff_ci_low",
                  "mean_diff_ci_high", "d_z", "d_z_ci_low", "d_z_ci_high", "wilcoxon_p",
                  "sign_flip_p", "reason"]  # fmt: skip
CONTROL_COLUMNS = ["pr_mode", "other", "n_target", "n_other", "mean_target", "mean_other",
                   "diff", "hedges_g", "hedges_g_ci_low", "hedges_g_ci_high", "welch_p",
                   "welch_p_bh", "mann_whitney_p_bh"]  # fmt: skip
TREND_COLUMNS = ["pr_mode", "series", "groups", "n", "n_levels", "spearman_rho",
                 "spearman_ci_low", "spearman_ci_high", "spearman_p", "jt_z", "jt_p",
                 "direction", "reason"]  # fmt: skip
CORRELATION_COLUMNS = ["pr_mode", "covariate", "n", "rho", "ci_low", "ci_high", "p", "p_bh",
                       "estimable", "reason"]  # fmt: skip
CONFOUND_COLUMNS = ["pr_mode", "n", "raw_gap", "raw_ci_low", "raw_ci_high", "adjusted_effect",
                    "adjusted_ci_low", "adjusted_ci_high", "adjusted_p", "share_explained",
                    "covariates_used", "reason", "share_reason"]  # fmt: skip


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
        "## Headline",
        "",
        *headline_lines(result, config),
        "",
        *null_section(result),
        "## R_V by group",
        "",
        markdown_table(result.groups),
        "",
    ]
    if not result.contrasts.empty:
        lines += [
            "## Recursive vs baseline",
            "",
            markdown_table(result.contrasts.T.reset_index()),
            "",
        ]
    lines += _design_sections(result)
    if not result.layer_sweep.empty:
        lines += [
            "## Layer sweep (late layer moved, early fixed; post hoc)",
            "",
            "The layer with the most negative g is chosen after seeing the data "
            "(`post_hoc_best`), so its own p is too small. `selection_adjusted_p` asks how "
            "often the most negative g over all the late layers searched is as negative when "
            "the recursive/baseline labels are permuted (max-statistic test, "
            f"{N_PERM} relabellings); `naive_permutation_p` is that layer's p alone.",
            "",
            *[f"- {line}" for line in _post_hoc_lines(result.layer_sweep)],
            "",
        ]
    n_nan = int(result.results["r_v"].isna().sum())
    if n_nan:
        lines += [
            f"**{n_nan} R_V values are NaN** (see `nan_reason` in results.csv); "
            "they are excluded from every mean and counted in `n_nan`.",
            "",
        ]
    lines += [
        "Files: `results.csv/.parquet` (per prompt), `profile.*` (PR per layer), `groups.*`, "
        "`contrasts.*`, `layer_sweep.*`, `paired.*` and `pair_values.*` (minimal pairs), "
        "`controls.*`, `trend.*`, `covariates.*` (per prompt), `covariate_correlations.*`, "
        "`confounds.*`, `nulls.*` and `null_results.*` (with --null), `plots/`.",
    ]
    return "\n".join(lines) + "\n"


def headline_lines(result: ContractionResult, config: ContractionConfig) -> list[str]:
    """One line per headline number and pr_mode: the paired contrast (or why it is missing),
    the unpaired contrast, and the covariate-adjusted gap."""
    lines: list[str] = []
    main = result.paired[result.paired["main"]] if not result.paired.empty else result.paired
    skipped = [n for n in result.notes if n.startswith("paired contrast")]
    for mode in config.pr_modes:
        paired = main[main.pr_mode == mode] if not main.empty else main
        if not paired.empty:
            lines.append(f"- {mode}: " + _paired_sentence(paired.iloc[0]))
        else:
            lines.append(f"- {mode}: " + (skipped[0] if skipped else "no paired contrast"))
        row = result.contrasts[result.contrasts.pr_mode == mode].iloc[0]
        lines.append(
            f"- {mode}: {config.recursive_group} vs {config.baseline_group} (unpaired, "
            f"n {row.n_recursive} vs {row.n_baseline}): Hedges g {_num(row.hedges_g)} "
            f"(CI {_num(row.hedges_g_ci_low)}..{_num(row.hedges_g_ci_high)}), Welch p "
            f"{_num(row.welch_p)}"
        )
        confound = result.confounds[result.confounds.pr_mode == mode]
        if not confound.empty:
            lines.append(f"- {mode}: " + _adjusted_sentence(confound.iloc[0]))
    if not result.nulls.empty:
        comparisons = null_models.compare_with_nulls(result.nulls)
        lines += [f"- {null_models.comparison_sentence(c)}" for c in comparisons]
    if not result.layer_sweep.empty:
        post_hoc = _post_hoc_lines(result.layer_sweep)
        lines += [f"- post hoc, not pre-registered: {line}" for line in post_hoc]
    return lines


def _post_hoc_lines(sweep: pd.DataFrame) -> list[str]:
    """One sentence per pr_mode on the post-hoc best late layer and its adjusted p."""
    lines = []
    for row in sweep[sweep["post_hoc_best"]].itertuples():
        lines.append(
            f"{row.pr_mode}: late layer {row.layer_late} chosen after the fact as the most "
            f"negative Hedges g of {row.n_layers_searched} late layers: g {_num(row.hedges_g)} "
            f"(CI {_num(row.hedges_g_ci_low)}..{_num(row.hedges_g_ci_high)}), naive "
            f"permutation p {_permutation_p(row.naive_permutation_p)}, selection-adjusted p "
            f"{_permutation_p(row.selection_adjusted_p)}"
        )
    return lines


def _permutation_p(p: float) -> str:
    """A permutation p for prose; at its floor 1 / (1 + N_PERM) it says so."""
    if math.isfinite(p) and p * (1 + N_PERM) <= 1 + 1e-9:
        return f"{_num(p)} (the floor: no relabelling of {N_PERM} as extreme)"
    return _num(p)


def _blank_missing(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` for Markdown: empty cells instead of None / <NA> in the text and id columns."""
    shown = table.copy()
    for column in ("replicate", "seed", "reason"):
        shown[column] = [
            "" if value is None or value is pd.NA else value for value in shown[column]
        ]
    return shown


def null_section(result: ContractionResult) -> list[str]:
    """The summary.md section on the null models: what each means, the table, the verdicts."""
    if result.nulls.empty:
        return []
    table = result.nulls
    first = table.iloc[0]
    kinds = [kind for kind in null_models.NULL_KINDS if kind in set(table["null"])]
    lines = [
        f"## Null models: {first.contrast}, {first.effect} (p: {first.p_test})",
        "",
        "The same measurement and the same main contrast on models or prompts that lack what "
        "is claimed. If the trained model's effect lies inside the range of a null, the "
        "effect is not evidence for that claim.",
        "",
        *[f"- **{kind}**: {null_models.NULL_MEANINGS[kind]}" for kind in kinds],
        "",
        markdown_table(_blank_missing(table.drop(columns=["contrast", "effect", "p_test"]))),
        "",
        *[f"- {null_models.comparison_sentence(c)}" for c in null_models.compare_with_nulls(table)],
        "",
    ]
    return lines


def _num(value, spec: str = ".3g") -> str:
    """A number for prose; NaN is written 'undefined' (the sentence says why)."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "undefined"
    return format(float(value), spec)


def _paired_sentence(row) -> str:
    text = (
        f"{row.recursive_group} vs {row.twin_group} (paired, {row.n_pairs} pairs): mean "
        f"difference {_num(row.mean_diff, '.4g')} (CI {_num(row.mean_diff_ci_low, '.4g')}.."
        f"{_num(row.mean_diff_ci_high, '.4g')}), d_z {_num(row.d_z)} (CI "
        f"{_num(row.d_z_ci_low)}..{_num(row.d_z_ci_high)}), Wilcoxon p {_num(row.wilcoxon_p)}, "
        f"sign-flip p {_num(row.sign_flip_p)}"
    )
    return text + (f" — not all defined: {row.reason}" if isinstance(row.reason, str) else "")


def _adjusted_sentence(row) -> str:
    groups = f"{row.recursive_group} vs {row.baseline_group}"
    covariates = ", ".join(row.covariates_used.split(",")) if row.covariates_used else "nothing"
    if isinstance(row.reason, str):
        return f"{groups} adjusted for covariates not computed: {row.reason}"
    share = (
        f"share of the raw gap explained by the covariates {_num(row.share_explained, '.0%')}"
        if not isinstance(row.share_reason, str)
        else f"share of the raw gap explained: {row.share_reason}"
    )
    return (
        f"{groups} adjusted for {covariates} (OLS, HC3): effect "
        f"{_num(row.adjusted_effect, '.4g')} (CI {_num(row.adjusted_ci_low, '.4g')}.."
        f"{_num(row.adjusted_ci_high, '.4g')}, p {_num(row.adjusted_p)}), raw gap "
        f"{_num(row.raw_gap, '.4g')}; {share}"
    )


def _design_sections(result: ContractionResult) -> list[str]:
    """The paired, controls, trend and confound sections of summary.md."""
    notes = result.notes
    lines = ["## Paired contrast (minimal pairs: recursive - twin)", ""]
    lines += _table_or_notes(result.paired, PAIRED_COLUMNS, notes, "paired contrast")
    lines += ["## Recursive vs every baseline and control (Benjamini-Hochberg)", ""]
    lines += _table_or_notes(result.controls, CONTROL_COLUMNS, notes, "controls")
    lines += ["## Trend over recursion levels (Spearman, Jonckheere-Terpstra)", ""]
    lines += _table_or_notes(result.trend, TREND_COLUMNS, notes, "trend")
    lines += [
        "## Confounds",
        "",
        "Covariates per prompt (`covariates.*`): token count, type-token ratio and repeated-"
        "token share in the window, punctuation share in the window, sentence count, style, "
        "level. Spearman correlation of R_V with each over all prompts:",
        "",
    ]
    lines += _table_or_notes(result.covariate_correlations, CORRELATION_COLUMNS, notes, "covariate")
    lines += ["R_V ~ group + covariates (OLS with HC3 standard errors), recursive vs baseline:", ""]
    lines += _table_or_notes(result.confounds, CONFOUND_COLUMNS, notes, "adjusted")
    return lines


def _table_or_notes(frame: pd.DataFrame, columns: list[str], notes: list[str], topic: str):
    """The table (reason columns without None), then the notes whose sentence starts with
    ``topic`` (the contrasts of that kind that were not computed, and why)."""
    lines: list[str] = []
    if not frame.empty:
        shown = frame[[c for c in columns if c in frame.columns]].copy()
        for column in ("reason", "share_reason"):
            if column in shown.columns:
                shown[column] = shown[column].map(lambda v: v if isinstance(v, str) else "")
        lines += [markdown_table(shown), ""]
    lines += [f"- {note}" for note in notes if note.startswith(topic)]
    if lines and lines[-1] != "":
        lines.append("")
    return lines


def write_plots(result: ContractionResult, config: ContractionConfig, plot_path) -> list[Path]:
    """R_V by group, PR-by-layer profile per group, effect size by layer, recursive vs twin
    R_V per pair, and R_V against each covariate (PNG)."""

    paths = [
        plotting.r_v_by_group(result.results, plot_path("r_v_by_group")),
        plotting.pr_profile(
            result.profile, plot_path("pr_profile"), result.layer_early, result.layer_late
        ),
    ]
    if not result.layer_sweep.empty:
        paths.append(plotting.effect_by_layer(result.layer_sweep, plot_path("effect_by_layer")))
    if not result.pair_values.empty:
        paths.append(plotting.paired_scatter(result.pair_values, plot_path("paired_r_v")))
    usable = [c for c in CORRELATED_COVARIATES if np.isfinite(result.covariates[c]).any()]
    if usable:
        frame = result.results[["prompt_id", "pr_mode", "r_v"]].merge(
            result.covariates, on="prompt_id"
        )
        paths.append(plotting.covariate_scatter(frame, usable, plot_path("r_v_vs_covariates")))
    return paths


# --------------------------------------------------------------------------- the run


def run_contraction(
    config: ContractionConfig, out: Path | None = None, force: bool = False, lm=None
) -> tuple[Path, bool, dict]:
    """Full pipeline with a run record. Returns (run_dir, already_complete, headline).

    All checks (settings, hook point, prompt file, the contrasted groups and their sizes, the
    pairs of the design, model, layers, window and context vs prompt lengths, and with
    ``config.verify`` the fidelity self-check) happen before the run directory is created, so
    bad input writes nothing.
    """
    validate_config(config)
    check_point_name(config.point)
    check_mode_for_point(config.point, config.pr_modes)
    prompt_set = load_prompt_set(config.prompts, config.bank_version, config.groups)
    prompt_set = limit_per_group(prompt_set, config.max_prompts)
    check_groups(prompt_set, contrasted_groups(config))
    design = resolve_design(prompt_set, config)
    lm = load(config, lm, verify=False)
    lm.adapter.spec(config.point)
    early, late, _ = resolve_layers(lm.adapter, config.layers, "--layers")
    check_window(prompt_set, lm.tokenizer, config.window)
    check_context(prompt_set, lm)
    check_nulls(lm, prompt_set, config, main_contrast(design, config))
    verify_if_asked(config, lm, prompt_set, [early, late])

    def body(run) -> dict:
        record_model_and_prompts(run, lm, prompt_set)
        result = measure_contraction(lm, prompt_set, config, run=run)
        for name in ("results", "profile", "groups", "contrasts", "layer_sweep", "paired",
                     "pair_values", "controls", "trend", "covariates",
                     "covariate_correlations", "confounds", "nulls",
                     "null_results"):  # fmt: skip
            table = getattr(result, name)
            if not table.empty or name in ("results", "profile", "groups"):
                run.write_table(name, table)
        write_plots(result, config, run.plot_path)
        run.write_summary(report_markdown(result, config, model_line(lm)))
        run.update_manifest(
            layers={
                "early": result.layer_early,
                "late": result.layer_late,
                "rule": result.layer_rule,
            },
            design={
                "paired": [[p.recursive_group, p.twin_group, len(p.pairs)] for p in design.paired],
                "controls": design.controls,
                "levels": design.levels,
                "notes": result.notes,
            },
            timings=result.timings,
        )
        return _headline(result, config)

    identity = run_identity(config, layers=[early, late])
    return execute(EXPERIMENT, identity, lm.name, out, body, force=force).as_tuple()


def _finite_or_none(value) -> float | None:
    """A headline number: NaN becomes None (summary.md says why it is undefined)."""
    if value is None or value is pd.NA or not math.isfinite(float(value)):
        return None
    return float(value)


def _headline(result: ContractionResult, config: ContractionConfig) -> dict:
    headline: dict = {"layer_early": result.layer_early, "layer_late": result.layer_late}
    for row in result.contrasts.to_dict(orient="records"):
        mode = row["pr_mode"]
        headline[f"{mode}:r_v_recursive"] = row.get("mean_recursive")
        headline[f"{mode}:r_v_baseline"] = row.get("mean_baseline")
        headline[f"{mode}:hedges_g"] = row.get("hedges_g")
        headline[f"{mode}:contraction_pct"] = row.get("contraction_pct")
    if not result.paired.empty:
        for row in result.paired[result.paired["main"]].to_dict(orient="records"):
            mode = row["pr_mode"]
            headline[f"{mode}:paired_d_z"] = _finite_or_none(row["d_z"])
            headline[f"{mode}:paired_mean_diff"] = _finite_or_none(row["mean_diff"])
            headline[f"{mode}:paired_sign_flip_p"] = _finite_or_none(row["sign_flip_p"])
    for row in result.confounds.to_dict(orient="records"):
        mode = row["pr_mode"]
        headline[f"{mode}:adjusted_effect"] = _finite_or_none(row["adjusted_effect"])
    if not result.nulls.empty:
        headline.update(null_models.null_headline(result.nulls))
    if not result.layer_sweep.empty:
        for row in result.layer_sweep[result.layer_sweep["post_hoc_best"]].to_dict("records"):
            prefix = f"{row['pr_mode']}:post_hoc_best"
            headline[f"{prefix}_late_layer"] = int(row["layer_late"])
            headline[f"{prefix}_hedges_g"] = _finite_or_none(row["hedges_g"])
            headline[f"{prefix}_selection_adjusted_p"] = _finite_or_none(
                row["selection_adjusted_p"]
            )
    return headline
