"""Shared settings and checks of the causal battery (seed 000 cells 3-15, seed 001).

Every causal experiment (group and layer ablation, attention vs MLP, head diagnostics,
saliency, activation and attribution patching) starts the same way: load the prompts and the
model, resolve the R_V layers, check the window against every prompt, all before a run
directory is created, so that bad input writes nothing. :func:`prepare` does that once.

It also holds the helpers the experiments share: parsing ``layer.head`` lists, reading the
``heads`` table of a finished ``rloop ablate`` run, R_V of many head-ablation variants stacked
along the batch dimension, and per-prompt paired summaries with bootstrap CIs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from rloop.capture.batching import EncodedBatch, encode, gather_windows
from rloop.capture.trace import Trace, address
from rloop.errors import ConfigError, RunStoreError
from rloop.interventions.edits import (
    ABLATION_MODES,
    HEAD_UNITS,
    check_heads,
    head_ablation_edit,
    keep_mask,
    mean_activations,
)
from rloop.interventions.engine import check_mode_for_point, resolve_layers
from rloop.metrics import r_v, window_pr
from rloop.metrics.stats import bootstrap_ci
from rloop.prompts import PromptSet

HeadList = list[tuple[int, int]]


@dataclass
class CausalSettings:
    """Settings every causal experiment shares (defaults match the CLI)."""

    model: str = "smollm2-135m"
    revision: str | None = None
    prompts: str | None = None  # prompt file; None = the shipped bank
    bank_version: str = "v1"
    groups: list[str] | None = None  # None = the experiment's default groups
    max_prompts: int | None = 10  # per group
    measure_layers: list[int] | None = None  # [early, late]; None = depth fractions
    window: int = 16
    pr_mode: str = "per-head"
    n_boot: int = 2000
    seed: int = 0
    dtype: str | None = None
    device: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Prepared:
    """What :func:`prepare` checked and loaded."""

    lm: object
    prompts: PromptSet  # the prompts used (at most max_prompts per group)
    early: int
    late: int
    rule: str


def check_settings(settings: CausalSettings) -> None:
    if settings.window < 2:
        raise ConfigError(f"window must be at least 2 tokens, got {settings.window}")
    if settings.max_prompts is not None and settings.max_prompts < 1:
        raise ConfigError(f"--max-prompts must be at least 1, got {settings.max_prompts}")
    if settings.n_boot < 100:
        raise ConfigError(f"n_boot must be at least 100 for a usable CI, got {settings.n_boot}")
    check_mode_for_point("v", [settings.pr_mode])


def check_ablation_mode(mode: str, unit: str = "query") -> None:
    if mode not in ABLATION_MODES:
        raise ConfigError(f"unknown ablation mode {mode!r}: choose zero or mean")
    if unit not in HEAD_UNITS:
        raise ConfigError(f"unknown head unit {unit!r}: choose query or kv_group")


def limit_per_group(prompt_set: PromptSet, max_prompts: int | None) -> PromptSet:
    """The first ``max_prompts`` prompts of each group (all if None), in the set's order."""
    if max_prompts is None:
        return prompt_set
    seen: dict[str, int] = {}
    kept = []
    for prompt in prompt_set:
        if seen.get(prompt.group, 0) < max_prompts:
            kept.append(prompt)
            seen[prompt.group] = seen.get(prompt.group, 0) + 1
    return PromptSet(kept, prompt_set.source, prompt_set.version, prompt_set.sha256)


def load_reference(settings: CausalSettings, group: str, lm) -> PromptSet:
    """The mean-ablation reference set (a group of the same prompt source), window-checked."""
    from rloop.experiments.runner import load_prompt_set
    from rloop.prompts import check_window

    reference = load_prompt_set(settings.prompts, settings.bank_version, [group])
    check_window(reference, lm.tokenizer, settings.window)
    return reference


def prepare(settings: CausalSettings, default_groups: list[str] | None, lm=None) -> Prepared:
    """Check settings, load prompts and model, resolve layers, check the window.

    default_groups: groups used when ``settings.groups`` is None and the prompts come from the
    shipped bank (a user file uses all its groups).
    """
    from rloop.experiments.runner import load_prompt_set
    from rloop.prompts import check_window

    check_settings(settings)
    groups = settings.groups or (default_groups if settings.prompts is None else None)
    prompt_set = load_prompt_set(settings.prompts, settings.bank_version, groups)
    used = limit_per_group(prompt_set, settings.max_prompts)
    if lm is None:
        from rloop.models import load_model

        lm = load_model(
            settings.model, revision=settings.revision, device=settings.device, dtype=settings.dtype
        )
    early, late, rule = resolve_layers(lm.adapter, settings.measure_layers)
    check_window(used, lm.tokenizer, settings.window)
    return Prepared(lm, used, early, late, rule)


