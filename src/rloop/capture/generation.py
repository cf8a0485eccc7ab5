"""Batched generation with per-step capture of hook points (SCIENCE.md §4).

With a KV cache a forward hook sees one new token per decoding step, so windows over generated
text are assembled here step by step: the prompt part comes from the prefill, then one
(B, 1, ...) slice per step is appended, giving (B, T + N, ...) per captured hook point.

Layout of a batch (left padding). Each prompt of ``n`` tokens is split into its *memory* (the
first ``n - 1`` tokens, encoded in one prefill forward that fills the KV cache) and its *last
token*, which is the first input of the decoding loop; the logits of that step choose the first
generated token. Generation therefore always reads the prompt through the cache, which is what
lets :mod:`rloop.interventions.kv_cache` substitute or mix the memory before any token is chosen. Memories
are right-aligned (left-padded) in a (B, M) buffer with ``attention_mask`` 0 on padding; a row's
memory occupies positions ``frame - m .. frame - 1`` where ``frame >= m`` is the row's frame
length (``frame = m`` for plain generation, so positions are the usual ``0 .. n - 1``); its last
prompt token sits at position ``frame`` and generated token ``s`` (1-based) at ``frame + s``.
Greedy batched output equals batch-size-1 output (tests).

Every one of ``max_new_tokens`` tokens is generated for every row (an end-of-sequence token
does not stop a row): R_V windows and behaviour scores are then over equal token counts.
After the last token is chosen it is fed once more so that its activations are captured too:
the captured tensors cover prompt + all N generated tokens.

Sampling: greedy when ``temperature == 0``; otherwise softmax(logits / temperature) with
nucleus (top-p) filtering, drawn from a ``torch.Generator`` seeded with ``seed`` (recorded).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from rloop.adapters import Adapter
from rloop.capture.trace import Trace, address, parse_address
from rloop.errors import ConfigError, PromptError, UnsupportedArchitectureError
from rloop.metrics import last_real_window, r_v, window_pr

EditFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen. temperature 0 = greedy; top_p in (0, 1]; seed seeds sampling."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or int(self.max_new_tokens) < 1:
            raise ConfigError(
                f"generation length must be at least 1 token, got {self.max_new_tokens}"
            )
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must lie in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PromptLayout:
    """Left-padded memories + last tokens of a batch of prompts (see the module docstring).

    memory_ids, memory_mask, memory_positions: (B, M); last_ids, last_positions: (B, 1);
    n_tokens: prompt lengths; frames: per-row frame length (position of the last token).
    """

    memory_ids: torch.Tensor
    memory_mask: torch.Tensor
    memory_positions: torch.Tensor
    last_ids: torch.Tensor
    last_positions: torch.Tensor
    n_tokens: list[int]
    frames: list[int]

    @property
    def batch_size(self) -> int:
        return len(self.n_tokens)


def layout_prompts(
    token_rows: Sequence[Sequence[int]],
    pad_id: int,
    frames: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    width: int | None = None,
) -> PromptLayout:
    """Lay out token rows (each >= 2 tokens) for :func:`prefill_memory` and :func:`decode`.

    frames[i] >= len(row) - 1 shifts row i's positions so its last token sits at position
    frames[i] (default len(row) - 1, i.e. positions 0..n-1). width (>= every frame) sets the
    memory buffer width M (default: the largest frame).
    """
    if not token_rows:
        raise PromptError("no prompts to generate from: pass at least one prompt")
    short = [i for i, row in enumerate(token_rows) if len(row) < 2]
    if short:
        raise PromptError(
            f"prompt(s) {short[:8]} have fewer than 2 tokens: generation needs a prompt of at "
            "least 2 tokens"
        )
    memories = [len(row) - 1 for row in token_rows]
    frames = list(memories) if frames is None else [int(f) for f in frames]
    if len(frames) != len(token_rows) or any(f < m for f, m in zip(frames, memories, strict=True)):
        raise ConfigError("each frame length must be at least the prompt's memory length")
    width = max(frames) if width is None else max(int(width), max(frames))
    batch = len(token_rows)
    ids = torch.full((batch, width), int(pad_id), dtype=torch.long)  # (B, M)
    mask = torch.zeros((batch, width), dtype=torch.long)  # (B, M)
    columns = torch.arange(width)  # (M,)
    positions = torch.zeros((batch, width), dtype=torch.long)  # (B, M)
    for i, row in enumerate(token_rows):
        m = memories[i]
        if m:
            ids[i, width - m :] = torch.tensor(list(row[:-1]), dtype=torch.long)
            mask[i, width - m :] = 1
        # column j holds frame position j - (width - frame); clamp pad columns at 0
        positions[i] = (columns - (width - frames[i])).clamp(min=0)
    last_ids = torch.tensor([[int(row[-1])] for row in token_rows], dtype=torch.long)  # (B, 1)
    last_positions = torch.tensor([[f] for f in frames], dtype=torch.long)  # (B, 1)
    return PromptLayout(
        ids.to(device),
        mask.to(device),
        positions.to(device),
        last_ids.to(device),
        last_positions.to(device),
        [len(row) for row in token_rows],
        frames,
    )


def generation_attention(device: torch.device):
    """Attention kernels for generation: on CUDA, every SDPA backend except cuDNN.

    The KV length grows by one at every decoding step, and cuDNN's attention builds an
    execution plan for every new shape: on an H100 the first 50-row x 64-token grid took
    9.3 s with it and 1.9 s without (warm: 1.9 s vs 2.0 s; BENCHMARKS.md). Elsewhere a no-op.
    """
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(
        [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    )


def check_kv_cache(cache: object) -> None:
    """Raise when a forward pass returned no usable KV cache."""
    if cache is None:
        raise UnsupportedArchitectureError(
            "this model returned no KV cache (past_key_values): generation with capture and "
            "KV patching need a model that supports use_cache=True"
        )


def prefill_memory(
    model: nn.Module,
    adapter: Adapter,
    layout: PromptLayout,
    capture: Iterable[str] = (),
    edits: Mapping[str, EditFn] | None = None,
) -> tuple[object, dict[str, torch.Tensor]]:
    """Encode the memories of ``layout`` into a fresh KV cache.

    Returns (cache, captured) with captured[address] of shape (B, M, ...) (edited values where
    edited). An all-padding memory (width 0) gives an empty cache.
    """
    from transformers import DynamicCache

    capture = list(capture)
    if layout.memory_ids.shape[1] == 0:
        return DynamicCache(config=model.config), {}
    # The memory's logits are never used: keep one position instead of (B, M, vocab).
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    with (
        torch.no_grad(),
        generation_attention(layout.memory_ids.device),
        Trace(model, adapter, capture=capture, edits=edits) as trace,
    ):
        out = model(
            input_ids=layout.memory_ids,
            attention_mask=layout.memory_mask,
            position_ids=layout.memory_positions,
            use_cache=True,
            **extra,
        )
    cache = cache_of(out)
    check_kv_cache(cache)
    captured = {str(parse_address(a)): trace[a] for a in capture}
    return cache, captured


def cache_of(out: object) -> object:
    """The KV cache a forward returned: ``out.cache`` (transformers >= 5.2x) or the older
    ``out.past_key_values``; None when there is none."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def cache_kwarg(model: nn.Module) -> str:
    """The forward's name for the input KV cache: ``cache`` in newer transformers (where
    ``past_key_values`` is deprecated), ``past_key_values`` before."""
    return "cache" if _accepts(model, "cache") else "past_key_values"


