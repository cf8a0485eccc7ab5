"""Exact batched head-ablation sweep (SCIENCE.md §3).

For every head at every swept layer, the R_V of every prompt with that head ablated, exactly
as a plain forward with that one head ablated would give it, but computed so:

1. one clean forward caches the residual stream entering every swept layer and the clean V
   windows at the early and late measurement layers;
2. for a head at layer l, the blocks below l are not recomputed: they return the cached
   residual stream (:class:`SkipBlocks`), so the forward starts at block l;
3. variants (one ablated head each) are stacked along the batch dimension, ``n_prompts`` rows
   per variant, in balanced chunks that fit a memory budget;
4. the forward stops right after the late layer's value projection: no later layer, no final
   norm, no LM head;
5. heads at layers >= the late layer cannot change V at the late layer (causality), so their
   impact is exactly 0 and they are not computed; heads at layers >= the early layer leave
   PR(early) at its clean value.

Compiled path (opt-in, ``compile=True``): the same forwards, with the blocks that carry no
hook run through ``torch.compile`` (one graph shared by every block of the model, reused by
every layer setting and every later sweep in the process). A compiled block must hold no
Python hook (dynamo does not guard on hooks added after compilation, so a hook would be
silently skipped), so the ablation is applied by a stand-in module around the attention
output projection (:class:`_HeadKeep`: keep mask and fill tensors set per chunk, all-ones
in the blocks that are not ablated) and the blocks that capture or stop (the early block when
it runs, the late block) stay eager. Chunk widths are rounded up to a multiple of
``COMPILE_WIDTH_STEP`` columns (right padding: exact for real tokens) so that few shapes
reach the compiler; any remaining shape change is handled by dynamo's automatic dynamic
shapes (one recompilation per dimension that changes, then none; COMPILE_RECOMPILE_LIMIT).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rloop.adapters import Adapter
from rloop.capture.batching import EncodedBatch, gather_windows, take_windows, window_positions
from rloop.capture.memory import activation_bytes_per_token, default_memory_budget
from rloop.capture.trace import LastTokenLogits, Trace, address
from rloop.errors import ConfigError
from rloop.interventions.edits import head_ablation_edit, keep_mask, query_heads_of
from rloop.interventions.engine import check_mode_for_point
from rloop.metrics import kl_divergence, window_pr


@contextmanager
def SkipBlocks(model: nn.Module, adapter: Adapter, start_layer: int, resid: torch.Tensor):
    """Make blocks 0..start_layer-1 return ``resid`` (B, T, d) instead of computing.

    The block ``start_layer`` then reads exactly ``resid`` as its input. Embeddings, position
    information and masks are still built by the model as usual (cheap).
    """
    blocks = adapter.blocks(model)
    patched = []

    def skipped(*args, **kwargs):
        return resid

    try:
        for layer in range(start_layer):
            blocks[layer].forward = skipped
            patched.append(blocks[layer])
        yield
    finally:
        for block in patched:
            del block.forward


@dataclass
class SweepResult:
    """pr_early / pr_late: mode -> (n_layers_swept, n_units, n_prompts) float64 CPU tensors;
    clean_early / clean_late: mode -> (n_prompts,). kl: (n_layers_swept, n_units, n_prompts)
    KL(clean || ablated) of the last real token's next-token distribution, when asked for."""

    layers: list[int]
    n_units: int
    unit: str
    pr_early: dict[str, torch.Tensor]
    pr_late: dict[str, torch.Tensor]
    clean_early: dict[str, torch.Tensor]
    clean_late: dict[str, torch.Tensor]
    computed_layers: list[int]
    kl: torch.Tensor | None = None


