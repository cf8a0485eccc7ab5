"""Benchmark: exact batched head-ablation sweep vs one plain forward per head.

CPU (embedded SmolLM2-135M, 10 L5 prompts, all 270 heads, R_V impact):
    python bench/bench_head_sweep.py --model smollm2-135m --prompts 10

GPU (random weights of Pythia-2.8B's shape, bf16, layers 15-30, 20 prompts x 32 tokens, R_V at 28):
    python bench/bench_head_sweep.py --shape pythia-2.8b --device cuda --dtype bfloat16 \
        --layers 15-30 --measure-layers 5,28 --prompts 20 --tokens 32 --loop-heads 64

Two straightforward baselines run in the same process on the same inputs, and the sweep's
R_V is checked against them for every head they computed:

- ``loop_batched``: one plain forward per head, the prompts batched together;
- ``loop_per_prompt``: one plain forward per head per prompt (how the seed notebooks did it).

``--loop-heads N`` times each loop on N heads spread over the swept layers and extrapolates
to all heads (stated in the output); ``--skip-loops`` leaves the loops out.

``--compile`` also runs the compiled sweep (``head_sweep(..., compile=True)``) in the same
process, over ``--settings N`` measurement-layer settings (late layer L, L-1, ..., L-N+1; the
eager sweep is timed on the same settings). The first compiled call pays the compilation:
``compile_s`` is that call minus the same call warm. The amortised totals are
``eager_settings_s`` (N eager sweeps) against ``compiled_settings_s`` (compile_s + N warm
compiled sweeps), and ``compiled_max_rel_diff_r_v`` compares compiled and eager R_V of every
head. GPU (the issue-14 check):
    python bench/bench_head_sweep.py --shape pythia-2.8b --device cuda --dtype bfloat16 \
        --layers 15-30 --measure-layers 5,28 --prompts 20 --tokens 32 --loop-heads 32 \
        --compile --settings 3
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from rloop.adapters import adapter_for
from rloop.capture.batching import EncodedBatch, encode
from rloop.interventions import head_sweep as head_sweep_module
from rloop.interventions.head_sweep import head_sweep, single_head_reference
from rloop.metrics import r_v

SHAPES = {
    # name: (layers, heads, d_model, intermediate, vocab)
    "pythia-2.8b": (32, 32, 2560, 10240, 50304),
    "pythia-410m": (24, 16, 1024, 4096, 50304),
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def random_model(shape: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    n_layers, n_heads, d_model, inter, vocab = SHAPES[shape]
    config = GPTNeoXConfig(
        hidden_size=d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        intermediate_size=inter,
        vocab_size=vocab,
        rotary_pct=0.25,
        max_position_embeddings=2048,
    )
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval().requires_grad_(False)


def sweep_flops(adapter, layers, late: int, n_rows_per_layer: int, tokens: int) -> float:
    """Matmul FLOPs the sweep strictly needs: blocks l..late-1 plus V at late, per variant row."""
    d, inter = adapter.d_model, None
    del inter
    per_token_block = 2 * 12 * d * d  # attention (4 d^2) + MLP (8 d^2), 2 FLOPs per MAC
    blocks = sum(late - layer for layer in layers if layer < late)
    return float(blocks * per_token_block * n_rows_per_layer * tokens)


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| over finite entries (R_V arrays of the same shape)."""
    finite = torch.isfinite(a) & torch.isfinite(b)
    return float((a - b)[finite].abs().max() / b[finite].abs().max())


def _r_v_table(result) -> torch.Tensor:
    """(layers, heads, prompts) R_V of a SweepResult (per-head PR)."""
    return result.pr_late["per-head"] / result.pr_early["per-head"]


