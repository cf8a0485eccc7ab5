"""Confounds of a prompt-group contrast: covariates from text and tokens, and an adjusted
group effect (SCIENCE.md §9).

A contrast between prompt groups measures whatever differs between them: length, sentence
structure, punctuation, repetition inside the window. :func:`prompt_covariates` measures
those from a prompt's text and the token ids / strings of its window (the experiment
tokenizes; this module is pure Python and numpy). :func:`covariate_correlations` relates
each covariate to the outcome; :func:`adjusted_group_effect` asks how much of the raw group
gap is left once the covariates are in an OLS model with HC3 robust standard errors.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from statsmodels.regression.linear_model import OLS

from rloop.errors import ConfigError
from rloop.metrics.stats import AsDictMixin, benjamini_hochberg, check_ci, correlation_with_ci

# Sentence ends: runs of terminal punctuation (ASCII, ellipsis, CJK full stops), optionally
# followed by closing quotes or brackets, then whitespace or the end of the text.
_SENTENCE_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]]*(?=\s|$)")
# Markers some tokenizers put in raw token strings for a leading space or a newline.
_TOKEN_MARKERS = "\u0120\u2581\u010a"  # GPT-2 "Ġ", SentencePiece "▁", GPT-2 "Ċ"

REASON_CONSTANT_COVARIATE = "constant covariate"
REASON_CONSTANT_OUTCOME = "constant outcome"
REASON_TOO_FEW = "fewer than 3 rows with a finite outcome and covariate"


def is_punctuation_token(token_text: str) -> bool:
    """True when a token string is punctuation: after removing whitespace and tokenizer
    space/newline markers (Ġ, ▁, Ċ) something is left and every remaining character is in a
    Unicode punctuation category (P*: . , ; : ! ? quotes, brackets, dashes, ...). Symbols
    (S*: + = $ ...) and whitespace-only tokens are not punctuation."""
    stripped = "".join(ch for ch in token_text if not ch.isspace() and ch not in _TOKEN_MARKERS)
    return bool(stripped) and all(unicodedata.category(ch).startswith("P") for ch in stripped)


def sentence_count(text: str) -> int:
    """Number of sentences in ``text``: runs of . ! ? … 。！？ (with closing quotes/brackets)
    followed by whitespace or the end, plus one for trailing text without an end mark. A
    heuristic: abbreviations such as "Dr." count as sentence ends. 0 for blank text."""
    if not text.strip():
        return 0
    ends = list(_SENTENCE_END.finditer(text))
    tail = text[ends[-1].end() :] if ends else text
    return len(ends) + (1 if tail.strip() else 0)


def prompt_covariates(
    text: str,
    window_token_ids: Sequence[int],
    n_tokens: int,
    tokens_text: Sequence[str] | None = None,
    context_token_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """Covariates of one prompt -> dict of floats.

    text: the prompt; window_token_ids: the ids of the W tokens the metric reads (the last W
    real tokens); n_tokens: the prompt's number of real tokens; tokens_text: the decoded
    string of each window token (``tokenizer.decode([id])``; raw tokens with Ġ/▁ markers
    also work), W strings; context_token_ids: optionally the prompt's tokens before the
    window.

    - n_tokens: as given.
    - type_token_ratio: distinct ids in the window / W.
    - repeated_token_share: share of window tokens whose id occurred earlier — earlier in the
      window, or in ``context_token_ids`` when given. Without context it is exactly
      1 - type_token_ratio (each distinct id has one first occurrence), so do not put both
      in one regression; with context it also counts repetition of earlier prompt text.
    - punctuation_share: share of window tokens that are punctuation
      (:func:`is_punctuation_token`); NaN when tokens_text is not given.
    - sentence_count: :func:`sentence_count` of the text.
    """
    ids = [int(i) for i in window_token_ids]
    if not ids:
        raise ConfigError("window_token_ids is empty: pass the ids of the window's tokens")
    if isinstance(n_tokens, bool) or int(n_tokens) != n_tokens or n_tokens < len(ids):
        raise ConfigError(
            f"n_tokens must be an integer of at least the window length {len(ids)}, got "
            f"{n_tokens!r}"
        )
    if tokens_text is not None and len(tokens_text) != len(ids):
        raise ConfigError(
            f"tokens_text has {len(tokens_text)} strings for {len(ids)} window tokens: "
            "decode each window token"
        )
    seen = {int(i) for i in context_token_ids} if context_token_ids is not None else set()
    repeated = 0
    for token in ids:
        repeated += token in seen
        seen.add(token)
    punctuation = (
        sum(is_punctuation_token(t) for t in tokens_text) / len(ids)
        if tokens_text is not None
        else math.nan
    )
    return {
        "n_tokens": float(n_tokens),
        "type_token_ratio": len(set(ids)) / len(ids),
        "repeated_token_share": repeated / len(ids),
        "punctuation_share": float(punctuation),
        "sentence_count": float(sentence_count(text)),
    }


def _check_columns(df: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ConfigError(f"columns {missing} are not in the table: choose from {list(df)}")


def _numeric(df: pd.DataFrame, column: str) -> np.ndarray:
    try:
        return pd.to_numeric(df[column], errors="raise").to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"column {column!r} must be numeric ({error})") from None


def covariate_correlations(
    df: pd.DataFrame,
    outcome: str,
    covariates: Sequence[str],
    n_boot: int = 10_000,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Spearman correlation of each covariate with the outcome, one row per covariate.

    Columns: covariate, n (rows with both finite), n_dropped, rho, p (scipy), ci_low/ci_high
    (percentile bootstrap over rows, :func:`rloop.metrics.stats.correlation_with_ci`), p_bh
    (Benjamini-Hochberg over the estimable rows), estimable, reason. A covariate that is
    constant, a constant outcome, or fewer than 3 usable rows give a row with
    estimable=False and the reason, never an unexplained NaN.
    """
    if not covariates:
        raise ConfigError("covariate_correlations needs at least one covariate")
    _check_columns(df, [outcome, *covariates])
    if len(df) < 3:
        raise ConfigError(f"covariate_correlations needs at least 3 rows, got {len(df)}")
    y = _numeric(df, outcome)
    rows = []
    for name in covariates:
        x = _numeric(df, name)
        keep = np.isfinite(x) & np.isfinite(y)
        if keep.sum() < 3:
            reason = REASON_TOO_FEW
        elif np.ptp(x[keep]) == 0:
            reason = REASON_CONSTANT_COVARIATE
        elif np.ptp(y[keep]) == 0:
            reason = REASON_CONSTANT_OUTCOME
        else:
            reason = None
        if reason is None:
            result = correlation_with_ci(x, y, "spearman", n_boot=n_boot, ci=ci, seed=seed)
            numbers = (result.r, result.p, result.ci_low, result.ci_high)
        else:
            numbers = (math.nan,) * 4
        rows.append(
            {
                "covariate": name,
                "n": int(keep.sum()),
                "n_dropped": int(keep.size - keep.sum()),
                "rho": numbers[0],
                "p": numbers[1],
                "ci_low": numbers[2],
                "ci_high": numbers[3],
                "estimable": reason is None,
                "reason": reason,
            }
        )
    table = pd.DataFrame(rows)
    table["reason"] = pd.Series([row["reason"] for row in rows], dtype=object)
    table.insert(table.columns.get_loc("ci_high") + 1, "p_bh", benjamini_hochberg(table["p"]))
    return table


