"""Group ablation: remove several heads together, compared with random heads (seed 001).

The seed's next step after the single-head sweep: "kill the top expanders together". The
heads come from a user list (``--heads 15.4,16.2``) or from the ``heads`` table of a
finished ``rloop ablate`` run (top k by |mean impact|, or the most negative / positive).

Per prompt: R_V clean and with the group ablated. Summary: mean change with a bootstrap CI
over prompts, and a random-heads control: ``n_random`` draws (seeded) of as many heads as the
group has, from the same layers (the same number per layer, drawn among the heads not in the
group), ablated the same way. The group's mean change is placed in the distribution of the
random draws' mean changes (empirical two-sided p with the +1 correction).

The ablation is a choice (SCIENCE.md §9), so like ``rloop ablate`` it runs one or several
modes (``--mode zero,mean,resample``): zero; mean (z set to its mean over every token of the
reference group); resample (z set to its mean over the tokens of ONE reference prompt drawn
at random, R_V averaged over ``n_resample`` seeded draws: prompt-level resample ablation, the
draws of :func:`rloop.experiments.ablate.resample_draws`). The group and the random draws are
ablated the same way in each mode, and the summary has one row per mode. Each (mode, draw of
the reference) is a resume checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from rloop.errors import ConfigError
from rloop.experiments.ablate import (
    RESAMPLE,
    ablation_fills,
    read_sweep,
    resample_draws,
    sweep_modes,
    top_heads_of_sweep,
)
from rloop.experiments.ablate import validate_config as check_modes
from rloop.experiments.runner import encode_prompts, execute, record_inputs, run_identity, run_units
from rloop.experiments.settings import RVSettings, load_prompt_set, load_reference, prepare
from rloop.interventions.edits import HeadList, check_head_list, parse_heads
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
    mode: str = "zero"  # zero | mean | resample, or several comma-separated
    reference_group: str = "factual"  # mean / resample reference set (from the same source)
    n_resample: int = 3  # resample: reference prompts drawn (seeded), R_V averaged
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


def mode_description(mode: str, config: GroupAblationConfig) -> str:
    """What one ablation mode sets the heads' z to."""
    if mode == "zero":
        return "zero: the heads' z set to 0"
    if mode == "mean":
        return f"mean: z set to its mean over every token of {config.reference_group}"
    return (
        f"resample: z set to its mean over the tokens of one {config.reference_group} prompt, "
        f"R_V averaged over {config.n_resample} seeded draws"
    )


def _check_request(config: GroupAblationConfig) -> list[str]:
    """The modes, after the checks that need no model: modes, unit, n_random, and for
    resample that the reference group has ``n_resample`` prompts."""
    check_modes(config)  # type: ignore[arg-type]  # mode list, unit, n_resample, settings
    modes = sweep_modes(config.mode)
    if config.n_random < 0:
        raise ConfigError(f"--n-random must be >= 0, got {config.n_random}")
    if RESAMPLE in modes:
        reference = load_prompt_set(config.prompts, config.bank_version, [config.reference_group])
        resample_draws(len(reference), config.n_resample, config.seed)
    return modes


