"""Benchmark: prompts/second of the contraction measurement, batch size 1 vs batched.

    python bench/bench_contraction.py --model smollm2-135m --batch-sizes 1,8,16,32

Runs the measurement (one forward per batch capturing V at every layer, stopped after the
last layer: no LM head) over the whole shipped bank, in the same process for every batch
size, after one warm-up pass, and checks that every batch size gives the same R_V as batch
size 1 (max relative difference printed).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-sizes", default="1,8,16,32")
    parser.add_argument("--repeats", type=int, default=2, help="best of N timings")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ["RLOOP_PROGRESS"] = "0"

    from rloop.experiments.contraction import ContractionConfig, measure_contraction
    from rloop.models import load_model
    from rloop.prompts import load_bank

    lm = load_model(args.model, device=args.device)
    bank = load_bank()
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    measure_contraction(lm, bank, ContractionConfig(batch_size=sizes[-1], n_boot=100))  # warm-up
    rows, reference = [], None
    for size in sizes:
        config = ContractionConfig(batch_size=size, n_boot=100)
        best = float("inf")
        for _ in range(args.repeats):
            result = measure_contraction(lm, bank, config)
            best = min(best, result.timings["measure_s"])
        r_v = result.results.sort_values(["pr_mode", "prompt_id"])["r_v"].to_numpy()
        if reference is None:
            reference = r_v
        rows.append(
            {
                "batch_size": size,
                "prompts": len(bank),
                "seconds": best,
                "prompts_per_s": len(bank) / best,
                "max_rel_diff_vs_batch1": float(
                    np.max(np.abs(r_v - reference) / np.abs(reference))
                ),
            }
        )
        print(json.dumps(rows[-1]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": lm.name, "device": str(lm.device), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