def record_inputs(run, prepared: Prepared, **extra) -> None:
    """Model, prompts and R_V layers into the run manifest."""
    from rloop.experiments.runner import model_manifest, prompts_manifest

    run.set_model(model_manifest(prepared.lm))
    run.set_prompts(prompts_manifest(prepared.prompts, prepared.lm.tokenizer))
    run.update_manifest(
        layers={"early": prepared.early, "late": prepared.late, "rule": prepared.rule}, **extra
    )


# ---------------------------------------------------------------------------- head lists
def parse_heads(text: str) -> HeadList:
    """'15.4,16.2' -> [(15, 4), (16, 2)] (layer.head); ConfigError for anything else."""
    heads: HeadList = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        pieces = part.split(".")
        if len(pieces) != 2 or not all(p.strip().isdigit() for p in pieces):
            raise ConfigError(
                f"cannot read head {part!r}: write heads as LAYER.HEAD, e.g. 15.4,16.2"
            )
        heads.append((int(pieces[0]), int(pieces[1])))
    if not heads:
        raise ConfigError("no heads given: write heads as LAYER.HEAD, e.g. --heads 15.4,16.2")
    return sorted(set(heads))


def check_head_list(adapter, heads: HeadList, unit: str = "query") -> HeadList:
    """Range-check every (layer, head) of ``unit``; returns them sorted and de-duplicated."""
    for layer, head in heads:
        check_heads(adapter, layer, [head], unit)
    return sorted(set(heads))