def run_group_ablation(config: GroupAblationConfig, out=None, force: bool = False, lm=None):
    """``rloop ablate-group``: returns (run_dir, already_complete, headline)."""

    modes = _check_request(config)
    prepared = prepare(config, ["L5"], lm)
    lm = prepared.lm
    heads, origin = resolve_group(config, lm.adapter)
    needs_reference = bool(set(modes) - {"zero"})
    reference = load_reference(config, config.reference_group, lm) if needs_reference else None
    n_units = lm.adapter.n_heads if config.unit == "query" else lm.adapter.n_kv_heads
    early, late = prepared.early, prepared.late

    def body(run) -> dict:
        record_inputs(
            run,
            prepared,
            heads=[f"{layer}.{head}" for layer, head in heads],
            head_origin=origin,
            modes=modes,
            mean_reference=_reference_manifest(reference, modes, config),
        )
        started = time.perf_counter()
        layers = sorted({layer for layer, _ in heads})
        fills = ablation_fills(lm, modes, reference, layers, config)
        batch = encode_prompts(lm, prepared.prompts)
        _, _, clean = measure_r_v(
            lm.model, lm.adapter, batch, early, late, config.window, config.pr_mode
        )  # (P,)
        controls = random_head_sets(heads, n_units, config.n_random, config.seed)
        n_prompts = len(prepared.prompts)

        def ablate_unit(unit: tuple[str, int]) -> pd.DataFrame:
            mode, fill = unit
            rv = head_set_r_v(
                lm.model, lm.adapter, batch, [heads, *controls], early, late, config.window,
                config.pr_mode, config.unit, fills[mode][fill], config.max_rows,
            )  # (1 + n_random, P)  # fmt: skip
            return pd.DataFrame(
                {
                    "mode": mode,
                    "fill": fill,
                    "variant": np.repeat(np.arange(rv.shape[0]), n_prompts),
                    "prompt": np.tile(np.arange(n_prompts), rv.shape[0]),
                    "r_v_ablated": rv.reshape(-1),
                }
            )

        units = [(mode, fill) for mode in modes for fill in range(len(fills[mode]))]
        measured = run_units(
            run, units, ablate_unit, key=lambda u: f"{u[0]}-fill-{u[1]:03d}",
            label="ablating head groups", weight=lambda u: 1 + len(controls),
        )  # fmt: skip
        seconds = time.perf_counter() - started
        rv = {mode: _averaged_r_v(measured, mode, 1 + len(controls), n_prompts) for mode in modes}
        results, random_table = _tables(rv, clean, controls, prepared, modes)
        summary = pd.concat(
            [_summary_table(results, random_table, config, mode) for mode in modes],
            ignore_index=True,
        )
        run.write_table("results", results)
        if not random_table.empty:
            run.write_table("random_controls", random_table)
        run.write_table("summary", summary)
        for mode in modes:
            name = "group_vs_random" if mode == modes[0] else f"group_vs_random_{mode}"
            _plot(results, random_table, run.plot_path(name), config, len(heads), mode)
        run.write_summary(_markdown(summary, heads, origin, config, prepared, seconds, modes))
        run.update_manifest(timings={"ablation_s": seconds})
        return _headline(summary, len(heads), modes)

    identity = run_identity(config, measure_layers=[early, late])
    return execute(EXPERIMENT, identity, lm.name, out, body, force=force).as_tuple()


def _reference_manifest(reference, modes: list[str], config: GroupAblationConfig) -> dict | None:
    """The reference prompts of mean / resample ablation as the manifest records them."""
    if reference is None:
        return None
    entry: dict = {"group": config.reference_group, "n": len(reference)}
    if RESAMPLE in modes:
        drawn = resample_draws(len(reference), config.n_resample, config.seed)
        entry["resample_prompts"] = [list(reference)[i].id for i in drawn]
    return entry


def _averaged_r_v(measured: pd.DataFrame, mode: str, n_variants: int, n_prompts: int):
    """Ablated R_V of one mode per (variant, prompt), averaged over the mode's draws of the
    reference (one for zero and mean) -> (n_variants, n_prompts)."""
    rows = measured[measured["mode"] == mode]
    fills = sorted(rows["fill"].unique())
    stacked = np.empty((len(fills), n_variants, n_prompts))
    for i, fill in enumerate(fills):
        part = rows[rows["fill"] == fill].sort_values(["variant", "prompt"])
        stacked[i] = part["r_v_ablated"].to_numpy(float).reshape(n_variants, n_prompts)
    return stacked.mean(axis=0)  # (n_variants, n_prompts)


