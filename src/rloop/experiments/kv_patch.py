"""KV-cache patching experiments (seed 003): layer-range transfer and causal loop closure.

Pairs: the i-th baseline prompt (target) with the i-th recursive prompt (source), by prompt id.
Every condition of every pair is a row of one batched generation (:mod:`rloop.interventions.kv_cache`,
whose docstring states the alignment policy for prompts of different lengths):

* ``natural_target`` / ``natural_source``: unpatched generation of each prompt alone.
* ``kv:<range>@<alpha>``: the target's memory KV mixed with the source's on a layer range.
* ``v_patch``: the target memory's V activations at the measurement layer replaced by the
  source's (the null control: changes the geometry read-out, not the mechanism).

For every row: R_V = PR(V late) / PR(V early) over the last W *generated* tokens (captured
step by step) and over the last W tokens ending at the last prompt token (step 0), and the
behaviour score of the same generated text (:mod:`rloop.behavior`). Transfer % per condition
uses the near-zero-gap rule (:func:`rloop.metrics.stats.transfer_percent`) with the noise =
bootstrap CI half-width of the mean paired gap (source - target, natural), and comes with a
cluster bootstrap CI over pairs (:func:`transfer_bootstrap`).

The grid is generated in chunks of at most ``max_batch_rows`` rows; with a run, each finished
chunk is a resume checkpoint (:func:`rloop.experiments.runner.run_units`), so an interrupted
kv-patch or validate run generates only the chunks it had not finished.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from rloop.behavior import score_texts
from rloop.capture.generation import GenerationResult, SamplingConfig, pad_id_of, tokenize_rows
from rloop.capture.trace import address
from rloop.errors import ConfigError, PromptError
from rloop.experiments.runner import (
    execute,
    model_manifest,
    prompts_manifest,
    run_identity,
    run_units,
)
from rloop.experiments.settings import (
    MIN_GROUP_SIZE,
    GenerationSettings,
    check_context,
    check_groups,
    check_settings,
    contrasted_groups,
    load,
    load_prompt_set,
    verify_if_asked,
)
from rloop.interventions.engine import check_mode_for_point, resolve_layers
from rloop.interventions.kv_cache import (
    DEFAULT_ALPHAS,
    PatchRow,
    check_alpha,
    check_layer_range,
    default_patch_layers,
    patched_generate,
)
from rloop.metrics import r_v, window_pr
from rloop.metrics.contrasts import NULL_WITHIN, cluster_correlation
from rloop.metrics.stats import finite_mean, noise_floor, transfer_bootstrap, transfer_percent
from rloop.prompts import check_window
from rloop.runs.markdown import markdown_table
from rloop.runs.plots import _save, plt

NATURAL_TARGET = "natural_target"
NATURAL_SOURCE = "natural_source"
V_PATCH = "v_patch"


@dataclass(frozen=True)
class Condition:
    """One intervention applied to every pair. kind: natural_target | natural_source | kv |
    v_patch; layers/alpha for kv; range_label names the layer range in tables."""

    kind: str
    layers: tuple[int, ...] = ()
    alpha: float = 0.0
    range_label: str = ""

    @property
    def name(self) -> str:
        if self.kind == "kv":
            return f"kv:{self.range_label}@{self.alpha:g}"
        return self.kind


@dataclass(frozen=True)
class Pair:
    pair_id: str
    target_id: str
    source_id: str
    target_text: str
    source_text: str


def make_pairs(prompt_set, baseline_group: str, recursive_group: str, n_pairs: int) -> list[Pair]:
    """The first ``n_pairs`` (baseline, recursive) prompts zipped in id order."""
    if n_pairs < 1:
        raise ConfigError(f"n_pairs must be at least 1, got {n_pairs}")
    base = sorted((p for p in prompt_set if p.group == baseline_group), key=lambda p: p.id)
    rec = sorted((p for p in prompt_set if p.group == recursive_group), key=lambda p: p.id)
    n = min(len(base), len(rec))
    if n < n_pairs:
        raise PromptError(
            f"need {n_pairs} pairs but groups {baseline_group!r} ({len(base)} prompts) and "
            f"{recursive_group!r} ({len(rec)} prompts) give {n}: lower n_pairs or add prompts"
        )
    return [
        Pair(f"{t.id}<-{s.id}", t.id, s.id, t.text, s.text)
        for t, s in zip(base[:n_pairs], rec[:n_pairs], strict=True)
    ]


def check_conditions(conditions: Sequence[Condition], n_layers: int) -> None:
    for c in conditions:
        if c.kind not in ("natural_target", "natural_source", "kv", "v_patch"):
            raise ConfigError(f"unknown condition kind {c.kind!r}")
        if c.kind == "kv":
            check_alpha(c.alpha)
            check_layer_range(n_layers, c.layers)


def run_config_grid(
    lm,
    pairs: Sequence[Pair],
    conditions: Sequence[Condition],
    config,
    early: int,
    late: int,
    run=None,
) -> pd.DataFrame:
    """:func:`run_grid` with the sampling, window, PR mode, batch rows and semantic scorer
    choice of ``config`` (a KVPatchConfig or the validation config); ``run`` (an open
    :class:`rloop.runs.Run`) checkpoints every generated chunk and resumes them."""
    semantic = "auto" if config.semantic == "auto" else None
    return run_grid(
        lm,
        pairs,
        conditions,
        config.sampling(),
        early,
        late,
        config.window,
        config.pr_mode,
        config.max_batch_rows,
        semantic=semantic,
        run=run,
    )


def run_grid(
    lm,
    pairs: Sequence[Pair],
    conditions: Sequence[Condition],
    sampling: SamplingConfig,
    early: int,
    late: int,
    window: int,
    pr_mode: str = "per-head",
    max_batch_rows: int = 128,
    semantic="auto",
    run=None,
) -> pd.DataFrame:
    """Generate every (pair, condition) and measure it: one tidy row each.

    Columns: pair_id, target_id, source_id, condition, kind, range_label, layers, alpha,
    r_v_generated, pr_early_generated, pr_late_generated, r_v_prompt, text, and the behaviour
    columns score, label, lexical_rate, degenerate, scorer_version.

    The rows are generated in chunks of at most ``max_batch_rows`` (pairs x conditions in
    order); with ``run`` each chunk's measured rows are saved as checkpoint
    ``generation-NNNNN`` and a resumed run skips the chunks already saved. Every chunk seeds
    its own sampling generator, so a resumed grid equals one generated in one session. The
    behaviour scores are computed on the whole grid at the end (cheap, deterministic).
    """
    if sampling.max_new_tokens < window:
        raise ConfigError(
            f"{sampling.max_new_tokens} generated tokens are fewer than the {window}-token "
            "window: raise the token count or lower the window"
        )
    if max_batch_rows < 1:
        raise ConfigError(f"max_batch_rows must be at least 1, got {max_batch_rows}")
    check_conditions(conditions, lm.adapter.n_layers)
    rows_meta: list[tuple[Pair, Condition]] = [(p, c) for p in pairs for c in conditions]
    targets = tokenize_rows(lm.tokenizer, [p.target_text for p in pairs])
    sources = tokenize_rows(lm.tokenizer, [p.source_text for p in pairs])
    ids = {p.pair_id: (tuple(t), tuple(s)) for p, t, s in zip(pairs, targets, sources, strict=True)}
    patch_rows = [_patch_row(ids[p.pair_id], c, late) for p, c in rows_meta]
    points = [address(early, "v"), address(late, "v")]
    starts = list(range(0, len(patch_rows), max_batch_rows))

    def generate_chunk(start: int) -> pd.DataFrame:
        chunk = patch_rows[start : start + max_batch_rows]
        result = patched_generate(
            lm.model, lm.adapter, chunk, sampling, points, pad_id_of(lm.tokenizer), lm.tokenizer
        )
        measures = _measure(result, early, late, window, pr_mode)
        return pd.DataFrame(
            [
                _grid_record(*rows_meta[start + offset], measure)
                for offset, measure in enumerate(measures)
            ]
        )

    table = run_units(
        run,
        starts,
        generate_chunk,
        key=lambda start: f"generation-{start // max_batch_rows:05d}",
        label="generating",
        weight=lambda start: len(patch_rows[start : start + max_batch_rows]),
    )
    scores = score_texts(table["text"].tolist(), semantic=semantic)
    for column in ("score", "label", "lexical_rate", "degenerate", "scorer_version"):
        table[column] = scores[column].to_numpy()
    return table


def _grid_record(pair: Pair, cond: Condition, measure: dict) -> dict:
    """One row of the grid: the pair, the condition and the measured values."""
    return {
        "pair_id": pair.pair_id,
        "target_id": pair.target_id,
        "source_id": pair.source_id,
        "condition": cond.name,
        "kind": cond.kind,
        "range_label": cond.range_label,
        "layers": _range_text(cond.layers),
        "alpha": cond.alpha if cond.kind == "kv" else math.nan,
        **measure,
    }


def _patch_row(ids: tuple[tuple[int, ...], tuple[int, ...]], c: Condition, late: int) -> PatchRow:
    target, source = ids
    if c.kind == NATURAL_TARGET:
        return PatchRow(target)
    if c.kind == NATURAL_SOURCE:
        return PatchRow(source)
    if c.kind == V_PATCH:
        return PatchRow(target, source, (), 0.0, v_patch_layer=late)
    return PatchRow(target, source, tuple(c.layers), float(c.alpha))


def _measure(result: GenerationResult, early: int, late: int, window: int, mode: str):
    e, lt = address(early, "v"), address(late, "v")
    gen_early = window_pr(result.generated_window(e, window), mode)  # (B,)
    gen_late = window_pr(result.generated_window(lt, window), mode)  # (B,)
    prompt_rv = r_v(
        window_pr(result.prompt_window(lt, window), mode),
        window_pr(result.prompt_window(e, window), mode),
    )  # (B,)
    gen_rv = r_v(gen_late, gen_early)  # (B,)
    texts = result.texts or [" ".join(map(str, row.tolist())) for row in result.new_tokens]
    return [
        {
            "r_v_generated": float(gen_rv[i]),
            "pr_early_generated": float(gen_early[i]),
            "pr_late_generated": float(gen_late[i]),
            "r_v_prompt": float(prompt_rv[i]),
            "n_generated": int(result.new_tokens.shape[1]),
            "text": texts[i],
        }
        for i in range(len(texts))
    ]


def _range_text(layers: Sequence[int]) -> str:
    if not layers:
        return ""
    layers = sorted(layers)
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return ",".join(map(str, layers))


METRICS = ("r_v_generated", "score")
# The transfer % columns of transfer_table as the summaries show them.
TRANSFER_COLUMNS = (
    "transfer_pct",
    "transfer_ci_low",
    "transfer_ci_high",
    "transfer_undefined_share",
    "transfer_undefined",
    "transfer_ci_note",
)


def transfer_table(grid: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Mean of each metric per condition and transfer % relative to the natural pair.

    One row per (condition, metric): n, mean, natural target/source means, gap, noise (CI
    half-width of the mean paired gap), transfer_pct and its undefined reason, and its
    95 % cluster bootstrap CI over pairs (:func:`transfer_bootstrap`: transfer_ci_low,
    transfer_ci_high, transfer_undefined_share = the share of draws in which it was
    undefined, transfer_ci_note = why the CI is not given). All conditions and both metrics
    use the same draws of pairs (same seed, pairs in pair_id order).
    """
    rows = []
    for metric in METRICS:
        wide = grid.pivot_table(index="pair_id", columns="condition", values=metric, dropna=False)
        if not {NATURAL_TARGET, NATURAL_SOURCE} <= set(wide.columns):
            raise ConfigError("transfer % needs the natural_target and natural_source conditions")
        target = wide[NATURAL_TARGET].to_numpy(dtype=float)
        source = wide[NATURAL_SOURCE].to_numpy(dtype=float)
        noise = float(noise_floor(source - target, n_boot=n_boot, seed=seed))
        threshold = noise if math.isfinite(noise) else 0.0
        mean_t, mean_s = finite_mean(target), finite_mean(source)
        meta = grid.drop_duplicates("condition").set_index("condition")
        for cond in wide.columns:
            values = wide[cond].to_numpy(dtype=float)
            mean = finite_mean(values)
            pct, reason = transfer_percent(mean, mean_t, mean_s, threshold)
            interval = transfer_bootstrap(target, source, values, threshold, n_boot, seed)
            rows.append(
                {
                    "condition": cond,
                    "kind": meta.loc[cond, "kind"],
                    "range_label": meta.loc[cond, "range_label"],
                    "layers": meta.loc[cond, "layers"],
                    "alpha": meta.loc[cond, "alpha"],
                    "metric": metric,
                    "n": int(np.isfinite(values).sum()),
                    "mean": mean,
                    "sd": float(np.nanstd(values, ddof=1)) if len(values) > 1 else math.nan,
                    "natural_target": mean_t,
                    "natural_source": mean_s,
                    "gap": mean_s - mean_t,
                    "noise": noise,
                    "transfer_pct": pct,
                    "transfer_undefined": reason or "",
                    "transfer_ci_low": interval.low,
                    "transfer_ci_high": interval.high,
                    "transfer_undefined_share": interval.undefined_share,
                    "transfer_ci_note": interval.note,
                }
            )
    return pd.DataFrame(rows)


