"""Specification-curve analysis (Simonsohn, Simmons & Nelson 2020; SCIENCE.md §9).

A result that holds for one (layer pair, window, mode, hook point) and not for its
neighbours is fragile. The experiment measures every prompt under every specification and
passes the values as a matrix (n_prompts, n_specs), NaN where a prompt is not part of a
specification, with the group structure: ``labels`` (two independent groups, effect Hedges'
g) or ``pairs`` (recursive prompt and its twin, effect d_z of the paired differences).

:func:`specification_curve` returns every specification's effect, CI and p, the median
effect, the shares of specifications significant in each direction, and the joint test:
group labels are permuted (or pairs sign-flipped) **once per draw for all specifications
together**, so the null keeps the correlation between specifications, and the median effect
and the share significant are recomputed under every draw. Everything is vectorised over
specifications with matrix products, so thousands of specifications and permutations take
seconds. :func:`specification_joint_test` runs the same joint test on effects the caller
computed under its own permutations. :func:`effect_variance_by_factor` says which choice
moves the effect most.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.stats
from numpy.typing import ArrayLike
from scipy.special import gammaln

from rloop.errors import ConfigError
from rloop.metrics.stats import check_choice, check_ci, check_positive_int

SPEC_EFFECTS = ("hedges_g", "d_z")
DESIGN_UNPAIRED = "unpaired"
DESIGN_PAIRED = "paired"
REASON_NO_VALUES = "no finite values"

_PERM_CHUNK = 256  # permutations per matrix product


def _hedges_correction(df: np.ndarray) -> np.ndarray:
    """Exact J(df) = Gamma(df/2) / (sqrt(df/2) Gamma((df-1)/2)) elementwise; NaN for df < 2.
    Same as :func:`rloop.metrics.stats.hedges_correction`, for arrays."""
    df = np.asarray(df, dtype=np.float64)
    safe = np.where(df >= 2, df, 2.0)
    value = np.exp(gammaln(safe / 2) - gammaln((safe - 1) / 2)) / np.sqrt(safe / 2)
    return np.where(df >= 2, value, np.nan)


@dataclass(frozen=True)
class SpecificationCurve:
    """A specification curve and its joint test.

    ``specs``: one row per specification in input order (the caller's ``spec_table`` columns
    first, then) ``effect``, ``ci_low``, ``ci_high``, ``p``, ``n_target``, ``n_control``
    (pairs: both equal the number of usable pairs), ``estimable``, ``reason`` and
    ``curve_rank`` (0 = smallest effect among estimable specifications, -1 for the rest).
    Summaries are over the ``n_estimable`` estimable specifications only; the
    ``n_not_estimable`` others are counted and never enter a median.

    ``p_median``: (1 + #{|null median| >= |median|}) / (1 + n_perm). ``p_share_significant``:
    the same with the share of specifications significant in the more frequent direction,
    max(share positive, share negative), under each draw (two-sided, direction-free).
    ``null_medians`` (n_perm,) and ``null_share_significant`` (n_perm,) are the draws.
    """

    specs: pd.DataFrame
    effect: str
    design: str
    n_specs: int
    n_estimable: int
    n_not_estimable: int
    median_effect: float
    share_significant_positive: float
    share_significant_negative: float
    p_median: float
    p_share_significant: float
    null_medians: np.ndarray
    null_share_significant: np.ndarray
    alpha: float
    ci: float
    n_perm: int
    seed: int

    def summary(self) -> dict:
        """The scalar fields (no tables or arrays)."""
        skip = {"specs", "null_medians", "null_share_significant"}
        return {k: v for k, v in self.__dict__.items() if k not in skip}


@dataclass(frozen=True)
class _Moments:
    """What the effect of every specification needs, from one grouping of the rows."""

    effect: np.ndarray  # (P, S)
    t: np.ndarray  # (P, S)
    n_target: np.ndarray  # (P, S)
    n_control: np.ndarray  # (P, S)


def _unpaired_effects(
    labels: np.ndarray, values0: np.ndarray, squares: np.ndarray, present: np.ndarray,
    totals: tuple[np.ndarray, np.ndarray, np.ndarray], correction: np.ndarray,
) -> _Moments:  # fmt: skip
    """Hedges' g (target - control) and Student t of every spec for label rows (P, n)."""
    count, total, total_sq = totals  # (S,) each
    n1 = labels @ present  # (P, S)
    s1 = labels @ values0  # (P, S)
    q1 = labels @ squares  # (P, S)
    n2, s2, q2 = count - n1, total - s1, total_sq - q1  # (P, S)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean1, mean2 = s1 / n1, s2 / n2  # (P, S)
        within = (q1 - s1 * mean1) + (q2 - s2 * mean2)  # (P, S) pooled sum of squares
        pooled_var = np.maximum(within, 0.0) / (count - 2)  # (P, S)
        defined = (n1 >= 2) & (n2 >= 2) & (pooled_var > 1e-24)
        d = (mean1 - mean2) / np.sqrt(np.where(defined, pooled_var, 1.0))  # (P, S)
        t = d * np.sqrt(n1 * n2 / count)  # (P, S)
    d = np.where(defined, d, np.nan)
    return _Moments(d * correction, np.where(defined, t, np.nan), n1, n2)


def _paired_effects(
    signs: np.ndarray, diffs0: np.ndarray, count: np.ndarray, total_sq: np.ndarray
) -> _Moments:
    """d_z and paired t of every spec for sign rows (P, n) applied to the differences."""
    s = signs @ diffs0  # (P, S)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = s / count  # (P, S)
        var = np.maximum(total_sq - s * mean, 0.0) / (count - 1)  # (P, S)
        defined = (count >= 2) & (var > 1e-24 * total_sq / np.maximum(count, 1))
        d_z = mean / np.sqrt(np.where(defined, var, 1.0))  # (P, S)
    d_z = np.where(defined, d_z, np.nan)
    n = np.broadcast_to(count, d_z.shape)
    return _Moments(d_z, d_z * np.sqrt(count), n, n)


def _curve_summary(
    effects: np.ndarray, positive: np.ndarray, negative: np.ndarray, n_estimable: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(median effect, share significant positive, share significant negative) per row of
    effects (P, S) over estimable specs; a NaN effect under a draw is left out of that
    draw's median and counts as not significant."""
    with np.errstate(all="ignore"):
        all_nan = np.isnan(effects).all(axis=1)
        medians = np.full(effects.shape[0], np.nan)
        if (~all_nan).any():
            medians[~all_nan] = np.nanmedian(effects[~all_nan], axis=1)
    return medians, positive.sum(axis=1) / n_estimable, negative.sum(axis=1) / n_estimable


def _joint_p(observed: float, null: np.ndarray, absolute: bool) -> float:
    """(1 + #{null at least as extreme}) / (1 + n_draws); a NaN draw counts as extreme."""
    if not math.isfinite(observed):
        return math.nan
    tolerance = 1e-12 * max(1.0, abs(observed))
    compare = np.abs(null) if absolute else null
    target = abs(observed) if absolute else observed
    extreme = np.isnan(compare) | (compare >= target - tolerance)
    return float((1 + extreme.sum()) / (1 + null.size))


_SUMMARY_FIELDS = (
    "median_effect",
    "share_significant_positive",
    "share_significant_negative",
    "p_median",
    "p_share_significant",
)


def _joint_summary(
    median: np.ndarray,
    positive: np.ndarray,
    negative: np.ndarray,
    null_medians: np.ndarray,
    null_share: np.ndarray,
) -> dict[str, float]:
    """The summary fields (``_SUMMARY_FIELDS``) from the observed median and shares
    significant (each (1,)) and their null draws (n_perm,): null_share is the share in the
    more frequent direction under each draw."""
    share = max(float(positive[0]), float(negative[0]))
    return dict(
        median_effect=float(median[0]),
        share_significant_positive=float(positive[0]),
        share_significant_negative=float(negative[0]),
        p_median=_joint_p(float(median[0]), null_medians, absolute=True),
        p_share_significant=_joint_p(share, null_share, absolute=False),
    )


def specification_joint_test(
    effects: ArrayLike,
    p_values: ArrayLike,
    null_effects: ArrayLike,
    null_p_values: ArrayLike,
    alpha: float = 0.05,
) -> dict:
    """Joint test of a specification curve from effects the caller computed itself.

    effects, p_values: (S,) observed effect and two-sided p of every specification;
    null_effects, null_p_values: (n_perm, S), the same under each permutation of the group
    labels (one relabelling per row, shared by all specifications). Specifications whose
    observed effect or p is NaN are not estimable and are left out. Returns a dict with
    n_specs, n_estimable, median_effect, share_significant_positive/negative, p_median and
    p_share_significant (defined as in :class:`SpecificationCurve`).
    """
    _check_alpha(alpha)
    effects = np.asarray(effects, dtype=np.float64).reshape(-1)
    p_values = np.asarray(p_values, dtype=np.float64).reshape(-1)
    null_effects = np.asarray(null_effects, dtype=np.float64)
    null_p_values = np.asarray(null_p_values, dtype=np.float64)
    if p_values.shape != effects.shape:
        raise ConfigError(f"p_values {p_values.shape} must match effects {effects.shape}")
    if null_effects.ndim != 2 or null_effects.shape[1] != effects.size:
        raise ConfigError(
            f"null_effects must be (n_perm, {effects.size}), got {null_effects.shape}"
        )
    if null_p_values.shape != null_effects.shape:
        raise ConfigError(
            f"null_p_values {null_p_values.shape} must match null_effects {null_effects.shape}"
        )
    estimable = np.isfinite(effects) & np.isfinite(p_values)
    n_estimable = int(estimable.sum())
    result = {"n_specs": int(effects.size), "n_estimable": n_estimable}
    if n_estimable == 0:
        return result | dict.fromkeys(_SUMMARY_FIELDS, math.nan)
    observed, null = effects[estimable][None, :], null_effects[:, estimable]
    obs_p, null_p = p_values[estimable][None, :], null_p_values[:, estimable]
    median, pos, neg = _curve_summary(
        observed, (obs_p < alpha) & (observed > 0), (obs_p < alpha) & (observed < 0), n_estimable
    )
    with np.errstate(invalid="ignore"):
        null_pos, null_neg = (null_p < alpha) & (null > 0), (null_p < alpha) & (null < 0)
    null_median, null_sp, null_sn = _curve_summary(null, null_pos, null_neg, n_estimable)
    return result | _joint_summary(median, pos, neg, null_median, np.maximum(null_sp, null_sn))


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha must be between 0 and 1 (e.g. 0.05), got {alpha}")


def _check_inputs(values, labels, pairs, effect, n_perm, ci, alpha):
    check_choice(effect, SPEC_EFFECTS, "effect")
    check_positive_int(n_perm, "n_perm")
    check_ci(ci)
    _check_alpha(alpha)
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] == 0:
        raise ConfigError(f"values must be (n_prompts, n_specs), got shape {values.shape}")
    if (labels is None) == (pairs is None):
        raise ConfigError("pass exactly one of labels (two groups) or pairs (minimal pairs)")
    if labels is not None and effect != "hedges_g":
        raise ConfigError("two independent groups (labels) use effect='hedges_g'")
    if pairs is not None and effect != "d_z":
        raise ConfigError("a paired design (pairs) uses effect='d_z'")
    return values


def _unpaired_labels(labels, n_rows: int) -> np.ndarray:
    array = np.asarray(labels)
    if array.shape != (n_rows,):
        raise ConfigError(f"labels must have one entry per prompt ({n_rows}), got {array.shape}")
    if array.dtype != bool:
        distinct = set(np.unique(array).tolist())
        if not distinct <= {0, 1}:
            raise ConfigError(
                f"labels must be booleans or 0/1 (1 = target group), got values {sorted(distinct)}"
            )
    target = array.astype(bool)
    if target.all() or not target.any():
        raise ConfigError("labels must contain both groups (some True and some False)")
    return target


def _paired_differences(values: np.ndarray, pairs) -> np.ndarray:
    index = np.asarray(pairs)
    if index.ndim != 2 or index.shape[1] != 2 or index.shape[0] < 2:
        raise ConfigError(f"pairs must be (n_pairs >= 2, 2) row indices, got shape {index.shape}")
    if not np.issubdtype(index.dtype, np.integer):
        raise ConfigError("pairs must hold integer row indices (target row, twin row)")
    if index.min() < 0 or index.max() >= values.shape[0]:
        raise ConfigError(f"pairs index rows outside 0..{values.shape[0] - 1}")
    return values[index[:, 0]] - values[index[:, 1]]  # (n_pairs, S), NaN propagates


def specification_curve(
    values: ArrayLike,
    labels: ArrayLike | None = None,
    pairs: ArrayLike | None = None,
    effect: str = "hedges_g",
    spec_table: pd.DataFrame | None = None,
    n_perm: int = 1_000,
    alpha: float = 0.05,
    ci: float = 0.95,
    seed: int = 0,
) -> SpecificationCurve:
    """Specification curve of per-prompt values (n_prompts, n_specs) and its joint test.

    Two designs:

    - ``labels`` (n_prompts,) booleans or 0/1, 1 = target (recursive) group: the effect of a
      specification is Hedges' g (target - control, pooled sd, exact J correction) over the
      prompts with a finite value in that column, its p from Student's t with
      n_target + n_control - 2 df. Null draws permute the labels over all prompts.
    - ``pairs`` (n_pairs, 2) integer row indices (target row, twin row): the effect is d_z
      of the paired differences (NaN if either side is NaN), p from the paired t with
      n - 1 df. Null draws flip the sign of each pair's difference.

    Per-specification CIs are analytic normal-approximation intervals, effect +/- z * se, with
    se = sqrt(1/n_t + 1/n_c + g^2 / (2 (n_t + n_c))) for g (Hedges & Olkin 1985) and
    se = sqrt(1/n + d_z^2 / (2 n)) for d_z. A specification is significant when p < alpha.
    A specification is not estimable (excluded from every summary and from the null draws,
    counted, its reason in ``specs``) with no finite values, fewer than 2 values in a group
    (or 2 pairs), or zero variance. ``spec_table`` (n_specs rows, e.g. layer pair, window,
    mode) is joined to the per-specification table in order. One seed, one set of null
    draws for every specification.
    """
    values = _check_inputs(values, labels, pairs, effect, n_perm, ci, alpha)
    n_specs = values.shape[1]
    if spec_table is not None and len(spec_table) != n_specs:
        raise ConfigError(
            f"spec_table has {len(spec_table)} rows but values has {n_specs} specifications"
        )
    rng = np.random.default_rng(seed)
    if labels is not None:
        design = _unpaired_design(values, labels, rng)
    else:
        design = _paired_design(values, pairs, rng)
    observed = design.effects_for(design.observed_rows)
    effect_obs = observed.effect[0]  # (S,)
    estimable = np.isfinite(effect_obs)
    n_estimable = int(estimable.sum())
    table, critical = _observed_table(design, observed, estimable, alpha, ci)
    if spec_table is not None:
        table = pd.concat([spec_table.reset_index(drop=True), table], axis=1)
    null_medians, null_share = np.full(0, math.nan), np.full(0, math.nan)
    summary = dict.fromkeys(_SUMMARY_FIELDS, math.nan)
    if n_estimable:
        keep = np.flatnonzero(estimable)
        significant = np.abs(observed.t[:, keep]) > critical[keep]
        median, pos, neg = _curve_summary(
            effect_obs[keep][None, :],
            significant & (effect_obs[keep] > 0),
            significant & (effect_obs[keep] < 0),
            n_estimable,
        )
        null_medians, null_share = _null_curve(design, keep, critical, n_perm)
        summary = _joint_summary(median, pos, neg, null_medians, null_share)
    return SpecificationCurve(
        specs=table,
        effect=effect,
        design=design.name,
        n_specs=n_specs,
        n_estimable=n_estimable,
        n_not_estimable=n_specs - n_estimable,
        **summary,
        null_medians=null_medians,
        null_share_significant=null_share,
        alpha=alpha,
        ci=ci,
        n_perm=n_perm,
        seed=seed,
    )


@dataclass(frozen=True)
class _Design:
    """One design (two groups or pairs) over all specifications, ready for the observed
    grouping and the null draws."""

    name: str  # DESIGN_UNPAIRED or DESIGN_PAIRED
    count: np.ndarray  # (S,) finite values (unpaired) or usable pairs (paired) per spec
    df: np.ndarray  # (S,) degrees of freedom of each spec's t test
    effects_for: Callable[[np.ndarray], _Moments]  # grouping rows (P, n) -> moments (P, S)
    observed_rows: np.ndarray  # (1, n) the observed grouping
    draws: Callable[[int], np.ndarray]  # size -> null groupings (size, n)


def _unpaired_design(values: np.ndarray, labels: ArrayLike, rng: np.random.Generator) -> _Design:
    """Two independent groups: rows are 0/1 target labels, null draws permute them."""
    target = _unpaired_labels(labels, values.shape[0]).astype(np.float64)  # (n,)
    present = np.isfinite(values)  # (n, S)
    count = present.sum(axis=0).astype(np.float64)  # (S,)
    # Standardise each column over its finite values: g is location-scale invariant, and
    # the moment formulas lose no precision on standardised values.
    filled = np.where(present, values, 0.0)  # (n, S)
    safe_count = np.maximum(count, 1.0)  # (S,)
    center = filled.sum(axis=0) / safe_count  # (S,)
    deviations = np.where(present, values - center, 0.0)  # (n, S)
    spread = np.sqrt((deviations * deviations).sum(axis=0) / safe_count)  # (S,)
    spread = np.where(spread > 0, spread, 1.0)
    values0 = np.where(present, (values - center) / spread, 0.0)  # (n, S)
    squares = values0 * values0  # (n, S)
    present_f = present.astype(np.float64)  # (n, S)
    totals = (count, values0.sum(axis=0), squares.sum(axis=0))  # (S,) each
    correction = _hedges_correction(count - 2)  # (S,)

    def effects_for(rows: np.ndarray) -> _Moments:
        return _unpaired_effects(rows, values0, squares, present_f, totals, correction)

    def draws(size: int) -> np.ndarray:
        return rng.permuted(np.tile(target, (size, 1)), axis=1)  # (size, n)

    return _Design(DESIGN_UNPAIRED, count, count - 2, effects_for, target[None, :], draws)


def _paired_design(values: np.ndarray, pairs: ArrayLike, rng: np.random.Generator) -> _Design:
    """Minimal pairs: rows are signs of each pair's difference, null draws flip them."""
    diffs = _paired_differences(values, pairs)  # (n_pairs, S)
    present = np.isfinite(diffs)
    count = present.sum(axis=0).astype(np.float64)  # (S,)
    filled = np.where(present, diffs, 0.0)  # (n_pairs, S)
    rms = np.sqrt((filled * filled).sum(axis=0) / np.maximum(count, 1.0))  # (S,)
    rms = np.where(rms > 0, rms, 1.0)
    diffs0 = np.where(present, diffs / rms, 0.0)  # (n_pairs, S) scaled, never centred
    total_sq = (diffs0 * diffs0).sum(axis=0)  # (S,)
    n_pairs = diffs.shape[0]

    def effects_for(rows: np.ndarray) -> _Moments:
        return _paired_effects(rows, diffs0, count, total_sq)

    def draws(size: int) -> np.ndarray:
        return rng.choice(np.array([-1.0, 1.0]), size=(size, n_pairs))

    return _Design(DESIGN_PAIRED, count, count - 1, effects_for, np.ones((1, n_pairs)), draws)


def _observed_table(
    design: _Design, observed: _Moments, estimable: np.ndarray, alpha: float, ci: float
) -> tuple[pd.DataFrame, np.ndarray]:
    """(per-specification table, critical |t| (S,) for significance at ``alpha``)."""
    effect_obs, df, count = observed.effect[0], design.df, design.count  # (S,) each
    reasons = _not_estimable_reasons(design.name, count, observed, estimable)
    with np.errstate(invalid="ignore"):
        critical = scipy.stats.t.ppf(1 - alpha / 2, np.where(df >= 1, df, 1))  # (S,)
        p_obs = np.where(
            estimable, 2 * scipy.stats.t.sf(np.abs(observed.t[0]), np.where(df >= 1, df, 1)), np.nan
        )
    n_t, n_c = observed.n_target[0], observed.n_control[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        if design.name == DESIGN_UNPAIRED:
            se = np.sqrt(1 / n_t + 1 / n_c + effect_obs**2 / (2 * (n_t + n_c)))
        else:
            se = np.sqrt(1 / count + effect_obs**2 / (2 * count))
    z = scipy.stats.norm.ppf(0.5 + ci / 2)
    table = pd.DataFrame(
        {
            "effect": effect_obs,
            "ci_low": effect_obs - z * se,
            "ci_high": effect_obs + z * se,
            "p": p_obs,
            "n_target": n_t.astype(np.int64),
            "n_control": n_c.astype(np.int64),
            "estimable": estimable,
            "reason": pd.Series(reasons, dtype=object),
        }
    )
    ranks = np.full(effect_obs.size, -1, dtype=np.int64)
    order = np.flatnonzero(estimable)[np.argsort(effect_obs[estimable], kind="stable")]
    ranks[order] = np.arange(order.size)
    table["curve_rank"] = ranks
    return table, critical


def _null_curve(
    design: _Design, keep: np.ndarray, critical: np.ndarray, n_perm: int
) -> tuple[np.ndarray, np.ndarray]:
    """(median effect, share significant in the more frequent direction), each (n_perm,),
    over the estimable specifications ``keep`` under every null draw of the design."""
    null_medians = np.empty(n_perm)
    null_share = np.empty(n_perm)
    for start in range(0, n_perm, _PERM_CHUNK):
        size = min(_PERM_CHUNK, n_perm - start)
        moments = design.effects_for(design.draws(size))
        null_effect = moments.effect[:, keep]  # (chunk, S_est)
        with np.errstate(invalid="ignore"):
            null_sig = np.abs(moments.t[:, keep]) > critical[keep]  # NaN -> False
        m, sp, sn = _curve_summary(
            null_effect, null_sig & (null_effect > 0), null_sig & (null_effect < 0), keep.size
        )
        null_medians[start : start + size] = m
        null_share[start : start + size] = np.maximum(sp, sn)
    return null_medians, null_share


def _not_estimable_reasons(
    design: str, count: np.ndarray, observed: _Moments, estimable: np.ndarray
) -> list[str | None]:
    reasons: list[str | None] = []
    for s in range(count.size):
        if estimable[s]:
            reasons.append(None)
        elif count[s] == 0:
            reasons.append(REASON_NO_VALUES)
        elif design == DESIGN_PAIRED and count[s] < 2:
            reasons.append("fewer than 2 usable pairs")
        elif design == DESIGN_UNPAIRED and observed.n_target[0, s] < 2:
            reasons.append("fewer than 2 finite values in the target group")
        elif design == DESIGN_UNPAIRED and observed.n_control[0, s] < 2:
            reasons.append("fewer than 2 finite values in the control group")
        else:
            reasons.append("zero variance: the effect size is undefined")
    return reasons


def effect_variance_by_factor(
    table: pd.DataFrame, factors: Sequence[str], effect: str = "effect"
) -> pd.DataFrame:
    """Which specification choices move the effect most.

    table: one row per specification (e.g. ``SpecificationCurve.specs``) with the choice
    columns ``factors`` and an ``effect`` column. Rows with a non-finite effect, or with
    ``estimable`` False when that column exists, are left out. For each factor on its own
    (one-way grouping): eta^2 = SS_between / SS_total of the effect over the factor's levels,
    the number of levels, and the lowest and highest level means. Sorted by eta^2,
    largest first. For a full factorial design the factors are orthogonal and their eta^2
    add up to at most 1 (the rest is interactions). eta^2 is NaN with a reason when every
    effect is equal; a factor with a single level explains nothing (eta^2 = 0).
    """
    if effect not in table.columns:
        raise ConfigError(f"table has no effect column {effect!r}")
    missing = [f for f in factors if f not in table.columns]
    if missing:
        raise ConfigError(f"table has no factor columns {missing}: choose from {list(table)}")
    if not factors:
        raise ConfigError("effect_variance_by_factor needs at least one factor")
    keep = np.isfinite(table[effect].to_numpy(dtype=np.float64))
    if "estimable" in table.columns:
        keep &= table["estimable"].to_numpy(dtype=bool)
    used = table.loc[keep]
    if len(used) < 2:
        raise ConfigError(f"need at least 2 specifications with a finite effect, got {len(used)}")
    y = used[effect].to_numpy(dtype=np.float64)
    grand = y.mean()
    ss_total = float(((y - grand) ** 2).sum())
    rows = []
    for factor in factors:
        groups = used.groupby(factor, sort=True, dropna=False)[effect]
        means, sizes = groups.mean(), groups.size()
        ss_between = float((sizes * (means - grand) ** 2).sum())
        constant = ss_total <= 1e-24 * max(1.0, float((y * y).sum()))
        rows.append(
            {
                "factor": factor,
                "n_levels": int(means.size),
                "eta_squared": math.nan if constant else ss_between / ss_total,
                "lowest_level_mean": float(means.min()),
                "highest_level_mean": float(means.max()),
                "n_specs": int(len(used)),
                "reason": "every effect is equal: nothing to explain" if constant else None,
            }
        )
    out = pd.DataFrame(rows)
    return out.sort_values("eta_squared", ascending=False, na_position="last").reset_index(
        drop=True
    )
