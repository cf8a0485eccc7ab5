"""Benchmark: the phase-4 alpha grid in one batched call vs one call per condition.

CPU smoke run (tiny random Mistral shape):
    python bench/bench_kv_mixing.py --model-shape tiny --device cpu

GPU (random weights of Mistral-7B's shape, bf16, 10 pairs x 5 alphas x 64 tokens, KV mixed
on layers 16-31):
    python bench/bench_kv_mixing.py --model-shape mistral-7b --device cuda --dtype bfloat16

Both paths run :func:`rloop.interventions.kv_cache.patched_generate` on the same rows in one process; the
batched call's greedy tokens are checked against the loop's (printed as ``tokens_equal``; bf16
batching can flip near-tied argmaxes, so the fraction of equal tokens is printed too).

``--static-decode MODE`` (prototype, issue 14) also times the batched grid with a decoding loop
that copies the mixed cache into a transformers ``StaticCache`` and runs each step through
``torch.compile`` of the model's forward (MODE ``compile``: default mode; ``reduce-overhead``:
CUDA graphs as well), the capture hooks included (dynamo then guards on hooks:
``skip_nnmodule_hook_guards=False``). ``--skip-loop`` leaves the per-condition loop out. Its
tokens and captured V are compared with the batched eager call's. This loop lives here only to
measure whether moving it into ``rloop.capture.generation.decode`` pays; see
:func:`static_decode`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from unittest import mock

import torch

from rloop.adapters import adapter_for
from rloop.capture.generation import GenerationResult, SamplingConfig, cache_kwarg
from rloop.capture.trace import Trace, parse_address
from rloop.interventions import kv_cache
from rloop.interventions.kv_cache import (
    DEFAULT_ALPHAS,
    PatchRow,
    cache_layer,
    default_patch_layers,
    n_cache_layers,
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


def static_decode(forward):
    """A ``decode`` (rloop.capture.generation) for greedy sampling over a StaticCache, each
    step through ``forward`` (e.g. a compiled ``model.forward``).

    The dynamic cache of the (mixed) memories is copied into a StaticCache of length
    M + 1 + N; the (B, M + 1 + N) attention mask is allocated once and its column M + step set
    to 1 before step ``step``; captured values are cloned at every step (CUDA-graph outputs are
    overwritten by the next replay).
    """
    from transformers import StaticCache

    def decode(model, adapter, cache, layout, sampling, capture=(), memory_captured=None, tok=None):
        if not sampling.greedy:
            raise ValueError("the static-decode prototype is greedy only")
        capture = [str(parse_address(a)) for a in capture]
        n_new, width = int(sampling.max_new_tokens), layout.memory_ids.shape[1]
        static = StaticCache(config=model.config, max_cache_len=width + 1 + n_new)
        columns = torch.arange(width, device=layout.memory_ids.device)  # (M,)
        for layer in range(n_cache_layers(cache)):
            keys, values = cache_layer(cache, layer)  # (B, Hkv, M, D)
            static.update(keys, values, layer, {"cache_position": columns})
        batch = layout.memory_mask.shape[0]
        mask = torch.cat(
            [layout.memory_mask, layout.memory_mask.new_zeros((batch, 1 + n_new))], dim=1
        )  # (B, M + 1 + N)
        with_position = "cache_position" in inspect.signature(model.forward).parameters
        inputs, positions = layout.last_ids, layout.last_positions  # (B, 1)
        steps = {a: [] for a in capture}
        chosen = []
        with torch.no_grad(), Trace(model, adapter, capture=capture) as trace:
            # The hooks store into trace.values and dynamo guards on that dict being empty:
            # without placeholders step 0 and step 1 would compile two graphs.
            trace.values.update({a: torch.empty(0) for a in capture})
            for step in range(n_new + (1 if capture else 0)):
                mask[:, width + step] = 1
                extra = {"cache_position": columns[-1:] + 1 + step} if with_position else {}
                out = forward(
                    input_ids=inputs,
                    attention_mask=mask,
                    position_ids=positions,
                    use_cache=True,
                    **{cache_kwarg(model): static},
                    **extra,
                )
                for a in capture:
                    steps[a].append(trace[a].clone())  # (B, 1, ...)
                if step == n_new:
                    break
                inputs = out.logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
                chosen.append(inputs)
                positions = positions + 1
        new_tokens = torch.cat(chosen, dim=1)  # (B, N)
        full_mask = mask.clone()
        full_mask[:, width:] = 1
        captured = {
            a: torch.cat([memory_captured[a], *steps[a]], dim=1) for a in capture
        }  # (B, M + 1 + N, ...)
        return GenerationResult(
            new_tokens, full_mask, captured, width + 1, list(layout.n_tokens), sampling
        )

    return decode


def time_static_decode(model, adapter, rows, sampling, capture, mode, device, reference):
    """Cold and warm seconds of the grid with :func:`static_decode`, and its agreement with
    the eager batched ``reference`` (GenerationResult)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    options = {} if mode == "compile" else {"mode": mode}
    forward = torch.compile(model.forward, **options)
    times = []
    with (
        torch._dynamo.config.patch(skip_nnmodule_hook_guards=False),
        mock.patch.object(kv_cache, "decode", static_decode(forward)),
    ):
        for _ in range(3):
            _sync(device)
            started = time.perf_counter()
            result = patched_generate(model, adapter, rows, sampling, capture)
            _sync(device)
            times.append(time.perf_counter() - started)
    equal = (result.new_tokens == reference.new_tokens).float().mean().item()
    diffs = {}
    for a in capture:
        got, ref = result.values(a).float(), reference.values(a).float()
        diffs[a] = float((got - ref).abs().max() / ref.abs().max())
    return {
        "static_decode_mode": mode,
        "static_first_call_s": round(times[0], 3),
        "static_batched_s": round(min(times[1:]), 3),
        "static_graphs": counters["stats"]["unique_graphs"] - graphs_before,
        "static_fraction_tokens_equal": round(equal, 4),
        "static_max_rel_diff_captured_v": diffs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=48, help="Mean prompt length.")
    parser.add_argument("--skip-loop", action="store_true", help="no per-condition loop")
    parser.add_argument(
        "--static-decode",
        choices=["off", "compile", "reduce-overhead"],
        default="off",
        help="also time the StaticCache + torch.compile decoding prototype",
    )
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

    if args.skip_loop:
        loop_s, equal = float("nan"), float("nan")
    else:
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
    if args.static_decode != "off":
        print(json.dumps(report, indent=2))  # the eager numbers, in case compiling runs long
        report.update(
            time_static_decode(
                model, adapter, rows, sampling, capture, args.static_decode, args.device, batched
            )
        )
    if args.device.startswith("cuda"):
        report["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
