"""``rloop validate``: the seeds' unified 4-phase run ("RLoop Master", seed 003).

1. R_V phenomenon: contraction of recursive prompts against their structural twins (the
   paired minimal-pair contrast, SCIENCE.md §9), with the unpaired recursive-vs-baseline
   contrast shown next to it (:func:`rloop.experiments.contraction.measure_contraction`).
   Without a twin group in the prompt set the verdict falls back to the unpaired contrast
   and the summary says so.
2. V-patching null: the target memory's V at the measurement layer replaced by the source's.
3. KV-patching mechanism: the source's memory KV on the full range (alpha = 1), with the
   seed's targeted ranges (peak zone, single layer) scaled by depth for comparison.
4. Alpha dose-response on the full range, and R_V (generated) vs behaviour correlations.

Phases 2-4 share one batched generation of every (pair, condition) row
(:func:`rloop.experiments.kv_patch.run_grid`). Each phase's verdict (PASS / FAIL /
INCONCLUSIVE) is computed from the data against thresholds in the config
(``rloop/configs/validate_default.toml``); INCONCLUSIVE means a quantity it needs is undefined
(e.g. transfer % with a natural gap within noise, SCIENCE.md §6). The transfer checks of
phases 2 and 3 show the transfer %'s cluster bootstrap CI over pairs next to the value; the
verdict compares the point value with the threshold (the thresholds are point thresholds).

Input is checked before anything is computed: the settings and the groups (present, large
enough, enough pairs) before the model is loaded; the window and the context length (every
prompt, plus the generated tokens for the pairs' prompts) right after. An interrupted run
resumes: phase 1's prompt batches and the generation chunks of phases 2-4 are checkpoints.
"""

from __future__ import annotations

import math
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import pandas as pd

from rloop import models
from rloop.capture.generation import SamplingConfig
from rloop.errors import ConfigError, PromptError
from rloop.experiments.contraction import (
    DEFAULT_TWIN_GROUP,
    PAIRED_COLUMNS,
    ContractionConfig,
    measure_contraction,
    resolve_design,
)
from rloop.experiments.kv_patch import (
    NATURAL_SOURCE,
    NATURAL_TARGET,
    TRANSFER_COLUMNS,
    V_PATCH,
    Condition,
    correlation_table,
    dose_response_table,
    make_pairs,
    plot_dose_response,
    plot_transfer,
    run_config_grid,
    transfer_table,
)
from rloop.experiments.runner import execute, model_manifest, prompts_manifest
from rloop.experiments.settings import (
    MIN_BOOTSTRAP,
    check_context,
    check_groups,
    load_prompt_set,
)
from rloop.interventions.engine import resolve_layers
from rloop.interventions.kv_cache import (
    check_alpha,
    check_layer_range,
    default_patch_layers,
    scale_layer_range,
)
from rloop.prompts import DEFAULT_BANK_VERSION, PromptSet, check_window
from rloop.runs import plots as plotting
from rloop.runs.markdown import markdown_table, model_line

EXPERIMENT = "validate"
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "validate_default.toml"
PASS, FAIL, INCONCLUSIVE = "PASS", "FAIL", "INCONCLUSIVE"


@dataclass
class ValidateConfig:
    """Flattened view of the TOML config (section.key -> section_key where ambiguous)."""

    model: str = "smollm2-135m"
    revision: str | None = None
    dtype: str | None = None
    device: str | None = None
    prompts: str | None = None
    bank_version: str = DEFAULT_BANK_VERSION
    recursive_group: str = "L5"
    baseline_group: str = "factual"
    twin_group: str | None = DEFAULT_TWIN_GROUP  # "" in the TOML = no paired contrast
    n_pairs: int = 20
    window: int = 16
    layers: list[int] = field(default_factory=list)
    pr_mode: str = "per-head"
    batch_size: int = 16
    n_boot: int = 2000
    seed: int = 0
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    generation_seed: int = 0
    max_batch_rows: int = 128
    semantic: str = "auto"
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    full_range: list[int] = field(default_factory=list)
    targeted_seed_range: list[int] = field(default_factory=lambda: [25, 29])
    single_seed_layer: int = 27
    seed_n_layers: int = 32
    thresholds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            self.max_new_tokens, self.temperature, self.top_p, self.generation_seed
        )


