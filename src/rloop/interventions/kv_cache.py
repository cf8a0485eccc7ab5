"""KV-cache substitution and alpha mixing between a target and a source prompt (seed 003).

Alignment policy (the same in every layer, for every architecture)
--------------------------------------------------------------------
A prompt of ``n`` tokens is its *memory* (first ``n - 1`` tokens, held in the KV cache) plus
its *last token*, the first input of decoding (see :mod:`rloop.capture.generation`). Patching acts on
memories only; the target's own last token then reads the patched memory and chooses the first
generated token, so the patch can change every generated token.

1. **Right alignment on the last memory token.** For a pair with memory lengths ``m_t``
   (target) and ``m_s`` (source), both memories are encoded in a shared frame of length
   ``F = max(m_t, m_s)``: each is right-aligned, so the token ``r`` places before the end of
   either memory sits at frame position ``F - 1 - r`` in *both* caches. Rotary keys carry
   their absolute positions, so the two caches agree on the position of every column they
   share; the target's last token is fed at position ``F`` and generated token ``s`` at
   ``F + s``, consistent with every cached key.
2. **The target's mask.** The continuation attends to the target's memory columns only.
   Source tokens before the target's first token (``m_s > m_t``) are dropped from the mixed
   cache; they still shaped the source's later keys and values, which were encoded with full
   source context. Target columns with no source token (``m_s < m_t``) keep the target's KV.
3. Consequences: with ``m_t >= m_s`` the target sits at its natural positions ``0..n-1`` and
   alpha = 0 reproduces natural target generation exactly. With ``m_t < m_s`` the target is
   shifted by ``m_s - m_t`` positions: rotary families are invariant to a common shift up to
   float rounding; absolute-position families (GPT-2) are not, which is why each experiment
   reports the alpha = 0 condition in the pair frame next to natural generation. With equal
   lengths and the same last token, alpha = 1 over all layers reproduces natural source
   generation exactly (tests).

Mixing: ``(1 - alpha) * KV_target + alpha * KV_source`` for keys and values, computed in
float32 and cast back to the cache dtype; alpha = 0 and 1 are exact copies. V-patching (the
null control) instead replaces the value-projection *activations* at one layer while the
target memory is encoded (so later layers of the memory see them), with the same alignment.
Captured V of a memory at a mixed layer is the mixed V (what attention reads); other captured
points of the memory (k, q, resid...) are those of the target's own encoding.

Sliding-window layers (Gemma-3, Mistral with a window, ...) cache only the last ``T < M``
columns of an ``M``-column memory: decoding never reads the columns before them. Target and
source memories share one frame of width ``M``, so both caches hold the same last ``T``
columns and are mixed there, exactly as in a full-attention layer. The captured V of the
earlier columns (which the R_V windows may still cover) is mixed from the captured V of the
two encodings with the same weights, so alpha = 1 still gives the source's V at every column.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rloop.adapters import Adapter
from rloop.capture.generation import (
    GenerationResult,
    PromptLayout,
    SamplingConfig,
    decode,
    layout_prompts,
    prefill_memory,
)
from rloop.capture.trace import address, parse_address
from rloop.errors import ConfigError, UnsupportedArchitectureError

DEFAULT_ALPHAS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
SEED_N_LAYERS = 32  # Mistral-7B, the model of seed 003's layer ranges


def check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must lie in [0, 1], got {alpha}")
    return alpha


def check_layer_range(n_layers: int, layers: Sequence[int]) -> tuple[int, ...]:
    """Sorted unique layer indices, each in 0..n_layers-1 (ConfigError otherwise)."""
    layers = tuple(sorted({int(layer) for layer in layers}))
    if not layers:
        raise ConfigError("the layer range is empty: give at least one layer, e.g. 16-31")
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ConfigError(f"layer(s) {bad} out of range: this model has layers 0..{n_layers - 1}")
    return layers


def default_patch_layers(n_layers: int) -> tuple[int, ...]:
    """The second half of the layers (seed 003: 16-31 of 32)."""
    return tuple(range(n_layers // 2, n_layers))


def scale_layer_range(first: int, last: int, n_layers: int, seed_layers: int = SEED_N_LAYERS):
    """Map the seed's inclusive range [first, last] of a ``seed_layers`` model to ``n_layers``
    by relative depth (round to nearest), e.g. 25-29 of 32 -> 23-27 of 30."""
    lo = min(n_layers - 1, int(round(first * n_layers / seed_layers)))
    hi = min(n_layers - 1, max(lo, int(round(last * n_layers / seed_layers))))
    return tuple(range(lo, hi + 1))


# --- cache access (transformers 5 ``DynamicCache.layers`` or the older key_cache lists) ---


def cache_layer(cache: object, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of one layer, each (B, Hkv, T, D)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[layer].keys, layers[layer].values
    if hasattr(cache, "key_cache"):
        return cache.key_cache[layer], cache.value_cache[layer]
    raise UnsupportedArchitectureError(
        f"cannot read KV cache of type {type(cache).__name__}: KV patching needs a "
        "transformers DynamicCache"
    )


def set_cache_layer(cache: object, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        layers[layer].keys, layers[layer].values = keys, values
    else:
        cache.key_cache[layer], cache.value_cache[layer] = keys, values


def n_cache_layers(cache: object) -> int:
    layers = getattr(cache, "layers", None)
    return len(layers) if layers is not None else len(cache.key_cache)


def mix_tensors(target: torch.Tensor, source: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """(1 - alpha) * target + alpha * source in float32, cast back to target's dtype.

    target, source: (B, Hkv, T, D); alpha: (B,) per row. Rows with alpha 0 (1) are exact copies
    of target (source).
    """
    a = alpha.to(device=target.device, dtype=torch.float32).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    mixed = (1 - a) * target.float() + a * source.float()  # (B, Hkv, T, D)
    mixed = torch.where(a == 0, target.float(), torch.where(a == 1, source.float(), mixed))
    return mixed.to(target.dtype)


def mix_caches(
    target: object, source: object, weights: torch.Tensor, source_real: torch.Tensor
) -> object:
    """Mix ``source`` into ``target`` in place, per row and layer.

    weights: (B, L) alpha of each row at each layer (0 = keep target). source_real: (B, M)
    bool over the M memory columns, True where the source has a real token; elsewhere the
    target is kept. A layer that caches only the last T < M columns (a sliding-window layer)
    is mixed on those T columns.
    """
    n_layers = n_cache_layers(target)
    if weights.shape[1] != n_layers:
        raise ConfigError(f"weights cover {weights.shape[1]} layers, the cache has {n_layers}")
    keep_memory = ~source_real.bool()[:, None, :, None]  # (B, 1, M, 1)
    width = keep_memory.shape[2]
    for layer in range(n_layers):
        alpha = weights[:, layer]  # (B,)
        if not bool((alpha != 0).any()):
            continue
        k_t, v_t = cache_layer(target, layer)  # (B, Hkv, T, D)
        k_s, v_s = cache_layer(source, layer)  # (B, Hkv, T, D)
        cached = k_t.shape[2]
        if k_s.shape != k_t.shape or cached > width:
            raise ConfigError(
                f"layer {layer}: target cache {tuple(k_t.shape)} and source cache "
                f"{tuple(k_s.shape)} do not cover the same columns of a {width}-column memory"
            )
        keep = keep_memory[:, :, width - cached :]  # (B, 1, T, 1): the columns cached
        k = torch.where(keep.to(k_t.device), k_t, mix_tensors(k_t, k_s, alpha))  # (B,Hkv,T,D)
        v = torch.where(keep.to(v_t.device), v_t, mix_tensors(v_t, v_s, alpha))  # (B,Hkv,T,D)
        set_cache_layer(target, layer, k, v)
    return target


@dataclass(frozen=True)
class PatchRow:
    """One generation of a patching grid.

    target: token ids the continuation belongs to; source: token ids whose KV (or V) is patched
    in (None = natural generation of target alone, in its own frame). kv_layers + alpha: layers
    whose memory KV is mixed with weight alpha. v_patch_layer: replace the target memory's V
    activations at that layer by the source's while encoding (V-patching null control).
    """

    target: tuple[int, ...]
    source: tuple[int, ...] | None = None
    kv_layers: tuple[int, ...] = ()
    alpha: float = 0.0
    v_patch_layer: int | None = None


def patched_generate(
    model: nn.Module,
    adapter: Adapter,
    rows: Sequence[PatchRow],
    sampling: SamplingConfig,
    capture: Iterable[str] = (),
    pad_id: int = 0,
    tokenizer=None,
) -> GenerationResult:
    """Generate every row of a patching grid in one batched call (alignment: module docstring).

    Each distinct memory is encoded once (a pair's target memory is shared by all its KV
    conditions, its source memory by all conditions that need it), the encodings are
    expanded to one row per condition, the memories are mixed layer by layer, and one
    decoding loop generates all rows.
    """
    _check_rows(adapter, rows)
    device = next(model.parameters()).device
    capture = list(capture)
    frames = [_frame(row) for row in rows]
    width = max(frames)
    grid = _Grid(rows, frames, width, pad_id, device)
    target_layout = grid.layout([row.target for row in rows], frames)
    v_layers = sorted({row.v_patch_layer for row in rows if row.v_patch_layer is not None})
    weights = torch.zeros((len(rows), adapter.n_layers), dtype=torch.float32)  # (B, L)
    for i, row in enumerate(rows):
        weights[i, list(row.kv_layers)] = float(row.alpha)
    sources = _encode_sources(model, adapter, grid, v_layers, _mixed_v_points(capture, weights))
    cache, memory_captured = _encode_targets(model, adapter, grid, v_layers, sources, capture)
    if bool((weights != 0).any()) and width > 0:
        _mix_sources(cache, memory_captured, sources, target_layout.memory_mask, weights)
    return decode(
        model,
        adapter,
        cache,
        target_layout,
        sampling,
        capture,
        memory_captured,
        tokenizer,
    )


def _check_rows(adapter: Adapter, rows: Sequence[PatchRow]) -> None:
    """ConfigError for an empty grid, a bad alpha or layer, or a patched row without source."""
    if not rows:
        raise ConfigError("no patch conditions to generate")
    for row in rows:
        check_alpha(row.alpha)
        if row.kv_layers:
            check_layer_range(adapter.n_layers, row.kv_layers)
        if row.v_patch_layer is not None:
            adapter.check_layer(row.v_patch_layer)
        if (row.kv_layers or row.v_patch_layer is not None) and row.source is None:
            raise ConfigError("a patched row needs a source prompt")


@dataclass(frozen=True)
class _Grid:
    """The rows of a patching grid with their frame lengths and the shared frame width."""

    rows: Sequence[PatchRow]
    frames: list[int]  # per row: memory frame length (:func:`_frame`)
    width: int  # max(frames): every memory layout is this many columns wide
    pad_id: int
    device: torch.device

    def layout(self, prompts: Sequence[tuple[int, ...]], frames: Sequence[int]) -> PromptLayout:
        return layout_prompts(list(prompts), self.pad_id, list(frames), self.device, self.width)


def _mixed_v_points(capture: Sequence[str], weights: torch.Tensor) -> list[str]:
    """The captured V addresses at layers some row mixes (weights (B, L) nonzero there)."""
    points = []
    for point in capture:
        parsed = parse_address(point)
        if parsed.point == "v" and bool((weights[:, parsed.layer] != 0).any()):
            points.append(str(parsed))
    return points


@dataclass
class _Sources:
    """The distinct source memories of a grid, each encoded once (S of them)."""

    cache: object | None  # KV cache with S rows (None when no row needs a source)
    # V at the V-patch layers and at the captured mixed layers: address -> (S, M, Hkv, D)
    values: dict[str, torch.Tensor]
    mask: torch.Tensor | None  # (S, M) memory mask
    index: list[int]  # per grid row: its source's row, -1 when it needs none
    needed: list[bool]  # per grid row: whether it mixes KV or patches V


def _encode_sources(
    model: nn.Module,
    adapter: Adapter,
    grid: _Grid,
    v_layers: Sequence[int],
    mixed_v: Sequence[str] = (),
) -> _Sources:
    """Encode every distinct (source, frame) memory once, capturing V at the V-patch layers
    and at the ``mixed_v`` addresses (captured V of mixed layers, see :func:`_mix_sources`)."""
    needed = [bool(row.kv_layers) or row.v_patch_layer is not None for row in grid.rows]
    pairs = zip(grid.rows, grid.frames, needed, strict=True)
    keys = list(dict.fromkeys((row.source, f) for row, f, n in pairs if n))
    cache, values, mask = None, {}, None
    if keys:
        layout = grid.layout([k[0] for k in keys], [k[1] for k in keys])
        v_points = list(dict.fromkeys([address(layer, "v") for layer in v_layers] + list(mixed_v)))
        cache, values = prefill_memory(model, adapter, layout, v_points)
        mask = layout.memory_mask  # (S, M)
    pairs = zip(grid.rows, grid.frames, needed, strict=True)
    index = [keys.index((row.source, f)) if n else -1 for row, f, n in pairs]
    return _Sources(cache, values, mask, index, needed)


def _encode_targets(
    model: nn.Module,
    adapter: Adapter,
    grid: _Grid,
    v_layers: Sequence[int],
    sources: _Sources,
    capture: list[str],
) -> tuple[object, dict[str, torch.Tensor]]:
    """Encode every distinct target memory once (with its V patch, if any), then expand the
    cache and the captured memory tensors to one row per grid row: (B, ...)."""
    keys_all = [
        (row.target, f, row.v_patch_layer, row.source if row.v_patch_layer is not None else None)
        for row, f in zip(grid.rows, grid.frames, strict=True)
    ]
    keys = list(dict.fromkeys(keys_all))
    index = [keys.index(k) for k in keys_all]
    layout = grid.layout([k[0] for k in keys], [k[1] for k in keys])
    first_row = [index.index(u) for u in range(len(keys))]  # a grid row of each unique target
    edits = {}
    for layer in v_layers:
        point = address(layer, "v")
        picks = [sources.index[r] if grid.rows[r].v_patch_layer == layer else -1 for r in first_row]
        chosen = torch.tensor([max(p, 0) for p in picks], device=grid.device)  # (U,)
        on = torch.tensor([p >= 0 for p in picks], device=grid.device)  # (U,)
        replace = (layout.memory_mask != 0) & (sources.mask[chosen] != 0) & on[:, None]  # (U, M)
        edits[point] = _v_patch_edit(sources.values[point][chosen], replace)
    cache, captured = prefill_memory(model, adapter, layout, capture, edits)
    expand = torch.tensor(index, device=grid.device)  # (B,)
    select_rows(cache, expand)
    return cache, {k: v[expand] for k, v in captured.items()}  # (B, M, ...)


def _mix_sources(
    cache: object,
    memory_captured: dict[str, torch.Tensor],
    sources: _Sources,
    target_mask: torch.Tensor,
    weights: torch.Tensor,
) -> None:
    """Mix each row's source memory into ``cache`` with ``weights`` (B, L), in place, where
    both memories have a real token (target_mask (B, M)); captured V at a mixed layer becomes
    the mixed V: what the cache now holds on the columns it caches, and on the columns before
    a sliding window (not cached) the same mix of the two encodings' captured V."""
    device = target_mask.device
    pick = torch.tensor([max(i, 0) for i in sources.index], device=device)  # (B,)
    has_source = torch.tensor(sources.needed, device=device)[:, None]  # (B, 1)
    both_real = (target_mask != 0) & (sources.mask[pick] != 0) & has_source  # (B, M)
    select_rows(sources.cache, pick)
    mix_caches(cache, sources.cache, weights, both_real)
    for key in memory_captured:
        parsed = parse_address(key)
        alpha = weights[:, parsed.layer]  # (B,)
        if parsed.point != "v" or not bool((alpha != 0).any()):
            continue
        cached = cache_layer(cache, parsed.layer)[1].transpose(1, 2)  # (B, T, Hkv, D)
        own = memory_captured[key]  # (B, M, Hkv, D): the target's own V
        before = own.shape[1] - cached.shape[1]  # columns outside a sliding window
        if before:
            source_v = sources.values[key][pick][:, :before]  # (B, before, Hkv, D)
            mixed = mix_tensors(own[:, :before], source_v.to(own.device), alpha)
            real = both_real[:, :before, None, None]  # (B, before, 1, 1)
            cached = torch.cat([torch.where(real, mixed, own[:, :before]), cached], dim=1)
        memory_captured[key] = cached  # (B, M, Hkv, D)