def compare_compiled(model, adapter, batch, layers, early, late, args, flops, eager_result):
    """Eager vs compiled sweep on ``args.settings`` late layers; compile time separately."""
    from torch._dynamo.utils import counters

    settings = [late - k for k in range(args.settings) if late - k > early]

    def timed(late_layer: int, compiled: bool):
        _sync(args.device)
        t0 = time.perf_counter()
        res = head_sweep(
            model,
            adapter,
            batch,
            layers,
            early,
            late_layer,
            args.window,
            max_rows=args.max_rows,
            compile=compiled,
        )
        _sync(args.device)
        return time.perf_counter() - t0, res

    eager = [timed(lt, False) for lt in settings]
    graphs_before = counters["stats"]["unique_graphs"]
    cold_s, _ = timed(settings[0], True)
    graphs = counters["stats"]["unique_graphs"] - graphs_before
    compiled = [timed(lt, True) for lt in settings]
    graphs_after_warm = counters["stats"]["unique_graphs"] - graphs_before
    warm_first = compiled[0][0]
    diffs = [
        _rel_diff(_r_v_table(c[1]), _r_v_table(e[1])) for c, e in zip(compiled, eager, strict=True)
    ]
    diffs.append(_rel_diff(_r_v_table(compiled[0][1]), _r_v_table(eager_result)))
    compile_s = max(0.0, cold_s - warm_first)
    return {
        "compile_settings_late_layers": settings,
        "eager_sweep_s_per_setting": [round(e[0], 4) for e in eager],
        "compiled_sweep_s_per_setting": [round(c[0], 4) for c in compiled],
        "compiled_first_call_s": cold_s,
        "compile_s": compile_s,
        "compiled_graphs_first_call": graphs,
        "compiled_graphs_total": graphs_after_warm,
        "eager_settings_s": sum(e[0] for e in eager),
        "compiled_settings_s": compile_s + sum(c[0] for c in compiled),
        "compiled_speedup_warm": eager[0][0] / warm_first,
        "compiled_speedup_amortised": sum(e[0] for e in eager)
        / (compile_s + sum(c[0] for c in compiled)),
        "compiled_achieved_tflops": flops / warm_first / 1e12,
        "compiled_max_rel_diff_r_v": max(diffs),
        "compile_mode": args.compile_mode or "default",
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="registry name / path (real weights)")
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES), help="random weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=32, help="tokens per prompt (random model)")
    parser.add_argument("--layers", default=None, help="A-B layers to sweep (default all)")
    parser.add_argument("--measure-layers", default=None, help="E,L (default depth fractions)")
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--max-rows", type=int, default=None, help="cap on stacked rows")
    parser.add_argument("--loop-heads", type=int, default=None, help="time the loop on N heads")
    parser.add_argument("--skip-loops", action="store_true", help="no loop baselines")
    parser.add_argument("--compile", action="store_true", help="also time the compiled sweep")
    parser.add_argument("--settings", type=int, default=3, help="measurement-layer settings")
    parser.add_argument(
        "--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune"
    )
    parser.add_argument("--json", default=None, help="write the numbers to this file")
    return parser.parse_args()


def load_inputs(args: argparse.Namespace):
    """(model, adapter, batch, name): random weights of ``--shape`` with random tokens, or a
    loaded model with L5 prompts of the bank."""
    if args.shape:
        model = random_model(args.shape, args.device, getattr(torch, args.dtype))
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 50000, (args.prompts, args.tokens), generator=gen)
        batch = EncodedBatch(
            ids.to(args.device), torch.ones_like(ids).to(args.device), [args.tokens] * args.prompts
        )
        return model, adapter_for(model), batch, f"random {args.shape}"
    from rloop.models import load_model
    from rloop.prompts import load_bank

    lm = load_model(args.model or "smollm2-135m", device=args.device, dtype=args.dtype)
    texts = [p.text for p in load_bank().select(["L5"])][: args.prompts]
    return lm.model, lm.adapter, encode(lm.tokenizer, texts, lm.device), lm.name


