"""Steering along the contracted direction (``rloop steer``): is the direction sufficient?

A unit direction u in the residual stream at one layer is added, scaled, to every position of
the prompt and of every generated token of baseline prompts (the *steered group*, default the
baseline group):

    resid(layer) <- resid(layer) + alpha * norm_ref * u

- u: ``mean-diff`` = the normalised difference of the mean residual of the recursive and the
  baseline (or twin) group over each prompt's last W real tokens; ``subspace`` = the top
  (uncentred) direction number ``direction_index`` of the recursive group's windows, as
  ``rloop subspace`` finds it, signed so that the recursive mean lies on its positive side.
- norm_ref: the median L2 norm of a residual token at that hook point over the same windows, so
  alpha is in units of the typical residual norm there.
- Control: random unit directions (``n_random`` seeds) pushed with the same norm at every alpha,
  so an effect of u is compared with "any push of that size".
- Reference: the recursive prompts, unsteered.

Per row (prompt x condition x alpha), all rows generated together in as few batched generate
calls as the memory budget allows (:mod:`rloop.capture.generation`): R_V on the prompt window
(last W real prompt tokens, steered), R_V on the last W generated tokens, and the behaviour
score of the generated text. Dose-response per condition, Spearman of alpha against each
metric (bootstrap CI), and the paired difference between u and the random directions.

Causality: steering the residual after layer l changes V only at layers above l (at and above
l for ``resid_pre``); a steering point that cannot reach the late R_V layer is refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from rloop.behavior import score_texts
from rloop.capture.generation import (
    GenerationResult,
    SamplingConfig,
    generate,
    pad_id_of,
    tokenize_rows,
)
from rloop.capture.trace import Trace, address
from rloop.errors import ConfigError, PromptError
from rloop.experiments.runner import execute, record_inputs, run_identity, run_units, token_budget
from rloop.experiments.settings import GenerationSettings, prepare
from rloop.experiments.subspace import capture_windows
from rloop.interventions.engine import check_mode_for_point, windows_pr, windows_r_v
from rloop.metrics.stats import correlation_with_ci, paired_change
from rloop.metrics.subspace import top_directions
from rloop.runs.markdown import markdown_table, model_line
from rloop.runs.plots import _save, plt

EXPERIMENT = "steer"
STEER_POINTS = ("resid_pre", "resid_post")
DIRECTIONS = ("mean-diff", "subspace")
DEFAULT_ALPHAS = (0.0, 0.125, 0.25, 0.5, 1.0)
NONE = "none"  # the steered group, unsteered (alpha 0)
DIRECTION = "direction"  # the steered group pushed along u
RANDOM = "random"  # the steered group pushed along a random direction (condition random-<s>)
RECURSIVE = "recursive"  # the recursive group, unsteered (reference level)
METRICS = ("r_v_prompt", "r_v_generated", "score")
MAX_ROWS_PER_CALL = 256
SEMANTIC_CHOICES = ("auto", "off", "none")  # off / none: lexical behaviour components only


@dataclass
class SteerConfig(GenerationSettings):
    """Settings of ``rloop steer`` (defaults match the CLI). ``layers`` are the EARLY,LATE
    layers of R_V; ``layer`` is where the residual is steered (None: midway between them)."""

    layer: int | None = None
    point: str = "resid_post"
    direction: str = "mean-diff"
    direction_index: int = 1
    alphas: list[float] | None = None  # None = DEFAULT_ALPHAS; units of the typical norm
    steer_group: str | None = None  # None = baseline_group
    n_random: int = 3
    max_prompts: int | None = 10
    max_new_tokens: int = 32
    batch_size: int = 16  # prompts per forward when the direction is estimated
    max_batch_rows: int | None = None  # rows per generate call; None = memory budget
    semantic: str = "auto"


@dataclass(frozen=True)
class SteerRow:
    """One generated row: a prompt, a condition and the vector added at the steering point."""

    prompt_id: str
    group: str
    condition: str
    kind: str
    alpha: float
    tokens: tuple[int, ...]
    vector: torch.Tensor | None  # (d_model,) or None (unsteered)


def check_alphas(alphas: Sequence[float] | None) -> list[float]:
    """The alpha grid (DEFAULT_ALPHAS when None), checked: non-empty, finite."""
    if alphas is None:
        return list(DEFAULT_ALPHAS)
    values = [float(a) for a in alphas]
    if not values:
        raise ConfigError("the alpha grid is empty: pass at least one value, e.g. --alphas 0,0.5,1")
    bad = [a for a in values if not math.isfinite(a)]
    if bad:
        raise ConfigError(f"alphas must be finite numbers, got {bad}")
    return sorted(set(values))


def _check(config: SteerConfig) -> list[float]:
    config.sampling()
    alphas = check_alphas(config.alphas)
    if config.point not in STEER_POINTS:
        raise ConfigError(
            f"steering point {config.point!r} is not a residual-stream point: use "
            f"{' or '.join(STEER_POINTS)}"
        )
    if config.direction not in DIRECTIONS:
        raise ConfigError(
            f"unknown direction {config.direction!r}: choose one of {', '.join(DIRECTIONS)}"
        )
    if config.direction_index < 1:
        raise ConfigError(f"--direction-index must be at least 1, got {config.direction_index}")
    if config.n_random < 0:
        raise ConfigError(f"--n-random must be 0 or more, got {config.n_random}")
    if config.max_new_tokens < config.window:
        raise ConfigError(
            f"--max-new-tokens {config.max_new_tokens} is below the {config.window}-token "
            "window: R_V of the generated tokens needs at least W of them"
        )
    if config.max_batch_rows is not None and config.max_batch_rows < 1:
        raise ConfigError(f"--max-batch-rows must be at least 1, got {config.max_batch_rows}")
    if config.recursive_group == config.baseline_group:
        raise ConfigError("--recursive-group and --baseline-group must differ")
    if config.semantic not in SEMANTIC_CHOICES:
        raise ConfigError(f"--semantic must be auto or off, got {config.semantic!r}")
    check_mode_for_point("v", [config.pr_mode])
    return alphas


def steering_layer(config: SteerConfig, early: int, late: int) -> tuple[int, str]:
    """(layer, rule): the steered layer and how it was chosen."""
    if config.layer is not None:
        return config.layer, "explicit"
    return (early + late) // 2, f"midway between the R_V layers {early} and {late}"


def check_reaches_late(layer: int, point: str, late: int) -> None:
    """Refuse a steering point that cannot change V at the late R_V layer (SCIENCE.md §3)."""
    first_changed = layer + 1 if point == "resid_post" else layer  # first layer whose V moves
    if first_changed > late:
        raise ConfigError(
            f"steering {point} at layer {layer} cannot change V at the late R_V layer {late}: "
            f"steer below it (--layer {late - 1 if point == 'resid_post' else late} or lower)"
        )


# ----------------------------------------------------------------------------- steered generation
def steering_edit(vectors: torch.Tensor):
    """Trace edit adding row b's vector to every position of row b: value (B, T, d) + (B, d)."""

    def add(value: torch.Tensor) -> torch.Tensor:
        if value.shape[0] != vectors.shape[0]:
            raise ConfigError(
                f"steering vectors for {vectors.shape[0]} rows met a batch of {value.shape[0]}"
            )
        return value + vectors[:, None, :].to(device=value.device, dtype=value.dtype)

    return add


