"""Load a causal LM by registry name, local directory, GGUF file or hub id (+ revision).

Resolution order of ``load_model(name_or_path)``:
1. a registry short name (``rloop models`` lists them);
2. an existing local directory in Hugging Face format (config.json + weights);
3. an existing ``.gguf`` file (read with transformers' GGUF support, dequantised);
4. a hub id such as ``EleutherAI/pythia-2.8b`` with an optional ``revision`` (``step5000``),
   which needs the hub or a local HF cache.

Defaults: device cuda if available else cpu; dtype float32 on CPU, bfloat16 on CUDA (float16
overflows in deep Pythia layers); attention "eager" on CPU (attention weights available,
simple numerics), "sdpa" on CUDA. The model is in eval mode with gradients off.

``weights_sha256`` is the sha256 of the weight file that was read (``sha256sum FILE``); for a
sharded checkpoint it is the sha256 of the ``sha256sum``-style listing of its shards
("<hex>  <name>\n" per shard, sorted by name). Only files transformers actually reads count
(``model.safetensors`` or its shards, else ``pytorch_model.bin`` or its shards), not
``training_args.bin`` or optimizer states lying next to them. For registry models it is the
hash of the cached safetensors copy (the GGUF hash is kept in the cache's ``source.sha256``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from rloop.adapters import adapter_for
from rloop.errors import ConfigError, ModelLoadError
from rloop.models import embedded
from rloop.models.registry import REGISTRY, RegistryEntry, registry_entry
from rloop.progress import quiet_transformers

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from rloop.adapters import Adapter

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


@dataclass
class LoadedModel:
    """A model ready for rloop: eval mode, its tokenizer (pad token set, right padding) and
    its architecture adapter, with the provenance every run manifest records."""

    model: PreTrainedModel  # eval mode, requires_grad False on every parameter
    tokenizer: PreTrainedTokenizerBase  # pad token set (eos if none), padding_side "right"
    adapter: Adapter
    name: str  # registry short name, or the id / path as given
    source: str  # "registry" | "hub" | "local" | "gguf"
    path: str  # where the weights were read from
    revision: str | None  # hub revision (e.g. "step5000"), None for the default branch
    weights_sha256: str  # see the module docstring; "unknown" only for a hub model whose
    # snapshot directory could not be located after loading
    device: torch.device
    dtype: torch.dtype


@dataclass(frozen=True)
class ModelInfo:
    """A registry entry and whether it can be loaded offline right now."""

    name: str
    family: str
    source: str
    available: bool
    notes: str


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but no CUDA GPU is available: use --device cpu")
    return resolved


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def weight_files(directory: Path) -> list[Path]:
    """The weight files ``from_pretrained`` reads from an HF model directory, sorted by name
    (safetensors preferred over pytorch .bin, sharded via the index file), or [] if none."""
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (directory / index).exists():
            weight_map = json.loads((directory / index).read_text()).get("weight_map", {})
            return sorted({directory / shard for shard in weight_map.values()})
        if (directory / single).exists():
            return [directory / single]
    return []


def weights_sha256(directory: Path) -> str:
    """sha256 of the weight file(s) of an HF model directory (see the module docstring).

    Per-file hashes are cached by path, size and modification time, so a multi-GB
    checkpoint is hashed once.
    """
    files = weight_files(directory)
    if not files:
        return "unknown"
    if len(files) == 1:
        return embedded.cached_sha256_file(files[0])
    listing = "".join(f"{embedded.cached_sha256_file(p)}  {p.name}\n" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def _prepare_tokenizer(tokenizer):
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = "right"
    return tokenizer


@dataclass(frozen=True)
class _Placement:
    """Where and how a model is loaded: device, dtype, attention implementation, device map."""

    device: torch.device
    dtype: torch.dtype
    attn: str  # attn_implementation passed to transformers
    device_map: str | dict | None  # None: load, then move the whole model to ``device``


def _from_pretrained(source: str | Path, revision: str | None, placement: _Placement):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(
            source,
            revision=revision,
            dtype=placement.dtype,
            attn_implementation=placement.attn,
            device_map=placement.device_map,
        )
    return model, tokenizer


class _Provenance(NamedTuple):
    """Where a loaded model came from: the :class:`LoadedModel` fields of the same names."""

    name: str
    source: str
    path: str
    weights_sha256: str
    revision: str | None = None


def _finish(
    model_and_tokenizer: tuple, placement: _Placement, provenance: _Provenance
) -> LoadedModel:
    """Attach the adapter, move to the device, set eval mode; the provenance is as given."""
    model, tokenizer = model_and_tokenizer
    adapter = adapter_for(model)  # fails early, with the supported families, if unsupported
    if placement.device_map is None:
        model = model.to(device=placement.device, dtype=placement.dtype)
        device = placement.device
    else:
        device = next(model.parameters()).device  # the first shard's device
    model.eval().requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=_prepare_tokenizer(tokenizer),
        adapter=adapter,
        device=device,
        dtype=placement.dtype,
        **provenance._asdict(),
    )


def _default_attn(device: torch.device, attn: str | None) -> str:
    return attn or ("sdpa" if device.type == "cuda" else "eager")


def load_model(
    name_or_path: str,
    *,
    revision: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    attn_implementation: str | None = None,
    device_map: str | dict | None = None,
) -> LoadedModel:
    """Load a model (see the module docstring for resolution order and defaults).

    ``device_map`` (e.g. "auto") spreads a model that does not fit one GPU over several;
    then ``device`` is ignored for placement.
    """
    if not name_or_path:
        raise ModelLoadError(
            "no model given: pass a registry name, a directory, a .gguf file or a hub id"
        )
    dev = resolve_device(device)
    placement = _Placement(
        dev, resolve_dtype(dtype, dev), _default_attn(dev, attn_implementation), device_map
    )
    entry = registry_entry(name_or_path)
    path = Path(name_or_path).expanduser()
    is_hub = (entry is not None and entry.source == "hub") or (
        entry is None and not path.exists() and _HUB_ID.fullmatch(name_or_path) is not None
    )
    if revision is not None and not is_hub:
        raise ConfigError(
            f"revision {revision!r} given for {name_or_path}, which is not a hub model: "
            "drop --revision (revisions apply to hub ids such as EleutherAI/pythia-70m)"
        )
    if entry is not None and entry.source in ("embedded", "fetch"):
        return _load_registry_copy(entry, placement)
    if entry is None and path.is_dir():
        return _load_directory(path, placement)
    if entry is None and path.suffix == ".gguf":
        return _load_gguf(path, placement)
    if not is_hub:
        raise ModelLoadError(_not_loadable_message(name_or_path, path, entry))
    hub_id = entry.hub_id if entry is not None else name_or_path
    return _load_hub(hub_id, entry.name if entry else hub_id, revision, placement)


# A hub id is "org/name" (letters, digits, '-', '_', '.'), not starting with '.' or '/'.
_HUB_ID = re.compile(r"[A-Za-z0-9_][\w.-]*/[A-Za-z0-9_][\w.-]*")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _load_registry_copy(entry: RegistryEntry, placement: _Placement) -> LoadedModel:
    """An embedded or fetched registry model, from its safetensors copy in the rloop cache."""
    if entry.name == "smollm2-135m":
        directory = embedded.ensure_smollm2_cache()
    else:
        directory = embedded.cached(entry.name)
        if directory is None:
            raise ModelLoadError(
                f"{entry.name} is not fetched yet: run `rloop models fetch {entry.name}`"
            )
    try:
        loaded = _from_pretrained(directory, None, placement)
    except OSError as err:
        raise ModelLoadError(
            f"cached copy of {entry.name} in {directory} is unreadable ({_first_line(err)}): "
            "delete that directory and load again"
        ) from err
    sha256 = embedded.cached_weights_sha256(directory)
    return _finish(loaded, placement, _Provenance(entry.name, "registry", str(directory), sha256))


def _load_directory(path: Path, placement: _Placement) -> LoadedModel:
    """A local Hugging Face model directory (config.json + weights)."""
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path} has no config.json: pass a Hugging Face model directory")
    try:
        loaded = _from_pretrained(path, None, placement)
    except OSError as err:
        raise ModelLoadError(f"cannot load model directory {path}: {_first_line(err)}") from err
    provenance = _Provenance(str(path), "local", str(path.resolve()), weights_sha256(path))
    return _finish(loaded, placement, provenance)


def _load_gguf(path: Path, placement: _Placement) -> LoadedModel:
    """A local .gguf file, dequantised by transformers' GGUF reader."""
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    with quiet_transformers():  # restores the caller's setting, which load_gguf does not
        loaded = embedded.load_gguf(path, placement.dtype, placement.attn)
    sha256 = embedded.cached_sha256_file(path)
    return _finish(loaded, placement, _Provenance(path.name, "gguf", str(path.resolve()), sha256))


