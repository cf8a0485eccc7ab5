"""Head ablation sweep, group ablation and layer ablation (seed 000 cells 3-5, 13; seed 001).

The sweep ablates every head (or KV group) of a layer range, one at a time, on a prompt set
and reports per prompt x head the R_V with and without the head, using the exact batched
engine in :mod:`rloop.interventions.head_sweep`. The ablation is a choice, so the sweep runs
one or several modes: ``zero``; ``mean`` (z set to its mean over every token of the
reference group); ``resample`` (z set to its mean over the tokens of ONE reference prompt,
drawn at random, the impact averaged over ``n_resample`` seeded draws: a prompt-level
resample ablation; position-level resampling is not defined for prompts of different
lengths). With several modes the ``mode_agreement`` table gives the Spearman rank
correlation of the per-head mean impacts between modes. Per head: mean impact over prompts with a bootstrap CI,
a one-sample t-test against 0 with Benjamini-Hochberg adjustment over the computed heads, and
a noise floor; heads at layers >= the late measurement layer are reported as exactly 0 and
marked ``computed = False``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps

from rloop.capture.batching import encode
from rloop.errors import ConfigError, RunStoreError
from rloop.experiments.runner import execute, record_model_and_prompts, run_identity, run_units
from rloop.experiments.settings import (
    RVSettings,
    check_context,
    check_settings,
    load,
    load_prompt_set,
    verify_if_asked,
)
from rloop.interventions.edits import (
    ABLATION_MODES,
    HeadList,
    check_ablation_mode,
    mean_activations,
)
from rloop.interventions.engine import resolve_layers
from rloop.interventions.head_sweep import compile_blocker, head_sweep, resolve_compile
from rloop.metrics import r_v
from rloop.metrics.stats import benjamini_hochberg, bootstrap_ci, correlation_with_ci
from rloop.prompts import PromptSet, check_window
from rloop.runs import plots as plotting
from rloop.runs.layout import read_manifest
from rloop.runs.markdown import markdown_table

EXPERIMENT = "ablate"
# Swept layers per resume checkpoint: each unit repeats one clean forward, so a few layers
# per unit keep that overhead small while an interrupted sweep loses little work.
LAYERS_PER_UNIT = 4
RESAMPLE = "resample"
SWEEP_MODES = (*ABLATION_MODES, RESAMPLE)


@dataclass
class AblationConfig(RVSettings):
    """Settings of the head-ablation sweep (defaults match ``rloop ablate``); ``groups`` None
    = ["L5"] from the bank, all groups of a user file."""

    layers: list[int] | None = None  # layers whose heads are swept; None = all
    mode: str = "zero"  # zero | mean | resample, or several comma-separated: zero,mean,resample
    reference_group: str = "factual"  # mean / resample reference set (from the same source)
    n_resample: int = 3  # resample: reference prompts drawn (seeded), impacts averaged
    unit: str = "query"  # query | kv_group
    top_k: int = 10
    max_rows: int | None = None  # cap on stacked rows; None = memory budget
    kl: bool = False  # also last-token KL(clean || ablated), through the LM head
    # Blocks through torch.compile (True / False; None = the device's default, off for now:
    # rloop.interventions.head_sweep.resolve_compile). Equal to eager up to rounding, so not
    # part of the run's identity: to_dict() leaves it out; the manifest records what ran.
    compile: bool | None = field(default=None, compare=False)

    def to_dict(self) -> dict:
        values = super().to_dict()
        values.pop("compile")
        return values


def sweep_modes(text: str) -> list[str]:
    """'zero,mean,resample' -> ['zero', 'mean', 'resample']; ConfigError for an empty list, an
    unknown or a repeated mode."""
    modes = [mode.strip() for mode in text.split(",") if mode.strip()]
    if not modes:
        raise ConfigError("give at least one ablation mode, e.g. --mode zero or zero,mean,resample")
    for mode in modes:
        if mode not in SWEEP_MODES:
            raise ConfigError(
                f"unknown ablation mode {mode!r}: choose from {', '.join(SWEEP_MODES)}"
            )
    if len(set(modes)) != len(modes):
        raise ConfigError(f"--mode {text!r} names a mode twice")
    return modes


def validate_config(config: AblationConfig) -> None:
    modes = sweep_modes(config.mode)
    check_ablation_mode("zero", config.unit)
    if RESAMPLE in modes and config.n_resample < 1:
        raise ConfigError(f"--n-resample must be at least 1, got {config.n_resample}")
    check_settings(config)


def resample_draws(n_reference: int, n_resample: int, seed: int) -> list[int]:
    """Indices of the reference prompts a resample ablation uses (seeded, no repeats)."""
    if n_resample > n_reference:
        raise ConfigError(
            f"--n-resample {n_resample} exceeds the {n_reference} prompts of the reference "
            "group: lower it or add reference prompts"
        )
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n_reference, size=n_resample, replace=False))


def ablation_fills(lm, modes: list[str], reference, layers: list[int], config) -> dict:
    """Per mode, the z values that replace an ablated head, one dict (layer -> (H, D)) per
    sweep the mode averages over: zero -> [None]; mean -> the reference group's token mean;
    resample -> the token mean of each drawn reference prompt."""
    texts = [p.text for p in reference] if reference is not None else []

    def means(chosen: list[str]) -> dict[int, torch.Tensor]:
        return mean_activations(lm.model, lm.adapter, lm.tokenizer, chosen, layers, "z")

    fills: dict[str, list] = {}
    for mode in modes:
        if mode == "zero":
            fills[mode] = [None]
        elif mode == "mean":
            fills[mode] = [means(texts)]
        else:
            draws = resample_draws(len(texts), config.n_resample, config.seed)
            fills[mode] = [means([texts[i]]) for i in draws]
    return fills


def averaged_table(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """The rows of several sweeps of one mode with their ablated values averaged (the clean
    columns are the same in each)."""
    if len(tables) == 1:
        return tables[0]
    table = tables[0].copy()
    for column in ("r_v_ablated", "impact", "pr_late_ablated", "kl"):
        if column in table:
            table[column] = np.mean([t[column].to_numpy(float) for t in tables], axis=0)
    return table


def mode_agreement(summary: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """Spearman rank correlation (bootstrap CI over heads) of the computed heads' mean impacts
    between every two modes, and the overlap of their top-10 heads by |mean impact|."""
    computed = summary[summary["computed"]]
    by_mode = {
        m: f.set_index(["layer", "head"])["mean_impact"] for m, f in computed.groupby("mode")
    }
    modes = list(dict.fromkeys(summary["mode"]))
    rows = []
    for i, first in enumerate(modes):
        for second in modes[i + 1 :]:
            a, b = by_mode[first].align(by_mode[second], join="inner")
            c = correlation_with_ci(
                a.to_numpy(), b.to_numpy(), "spearman", n_boot=n_boot, seed=seed
            )
            top_a = set(a.abs().sort_values(ascending=False).index[:10])
            top_b = set(b.abs().sort_values(ascending=False).index[:10])
            rows.append(
                {
                    "mode_a": first,
                    "mode_b": second,
                    "spearman": c.r,
                    "ci_low": c.ci_low,
                    "ci_high": c.ci_high,
                    "p": c.p,
                    "n_heads": c.n,
                    "top10_overlap": len(top_a & top_b),
                }
            )
    return pd.DataFrame(rows)


def sweep_table(result, prompt_ids: list[str], mode: str, unit: str, pr_mode: str) -> pd.DataFrame:
    """Tidy rows: one per prompt x layer x head."""
    base_rv = r_v(result.clean_late[pr_mode].numpy(), result.clean_early[pr_mode].numpy())  # (P,)
    rows = []
    pe = result.pr_early[pr_mode].numpy()  # (L, U, P)
    pl = result.pr_late[pr_mode].numpy()
    computed = set(result.computed_layers)
    for i, layer in enumerate(result.layers):
        for head in range(result.n_units):
            ablated = r_v(pl[i, head], pe[i, head])  # (P,)
            for p, pid in enumerate(prompt_ids):
                is_computed = layer in computed
                rows.append(
                    {
                        "prompt_id": pid,
                        "layer": layer,
                        "head": head,
                        "unit": unit,
                        "mode": mode,
                        "pr_mode": pr_mode,
                        "r_v_base": float(base_rv[p]),
                        "r_v_ablated": float(ablated[p]) if is_computed else float(base_rv[p]),
                        "impact": float(ablated[p] - base_rv[p]) if is_computed else 0.0,
                        "pr_late_base": float(result.clean_late[pr_mode][p]),
                        "pr_late_ablated": float(pl[i, head, p]),
                        "computed": is_computed,
                    }
                )
    table = pd.DataFrame(rows)
    if result.kl is not None:
        # Same (layer, head, prompt) order as the rows above.
        table["kl"] = result.kl.numpy().reshape(-1)
    return table


def head_summary(table: pd.DataFrame, n_boot: int, seed: int) -> tuple[pd.DataFrame, float]:
    """Per head: mean impact, bootstrap CI, t-test p, BH-adjusted p, rank; and the noise floor.

    The noise floor is the median, over the computed heads, of the half-width of the
    bootstrap 95 % CI of a head's mean impact: the resolution with which this prompt set
    measures a (paired) ablation effect. A head whose |mean impact| is below it is not
    distinguishable from prompt-sampling noise, whatever its p-value.
    """
    rows = []
    for (layer, head), frame in table.groupby(["layer", "head"], sort=True):
        impacts = frame["impact"].to_numpy(dtype=float)
        computed = bool(frame["computed"].iloc[0])
        if computed and np.isfinite(impacts).sum() >= 2:
            ci = bootstrap_ci(impacts, n_boot=n_boot, seed=seed)
            low, high = ci.low, ci.high
            p = float(sps.ttest_1samp(impacts[np.isfinite(impacts)], 0.0).pvalue)
        else:
            low = high = 0.0 if not computed else float("nan")
            p = float("nan")
        rows.append(
            {
                "layer": layer,
                "head": head,
                "mean_impact": float(np.nanmean(impacts)) if computed else 0.0,
                "ci_low": low,
                "ci_high": high,
                "p": p,
                "pr_late_change": float((frame["pr_late_ablated"] - frame["pr_late_base"]).mean()),
                "computed": computed,
                **(
                    _kl_summary(frame["kl"].to_numpy(dtype=float), n_boot, seed)
                    if "kl" in frame
                    else {}
                ),
            }
        )
    summary = pd.DataFrame(rows)
    half_widths = (summary["ci_high"] - summary["ci_low"])[summary["computed"]] / 2
    floor = float(np.nanmedian(half_widths)) if half_widths.notna().any() else float("nan")
    mask = summary["computed"] & summary["p"].notna()
    summary["p_bh"] = np.nan
    if mask.any():
        summary.loc[mask, "p_bh"] = benjamini_hochberg(summary.loc[mask, "p"].to_numpy())
    summary["above_noise"] = summary["mean_impact"].abs() > floor
    summary["rank"] = summary["mean_impact"].abs().rank(ascending=False, method="first").astype(int)
    return summary.sort_values("rank", ignore_index=True), floor


def _kl_summary(kl: np.ndarray, n_boot: int, seed: int) -> dict:
    """Mean last-token KL of one head over prompts with its bootstrap 95 % CI."""
    ci = bootstrap_ci(kl, n_boot=n_boot, seed=seed)  # NaN CI with < 2 finite values
    return {"mean_kl": float(np.nanmean(kl)), "kl_ci_low": ci.low, "kl_ci_high": ci.high}


def sweep_compiles(config: AblationConfig, lm) -> bool:
    """Whether the sweep runs its blocks compiled (``config.compile``, else the device's
    default). A ConfigError, before any compute, when --compile asks for what this model
    cannot do; the default quietly stays eager then."""
    if not resolve_compile(config.compile, lm.device):
        return False
    blocker = compile_blocker(lm.model, lm.adapter)
    if blocker is None:
        return True
    if config.compile:
        raise ConfigError(
            f"--compile: the head sweep cannot be compiled: {blocker}; drop --compile"
        )
    return False


def run_head_sweep(config: AblationConfig, out=None, force: bool = False, lm=None):
    """``rloop ablate``: returns (run_dir, already_complete, headline)."""

    validate_config(config)
    modes = sweep_modes(config.mode)
    groups = config.groups or (["L5"] if config.prompts is None else None)
    prompt_set = load_prompt_set(config.prompts, config.bank_version, groups)
    prompts = list(prompt_set)[: config.max_prompts] if config.max_prompts else list(prompt_set)
    used = PromptSet(prompts, prompt_set.source, prompt_set.version, prompt_set.sha256)
    reference = None
    if set(modes) - {"zero"}:
        reference = load_prompt_set(config.prompts, config.bank_version, [config.reference_group])
        if RESAMPLE in modes:
            resample_draws(len(reference), config.n_resample, config.seed)
    lm = load(config, lm, verify=False)
    adapter = lm.adapter
    early, late, rule = resolve_layers(adapter, config.measure_layers)
    layers = config.layers if config.layers is not None else list(range(adapter.n_layers))
    for layer in layers:
        adapter.check_layer(layer)
    check_window(used, lm.tokenizer, config.window)
    check_context(used, lm)
    if reference is not None:
        check_window(reference, lm.tokenizer, config.window)
    verify_if_asked(config, lm, used)
    compiled = sweep_compiles(config, lm)

    def body(run) -> dict:
        record_model_and_prompts(run, lm, used)
        run.update_manifest(compiled=compiled)
        started = time.perf_counter()
        swept = sorted(set(layers))
        fills = ablation_fills(lm, modes, reference, swept, config)
        if reference is not None:
            run.update_manifest(
                ablation_reference={"group": config.reference_group, "n": len(reference)}
            )
        batch = encode(lm.tokenizer, [p.text for p in prompts], lm.device)
        chunks = [swept[i : i + LAYERS_PER_UNIT] for i in range(0, len(swept), LAYERS_PER_UNIT)]
        units = [(mode, chunk) for mode in modes for chunk in chunks]

        def sweep_unit(unit: tuple[str, list[int]]) -> pd.DataFrame:
            mode, unit_layers = unit
            tables = []
            for mean_z in fills[mode]:
                result = head_sweep(
                    lm.model, adapter, batch, unit_layers, early, late, config.window,
                    modes=[config.pr_mode], unit=config.unit, mean_z=mean_z,
                    max_rows=config.max_rows, kl=config.kl, compile=compiled,
                )  # fmt: skip
                ids = [p.id for p in prompts]
                tables.append(sweep_table(result, ids, mode, config.unit, config.pr_mode))
            return averaged_table(tables)

        table = run_units(
            run, units, sweep_unit, key=lambda u: f"{u[0]}-layers-{u[1][0]:04d}-{u[1][-1]:04d}",
            label="ablating heads", weight=lambda u: len(u[1]) * len(fills[u[0]]),
        )  # fmt: skip
        seconds = time.perf_counter() - started
        table["layer_early"], table["layer_late"] = early, late
        summaries = {
            m: head_summary(table[table["mode"] == m], config.n_boot, config.seed) for m in modes
        }
        summary = pd.concat(
            [frame.assign(mode=m) for m, (frame, _) in summaries.items()], ignore_index=True
        )
        agreement = mode_agreement(summary, config.n_boot, config.seed)
        run.write_table("results", table)
        run.write_table("heads", summary)
        if not agreement.empty:
            run.write_table("mode_agreement", agreement)
        for m, (frame, _) in summaries.items():
            suffix = "" if m == modes[0] else f"_{m}"
            _sweep_plots(frame, run.plot_path, config, early, late, m, suffix)
        floors = {m: floor for m, (_, floor) in summaries.items()}
        run.write_summary(
            _sweep_markdown(summaries, agreement, config, lm, (early, late, rule), seconds)
        )
        run.update_manifest(
            layers={"early": early, "late": late, "rule": rule, "swept": layers},
            timings={"sweep_s": seconds},
            noise_floor=floors[modes[0]],
            noise_floors=floors,
        )
        return _sweep_headline(summaries, agreement, floors, modes, seconds)

    identity = run_identity(config, measure_layers=[early, late])
    return execute(EXPERIMENT, identity, lm.name, out, body, force=force).as_tuple()


def _sweep_headline(summaries, agreement, floors, modes, seconds) -> dict:
    """The first mode's top head and counts (as a one-mode sweep), the others' top heads and
    the lowest rank correlation between modes."""
    first, _ = summaries[modes[0]]
    top = first.iloc[0]
    headline = {
        "noise_floor": floors[modes[0]],
        "top_head": f"L{int(top['layer'])}H{int(top['head'])}",
        "top_mean_impact": float(top["mean_impact"]),
        "n_significant_bh05": int((first["p_bh"] < 0.05).sum()),
        "sweep_seconds": seconds,
    }
    for mode in modes[1:]:
        row = summaries[mode][0].iloc[0]
        headline[f"top_head_{mode}"] = f"L{int(row['layer'])}H{int(row['head'])}"
    if not agreement.empty:
        headline["min_mode_spearman"] = float(agreement["spearman"].min())
    return headline


def _sweep_plots(summary, plot_path, config, early, late, mode: str, suffix: str) -> None:
    layers = sorted(summary["layer"].unique())
    n_units = int(summary["head"].max()) + 1
    plots = [("impact_heatmap", "mean_impact", f"R_V impact (R_V L{late}/L{early})", True)]
    if "mean_kl" in summary:  # KL >= 0: a sequential colour map
        plots.append(("kl_heatmap", "mean_kl", "Last-token KL (nats)", False))
    for name, column, what, center in plots:
        grid = np.full((len(layers), n_units), np.nan)
        for layer, head, value in zip(
            summary["layer"], summary["head"], summary[column], strict=True
        ):
            grid[layers.index(layer), head] = value
        plotting.heatmap(
            grid,
            plot_path(name + suffix),
            title=f"{what} of {mode}-ablating each {config.unit} head",
            xlabel="head",
            ylabel="layer",
            row_labels=[str(x) for x in layers],
            center=center,
        )


def _mode_line(mode: str, config) -> str:
    if mode == "zero":
        return "zero: the head's z set to 0"
    if mode == "mean":
        return f"mean: z set to its mean over every token of {config.reference_group}"
    return (
        f"resample: z set to its mean over the tokens of one {config.reference_group} prompt, "
        f"impact averaged over {config.n_resample} seeded draws"
    )


def _top_heads_lines(summary, floor, config, mode: str) -> list[str]:
    top = summary[summary["computed"]].head(config.top_k)
    has_kl = "mean_kl" in summary
    kl_head = " mean KL | KL 95 % CI |" if has_kl else ""
    lines = [
        "",
        f"## {mode} ablation: top {config.top_k} heads by |mean impact|",
        "",
        f"- noise floor (median 95 % CI half-width of a head's mean impact): {floor:.4g}",
        f"- heads with BH-adjusted p < 0.05: {int((summary['p_bh'] < 0.05).sum())}; "
        f"above the noise floor: {int(summary['above_noise'].sum())}",
        "",
        f"| rank | layer | head | mean impact | 95 % CI | p | p (BH) | above noise |{kl_head}",
        "|---|---|---|---|---|---|---|---|" + ("---|---|" if has_kl else ""),
    ]
    for row in top.itertuples():
        kl_cells = (
            f" {row.mean_kl:.4g} | {row.kl_ci_low:.3g}..{row.kl_ci_high:.3g} |" if has_kl else ""
        )
        lines.append(
            f"| {row.rank} | {row.layer} | {row.head} | {row.mean_impact:+.4g} | "
            f"{row.ci_low:+.3g}..{row.ci_high:+.3g} | {row.p:.3g} | {row.p_bh:.3g} | "
            f"{'yes' if row.above_noise else 'no'} |{kl_cells}"
        )
    if has_kl:
        by_kl = summary.sort_values("mean_kl", ascending=False).head(config.top_k)
        lines += [
            "",
            f"### Top {config.top_k} heads by mean last-token KL",
            "",
            "| layer | head | mean KL | 95 % CI | R_V impact |",
            "|---|---|---|---|---|",
        ]
        for row in by_kl.itertuples():
            lines.append(
                f"| {row.layer} | {row.head} | {row.mean_kl:.4g} | "
                f"{row.kl_ci_low:.3g}..{row.kl_ci_high:.3g} | {row.mean_impact:+.4g} |"
            )
    return lines


def _sweep_markdown(summaries, agreement, config, lm, measured, seconds) -> str:
    early, late, rule = measured
    modes = list(summaries)
    lines = [
        "# Head ablation sweep",
        "",
        f"- model: {lm.name} ({lm.adapter.family}); {config.unit} heads ablated at the input "
        "of the attention output projection",
        *[f"- {_mode_line(mode, config)}" for mode in modes],
        f"- R_V = PR(L{late}) / PR(L{early}) ({rule}), {config.pr_mode} PR, window {config.window}",
        f"- heads at layers >= {late} cannot change V at layer {late}: impact exactly 0, not computed",
        f"- sweep time: {seconds:.1f} s",
    ]
    if config.kl:
        lines.append(
            "- behaviour proxy: KL(clean || ablated) of the next-token distribution at each "
            f"prompt's last token, in nats, for every swept head (layers >= {late} included)"
        )
    for mode, (summary, floor) in summaries.items():
        lines += _top_heads_lines(summary, floor, config, mode)
    if not agreement.empty:
        lines += [
            "",
            "## Do the ablation modes agree?",
            "",
            "Spearman rank correlation of the computed heads' mean impacts between modes (95 % "
            "bootstrap CI over heads) and the overlap of their top-10 heads by |mean impact|.",
            "",
            markdown_table(agreement),
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- reading a sweep
def read_sweep(run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(results, heads, manifest) of a finished ``rloop ablate`` run directory."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if manifest.get("experiment") != "ablate":
        raise RunStoreError(
            f"{run_dir} is a {manifest.get('experiment')!r} run, not a head sweep: "
            "pass the directory of an `rloop ablate` run"
        )
    if manifest.get("status") != "complete":
        raise RunStoreError(
            f"{run_dir} is not complete (status {manifest.get('status')!r}): "
            "finish the sweep first (run the same `rloop ablate` command again)"
        )
    try:
        results = pd.read_parquet(run_dir / "results.parquet")
        heads = pd.read_parquet(run_dir / "heads.parquet")
    except (OSError, ValueError) as err:
        raise RunStoreError(f"cannot read the tables of sweep {run_dir}: {err}") from None
    if "mode" in heads and heads["mode"].nunique() > 1:  # a multi-mode sweep: its first mode
        first = sweep_modes(manifest["config"]["mode"])[0]
        results, heads = results[results["mode"] == first], heads[heads["mode"] == first]
    return results, heads, manifest


def top_heads_of_sweep(heads: pd.DataFrame, k: int, select: str = "abs") -> HeadList:
    """The top ``k`` computed heads of a sweep's ``heads`` table.

    select: "abs" (largest |mean impact|), "negative" (most negative mean impact: the seed's
    "expanders", whose removal lowers R_V), "positive" (most positive).
    """
    if k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {k}")
    computed = heads[heads["computed"]]
    if select == "abs":
        order = computed.assign(key=-computed["mean_impact"].abs()).sort_values("key")
    elif select == "negative":
        order = computed.sort_values("mean_impact")
    elif select == "positive":
        order = computed.sort_values("mean_impact", ascending=False)
    else:
        raise ConfigError(f"unknown head selection {select!r}: choose abs, negative or positive")
    if len(order) < k:
        raise ConfigError(f"the sweep has only {len(order)} computed heads; use --top-k <= that")
    return sorted((int(r.layer), int(r.head)) for r in order.head(k).itertuples())