def correlation_table(
    grid: pd.DataFrame,
    kinds: Sequence[str] = ("natural_target", "natural_source", "kv"),
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Pearson and Spearman r between R_V (generated) and behaviour score over the rows of
    the given condition kinds. A pair contributes several rows (one per condition), so the
    CI is a cluster bootstrap over pairs and p a block permutation of pairs
    (:func:`~rloop.metrics.contrasts.cluster_correlation`); ``naive_p`` treats rows as
    independent and is shown for comparison only."""
    rows = grid[grid["kind"].isin(kinds)]
    out = []
    for method in ("pearson", "spearman"):
        c = cluster_correlation(
            rows["r_v_generated"].to_numpy(float),
            rows["score"].to_numpy(float),
            rows["pair_id"].to_numpy(),
            method,
            n_boot=n_boot,
            n_perm=n_boot,
            seed=seed,
        )
        out.append({"x": "r_v_generated", "y": "score", **c.to_dict()})
    return pd.DataFrame(out)


def dose_correlations(
    rows: pd.DataFrame, metrics: Sequence[str], cluster: str, n_boot: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """Spearman correlation of ``alpha`` with each metric over ``rows``, where every cluster
    (a pair, a prompt: column ``cluster``) is run at every alpha: the CI is a cluster
    bootstrap, the p a permutation of alpha within each cluster (null "within")."""
    out = []
    for metric in metrics:
        c = cluster_correlation(
            rows["alpha"].to_numpy(float),
            rows[metric].to_numpy(float),
            rows[cluster].to_numpy(),
            "spearman",
            null=NULL_WITHIN,
            n_boot=n_boot,
            n_perm=n_boot,
            seed=seed,
        )
        out.append({"x": "alpha", "y": metric, **c.to_dict()})
    return pd.DataFrame(out)


def dose_response_table(grid: pd.DataFrame, range_label: str, n_boot: int = 2000, seed: int = 0):
    """Spearman correlation of alpha with behaviour and with R_V over the alpha grid rows of
    one layer range, pairs as clusters."""
    rows = grid[(grid["kind"] == "kv") & (grid["range_label"] == range_label)]
    return dose_correlations(rows, METRICS, "pair_id", n_boot, seed)


def plot_dose_response(grid: pd.DataFrame, range_label: str, path) -> object:
    """Mean R_V (generated) and behaviour score against alpha, natural levels as lines."""

    rows = grid[(grid["kind"] == "kv") & (grid["range_label"] == range_label)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in zip(
        axes, METRICS, ("R_V (last W generated)", "behaviour score"), strict=True
    ):
        stats = rows.groupby("alpha")[metric].agg(["mean", "sem"]).reset_index()
        ax.errorbar(stats["alpha"], stats["mean"], yerr=stats["sem"], marker="o", capsize=3)
        for kind, colour in ((NATURAL_TARGET, "tab:blue"), (NATURAL_SOURCE, "tab:red")):
            level = grid.loc[grid["kind"] == kind, metric].mean()
            ax.axhline(level, color=colour, ls="--", lw=1, label=kind)
        ax.set_xlabel(f"alpha (KV mixed on layers {range_label})")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    return _save(fig, path)


def transfer_plot_notes(transfer: pd.DataFrame) -> list[str]:
    """One line per metric whose transfer % is undefined for every plotted condition (the
    bars would be empty), with the reasons; empty when every metric has a value to show."""
    frame = transfer[~transfer["kind"].isin([NATURAL_TARGET, NATURAL_SOURCE])]
    notes = []
    for metric in METRICS:
        sub = frame[frame["metric"] == metric]
        if sub.empty or np.isfinite(sub["transfer_pct"].to_numpy(dtype=float)).any():
            continue
        reasons = sorted({r for r in sub["transfer_undefined"] if isinstance(r, str) and r})
        why = "; ".join(reasons) if reasons else "no finite value"
        notes.append(f"{metric}: transfer % undefined for every condition ({why})")
    return notes


def plot_transfer(transfer: pd.DataFrame, path) -> object:
    """Transfer % per condition, R_V and behaviour side by side, with the cluster bootstrap
    CI as error bars where it is given; an undefined transfer % is marked "n/a" at 0, and a
    metric undefined for every condition gets a note on the plot instead of empty bars."""

    frame = transfer[~transfer["kind"].isin([NATURAL_TARGET, NATURAL_SOURCE])]
    conditions = list(dict.fromkeys(frame["condition"]))
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(conditions)), 4))
    width = 0.4
    notes = transfer_plot_notes(transfer)
    for k, metric in enumerate(METRICS):
        sub = frame[frame["metric"] == metric].set_index("condition").reindex(conditions)
        values = sub["transfer_pct"].to_numpy(dtype=float)  # (C,)
        if not np.isfinite(values).any():
            continue
        x = np.arange(len(conditions)) + (k - 0.5) * width  # (C,)
        ax.bar(x, values, width, label=metric)
        if "transfer_ci_low" in sub:
            low = sub["transfer_ci_low"].to_numpy(dtype=float)
            high = sub["transfer_ci_high"].to_numpy(dtype=float)
            shown = np.isfinite(low) & np.isfinite(high) & np.isfinite(values)
            ax.vlines(x[shown], low[shown], high[shown], color="black", lw=1)
        for position in x[~np.isfinite(values)]:
            ax.text(position, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(range(len(conditions)), conditions, rotation=45, ha="right")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel("transfer % toward the source (95 % CI over pairs)")
    if notes:
        ax.text(0.5, 0.5, "\n".join(notes), transform=ax.transAxes, ha="center", va="center",
                fontsize=8, wrap=True)  # fmt: skip
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return _save(fig, path)


EXPERIMENT = "kv-patch"


@dataclass
class KVPatchConfig(GenerationSettings):
    """Layer-range KV patching and causal loop closure over (baseline, recursive) pairs.

    ranges: layer ranges like "15-29", "25", "23-27"; empty = the second half of the layers.
    Every range is run at every alpha; natural target/source and V-patching rows are added.
    """

    n_pairs: int = 10
    ranges: list[str] | None = None
    alphas: list[float] | None = None
    max_batch_rows: int = 128
    semantic: str = "auto"


def parse_range(text: str, n_layers: int) -> tuple[int, ...]:
    """'15-29' -> (15, ..., 29); '27' -> (27,); checked against the model's layers."""
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-"))
            layers = tuple(range(lo, hi + 1))
        else:
            layers = (int(text),)
    except ValueError:
        raise ConfigError(f"cannot read layer range {text!r}: write it like 15-29 or 27") from None
    if not layers:
        raise ConfigError(f"layer range {text!r} is empty: write FIRST-LAST with FIRST <= LAST")
    return check_layer_range(n_layers, layers)


def _kv_markdown(lm, config, ranges, alphas, sampling, early, late, transfer, corr, doses) -> str:
    """summary.md of a kv-patch run: setup, transfer table, R_V vs behaviour, dose-response."""
    cols = ["condition", "metric", "n", "mean", "gap", "noise", *TRANSFER_COLUMNS]
    summary = [
        "# KV-cache patching",
        "",
        f"- model: {lm.name}; R_V = PR(V L{late}) / PR(V L{early}) over the last "
        f"{config.window} generated tokens; {config.n_pairs} pairs "
        f"({config.baseline_group} target <- {config.recursive_group} source)",
        f"- ranges: {', '.join(ranges)}; alphas: {alphas}; sampling: {sampling.to_dict()}",
        "- alignment: memories right-aligned on their last token, target mask "
        "(see rloop.interventions.kv_cache)",
        "",
        "## Transfer",
        "",
        "Transfer % with its 95 % cluster bootstrap CI over pairs; the CI is not given when "
        "the transfer % is undefined in more than 5 % of the bootstrap draws "
        "(transfer_undefined_share).",
        "",
        markdown_table(transfer[cols]),
        "",
        "## R_V vs behaviour",
        "",
        markdown_table(corr[["method", "r", "p", "ci_low", "ci_high", "n"]]),
        "",
    ]
    if not doses.empty:
        summary += [
            "## Dose-response (Spearman with alpha)",
            "",
            markdown_table(doses[["range", "y", "r", "p", "ci_low", "ci_high"]]),
            "",
        ]
    return "\n".join(summary) + "\n"


def run_kv_patching(config: KVPatchConfig, out=None, force: bool = False, lm=None):
    """Full pipeline with a run record; every check happens before anything is written."""

    check_settings(config)
    sampling = config.sampling()
    if config.max_new_tokens < config.window:
        raise ConfigError(
            f"max_new_tokens {config.max_new_tokens} is below the {config.window}-token window"
        )
    if config.n_pairs < MIN_GROUP_SIZE:
        raise ConfigError(
            f"n_pairs must be at least {MIN_GROUP_SIZE} (transfer % needs the spread of the "
            f"natural gap over pairs), got {config.n_pairs}"
        )
    alphas = [check_alpha(a) for a in (config.alphas or DEFAULT_ALPHAS)]
    check_mode_for_point("v", [config.pr_mode])
    groups = [config.recursive_group, config.baseline_group]
    prompt_set = load_prompt_set(config.prompts, config.bank_version, groups)
    check_groups(prompt_set, contrasted_groups(config))
    pairs = make_pairs(prompt_set, config.baseline_group, config.recursive_group, config.n_pairs)
    lm = load(config, lm, verify=False)
    n_layers = lm.adapter.n_layers
    early, late, _ = resolve_layers(lm.adapter, config.layers)
    ranges = {r: parse_range(r, n_layers) for r in (config.ranges or [])}
    if not ranges:
        half = default_patch_layers(n_layers)
        ranges = {_range_text(half): half}
    check_window(prompt_set, lm.tokenizer, config.window)
    check_context(prompt_set, lm, config.max_new_tokens)
    verify_if_asked(config, lm, prompt_set, [early, late])
    conditions = [Condition(NATURAL_TARGET), Condition(NATURAL_SOURCE), Condition(V_PATCH)]
    conditions += [
        Condition("kv", layers, a, label) for label, layers in ranges.items() for a in alphas
    ]

    def body(run) -> dict:
        run.set_model(model_manifest(lm))
        run.set_prompts(prompts_manifest(prompt_set, lm.tokenizer))
        grid = run_config_grid(lm, pairs, conditions, config, early, late, run=run)
        transfer = transfer_table(grid, config.n_boot, config.seed)
        corr = correlation_table(grid, n_boot=config.n_boot, seed=config.seed)
        doses = pd.concat(
            [
                dose_response_table(grid, label, config.n_boot, config.seed).assign(range=label)
                for label in ranges
            ]
            if len(alphas) > 1
            else [pd.DataFrame()],
            ignore_index=True,
        )
        run.write_table("generations", grid)
        run.write_table("transfer", transfer)
        run.write_table("correlations", corr)
        if not doses.empty:
            run.write_table("dose_response", doses)
        plot_transfer(transfer, run.plot_path("transfer"))
        for label in ranges:
            if len(alphas) > 1:
                plot_dose_response(grid, label, run.plot_path(f"dose_response_{label}"))
        run.write_summary(
            _kv_markdown(lm, config, ranges, alphas, sampling, early, late, transfer, corr, doses)
        )
        run.update_manifest(
            layers={
                "early": early,
                "late": late,
                "kv_ranges": {k: list(v) for k, v in ranges.items()},
            },
            sampling=sampling.to_dict(),
        )
        head = {}
        for row in transfer[transfer.kind == "kv"].itertuples():
            head[f"{row.condition}:{row.metric}:transfer_pct"] = row.transfer_pct
        return head

    identity = run_identity(config, layers=[early, late])
    return execute(EXPERIMENT, identity, lm.name, out, body, force=force).as_tuple()
