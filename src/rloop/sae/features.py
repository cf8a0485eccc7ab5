"""SAE features of activation windows: which features differ between prompt groups, where a
feature fires, and how much of a subspace a set of features' decoder directions covers.

Feature activations are non-negative (ReLU, TopK and JumpReLU all are), so a prompt's mean
activation over its window is 0 exactly when the feature never fires in that window.
Statistics follow :mod:`rloop.metrics.stats` (SCIENCE.md §6): per-prompt values, bootstrap
CIs over prompts, Welch or Mann-Whitney tests, Benjamini-Hochberg across features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.stats
import torch

from rloop.errors import ConfigError
from rloop.metrics.stats import (
    BOOT_CHUNK,
    benjamini_hochberg,
    check_choice,
    check_ci,
    check_count,
    cohens_d_along,
    hedges_correction,
)
from rloop.metrics.subspace import orthonormal_basis
from rloop.sae.format import SparseAutoencoder

DIFFERENTIAL_TESTS = ("welch", "mann-whitney")
_FEATURE_BLOCK = 2048  # features per block of bootstrap means: bounds memory at n_boot x block

# Feature activations of a group of prompts: (n, W, d_sae) or (n, d_sae), or (W_i, d_sae) each.
FeatureActivations = torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]


def _encode_rows(sae: SparseAutoencoder, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    outputs = [
        sae.encode(rows[start : start + batch_size]).float().cpu()  # (b, d_sae)
        for start in range(0, rows.shape[0], batch_size)
    ]
    return torch.cat(outputs, dim=0)  # (N, d_sae)


@torch.no_grad()
def feature_activations(sae: SparseAutoencoder, windows, batch_size: int = 4096):
    """SAE feature activations of windows -> float32 on CPU.

    windows: (n, W, d_in) or (n, d_in) tensor -> (n, W, d_sae) or (n, d_sae); a list of
    (W_i, d_in) windows -> a list of (W_i, d_sae). Rows are encoded in batches of
    ``batch_size`` in the SAE's dtype.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(windows, (list, tuple)):
        if not windows:
            raise ConfigError("windows is empty: pass at least one window")
        lengths = [int(torch.as_tensor(w).shape[0]) for w in windows]
        rows = torch.cat([torch.as_tensor(w).reshape(-1, _window_width(w)) for w in windows])
        return list(_encode_rows(sae, rows, batch_size).split(lengths))
    tensor = windows if isinstance(windows, torch.Tensor) else torch.as_tensor(windows)
    if tensor.dim() not in (2, 3):
        raise ConfigError(
            f"windows must be (n, W, d_in), (n, d_in) or a list of (W, d_in), got "
            f"{tuple(tensor.shape)}"
        )
    rows = tensor.reshape(-1, tensor.shape[-1])  # (N, d_in)
    features = _encode_rows(sae, rows, batch_size)  # (N, d_sae)
    return features.reshape(*tensor.shape[:-1], sae.d_sae)


def _window_width(window) -> int:
    """Last dimension of a (W, d) window in a list of windows."""
    shape = tuple(torch.as_tensor(window).shape)
    if len(shape) != 2:
        raise ConfigError(f"each window in a list must be (W, d_in), got {shape}")
    return shape[-1]


def _per_prompt_means(acts: FeatureActivations, name: str) -> np.ndarray:
    """Feature activations -> per-prompt means (n, d_sae) float64.

    (n, W, d_sae) tensors are averaged over W; (n, d_sae) are taken as per-prompt values; a
    list of (W_i, d_sae) is averaged per window."""
    if isinstance(acts, (list, tuple)):
        if not acts:
            raise ConfigError(f"{name} is empty: pass at least one prompt")
        means = []
        for i, window in enumerate(acts):
            matrix = torch.as_tensor(window).to(torch.float64)
            if matrix.dim() != 2 or matrix.shape[0] == 0:
                raise ConfigError(f"{name}[{i}] must be (W, d_sae), got {tuple(matrix.shape)}")
            means.append(matrix.mean(dim=0))
        widths = {int(m.shape[0]) for m in means}
        if len(widths) > 1:
            raise ConfigError(f"{name} mixes feature counts {sorted(widths)}")
        values = torch.stack(means).numpy()
    else:
        tensor = torch.as_tensor(acts).to(torch.float64)
        if tensor.dim() == 3:
            values = tensor.mean(dim=1).numpy()  # (n, d_sae)
        elif tensor.dim() == 2:
            values = tensor.numpy()  # (n, d_sae)
        else:
            raise ConfigError(
                f"{name} must be (n, W, d_sae), (n, d_sae) or a list of (W, d_sae), got "
                f"{tuple(tensor.shape)}"
            )
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).any(axis=1).sum())
        raise ConfigError(f"{name} holds NaN or infinite activations in {bad} prompts")
    return values