def steered_generate(
    lm,
    token_rows: Sequence[Sequence[int]],
    vectors: torch.Tensor,
    layer: int,
    point: str,
    sampling: SamplingConfig,
    capture: Sequence[str] = (),
) -> GenerationResult:
    """Batched generation with ``vectors[b]`` (B, d_model) added to ``point`` at ``layer`` of
    row b at every prompt position and every decoding step; captures ``capture`` addresses."""
    if vectors.shape != (len(token_rows), lm.adapter.d_model):
        raise ConfigError(
            f"steering vectors must be ({len(token_rows)}, {lm.adapter.d_model}), got "
            f"{tuple(vectors.shape)}"
        )
    edits = {address(layer, point): steering_edit(vectors.to(lm.device))}
    with Trace(lm.model, lm.adapter, edits=edits):
        return generate(
            lm.model,
            lm.adapter,
            token_rows,
            sampling,
            capture,
            pad_id_of(lm.tokenizer),
            lm.tokenizer,
        )


# ----------------------------------------------------------------------------- the direction
@dataclass(frozen=True)
class Direction:
    """The steering direction u (d_model,) float64 unit, and the scale of alpha."""

    u: torch.Tensor
    norm_ref: float
    mean_diff_norm: float  # ||mean(rec) - mean(base)|| over the windows
    cos_with_mean_diff: float  # cos(u, mean difference); 1 for mean-diff