def time_loops(model, adapter, batch, layers, early, late, args, result):
    """Seconds of the two loop baselines (extrapolated to all heads), the heads they ran on
    and the largest relative R_V difference between them and the sweep's ``result``."""
    all_heads = [(layer, h) for layer in layers for h in range(adapter.n_heads)]
    loop_heads = [] if args.skip_loops else all_heads
    if args.loop_heads is not None and args.loop_heads < len(all_heads) and loop_heads:
        step = len(all_heads) / args.loop_heads
        loop_heads = [all_heads[int(i * step)] for i in range(args.loop_heads)]

    def run_loop(batches: list[tuple[EncodedBatch, slice]]) -> tuple[float, float]:
        worst = 0.0
        _sync(args.device)
        t0 = time.perf_counter()
        for layer, head in loop_heads:
            i = layers.index(layer)
            for sub, rows in batches:
                ref_e, ref_l = single_head_reference(
                    model, adapter, sub, layer, head, early, late, args.window
                )
                ref_rv = r_v(ref_l.cpu().numpy(), ref_e.cpu().numpy())
                got = r_v(
                    result.pr_late["per-head"][i, head, rows].cpu().numpy(),
                    result.pr_early["per-head"][i, head, rows].cpu().numpy(),
                )
                worst = max(worst, float(abs(got - ref_rv).max() / abs(ref_rv).max()))
        _sync(args.device)
        seconds = (time.perf_counter() - t0) * len(all_heads) / max(1, len(loop_heads))
        return seconds, worst

    if not loop_heads:
        return 0.0, 0.0, [], 0.0
    batched_s, worst_batched = run_loop([(batch, slice(None))])
    singles = [
        (
            EncodedBatch(
                batch.input_ids[p : p + 1, : batch.n_tokens[p]],
                batch.attention_mask[p : p + 1, : batch.n_tokens[p]],
                [batch.n_tokens[p]],
            ),
            slice(p, p + 1),
        )
        for p in range(batch.input_ids.shape[0])
    ]
    per_prompt_s, worst_single = run_loop(singles)
    return batched_s, per_prompt_s, loop_heads, max(worst_batched, worst_single)


def main() -> None:
    args = parse_args()
    model, adapter, batch, name = load_inputs(args)
    from rloop.interventions.engine import resolve_layers

    measure = [int(x) for x in args.measure_layers.split(",")] if args.measure_layers else None
    early, late, _ = resolve_layers(adapter, measure)
    if args.layers:
        lo, hi = (int(x) for x in args.layers.split("-"))
        layers = list(range(lo, hi + 1))
    else:
        layers = list(range(adapter.n_layers))
    n_heads = adapter.n_heads

    # Warm-up (allocator, kernels), then the sweep.
    head_sweep(model, adapter, batch, layers[-1:], early, late, args.window, max_rows=args.max_rows)
    _sync(args.device)
    t0 = time.perf_counter()
    result = head_sweep(
        model, adapter, batch, layers, early, late, args.window, max_rows=args.max_rows
    )
    _sync(args.device)
    sweep_s = time.perf_counter() - t0
    loop_batched_s, loop_per_prompt_s, loop_heads, worst = time_loops(
        model, adapter, batch, layers, early, late, args, result
    )

    tokens = int(batch.attention_mask.sum())
    flops = sweep_flops(
        adapter,
        layers,
        late,
        n_heads * batch.input_ids.shape[0],
        tokens // batch.input_ids.shape[0],
    )
    out = {
        "model": name,
        "device": args.device,
        "dtype": args.dtype,
        "prompts": batch.input_ids.shape[0],
        "tokens_per_prompt": tokens / batch.input_ids.shape[0],
        "layers_swept": f"{layers[0]}-{layers[-1]}",
        "measure_layers": [early, late],
        "heads": len(layers) * n_heads,
        "sweep_s": sweep_s,
        "loop_batched_s": loop_batched_s,
        "loop_per_prompt_s": loop_per_prompt_s,
        "loop_extrapolated_from_heads": len(loop_heads),
        "speedup_vs_loop_batched": loop_batched_s / sweep_s,
        "speedup_vs_loop_per_prompt": loop_per_prompt_s / sweep_s,
        "max_rel_diff_r_v": worst,
        "sweep_flops": flops,
        "achieved_tflops": flops / sweep_s / 1e12,
    }
    if args.compile:
        print(json.dumps(out, indent=2))  # the eager numbers, in case compiling runs out of time
        if args.compile_mode:
            head_sweep_module.COMPILE_OPTIONS = {"mode": args.compile_mode}
        out.update(
            compare_compiled(model, adapter, batch, layers, early, late, args, flops, result)
        )
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