_SECTION_KEYS = {
    "model": {"name": "model", "revision": "revision", "dtype": "dtype", "device": "device"},
    "prompts": {
        k: k
        for k in (
            "prompts",
            "bank_version",
            "recursive_group",
            "baseline_group",
            "twin_group",
            "n_pairs",
        )
    },
    "measure": {k: k for k in ("window", "layers", "pr_mode", "batch_size", "n_boot", "seed")},
    "generation": {
        "max_new_tokens": "max_new_tokens",
        "temperature": "temperature",
        "top_p": "top_p",
        "seed": "generation_seed",
        "max_batch_rows": "max_batch_rows",
        "semantic": "semantic",
    },
    "patching": {
        k: k
        for k in (
            "alphas",
            "full_range",
            "targeted_seed_range",
            "single_seed_layer",
            "seed_n_layers",
        )
    },
}
_THRESHOLD_KEYS = {
    "phase1": ("max_paired_d_z", "max_paired_p", "max_hedges_g", "max_p"),
    "phase2": ("max_abs_behavior_transfer_pct",),
    "phase3": ("min_behavior_transfer_pct", "min_r_v_transfer_pct"),
    "phase4": ("min_alpha_behavior_spearman", "max_alpha_behavior_p", "max_r_v_behavior_p"),
}


def load_validate_config(path: str | Path | None = None, **overrides) -> ValidateConfig:
    """Read the default TOML, then ``path`` on top of it (same layout), then ``overrides``
    (flat field names, None values ignored). Unknown sections or keys are errors."""
    data = _read_toml(DEFAULT_CONFIG_PATH)
    values = _flatten(data, DEFAULT_CONFIG_PATH)
    if path is not None:
        user = _flatten(_read_toml(Path(path)), Path(path))
        thresholds = values["thresholds"]
        for phase, entries in user.pop("thresholds", {}).items():
            thresholds[phase] = {**thresholds.get(phase, {}), **entries}
        values.update(user)
    known = {f.name for f in fields(ValidateConfig)}
    for key, value in overrides.items():
        if key not in known:
            raise ConfigError(f"unknown validate setting {key!r}")
        if value is not None:
            values[key] = value
    if values.get("twin_group") == "":
        values["twin_group"] = None
    config = ValidateConfig(**values)
    check_validate_config(config)
    return config


def _read_toml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: pass a .toml file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None


def _flatten(data: dict, path: Path) -> dict:
    values: dict = {}
    for section, entries in data.items():
        if section == "thresholds":
            values["thresholds"] = {}
            for phase, items in entries.items():
                allowed = _THRESHOLD_KEYS.get(phase)
                if allowed is None or not set(items) <= set(allowed):
                    raise ConfigError(
                        f"{path}: unknown thresholds [{phase}] key(s) "
                        f"{sorted(set(items) - set(allowed or ()))}; allowed: {allowed}"
                    )
                values["thresholds"][phase] = {k: float(v) for k, v in items.items()}
            continue
        mapping = _SECTION_KEYS.get(section)
        if mapping is None or not isinstance(entries, dict):
            raise ConfigError(f"{path}: unknown section [{section}]")
        for key, value in entries.items():
            if key not in mapping:
                raise ConfigError(f"{path}: unknown key {key!r} in [{section}]")
            values[mapping[key]] = value
    return values


