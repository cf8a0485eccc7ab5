"""Loading models: registry names, local directories, GGUF files and hub ids."""

from rloop.models.loading import (
    DTYPES,
    LoadedModel,
    ModelInfo,
    fetch_model,
    list_models,
    load_model,
    resolve_device,
    resolve_dtype,
)
from rloop.models.registry import DEFAULT_MODEL, REGISTRY, RegistryEntry, registry_entry

__all__ = [
    "DEFAULT_MODEL",
    "DTYPES",
    "LoadedModel",
    "ModelInfo",
    "REGISTRY",
    "RegistryEntry",
    "fetch_model",
    "list_models",
    "load_model",
    "registry_entry",
    "resolve_device",
    "resolve_dtype",
]