def plan_chunks(lengths: Sequence[int], max_tokens: int, max_rows: int | None = None):
    """Split rows (already sorted by length) into contiguous chunks of balanced size.

    Each chunk has at most ``max_rows`` rows and at most ``max_tokens`` padded tokens (rows x
    its longest row, rows are right-padded). Returns a list of (start, stop) pairs.
    """
    n = len(lengths)
    cap = max(1, min(max_rows or n, max_tokens // max(1, max(lengths, default=1))))
    n_chunks = -(-n // cap)  # ceil
    size = -(-n // n_chunks)  # balanced: sizes differ by at most one chunk's remainder
    chunks, start = [], 0
    while start < n:
        stop = min(n, start + size)
        # Rows are sorted by length, so a chunk's longest row is its last one.
        while stop - start > 1 and (stop - start) * lengths[stop - 1] > max_tokens:
            stop -= 1
        chunks.append((start, stop))
        start = stop
    return chunks


@dataclass
class _Chunk:
    """One stacked forward: rows (unit, prompt), their tensors on the model's device."""

    units: torch.Tensor  # (N,) long
    prompts: torch.Tensor  # (N,) long
    width: int  # longest prompt in the chunk: the forward runs on T' = width columns
    inputs: dict[str, torch.Tensor]  # (N, T') each
    keep: torch.Tensor  # (N, H) 0 = ablated query head
    windows: torch.Tensor  # (N, W) positions of the last W real tokens
    last: torch.Tensor  # (N,) position of the last real token
    # Compiled path only: the width rounded up to COMPILE_WIDTH_STEP and the inputs padded to it.
    padded_width: int = 0
    padded_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # (N, T'') each


# ---------------------------------------------------------------------------- compiled path

# Options given to torch.compile for the block forwards of a compiled sweep. Benchmarks and
# tests may change them (e.g. {"backend": "aot_eager"} to count recompilations without code
# generation, or {"mode": "max-autotune-no-cudagraphs"}).
COMPILE_OPTIONS: dict[str, Any] = {}
# Chunk widths are rounded up to a multiple of this many columns in the compiled path.
COMPILE_WIDTH_STEP = 8
# Compilations one block forward may have in a sweep before dynamo falls back to eager (it
# stays exact then). Per attention-mask kind (a tensor, or none when the model's SDPA path
# drops an all-ones mask) a sweep needs at most: the first shape, one dynamic recompilation
# per dimension that changes (rows, width) and a 1-row chunk: 4, so 8 in all; 16 leaves room
# for other models of the same class in the process.
COMPILE_RECOMPILE_LIMIT = 16
# compile=None resolves to this per device type. Off everywhere until a GPU measurement shows
# the compiled sweep faster and exact there (issue 14; BENCHMARKS.md).
COMPILE_BY_DEFAULT: dict[str, bool] = {"cuda": False, "cpu": False}


def resolve_compile(compile: bool | None, device: torch.device | str) -> bool:
    """Whether a sweep on ``device`` runs its blocks compiled: ``compile`` when given, else the
    device type's default (:data:`COMPILE_BY_DEFAULT`; off everywhere for now)."""
    if compile is not None:
        return bool(compile)
    return COMPILE_BY_DEFAULT.get(torch.device(device).type, False)


def compile_blocker(model: nn.Module, adapter: Adapter) -> str | None:
    """Why the compiled sweep cannot run on this model, or None when it can.

    It needs every parameter on one device (no accelerate device map, whose hooks replace
    block forwards) and blocks whose ``forward`` is the class's own.
    """
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1:
        return "the model is spread over several devices (device_map)"
    if getattr(model, "hf_device_map", None) and len(set(model.hf_device_map.values())) > 1:
        return "the model is dispatched with a device map"
    for layer, block in enumerate(adapter.blocks(model)):
        if "forward" in vars(block):
            return f"block {layer} has a replaced forward (accelerate hooks?)"
    return None


def _global_hooks() -> bool:
    """Whether any global nn.Module forward hook is registered (it would run inside compiled
    blocks unguarded)."""
    from torch.nn.modules import module as module_globals

    return bool(module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks)


def _has_inner_hooks(block: nn.Module) -> bool:
    """Whether any submodule of ``block`` (not the block itself, whose hooks run outside its
    compiled forward) holds a forward hook."""
    return any(
        module._forward_hooks or module._forward_pre_hooks
        for module in block.modules()
        if module is not block
    )


class _HeadKeep(nn.Module):
    """Stand-in for the module whose input is z (the attention output projection) in a
    compiled sweep: z (B, T, H, D) becomes ``z * keep + fill`` before the projection runs.

    keep: (B, H) 0 for an ablated head, 1 elsewhere; fill: (B, H, D) the mean-ablation value
    ``mean * (1 - keep)`` (zeros for zero ablation). A block that is not ablated gets
    keep = 1 and fill = 0, which leave z unchanged exactly, so every compiled block has the
    same structure and one compiled graph serves them all.
    """

    def __init__(self, inner: nn.Module, adapter: Adapter) -> None:
        super().__init__()
        self.inner = inner
        self.adapter = adapter
        self.keep: torch.Tensor | None = None  # (B, H)
        self.fill: torch.Tensor | None = None  # (B, H, D)

    def forward(self, raw: torch.Tensor, *args, **kwargs):
        z = self.adapter.read("z", raw)  # (B, T, H, D)
        z = z * self.keep[:, None, :, None] + self.fill[:, None]  # (B, T, H, D)
        return self.inner(self.adapter.write("z", raw, z), *args, **kwargs)


class _CompiledBlocks:
    """Context: compiled forwards for blocks ``layers`` of ``model`` (stand-ins installed on
    entry, the original modules and forwards restored on exit, even on error)."""

    def __init__(self, model: nn.Module, adapter: Adapter, layers: Iterable[int]) -> None:
        self.adapter = adapter
        self.blocks = adapter.blocks(model)
        self.layers = sorted(set(layers))
        parent, _, name = adapter.spec("z").module.rpartition(".")
        self._parent_path, self._name = parent, name
        self.wrappers: dict[int, _HeadKeep] = {}
        self.forwards: dict[int, Callable] = {}
        self._routed: list[nn.Module] = []

    def _parent(self, layer: int) -> nn.Module:
        block = self.blocks[layer]
        return block.get_submodule(self._parent_path) if self._parent_path else block

    def __enter__(self) -> _CompiledBlocks:
        try:
            for layer in self.layers:
                parent = self._parent(layer)
                wrapper = _HeadKeep(getattr(parent, self._name), self.adapter)
                setattr(parent, self._name, wrapper)
                self.wrappers[layer] = wrapper
                self.forwards[layer] = torch.compile(self.blocks[layer].forward, **COMPILE_OPTIONS)
        except BaseException:
            self._restore()
            raise
        return self

    def _restore(self) -> None:
        self._unroute()
        for layer, wrapper in self.wrappers.items():
            setattr(self._parent(layer), self._name, wrapper.inner)
        self.wrappers.clear()
        self.forwards.clear()

    def __exit__(self, exc_type, exc, tb) -> None:
        self._restore()

    def set_ablation(
        self, layer: int, keep: torch.Tensor, fill: torch.Tensor, ones: torch.Tensor, zeros
    ) -> None:
        """Ablate per ``keep`` (N, H) / ``fill`` (N, H, D) at ``layer``, nothing elsewhere."""
        for at, wrapper in self.wrappers.items():
            wrapper.keep, wrapper.fill = (keep, fill) if at == layer else (ones, zeros)

    @contextmanager
    def route(self, layers: Iterable[int]):
        """Run blocks ``layers`` through their compiled forward inside the ``with``; a block
        that holds a hook in a submodule runs eagerly instead (exact either way)."""
        try:
            if not _global_hooks():
                for layer in layers:
                    block = self.blocks[layer]
                    if layer in self.forwards and not _has_inner_hooks(block):
                        block.forward = self.forwards[layer]
                        self._routed.append(block)
            yield
        finally:
            self._unroute()

    def _unroute(self) -> None:
        for block in self._routed:
            del block.forward
        self._routed.clear()


def _dynamo_settings(on: bool):
    """Context for a compiled sweep (a no-op when not ``on``): dynamo's per-function
    recompilation limit raised to :data:`COMPILE_RECOMPILE_LIMIT`, and guards on module hooks
    (by default dynamo ignores hooks added after compilation; blocks holding hooks run eagerly
    anyway, this is a second safety)."""
    if not on:
        return nullcontext()
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    settings = {name: max(getattr(config, name), COMPILE_RECOMPILE_LIMIT)}
    if hasattr(config, "skip_nnmodule_hook_guards"):
        settings["skip_nnmodule_hook_guards"] = False
    return config.patch(**settings)


def _compiled_layers(layer: int, early: int, late: int, n_layers: int, kl: bool) -> list[int]:
    """Blocks of a forward for a head at ``layer`` that run compiled: layer..late-1 (..the
    last block with ``kl``), except the blocks that capture V (early when layer < early, late
    when layer < late), which stay eager so that their hooks run."""
    end = n_layers if kl else late
    eager = ({early} if layer < early else set()) | ({late} if layer < late else set())
    return [j for j in range(layer, end) if j not in eager]


def _pad_columns(values: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pad dim 1 of ``values`` (N, T, ...) with zeros to ``width`` columns."""
    extra = width - values.shape[1]
    if extra <= 0:
        return values
    pad = values.new_zeros((values.shape[0], extra, *values.shape[2:]))  # (N, extra, ...)
    return torch.cat([values, pad], dim=1)  # (N, width, ...)


def _use_compile(compile: bool | None, model: nn.Module, adapter: Adapter, device) -> bool:
    """Resolve ``compile`` for this model: ConfigError when asked for (True) but impossible,
    eager when only the default asked for it."""
    if not resolve_compile(compile, device):
        return False
    blocker = compile_blocker(model, adapter)
    if blocker is None:
        return True
    if compile:
        raise ConfigError(f"cannot compile the head sweep: {blocker}; use compile=False")
    return False


def _build_chunks(
    model: nn.Module,
    adapter: Adapter,
    batch: EncodedBatch,
    n_units: int,
    unit: str,
    window: int,
    max_rows: int | None,
    memory_budget: int | None,
    step: int,
) -> list[_Chunk]:
    """The stacked forwards of a sweep (the same for every layer).

    Every (unit, prompt) pair is one row; rows are ordered by prompt length so that each
    stacked chunk is trimmed to its own longest prompt (right padding: trimming the tail
    removes pad columns only). step > 1 (compiled path) also pads each chunk's inputs to a
    multiple of ``step`` columns.
    """
    n_prompts = batch.input_ids.shape[0]
    inputs = batch.model_inputs()
    device = batch.input_ids.device
    pairs = sorted(
        ((u, p) for u in range(n_units) for p in range(n_prompts)),
        key=lambda up: (batch.n_tokens[up[1]], up[1], up[0]),
    )
    lengths = [batch.n_tokens[p] for _, p in pairs]
    budget = memory_budget if memory_budget is not None else default_memory_budget(device)
    per_token = activation_bytes_per_token(model, adapter, -(-max(lengths) // step) * step)
    max_tokens = max(1, budget // per_token)
    chunks = []
    for first, end in plan_chunks(lengths, max_tokens, max_rows):
        units = [u for u, _ in pairs[first:end]]
        prompts = torch.tensor([p for _, p in pairs[first:end]], device=device)  # (N,)
        width = lengths[end - 1]
        chunk = _Chunk(
            units=torch.tensor(units, device=device),
            prompts=prompts,
            width=width,
            inputs={k: v[prompts, :width] for k, v in inputs.items()},  # (N, T')
            keep=keep_mask(adapter, [[u] for u in units], unit).to(device),  # (N, H)
            windows=window_positions(lengths[first:end], window, device),  # (N, W)
            last=torch.tensor(lengths[first:end], device=device) - 1,  # (N,)
        )
        if step > 1:
            chunk.padded_width = -(-width // step) * step
            chunk.padded_inputs = {
                k: _pad_columns(v, chunk.padded_width) for k, v in chunk.inputs.items()
            }  # (N, T''): pad columns hold token 0 with attention mask 0
        chunks.append(chunk)
    return chunks


def _chunk_setup(
    chunk: _Chunk,
    layer: int,
    resid: torch.Tensor,
    mean_z: dict[int, torch.Tensor] | None,
    compiled: _CompiledBlocks | None,
    dtype: torch.dtype,
):
    """(residual stream the skipped blocks return, Trace edits, model inputs) of one chunk's
    forward for heads at ``layer``; on the compiled path the ablation is set on the stand-ins
    instead of being a Trace edit."""
    if compiled is None:
        edit = head_ablation_edit(chunk.keep, None if mean_z is None else mean_z[layer])
        skipped = resid[chunk.prompts, : chunk.width]  # (N, T', d)
        return skipped, {address(layer, "z"): edit}, chunk.inputs
    keep = chunk.keep.to(dtype)  # (N, H)
    zeros = keep.new_zeros((*keep.shape, compiled.adapter.d_head))  # (N, H, D)
    fill = zeros
    if mean_z is not None:
        mean = mean_z[layer].to(device=keep.device, dtype=dtype)  # (H, D)
        fill = mean[None] * (1 - keep)[:, :, None]  # (N, H, D)
    compiled.set_ablation(layer, keep, fill, torch.ones_like(keep), zeros)
    skipped = _pad_columns(resid[chunk.prompts, : chunk.width], chunk.padded_width)  # (N, T'', d)
    return skipped, {}, chunk.padded_inputs


@torch.no_grad()
def cpu(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of ``values`` on the CPU."""
    return {m: t.cpu() for m, t in values.items()}


@torch.no_grad()
def _clean_pass(model, adapter, batch, window, modes, points, stop_point, kl):
    """The clean forward: (Trace with V at the early/late layer and the residual stream
    entering every swept layer, last-token logits or None, clean PR early and late per mode)."""
    v_early, v_late = points[0], points[1]
    device = batch.input_ids.device
    clean_positions = window_positions(batch.n_tokens, window, device)  # (P, W)
    last_clean = torch.tensor(batch.n_tokens, device=device) - 1  # (P,)
    with (
        torch.no_grad(),
        Trace(model, adapter, capture=points, stop_after_point=stop_point) as clean,
        _logits_at(model, adapter, last_clean, kl) as clean_head,
    ):
        model(**batch.model_inputs(), use_cache=False)
    clean_logits = clean_head.logits() if kl else None  # (P, V)
    windows = {
        "early": take_windows(clean[v_early], clean_positions),  # (P, W, Hkv, D)
        "late": take_windows(clean[v_late], clean_positions),
    }
    clean_early = {m: window_pr(windows["early"], m) for m in modes}  # mode -> (P,)
    clean_late = {m: window_pr(windows["late"], m) for m in modes}
    return clean, clean_logits, clean_early, clean_late


@torch.no_grad()
def _ablated_chunk(
    model, adapter, chunk, layer, resid, mean_z, compiled, dtype, capture, stop_point, kl
):
    """One stacked forward of a chunk with its heads ablated at ``layer``, starting from the
    cached residual stream; returns (the Trace with the captured V, last-token logits or
    None)."""
    skipped, edits, chunk_inputs = _chunk_setup(chunk, layer, resid, mean_z, compiled, dtype)
    with (
        torch.no_grad(),
        SkipBlocks(model, adapter, layer, skipped),
        Trace(model, adapter, capture=capture, edits=edits, stop_after_point=stop_point) as tr,
        _logits_at(model, adapter, chunk.last, kl) as head,
    ):
        model(**chunk_inputs, use_cache=False)
    return tr, (head.logits() if kl else None)


def head_sweep(
    model: nn.Module,
    adapter: Adapter,
    batch: EncodedBatch,
    layers: Sequence[int],
    early: int,
    late: int,
    window: int,
    modes: Sequence[str] = ("per-head",),
    unit: str = "query",
    mean_z: dict[int, torch.Tensor] | None = None,
    max_rows: int | None = None,
    on_layer: Callable[[int], None] | None = None,
    memory_budget: int | None = None,
    kl: bool = False,
    compile: bool | None = None,
) -> SweepResult:
    """Ablate each head (or KV group) of ``layers`` in turn; PR at early/late per prompt.

    batch: the prompts (right-padded, P rows). mean_z: layer -> (H, D) reference means for
    mean ablation (None = zero ablation). Rows of one stacked forward are bounded by
    ``memory_budget`` bytes of activations (default :func:`default_memory_budget`) and, if
    given, by ``max_rows``. The loop never waits for the device; results come back at the end.

    kl: also measure KL(clean || ablated) of the next-token distribution at each prompt's last
    real token, a behaviour proxy. Every forward then runs through the last block (the LM
    head only at that token), and heads at layers >= ``late`` are computed too (for KL only:
    their R_V stays exactly the clean value).

    compile: run the blocks through ``torch.compile`` (module docstring; None = the device's
    default, :func:`resolve_compile`); equal to eager up to floating-point rounding.
    """
    check_mode_for_point("v", modes)
    n_prompts = batch.input_ids.shape[0]
    n_units = adapter.n_heads if unit == "query" else adapter.n_kv_heads
    v_early, v_late = address(early, "v"), address(late, "v")
    todo = sorted(layer for layer in layers if layer < late)
    run_layers = sorted(set(layers)) if kl else todo
    resid_points = [address(layer, "resid_pre") for layer in run_layers]
    stop_point = None if kl else v_late
    device = batch.input_ids.device
    use_compile = bool(run_layers) and _use_compile(compile, model, adapter, device)
    clean, clean_logits, clean_early, clean_late = _clean_pass(
        model, adapter, batch, window, modes, [v_early, v_late, *resid_points], stop_point, kl
    )

    shape = (len(layers), n_units, n_prompts)
    pr_early = {m: clean_early[m].expand(shape).clone() for m in modes}
    pr_late = {m: clean_late[m].expand(shape).clone() for m in modes}
    row_of = {layer: i for i, layer in enumerate(layers)}
    kl_values = torch.zeros(shape, dtype=torch.float64, device=device) if kl else None
    step = COMPILE_WIDTH_STEP if use_compile else 1
    chunks = _build_chunks(
        model, adapter, batch, n_units, unit, window, max_rows, memory_budget, step
    )

    def compiled_at(layer: int) -> list[int]:
        return _compiled_layers(layer, early, late, adapter.n_layers, kl)

    compiled = None
    if use_compile:
        blocks = {j for layer in run_layers for j in compiled_at(layer)}
        compiled = _CompiledBlocks(model, adapter, blocks)
    dtype = next(model.parameters()).dtype
    with compiled or nullcontext(), _dynamo_settings(compiled is not None):
        for layer in run_layers:
            resid = clean[address(layer, "resid_pre")]  # (P, T, d)
            capture = ([v_late] if layer < late else []) + ([v_early] if layer < early else [])
            with compiled.route(compiled_at(layer)) if compiled else nullcontext():
                for chunk in chunks:
                    tr, logits = _ablated_chunk(
                        model, adapter, chunk, layer, resid, mean_z, compiled, dtype, capture,
                        stop_point, kl,
                    )  # fmt: skip
                    cells = (row_of[layer], chunk.units, chunk.prompts)
                    if kl:
                        kl_values[cells] = kl_divergence(clean_logits[chunk.prompts], logits)
                    if layer >= late:
                        continue
                    late_windows = take_windows(tr[v_late], chunk.windows)  # (N, W, Hkv, D)
                    for m in modes:
                        pr_late[m][cells] = window_pr(late_windows, m)
                    if layer < early:
                        early_windows = take_windows(tr[v_early], chunk.windows)  # (N, W, Hkv, D)
                        for m in modes:
                            pr_early[m][cells] = window_pr(early_windows, m)
            if on_layer is not None:
                on_layer(layer)

    return SweepResult(
        list(layers),
        n_units,
        unit,
        cpu(pr_early),
        cpu(pr_late),
        cpu(clean_early),
        cpu(clean_late),
        todo,
        kl_values.cpu() if kl_values is not None else None,
    )


def _logits_at(model: nn.Module, adapter: Adapter, positions: torch.Tensor, on: bool):
    """:class:`LastTokenLogits` when ``on``, else a do-nothing context."""
    return LastTokenLogits(model, adapter, positions) if on else nullcontext()


def single_head_reference(
    model: nn.Module,
    adapter: Adapter,
    batch: EncodedBatch,
    layer: int,
    head: int,
    early: int,
    late: int,
    window: int,
    mode: str = "per-head",
    unit: str = "query",
    mean_z: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward way: one full forward with one head ablated. (P,) PR early, late."""
    keep = torch.ones(1, adapter.n_heads)
    keep[0, query_heads_of(adapter, [head], unit)] = 0.0
    edit = head_ablation_edit(keep, mean_z)
    with (
        torch.no_grad(),
        Trace(
            model,
            adapter,
            capture=[address(early, "v"), address(late, "v")],
            edits={address(layer, "z"): edit},
        ) as tr,
    ):
        model(**batch.model_inputs(), use_cache=False)
    e = gather_windows(tr[address(early, "v")], batch.n_tokens, window)
    lt = gather_windows(tr[address(late, "v")], batch.n_tokens, window)
    return window_pr(e, mode), window_pr(lt, mode)