def _tables(rv: dict, clean, controls, prepared, modes: list[str]):
    """Per mode: the group's rows per prompt (results) and the random draws' rows."""
    prompts = list(prepared.prompts)
    results, random_rows = [], []
    for mode in modes:
        ablated = rv[mode]  # (1 + n_random, P)
        results.append(
            pd.DataFrame(
                {
                    "prompt_id": [p.id for p in prompts],
                    "group": [p.group for p in prompts],
                    "mode": mode,
                    "layer_early": prepared.early,
                    "layer_late": prepared.late,
                    "r_v_clean": clean,
                    "r_v_ablated": ablated[0],
                    "change": ablated[0] - clean,
                }
            )
        )
        for d, drawn in enumerate(controls):
            for p, prompt in enumerate(prompts):
                random_rows.append(
                    {
                        "mode": mode,
                        "draw": d,
                        "heads": ",".join(f"{a}.{b}" for a, b in drawn),
                        "prompt_id": prompt.id,
                        "r_v_clean": clean[p],
                        "r_v_ablated": ablated[1 + d, p],
                        "change": ablated[1 + d, p] - clean[p],
                    }
                )
    return pd.concat(results, ignore_index=True), pd.DataFrame(random_rows)


def _headline(summary: pd.DataFrame, n_heads: int, modes: list[str]) -> dict:
    """The first mode's numbers (as a one-mode run) and the other modes' by suffix."""
    first = summary.iloc[0]
    headline = {
        "n_heads": n_heads,
        "r_v_clean": float(first["r_v_clean"]),
        "r_v_ablated": float(first["r_v_ablated"]),
        "mean_change": float(first["mean_change"]),
        "random_mean_change": float(first["random_mean_change"]),
        "random_p": float(first["random_p"]),
    }
    for row in summary.iloc[1:].itertuples():
        headline[f"mean_change_{row.mode}"] = float(row.mean_change)
        headline[f"random_p_{row.mode}"] = float(row.random_p)
    return headline


def _summary_table(
    results: pd.DataFrame, random_table: pd.DataFrame, config, mode: str
) -> pd.DataFrame:
    """One row for ``mode``: the group's paired change and where it lies among the random
    draws ablated the same way."""
    results = results[results["mode"] == mode]
    if not random_table.empty:
        random_table = random_table[random_table["mode"] == mode]
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
            "mode": mode,
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


def _plot(results, random_table, path, config, n_heads, mode: str) -> None:
    """Histogram of the random draws' mean change of one mode, the group's as a line."""
    results = results[results["mode"] == mode]
    if not random_table.empty:
        random_table = random_table[random_table["mode"] == mode]
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
    ax.set_title(f"{mode}-ablating {n_heads} {config.unit} heads together")
    ax.legend(fontsize=8)
    _save(fig, path)


def _markdown(summary, heads, origin, config, prepared, seconds, modes) -> str:
    lines = [
        *summary_head("Group ablation", prepared.lm),
        f"- heads ({len(heads)}, {config.unit}, ablated at the input of the attention output "
        f"projection): {', '.join(f'L{a}H{b}' for a, b in heads)}",
        f"- heads from: {origin}",
        *[f"- {mode_description(mode, config)}" for mode in modes],
        f"- R_V = PR(L{prepared.late}) / PR(L{prepared.early}) ({prepared.rule}), "
        f"{config.pr_mode} PR, window {config.window}; {summary.iloc[0]['n']} prompts",
        f"- random control: {config.n_random} draws of the same number of heads per layer "
        f"(seed {config.seed}), ablated the same way in each mode",
        f"- time: {seconds:.1f} s",
        "",
    ]
    for row in summary.to_dict(orient="records"):
        lines += [
            f"## {row['mode']} ablation",
            "",
            f"- mean R_V clean {row['r_v_clean']:.4f}, ablated {row['r_v_ablated']:.4f}; "
            f"change {row['mean_change']:+.4f} (95 % CI {row['ci_low']:+.4f}.."
            f"{row['ci_high']:+.4f})",
            f"- random control ({row['n_random']} draws): mean change "
            f"{row['random_mean_change']:+.4f}, 95 % of draws in {row['random_2.5pct']:+.4f}.."
            f"{row['random_97.5pct']:+.4f}; p(|random| >= |group|) = {row['random_p']:.3g}",
            "",
        ]
    lines += [
        markdown_table(summary),
        "",
        "Files: `results.*` (per prompt and mode), `random_controls.*` (per mode x draw x "
        "prompt), `summary.*` (one row per mode), `plots/group_vs_random*.png`.",
    ]
    return "\n".join(lines) + "\n"
