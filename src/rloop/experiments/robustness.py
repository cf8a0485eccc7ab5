"""The robustness experiment (``rloop robustness``): the specification curve of the R_V contrast.

SCIENCE.md §9: a result that holds for one (layer pair, window, PR mode, hook point) and not
for its neighbours is fragile. This experiment measures the recursive-vs-control contrast of
R_V = PR(late) / PR(early) under every specification of a grid and tests them jointly
(Simonsohn, Simmons & Nelson 2020):

- choices: early layer x late layer (default: every layer of the first third x every layer
  of the last third, early < late), window W (default 8, 12, 16, 24, 32 real tokens), hook
  point (default v, k, resid_post, attn_out), PR mode (per-head and whole; per-head only at
  head points), PR estimator (plain; bias-corrected, :mod:`rloop.metrics.estimators`);
- measurement: one forward per prompt batch captures every needed layer at every hook point,
  keeping only the last max(W) token positions of each row (never whole sequences); every
  smaller window is a suffix of that one. PR rows per prompt are the resume checkpoints;
- contrast: recursive vs baseline group (Hedges' g over prompts, labels permuted) or, with a
  ``twin_group``, recursive prompts vs their structural twins (d_z over pairs linked by
  ``pair_id``, signs flipped);
- statistics: the (n_prompts, n_specs) R_V matrix goes to
  :func:`rloop.metrics.specification.specification_curve` once (joint test: one relabelling
  per draw shared by every specification), then
  :func:`rloop.metrics.specification.effect_variance_by_factor` (which choice moves the
  effect most).

A prompt with fewer real tokens than W is left out of the specifications of that W and
counted per specification (``n_too_short``); the window is never shrunk. A specification the
data cannot estimate (no prompt long enough, NaN windows, zero variance) is marked
``estimable = False`` with its reason and never enters a median. The run fails with a
one-line error only when no specification is estimable.

The reference specification (V, per-head, plain PR, the ``window`` setting, the depth-fraction
layers of :func:`rloop.interventions.engine.default_layers`) is what ``rloop contraction``
reports by default; its full contrast (bootstrap CI, tests) is in the ``reference`` table and
its place on the curve in the summary.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from rloop.adapters import HEAD_POINTS, HOOK_POINTS, Adapter
from rloop.capture.batching import EncodedBatch, take_windows, token_counts
from rloop.capture.trace import Trace, address
from rloop.errors import ConfigError, PromptError
from rloop.experiments.runner import (
    PromptBatch,
    execute,
    prompt_batches,
    record_model_and_prompts,
    run_units,
)
from rloop.experiments.settings import (
    Settings,
    check_context,
    check_groups,
    check_settings,
    limit_per_group,
    load,
    load_prompt_set,
    verify_if_asked,
)
from rloop.interventions.engine import default_layers
from rloop.metrics import PR_MODE_PER_HEAD, PR_MODE_WHOLE, PR_MODES, r_v
from rloop.metrics.contrasts import paired_contrast
from rloop.metrics.estimators import participation_ratio_corrected_with_reason
from rloop.metrics.participation import participation_ratio_with_reason
from rloop.metrics.specification import (
    DESIGN_PAIRED,
    DESIGN_UNPAIRED,
    SpecificationCurve,
    effect_variance_by_factor,
    specification_curve,
)
from rloop.metrics.stats import benjamini_hochberg, contrast
from rloop.prompts import Prompt, PromptSet
from rloop.runs.markdown import markdown_table, model_line
from rloop.runs.spec_plots import specification_curve_plot

EXPERIMENT = "robustness"
ESTIMATOR_PLAIN = "plain"
ESTIMATOR_CORRECTED = "corrected"
ESTIMATORS: tuple[str, ...] = (ESTIMATOR_PLAIN, ESTIMATOR_CORRECTED)
DEFAULT_WINDOWS = (8, 12, 16, 24, 32)
DEFAULT_POINTS = ("v", "k", "resid_post", "attn_out")
# The specification choices, in the column order of the spec_curve table.
CHOICES: tuple[str, ...] = ("point", "pr_mode", "estimator", "window", "layer_early", "layer_late")
REFERENCE_POINT = "v"
CI_LEVEL = 0.95
_PR_WITH_REASON = {
    ESTIMATOR_PLAIN: participation_ratio_with_reason,
    ESTIMATOR_CORRECTED: participation_ratio_corrected_with_reason,
}
_MAX_IDS_LISTED = 10


@dataclass
class RobustnessConfig(Settings):
    """Settings of the robustness experiment (defaults match the CLI and the docs).

    ``window`` (from :class:`Settings`) is the window of the reference specification; the
    grid uses ``windows``. ``groups`` is not used (the contrast names its two groups) and
    must stay None. ``n_boot`` sizes the bootstrap of the reference specification's contrast;
    the per-specification CIs are analytic (see ``specification_curve``).
    """

    early_layers: list[int] | None = None  # None = every layer of the first third
    late_layers: list[int] | None = None  # None = every layer of the last third
    layer_step: int = 1  # keep every n-th layer of the default ranges
    windows: list[int] = field(default_factory=lambda: list(DEFAULT_WINDOWS))
    points: list[str] = field(default_factory=lambda: list(DEFAULT_POINTS))
    pr_modes: list[str] = field(default_factory=lambda: [PR_MODE_PER_HEAD, PR_MODE_WHOLE])
    estimators: list[str] = field(default_factory=lambda: list(ESTIMATORS))
    recursive_group: str = "L5"
    baseline_group: str = "factual"
    twin_group: str | None = None  # set (e.g. L5_twin) for the paired minimal-pair contrast
    n_perm: int = 1000
    alpha: float = 0.05
    batch_size: int = 16


# ---------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class SpecGrid:
    """The specifications: every (point, PR mode) stream x estimator x window x layer pair
    with early < late, in that nesting order (the column order of the R_V matrix)."""

    early_layers: tuple[int, ...]
    late_layers: tuple[int, ...]
    windows: tuple[int, ...]
    streams: tuple[tuple[str, str], ...]  # (point, pr_mode)
    estimators: tuple[str, ...]

    @property
    def layers(self) -> list[int]:
        """Every layer some specification reads, ascending."""
        return sorted(set(self.early_layers) | set(self.late_layers))

    @property
    def points(self) -> list[str]:
        return list(dict.fromkeys(point for point, _ in self.streams))

    @property
    def layer_pairs(self) -> list[tuple[int, int]]:
        return [(e, late) for e in self.early_layers for late in self.late_layers if e < late]

    @property
    def n_specs(self) -> int:
        return len(self.streams) * len(self.estimators) * len(self.windows) * len(self.layer_pairs)

    def table(self) -> pd.DataFrame:
        """One row per specification with the columns of :data:`CHOICES`, in matrix order."""
        rows = [
            (point, mode, estimator, window, early, late)
            for point, mode in self.streams
            for estimator in self.estimators
            for window in self.windows
            for early, late in self.layer_pairs
        ]
        table = pd.DataFrame(rows, columns=list(CHOICES))
        for column in ("window", "layer_early", "layer_late"):
            table[column] = table[column].astype(np.int64)
        return table


def third_layers(n_layers: int, step: int = 1) -> tuple[list[int], list[int]]:
    """Default layer ranges: (layers l with 3 l < n, layers l with 3 l >= 2 n), each keeping
    every ``step``-th layer from its first. 30 layers: 0..9 and 20..29."""
    early = [layer for layer in range(n_layers) if 3 * layer < n_layers]
    late = [layer for layer in range(n_layers) if 3 * layer >= 2 * n_layers]
    return early[::step], late[::step]


def _check_choice_lists(config: RobustnessConfig) -> None:
    """One-line errors for grid settings that cannot work (before anything is loaded)."""
    if config.groups:
        raise ConfigError(
            "robustness compares two named groups: set recursive_group and baseline_group "
            "(or twin_group) instead of groups"
        )
    if not config.windows:
        raise ConfigError("give at least one window, e.g. --windows 8,16")
    for window in config.windows:
        if isinstance(window, bool) or not isinstance(window, int | np.integer) or window < 2:
            raise ConfigError(
                f"every window must be an integer of at least 2 tokens, got {window!r}"
            )
    for name, chosen, allowed, flag in (
        ("hook point", config.points, HOOK_POINTS, "--points"),
        ("PR mode", config.pr_modes, PR_MODES, "--pr-modes"),
        ("PR estimator", config.estimators, ESTIMATORS, "--estimators"),
    ):
        if not chosen:
            raise ConfigError(f"give at least one {name} with {flag}")
        bad = [c for c in chosen if c not in allowed]
        if bad:
            raise ConfigError(f"unknown {name} {bad[0]!r}: choose from {', '.join(allowed)}")
    if isinstance(config.layer_step, bool) or config.layer_step < 1:
        raise ConfigError(f"layer step must be at least 1, got {config.layer_step}")
    if isinstance(config.n_perm, bool) or not isinstance(config.n_perm, int) or config.n_perm < 1:
        raise ConfigError(f"n_perm must be a positive integer, got {config.n_perm!r}")
    if not 0.0 < config.alpha < 1.0:
        raise ConfigError(f"alpha must be between 0 and 1 (e.g. 0.05), got {config.alpha}")
    if config.twin_group is not None and config.twin_group == config.recursive_group:
        raise ConfigError(f"twin group and recursive group are both {config.twin_group!r}")
    if config.twin_group is None and config.baseline_group == config.recursive_group:
        raise ConfigError(f"baseline and recursive group are both {config.baseline_group!r}")


def _streams(points: Sequence[str], modes: Sequence[str]) -> list[tuple[str, str]]:
    """(point, mode) pairs: per-head only where the point has heads; a point left with no
    mode is an error."""
    streams = []
    for point in dict.fromkeys(points):
        usable = [m for m in dict.fromkeys(modes) if m == PR_MODE_WHOLE or point in HEAD_POINTS]
        if not usable:
            raise ConfigError(
                f"hook point {point!r} has no heads, so per-head PR is undefined there: add "
                "whole to --pr-modes or drop the point"
            )
        streams += [(point, mode) for mode in usable]
    return streams


def _checked_layers(adapter: Adapter, layers: Sequence[int], flag: str) -> list[int]:
    if not layers:
        raise ConfigError(f"give at least one layer with {flag}")
    for layer in layers:
        adapter.check_layer(int(layer))
    return sorted(set(int(layer) for layer in layers))


def build_grid(config: RobustnessConfig, adapter: Adapter) -> SpecGrid:
    """The specification grid of ``config`` for a model, every choice checked."""
    _check_choice_lists(config)
    for point in config.points:
        adapter.spec(point)
    early_default, late_default = third_layers(adapter.n_layers, config.layer_step)
    early = _checked_layers(
        adapter,
        config.early_layers if config.early_layers is not None else early_default,
        "--early-layers",
    )
    late = _checked_layers(
        adapter,
        config.late_layers if config.late_layers is not None else late_default,
        "--late-layers",
    )
    grid = SpecGrid(
        tuple(early),
        tuple(late),
        tuple(sorted(set(int(w) for w in config.windows))),
        tuple(_streams(config.points, config.pr_modes)),
        tuple(dict.fromkeys(config.estimators)),
    )
    if not grid.layer_pairs:
        raise ConfigError(
            f"no layer pair with early < late among early layers {early} and late layers "
            f"{late}: choose early layers below the late ones"
        )
    return grid


# ---------------------------------------------------------------------------- the contrast


@dataclass(frozen=True)
class ContrastDesign:
    """Which prompts are compared, and how.

    ``prompts``: the rows of the R_V matrix. Unpaired: ``labels`` (n,) True for the target
    (recursive) group. Paired: ``pairs`` (n_pairs, 2) row indices (recursive row, twin row).
    """

    design: str
    target_group: str
    control_group: str
    prompts: list[Prompt]
    labels: np.ndarray | None = None
    pairs: np.ndarray | None = None

    @property
    def effect(self) -> str:
        return "d_z" if self.design == DESIGN_PAIRED else "hedges_g"

    @property
    def unit(self) -> str:
        """What n counts: pairs or prompts."""
        return "pairs" if self.design == DESIGN_PAIRED else "prompts"


def _at_most(items: list, limit: int | None) -> list:
    """The first ``limit`` items (all when ``limit`` is None)."""
    return items if limit is None else items[:limit]


def contrast_design(prompt_set: PromptSet, config: RobustnessConfig) -> ContrastDesign:
    """The contrast's prompts (at most ``max_prompts`` per group, or pairs when paired)."""
    target = config.recursive_group
    if config.twin_group is not None:
        linked = _at_most(prompt_set.pairs(target, config.twin_group), config.max_prompts)
        if len(linked) < 2:
            raise PromptError(
                f"a paired contrast needs at least 2 pairs of {target} and "
                f"{config.twin_group}, found {len(linked)}: add pairs to the prompt file"
            )
        prompts = [p for pair in linked for p in pair]
        pairs = np.arange(len(prompts), dtype=np.int64).reshape(-1, 2)  # (n_pairs, 2)
        return ContrastDesign(DESIGN_PAIRED, target, config.twin_group, prompts, pairs=pairs)
    control = config.baseline_group
    chosen: list[Prompt] = []
    for group in (target, control):
        members = _at_most([p for p in prompt_set if p.group == group], config.max_prompts)
        if len(members) < 2:
            raise PromptError(
                f"group {group!r} has {len(members)} prompt(s) in {prompt_set.source}; the "
                f"contrast needs at least 2 per group (groups there: "
                f"{', '.join(prompt_set.groups()) or 'none'})"
            )
        chosen += members
    labels = np.array([p.group == target for p in chosen])
    return ContrastDesign(DESIGN_UNPAIRED, target, control, chosen, labels=labels)