def check_validate_config(config: ValidateConfig) -> None:
    """Range checks that need no model (the layer checks happen once the model is loaded)."""
    if config.window < 2:
        raise ConfigError(f"window must be at least 2 tokens, got {config.window}")
    if config.n_boot < MIN_BOOTSTRAP:
        raise ConfigError(
            f"n_boot must be at least {MIN_BOOTSTRAP} for a usable CI, got {config.n_boot}"
        )
    config.sampling()  # generation length, temperature, top_p
    if config.max_new_tokens < config.window:
        raise ConfigError(
            f"max_new_tokens {config.max_new_tokens} is below the {config.window}-token window: "
            "R_V over generated tokens needs at least W of them"
        )
    if not config.alphas:
        raise ConfigError("alphas is empty: give at least one alpha in [0, 1]")
    for alpha in config.alphas:
        check_alpha(alpha)
    if config.n_pairs < 3:
        raise ConfigError(f"n_pairs must be at least 3 for correlations, got {config.n_pairs}")
    if config.pr_mode not in ("per-head", "whole"):
        raise ConfigError(f"pr_mode must be per-head or whole, got {config.pr_mode!r}")
    if config.semantic not in ("auto", "off"):
        raise ConfigError(f"semantic must be auto or off, got {config.semantic!r}")
    if len(config.targeted_seed_range) != 2:
        raise ConfigError("targeted_seed_range needs [first, last]")
    if config.max_batch_rows < 1 or config.batch_size < 1:
        raise ConfigError("batch sizes must be at least 1")
    if config.recursive_group == config.baseline_group:
        raise ConfigError(
            f"recursive_group and baseline_group are both {config.recursive_group!r}: "
            "pass two different groups"
        )
    if config.twin_group in (config.recursive_group, config.baseline_group):
        raise ConfigError(
            f"twin_group {config.twin_group!r} must differ from the recursive and the baseline "
            'group (twin_group = "" for no paired contrast)'
        )
    for phase, keys in _THRESHOLD_KEYS.items():
        missing = [k for k in keys if k not in config.thresholds.get(phase, {})]
        if missing:
            raise ConfigError(f"thresholds [{phase}] is missing {missing}: see the default config")


def layer_ranges(config: ValidateConfig, n_layers: int) -> dict[str, tuple[int, ...]]:
    """Named KV ranges: full (second half or explicit), targeted and single (seed, scaled)."""
    full = (
        check_layer_range(n_layers, config.full_range)
        if config.full_range
        else default_patch_layers(n_layers)
    )
    first, last = config.targeted_seed_range
    targeted = scale_layer_range(first, last, n_layers, config.seed_n_layers)
    single = scale_layer_range(
        config.single_seed_layer, config.single_seed_layer, n_layers, config.seed_n_layers
    )
    return {"full": full, "targeted": targeted, "single": single}


def conditions_for(config: ValidateConfig, ranges: dict[str, tuple[int, ...]]) -> list[Condition]:
    conds = [Condition(NATURAL_TARGET), Condition(NATURAL_SOURCE), Condition(V_PATCH)]
    conds += [Condition("kv", ranges["full"], float(a), "full") for a in config.alphas]
    if 1.0 not in [float(a) for a in config.alphas]:
        conds.append(Condition("kv", ranges["full"], 1.0, "full"))
    conds += [Condition("kv", ranges[name], 1.0, name) for name in ("targeted", "single")]
    return conds


@dataclass
class Verdict:
    """One check: its value against a rule; ci_low / ci_high: the value's 95 % CI where the
    check has one (transfer %: cluster bootstrap over pairs), shown next to it, not used
    by the verdict."""

    phase: str
    check: str
    value: float
    rule: str
    verdict: str
    ci_low: float = math.nan
    ci_high: float = math.nan


def _check(
    phase: str,
    check: str,
    value: float,
    op: str,
    threshold: float,
    why=None,
    ci: tuple[float, float] = (math.nan, math.nan),
) -> Verdict:
    """The verdict of the point ``value`` against ``op threshold`` (INCONCLUSIVE when it is
    undefined, ``why`` says why); ``ci`` is carried along for display."""
    rule = f"{op} {threshold:g}"
    low, high = (float(c) for c in ci)
    if value is None or not math.isfinite(value):
        rule += f" ({why})" if why else ""
        return Verdict(phase, check, math.nan, rule, INCONCLUSIVE, low, high)
    ok = value <= threshold if op == "<=" else value >= threshold
    return Verdict(phase, check, float(value), rule, PASS if ok else FAIL, low, high)


def phase_verdict(verdicts: list[Verdict]) -> str:
    states = {v.verdict for v in verdicts}
    return FAIL if FAIL in states else INCONCLUSIVE if INCONCLUSIVE in states else PASS


@dataclass
class ValidateResult:
    contraction: object
    grid: pd.DataFrame
    transfer: pd.DataFrame
    correlations: pd.DataFrame
    dose_response: pd.DataFrame
    verdicts: pd.DataFrame
    ranges: dict
    early: int
    late: int
    timings: dict


