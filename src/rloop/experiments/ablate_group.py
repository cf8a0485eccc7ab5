"""Group ablation: remove several heads together, compared with random heads (seed 001).

The seed's next step after the single-head sweep: "kill the top expanders together". The
heads come from a user list (``--heads 15.4,16.2``) or from the ``heads`` table of a
finished ``rloop ablate`` run (top k by |mean impact|, or the most negative / positive).

Per prompt: R_V clean and with the group ablated. Summary: mean change with a bootstrap CI
over prompts, and a random-heads control: ``n_random`` draws (seeded) of as many heads as the
group has, from the same layers (the same number per layer, drawn among the heads not in the
group), ablated the same way. The group's mean change is placed in the distribution of the
random draws' mean changes (empirical two-sided p with the +1 correction).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from rloop.errors import ConfigError
from rloop.experiments.ablate import read_sweep, top_heads_of_sweep
from rloop.experiments.runner import encode_prompts, execute, record_inputs
from rloop.experiments.settings import RVSettings, load_reference, prepare, reference_means
from rloop.interventions.edits import HeadList, check_ablation_mode, check_head_list, parse_heads
from rloop.interventions.engine import head_set_r_v, measure_r_v
from rloop.metrics.stats import paired_change
from rloop.runs.markdown import markdown_table, summary_head
from rloop.runs.plots import _save, plt

EXPERIMENT = "ablate-group"


@dataclass
class GroupAblationConfig(RVSettings):
    heads: str | None = None  # "15.4,16.2" (layer.head)
    from_sweep: str | None = None  # run directory of a finished `rloop ablate`
    top_k: int = 10
    select: str = "abs"  # abs | negative | positive (with from_sweep)
    mode: str = "zero"
    reference_group: str = "factual"
    unit: str = "query"
    n_random: int = 20
    max_rows: int = 256


def resolve_group(config: GroupAblationConfig, adapter) -> tuple[HeadList, str]:
    """The heads to ablate and a sentence saying where they came from."""
    if (config.heads is None) == (config.from_sweep is None):
        raise ConfigError("give exactly one of --heads LAYER.HEAD,... or --from-sweep RUN_DIR")
    if config.heads is not None:
        heads = check_head_list(adapter, parse_heads(config.heads), config.unit)
        return heads, f"user list {config.heads}"
    _, table, manifest = read_sweep(config.from_sweep)
    sweep_cfg = manifest.get("config", {})
    sweep_model = manifest.get("model", {}).get("name")
    if sweep_cfg.get("unit", "query") != config.unit:
        raise ConfigError(
            f"the sweep ablated {sweep_cfg.get('unit')} heads but --unit is {config.unit}: "
            "use the same unit"
        )
    heads = check_head_list(
        adapter, top_heads_of_sweep(table, config.top_k, config.select), config.unit
    )
    return heads, (
        f"top {config.top_k} heads ({config.select}) of sweep {config.from_sweep} "
        f"(model {sweep_model})"
    )


def random_head_sets(heads: HeadList, n_units: int, n_draws: int, seed: int) -> list[HeadList]:
    """``n_draws`` random groups with as many heads per layer as ``heads`` has, drawn (without
    replacement) among that layer's heads that are not in the group; all heads of the layer
    when the group leaves too few."""
    rng = np.random.default_rng(seed)
    per_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        per_layer.setdefault(layer, []).append(head)
    draws = []
    for _ in range(n_draws):
        drawn: HeadList = []
        for layer in sorted(per_layer):
            chosen = per_layer[layer]
            pool = [h for h in range(n_units) if h not in chosen]
            if len(pool) < len(chosen):
                pool = list(range(n_units))
            picks = rng.choice(pool, size=len(chosen), replace=False)
            drawn.extend((layer, int(h)) for h in sorted(picks))
        draws.append(drawn)
    return draws


def run_group_ablation(config: GroupAblationConfig, out=None, force: bool = False, lm=None):
    """``rloop ablate-group``: returns (run_dir, already_complete, headline)."""

    check_ablation_mode(config.mode, config.unit)
    if config.n_random < 0:
        raise ConfigError(f"--n-random must be >= 0, got {config.n_random}")
    prepared = prepare(config, ["L5"], lm)
    lm = prepared.lm
    heads, origin = resolve_group(config, lm.adapter)
    reference = (
        load_reference(config, config.reference_group, lm) if config.mode == "mean" else None
    )
    n_units = lm.adapter.n_heads if config.unit == "query" else lm.adapter.n_kv_heads
    early, late = prepared.early, prepared.late

    def body(run) -> dict:
        record_inputs(
            run,
            prepared,
            heads=[f"{layer}.{head}" for layer, head in heads],
            head_origin=origin,
            mean_reference=None
            if reference is None
            else {"group": config.reference_group, "n": len(reference)},
        )
        started = time.perf_counter()
        layers = sorted({layer for layer, _ in heads})
        mean_z = reference_means(lm, reference, layers, "z")
        batch = encode_prompts(lm, prepared.prompts)
        _, _, clean = measure_r_v(
            lm.model, lm.adapter, batch, early, late, config.window, config.pr_mode
        )  # (P,)
        controls = random_head_sets(heads, n_units, config.n_random, config.seed)
        rv = head_set_r_v(
            lm.model,
            lm.adapter,
            batch,
            [heads, *controls],
            early,
            late,
            config.window,
            config.pr_mode,
            config.unit,
            mean_z,
            config.max_rows,
        )  # (1 + n_random, P)
        seconds = time.perf_counter() - started
        prompts = list(prepared.prompts)
        results = pd.DataFrame(
            {
                "prompt_id": [p.id for p in prompts],
                "group": [p.group for p in prompts],
                "layer_early": early,
                "layer_late": late,
                "r_v_clean": clean,
                "r_v_ablated": rv[0],
                "change": rv[0] - clean,
            }
        )
        random_rows = []
        for d, drawn in enumerate(controls):
            for p, prompt in enumerate(prompts):
                random_rows.append(
                    {
                        "draw": d,
                        "heads": ",".join(f"{a}.{b}" for a, b in drawn),
                        "prompt_id": prompt.id,
                        "r_v_clean": clean[p],
                        "r_v_ablated": rv[1 + d, p],
                        "change": rv[1 + d, p] - clean[p],
                    }
                )
        random_table = pd.DataFrame(random_rows)
        summary = _summary_table(results, random_table, config)
        run.write_table("results", results)
        if not random_table.empty:
            run.write_table("random_controls", random_table)
        run.write_table("summary", summary)
        _plot(results, random_table, run.plot_path("group_vs_random"), config, len(heads))
        run.write_summary(_markdown(summary, heads, origin, config, prepared, seconds))
        run.update_manifest(timings={"ablation_s": seconds})
        row = summary.iloc[0]
        return {
            "n_heads": len(heads),
            "r_v_clean": float(row["r_v_clean"]),
            "r_v_ablated": float(row["r_v_ablated"]),
            "mean_change": float(row["mean_change"]),
            "random_mean_change": float(row["random_mean_change"]),
            "random_p": float(row["random_p"]),
        }

    outcome = execute(EXPERIMENT, config.to_dict(), lm.name, out, body, force=force)
    return outcome.run_dir, outcome.already_complete, outcome.headline


def _summary_table(results: pd.DataFrame, random_table: pd.DataFrame, config) -> pd.DataFrame:
    """One row: the group's paired change and where it lies among the random draws."""
    row = paired_change(
        results["r_v_clean"].to_numpy(),
        results["r_v_ablated"].to_numpy(),
        config.n_boot,
        config.seed,
    )
    if random_table.empty:
        draws = np.array([])
    else:
        draws = random_table.groupby("draw")["change"].mean().to_numpy()  # (n_random,)
    finite = draws[np.isfinite(draws)]
    if finite.size and np.isfinite(row["mean_change"]):
        extreme = int((np.abs(finite) >= abs(row["mean_change"])).sum())
        p = (extreme + 1) / (finite.size + 1)
        lo, hi = np.percentile(finite, [2.5, 97.5])
        mean, sd = float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else np.nan
    else:
        p = lo = hi = mean = sd = float("nan")
    row.update(
        {
            "mode": config.mode,
            "unit": config.unit,
            "pr_mode": config.pr_mode,
            "n_random": int(finite.size),
            "random_mean_change": mean,
            "random_sd_change": sd,
            "random_2.5pct": float(lo),
            "random_97.5pct": float(hi),
            "random_p": float(p),
        }
    )
    return pd.DataFrame([row])


