"""Fidelity self-check on the user's own model: does rloop measure what it claims on *this* model?

Every check runs on the loaded model in its own dtype and on its own device, on a few short
prompts of different lengths, and gives one row of a table (:func:`verify_model`):

====================  ==========================================================================
check                 compares
====================  ==========================================================================
attention_recompute   softmax(QK^T)·V per head (the model's own eager attention weights, the
                      captured V with each KV head repeated over its query group), then the output
                      projection, against the captured z and the attention block's output, at every
                      layer (SCIENCE.md §1). A wrong V layout fails here.
hooked_forward        logits of a forward with a Trace capturing every point at several layers, and
                      of :class:`~rloop.capture.trace.LastTokenLogits`, and values captured by a
                      forward stopped early, against a plain forward: hooks must only read.
identity_edit         a forward with identity edits at every point of several layers, against none.
batched_r_v           R_V (per-head and whole) of a right-padded batch of prompts of different
                      lengths against each prompt alone (padding correctness).
cached_generation_v   V captured step by step during greedy KV-cached generation (left-padded batch)
                      against V of one full forward over the same final token sequence (§4).
kv_mix_alpha0         KV mixing with alpha = 0 (a shorter source) against natural target generation:
                      greedy tokens must be equal, V and first-step logits within tolerance.
kv_mix_alpha1         alpha = 1 over all layers (a source with the target's memory length and last
                      token) against natural generation of that source.
head_ablation         zero ablation of sampled heads through the z hook against zeroing that head's
                      input columns of the output projection's weights (§3).
dtype_drift           bfloat16 / float16 only: R_V of the same prompts against a float32 copy of the
                      model (SKIP in float32).
====================  ==========================================================================

Errors. For two tensors ``got`` and ``want`` (a reference), ``max_abs_error = max|got - want|``
and ``max_rel_error = max_abs_error / max|want|`` (relative to the reference's largest entry;
elementwise relative error is meaningless for entries near zero). A comparison passes when
every value is finite and ``max_abs_error <= atol + rtol * max|want|``. R_V comparisons are of
scalars per prompt and use the elementwise form ``|got - want| <= atol + rtol * |want|``.

Tolerances (rtol / atol), per model dtype:

- float32: 1e-4 / 1e-5. Machine epsilon is 1.2e-7; two evaluation orders of the same network
  (a batch vs one row, a KV cache vs one forward, einsum vs the model's matmul) differ by
  reassociation errors of about sqrt(d) * eps per matmul, compounded over the layers: 1e-6 to
  1e-5 of the largest activation on 30-layer models. 1e-4 keeps a tenfold margin and is the
  range of TransformerLens's float32 parity tests (5e-5); a wrong layout or hook gives O(1).
- bfloat16: 2e-2 / 1e-2. Epsilon is 7.8e-3 (8 significant bits), so one rounding alone can move
  an entry by 3.9e-3 of itself; two evaluation orders differ by a few roundings after a deep
  stack. TransformerLens uses 1e-2 for bf16 parity; 2e-2 of the largest entry is about two
  units in the last place there and still 50 times below what a wrong V gives.
- float16: 1e-2 / 1e-3. Epsilon is 9.8e-4 (8 times finer than bfloat16), but float16's narrow
  range lets deep activations grow to where a unit in the last place is large: KV-cached
  generation of SmolLM2-135M in float16 differed from one full forward by 3.1e-3 of the
  largest V entry (CPU), so 5e-3 would leave no margin.
- float64: 1e-9 / 1e-12.

Checks whose result must be bit-identical (hooks that only read, identity edits, alpha end
points) use the same tolerance but say in ``detail`` whether the result was bit-identical.

dtype drift: SCIENCE.md §7 sets float32 on CPU and bfloat16 on GPU (float16 overflows in deep
Pythia layers), with metrics accumulated in float64 whatever the model dtype. The check measures
how far R_V in the model's reduced precision is from R_V in float32, relative per prompt:
tolerance 5e-2 for bfloat16, 2e-2 for float16, i.e. what one needs for a drift well below the
R_V differences between prompt groups that experiments report (SmolLM2-135M on CPU: 1.0e-2 in
bfloat16, 9.4e-4 in float16). Non-finite activations (float16 overflow) fail it by name. The
float32 copy needs about three times the model's memory on its device; without it the check is
a SKIP with the reason.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from rloop.capture.attention import eager_attention
from rloop.capture.batching import encode
from rloop.capture.generation import (
    SamplingConfig,
    generate,
    pad_id_of,
    tokenize_rows,
)
from rloop.capture.trace import LastTokenLogits, Trace, address
from rloop.errors import ConfigError, PromptError, RloopError
from rloop.interventions.edits import head_ablation_edit, keep_mask
from rloop.interventions.engine import measure_pr, resolve_layers
from rloop.interventions.kv_cache import PatchRow, patched_generate
from rloop.metrics import PR_MODES, check_window_lengths
from rloop.prompts import DEFAULT_BANK_VERSION
from rloop.runs.markdown import markdown_table

EXPERIMENT = "verify"
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
CHECKS = (
    "attention_recompute",
    "hooked_forward",
    "identity_edit",
    "batched_r_v",
    "cached_generation_v",
    "kv_mix_alpha0",
    "kv_mix_alpha1",
    "head_ablation",
    "dtype_drift",
)
COLUMNS = [
    "check",
    "status",
    "reason",
    "max_abs_error",
    "max_rel_error",
    "tolerance",
    "atol",
    "dtype",
    "detail",
    "seconds",
]
_POINTS = ("q", "k", "v", "z", "attn_out", "mlp_out", "resid_pre", "resid_post")
SCIENCE_DTYPE_RULE = (
    "SCIENCE.md §7: float32 on CPU, bfloat16 on GPU by default (float16 overflows in deep "
    "layers of Pythia); metrics accumulate in float64 whatever the model dtype"
)


class VerificationError(RloopError):
    """A fidelity check failed on this model: rloop's numbers on it cannot be trusted."""