def check_estimable(
    design: ContrastDesign, n_tokens: Sequence[int], windows: Sequence[int]
) -> None:
    """PromptError when no window leaves 2 prompts per group (or 2 pairs) long enough."""
    counts = np.asarray(n_tokens)
    for window in windows:
        long_enough = counts >= window
        if design.design == DESIGN_PAIRED:
            pairs = design.pairs
            if (long_enough[pairs[:, 0]] & long_enough[pairs[:, 1]]).sum() >= 2:
                return
        elif long_enough[design.labels].sum() >= 2 and long_enough[~design.labels].sum() >= 2:
            return
    raise PromptError(
        f"no specification is estimable: no window of {sorted(windows)} leaves 2 {design.unit} "
        f"per side with that many real tokens (longest prompt: {int(counts.max())} tokens); "
        "use smaller windows or longer prompts"
    )


# ---------------------------------------------------------------------------- measurement


class _WindowRows(dict):
    """A :class:`Trace` value store that keeps only the window rows of each captured tensor:
    (B, T, ...) is stored as (B, W, ...) at ``positions`` (B, W), so whole sequences of many
    layers never pile up in memory."""

    def __init__(self, positions: torch.Tensor) -> None:
        super().__init__()
        self.positions = positions  # (B, W)

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        super().__setitem__(key, take_windows(value, self.positions.to(value.device)))