@dataclass(frozen=True)
class AdjustedGroupEffect(AsDictMixin):
    """Raw and covariate-adjusted gap between two prompt groups (OLS, HC3 standard errors).

    raw_gap: coefficient of the group indicator (1 = groups[0]) in outcome ~ 1 + group, which
    is mean(groups[0]) - mean(groups[1]); adjusted_effect: its coefficient in
    outcome ~ 1 + group + covariates. CIs and p use the t distribution with the residual df
    and HC3 standard errors. share_explained = 1 - adjusted / raw (the share of the raw gap
    the covariates account for; can be negative or above 1). ``covariates_used`` are in the
    adjusted model, ``covariates_dropped`` maps each left-out covariate to why.
    ``reason`` says why the adjusted fields are NaN, ``share_reason`` why the share is.
    """

    n: int
    n_dropped: int
    n_group: int
    n_reference: int
    groups: tuple[str, str]
    raw_gap: float
    raw_se: float
    raw_ci_low: float
    raw_ci_high: float
    raw_p: float
    adjusted_effect: float
    adjusted_se: float
    adjusted_ci_low: float
    adjusted_ci_high: float
    adjusted_p: float
    share_explained: float
    share_reason: str | None
    reason: str | None
    covariates_used: tuple[str, ...]
    covariates_dropped: dict[str, str] = field(default_factory=dict)
    covariate_coefficients: dict[str, float] = field(default_factory=dict)
    ci: float = 0.95


