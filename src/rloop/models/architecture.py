"""Architecture facts read from a model config: sizes, rotary fraction, parameter count, and
the head density rho = n_heads / d_head of the H25 hypothesis (seeds 002, 004).

    facts = architecture_facts(model.config, n_params=count_parameters(model))
    facts.rho  # e.g. Pythia-6.9B: 32 / 128 = 0.25

d_head is the config's ``head_dim`` when it has one (Gemma 3: 256 with d_model 640), else
d_model // n_heads; the seeds always used the latter, which is wrong for Gemma.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from rloop.adapters.base import text_config
from rloop.errors import UnsupportedArchitectureError

#: Families whose attention has no rotary embedding (learned absolute positions).
NO_ROTARY_MODEL_TYPES = ("gpt2",)


@dataclass(frozen=True)
class ArchitectureFacts:
    """Sizes of one model. rho = n_heads / d_head (query heads per head dimension)."""

    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    rotary_fraction: float  # fraction of each head's dimensions that are rotated (0 = none)
    n_params: int | None  # counted from the loaded model (tied weights once); None if unknown

    @property
    def rho(self) -> float:
        return self.n_heads / self.d_head

    def to_dict(self) -> dict:
        return {**asdict(self), "rho": self.rho}


def _rotary_fraction(config: object, model_type: str, d_head: int) -> float:
    if model_type in NO_ROTARY_MODEL_TYPES:
        return 0.0
    rotary_dim = getattr(config, "rotary_dim", None)  # GPT-J: rotated dims per head
    if rotary_dim:
        return float(rotary_dim) / d_head
    rope = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope, dict):
        if "partial_rotary_factor" in rope:
            return float(rope["partial_rotary_factor"])
        # Gemma 3: one rope dict per attention type; the fraction is the same in each.
        nested = [v for v in rope.values() if isinstance(v, dict)]
        for value in nested:
            if "partial_rotary_factor" in value:
                return float(value["partial_rotary_factor"])
    for name in ("partial_rotary_factor", "rotary_pct"):
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    return 1.0


def architecture_facts(config: object, n_params: int | None = None) -> ArchitectureFacts:
    """Facts of a transformers config (the text config of a multimodal one)."""
    config = text_config(config)
    model_type = str(getattr(config, "model_type", "unknown"))
    try:
        n_heads = int(config.num_attention_heads)
        d_model = int(config.hidden_size)
        n_layers = int(config.num_hidden_layers)
    except (AttributeError, TypeError) as err:
        raise UnsupportedArchitectureError(
            f"config of model type {model_type!r} lacks a size field ({err}); "
            "pass a transformers causal-LM config"
        ) from None
    d_head = int(getattr(config, "head_dim", None) or d_model // n_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    return ArchitectureFacts(
        model_type=model_type,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        d_head=d_head,
        d_model=d_model,
        rotary_fraction=_rotary_fraction(config, model_type, d_head),
        n_params=n_params,
    )


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (tied embeddings counted once; meta/offloaded ones included)."""
    return int(sum(p.numel() for p in model.parameters()))


def facts_of_model(model: nn.Module) -> ArchitectureFacts:
    """Facts of a loaded model, with its parameter count."""
    return architecture_facts(model.config, n_params=count_parameters(model))
