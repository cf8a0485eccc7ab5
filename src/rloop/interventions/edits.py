"""Interventions as edit functions for :class:`rloop.capture.Trace` (SCIENCE.md §3).

Every ablation and patch in rloop is built here and applied through the adapter's hook
points, so one tested mechanism serves every experiment:

- heads are ablated at the input of the attention output projection (hook point ``z``),
  never by slicing the projection's output;
- zero ablation replaces the head's slice by 0, mean ablation by its mean over a named
  reference prompt set (computed by :func:`mean_activations`);
- GQA: ``unit="query"`` ablates query heads, ``unit="kv_group"`` ablates every query head
  that reads a KV head (its z slices), named in every output;
- batched variants: a (N, H) keep-mask ablates a different set of heads in each batch row.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from rloop.adapters import Adapter
from rloop.capture.batching import encode
from rloop.capture.trace import EditFn, Trace, address
from rloop.errors import ConfigError

ABLATION_MODES = ("zero", "mean")
HEAD_UNITS = ("query", "kv_group")


def check_heads(
    adapter: Adapter, layer: int, heads: Iterable[int], unit: str = "query"
) -> list[int]:
    """Validate head indices of ``unit`` at ``layer``; returns them as a sorted list."""
    adapter.check_layer(layer)
    if unit not in HEAD_UNITS:
        raise ConfigError(f"unknown head unit {unit!r}: choose query or kv_group")
    n = adapter.n_heads if unit == "query" else adapter.n_kv_heads
    heads = sorted(set(int(h) for h in heads))
    bad = [h for h in heads if not 0 <= h < n]
    if bad:
        raise ConfigError(
            f"head index {bad[0]} is out of range at layer {layer}: "
            f"this model has {unit} heads 0..{n - 1}"
        )
    return heads


def query_heads_of(adapter: Adapter, heads: Sequence[int], unit: str) -> list[int]:
    """The query heads that ``heads`` of ``unit`` cover (a KV group covers H/Hkv query heads)."""
    if unit == "query":
        return list(heads)
    group = adapter.n_heads // adapter.n_kv_heads
    return [g * group + i for g in heads for i in range(group)]


def keep_mask(
    adapter: Adapter, variants: Sequence[Sequence[int]], unit: str = "query"
) -> torch.Tensor:
    """(N, H) float mask: 0 where variant n ablates a query head, 1 elsewhere."""
    mask = torch.ones(len(variants), adapter.n_heads)
    for n, heads in enumerate(variants):
        mask[n, query_heads_of(adapter, heads, unit)] = 0.0
    return mask


def head_ablation_edit(
    keep: torch.Tensor, mean: torch.Tensor | None = None, rows_per_variant: int = 1
) -> EditFn:
    """Edit of z (B, T, H, D) that ablates heads per batch row.

    keep: (N, H) mask, one row per variant; batch row b uses variant b // rows_per_variant
        (variants are stacked in blocks of ``rows_per_variant`` prompts). N = 1 applies the
        same ablation to every row.
    mean: (H, D) reference mean of z for mean ablation; None = zero ablation.
    """

    def edit(z: torch.Tensor) -> torch.Tensor:  # (B, T, H, D)
        k = keep.to(device=z.device, dtype=z.dtype)
        k = k.repeat_interleave(rows_per_variant, dim=0) if k.shape[0] > 1 else k  # (B, H)
        k = k[:, None, :, None]  # (B, 1, H, 1)
        if mean is None:
            return z * k
        m = mean.to(device=z.device, dtype=z.dtype)[None, None]  # (1, 1, H, D)
        return z * k + m * (1 - k)

    return edit


def component_ablation_edit(mean: torch.Tensor | None = None) -> EditFn:
    """Edit of a (B, T, d_model) stream (attn_out, mlp_out): zero it, or set it to ``mean`` (d,)."""

    def edit(x: torch.Tensor) -> torch.Tensor:  # (B, T, d)
        if mean is None:
            return torch.zeros_like(x)
        return mean.to(device=x.device, dtype=x.dtype).expand_as(x).clone()

    return edit


@dataclass(frozen=True)
class PatchSpec:
    """Replace ``point`` at ``layer`` by a source run's value.

    heads / positions restrict the patch to those heads and sequence positions.
    """

    layer: int
    point: str
    heads: tuple[int, ...] | None = None
    positions: tuple[int, ...] | None = None


def patch_edit(source: torch.Tensor, spec: PatchSpec) -> EditFn:
    """Edit that writes the source activation into the target run.

    source: the canonical tensor of the source run at the same point, (B, T, H, D) or
    (B, T, d). Positions index the sequence axis; if None the whole sequence is patched and
    source and target must have the same length.
    """

    def edit(x: torch.Tensor) -> torch.Tensor:
        src = source.to(device=x.device, dtype=x.dtype)
        if spec.positions is None and src.shape[1] != x.shape[1]:
            raise ConfigError(
                f"source has {src.shape[1]} tokens but target has {x.shape[1]}: patching every "
                "position needs equal lengths; give explicit positions"
            )
        out = x.clone()
        positions = (
            torch.arange(x.shape[1], device=x.device)
            if spec.positions is None
            else torch.tensor(spec.positions, device=x.device)
        )  # (P,)
        if spec.heads is None:
            out[:, positions] = src[:, positions]
        else:
            heads = torch.tensor(spec.heads, device=x.device)  # (K,)
            # Cross positions with heads: (P, 1) x (1, K) -> every (position, head) pair.
            grid = (positions[:, None], heads[None, :])
            out[:, grid[0], grid[1]] = src[:, grid[0], grid[1]]
        return out

    return edit


def mean_activations(
    model: torch.nn.Module,
    adapter: Adapter,
    tokenizer,
    texts: Sequence[str],
    layers: Sequence[int],
    point: str = "z",
    batch_size: int = 16,
) -> dict[int, torch.Tensor]:
    """Mean of ``point`` over every real token of ``texts`` (the reference set), per layer.

    Returns layer -> (H, D) for head points or (d_model,) for stream points, float32.
    """
    if not texts:
        raise ConfigError("the mean-ablation reference prompt set is empty")
    device = next(model.parameters()).device
    sums: dict[int, torch.Tensor] = {}
    count = 0
    for start in range(0, len(texts), batch_size):
        batch = encode(tokenizer, texts[start : start + batch_size], device)
        points = [address(layer, point) for layer in layers]
        with (
            torch.no_grad(),
            Trace(model, adapter, capture=points, stop_after_layer=max(layers)) as tr,
        ):
            model(**batch.model_inputs(), use_cache=False)
        mask = batch.attention_mask.to(torch.float64)  # (B, T)
        for layer in layers:
            value = tr[address(layer, point)].to(torch.float64)  # (B, T, ...)
            weights = mask.view(*mask.shape, *([1] * (value.dim() - 2)))
            total = (value * weights).sum(dim=(0, 1))
            sums[layer] = sums.get(layer, 0) + total
        count += int(mask.sum())
    return {layer: (total / count).to(torch.float32) for layer, total in sums.items()}


HeadList = list[tuple[int, int]]


def check_ablation_mode(mode: str, unit: str = "query") -> None:
    """One-line errors for an unknown ablation mode or head unit."""
    if mode not in ABLATION_MODES:
        raise ConfigError(f"unknown ablation mode {mode!r}: choose {' or '.join(ABLATION_MODES)}")
    if unit not in HEAD_UNITS:
        raise ConfigError(f"unknown head unit {unit!r}: choose query or kv_group")


def parse_heads(text: str) -> HeadList:
    """'15.4,16.2' -> [(15, 4), (16, 2)] (layer.head); ConfigError for anything else."""
    heads: HeadList = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        pieces = part.split(".")
        if len(pieces) != 2 or not all(p.strip().isdigit() for p in pieces):
            raise ConfigError(
                f"cannot read head {part!r}: write heads as LAYER.HEAD, e.g. 15.4,16.2"
            )
        heads.append((int(pieces[0]), int(pieces[1])))
    if not heads:
        raise ConfigError("no heads given: write heads as LAYER.HEAD, e.g. --heads 15.4,16.2")
    return sorted(set(heads))


def check_head_list(adapter: Adapter, heads: HeadList, unit: str = "query") -> HeadList:
    """Range-check every (layer, head) of ``unit``; returns them sorted and de-duplicated."""
    for layer, head in heads:
        check_heads(adapter, layer, [head], unit)
    return sorted(set(heads))


def group_ablation_edits(
    adapter: Adapter, heads: HeadList, unit: str = "query", mean_z=None
) -> dict[str, EditFn]:
    """Edits that ablate several (layer, head) pairs together (one z edit per layer)."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    edits = {}
    for layer, hs in by_layer.items():
        hs = check_heads(adapter, layer, hs, unit)
        keep = keep_mask(adapter, [hs], unit)  # (1, H)
        edits[address(layer, "z")] = head_ablation_edit(
            keep, None if mean_z is None else mean_z[layer]
        )
    return edits