def _hc3_fit(y: np.ndarray, design: np.ndarray):
    """OLS of y (n,) on design (n, p) with HC3 covariance and t-based inference."""
    return OLS(y, design).fit(cov_type="HC3", use_t=True)


def _coefficient(fit, alpha: float, column: int) -> tuple[float, float, float, float, float]:
    """(coefficient, se, ci_low, ci_high, p) of one design column."""
    low, high = np.asarray(fit.conf_int(alpha))[column]
    return (
        float(fit.params[column]),
        float(fit.bse[column]),
        float(low),
        float(high),
        float(fit.pvalues[column]),
    )


def _rank(matrix: np.ndarray) -> int:
    return int(np.linalg.matrix_rank(matrix)) if matrix.size else 0


def adjusted_group_effect(
    df: pd.DataFrame,
    outcome: str,
    group_col: str,
    groups: tuple[str, str],
    covariates: Sequence[str],
    ci: float = 0.95,
) -> AdjustedGroupEffect:
    """Gap in ``outcome`` between groups[0] (e.g. recursive) and groups[1] (a baseline), raw
    and adjusted for ``covariates``, by OLS with HC3 heteroskedasticity-robust SEs
    (statsmodels; MacKinnon & White 1985).

    Rows of other groups are ignored; rows with a non-finite outcome or covariate are dropped
    and counted. Within the rows used, a constant covariate is dropped with a note, and a
    covariate that is an exact linear combination of the intercept and the covariates kept
    before it is dropped with a note naming them. If the group indicator is itself a linear
    combination of the kept covariates (a covariate perfectly confounded with the group),
    the adjusted effect is not identifiable: NaN with that reason. share_explained is NaN with
    a reason when the raw gap is within noise (its CI contains 0) — a ratio over such a gap
    is meaningless.
    """
    _check_group_inputs(df, outcome, group_col, groups, covariates, ci)
    y, group, x, n_dropped = _usable_rows(df, outcome, group_col, groups, covariates)
    n_group, n_reference = int(group.sum()), int(y.size - group.sum())
    if n_group < 2 or n_reference < 2:
        raise ConfigError(
            f"need at least 2 usable rows per group, got {n_group} ({groups[0]}) and "
            f"{n_reference} ({groups[1]}) after dropping {n_dropped} non-finite rows"
        )
    alpha = 1.0 - ci
    raw_fit = _hc3_fit(y, np.column_stack([np.ones(y.size), group]))
    raw = _coefficient(raw_fit, alpha, 1)
    kept, dropped, basis = _independent_covariates(x, covariates)
    used = tuple(covariates[k] for k in kept)
    adjusted, coefficients, reason = _adjusted_fit(y, group, x[:, kept], basis, used, alpha)
    share, share_reason = _share_explained(raw, adjusted[0])
    return AdjustedGroupEffect(
        n=int(y.size),
        n_dropped=n_dropped,
        n_group=n_group,
        n_reference=n_reference,
        groups=(groups[0], groups[1]),
        raw_gap=raw[0],
        raw_se=raw[1],
        raw_ci_low=raw[2],
        raw_ci_high=raw[3],
        raw_p=raw[4],
        adjusted_effect=adjusted[0],
        adjusted_se=adjusted[1],
        adjusted_ci_low=adjusted[2],
        adjusted_ci_high=adjusted[3],
        adjusted_p=adjusted[4],
        share_explained=share,
        share_reason=share_reason,
        reason=reason,
        covariates_used=used,
        covariates_dropped=dropped,
        covariate_coefficients=coefficients,
        ci=ci,
    )


def _check_group_inputs(
    df: pd.DataFrame,
    outcome: str,
    group_col: str,
    groups: tuple[str, str],
    covariates: Sequence[str],
    ci: float,
) -> None:
    """ConfigError for a bad ci, group pair, column list, or a group absent from the table."""
    check_ci(ci)
    if len(groups) != 2 or groups[0] == groups[1]:
        raise ConfigError(f"groups must be two different group names, got {groups!r}")
    _check_columns(df, [outcome, group_col, *covariates])
    if len(set(covariates)) != len(covariates) or group_col in covariates:
        raise ConfigError("covariates must be distinct and must not include the group column")
    labels = df[group_col]
    present = [g for g in groups if (labels == g).any()]
    if len(present) < 2:
        raise ConfigError(
            f"group column {group_col!r} must contain both {groups[0]!r} and {groups[1]!r}"
        )