def _frame(row: PatchRow) -> int:
    """The row's frame length: the longer memory of target and source (module docstring)."""
    if row.source is None:
        return len(row.target) - 1
    return max(len(row.target), len(row.source)) - 1


def select_rows(cache: object, indices: torch.Tensor) -> None:
    """Keep (and repeat) batch rows ``indices`` (B',) of every layer of ``cache``, in place."""
    for layer in range(n_cache_layers(cache)):
        keys, values = cache_layer(cache, layer)
        if keys is None or keys.numel() == 0:
            continue
        set_cache_layer(cache, layer, keys[indices], values[indices])  # (B', Hkv, T, D)


def _v_patch_edit(source_values: torch.Tensor, replace: torch.Tensor):
    """Edit replacing V (B, M, Hkv, D) by the source's where ``replace`` (B, M) is true."""

    def edit(values: torch.Tensor) -> torch.Tensor:
        where = replace[:, :, None, None].to(values.device)  # (B, M, 1, 1)
        return torch.where(where, source_values.to(values.dtype), values)  # (B, M, Hkv, D)

    return edit


def layout_of(rows: Sequence[PatchRow], pad_id: int = 0) -> PromptLayout:
    """The target layout :func:`patched_generate` uses (for inspection and tests)."""
    return layout_prompts([r.target for r in rows], pad_id, [_frame(r) for r in rows])
