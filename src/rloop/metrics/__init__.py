"""Metrics: pure functions on activation tensors (no model code).

Participation ratio, spectrum, effective rank, R_V and window gathering live in
:mod:`rloop.metrics.participation` and are re-exported here; statistics (bootstrap CIs,
effect sizes, tests, Benjamini-Hochberg, transfer %) live in :mod:`rloop.metrics.stats`.
"""

from rloop.metrics.divergence import kl_divergence
from rloop.metrics.participation import (
    PR_MODE_PER_HEAD,
    PR_MODE_WHOLE,
    PR_MODES,
    REASON_NON_FINITE,
    REASON_ZERO_WINDOW,
    check_window_lengths,
    differentiable_participation_ratio,
    effective_rank,
    last_real_window,
    participation_ratio,
    participation_ratio_with_reason,
    pr_per_head,
    pr_per_head_mean,
    pr_whole,
    r_v,
    singular_spectrum,
    window_pr,
    window_pr_with_reason,
)

__all__ = [
    "PR_MODES",
    "PR_MODE_PER_HEAD",
    "PR_MODE_WHOLE",
    "REASON_NON_FINITE",
    "REASON_ZERO_WINDOW",
    "check_window_lengths",
    "differentiable_participation_ratio",
    "effective_rank",
    "kl_divergence",
    "last_real_window",
    "participation_ratio",
    "participation_ratio_with_reason",
    "pr_per_head",
    "pr_per_head_mean",
    "pr_whole",
    "r_v",
    "singular_spectrum",
    "window_pr",
    "window_pr_with_reason",
]