def capture_windows(
    model: nn.Module,
    adapter: Adapter,
    batch: EncodedBatch,
    points: Sequence[str],
    layers: Sequence[int],
    width: int,
) -> dict[str, torch.Tensor]:
    """The last ``width`` token positions of every row at each point and layer, from one
    forward stopped after the deepest layer: point -> (B, L, width, ...) in ``layers`` order.

    A row with n < ``width`` real tokens starts with position 0 repeated ``width - n`` times;
    only its last n positions (every suffix of at most n) are real tokens.
    """
    layers = sorted(set(int(layer) for layer in layers))
    ends = torch.tensor([int(n) for n in batch.n_tokens]).unsqueeze(1)  # (B, 1)
    positions = (ends - width + torch.arange(width)).clamp(min=0)  # (B, width)
    addresses = [address(layer, point) for layer in layers for point in points]
    trace = Trace(model, adapter, capture=addresses, stop_after_layer=layers[-1])
    trace.values = _WindowRows(positions.to(batch.input_ids.device))
    with torch.no_grad(), trace:
        model(**batch.model_inputs(), use_cache=False)
    return {
        point: torch.stack([trace[address(layer, point)] for layer in layers], dim=1)
        for point in points
    }  # point -> (B, L, width, ...)


def windows_pr(
    windows: torch.Tensor, head_point: bool, mode: str, estimator: str
) -> tuple[np.ndarray, np.ndarray]:
    """PR of windows (..., W, H, D) at a head point or (..., W, d) at a stream point ->
    (PR (...) float64, reasons (...) object: None or why the PR is NaN).

    per-head: mean over heads of each head's PR (NaN if a head is NaN; the reason names the
    first such head); whole: PR of the (W, H*D) matrix. ``estimator`` plain or corrected.
    """
    pr_with_reason = _PR_WITH_REASON[estimator]
    if not head_point:
        pr, reasons = pr_with_reason(windows)  # (...)
        return pr.cpu().numpy(), np.array(reasons, dtype=object).reshape(pr.shape)
    if mode == PR_MODE_WHOLE:
        pr, reasons = pr_with_reason(windows.flatten(-2))  # (..., W, H*D) -> (...)
        return pr.cpu().numpy(), np.array(reasons, dtype=object).reshape(pr.shape)
    per_head, head_reasons = pr_with_reason(windows.transpose(-3, -2))  # (..., H)
    per_head = per_head.cpu().numpy()
    head_reasons = np.array(head_reasons, dtype=object).reshape(per_head.shape)
    pr = per_head.mean(axis=-1)  # (...)
    reasons = np.full(pr.shape, None, dtype=object)
    for index in zip(*np.nonzero(np.isnan(pr)), strict=True):
        first = next(
            ((h, r) for h, r in enumerate(head_reasons[index]) if r is not None),
            (None, "undefined PR"),
        )
        reasons[index] = f"head {first[0]}: {first[1]}" if first[0] is not None else first[1]
    return pr, reasons