def _accepts(model: nn.Module, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@dataclass
class GenerationResult:
    """Generated tokens and captured activations of one batch.

    new_tokens: (B, N). attention_mask: (B, M + 1 + N) over [memory | last prompt token |
    generated]. captured[address]: (B, M + 1 + N, ...) aligned with attention_mask.
    prompt_width: M + 1 (column of the first generated token). texts: decoded generations
    (None when the tokenizer cannot decode).
    """

    new_tokens: torch.Tensor
    attention_mask: torch.Tensor
    captured: dict[str, torch.Tensor]
    prompt_width: int
    n_tokens: list[int]
    sampling: SamplingConfig
    texts: list[str] | None = None
    first_logits: torch.Tensor | None = field(default=None, repr=False)  # (B, vocab)

    def values(self, point_address: str) -> torch.Tensor:
        key = str(parse_address(point_address))
        if key not in self.captured:
            raise ConfigError(f"{key} was not captured: add it to capture=")
        return self.captured[key]

    def prompt_window(self, point_address: str, window: int, steps: int = 0) -> torch.Tensor:
        """Last ``window`` real tokens of prompt + first ``steps`` generated -> (B, W, ...)."""
        end = self.prompt_width + steps
        values = self.values(point_address)[:, :end]  # (B, end, ...)
        return last_real_window(values, self.attention_mask[:, :end], window)

    def generated_window(self, point_address: str, window: int, steps: int | None = None):
        """Last ``window`` of the first ``steps`` (default all) generated tokens -> (B, W, ...)."""
        n = self.new_tokens.shape[1] if steps is None else steps
        if n < window:
            raise ConfigError(
                f"{n} generated tokens are fewer than the {window}-token window: generate at "
                f"least {window} tokens or use a smaller window"
            )
        start = self.prompt_width + n - window
        return self.values(point_address)[:, start : start + window]  # (B, W, ...)


def _choose(logits: torch.Tensor, sampling: SamplingConfig, generator) -> torch.Tensor:
    """Next token ids (B, 1) from last-position logits (B, vocab)."""
    logits = logits.float()  # (B, V)
    if sampling.greedy:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    probs = torch.softmax(logits / sampling.temperature, dim=-1)  # (B, V)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (B, V) mass above each entry
        sorted_probs = torch.where(before < sampling.top_p, sorted_probs, 0.0)  # (B, V)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)  # (B, V)
    return torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device)  # (B, 1)