@dataclass(frozen=True)
class Tolerance:
    """Pass when max|got - want| <= atol + rtol * max|want| (see the module docstring)."""

    rtol: float
    atol: float


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(1e-9, 1e-12),
    torch.float32: Tolerance(1e-4, 1e-5),
    torch.bfloat16: Tolerance(2e-2, 1e-2),
    torch.float16: Tolerance(1e-2, 1e-3),
}
DRIFT_TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.bfloat16: Tolerance(5e-2, 0.0),
    torch.float16: Tolerance(2e-2, 0.0),
}


def tolerance_for(dtype: torch.dtype) -> Tolerance:
    """The comparison tolerance of a model dtype (module docstring); ConfigError if unknown."""
    if dtype not in TOLERANCES:
        raise ConfigError(
            f"no verification tolerance for dtype {dtype}: use float32, bfloat16 or float16"
        )
    return TOLERANCES[dtype]


@dataclass
class VerifyConfig:
    """Settings of ``rloop verify``. Prompts: ``n_prompts`` of different token lengths (at
    least ``window``) from the shipped bank or ``prompts`` (a file); ``heads_sample`` seeded
    random (layer, head) pairs for the ablation check; ``max_new_tokens`` greedy tokens for the
    generation checks; ``layers`` EARLY, LATE for R_V (None = depth fractions)."""

    model: str = "smollm2-135m"
    revision: str | None = None
    dtype: str | None = None
    device: str | None = None
    prompts: str | None = None
    bank_version: str = DEFAULT_BANK_VERSION  # v2; "v1" stays loadable
    n_prompts: int = 4
    window: int = 16
    layers: list[int] | None = None
    max_new_tokens: int = 8
    heads_sample: int = 3
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        """Raise ConfigError for a setting out of range."""
        if isinstance(self.n_prompts, bool) or int(self.n_prompts) < 2:
            raise ConfigError(
                f"verify needs at least 2 prompts (of different lengths), got {self.n_prompts}"
            )
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 2:
            raise ConfigError(f"window must be an integer of at least 2 tokens, got {self.window}")
        if int(self.max_new_tokens) < 1:
            raise ConfigError(
                f"max_new_tokens must be at least 1 for the generation checks, got "
                f"{self.max_new_tokens}"
            )
        if int(self.heads_sample) < 1:
            raise ConfigError(f"heads_sample must be at least 1, got {self.heads_sample}")


# ------------------------------------------------------------------ comparisons


@dataclass
class Comparison:
    """Result of comparing ``got`` with a reference ``want``."""

    max_abs: float
    max_rel: float
    passed: bool
    finite: bool
    bit_identical: bool

    @staticmethod
    def combine(parts: Sequence[Comparison]) -> Comparison:
        return Comparison(
            max_abs=max(p.max_abs for p in parts),
            max_rel=max(p.max_rel for p in parts),
            passed=all(p.passed for p in parts),
            finite=all(p.finite for p in parts),
            bit_identical=all(p.bit_identical for p in parts),
        )


def compare(
    got: torch.Tensor, want: torch.Tensor, tolerance: Tolerance, elementwise: bool = False
) -> Comparison:
    """Compare two tensors of the same shape in float64 (see the module docstring).

    elementwise False: relative to max|want|; True: relative to each |want| entry (scalars
    per prompt, such as R_V).
    """
    if tuple(got.shape) != tuple(want.shape):
        raise ConfigError(f"cannot compare shapes {tuple(got.shape)} and {tuple(want.shape)}")
    a = got.detach().cpu().to(torch.float64)  # (...)
    b = want.detach().cpu().to(torch.float64)  # (...)
    bit_identical = bool(torch.equal(got.detach().cpu(), want.detach().cpu()))
    finite = bool(torch.isfinite(a).all() and torch.isfinite(b).all())
    if a.numel() == 0:
        return Comparison(0.0, 0.0, True, True, True)
    if not finite:
        return Comparison(math.inf, math.inf, False, False, False)
    diff = (a - b).abs()  # (...)
    max_abs = float(diff.max())
    if elementwise:
        scale = b.abs()  # (...)
        allowed = tolerance.atol + tolerance.rtol * scale  # (...)
        passed = bool((diff <= allowed).all())
        rel = torch.where(scale > 0, diff / torch.where(scale > 0, scale, 1.0), diff * math.inf)
        rel = torch.where(diff == 0, 0.0, rel)  # (...)
        max_rel = float(rel.max())
    else:
        scale = float(b.abs().max())
        passed = max_abs <= tolerance.atol + tolerance.rtol * scale
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    return Comparison(max_abs, max_rel, passed, finite, bit_identical)


