"""Model loading: local directories, dtype/device defaults, errors, GGUF part reassembly,
and the embedded SmolLM2 (slow: its cached copy must reproduce the GGUF-loaded logits)."""

from __future__ import annotations

import hashlib

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rloop.errors import ConfigError, ModelLoadError, UnsupportedArchitectureError
from rloop.models import REGISTRY, embedded, load_model
from tests.tiny_models import tiny_model


def word_tokenizer(vocab_size: int = 97) -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture
def saved_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("RLOOP_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama")
    directory = tmp_path / "tiny-llama"
    model.save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    return model, directory


def test_local_directory_loads_with_same_logits(saved_tiny) -> None:
    original, directory = saved_tiny
    lm = load_model(str(directory))
    assert lm.source == "local" and lm.adapter.family == "llama"
    assert lm.dtype == torch.float32 and lm.device.type == "cpu"
    assert lm.tokenizer.pad_token == "<eos>" and lm.tokenizer.padding_side == "right"
    assert not any(p.requires_grad for p in lm.model.parameters())
    ids = lm.tokenizer(["w5 w9 w11 w3"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, original(ids).logits, atol=1e-6, rtol=1e-6)
    # The weights hash is the sha256 over the weight files, and it is stable across loads.
    weights = directory / "model.safetensors"
    digest = hashlib.sha256()
    digest.update(b"model.safetensors")
    digest.update(hashlib.sha256(weights.read_bytes()).hexdigest().encode())
    assert lm.weights_sha256 == digest.hexdigest()
    assert load_model(str(directory)).weights_sha256 == lm.weights_sha256


def test_dtype_override_and_bad_values(saved_tiny) -> None:
    _, directory = saved_tiny
    assert load_model(str(directory), dtype="float64").model.dtype == torch.float64
    with pytest.raises(ConfigError, match="unknown dtype"):
        load_model(str(directory), dtype="fp8")
    with (
        pytest.raises(ConfigError, match="no CUDA GPU")
        if not torch.cuda.is_available()
        else pytest.raises(Exception)
    ):
        load_model(str(directory), device="cuda")


def test_unknown_names_and_paths_are_one_line_errors(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="smollm2-135m") as info:
        load_model("not-a-model")
    assert "\n" not in str(info.value)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(empty))


def test_hub_unreachable_is_one_line() -> None:
    # conftest.py puts the hub in offline mode: an id that is not cached cannot load.
    with pytest.raises(ModelLoadError, match="local directory") as info:
        load_model("nobody-here/no-such-model-xyz")
    assert "\n" not in str(info.value)


def test_unsupported_architecture(tmp_path) -> None:
    from transformers import AutoModelForCausalLM, BloomConfig

    model = AutoModelForCausalLM.from_config(
        BloomConfig(hidden_size=32, n_layer=1, n_head=4, vocab_size=97)
    )
    model.save_pretrained(tmp_path / "bloom")
    word_tokenizer().save_pretrained(tmp_path / "bloom")
    with pytest.raises(UnsupportedArchitectureError, match="supported families"):
        load_model(str(tmp_path / "bloom"))


def test_gemma_parts_reassemble_and_check_sha(tmp_path) -> None:
    parts = []
    for i, chunk in enumerate([b"abc" * 1000, b"defg" * 777, b"", b"xyz"]):
        p = tmp_path / f"model.gguf.part0{i}"
        p.write_bytes(chunk)
        parts.append(p)
    whole = b"".join(p.read_bytes() for p in parts)
    target = tmp_path / "out" / "model.gguf"
    embedded.assemble_parts(parts, hashlib.sha256(whole).hexdigest(), target)
    assert target.read_bytes() == whole
    bad_target = tmp_path / "bad" / "model.gguf"
    with pytest.raises(ModelLoadError, match="corrupt"):
        embedded.assemble_parts(parts, "0" * 64, bad_target)
    assert list(bad_target.parent.iterdir()) == []  # nothing half-written left behind


def test_unfetched_gemma_says_how_to_fetch(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="rloop models fetch gemma-3-270m"):
        load_model("gemma-3-270m")


def test_registry_is_data() -> None:
    names = [e.name for e in REGISTRY]
    assert len(names) == len(set(names))
    assert {"smollm2-135m", "gemma-3-270m", "pythia-2.8b"} <= set(names)


@pytest.mark.slow
def test_embedded_cache_reproduces_gguf_logits() -> None:
    lm = load_model("smollm2-135m")
    assert lm.adapter.family == "llama" and lm.adapter.n_layers == 30
    assert (lm.adapter.n_heads, lm.adapter.n_kv_heads, lm.adapter.d_head) == (9, 3, 64)
    assert lm.source == "registry" and len(lm.weights_sha256) == 64
    gguf_model, gguf_tok = embedded.load_gguf(embedded.smollm2_gguf(), torch.float32)
    text = ["Notice the noticing that is happening as this sentence is read."]
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == gguf_tok(text, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(
            lm.model(ids).logits, gguf_model(ids).logits, atol=1e-4, rtol=1e-4
        )
