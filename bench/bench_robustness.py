"""Benchmark: one robustness run (the whole default multiverse) against one contraction run.

    python bench/bench_robustness.py --model smollm2-135m --repeats 2

Both pipelines run end to end (forwards, PR, statistics, tables, plots, summary) into
temporary run directories of a temporary run store, on the model loaded once, alternating
contraction and robustness so that both see the same machine load; the best of ``--repeats``
of each is reported. The budget (issue 10 §4) is robustness <= 3 x contraction.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--repeats", type=int, default=2, help="best of N timings")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    args = parser.parse_args()
    os.environ["RLOOP_PROGRESS"] = "0"
    store = Path(tempfile.mkdtemp(prefix="rloop-bench-robustness-"))
    os.environ["RLOOP_RUNS"] = str(store / "store")

    from rloop.experiments.contraction import ContractionConfig, run_contraction
    from rloop.experiments.robustness import RobustnessConfig, run_robustness
    from rloop.models import load_model

    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    contraction_config = ContractionConfig(model=lm.name, device=args.device, dtype=args.dtype)
    robustness_config = RobustnessConfig(model=lm.name, device=args.device, dtype=args.dtype)
    timings: dict[str, list[float]] = {"contraction": [], "robustness": []}
    headline: dict = {}
    for _ in range(args.repeats):
        started = time.perf_counter()
        run_contraction(contraction_config, out=store / "contraction", force=True, lm=lm)
        timings["contraction"].append(time.perf_counter() - started)
        started = time.perf_counter()
        _, _, headline = run_robustness(
            robustness_config, out=store / "robustness", force=True, lm=lm
        )
        timings["robustness"].append(time.perf_counter() - started)
    manifest = json.loads((store / "robustness" / "manifest.json").read_text())
    contraction_s = min(timings["contraction"])
    robustness_s = min(timings["robustness"])
    result = {
        "model": lm.name,
        "device": str(lm.device),
        "contraction_s": contraction_s,
        "robustness_s": robustness_s,
        "ratio": robustness_s / contraction_s,
        "budget_ratio": 3.0,
        "all_timings": timings,
        "robustness_measure_s": manifest["timings"].get("measure_s"),
        "robustness_stats_s": manifest["timings"].get("stats_s"),
        "n_specs": headline.get("n_specs"),
        "n_estimable": headline.get("n_estimable"),
        "median_effect": headline.get("median_effect"),
        "p_median": headline.get("p_median"),
        "share_significant_negative": headline.get("share_significant_negative"),
        "share_significant_positive": headline.get("share_significant_positive"),
        "p_share_significant": headline.get("p_share_significant"),
        "run_store": str(store),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
