"""Architecture adapters: where each hook point of a model family lives, as data.

Every activation rloop reads or writes has a stable address ``blocks.{layer}.{point}``:

=========  ===================================================================  ==============
point      what it is                                                           shape
=========  ===================================================================  ==============
q          query projection, per head, before any rotary embedding              (B, T, H, D)
k          key projection, per KV head, before any rotary embedding             (B, T, Hkv, D)
v          value vectors, per KV head: exactly what attention multiplies by     (B, T, Hkv, D)
           its weights (no rotary or norm touches V in any supported family)
z          per-head attention result, the input of the output projection        (B, T, H, D)
attn_out   output of the attention module (after the output projection)         (B, T, d_model)
mlp_out    output of the MLP module                                             (B, T, d_model)
resid_pre  the block's input (residual stream entering block ``layer``)         (B, T, d_model)
resid_post the block's output (residual stream leaving block ``layer``)         (B, T, d_model)
=========  ===================================================================  ==============

An :class:`Adapter` maps each point to a module path inside one block, whether the hook reads
the module's input or output, and how a fused projection splits into heads. Experiment code
never names a module path; it asks the adapter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from rloop.errors import ConfigError

HEAD_POINTS = ("q", "k", "v", "z")
STREAM_POINTS = ("attn_out", "mlp_out", "resid_pre", "resid_post")
HOOK_POINTS = HEAD_POINTS + STREAM_POINTS


@dataclass(frozen=True)
class FusedQKV:
    """How a fused QKV projection output of width ``3 * H * D`` splits into q, k, v.

    ``layout="heads_interleaved"`` (GPT-NeoX): the output viewed as (B, T, H, 3*D) holds
    [q_h | k_h | v_h] for each head h.  ``layout="blocks"`` (GPT-2): the output is
    [q (H*D) | k (H*D) | v (H*D)], each block then viewed as (H, D).
    """

    layout: str

    def index(self, which: str, n_heads: int, d_head: int) -> torch.Tensor:
        """Column indices of ``which`` in the fused output, ordered as (H, D) -> (H*D,)."""
        part = "qkv".index(which)
        heads = torch.arange(n_heads).unsqueeze(1)  # (H, 1)
        dims = torch.arange(d_head).unsqueeze(0)  # (1, D)
        if self.layout == "heads_interleaved":
            cols = heads * 3 * d_head + part * d_head + dims  # (H, D)
        elif self.layout == "blocks":
            cols = part * n_heads * d_head + heads * d_head + dims  # (H, D)
        else:  # pragma: no cover - adapters are validated at definition
            raise ValueError(f"unknown fused layout {self.layout!r}")
        return cols.reshape(-1)  # (H*D,)


@dataclass(frozen=True)
class PointSpec:
    """Where one hook point lives inside a block.

    module: path relative to the block ("" is the block itself).
    io: "output" reads the module's output, "input" its first positional input.
    fused: for q/k/v of a fused projection, how to slice it; None otherwise.
    """

    module: str
    io: str
    fused: FusedQKV | None = None


def _block_points(
    attn: str, q: str, k: str, v: str, o: str, mlp: str, fused: FusedQKV | None
) -> dict[str, PointSpec]:
    """Point table for a block with an attention module and an MLP module (paths from the block)."""
    return {
        "q": PointSpec(q, "output", fused),
        "k": PointSpec(k, "output", fused),
        "v": PointSpec(v, "output", fused),
        "z": PointSpec(o, "input"),
        "attn_out": PointSpec(attn, "output"),
        "mlp_out": PointSpec(mlp, "output"),
        "resid_pre": PointSpec("", "input"),
        "resid_post": PointSpec("", "output"),
    }


def separate_qkv_points(
    attn: str = "self_attn", out: str = "o_proj", mlp: str = "mlp"
) -> dict[str, PointSpec]:
    """Points of a block whose attention has separate ``q_proj``, ``k_proj``, ``v_proj``.

    attn: the attention module's path in the block; out: its output projection's name inside
    it; mlp: the MLP module's path in the block. The defaults are the Hugging Face decoder
    layout (``self_attn.{q,k,v,o}_proj``, ``mlp``) that :class:`Adapter` assumes by default.
    """
    return _block_points(
        attn, f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj", f"{attn}.{out}", mlp, None
    )


def fused_qkv_points(
    attn: str, qkv: str, out: str, layout: str, mlp: str = "mlp"
) -> dict[str, PointSpec]:
    """Points of a block whose attention computes q, k, v in one fused projection.

    attn: the attention module's path in the block; qkv and out: the fused projection's and
    the output projection's names inside it; layout: how the fused output splits (see
    :class:`FusedQKV`); mlp: the MLP module's path in the block.
    """
    fused = FusedQKV(layout)
    qkv_path = f"{attn}.{qkv}"
    return _block_points(attn, qkv_path, qkv_path, qkv_path, f"{attn}.{out}", mlp, fused)


@dataclass(frozen=True)
class Adapter:
    """Declarative description of one architecture family.

    Sizes (layers, heads, ...) come from the model config when the adapter is bound with
    :meth:`bind`; the family-level fields say where things live. The defaults describe the
    Hugging Face decoder layout most families share (blocks ``model.layers``, final norm
    ``model.norm``, attention ``self_attn.{q,k,v,o}_proj``, MLP ``mlp``, sequential residual),
    so a family file states only where it differs. ``model_types`` defaults to ``(family,)``.
    """

    family: str
    model_types: tuple[str, ...] = ()  # transformers ``model_type`` values; () means (family,)
    layers_path: str = "model.layers"  # path from the top model to the ModuleList of blocks
    final_norm_path: str = "model.norm"
    points: dict[str, PointSpec] = field(default_factory=separate_qkv_points)
    parallel_attn_mlp: Callable[[object], bool] = field(default=lambda config: False)
    n_layers: int = 0
    n_heads: int = 0
    n_kv_heads: int = 0
    d_head: int = 0
    d_model: int = 0

    def __post_init__(self) -> None:
        if not self.model_types:
            object.__setattr__(self, "model_types", (self.family,))

    def bind(self, config: object) -> Adapter:
        """Return a copy with the sizes read from a transformers config."""
        n_heads = int(config.num_attention_heads)
        d_model = int(config.hidden_size)
        d_head = getattr(config, "head_dim", None) or d_model // n_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        return dataclasses.replace(
            self,
            n_layers=int(config.num_hidden_layers),
            n_heads=n_heads,
            n_kv_heads=int(n_kv),
            d_head=int(d_head),
            d_model=d_model,
        )

    # ------------------------------------------------------------------ addressing
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise ConfigError(
                f"layer {layer} is out of range: this model has layers 0..{self.n_layers - 1}"
            )

    def heads_at(self, point: str) -> int:
        """Number of heads the per-head tensor of ``point`` has (KV heads for k and v)."""
        return self.n_kv_heads if point in ("k", "v") else self.n_heads

    def module_for(self, model: nn.Module, layer: int, point: str) -> nn.Module:
        self.check_layer(layer)
        spec = self.spec(point)
        block = self.blocks(model)[layer]
        return block.get_submodule(spec.module) if spec.module else block

    def spec(self, point: str) -> PointSpec:
        if point not in self.points:
            raise ConfigError(
                f"unknown hook point {point!r}: choose one of {', '.join(self.points)}"
            )
        return self.points[point]

    # ------------------------------------------------------------------ reading / writing
    def read(self, point: str, raw: torch.Tensor) -> torch.Tensor:
        """Turn the raw module tensor into the hook point's canonical tensor.

        raw: (B, T, width). Returns (B, T, H, D) for head points, (B, T, d_model) otherwise.
        """
        if point not in HEAD_POINTS:
            return raw
        spec = self.spec(point)
        n_heads = self.heads_at(point)
        if spec.fused is not None:
            cols = spec.fused.index(point, n_heads, self.d_head).to(raw.device)
            raw = raw.index_select(-1, cols)  # (B, T, H*D)
        return raw.unflatten(-1, (n_heads, self.d_head))  # (B, T, H, D)

    def write(self, point: str, raw: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`read`: return ``raw`` with the point's part replaced by ``value``.

        value has the canonical shape (B, T, H, D) or (B, T, d_model).
        """
        if point not in HEAD_POINTS:
            return value.to(raw.dtype)
        spec = self.spec(point)
        flat = value.flatten(-2).to(raw.dtype)  # (B, T, H*D)
        if spec.fused is None:
            return flat
        n_heads = self.heads_at(point)
        cols = spec.fused.index(point, n_heads, self.d_head).to(raw.device)
        out = raw.clone()
        out[..., cols] = flat
        return out


def text_config(config: object) -> object:
    """The text (language-model) config of a transformers config; itself if it has none."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config