def measure_batch(lm, batch: PromptBatch, grid: SpecGrid) -> pd.DataFrame:
    """Tidy PR rows of one prompt batch: prompt_id, n_tokens, point, pr_mode, estimator,
    window, layer, pr, nan_reason (rows shorter than the window: NaN with that reason)."""
    encoded = batch.encode(lm)
    n_tokens = np.asarray(encoded.n_tokens)  # (B,)
    width = max(grid.windows)
    layers = grid.layers
    captured = capture_windows(lm.model, lm.adapter, encoded, grid.points, layers, width)
    ids = np.array([p.id for p in batch.prompts], dtype=object)
    n_rows, n_layers = len(ids), len(layers)
    frames = []
    for point, mode in grid.streams:
        for window in grid.windows:
            suffix = captured[point][:, :, width - window :]  # (B, L, W, ...)
            short = n_tokens < window  # (B,)
            for estimator in grid.estimators:
                pr, reasons = windows_pr(suffix, point in HEAD_POINTS, mode, estimator)  # (B, L)
                pr = pr.copy()
                pr[short] = np.nan
                for row in np.flatnonzero(short):
                    reasons[row, :] = (
                        f"{n_tokens[row]} real tokens, fewer than the {window}-token window"
                    )
                frames.append(
                    pd.DataFrame(
                        {
                            "prompt_id": np.repeat(ids, n_layers),
                            "n_tokens": np.repeat(n_tokens, n_layers),
                            "point": point,
                            "pr_mode": mode,
                            "estimator": estimator,
                            "window": np.int64(window),
                            "layer": np.tile(np.asarray(layers, dtype=np.int64), n_rows),
                            "pr": pr.reshape(-1),
                            "nan_reason": reasons.reshape(-1),
                        }
                    )
                )
    return pd.concat(frames, ignore_index=True)


def r_v_matrix(pr: pd.DataFrame, prompt_ids: Sequence[str], grid: SpecGrid) -> np.ndarray:
    """R_V per prompt and specification (n_prompts, n_specs), columns in the order of
    ``grid.table()``; NaN where a PR is NaN (too short, zero or non-finite window)."""
    streams = {stream: i for i, stream in enumerate(grid.streams)}
    estimators = {e: i for i, e in enumerate(grid.estimators)}
    windows = {w: i for i, w in enumerate(grid.windows)}
    layers = {layer: i for i, layer in enumerate(grid.layers)}
    rows = pd.Index(list(prompt_ids))
    prompt_pos = rows.get_indexer(pr["prompt_id"])
    keep = prompt_pos >= 0
    frame = pr.loc[keep]
    stream_pos = [streams[(p, m)] for p, m in zip(frame["point"], frame["pr_mode"], strict=True)]
    shape = (len(rows), len(streams), len(estimators), len(windows), len(layers))
    values = np.full(shape, np.nan)  # (P, St, E, Wn, L)
    filled = np.zeros(shape, dtype=bool)
    index = (
        prompt_pos[keep],
        np.asarray(stream_pos, dtype=np.int64),
        frame["estimator"].map(estimators).to_numpy(dtype=np.int64),
        frame["window"].map(windows).to_numpy(dtype=np.int64),
        frame["layer"].map(layers).to_numpy(dtype=np.int64),
    )
    values[index] = frame["pr"].to_numpy(dtype=np.float64)
    filled[index] = True
    if not filled.all():
        raise RuntimeError("PR rows are missing for some prompt or specification")
    early = [layers[e] for e in grid.early_layers]
    late = [layers[lt] for lt in grid.late_layers]
    pr_early = values[..., early][..., :, None]  # (P, St, E, Wn, Le, 1)
    pr_late = values[..., late][..., None, :]  # (P, St, E, Wn, 1, Ll)
    ratio = r_v(pr_late, pr_early)  # (P, St, E, Wn, Le, Ll)
    valid = np.array([[e < lt for lt in grid.late_layers] for e in grid.early_layers]).reshape(-1)
    ratio = ratio.reshape(*ratio.shape[:4], -1)[..., valid]  # (P, St, E, Wn, n_pairs)
    return ratio.reshape(len(rows), -1)  # (P, S)


