"""Tiny random-weight models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

VOCAB = 97


def tiny_config(family: str):
    """A 3-layer config of ``family`` with d_model 64 and 4 query heads (2 KV heads for GQA)."""
    common = {"vocab_size": VOCAB}
    if family == "llama":
        return LlamaConfig(
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=96,
            max_position_embeddings=128,
            **common,
        )
    if family == "mistral":
        return MistralConfig(
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=96,
            max_position_embeddings=128,
            sliding_window=None,
            **common,
        )
    if family == "qwen2":
        return Qwen2Config(
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=96,
            max_position_embeddings=128,
            **common,
        )
    if family == "gemma3":
        return Gemma3TextConfig(
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=96,
            max_position_embeddings=128,
            sliding_window=8,
            **common,
        )
    if family == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=96,
            max_position_embeddings=128,
            rotary_pct=0.25,
            **common,
        )
    if family == "gpt2":
        return GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=128, **common)
    if family == "gptj":
        return GPTJConfig(n_embd=64, n_layer=3, n_head=4, rotary_dim=8, n_positions=128, **common)
    raise ValueError(family)


FAMILIES = ("llama", "mistral", "qwen2", "gemma3", "gpt_neox", "gpt2", "gptj")


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, attn: str = "eager"):
    torch.manual_seed(seed)
    config = tiny_config(family)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    # Larger-than-default weights so attention patterns are far from uniform.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name and "wte" not in name:
                param.normal_(0.0, 0.15)
    return model.to(dtype).eval()


class WordTokenizer:
    """Maps each whitespace-separated integer to that token id (no special tokens)."""

    pad_token_id = 0

    def __call__(self, texts, **kwargs):
        if isinstance(texts, str):
            return {"input_ids": [int(w) % VOCAB for w in texts.split()]}
        return {"input_ids": [[int(w) % VOCAB for w in t.split()] for t in texts]}


@dataclass
class TinyLM:
    """Duck-typed stand-in for rloop.models.LoadedModel around a tiny model."""

    model: torch.nn.Module
    tokenizer: WordTokenizer
    adapter: object
    name: str = "tiny"
    source: str = "test"
    path: str = "-"
    revision: str | None = None
    weights_sha256: str = "0" * 64
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32


def tiny_lm(family: str = "llama") -> TinyLM:
    from rloop.adapters import adapter_for

    model = tiny_model(family)
    return TinyLM(model, WordTokenizer(), adapter_for(model))