def phase1_setup(
    prompt_set, config: ValidateConfig, layers: list[int] | None = None
) -> tuple[object, ContractionConfig]:
    """Phase 1's prompts (the recursive, baseline and, if present, twin group) and its
    contraction settings; PromptError for a design that cannot work (missing groups, a named
    twin group that is not there, twins without matching pair ids)."""
    groups = [config.recursive_group, config.baseline_group]
    twin = config.twin_group
    if twin is not None and twin in prompt_set.groups():
        groups.append(twin)
    elif twin is not None and twin != DEFAULT_TWIN_GROUP:
        raise PromptError(
            f"twin_group {twin!r} is not in the prompt set; available: "
            f"{', '.join(prompt_set.groups())}"
        )
    contraction_config = ContractionConfig(
        layers=layers,
        window=config.window,
        pr_modes=[config.pr_mode],
        recursive_group=config.recursive_group,
        baseline_group=config.baseline_group,
        twin_group=config.twin_group,
        batch_size=config.batch_size,
        n_boot=config.n_boot,
        seed=config.seed,
    )
    phenomenon = prompt_set.select(groups)
    resolve_design(phenomenon, contraction_config)
    return phenomenon, contraction_config


def run_phases(lm, prompt_set, config: ValidateConfig, run=None) -> ValidateResult:
    """All four phases on a loaded model; ``run`` (an open :class:`rloop.runs.Run`, or None
    for no run directory) checkpoints phase 1's prompt batches and the generation chunks of
    phases 2-4, and resumes them."""

    timings = {}
    started = time.perf_counter()
    early, late, _ = resolve_layers(lm.adapter, config.layers or None)
    phenomenon, contraction_config = phase1_setup(prompt_set, config, [early, late])
    contraction = measure_contraction(lm, phenomenon, contraction_config, run=run)
    timings["phase1_s"] = time.perf_counter() - started

    started = time.perf_counter()
    ranges = layer_ranges(config, lm.adapter.n_layers)
    pairs = make_pairs(prompt_set, config.baseline_group, config.recursive_group, config.n_pairs)
    conditions = conditions_for(config, ranges)
    grid = run_config_grid(lm, pairs, conditions, config, early, late, run=run)
    timings["generation_s"] = time.perf_counter() - started
    started = time.perf_counter()
    transfer = transfer_table(grid, n_boot=config.n_boot, seed=config.seed)
    correlations = correlation_table(grid, n_boot=config.n_boot, seed=config.seed)
    dose = dose_response_table(grid, "full", n_boot=config.n_boot, seed=config.seed)
    verdicts = _verdicts(contraction, transfer, correlations, dose, config)
    timings["stats_s"] = time.perf_counter() - started
    return ValidateResult(
        contraction, grid, transfer, correlations, dose, verdicts, ranges, early, late, timings
    )


def _transfer_value(
    transfer: pd.DataFrame, condition: str, metric: str
) -> tuple[float, str | None, tuple[float, float]]:
    """(transfer %, why it is undefined or None, its CI (NaN, NaN when not given))."""
    row = transfer[(transfer.condition == condition) & (transfer.metric == metric)].iloc[0]
    ci = (
        float(getattr(row, "transfer_ci_low", math.nan)),
        float(getattr(row, "transfer_ci_high", math.nan)),
    )
    return float(row.transfer_pct), row.transfer_undefined or None, ci