def _plot(results, random_table, path, config, n_heads) -> None:

    fig, ax = plt.subplots(figsize=(7, 4))
    if not random_table.empty:
        draws = random_table.groupby("draw")["change"].mean()
        ax.hist(
            draws.dropna(),
            bins=max(5, len(draws) // 2),
            color="grey",
            alpha=0.7,
            label=f"random {n_heads}-head groups (n={len(draws)})",
        )
    ax.axvline(results["change"].mean(), color="C3", lw=2, label="the group")
    ax.axvline(0.0, color="black", lw=0.8, ls=":")
    ax.set_xlabel("mean R_V change (ablated - clean)")
    ax.set_ylabel("draws")
    ax.set_title(f"{config.mode}-ablating {n_heads} {config.unit} heads together")
    ax.legend(fontsize=8)
    _save(fig, path)


def _markdown(summary, heads, origin, config, prepared, seconds) -> str:
    row = summary.iloc[0]
    lines = [
        *summary_head("Group ablation", prepared.lm),
        f"- heads ({len(heads)}, {config.unit}, {config.mode} ablation at the input of the "
        f"attention output projection): {', '.join(f'L{a}H{b}' for a, b in heads)}",
        f"- heads from: {origin}",
        f"- R_V = PR(L{prepared.late}) / PR(L{prepared.early}) ({prepared.rule}), "
        f"{config.pr_mode} PR, window {config.window}; {row['n']} prompts",
        f"- mean R_V clean {row['r_v_clean']:.4f}, ablated {row['r_v_ablated']:.4f}; "
        f"change {row['mean_change']:+.4f} (95 % CI {row['ci_low']:+.4f}..{row['ci_high']:+.4f})",
        f"- random control: {row['n_random']} draws of the same number of heads per layer "
        f"(seed {config.seed}): mean change {row['random_mean_change']:+.4f}, 95 % of draws in "
        f"{row['random_2.5pct']:+.4f}..{row['random_97.5pct']:+.4f}; "
        f"p(|random| >= |group|) = {row['random_p']:.3g}",
        f"- time: {seconds:.1f} s",
        "",
        markdown_table(summary),
        "",
        "Files: `results.*` (per prompt), `random_controls.*` (per draw x prompt), `summary.*`, "
        "`plots/group_vs_random.png`.",
    ]
    return "\n".join(lines) + "\n"