def _bootstrap_difference(
    rec: np.ndarray, base: np.ndarray, n_boot: int, ci: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile CI (low, high), each (d_sae,), of mean(rec) - mean(base) per feature,
    resampling prompts with replacement within each group. All features share the same
    resamples, so the intervals are those of one bootstrap over prompts."""
    rng = np.random.default_rng(seed)
    n_rec, n_base = rec.shape[0], base.shape[0]
    # Drawing n prompts with replacement = multinomial counts over prompts.
    counts_rec = rng.multinomial(n_rec, np.full(n_rec, 1.0 / n_rec), size=n_boot)  # (B, n_rec)
    counts_base = rng.multinomial(n_base, np.full(n_base, 1.0 / n_base), size=n_boot)  # (B, n_b)
    alpha = 1.0 - ci
    low = np.empty(rec.shape[1])
    high = np.empty(rec.shape[1])
    for start in range(0, rec.shape[1], _FEATURE_BLOCK):
        block = slice(start, start + _FEATURE_BLOCK)
        differences = np.empty((n_boot, rec[:, block].shape[1]))  # (B, F)
        for b0 in range(0, n_boot, BOOT_CHUNK):
            b1 = min(b0 + BOOT_CHUNK, n_boot)
            differences[b0:b1] = (
                counts_rec[b0:b1] @ rec[:, block] / n_rec
                - counts_base[b0:b1] @ base[:, block] / n_base
            )  # (chunk, F)
        low[block], high[block] = np.quantile(differences, [alpha / 2, 1 - alpha / 2], axis=0)
    return low, high


def differential_features(
    acts_rec: FeatureActivations,
    acts_base: FeatureActivations,
    n_boot: int = 2000,
    seed: int = 0,
    ci: float = 0.95,
    test: str = "welch",
) -> pd.DataFrame:
    """Per-feature contrast of per-prompt mean activations, recursive vs baseline.

    acts_rec / acts_base: (n, W, d_sae) feature activations (averaged over the window here),
    (n, d_sae) per-prompt values, or lists of (W_i, d_sae). Returns one row per feature with
    feature, n_rec, n_base, mean_rec, mean_base, diff (rec - base), diff_ci_low / diff_ci_high
    (percentile bootstrap over prompts), hedges_g, frac_active_rec / frac_active_base (share
    of prompts where the feature fires at least once), test, p (two-sided Welch t or
    Mann-Whitney U) and p_adj (Benjamini-Hochberg over all features with a defined p). A
    feature that is constant in both groups has no test: p and p_adj are NaN. Sorted by p_adj,
    then p, then |diff| descending.
    """
    check_choice(test, DIFFERENTIAL_TESTS, "test")
    check_ci(ci)
    check_count(n_boot, "n_boot")
    rec = _per_prompt_means(acts_rec, "acts_rec")  # (n_rec, d_sae)
    base = _per_prompt_means(acts_base, "acts_base")  # (n_base, d_sae)
    if rec.shape[1] != base.shape[1]:
        raise ConfigError(
            f"acts_rec has {rec.shape[1]} features but acts_base has {base.shape[1]}: encode "
            "both groups with the same SAE"
        )
    if rec.shape[0] < 2 or base.shape[0] < 2:
        raise ConfigError(
            f"each group needs at least 2 prompts, got {rec.shape[0]} and {base.shape[0]}"
        )
    n_rec, n_base = rec.shape[0], base.shape[0]
    low, high = _bootstrap_difference(rec, base, n_boot, ci, seed)
    constant = (np.ptp(rec, axis=0) == 0) & (np.ptp(base, axis=0) == 0)  # (d_sae,)
    p = np.full(rec.shape[1], np.nan)
    testable = ~constant
    if testable.any():
        with np.errstate(divide="ignore", invalid="ignore"):
            if test == "welch":
                result = scipy.stats.ttest_ind(
                    rec[:, testable], base[:, testable], axis=0, equal_var=False
                )
            else:
                result = scipy.stats.mannwhitneyu(
                    rec[:, testable], base[:, testable], axis=0, alternative="two-sided"
                )
        p[testable] = result.pvalue
    with np.errstate(divide="ignore", invalid="ignore"):
        g = cohens_d_along(rec, base, axis=0) * hedges_correction(n_rec + n_base - 2)
    frame = pd.DataFrame(
        {
            "feature": np.arange(rec.shape[1]),
            "n_rec": n_rec,
            "n_base": n_base,
            "mean_rec": rec.mean(axis=0),
            "mean_base": base.mean(axis=0),
            "diff": rec.mean(axis=0) - base.mean(axis=0),
            "diff_ci_low": low,
            "diff_ci_high": high,
            "hedges_g": g,
            "frac_active_rec": (rec > 0).mean(axis=0),
            "frac_active_base": (base > 0).mean(axis=0),
            "test": test,
            "p": p,
            "p_adj": benjamini_hochberg(p),
        }
    )
    frame["_abs_diff"] = -frame["diff"].abs()
    frame = frame.sort_values(["p_adj", "p", "_abs_diff"], na_position="last", kind="stable")
    return frame.drop(columns="_abs_diff").reset_index(drop=True)


def top_activating(
    acts,
    prompt_ids: Sequence,
    token_strings: Sequence[Sequence[str]] | None,
    feature: int,
    top_n: int = 20,
    context: int = 5,
) -> pd.DataFrame:
    """The ``top_n`` (prompt, token) positions where ``feature`` fires most strongly.

    acts: (n, W, d_sae) tensor or list of (W_i, d_sae); prompt_ids: (n,) identifiers;
    token_strings: per prompt, the W_i token strings of its window (or None). Returns
    prompt_id, position (index in the window), activation and, with tokens, token and context
    (up to ``context`` tokens either side, the token itself in [[ ]]). Only positions where the
    feature is active (> 0) are listed, strongest first (ties by prompt, then position).
    """
    windows = list(acts) if not isinstance(acts, torch.Tensor) or acts.dim() == 3 else None
    if windows is None:
        raise ConfigError(f"acts must be (n, W, d_sae) or a list of (W, d_sae), got {acts.shape}")
    if len(prompt_ids) != len(windows):
        raise ConfigError(f"{len(prompt_ids)} prompt_ids for {len(windows)} windows: pass one each")
    if token_strings is not None and len(token_strings) != len(windows):
        raise ConfigError(f"{len(token_strings)} token lists for {len(windows)} windows")
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
        raise ConfigError(f"top_n must be a positive integer, got {top_n!r}")
    records = []
    for i, window in enumerate(windows):
        matrix = torch.as_tensor(window)
        if matrix.dim() != 2:
            raise ConfigError(f"acts[{i}] must be (W, d_sae), got {tuple(matrix.shape)}")
        if not 0 <= feature < matrix.shape[1]:
            raise ConfigError(f"feature {feature} is out of range for {matrix.shape[1]} features")
        tokens = None if token_strings is None else list(token_strings[i])
        if tokens is not None and len(tokens) != matrix.shape[0]:
            raise ConfigError(
                f"prompt {prompt_ids[i]!r} has {len(tokens)} token strings for a window of "
                f"{matrix.shape[0]} positions"
            )
        values = matrix[:, feature].to(torch.float64)  # (W,)
        for position in torch.nonzero(values > 0).flatten().tolist():
            record = {
                "prompt_id": prompt_ids[i],
                "position": position,
                "activation": float(values[position]),
            }
            if tokens is not None:
                before = tokens[max(0, position - context) : position]
                after = tokens[position + 1 : position + 1 + context]
                record["token"] = tokens[position]
                record["context"] = "".join(before) + f"[[{tokens[position]}]]" + "".join(after)
            records.append(record)
    columns = ["prompt_id", "position", "activation"]
    if token_strings is not None:
        columns += ["token", "context"]
    if not records:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame.from_records(records, columns=columns)
    frame["_order"] = np.arange(len(frame))
    frame = frame.sort_values(["activation", "_order"], ascending=[False, True], kind="stable")
    return frame.drop(columns="_order").head(top_n).reset_index(drop=True)


def decoder_span_share(sae: SparseAutoencoder, feature_ids: Sequence[int], basis) -> float:
    """How much of the subspace span(basis) the chosen features' decoder directions span.

    basis: (k, d_in) independent rows (e.g. :attr:`TopDirections.directions`). Returns the
    mean over an orthonormal basis u_1..u_k of span(basis) of ||P u_j||^2, where P projects
    onto span(W_dec[feature_ids]): 1 when the features span the whole subspace, 0 when their
    directions are orthogonal to it, k_f / d_in on average for k_f random directions. It does
    not depend on which orthonormal basis of span(basis) is used.
    """
    ids = [int(i) for i in feature_ids]
    if not ids:
        raise ConfigError("feature_ids is empty: pass at least one feature")
    bad = [i for i in ids if not 0 <= i < sae.d_sae]
    if bad:
        raise ConfigError(f"feature ids {bad[:8]} are out of range for an SAE with {sae.d_sae}")
    q_basis = orthonormal_basis(basis)  # (k, d_in)
    if q_basis.shape[1] != sae.d_in:
        raise ConfigError(f"basis has d = {q_basis.shape[1]} but the SAE has d_in {sae.d_in}")
    rows = sae.W_dec.detach()[ids].to(device="cpu", dtype=torch.float64)  # (f, d_in)
    _, singular, vh = torch.linalg.svd(rows, full_matrices=False)  # (r,), (r, d_in)
    if not singular.max() > 0:
        return math.nan  # all-zero decoder rows span nothing
    tolerance = singular.max() * max(rows.shape) * torch.finfo(torch.float64).eps
    q_features = vh[singular > tolerance]  # (rank, d_in) orthonormal span of the decoder rows
    return float((q_basis @ q_features.T).square().sum() / q_basis.shape[0])