def abs_interval(low: float, high: float) -> tuple[float, float]:
    """The image of the interval [low, high] under abs (for the check on |transfer %|)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return math.nan, math.nan
    if low >= 0:
        return low, high
    if high <= 0:
        return -high, -low
    return 0.0, max(-low, high)


def _main_paired(contraction) -> pd.DataFrame:
    """The main paired-contrast row(s) of a contraction result (empty without twins; objects
    that carry only ``contrasts`` have none)."""
    paired = getattr(contraction, "paired", None)
    if paired is None or paired.empty:
        return pd.DataFrame()
    return paired[paired["main"]]


def phase1_verdicts(contraction, config: ValidateConfig) -> list[Verdict]:
    """Phase 1 checks: the paired contrast (d_z and sign-flip p of recursive - twin) when the
    prompt set has minimal pairs, else the unpaired one (Hedges g and Welch p)."""
    t = config.thresholds["phase1"]
    main = _main_paired(contraction)
    if not main.empty:
        row = main.iloc[0]
        why = row.reason if isinstance(row.reason, str) else None
        return [
            _check("1", "paired d_z of R_V (recursive - twin)", row.d_z, "<=",
                   t["max_paired_d_z"], why),
            _check("1", "sign-flip p (paired)", row.sign_flip_p, "<=", t["max_paired_p"], why),
        ]  # fmt: skip
    c = contraction.contrasts
    g = float(c["hedges_g"].iloc[0]) if not c.empty else math.nan
    p = float(c["welch_p"].iloc[0]) if not c.empty else math.nan
    return [
        _check("1", "Hedges g of R_V (recursive - baseline)", g, "<=", t["max_hedges_g"]),
        _check("1", "Welch p", p, "<=", t["max_p"]),
    ]


def phase1_basis(contraction, config: ValidateConfig) -> str:
    """One sentence: which contrast phase 1's verdict comes from, and why."""
    main = _main_paired(contraction)
    unpaired = f"{config.recursive_group} vs {config.baseline_group}"
    if not main.empty:
        row = main.iloc[0]
        return (
            f"Verdict from the paired contrast {row.recursive_group} vs {row.twin_group} "
            f"({row.n_pairs} minimal pairs); the unpaired contrast {unpaired} is shown for "
            "comparison and does not enter the verdict."
        )
    notes = [n for n in getattr(contraction, "notes", []) if n.startswith("paired contrast")]
    why = notes[0] if notes else "the prompt set has no minimal pairs"
    return f"Verdict from the unpaired contrast {unpaired}, because {why}."


def _verdicts(contraction, transfer, correlations, dose, config) -> pd.DataFrame:
    t = config.thresholds
    out: list[Verdict] = phase1_verdicts(contraction, config)
    value, why, ci = _transfer_value(transfer, V_PATCH, "score")
    out.append(
        _check(
            "2",
            "abs(behaviour transfer %) of V-patching",
            abs(value),
            "<=",
            t["phase2"]["max_abs_behavior_transfer_pct"],
            why,
            abs_interval(*ci),
        )
    )
    full_one = Condition("kv", (), 1.0, "full").name
    value, why, ci = _transfer_value(transfer, full_one, "score")
    out.append(
        _check(
            "3",
            "behaviour transfer % (KV full range, alpha 1)",
            value,
            ">=",
            t["phase3"]["min_behavior_transfer_pct"],
            why,
            ci,
        )
    )
    value, why, ci = _transfer_value(transfer, full_one, "r_v_generated")
    out.append(
        _check(
            "3",
            "R_V transfer % (KV full range, alpha 1)",
            value,
            ">=",
            t["phase3"]["min_r_v_transfer_pct"],
            why,
            ci,
        )
    )
    dose_row = dose[dose.y == "score"].iloc[0]
    out.append(
        _check(
            "4",
            "Spearman rho(alpha, behaviour)",
            dose_row.r,
            ">=",
            t["phase4"]["min_alpha_behavior_spearman"],
            "constant values",
        )
    )
    out.append(
        _check(
            "4",
            "p of rho(alpha, behaviour)",
            dose_row.p,
            "<=",
            t["phase4"]["max_alpha_behavior_p"],
            "constant values",
        )
    )
    pearson = correlations[correlations.method == "pearson"].iloc[0]
    out.append(
        _check(
            "4",
            "p of Pearson r(R_V, behaviour)",
            pearson.p,
            "<=",
            t["phase4"]["max_r_v_behavior_p"],
            "constant values",
        )
    )
    return pd.DataFrame([asdict(v) for v in out])


PHASE_TITLES = {
    "1": "Phase 1 - R_V phenomenon",
    "2": "Phase 2 - V-patching null (measurement layer only)",
    "3": "Phase 3 - KV-patching mechanism",
    "4": "Phase 4 - alpha dose-response",
}


