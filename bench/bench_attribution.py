"""Benchmark: attribution patching of every head (one forward + one backward, stopped at the
late layer) vs the exact batched sweep, with the rank correlation of their impacts.

    python bench/bench_attribution.py --model smollm2-135m --prompts 10
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from scipy import stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-exact", action="store_true")
    args = parser.parse_args()

    from rloop.capture.batching import encode
    from rloop.interventions.engine import resolve_layers
    from rloop.interventions.gradients import head_gradients
    from rloop.interventions.head_sweep import head_sweep
    from rloop.metrics import r_v
    from rloop.models import load_model
    from rloop.prompts import load_bank

    lm = load_model(args.model)
    texts = [p.text for p in load_bank().select(["L5"])][: args.prompts]
    batch = encode(lm.tokenizer, texts, lm.device)
    early, late, _ = resolve_layers(lm.adapter, None)
    layers = list(range(lm.adapter.n_layers))
    head_gradients(lm.model, lm.adapter, batch, layers, early, late, args.window)  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        grads = head_gradients(lm.model, lm.adapter, batch, layers, early, late, args.window)
        times.append(time.perf_counter() - t0)
    out = {
        "model": lm.name,
        "prompts": len(texts),
        "heads": len(layers) * lm.adapter.n_heads,
        "attribution_s": min(times),
    }
    if not args.skip_exact:
        t0 = time.perf_counter()
        exact = head_sweep(lm.model, lm.adapter, batch, layers, early, late, args.window)
        out["exact_sweep_s"] = time.perf_counter() - t0
        base = r_v(exact.clean_late["per-head"].numpy(), exact.clean_early["per-head"].numpy())
        impact = r_v(exact.pr_late["per-head"].numpy(), exact.pr_early["per-head"].numpy()) - base
        below = np.array([layer < late for layer in layers])
        estimate = grads.attribution.numpy().mean(axis=-1)[below].ravel()
        truth = impact.mean(axis=-1)[below].ravel()
        rho, p = stats.spearmanr(estimate, truth)
        out.update(
            {
                "spearman_r": float(rho),
                "spearman_p": float(p),
                "pearson_r": float(np.corrcoef(estimate, truth)[0, 1]),
                "heads_compared": int(below.sum() * lm.adapter.n_heads),
            }
        )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
