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
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rloop.errors import ConfigError, ModelLoadError
from rloop.models import embedded
from rloop.models.registry import REGISTRY, registry_entry

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

    model: torch.nn.Module
    tokenizer: object
    adapter: object
    name: str
    source: str  # "registry" | "hub" | "local" | "gguf"
    path: str
    revision: str | None
    weights_sha256: str
    device: torch.device
    dtype: torch.dtype


@dataclass(frozen=True)
class ModelInfo:
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


def weights_sha256(directory: Path) -> str:
    """sha256 over the weight files of a model directory (names and bytes, sorted).

    Cached in ``$RLOOP_CACHE/hashes`` keyed by path, size and modification time, so a
    multi-GB checkpoint is hashed once.
    """
    sidecar = directory / "weights.sha256"
    if sidecar.exists():
        return sidecar.read_text().strip()
    files = sorted(
        p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf")
    )
    if not files:
        return "unknown"
    key_src = json.dumps(
        [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:32]
    cache = embedded.cache_root() / "hashes" / f"{key}.txt"
    if cache.exists():
        return cache.read_text().strip()
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode())
        digest.update(embedded.sha256_file(p).encode())
    value = digest.hexdigest()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(value + "\n")
    except OSError:
        pass  # a read-only cache only costs re-hashing next time
    return value


def _prepare_tokenizer(tokenizer):
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = "right"
    return tokenizer


def _from_pretrained(source: str | Path, revision, dtype, attn, device_map=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(
            source, revision=revision, dtype=dtype, attn_implementation=attn, device_map=device_map
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return model, tokenizer


def _finish(model, tokenizer, device, dtype, device_map, **info) -> LoadedModel:
    from rloop.adapters import adapter_for

    adapter = adapter_for(model)  # fails early, with the supported families, if unsupported
    if device_map is None:
        model = model.to(device=device, dtype=dtype)
    model.eval().requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=_prepare_tokenizer(tokenizer),
        adapter=adapter,
        device=device if device_map is None else next(model.parameters()).device,
        dtype=dtype,
        **info,
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
    torch_dtype = resolve_dtype(dtype, dev)
    attn = _default_attn(dev, attn_implementation)
    entry = registry_entry(name_or_path)
    path = Path(name_or_path).expanduser()

    if entry is not None and entry.source in ("embedded", "fetch"):
        if entry.name == "smollm2-135m":
            directory = embedded.ensure_smollm2_cache()
        else:
            directory = embedded.cached(entry.name)
            if directory is None:
                raise ModelLoadError(
                    f"{entry.name} is not fetched yet: run `rloop models fetch {entry.name}`"
                )
        model, tokenizer = _from_pretrained(directory, None, torch_dtype, attn, device_map)
        return _finish(
            model,
            tokenizer,
            dev,
            torch_dtype,
            device_map,
            name=entry.name,
            source="registry",
            path=str(directory),
            revision=None,
            weights_sha256=weights_sha256(directory),
        )
    if entry is None and path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} has no config.json: pass a Hugging Face model directory")
        try:
            model, tokenizer = _from_pretrained(path, None, torch_dtype, attn, device_map)
        except OSError as err:
            raise ModelLoadError(f"cannot load model directory {path}: {_first_line(err)}") from err
        return _finish(
            model,
            tokenizer,
            dev,
            torch_dtype,
            device_map,
            name=str(path),
            source="local",
            path=str(path.resolve()),
            revision=None,
            weights_sha256=weights_sha256(path),
        )
    if entry is None and path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        model, tokenizer = embedded.load_gguf(path, torch_dtype)
        model.config._attn_implementation = attn
        return _finish(
            model,
            tokenizer,
            dev,
            torch_dtype,
            device_map,
            name=path.name,
            source="gguf",
            path=str(path.resolve()),
            revision=None,
            weights_sha256=embedded.sha256_file(path),
        )
    hub_id = entry.hub_id if entry is not None else name_or_path
    if entry is None and "/" not in name_or_path:
        names = ", ".join(e.name for e in REGISTRY)
        raise ModelLoadError(
            f"unknown model {name_or_path!r}: not a registry name ({names}), "
            "not an existing directory or .gguf file, and not a hub id (org/name)"
        )
    return _load_hub(
        hub_id, entry.name if entry else hub_id, revision, dev, torch_dtype, attn, device_map
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _load_hub(hub_id, name, revision, dev, torch_dtype, attn, device_map) -> LoadedModel:
    try:
        model, tokenizer = _from_pretrained(hub_id, revision, torch_dtype, attn, device_map)
    except OSError as err:
        message = str(err)
        if revision and ("revision" in message.lower() or "not a valid git identifier" in message):
            raise ModelLoadError(
                f"revision {revision!r} of {hub_id} not found: check the name (e.g. step5000 for Pythia)"
            ) from err
        raise ModelLoadError(
            f"cannot load {hub_id}{'@' + revision if revision else ''} from the Hugging Face hub or "
            "its local cache (offline or unknown id): download it elsewhere and pass the local "
            "directory, or a .gguf file, instead"
        ) from err
    directory = _snapshot_dir(hub_id, revision)
    return _finish(
        model,
        tokenizer,
        dev,
        torch_dtype,
        device_map,
        name=name,
        source="hub",
        path=str(directory or hub_id),
        revision=revision,
        weights_sha256=weights_sha256(directory) if directory else "unknown",
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


def fetch_model(name: str) -> Path:
    """Download and cache a registry model that is fetched from PyPI (gemma-3-270m)."""
    entry = registry_entry(name)
    if entry is None or entry.source != "fetch":
        fetchable = ", ".join(e.name for e in REGISTRY if e.source == "fetch")
        raise ModelLoadError(f"{name!r} cannot be fetched; fetchable models: {fetchable}")
    return embedded.fetch_gemma()