def report_markdown(result: ValidateResult, config: ValidateConfig, model_line: str) -> str:

    ranges = ", ".join(f"{k} {_fmt_range(v)}" for k, v in result.ranges.items())
    lines = [
        "# rloop validate (4 phases)",
        "",
        f"- model: {model_line}",
        f"- R_V = PR(V L{result.late}) / PR(V L{result.early}), {config.pr_mode}, "
        f"window {config.window}",
        f"- pairs: {config.n_pairs} ({config.baseline_group} target <- {config.recursive_group} "
        f"source); {config.max_new_tokens} tokens, "
        + (
            "greedy"
            if config.temperature == 0
            else f"T={config.temperature}, top-p {config.top_p}, seed {config.generation_seed}"
        ),
        f"- KV ranges: {ranges}; alphas {config.alphas}",
        "- thresholds: see manifest config.thresholds; verdicts are computed, never fixed.",
        "",
        "## Verdicts",
        "",
        "| phase | verdict |",
        "|---|---|",
    ]
    for phase, frame in result.verdicts.groupby("phase"):
        states = [Verdict(**r) for r in frame.to_dict(orient="records")]
        lines.append(f"| {PHASE_TITLES[phase]} | **{phase_verdict(states)}** |")
    lines.append("")
    tables = _phase_tables(result)
    for phase, title in PHASE_TITLES.items():
        lines += [f"## {title}", ""]
        if phase == "1":
            lines += [phase1_basis(result.contraction, config), ""]
        lines += [tables[phase], "", "Checks:", ""]
        lines.append(markdown_table(result.verdicts[result.verdicts.phase == phase]))
        lines.append("")
    lines += [
        "Transfer % = (patched - natural target) / (natural source - natural target) x 100; "
        "undefined when the natural gap is within the bootstrap noise of the paired gap. "
        "transfer_ci_low / transfer_ci_high: its 95 % cluster bootstrap CI over pairs (pairs "
        "resampled, all means and the rule recomputed; the verdicts' ci_low / ci_high), not "
        "given when the transfer % is undefined in more than 5 % of the draws "
        "(transfer_undefined_share). Verdicts compare the point value with the threshold.",
        "",
        "Files: `phase1_contraction.*`, `phase1_contrasts.*`, `phase1_paired.*` (with minimal "
        "pairs), `generations.*` (every pair x condition, with text, "
        "R_V and behaviour), `transfer.*`, `correlations.*`, `dose_response.*`, `verdicts.*`, "
        "`plots/`.",
    ]
    return "\n".join(lines) + "\n"


def _phase_tables(result: ValidateResult) -> dict[str, str]:

    c = result.contraction.contrasts
    keep = [
        "n_recursive",
        "n_baseline",
        "mean_recursive",
        "mean_baseline",
        "diff",
        "contraction_pct",
        "hedges_g",
        "hedges_g_ci_low",
        "hedges_g_ci_high",
        "welch_p",
        "mann_whitney_p",
    ]
    unpaired = markdown_table(c[[k for k in keep if k in c.columns]]) if not c.empty else "-"
    main = _main_paired(result.contraction)
    paired = (
        markdown_table(
            main[[k for k in PAIRED_COLUMNS if k in main.columns]].assign(
                reason=lambda f: f["reason"].map(lambda v: v if isinstance(v, str) else "")
            )
        )
        if not main.empty
        else "no paired contrast"
    )
    phase1 = f"Paired (recursive - twin):\n\n{paired}\n\nUnpaired (recursive - baseline):\n\n"
    phase1 += unpaired
    tr = result.transfer
    cols = [
        "condition",
        "metric",
        "n",
        "mean",
        "natural_target",
        "natural_source",
        "gap",
        "noise",
        *TRANSFER_COLUMNS,
    ]
    cols = [c for c in cols if c in tr.columns]
    phase2 = markdown_table(tr[tr.kind.isin([V_PATCH])][cols])
    phase3 = markdown_table(
        tr[(tr.kind == "kv") & (tr.alpha == 1.0)][["range_label", "layers", *cols[1:]]]
    )
    dose = tr[(tr.kind == "kv") & (tr.range_label == "full")][["alpha", *cols[1:]]]
    phase4 = "\n\n".join(
        [
            markdown_table(dose.sort_values(["metric", "alpha"])),
            markdown_table(
                result.dose_response[["x", "y", "method", "r", "p", "ci_low", "ci_high", "n"]]
            ),
            markdown_table(
                result.correlations[["x", "y", "method", "r", "p", "ci_low", "ci_high", "n"]]
            ),
        ]
    )
    return {"1": phase1, "2": phase2, "3": phase3, "4": phase4}