def _not_loadable_message(name_or_path: str, path: Path, entry: RegistryEntry | None) -> str:
    """Why ``name_or_path`` is neither a registry model, a local model nor a hub id."""
    if entry is None and path.exists():
        return (
            f"{path} is neither a model directory nor a .gguf file: pass a Hugging Face model "
            "directory (config.json + weights) or a .gguf file"
        )
    if entry is None and "/" not in name_or_path:
        names = ", ".join(e.name for e in REGISTRY)
        return (
            f"unknown model {name_or_path!r}: not a registry name ({names}), "
            "not an existing directory or .gguf file, and not a hub id (org/name)"
        )
    return (
        f"path {name_or_path} does not exist: pass an existing model directory or .gguf file "
        "(a hub id looks like org/name)"
    )


def _load_hub(hub_id: str, name: str, revision: str | None, placement: _Placement) -> LoadedModel:
    try:
        loaded = _from_pretrained(hub_id, revision, placement)
    except OSError as err:
        raise ModelLoadError(hub_failure_message(err, hub_id, revision)) from err
    directory = _snapshot_dir(hub_id, revision)
    sha256 = weights_sha256(directory) if directory else "unknown"
    provenance = _Provenance(name, "hub", str(directory or hub_id), sha256, revision)
    return _finish(loaded, placement, provenance)