@dataclass
class CheckResult:
    """One row of the checks table (before the common columns are added)."""

    check: str
    status: str
    reason: str = ""
    max_abs_error: float = math.nan
    max_rel_error: float = math.nan
    tolerance: float = math.nan
    atol: float = math.nan
    detail: str = ""


def _from_comparison(
    check: str, result: Comparison, tolerance: Tolerance, detail: str, extra_failure: str = ""
) -> CheckResult:
    if not result.finite:
        status, reason = FAIL, "non-finite values"
    elif extra_failure:
        status, reason = FAIL, extra_failure
    elif not result.passed:
        status = FAIL
        reason = (
            f"max error {result.max_abs:.3g} (relative {result.max_rel:.3g}) exceeds "
            f"rtol {tolerance.rtol:g} / atol {tolerance.atol:g}"
        )
    else:
        status, reason = PASS, ""
    exact = "bit-identical" if result.bit_identical else "not bit-identical"
    return CheckResult(
        check=check,
        status=status,
        reason=reason,
        max_abs_error=result.max_abs,
        max_rel_error=result.max_rel,
        tolerance=tolerance.rtol,
        atol=tolerance.atol,
        detail=f"{detail}; {exact}",
    )


# ------------------------------------------------------------------ model helpers


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def recompute_attention(
    model: nn.Module, adapter, layer: int, weights: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``layer`` recomputed from its weights and captured V.

    weights: (B, H, T, T) softmax(QK^T) as the model computed it; v: (B, T, Hkv, D) the
    captured value vectors. Query head h reads KV head h // (H / Hkv) (grouped-query
    attention). Returns (z (B, T, H, D) float32, attention output (B, T, d_model) in the
    model's dtype: the output projection applied to z).
    """
    group = adapter.n_heads // adapter.n_kv_heads
    v_per_query = v.float().repeat_interleave(group, dim=2)  # (B, T, H, D)
    z = torch.einsum("bhts,bshd->bthd", weights.float(), v_per_query)  # (B, T, H, D)
    o_proj = adapter.module_for(model, layer, "z")
    dtype = next(o_proj.parameters()).dtype
    with torch.no_grad():
        out = o_proj(z.to(dtype).flatten(-2))  # (B, T, d_model)
    return z, out


def _real(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Entries of real tokens: values (B, T, ...) with mask (B, T) -> (N, ...)."""
    return values[mask.to(values.device).bool()]


def _rows_text(lengths: Sequence[int]) -> str:
    return f"{len(lengths)} prompts of {', '.join(str(n) for n in lengths)} tokens"


# ------------------------------------------------------------------ the checks


@dataclass
class _Context:
    model: nn.Module
    adapter: object
    tokenizer: object
    texts: list[str]
    rows: list[list[int]]
    window: int
    early: int
    late: int
    tolerance: Tolerance
    config: VerifyConfig
    device: torch.device
    _plain: torch.Tensor | None = None  # (B, T, V) plain logits, computed once

    @property
    def lengths(self) -> list[int]:
        return [len(r) for r in self.rows]

    def batch(self):
        return encode(self.tokenizer, self.texts, self.device)

    def plain_logits(self) -> torch.Tensor:
        """(B, T, V) logits of a plain forward over :meth:`batch` (computed once)."""
        if self._plain is None:
            with torch.no_grad():
                self._plain = self.model(**self.batch().model_inputs(), use_cache=False).logits
        return self._plain

    def plain_real_logits(self) -> torch.Tensor:
        """(N, V) plain logits at real tokens."""
        return _real(self.plain_logits(), self.batch().attention_mask)

    def probe_layers(self) -> list[int]:
        """Layers whose points are captured or edited: first, early, late, last."""
        return sorted({0, self.early, self.late, self.adapter.n_layers - 1})


def check_attention_recompute(ctx: _Context) -> CheckResult:
    adapter, model = ctx.adapter, ctx.model
    batch = ctx.batch()
    points = [address(layer, p) for layer in range(adapter.n_layers) for p in ("v", "z")]
    points += [address(layer, "attn_out") for layer in range(adapter.n_layers)]
    with (
        eager_attention(model),
        torch.no_grad(),
        Trace(model, adapter, capture=points) as trace,
    ):
        out = model(**batch.model_inputs(), output_attentions=True, use_cache=False)
    attentions = getattr(out, "attentions", None)
    if attentions is None or len(attentions) != adapter.n_layers or attentions[0] is None:
        return CheckResult(
            "attention_recompute",
            FAIL,
            "the model returned no attention weights under eager attention: captured V cannot "
            "be proven to be what attention multiplies",
        )
    parts, worst = [], (-1.0, 0)
    for layer in range(adapter.n_layers):
        z, attn_out = recompute_attention(
            model, adapter, layer, attentions[layer], trace[address(layer, "v")]
        )
        mask = batch.attention_mask
        z_cmp = compare(_real(z, mask), _real(trace[address(layer, "z")], mask), ctx.tolerance)
        out_cmp = compare(
            _real(attn_out, mask), _real(trace[address(layer, "attn_out")], mask), ctx.tolerance
        )
        layer_cmp = Comparison.combine([z_cmp, out_cmp])
        parts.append(layer_cmp)
        if layer_cmp.max_rel > worst[0]:
            worst = (layer_cmp.max_rel, layer)
    detail = (
        f"all {adapter.n_layers} layers, {_rows_text(ctx.lengths)}; z and attention output "
        f"recomputed from captured V ({adapter.n_kv_heads} KV heads for {adapter.n_heads} query "
        f"heads) and eager attention weights; worst layer {worst[1]}"
    )
    return _from_comparison("attention_recompute", Comparison.combine(parts), ctx.tolerance, detail)


def _logits_at_real(model: nn.Module, batch, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        logits = model(**batch.model_inputs(), use_cache=False, **kwargs).logits  # (B, T, V)
    return _real(logits, batch.attention_mask)  # (N, V)


def check_hooked_forward(ctx: _Context) -> CheckResult:
    model, adapter = ctx.model, ctx.adapter
    batch = ctx.batch()
    plain = ctx.plain_real_logits()  # (N, V)
    points = [address(layer, p) for layer in ctx.probe_layers() for p in _POINTS]
    with Trace(model, adapter, capture=points) as full:
        hooked = _logits_at_real(model, batch)  # (N, V)
    parts = [compare(hooked, plain, ctx.tolerance)]
    # LastTokenLogits: the logits of each row's last real token, without the full LM head.
    last = torch.tensor([n - 1 for n in batch.n_tokens], device=ctx.device)  # (B,)
    with torch.no_grad(), LastTokenLogits(model, adapter, last) as head:
        model(**batch.model_inputs(), use_cache=False)
    full_logits = ctx.plain_logits()  # (B, T, V)
    rows = torch.arange(len(batch.n_tokens), device=full_logits.device)  # (B,)
    parts.append(
        compare(head.logits(), full_logits[rows, last.to(full_logits.device)], ctx.tolerance)
    )
    # A forward stopped after the late layer captures the same values as a full one.
    stopped_points = [address(layer, "v") for layer in ctx.probe_layers() if layer <= ctx.late]
    with (
        torch.no_grad(),
        Trace(model, adapter, capture=stopped_points, stop_after_layer=ctx.late) as stopped,
    ):
        model(**batch.model_inputs(), use_cache=False)
    mask = batch.attention_mask
    for point in stopped_points:
        parts.append(compare(_real(stopped[point], mask), _real(full[point], mask), ctx.tolerance))
    detail = (
        f"logits with {len(points)} points captured (layers {ctx.probe_layers()}), "
        f"LastTokenLogits, and V of a forward stopped after layer {ctx.late}, against plain "
        f"forwards; {_rows_text(ctx.lengths)}"
    )
    return _from_comparison("hooked_forward", Comparison.combine(parts), ctx.tolerance, detail)


def _identity(value: torch.Tensor) -> torch.Tensor:
    return value


def check_identity_edit(ctx: _Context) -> CheckResult:
    batch = ctx.batch()
    plain = ctx.plain_real_logits()  # (N, V)
    edits = {address(layer, p): _identity for layer in ctx.probe_layers() for p in _POINTS}
    with Trace(ctx.model, ctx.adapter, edits=edits):
        edited = _logits_at_real(ctx.model, batch)  # (N, V)
    detail = (
        f"logits with identity edits at {len(edits)} points (layers {ctx.probe_layers()}) "
        "against no edit"
    )
    return _from_comparison(
        "identity_edit", compare(edited, plain, ctx.tolerance), ctx.tolerance, detail
    )


def r_v_of_texts(
    model: nn.Module, adapter, tokenizer, texts: Sequence[str], early: int, late: int, window: int
) -> dict[str, torch.Tensor]:
    """R_V of V at (early, late) over the last ``window`` real tokens of each text, in one
    right-padded batch, through the R_V engine every experiment uses
    (:func:`rloop.interventions.engine.measure_pr`): mode -> (B,) float64, every PR mode."""
    batch = encode(tokenizer, list(texts), model_device(model))
    measured = measure_pr(model, adapter, batch, [early, late], window, modes=PR_MODES)
    return {
        mode: torch.from_numpy(measured.r_v(early, late, mode)) for mode in PR_MODES
    }  # mode -> (B,)


def check_batched_r_v(ctx: _Context) -> CheckResult:
    args = (ctx.model, ctx.adapter, ctx.tokenizer)
    batched = r_v_of_texts(*args, ctx.texts, ctx.early, ctx.late, ctx.window)
    alone = {mode: [] for mode in PR_MODES}
    for text in ctx.texts:
        single = r_v_of_texts(*args, [text], ctx.early, ctx.late, ctx.window)
        for mode in PR_MODES:
            alone[mode].append(single[mode])
    parts = [
        compare(batched[mode], torch.cat(alone[mode]), ctx.tolerance, elementwise=True)
        for mode in PR_MODES
    ]
    detail = (
        f"R_V = PR(V L{ctx.late}) / PR(V L{ctx.early}), window {ctx.window}, modes "
        f"{'/'.join(PR_MODES)}; one right-padded batch of {_rows_text(ctx.lengths)} against "
        "each prompt alone"
    )
    return _from_comparison("batched_r_v", Comparison.combine(parts), ctx.tolerance, detail)


def _full_forward_values(ctx: _Context, ids: Sequence[int], points: Sequence[str]):
    """Captured ``points`` of one plain forward over ``ids``: address -> (T, ...), and the
    greedy next-token choice at every position (T,)."""
    tensor = torch.tensor([list(ids)], device=ctx.device)  # (1, T)
    with torch.no_grad(), Trace(ctx.model, ctx.adapter, capture=points) as trace:
        logits = ctx.model(input_ids=tensor, use_cache=False).logits  # (1, T, V)
    return {p: trace[p][0] for p in points}, logits[0].argmax(dim=-1)


def _generation_points(ctx: _Context) -> list[str]:
    return [address(layer, "v") for layer in ctx.probe_layers()]


def check_cached_generation_v(ctx: _Context) -> CheckResult:
    points = _generation_points(ctx)
    n_new = int(ctx.config.max_new_tokens)
    result = generate(
        ctx.model,
        ctx.adapter,
        ctx.rows,
        SamplingConfig(max_new_tokens=n_new),
        points,
        pad_id_of(ctx.tokenizer),
    )
    parts, agree = [], 0
    for i, row in enumerate(ctx.rows):
        sequence = list(row) + result.new_tokens[i].tolist()
        full, greedy = _full_forward_values(ctx, sequence, points)
        real = result.attention_mask[i].bool()  # (M + 1 + N,)
        for p in points:
            parts.append(compare(result.captured[p][i][real], full[p], ctx.tolerance))
        # the full forward's own greedy choices at the positions that chose each new token
        chosen = greedy[len(row) - 1 : len(row) - 1 + n_new].cpu()  # (N,)
        agree += int((chosen == result.new_tokens[i].cpu()).sum())
    detail = (
        f"V at layers {ctx.probe_layers()} over prompt + {n_new} greedy tokens, left-padded "
        f"batch of {_rows_text(ctx.lengths)}, against one full forward per row; the full "
        f"forward's argmax agrees with {agree} of {n_new * len(ctx.rows)} generated tokens"
    )
    return _from_comparison("cached_generation_v", Comparison.combine(parts), ctx.tolerance, detail)


def _sources(rows: Sequence[Sequence[int]], length_of: Callable[[int], int]) -> list[list[int]]:
    """For row i: a different token sequence of ``length_of(i)`` tokens ending in row i's last
    token, built from the other rows' tokens (repeated as needed)."""
    sources = []
    for i, row in enumerate(rows):
        pool = [t for j, other in enumerate(rows) if j != i for t in other] or list(row)
        n = max(1, length_of(i) - 1)
        memory = [pool[k % len(pool)] for k in range(n)]
        sources.append(memory + [row[-1]])
    return sources


def _compare_generations(ctx, patched, natural, points) -> tuple[Comparison, int]:
    """Captured V and first-step logits; and the number of rows whose tokens differ."""
    parts = [compare(patched.first_logits, natural.first_logits, ctx.tolerance)]
    for p in points:
        mask = natural.attention_mask  # (B, M + 1 + N)
        parts.append(
            compare(
                _real(patched.captured[p], mask), _real(natural.captured[p], mask), ctx.tolerance
            )
        )
    differ = int((patched.new_tokens != natural.new_tokens).any(dim=1).sum())
    return Comparison.combine(parts), differ


def _check_kv_mix(ctx: _Context, alpha: float) -> CheckResult:
    name = "kv_mix_alpha0" if alpha == 0 else "kv_mix_alpha1"
    points = _generation_points(ctx)
    sampling = SamplingConfig(max_new_tokens=int(ctx.config.max_new_tokens))
    all_layers = tuple(range(ctx.adapter.n_layers))
    pad = pad_id_of(ctx.tokenizer)
    if alpha == 0:
        # shorter sources: the target keeps its natural positions (kv_cache alignment policy)
        sources = _sources(ctx.rows, lambda i: max(2, len(ctx.rows[i]) // 2))
        reference_rows = ctx.rows
        what = "natural generation of each target (sources half as long)"
    else:
        # sources with the target's memory length and last token
        sources = _sources(ctx.rows, lambda i: len(ctx.rows[i]))
        reference_rows = sources
        what = "natural generation of each source (same length and last token as its target)"
    patch_rows = [
        PatchRow(tuple(t), tuple(s), all_layers, alpha)
        for t, s in zip(ctx.rows, sources, strict=True)
    ]
    # sliding-window layers (Gemma-3) are mixed on the columns they cache (kv_cache docstring)
    patched = patched_generate(ctx.model, ctx.adapter, patch_rows, sampling, points, pad)
    natural = generate(ctx.model, ctx.adapter, reference_rows, sampling, points, pad)
    result, differ = _compare_generations(ctx, patched, natural, points)
    failure = f"greedy tokens differ in {differ} of {len(patch_rows)} rows" if differ else ""
    detail = (
        f"alpha = {alpha:g} on all {ctx.adapter.n_layers} layers, {len(patch_rows)} pairs, "
        f"{sampling.max_new_tokens} greedy tokens: tokens, first-step logits and V at layers "
        f"{ctx.probe_layers()} against {what}; tokens equal in "
        f"{len(patch_rows) - differ} of {len(patch_rows)} rows"
    )
    return _from_comparison(name, result, ctx.tolerance, detail, failure)


def check_kv_mix_alpha0(ctx: _Context) -> CheckResult:
    return _check_kv_mix(ctx, 0.0)


def check_kv_mix_alpha1(ctx: _Context) -> CheckResult:
    return _check_kv_mix(ctx, 1.0)


def sample_heads(adapter, n: int, seed: int) -> list[tuple[int, int]]:
    """``n`` distinct (layer, query head) pairs drawn with numpy's generator seeded ``seed``."""
    total = adapter.n_layers * adapter.n_heads
    picks = np.random.default_rng(seed).choice(total, size=min(n, total), replace=False)
    return sorted((int(p) // adapter.n_heads, int(p) % adapter.n_heads) for p in picks)


def _head_columns(o_proj: nn.Module, head: int, d_head: int):
    """(weight index, description) zeroing head ``head``'s input columns of the output
    projection, or None when the projection is neither nn.Linear nor GPT-2's Conv1D."""
    cols = slice(head * d_head, (head + 1) * d_head)
    if isinstance(o_proj, nn.Linear):
        return (slice(None), cols)  # weight (out, in)
    if type(o_proj).__name__ == "Conv1D":
        return (cols, slice(None))  # weight (in, out)
    return None


def check_head_ablation(ctx: _Context) -> CheckResult:
    model, adapter = ctx.model, ctx.adapter
    batch = ctx.batch()
    clean = ctx.plain_real_logits()  # (N, V)
    heads = sample_heads(adapter, int(ctx.config.heads_sample), int(ctx.config.seed))
    parts, effects = [], []
    for layer, head in heads:
        edit = head_ablation_edit(keep_mask(adapter, [[head]]))
        with Trace(model, adapter, edits={address(layer, "z"): edit}):
            hooked = _logits_at_real(model, batch)  # (N, V)
        o_proj = adapter.module_for(model, layer, "z")
        index = _head_columns(o_proj, head, adapter.d_head)
        weight = getattr(o_proj, "weight", None)
        if index is None or not isinstance(weight, torch.Tensor) or weight.device.type == "meta":
            return CheckResult(
                "head_ablation",
                SKIP,
                f"output projection of layer {layer} is a {type(o_proj).__name__} whose weight "
                "cannot be edited in place",
            )
        saved = weight[index].clone()
        try:
            with torch.no_grad():
                weight[index] = 0
            zeroed = _logits_at_real(model, batch)  # (N, V)
        finally:
            with torch.no_grad():
                weight[index] = saved
        parts.append(compare(hooked, zeroed, ctx.tolerance))
        effects.append(float((hooked.double() - clean.double()).abs().max()))
    heads_text = ", ".join(f"L{layer}H{head}" for layer, head in heads)
    detail = (
        f"zero ablation of {heads_text} (seed {ctx.config.seed}) at the z hook against zeroed "
        f"output-projection input columns; the ablations move logits by up to "
        f"{max(effects):.3g}"
    )
    failure = "" if max(effects) > 0 else "no sampled ablation changed the logits (vacuous)"
    return _from_comparison(
        "head_ablation", Comparison.combine(parts), ctx.tolerance, detail, failure
    )


def check_dtype_drift(ctx: _Context) -> CheckResult:
    dtype = model_dtype(ctx.model)
    if dtype not in DRIFT_TOLERANCES:
        return CheckResult(
            "dtype_drift",
            SKIP,
            f"model runs in {str(dtype).replace('torch.', '')}: no reduced-precision drift to "
            f"measure ({SCIENCE_DTYPE_RULE})",
        )
    tolerance = DRIFT_TOLERANCES[dtype]
    args = (ctx.tokenizer, ctx.texts, ctx.early, ctx.late, ctx.window)
    low = r_v_of_texts(ctx.model, ctx.adapter, *args)
    reference = None
    try:
        reference = copy.deepcopy(ctx.model).float()
        high = r_v_of_texts(reference, ctx.adapter, *args)
    except torch.OutOfMemoryError as err:
        return CheckResult(
            "dtype_drift",
            SKIP,
            f"no memory for a float32 copy of the model ({str(err).splitlines()[0][:120]})",
        )
    finally:
        del reference
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    low_all = torch.cat([low[m] for m in PR_MODES])  # (2B,)
    high_all = torch.cat([high[m] for m in PR_MODES])  # (2B,)
    result = compare(low_all, high_all, tolerance, elementwise=True)
    name = str(dtype).replace("torch.", "")
    failure = ""
    if not bool(torch.isfinite(low_all).all()):
        failure = f"R_V is not finite in {name} (activations overflowed)" + (
            "; use bfloat16" if dtype == torch.float16 else ""
        )
    detail = (
        f"R_V = PR(V L{ctx.late}) / PR(V L{ctx.early}) in {name} against a float32 copy, "
        f"modes {'/'.join(PR_MODES)}, {_rows_text(ctx.lengths)}; error relative per prompt; "
        f"{SCIENCE_DTYPE_RULE}"
    )
    return _from_comparison("dtype_drift", result, tolerance, detail, failure)


CHECK_FUNCTIONS: dict[str, Callable[[_Context], CheckResult]] = {
    "attention_recompute": check_attention_recompute,
    "hooked_forward": check_hooked_forward,
    "identity_edit": check_identity_edit,
    "batched_r_v": check_batched_r_v,
    "cached_generation_v": check_cached_generation_v,
    "kv_mix_alpha0": check_kv_mix_alpha0,
    "kv_mix_alpha1": check_kv_mix_alpha1,
    "head_ablation": check_head_ablation,
    "dtype_drift": check_dtype_drift,
}


# ------------------------------------------------------------------ prompts


def select_prompts(prompt_set, tokenizer, n_prompts: int, window: int):
    """``n_prompts`` prompts of spread token lengths, each at least ``window`` tokens.

    Prompts are sorted by (token count, id) and taken at evenly spaced ranks (shortest and
    longest included), so the batch mixes lengths. Returns a PromptSet with the same
    provenance. PromptError when fewer than 2 prompts are long enough.
    """
    from rloop.prompts import PromptSet, token_counts

    counts = token_counts(prompt_set, tokenizer)
    eligible = sorted(
        ((n, p.id, p) for p, n in zip(prompt_set, counts, strict=True) if n >= window),
        key=lambda item: (item[0], item[1]),
    )
    if len(eligible) < 2:
        raise PromptError(
            f"verify needs at least 2 prompts of at least {window} tokens; "
            f"{len(eligible)} of {len(prompt_set)} are long enough: use longer prompts or a "
            "smaller --window"
        )
    n = min(int(n_prompts), len(eligible))
    ranks = sorted({int(round(r)) for r in np.linspace(0, len(eligible) - 1, n)})
    chosen = [eligible[r][2] for r in ranks]
    return PromptSet(chosen, prompt_set.source, prompt_set.version, prompt_set.sha256)


def load_prompts(config: VerifyConfig):
    """The shipped bank (``config.prompts`` None) or the user's prompt file."""
    from rloop.prompts import load_bank, load_prompt_file

    if config.prompts is None:
        return load_bank(config.bank_version)
    return load_prompt_file(config.prompts)


def _default_texts(lm, config: VerifyConfig) -> list[str]:
    prompt_set = load_prompts(config)
    return [
        p.text for p in select_prompts(prompt_set, lm.tokenizer, config.n_prompts, config.window)
    ]


# ------------------------------------------------------------------ entry points


def verify_model(
    lm, config: VerifyConfig | None = None, texts: Sequence[str] | None = None
) -> pd.DataFrame:
    """Run every check on a loaded model; one row per check (columns: :data:`COLUMNS`).

    lm: a LoadedModel (model, tokenizer, adapter, name). texts: the prompts (default: chosen
    from the bank or ``config.prompts`` by :func:`select_prompts`); each needs at least
    ``config.window`` tokens. A check that raises is a FAIL whose reason names the error.
    The model is left as it was (hooks removed, attention implementation and weights
    restored).
    """
    config = config or VerifyConfig()
    config.check()
    model, adapter = lm.model, lm.adapter
    dtype = model_dtype(model)
    tolerance = tolerance_for(dtype)
    texts = list(texts) if texts is not None else _default_texts(lm, config)
    rows = tokenize_rows(lm.tokenizer, texts)
    check_window_lengths([len(r) for r in rows], config.window)
    early, late, _ = resolve_layers(adapter, config.layers)
    ctx = _Context(
        model=model,
        adapter=adapter,
        tokenizer=lm.tokenizer,
        texts=texts,
        rows=rows,
        window=config.window,
        early=early,
        late=late,
        tolerance=tolerance,
        config=config,
        device=model_device(model),
    )
    records = []
    for name, function in CHECK_FUNCTIONS.items():
        started = time.perf_counter()
        try:
            result = function(ctx)
        except Exception as err:  # noqa: BLE001 - a check that cannot run is a failed check
            message = str(err).strip().splitlines()[0] if str(err).strip() else ""
            result = CheckResult(name, FAIL, f"raised {type(err).__name__}: {message}"[:300])
        seconds = time.perf_counter() - started
        record = asdict(result)
        record.update(dtype=str(dtype).replace("torch.", ""), seconds=seconds)
        records.append(record)
    return pd.DataFrame(records, columns=COLUMNS)


def failed_checks(checks: pd.DataFrame) -> pd.DataFrame:
    return checks[checks["status"] == FAIL]


def failure_message(checks: pd.DataFrame, model_name: str) -> str:
    """One line naming every failed check and its reason."""
    failed = failed_checks(checks)
    listed = "; ".join(f"{row.check}: {row.reason}" for row in failed.itertuples())
    return (
        f"fidelity checks failed on {model_name} ({listed}); rloop's measurements on this model "
        f"cannot be trusted: run `rloop verify --model {model_name}` for the table"
    )


def require_verified(
    lm, config: VerifyConfig | None = None, texts: Sequence[str] | None = None
) -> pd.DataFrame:
    """Run :func:`verify_model` and raise VerificationError (one line) when any check FAILs;
    returns the checks table otherwise (SKIPs allowed)."""
    checks = verify_model(lm, config, texts)
    if len(failed_checks(checks)):
        raise VerificationError(failure_message(checks, getattr(lm, "name", "this model")))
    return checks


def headline_of(checks: pd.DataFrame) -> dict:
    counts = checks["status"].value_counts()
    headline = {
        "all_pass": bool((checks["status"] != FAIL).all()),
        "n_pass": int(counts.get(PASS, 0)),
        "n_fail": int(counts.get(FAIL, 0)),
        "n_skip": int(counts.get(SKIP, 0)),
    }
    headline.update({f"status:{row.check}": row.status for row in checks.itertuples()})
    return headline


def summary_markdown(checks: pd.DataFrame, lm, wall_seconds: float) -> str:
    a = lm.adapter
    table = checks[["check", "status", "max_abs_error", "max_rel_error", "tolerance", "reason"]]
    verdict = "all checks pass" if (checks["status"] != FAIL).all() else "CHECKS FAILED"
    lines = [
        "# Fidelity self-check",
        "",
        f"- model: {lm.name} ({a.family}, {a.n_layers} layers, {a.n_heads} heads, "
        f"{a.n_kv_heads} KV heads), dtype {checks['dtype'].iloc[0]}, device "
        f"{model_device(lm.model)}",
        f"- verdict: {verdict}; wall time {wall_seconds:.1f} s",
        "- errors: max |got - want| and that over max |want|; PASS when "
        "max abs <= atol + rtol * max |want| (rtol in `tolerance`)",
        "",
        markdown_table(table, digits=3),
        "",
        "Details per check are in `checks.csv` (`detail` column).",
    ]
    return "\n".join(lines) + "\n"


def run_verify(config: VerifyConfig, out=None, force: bool = False, lm=None):
    """Verify a model and write a run record (table ``checks``, summary, manifest).

    Returns (run_dir, already_complete, headline); the run is complete even when checks
    FAIL (the headline's ``all_pass`` and ``n_fail`` say so). Settings, prompts and model
    are checked before anything is written.
    """
    from rloop.experiments.runner import execute, model_manifest, prompts_manifest

    config.check()
    prompt_set = load_prompts(config)
    if lm is None:
        from rloop.models import load_model

        lm = load_model(
            config.model, revision=config.revision, device=config.device, dtype=config.dtype
        )
    tolerance_for(model_dtype(lm.model))
    resolve_layers(lm.adapter, config.layers)
    selected = select_prompts(prompt_set, lm.tokenizer, config.n_prompts, config.window)

    def body(run) -> dict:
        run.set_model(model_manifest(lm))
        run.set_prompts(prompts_manifest(selected, lm.tokenizer))
        started = time.perf_counter()
        checks = verify_model(lm, config, [p.text for p in selected])
        wall = time.perf_counter() - started
        run.write_table("checks", checks)
        run.write_summary(summary_markdown(checks, lm, wall))
        early, late, rule = resolve_layers(lm.adapter, config.layers)
        dtype = model_dtype(lm.model)
        run.update_manifest(
            layers={"early": early, "late": late, "rule": rule},
            verify={
                "wall_seconds": wall,
                "prompt_ids": [p.id for p in selected],
                "tolerance": asdict(tolerance_for(dtype)),
                "drift_tolerance": (
                    asdict(DRIFT_TOLERANCES[dtype]) if dtype in DRIFT_TOLERANCES else None
                ),
            },
        )
        return headline_of(checks)

    return execute(EXPERIMENT, config.to_dict(), lm.name, out, body, force=force).as_tuple()