def steering_direction(
    rec: torch.Tensor, base: torch.Tensor, kind: str, index: int = 1
) -> Direction:
    """u and norm_ref from windows rec (n_r, W, d) and base (n_b, W, d) at the steered point."""
    rec, base = rec.to(torch.float64), base.to(torch.float64)
    diff = rec.mean(dim=(0, 1)) - base.mean(dim=(0, 1))  # (d,)
    diff_norm = float(diff.norm())
    if not diff_norm > 0:
        raise ConfigError("the recursive and baseline windows have the same mean: no direction")
    if kind == "mean-diff":
        u = diff / diff_norm  # (d,)
    else:
        u = top_directions(rec, index).directions[index - 1]  # (d,) unit
        if float(u @ diff) < 0:
            u = -u  # +alpha pushes toward the recursive mean
    tokens = torch.cat([rec, base]).flatten(0, 1)  # (N, d)
    norm_ref = float(tokens.norm(dim=-1).median())
    return Direction(u, norm_ref, diff_norm, float(u @ diff) / diff_norm)


def random_directions(d: int, n: int, seed: int) -> list[torch.Tensor]:
    """``n`` seeded random unit directions (d,) float64 (Gaussian, normalised)."""
    out = []
    for s in range(n):
        x = np.random.default_rng([seed, s]).standard_normal(d)
        out.append(torch.from_numpy(x / np.linalg.norm(x)))
    return out


def plan_rows(
    steered: Sequence,
    recursive: Sequence,
    tokens: dict[str, tuple[int, ...]],
    alphas,
    direction,
    randoms: Sequence[torch.Tensor],
) -> list[SteerRow]:
    """Every generated row: steered prompts x (unsteered, u and each random direction at each
    nonzero alpha), and the recursive prompts unsteered."""
    scale = direction.norm_ref
    rows = []
    for p in steered:
        rows.append(SteerRow(p.id, p.group, NONE, NONE, 0.0, tokens[p.id], None))
        for alpha in (a for a in alphas if a != 0):
            vec = alpha * scale * direction.u
            rows.append(SteerRow(p.id, p.group, DIRECTION, DIRECTION, alpha, tokens[p.id], vec))
            for s, r in enumerate(randoms):
                vec = alpha * scale * r
                rows.append(
                    SteerRow(p.id, p.group, f"{RANDOM}-{s}", RANDOM, alpha, tokens[p.id], vec)
                )
    for p in recursive:
        rows.append(SteerRow(p.id, p.group, RECURSIVE, RECURSIVE, 0.0, tokens[p.id], None))
    return rows


def _measure_chunk(lm, rows: Sequence[SteerRow], layer, point, sampling, early, late, config):
    """Generate ``rows`` in one call and measure them: one tidy record each."""
    d = lm.adapter.d_model
    vectors = torch.stack(
        [r.vector if r.vector is not None else torch.zeros(d, dtype=torch.float64) for r in rows]
    )  # (B, d)
    e, lt = address(early, "v"), address(late, "v")
    result = steered_generate(
        lm, [r.tokens for r in rows], vectors.float(), layer, point, sampling, [e, lt]
    )
    mode, window = config.pr_mode, config.window
    prompt_rv = windows_r_v(result.prompt_window(e, window), result.prompt_window(lt, window), mode)
    gen_early, gen_late = result.generated_window(e, window), result.generated_window(lt, window)
    gen_rv = windows_r_v(gen_early, gen_late, mode)  # (B,)
    pr_late = windows_pr(gen_late, mode)[0]  # (B,)
    texts = result.texts or [" ".join(map(str, t.tolist())) for t in result.new_tokens]
    return pd.DataFrame(
        {
            "prompt_id": [r.prompt_id for r in rows],
            "group": [r.group for r in rows],
            "condition": [r.condition for r in rows],
            "kind": [r.kind for r in rows],
            "alpha": [r.alpha for r in rows],
            "push_norm": [float(v.norm()) for v in vectors],
            "r_v_prompt": prompt_rv.numpy(),
            "r_v_generated": gen_rv.numpy(),
            "pr_late_generated": pr_late.numpy(),
            "n_generated": int(result.new_tokens.shape[1]),
            "new_tokens": [" ".join(map(str, t.tolist())) for t in result.new_tokens],
            "text": texts,
        }
    )