COMPONENT_POINTS = {"attn": "attn_out", "mlp": "mlp_out"}


def layer_ablation_edits(layer: int, component: str = "attn_out", mean=None) -> dict[str, EditFn]:
    """Edits that remove a whole attention block output (or MLP output) at ``layer``."""
    if component not in COMPONENT_POINTS.values():
        raise ConfigError(f"component must be attn_out or mlp_out, got {component!r}")
    return {address(layer, component): component_ablation_edit(mean)}


def stacked_head_edits(
    adapter: Adapter,
    head_sets: Sequence[HeadList],
    rows_per_variant: int,
    unit: str = "query",
    mean_z: dict[int, torch.Tensor] | None = None,
) -> dict[str, EditFn]:
    """Per-row edits for variants stacked along the batch: variant i (rows i*P .. i*P+P-1)
    has the heads of ``head_sets[i]`` ablated together (a keep-mask per layer touched)."""
    layers = sorted({layer for heads in head_sets for layer, _ in heads})
    edits = {}
    for layer in layers:
        variants = [[h for lay, h in heads if lay == layer] for heads in head_sets]
        keep = keep_mask(adapter, variants, unit)  # (N, H)
        mean = None if mean_z is None else mean_z[layer]
        edits[address(layer, "z")] = head_ablation_edit(
            keep, mean, rows_per_variant=rows_per_variant
        )
    return edits