def hub_failure_message(err: BaseException, hub_id: str, revision: str | None) -> str:
    """One line explaining why ``from_pretrained(hub_id, revision=...)`` failed.

    huggingface_hub's own error types are found on the exception chain (transformers wraps
    them in OSError); anything else is treated as an unreachable hub.
    """
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    label = f"{hub_id}@{revision}" if revision else hub_id
    if any(isinstance(e, RevisionNotFoundError) for e in chain) or (
        revision and "not a valid git identifier" in str(err)
    ):
        return (
            f"revision {revision!r} of {hub_id} not found on the hub: check the name "
            "(e.g. step5000 for Pythia checkpoints)"
        )
    if any(isinstance(e, GatedRepoError) for e in chain):
        return f"{hub_id} is gated on the hub: accept its licence and log in, or pass a local directory"
    if any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return f"{hub_id} is not a model on the Hugging Face hub: check the id, or pass a local directory or .gguf path"
    return (
        f"the Hugging Face hub is unreachable and {label} is not in the local HF cache: "
        "pass a local model directory or a .gguf path instead"
    )


def _snapshot_dir(hub_id: str, revision: str | None) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - provenance only; the model is already loaded
        return None


def list_models() -> list[ModelInfo]:
    """Registry entries with whether each can be loaded offline right now."""
    import importlib.util

    infos = []
    for entry in REGISTRY:
        if entry.name == "smollm2-135m":
            available = importlib.util.find_spec(embedded.SMOLLM2_PACKAGE) is not None
        elif entry.source == "fetch":
            available = embedded.cached(entry.name) is not None
        else:
            available = _snapshot_dir(entry.hub_id, None) is not None
        infos.append(ModelInfo(entry.name, entry.family, entry.source, available, entry.notes))
    return infos


def fetch_model(name: str, progress: Callable[[str], None] | None = print) -> Path:
    """Download and cache a registry model that is fetched from PyPI (gemma-3-270m).

    Returns the cache directory (``$RLOOP_CACHE/models/<name>``); a no-op when it exists.
    ``progress`` receives one-line status messages (None: silent). Needs PyPI access.
    """
    entry = registry_entry(name)
    if entry is None or entry.source != "fetch":
        fetchable = ", ".join(e.name for e in REGISTRY if e.source == "fetch")
        raise ModelLoadError(f"{name!r} cannot be fetched; fetchable models: {fetchable}")
    return embedded.fetch_gemma(progress)