def read_sweep(run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(results, heads, manifest) of a finished ``rloop ablate`` run directory."""
    from rloop.runs.store import read_manifest

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if manifest.get("experiment") != "ablate":
        raise RunStoreError(
            f"{run_dir} is a {manifest.get('experiment')!r} run, not a head sweep: "
            "pass the directory of an `rloop ablate` run"
        )
    if manifest.get("status") != "complete":
        raise RunStoreError(
            f"{run_dir} is not complete (status {manifest.get('status')!r}): "
            "finish the sweep first (run the same `rloop ablate` command again)"
        )
    try:
        results = pd.read_parquet(run_dir / "results.parquet")
        heads = pd.read_parquet(run_dir / "heads.parquet")
    except (OSError, ValueError) as err:
        raise RunStoreError(f"cannot read the tables of sweep {run_dir}: {err}") from None
    return results, heads, manifest


def top_heads_of_sweep(heads: pd.DataFrame, k: int, select: str = "abs") -> HeadList:
    """The top ``k`` computed heads of a sweep's ``heads`` table.

    select: "abs" (largest |mean impact|), "negative" (most negative mean impact: the seed's
    "expanders", whose removal lowers R_V), "positive" (most positive).
    """
    if k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {k}")
    computed = heads[heads["computed"]]
    if select == "abs":
        order = computed.assign(key=-computed["mean_impact"].abs()).sort_values("key")
    elif select == "negative":
        order = computed.sort_values("mean_impact")
    elif select == "positive":
        order = computed.sort_values("mean_impact", ascending=False)
    else:
        raise ConfigError(f"unknown head selection {select!r}: choose abs, negative or positive")
    if len(order) < k:
        raise ConfigError(f"the sweep has only {len(order)} computed heads; use --top-k <= that")
    return sorted((int(r.layer), int(r.head)) for r in order.head(k).itertuples())


# ---------------------------------------------------------------------------- R_V helpers
def clean_r_v(lm, batch: EncodedBatch, early: int, late: int, window: int, pr_mode: str):
    """Clean PR(early), PR(late) and R_V per prompt, each (P,) float64 numpy."""
    v_early, v_late = address(early, "v"), address(late, "v")
    with (
        torch.no_grad(),
        Trace(lm.model, lm.adapter, capture=[v_early, v_late], stop_after_point=v_late) as tr,
    ):
        lm.model(**batch.model_inputs(), use_cache=False)
    pe = (
        window_pr(gather_windows(tr[v_early], batch.n_tokens, window), pr_mode).cpu().numpy()
    )  # (P,)
    pl = (
        window_pr(gather_windows(tr[v_late], batch.n_tokens, window), pr_mode).cpu().numpy()
    )  # (P,)
    return pe, pl, r_v(pl, pe)


def stacked_head_ablation_r_v(
    lm,
    batch: EncodedBatch,
    head_sets: list[HeadList],
    early: int,
    late: int,
    window: int,
    pr_mode: str,
    unit: str = "query",
    mean_z: dict[int, torch.Tensor] | None = None,
    max_rows: int = 256,
) -> np.ndarray:
    """R_V per (variant, prompt) with each variant's heads ablated together -> (N, P).

    Variants are stacked along the batch dimension (P rows each) with a per-row keep-mask at
    every layer any variant touches; equal to one forward per variant (tested).
    """
    adapter = lm.adapter
    n_prompts = batch.input_ids.shape[0]
    per_chunk = max(1, max_rows // n_prompts)
    v_early, v_late = address(early, "v"), address(late, "v")
    out = np.empty((len(head_sets), n_prompts))
    for start in range(0, len(head_sets), per_chunk):
        chunk = head_sets[start : start + per_chunk]
        layers = sorted({layer for heads in chunk for layer, _ in heads})
        edits = {}
        for layer in layers:
            variants = [[h for lay, h in heads if lay == layer] for heads in chunk]
            keep = keep_mask(adapter, variants, unit)  # (N, H)
            mean = None if mean_z is None else mean_z[layer]
            edits[address(layer, "z")] = head_ablation_edit(keep, mean, rows_per_variant=n_prompts)
        inputs = {k: v.repeat(len(chunk), 1) for k, v in batch.model_inputs().items()}  # (N*P, T)
        lengths = list(batch.n_tokens) * len(chunk)
        with (
            torch.no_grad(),
            Trace(
                lm.model,
                adapter,
                capture=[v_early, v_late],
                edits=edits,
                stop_after_point=v_late,
            ) as tr,
        ):
            lm.model(**inputs, use_cache=False)
        pe = window_pr(gather_windows(tr[v_early], lengths, window), pr_mode)  # (N*P,)
        pl = window_pr(gather_windows(tr[v_late], lengths, window), pr_mode)  # (N*P,)
        out[start : start + len(chunk)] = r_v(pl, pe).cpu().numpy().reshape(len(chunk), n_prompts)
    return out


def reference_means(lm, reference: PromptSet | None, layers, point: str):
    """Mean of ``point`` over the reference set per layer, or None (zero ablation)."""
    if reference is None:
        return None
    return mean_activations(
        lm.model, lm.adapter, lm.tokenizer, [p.text for p in reference], sorted(set(layers)), point
    )


def paired_change(clean: np.ndarray, ablated: np.ndarray, n_boot: int, seed: int) -> dict:
    """Mean clean/ablated R_V, mean change (ablated - clean) with bootstrap CI over prompts."""
    change = ablated - clean
    ci = bootstrap_ci(change, n_boot=n_boot, seed=seed)
    return {
        "n": ci.n,
        "n_nan": ci.n_dropped,
        "r_v_clean": float(np.nanmean(clean)) if np.isfinite(clean).any() else float("nan"),
        "r_v_ablated": float(np.nanmean(ablated)) if np.isfinite(ablated).any() else float("nan"),
        "mean_change": ci.estimate,
        "ci_low": ci.low,
        "ci_high": ci.high,
    }


def encode_prompts(lm, prompts: PromptSet) -> EncodedBatch:
    return encode(lm.tokenizer, [p.text for p in prompts], lm.device)


def markdown_table(frame: pd.DataFrame, digits: int = 4) -> str:
    """A Markdown table of ``frame`` (floats to ``digits`` significant digits)."""

    def fmt(value) -> str:
        if isinstance(value, float | np.floating):
            return f"{value:.{digits}g}"
        return str(value)

    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def model_line(lm) -> str:
    a = lm.adapter
    return (
        f"{lm.name} ({a.family}, {a.n_layers} layers, {a.n_heads} heads, "
        f"{a.n_kv_heads} KV heads, {lm.dtype})"
    )
