"""Architecture adapters, one file per family; :func:`adapter_for` picks one for a model."""

from __future__ import annotations

from torch import nn

from rloop.adapters.base import (
    HEAD_POINTS,
    HOOK_POINTS,
    STREAM_POINTS,
    Adapter,
    PointSpec,
    text_config,
)
from rloop.adapters.gemma3 import GEMMA3
from rloop.adapters.gpt2 import GPT2
from rloop.adapters.gpt_neox import GPT_NEOX
from rloop.adapters.gptj import GPTJ
from rloop.adapters.llama import LLAMA
from rloop.errors import UnsupportedArchitectureError

FAMILIES: tuple[Adapter, ...] = (LLAMA, GEMMA3, GPT_NEOX, GPT2, GPTJ)

__all__ = [
    "Adapter",
    "FAMILIES",
    "HEAD_POINTS",
    "HOOK_POINTS",
    "PointSpec",
    "STREAM_POINTS",
    "adapter_for",
    "supported_model_types",
]


def supported_model_types() -> list[str]:
    return sorted({t for family in FAMILIES for t in family.model_types})


def adapter_for(model: nn.Module) -> Adapter:
    """Return the adapter of ``model``'s family, bound to its config and validated.

    Raises UnsupportedArchitectureError naming the supported families when none fits, and
    when a module the adapter names is missing (a renamed module in a new transformers).
    """
    config = model.config
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            adapter = family.bind(text_config(config))
            _validate(adapter, model)
            return adapter
    families = ", ".join(f"{f.family} ({'/'.join(f.model_types)})" for f in FAMILIES)
    raise UnsupportedArchitectureError(
        f"architecture {model_type!r} is not supported; supported families: {families}"
    )


def _validate(adapter: Adapter, model: nn.Module) -> None:
    try:
        blocks = adapter.blocks(model)
        model.get_submodule(adapter.final_norm_path)
        for point in adapter.points:
            adapter.module_for(model, 0, point)
    except AttributeError as err:
        raise UnsupportedArchitectureError(
            f"{adapter.family} adapter does not match this model's modules ({err}); "
            "the installed transformers may have renamed them"
        ) from err
    if len(blocks) != adapter.n_layers:
        raise UnsupportedArchitectureError(
            f"{adapter.family} adapter found {len(blocks)} blocks but the config says "
            f"{adapter.n_layers}"
        )