def _fmt_range(layers) -> str:
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])


def validated_groups(config: ValidateConfig, prompt_set: PromptSet) -> dict[str, str]:
    """The groups validate contrasts, by config key: recursive and baseline, and the twin
    group when the prompt set has it (a missing default twin group is a fallback, not an
    error: phase 1 then uses the unpaired contrast)."""
    groups = {"recursive_group": config.recursive_group, "baseline_group": config.baseline_group}
    if config.twin_group is not None and config.twin_group in prompt_set.groups():
        groups["twin_group"] = config.twin_group
    return groups


def pair_prompts(prompt_set: PromptSet, pairs) -> PromptSet:
    """The prompts of phases 2-4 (every pair's target and source), for the context check
    with the generated tokens."""
    used = {p.target_id for p in pairs} | {p.source_id for p in pairs}
    chosen = [p for p in prompt_set if p.id in used]
    return PromptSet(chosen, prompt_set.source, prompt_set.version, prompt_set.sha256)


def run_validate(
    config: ValidateConfig, out: Path | None = None, force: bool = False, lm=None
) -> tuple[Path, bool, dict]:
    """The full 4-phase run with a run record; all checks happen before anything is written:
    settings, groups (present, at least 2 prompts each, enough pairs) and the design before
    the model is loaded, then layers, window and context (the pairs' prompts with
    ``max_new_tokens`` generated tokens). A rerun with the same config resumes."""

    check_validate_config(config)
    prompt_set = load_prompt_set(config.prompts, config.bank_version)
    check_groups(prompt_set, validated_groups(config, prompt_set))
    phenomenon, _ = phase1_setup(prompt_set, config)
    pairs = make_pairs(prompt_set, config.baseline_group, config.recursive_group, config.n_pairs)
    if lm is None:
        lm = models.load_model(
            config.model, revision=config.revision, device=config.device, dtype=config.dtype
        )
    resolve_layers(lm.adapter, config.layers or None)
    layer_ranges(config, lm.adapter.n_layers)
    check_window(phenomenon, lm.tokenizer, config.window)
    check_context(phenomenon, lm)
    check_context(pair_prompts(prompt_set, pairs), lm, config.max_new_tokens)

    def body(run) -> dict:
        run.set_model(model_manifest(lm))
        run.set_prompts(prompts_manifest(phenomenon, lm.tokenizer))
        result = run_phases(lm, prompt_set, config, run=run)
        run.write_table("phase1_contraction", result.contraction.results)
        run.write_table("phase1_contrasts", result.contraction.contrasts)
        if not result.contraction.paired.empty:
            run.write_table("phase1_paired", result.contraction.paired)
        run.write_table("generations", result.grid)
        run.write_table("transfer", result.transfer)
        run.write_table("correlations", result.correlations)
        run.write_table("dose_response", result.dose_response)
        run.write_table("verdicts", result.verdicts)

        plotting.r_v_by_group(result.contraction.results, run.plot_path("phase1_r_v_by_group"))
        plot_transfer(result.transfer, run.plot_path("transfer"))
        plot_dose_response(result.grid, "full", run.plot_path("dose_response"))
        run.write_summary(report_markdown(result, config, model_line(lm)))
        run.update_manifest(
            layers={
                "early": result.early,
                "late": result.late,
                "kv_ranges": {k: list(v) for k, v in result.ranges.items()},
            },
            sampling=config.sampling().to_dict(),
            timings=result.timings,
        )
        return _headline(result)

    return execute(EXPERIMENT, config.to_dict(), lm.name, out, body, force=force).as_tuple()


def _headline(result: ValidateResult) -> dict:
    headline = {}
    for phase, frame in result.verdicts.groupby("phase"):
        states = [Verdict(**r) for r in frame.to_dict(orient="records")]
        headline[f"phase{phase}"] = phase_verdict(states)
    return headline