def rows_per_call(lm, rows: Sequence[SteerRow], config: SteerConfig) -> int:
    """Rows per generate call: --max-batch-rows, or as many as the token budget holds."""
    if config.max_batch_rows is not None:
        return config.max_batch_rows
    width = max(len(r.tokens) for r in rows) + config.max_new_tokens + 1
    return max(1, min(MAX_ROWS_PER_CALL, token_budget(lm, width) // width))


# ----------------------------------------------------------------------------- statistics
def dose_table(grid: pd.DataFrame) -> pd.DataFrame:
    """Mean, sd, sem and n of each metric per (kind, alpha); the unsteered rows count as alpha
    0 of both the direction and the random curves."""
    none = grid[grid.kind == NONE]
    frames = [
        pd.concat([none.assign(kind=kind), grid[grid.kind == kind]])
        for kind in (DIRECTION, RANDOM)
        if (grid.kind == kind).any() or kind == DIRECTION
    ]
    frames.append(grid[grid.kind == RECURSIVE])
    stacked = pd.concat(frames, ignore_index=True)
    out = []
    for metric in METRICS:
        stats = stacked.groupby(["kind", "alpha"])[metric].agg(
            n="count", mean="mean", sd="std", sem="sem"
        )
        out.append(stats.reset_index().assign(metric=metric))
    return pd.concat(out, ignore_index=True)[["metric", "kind", "alpha", "n", "mean", "sd", "sem"]]


def spearman_table(grid: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """Spearman r (bootstrap CI over rows) of alpha against each metric, for u and for the
    random directions (each seed and pooled); the unsteered rows enter as alpha 0."""
    none = grid[grid.kind == NONE]
    series = {DIRECTION: grid[grid.kind == DIRECTION]}
    conditions = sorted(c for c in grid.condition.unique() if c.startswith(f"{RANDOM}-"))
    if conditions:
        series[f"{RANDOM} (pooled)"] = grid[grid.kind == RANDOM]
    series.update({c: grid[grid.condition == c] for c in conditions})
    out = []
    for name, rows in series.items():
        rows = pd.concat([none, rows])
        for metric in METRICS:
            c = correlation_with_ci(
                rows["alpha"].to_numpy(float),
                rows[metric].to_numpy(float),
                "spearman",
                n_boot=n_boot,
                seed=seed,
            )
            out.append({"series": name, "y": metric, **c.to_dict()})
    return pd.DataFrame(out)


def versus_random_table(grid: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """Per nonzero alpha and metric: the mean change from the unsteered row along u and along
    the random directions (mean over seeds per prompt), and u minus random with a paired
    bootstrap CI over prompts."""
    if not (grid.kind == RANDOM).any():
        return pd.DataFrame()
    none = grid[grid.kind == NONE].set_index("prompt_id")
    out = []
    for alpha in sorted(grid.loc[grid.kind == DIRECTION, "alpha"].unique()):
        at = grid[grid.alpha == alpha]
        for metric in METRICS:
            steer = at[at.kind == DIRECTION].set_index("prompt_id")[metric]
            rand = at[at.kind == RANDOM].groupby("prompt_id")[metric].mean()
            ids = steer.index.intersection(rand.index)
            base = none.loc[ids, metric].to_numpy(float)
            change = paired_change(rand.loc[ids], steer.loc[ids], n_boot=n_boot, seed=seed)
            out.append(
                {
                    "alpha": alpha,
                    "metric": metric,
                    "n": change["n"],
                    "direction_change": float(np.nanmean(steer.loc[ids].to_numpy(float) - base)),
                    "random_change": float(np.nanmean(rand.loc[ids].to_numpy(float) - base)),
                    "direction_minus_random": change["mean_change"],
                    "ci_low": change["ci_low"],
                    "ci_high": change["ci_high"],
                }
            )
    return pd.DataFrame(out)


# ----------------------------------------------------------------------------- the run
def _groups(prepared, config: SteerConfig) -> tuple[list, list, list]:
    prompts = list(prepared.prompts)
    steer_group = config.steer_group or config.baseline_group
    rec = [p for p in prompts if p.group == config.recursive_group]
    base = [p for p in prompts if p.group == config.baseline_group]
    steered = [p for p in prompts if p.group == steer_group]
    for name, found in (
        (config.recursive_group, rec),
        (config.baseline_group, base),
        (steer_group, steered),
    ):
        if len(found) < 2:
            raise PromptError(f"group {name} has {len(found)} prompts; steering needs at least 2")
    return rec, base, steered


def run_steer(config: SteerConfig, out=None, force: bool = False, lm=None):
    """``rloop steer``: returns (run_dir, already_complete, headline)."""
    alphas = _check(config)
    groups = [config.recursive_group, config.baseline_group]
    if config.steer_group and config.steer_group not in groups:
        groups.append(config.steer_group)
    prepared = prepare(config, groups, lm, config.layers, "--layers")
    lm = prepared.lm
    early, late = prepared.early, prepared.late
    layer, rule = steering_layer(config, early, late)
    lm.adapter.check_layer(layer)
    check_reaches_late(layer, config.point, late)
    rec, base, steered = _groups(prepared, config)
    sampling = config.sampling()

    def body(run) -> dict:
        record_inputs(run, prepared, sampling=sampling.to_dict())
        windows = capture_windows(
            lm, rec + base, [layer], config.point, config.window, config.batch_size
        )[layer]  # (n_rec + n_base, W, d)
        direction = steering_direction(
            windows[: len(rec)], windows[len(rec) :], config.direction, config.direction_index
        )
        randoms = random_directions(lm.adapter.d_model, config.n_random, config.seed)
        texts = [p.text for p in steered + rec]
        tokens = dict(
            zip(
                [p.id for p in steered + rec],
                map(tuple, tokenize_rows(lm.tokenizer, texts)),
                strict=True,
            )
        )
        rows = plan_rows(steered, rec, tokens, alphas, direction, randoms)
        n_calls = math.ceil(len(rows) / rows_per_call(lm, rows, config))
        per_call = math.ceil(len(rows) / n_calls)  # balanced calls, each within the budget
        chunks = [rows[i : i + per_call] for i in range(0, len(rows), per_call)]
        grid = run_units(
            run,
            list(range(len(chunks))),
            lambda i: _measure_chunk(
                lm, chunks[i], layer, config.point, sampling, early, late, config
            ),
            key=lambda i: f"chunk-{i:05d}",
            label="steered generation",
            weight=lambda i: len(chunks[i]),
        )
        semantic = "auto" if config.semantic == "auto" else None
        scores = score_texts(grid["text"].tolist(), semantic=semantic)
        for column in ("score", "label", "lexical_rate", "degenerate", "scorer_version"):
            grid[column] = scores[column].to_numpy()
        return _report(run, config, prepared, layer, rule, direction, grid, len(chunks))

    identity = run_identity(config, layers=[early, late])
    return execute(EXPERIMENT, identity, lm.name, out, body, force=force).as_tuple()


def _report(run, config, prepared, layer, rule, direction, grid, n_calls) -> dict:
    """Tables, plots, summary and manifest of a finished steer run; returns the headline."""
    doses = dose_table(grid)
    spearman = spearman_table(grid, config.n_boot, config.seed)
    versus = versus_random_table(grid, config.n_boot, config.seed)
    u = direction.u.numpy()
    run.write_table("generations", grid)
    run.write_table("dose_response", doses)
    run.write_table("spearman", spearman)
    if not versus.empty:
        run.write_table("versus_random", versus)
    run.write_table("direction", pd.DataFrame({"dim": np.arange(u.size), "u": u}))
    plot_dose_response(doses, run.plot_path("dose_response"), layer, config.point)
    steering = {
        "layer": layer,
        "point": config.point,
        "rule": rule,
        "direction": config.direction,
        "direction_index": config.direction_index,
        "norm_ref": direction.norm_ref,
        "mean_diff_norm": direction.mean_diff_norm,
        "cos_with_mean_diff": direction.cos_with_mean_diff,
        "n_random": config.n_random,
        "generate_calls": n_calls,
    }
    run.update_manifest(steering=steering)
    run.write_summary(_markdown(prepared, config, steering, doses, spearman, versus))
    head = {"layer": layer, "norm_ref": direction.norm_ref}
    for row in spearman[spearman.series.isin([DIRECTION, f"{RANDOM} (pooled)"])].itertuples():
        head[f"spearman:{row.series.split()[0]}:{row.y}"] = row.r
    return head


def plot_dose_response(doses: pd.DataFrame, path, layer: int, point: str):
    """Mean (+- s.e.) of each metric against alpha: u, random directions, recursive level."""
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4))
    labels = ("R_V (prompt window)", "R_V (last W generated)", "behaviour score")
    for ax, metric, label in zip(axes, METRICS, labels, strict=True):
        frame = doses[doses.metric == metric]
        for kind, colour in ((DIRECTION, "tab:red"), (RANDOM, "tab:grey")):
            curve = frame[frame.kind == kind].sort_values("alpha")
            if not curve.empty:
                ax.errorbar(
                    curve["alpha"],
                    curve["mean"],
                    yerr=curve["sem"],
                    marker="o",
                    capsize=3,
                    color=colour,
                    label="u" if kind == DIRECTION else "random directions",
                )
        level = frame.loc[frame.kind == RECURSIVE, "mean"]
        if not level.empty:
            ax.axhline(float(level.iloc[0]), color="tab:blue", ls="--", lw=1, label="recursive")
        ax.set_xlabel(f"alpha (x typical norm, {point} L{layer})")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _markdown(prepared, config, steering, doses, spearman, versus) -> str:
    order = {DIRECTION: 0, RANDOM: 1, RECURSIVE: 2}
    shown = doses.assign(_order=doses.kind.map(order)).sort_values(["metric", "_order", "alpha"])
    lines = [
        "# Steering along the contracted direction",
        "",
        f"- model: {model_line(prepared.lm)}",
        f"- R_V = PR(V L{prepared.late}) / PR(V L{prepared.early}) ({config.pr_mode}), window "
        f"{config.window}; {config.max_new_tokens} generated tokens, sampling "
        f"{config.sampling().to_dict()}",
        f"- steered: `{steering['point']}` at layer {steering['layer']} ({steering['rule']}), "
        f"every prompt position and every generated token; prompts of group "
        f"{config.steer_group or config.baseline_group}",
        f"- u: {config.direction}"
        + (f" (direction {config.direction_index})" if config.direction == "subspace" else "")
        + f" from {config.recursive_group} vs {config.baseline_group}, cos with the mean "
        f"difference {steering['cos_with_mean_diff']:.3f}; alpha in units of the median "
        f"residual norm {steering['norm_ref']:.3f}",
        f"- control: {config.n_random} random directions of the same norm at every alpha",
        "- u is estimated on the same prompts it is applied to (the baseline group); the random "
        "control and the dose-response, not the level at one alpha, carry the evidence",
        "",
        "## Dose-response (mean per alpha: u, random directions pooled over seeds, and the "
        "recursive group unsteered at alpha 0)",
        "",
        markdown_table(shown.drop(columns="_order")),
        "",
        "## Spearman of alpha with each metric",
        "",
        markdown_table(spearman[["series", "y", "r", "p", "ci_low", "ci_high", "n"]]),
        "",
    ]
    if not versus.empty:
        lines += [
            "## u against random directions of the same norm (paired over prompts)",
            "",
            markdown_table(versus),
            "",
        ]
    lines.append(
        "Files: `generations.*` (one row per prompt x condition x alpha), `dose_response.*`, "
        "`spearman.*`, `versus_random.*`, `direction.*`, `plots/dose_response.png`."
    )
    return "\n".join(lines) + "\n"