def decode(
    model: nn.Module,
    adapter: Adapter,
    cache: object,
    layout: PromptLayout,
    sampling: SamplingConfig,
    capture: Iterable[str] = (),
    memory_captured: Mapping[str, torch.Tensor] | None = None,
    tokenizer=None,
) -> GenerationResult:
    """Run the decoding loop from ``cache`` (the memories, possibly patched).

    Step 0 feeds each row's last prompt token; each later step feeds the previous choice.
    ``memory_captured`` (from :func:`prefill_memory`) is prepended to the per-step captures.
    """
    capture = [str(parse_address(a)) for a in capture]
    memory_captured = dict(memory_captured or {})
    missing = [a for a in capture if a not in memory_captured]
    if missing and layout.memory_ids.shape[1] > 0:
        raise ConfigError(f"memory activations of {missing} were not captured in the prefill")
    generator = torch.Generator().manual_seed(int(sampling.seed))
    mask = layout.memory_mask  # (B, M)
    inputs, positions = layout.last_ids, layout.last_positions  # (B, 1), (B, 1)
    steps: dict[str, list[torch.Tensor]] = {a: [] for a in capture}
    chosen: list[torch.Tensor] = []
    first_logits = None
    n_new = int(sampling.max_new_tokens)
    cache_name = cache_kwarg(model)
    with (
        torch.no_grad(),
        generation_attention(layout.last_ids.device),
        Trace(model, adapter, capture=capture) as trace,
    ):
        for step in range(n_new + (1 if capture else 0)):
            ones = torch.ones_like(inputs)  # (B, 1)
            mask = torch.cat([mask, ones], dim=1)  # (B, M + step + 1)
            out = model(
                input_ids=inputs,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{cache_name: cache},
            )
            cache = cache_of(out)
            check_kv_cache(cache)
            for a in capture:
                steps[a].append(trace[a])  # (B, 1, ...)
            if step == n_new:  # the extra step that only captures the last token
                break
            logits = out.logits[:, -1]  # (B, V)
            if step == 0:
                first_logits = logits.float().clone()
            inputs = _choose(logits, sampling, generator)  # (B, 1)
            chosen.append(inputs)
            positions = positions + 1  # (B, 1)
    new_tokens = torch.cat(chosen, dim=1)  # (B, N)
    real = layout.memory_mask.new_ones((new_tokens.shape[0], 1 + new_tokens.shape[1]))  # (B, 1+N)
    full_mask = torch.cat([layout.memory_mask, real], dim=1)  # (B, M + 1 + N)
    captured = {}
    for a in capture:
        parts = ([memory_captured[a]] if a in memory_captured else []) + steps[a]
        captured[a] = torch.cat(parts, dim=1)  # (B, M + 1 + N, ...)
    texts = decode_texts(tokenizer, new_tokens) if tokenizer is not None else None
    return GenerationResult(
        new_tokens=new_tokens,
        attention_mask=full_mask,
        captured=captured,
        prompt_width=layout.memory_ids.shape[1] + 1,
        n_tokens=list(layout.n_tokens),
        sampling=sampling,
        texts=texts,
        first_logits=first_logits,
    )


def decode_texts(tokenizer, new_tokens: torch.Tensor) -> list[str] | None:
    """Decoded text of each row of (B, N) token ids (special tokens skipped), or None."""
    if not hasattr(tokenizer, "decode"):
        return None
    return [tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in new_tokens]


def pad_id_of(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def generate(
    model: nn.Module,
    adapter: Adapter,
    token_rows: Sequence[Sequence[int]],
    sampling: SamplingConfig | None = None,
    capture: Iterable[str] = (),
    pad_id: int = 0,
    tokenizer=None,
    frames: Sequence[int] | None = None,
) -> GenerationResult:
    """Batched generation from token rows with capture of hook-point addresses at every step."""
    sampling = sampling or SamplingConfig()
    device = next(model.parameters()).device
    capture = list(capture)
    layout = layout_prompts(token_rows, pad_id, frames, device)
    cache, memory_captured = prefill_memory(model, adapter, layout, capture)
    return decode(model, adapter, cache, layout, sampling, capture, memory_captured, tokenizer)


def tokenize_rows(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, as the model sees it (special tokens included)."""
    if not texts:
        raise PromptError("no prompts to generate from: pass at least one prompt")
    rows = tokenizer(list(texts))["input_ids"]
    return [list(map(int, row)) for row in rows]


def generate_texts(
    lm,
    texts: Sequence[str],
    sampling: SamplingConfig | None = None,
    layers: Sequence[int] = (),
    point: str = "v",
) -> GenerationResult:
    """Generate from prompt texts with a loaded model, capturing ``point`` at ``layers``."""

    rows = tokenize_rows(lm.tokenizer, texts)
    return generate(
        lm.model,
        lm.adapter,
        rows,
        sampling,
        [address(layer, point) for layer in layers],
        pad_id_of(lm.tokenizer),
        lm.tokenizer,
    )


def window_r_v(late: torch.Tensor, early: torch.Tensor, mode: str = "per-head") -> torch.Tensor:
    """R_V of paired windows (B, W, H, D) at the late and early layer -> (B,) float64."""
    return r_v(window_pr(late, mode), window_pr(early, mode))  # (B,)