# ---------------------------------------------------------------------------- statistics


@dataclass
class RobustnessResult:
    """Everything a robustness run writes, and the specification curve it came from."""

    pr: pd.DataFrame  # one row per prompt x point x pr_mode x estimator x window x layer
    values: np.ndarray  # (n_prompts, n_specs) R_V, rows in design order
    rows: pd.DataFrame  # the rows of ``values``: prompt_id, group, n_tokens
    specs: pd.DataFrame  # the spec_curve table
    details: pd.DataFrame  # per-specification counts, curve rank, reference flag
    joint: pd.DataFrame  # one row: the joint test
    factors: pd.DataFrame  # eta^2 per choice (empty with fewer than 2 estimable specs)
    windows: pd.DataFrame  # prompts too short per window and group
    reference: pd.DataFrame  # full contrast of the reference spec (empty if not in the grid)
    curve: SpecificationCurve
    design: ContrastDesign
    grid: SpecGrid
    reference_layers: tuple[int, int]
    reference_window: int
    timings: dict[str, float]


def _spec_counts(
    values: np.ndarray, n_tokens: np.ndarray, spec_windows: np.ndarray, design: ContrastDesign
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(units, too short, NaN among the long-enough) per specification (S,) each, counting
    prompts (unpaired) or pairs (paired)."""
    short = n_tokens[:, None] < spec_windows[None, :]  # (P, S)
    finite = np.isfinite(values)  # (P, S)
    if design.design == DESIGN_PAIRED:
        first, second = design.pairs[:, 0], design.pairs[:, 1]
        short = short[first] | short[second]  # (n_pairs, S)
        finite = finite[first] & finite[second]  # (n_pairs, S)
    total = np.full(values.shape[1], short.shape[0])
    return total, short.sum(axis=0), (~short & ~finite).sum(axis=0)


def _reason(base: object, window: int, total: int, short: int, nan: int, unit: str, longest: int):
    """Why a specification is not estimable (None when it is), with its exclusion counts."""
    if base is None or (isinstance(base, float) and math.isnan(base)):
        return None
    if short == total:
        both = " in both prompts" if unit == "pairs" else ""
        return f"no {unit[:-1]} has {window} real tokens{both} (the longest prompt has {longest})"
    parts = [str(base)]
    if short:
        parts.append(f"{short} {unit} shorter than the {window}-token window")
    if nan:
        parts.append(f"{nan} {unit} with NaN R_V (see nan_reason in the pr table)")
    return "; ".join(parts)


def _window_table(design: ContrastDesign, n_tokens: np.ndarray, grid: SpecGrid) -> pd.DataFrame:
    rows = []
    groups = np.array([p.group for p in design.prompts])
    ids = np.array([p.id for p in design.prompts])
    for window in grid.windows:
        for group in (design.target_group, design.control_group):
            members = groups == group
            short = members & (n_tokens < window)
            listed = ", ".join(ids[short][:_MAX_IDS_LISTED])
            more = short.sum() - _MAX_IDS_LISTED
            rows.append(
                {
                    "window": window,
                    "group": group,
                    "n_prompts": int(members.sum()),
                    "n_too_short": int(short.sum()),
                    "too_short_ids": listed + (f" (and {more} more)" if more > 0 else ""),
                }
            )
    return pd.DataFrame(rows)


def _reference_index(table: pd.DataFrame, window: int, layers: tuple[int, int]) -> int | None:
    """Row of the reference specification in the grid table, or None."""
    match = (
        (table["point"] == REFERENCE_POINT)
        & (table["pr_mode"] == PR_MODE_PER_HEAD)
        & (table["estimator"] == ESTIMATOR_PLAIN)
        & (table["window"] == window)
        & (table["layer_early"] == layers[0])
        & (table["layer_late"] == layers[1])
    )
    hits = np.flatnonzero(match.to_numpy())
    return int(hits[0]) if hits.size else None


def _reference_table(
    values: np.ndarray, index: int | None, table: pd.DataFrame, design: ContrastDesign, config
) -> pd.DataFrame:
    """Full contrast (bootstrap CI over prompts, tests) of the reference specification."""
    if index is None:
        return pd.DataFrame()
    column = values[:, index]
    if design.design == DESIGN_PAIRED:
        full = paired_contrast(
            column[design.pairs[:, 0]],
            column[design.pairs[:, 1]],
            n_boot=config.n_boot,
            n_perm=config.n_perm,
            seed=config.seed,
        ).to_dict()
    else:
        full = contrast(
            column[design.labels],
            column[~design.labels],
            n_boot=config.n_boot,
            n_perm=config.n_perm,
            seed=config.seed,
        ).to_dict()
    choices = table.iloc[index].to_dict()
    return pd.DataFrame([{"spec_id": index, **choices, **full}])


def analyse(
    values: np.ndarray,
    n_tokens: np.ndarray,
    design: ContrastDesign,
    grid: SpecGrid,
    config: RobustnessConfig,
    reference_layers: tuple[int, int],
) -> dict:
    """The spec_curve, details, joint, factors, windows and reference tables and the curve
    of an R_V matrix (n_prompts, n_specs) in grid order."""
    grid_table = grid.table()
    curve = specification_curve(
        values,
        labels=design.labels,
        pairs=design.pairs,
        effect=design.effect,
        spec_table=grid_table,
        n_perm=config.n_perm,
        alpha=config.alpha,
        ci=CI_LEVEL,
        seed=config.seed,
    )
    out = curve.specs
    total, short, nan = _spec_counts(values, n_tokens, grid_table["window"].to_numpy(), design)
    longest = int(n_tokens.max())
    estimable = out["estimable"].to_numpy(dtype=bool)
    p_bh = benjamini_hochberg(np.where(estimable, out["p"].to_numpy(dtype=float), np.nan))
    n_used = (
        out["n_target"].to_numpy()
        if design.design == DESIGN_PAIRED
        else (out["n_target"] + out["n_control"]).to_numpy()
    )
    reasons = [
        _reason(base, w, t, s, m, design.unit, longest)
        for base, w, t, s, m in zip(
            out["reason"], grid_table["window"], total, short, nan, strict=True
        )
    ]
    specs = pd.DataFrame({"spec_id": np.arange(len(out), dtype=np.int64)})
    specs = pd.concat([specs, grid_table], axis=1)
    specs["effect"] = out["effect"].to_numpy()
    specs["ci_low"] = out["ci_low"].to_numpy()
    specs["ci_high"] = out["ci_high"].to_numpy()
    specs["p"] = out["p"].to_numpy()
    specs["p_bh"] = p_bh
    specs["significant"] = estimable & (out["p"].to_numpy() < config.alpha)
    specs["n"] = n_used.astype(np.int64)
    specs["estimable"] = estimable
    specs["reason"] = pd.Series(reasons, dtype=object)

    reference = _reference_index(grid_table, config.window, reference_layers)
    details = pd.DataFrame(
        {
            "spec_id": specs["spec_id"],
            "n_target": out["n_target"].to_numpy(),
            "n_control": out["n_control"].to_numpy(),
            "n_too_short": short.astype(np.int64),
            "n_nan": nan.astype(np.int64),
            "curve_rank": out["curve_rank"].to_numpy(),
            "reference": specs["spec_id"] == (reference if reference is not None else -1),
        }
    )
    joint = pd.DataFrame(
        [
            {
                "design": curve.design,
                "effect": curve.effect,
                "target_group": design.target_group,
                "control_group": design.control_group,
                **_curve_summary(curve),
                "n_perm": curve.n_perm,
                "alpha": curve.alpha,
                "seed": curve.seed,
            }
        ]
    )
    if curve.n_estimable >= 2:
        factors = effect_variance_by_factor(specs, list(CHOICES))
    else:
        factors = pd.DataFrame()
    return {
        "specs": specs,
        "details": details,
        "joint": joint,
        "factors": factors,
        "windows": _window_table(design, n_tokens, grid),
        "reference": _reference_table(values, reference, grid_table, design, config),
        "curve": curve,
    }


def measure_robustness(
    lm, prompt_set: PromptSet, config: RobustnessConfig, run=None
) -> RobustnessResult:
    """Measure every specification on a loaded model and a prompt set and test them jointly.

    ``run`` (an open :class:`rloop.runs.Run`) makes it resumable: the PR rows of finished
    batches are saved and skipped when the run is resumed.
    """
    grid = build_grid(config, lm.adapter)
    design = contrast_design(prompt_set, config)
    n_tokens = np.asarray(token_counts(lm.tokenizer, [p.text for p in design.prompts]))
    check_estimable(design, n_tokens, grid.windows)
    reference_layers = default_layers(lm.adapter.n_layers)

    started = time.perf_counter()
    batches = prompt_batches(lm, design.prompts, config.batch_size)
    pr = run_units(
        run,
        batches,
        lambda batch: measure_batch(lm, batch, grid),
        key=lambda batch: batch.key,
        label="measuring PR",
        weight=lambda batch: len(batch.prompts),
    )
    measured = time.perf_counter() - started
    groups = {p.id: p.group for p in design.prompts}
    pr.insert(1, "group", pr["prompt_id"].map(groups))
    pr = pr.sort_values(
        ["point", "pr_mode", "estimator", "window", "prompt_id", "layer"], ignore_index=True
    )
    prompt_ids = [p.id for p in design.prompts]
    values = r_v_matrix(pr, prompt_ids, grid)  # (P, S)
    tables = analyse(values, n_tokens, design, grid, config, reference_layers)
    rows = pd.DataFrame(
        {"prompt_id": prompt_ids, "group": [p.group for p in design.prompts], "n_tokens": n_tokens}
    )
    timings = {"measure_s": measured, "stats_s": time.perf_counter() - started - measured}
    return RobustnessResult(
        pr=pr,
        values=values,
        rows=rows,
        design=design,
        grid=grid,
        reference_layers=reference_layers,
        reference_window=config.window,
        timings=timings,
        **tables,
    )


# ---------------------------------------------------------------------------- report


def _fmt(value: float, digits: int = 3) -> str:
    return "NaN" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def _curve_summary(curve) -> dict:
    """The joint-inference numbers of a specification curve, by name."""
    names = (
        "n_specs",
        "n_estimable",
        "n_not_estimable",
        "median_effect",
        "share_significant_positive",
        "share_significant_negative",
        "p_median",
        "p_share_significant",
    )
    return {name: getattr(curve, name) for name in names}


def _headline(result: RobustnessResult) -> dict:
    curve = result.curve
    headline = {
        "design": curve.design,
        "effect": curve.effect,
        **_curve_summary(curve),
    }
    if not result.factors.empty:
        headline["top_factor"] = str(result.factors.iloc[0]["factor"])
    reference = result.details[result.details["reference"]]
    if len(reference):
        spec = result.specs.loc[int(reference.iloc[0]["spec_id"])]
        headline["reference_effect"] = float(spec["effect"])
    return headline


def _curve_position(result: RobustnessResult) -> str:
    """Where the reference specification sits on the curve, in one line."""
    reference = result.details[result.details["reference"]]
    early, late = result.reference_layers
    where = f"V, per-head, plain PR, window {result.reference_window}, layers {early}/{late}"
    if not len(reference):
        return f"The reference specification ({where}) is not in this grid."
    row = reference.iloc[0]
    spec = result.specs.loc[int(row["spec_id"])]
    if not spec["estimable"]:
        return f"The reference specification ({where}) is not estimable: {spec['reason']}."
    rank = int(row["curve_rank"]) + 1
    return (
        f"The reference specification ({where}, what `rloop contraction` reports by default) "
        f"has effect {_fmt(spec['effect'])} [{_fmt(spec['ci_low'])}, {_fmt(spec['ci_high'])}], "
        f"rank {rank} of {result.curve.n_estimable} (1 = most negative)."
    )


def report_markdown(result: RobustnessResult, config: RobustnessConfig, model: str) -> str:
    """summary.md of a robustness run."""
    curve, design, grid = result.curve, result.design, result.grid
    paired = design.design == DESIGN_PAIRED
    effect_name = "d_z (paired)" if paired else "Hedges' g"
    lines = [
        "# Robustness: specification curve of the R_V contrast",
        "",
        f"- model: {model}",
        f"- contrast: {design.target_group} vs {design.control_group} "
        f"({'paired by pair_id' if paired else 'two independent groups'}); effect {effect_name} "
        f"of R_V = PR(late) / PR(early), {design.target_group} minus {design.control_group} "
        "(negative: contraction)",
        f"- grid: early layers {list(grid.early_layers)} x late layers "
        f"{list(grid.late_layers)} ({len(grid.layer_pairs)} pairs with early < late), windows "
        f"{list(grid.windows)}, streams {', '.join(f'{p}/{m}' for p, m in grid.streams)}, "
        f"estimators {', '.join(grid.estimators)}",
        f"- {curve.n_specs} specifications, {curve.n_estimable} estimable, "
        f"{curve.n_not_estimable} not estimable",
        "",
        "## Headline",
        "",
    ]
    if curve.n_estimable == 0:
        lines += ["**No specification is estimable**; see `reason` in spec_curve.csv.", ""]
    else:
        lines += [
            f"- median effect over estimable specifications: **{_fmt(curve.median_effect)}** "
            f"(joint permutation p = {_fmt(curve.p_median)}, {curve.n_perm} draws)",
            f"- significant at alpha {curve.alpha}: {curve.share_significant_negative:.0%} "
            f"negative, {curve.share_significant_positive:.0%} positive (joint p of the share "
            f"= {_fmt(curve.p_share_significant)})",
            f"- {_curve_position(result)}",
            "",
            "The joint test "
            + ("flips the sign of each pair's difference" if paired else "permutes the labels")
            + " once per draw for all specifications together, so it accounts for their "
            "correlation.",
            "",
        ]
    if not result.factors.empty:
        top = result.factors.iloc[0]
        lines += [
            "## Which choices move the result",
            "",
            f"The effect varies most with **{top['factor']}** (eta^2 = "
            f"{_fmt(top['eta_squared'], 2)}; level means {_fmt(top['lowest_level_mean'])} to "
            f"{_fmt(top['highest_level_mean'])}).",
            "",
            markdown_table(
                result.factors[
                    ["factor", "n_levels", "eta_squared", "lowest_level_mean", "highest_level_mean"]
                ]
            ),
            "",
            f"Effect by level of {top['factor']} (estimable specifications):",
            "",
            markdown_table(_level_table(result.specs, str(top["factor"]))),
            "",
        ]
    lines += _not_estimable_lines(result)
    lines += _exclusion_lines(result)
    lines += [
        "Files: `spec_curve.*` (one row per specification), `spec_details.*` (counts, curve "
        "rank), `joint.*`, `factors.*`, `windows.*` (prompts too short per window), "
        "`reference.*` (full contrast of the reference specification), `pr.*` (PR per prompt, "
        "stream, estimator, window and layer), `plots/spec_curve.png`.",
    ]
    return "\n".join(lines) + "\n"


def _level_table(specs: pd.DataFrame, factor: str) -> pd.DataFrame:
    """n, median effect and share significant per level of one choice (estimable specs)."""
    used = specs[specs["estimable"]]
    grouped = used.groupby(factor, sort=True)
    return pd.DataFrame(
        {
            factor: list(grouped.groups),
            "n_specs": grouped.size().to_numpy(),
            "median_effect": grouped["effect"].median().to_numpy(),
            "share_significant": grouped["significant"].mean().to_numpy(),
        }
    )


def _not_estimable_lines(result: RobustnessResult) -> list[str]:
    specs = result.specs
    missing = specs[~specs["estimable"]]
    lines: list[str] = []
    if len(missing):
        counts = missing["reason"].value_counts()
        lines += ["## Not estimable", ""]
        lines += [f"- {n} specifications: {reason}" for reason, n in counts.items()]
        lines.append("")
    with_nan = result.details[(result.details["n_nan"] > 0) & specs["estimable"]]
    if len(with_nan):
        lines += [
            f"{len(with_nan)} estimable specifications left out some {result.design.unit} "
            "with NaN R_V (counted in `n_nan` of spec_details; reasons in the pr table).",
            "",
        ]
    return lines


def _exclusion_lines(result: RobustnessResult) -> list[str]:
    windows = result.windows
    short = windows[windows["n_too_short"] > 0]
    if short.empty:
        return []
    lines = ["## Prompts shorter than the window (left out of those specifications)", ""]
    lines.append(markdown_table(short[["window", "group", "n_prompts", "n_too_short"]]))
    return [*lines, ""]


def write_plots(result: RobustnessResult, plot_path) -> list[Path]:
    """The specification curve with its choice panel (PNG), when any spec is estimable."""
    if result.curve.n_estimable == 0:
        return []
    label = "d_z (paired)" if result.design.design == DESIGN_PAIRED else "Hedges' g"
    title = (
        f"{result.design.target_group} vs {result.design.control_group}: median "
        f"{_fmt(result.curve.median_effect)}, joint p {_fmt(result.curve.p_median)}"
    )
    reference = result.details.loc[result.details["reference"], "spec_id"]
    return [
        specification_curve_plot(
            result.specs,
            list(CHOICES),
            plot_path("spec_curve"),
            effect_label=f"{label} of R_V",
            title=title,
            highlight=int(reference.iloc[0]) if len(reference) else None,
            highlight_label="reference specification",
        )
    ]


def _validate(config: RobustnessConfig) -> None:
    check_settings(config)
    _check_choice_lists(config)


def run_robustness(
    config: RobustnessConfig, out: Path | None = None, force: bool = False, lm=None
) -> tuple[Path, bool, dict]:
    """Full pipeline with a run record. Returns (run_dir, already_complete, headline).

    Every check that can be made before measuring (settings, grid, prompt file, groups
    present with at least 2 prompts each or pairs, at least one window the prompts are long
    enough for, no prompt longer than the model's context) happens before the run directory
    is created, so bad input writes nothing. When no specification turns out estimable the
    tables are written and the run fails with a one-line error.
    """
    _validate(config)
    twin_flag = "--twin-group" if config.twin_group is not None else "--baseline-group"
    contrast = {"--recursive-group": config.recursive_group,
                twin_flag: config.twin_group or config.baseline_group}  # fmt: skip
    every_group = load_prompt_set(config.prompts, config.bank_version)
    check_groups(limit_per_group(every_group, config.max_prompts), contrast)
    prompt_set = every_group.select(contrast.values())
    design = contrast_design(prompt_set, config)
    lm = load(config, lm, verify=False)
    grid = build_grid(config, lm.adapter)
    n_tokens = token_counts(lm.tokenizer, [p.text for p in design.prompts])
    check_estimable(design, n_tokens, grid.windows)
    used = PromptSet(design.prompts, prompt_set.source, prompt_set.version, prompt_set.sha256)
    check_context(used, lm)
    verify_if_asked(config, lm, used)

    def body(run) -> dict:
        record_model_and_prompts(run, lm, used)
        result = measure_robustness(lm, used, config, run=run)
        run.write_table("spec_curve", result.specs)
        run.write_table("spec_details", result.details)
        run.write_table("joint", result.joint)
        run.write_table("windows", result.windows)
        run.write_table("pr", result.pr)
        if not result.factors.empty:
            run.write_table("factors", result.factors)
        if not result.reference.empty:
            run.write_table("reference", result.reference)
        write_plots(result, run.plot_path)
        run.write_summary(report_markdown(result, config, model_line(lm)))
        run.update_manifest(
            grid={
                "early_layers": list(grid.early_layers),
                "late_layers": list(grid.late_layers),
                "layer_pairs": len(grid.layer_pairs),
                "windows": list(grid.windows),
                "streams": [list(s) for s in grid.streams],
                "estimators": list(grid.estimators),
                "n_specs": grid.n_specs,
            },
            layers={
                "reference_early": result.reference_layers[0],
                "reference_late": result.reference_layers[1],
                "rule": "reference: depth fractions; grid: see grid",
            },
            timings=result.timings,
        )
        if result.curve.n_estimable == 0:
            reasons = result.specs["reason"].value_counts()
            raise ConfigError(
                f"no specification is estimable (most common reason, {reasons.iloc[0]} of "
                f"{result.curve.n_specs}: {reasons.index[0]}); change the grid or the prompts"
            )
        return _headline(result)

    return execute(EXPERIMENT, config.to_dict(), lm.name, out, body, force=force).as_tuple()
