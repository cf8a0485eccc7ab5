"""Benchmark: the phase-4 alpha grid in one batched call vs one call per condition.

CPU smoke run (tiny random Mistral shape):
    python bench/bench_kv_mixing.py --model-shape tiny --device cpu

GPU (random weights of Mistral-7B's shape, bf16, 10 pairs x 5 alphas x 64 tokens, KV mixed
on layers 16-31):
    python bench/bench_kv_mixing.py --model-shape mistral-7b --device cuda --dtype bfloat16

Both paths run :func:`rloop.interventions.kv_cache.patched_generate` on the same rows in one process; the
batched call's greedy tokens are checked against the loop's (printed as ``tokens_equal``; bf16
batching can flip near-tied argmaxes, so the fraction of equal tokens is printed too).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from rloop.adapters import adapter_for
from rloop.capture.generation import SamplingConfig
from rloop.interventions.kv_cache import (
    DEFAULT_ALPHAS,
    PatchRow,
    default_patch_layers,
    patched_generate,
)

SHAPES = {
    # name: (layers, heads, kv heads, d_model, intermediate, vocab)
    "mistral-7b": (32, 32, 8, 4096, 14336, 32000),
    "tiny": (8, 4, 2, 128, 256, 1000),
}


def random_model(shape: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, MistralConfig

    n_layers, n_heads, n_kv, d_model, inter, vocab = SHAPES[shape]
    config = MistralConfig(
        hidden_size=d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        intermediate_size=inter,
        vocab_size=vocab,
        max_position_embeddings=4096,
        sliding_window=None,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval().requires_grad_(False)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=48, help="Mean prompt length.")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    model = random_model(args.model_shape, args.device, dtype)
    adapter = adapter_for(model)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    lengths = [
        args.prompt_tokens + int(d) for d in torch.randint(-8, 9, (2 * args.pairs,), generator=gen)
    ]
    prompts = [tuple(torch.randint(1, vocab, (n,), generator=gen).tolist()) for n in lengths]
    layers = default_patch_layers(adapter.n_layers)
    rows = [
        PatchRow(prompts[2 * i], prompts[2 * i + 1], layers, alpha)
        for i in range(args.pairs)
        for alpha in DEFAULT_ALPHAS
    ]
    sampling = SamplingConfig(max_new_tokens=args.tokens)
    capture = [f"blocks.{adapter.n_layers // 6}.v", f"blocks.{int(adapter.n_layers * 0.84)}.v"]

    # The first call on new shapes pays one-time costs (cuBLAS heuristics, attention kernel
    # plans for every KV length): recorded as cold_batched_s, then both paths are timed warm.
    _sync(args.device)
    started = time.perf_counter()
    patched_generate(model, adapter, rows, sampling, capture)
    _sync(args.device)
    cold_s = time.perf_counter() - started
    patched_generate(model, adapter, rows[:1], sampling, capture)  # warm-up of batch size 1
    _sync(args.device)
    started = time.perf_counter()
    batched = patched_generate(model, adapter, rows, sampling, capture)
    _sync(args.device)
    batched_s = time.perf_counter() - started

    started = time.perf_counter()
    looped = [patched_generate(model, adapter, [row], sampling, capture) for row in rows]
    _sync(args.device)
    loop_s = time.perf_counter() - started

    loop_tokens = torch.cat([r.new_tokens for r in looped])  # (50, N)
    equal = (loop_tokens == batched.new_tokens).float().mean().item()
    report = {
        "model_shape": args.model_shape,
        "device": args.device,
        "dtype": args.dtype,
        "conditions": len(rows),
        "new_tokens": args.tokens,
        "kv_layers": f"{layers[0]}-{layers[-1]}",
        "cold_batched_s": round(cold_s, 3),
        "batched_s": round(batched_s, 3),
        "loop_s": round(loop_s, 3),
        "speedup": round(loop_s / batched_s, 2),
        "tokens_equal": bool(equal == 1.0),
        "fraction_tokens_equal": round(equal, 4),
    }
    if args.device.startswith("cuda"):
        report["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