def _usable_rows(
    df: pd.DataFrame,
    outcome: str,
    group_col: str,
    groups: tuple[str, str],
    covariates: Sequence[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(outcome (n,), group indicator (n,) 1 = groups[0], covariates (n, c), n_dropped): the
    rows of the two groups whose outcome and covariates are all finite."""
    rows = df.loc[df[group_col].isin(groups)]
    y = _numeric(rows, outcome)
    group = (rows[group_col] == groups[0]).to_numpy(dtype=np.float64)
    x = np.column_stack([_numeric(rows, c) for c in covariates]) if covariates else None
    keep = np.isfinite(y)
    if x is not None:
        keep &= np.isfinite(x).all(axis=1)
    y, group, n_dropped = y[keep], group[keep], int(keep.size - keep.sum())
    x = x[keep] if x is not None else np.zeros((y.size, 0))
    return y, group, x, n_dropped


def _independent_covariates(
    x: np.ndarray, covariates: Sequence[str]
) -> tuple[list[int], dict[str, str], np.ndarray]:
    """(indices of the covariates kept, dropped name -> why, basis (n, 1 + kept)): covariates
    (n, c) in order, each kept unless constant or a linear combination of the intercept and
    the covariates kept before it. The basis holds the intercept and the standardised kept
    columns."""
    dropped: dict[str, str] = {}
    kept: list[int] = []
    basis = np.ones((x.shape[0], 1))
    for j, name in enumerate(covariates):
        column = x[:, j]
        if np.ptp(column) == 0:
            dropped[name] = "constant in the rows used"
            continue
        # Rank checks on standardised columns, so covariates in tiny or huge units are not
        # mistaken for collinear ones (same span as the raw column plus the intercept).
        standardised = (column - column.mean()) / column.std()
        candidate = np.column_stack([basis, standardised])
        if _rank(candidate) <= _rank(basis):
            partners = ["intercept", *(covariates[k] for k in kept)]
            dropped[name] = "collinear with " + ", ".join(partners)
            continue
        basis, kept = candidate, [*kept, j]
    return kept, dropped, basis


def _adjusted_fit(
    y: np.ndarray,
    group: np.ndarray,
    x_used: np.ndarray,
    basis: np.ndarray,
    used: tuple[str, ...],
    alpha: float,
) -> tuple[tuple[float, ...], dict[str, float], str | None]:
    """(group coefficient, se, ci_low, ci_high, p), covariate coefficients and the reason
    they are NaN (None when defined) of outcome ~ 1 + group + kept covariates (n, k)."""
    design = np.column_stack([np.ones(y.size), group, x_used])
    centred_group = (group - group.mean()) / group.std()
    if _rank(np.column_stack([basis, centred_group])) <= _rank(basis):
        reason = (
            "the group indicator is a linear combination of the covariates "
            f"{list(used)}: the adjusted effect is not identifiable"
        )
        return (math.nan,) * 5, {}, reason
    if y.size - design.shape[1] < 1:
        reason = f"{y.size} rows cannot fit {design.shape[1]} coefficients: drop covariates"
        return (math.nan,) * 5, {}, reason
    adjusted_fit = _hc3_fit(y, design)
    adjusted = _coefficient(adjusted_fit, alpha, 1)
    coefficients = {name: float(adjusted_fit.params[2 + i]) for i, name in enumerate(used)}
    reason = None
    if not np.isfinite(adjusted[1]):
        reason = "a row has leverage 1: HC3 standard errors are undefined"
    return adjusted, coefficients, reason


def _share_explained(raw: tuple[float, ...], adjusted_effect: float) -> tuple[float, str | None]:
    """(1 - adjusted / raw gap, None), or (NaN, why) when the raw gap's CI contains 0 or the
    adjusted effect is undefined. raw: (gap, se, ci_low, ci_high, p)."""
    raw_gap = raw[0]
    if raw_gap == 0 or not (raw[2] > 0 or raw[3] < 0):
        return math.nan, "raw gap within noise (its CI contains 0): share explained undefined"
    if math.isnan(adjusted_effect):
        return math.nan, "adjusted effect undefined"
    return 1.0 - adjusted_effect / raw_gap, None
