"""Residual-stream gain per block and the H25 head-density analysis (seeds 002 and 004).

The gain of block l is ||out_l|| / ||in_l|| of the residual stream, where in_l and out_l are
read by hooks on the block itself (``resid_pre`` / ``resid_post``), never from the
``hidden_states`` tuple of transformers: that tuple holds block 0's input, block l's output
for l < n-1 and then final_norm(last block output) — the last block's raw output is not in it
at all, so the seeds' "correct" ``hidden_states[-2] / hidden_states[-3]`` is the gain of the
*second-to-last* block (tests/test_gain.py proves the layout per family). The final norm's
effect is measured separately with a hook on the norm module (||norm(x)|| / ||x||).

Per prompt and block, in float64: the gain at the last real token and the mean over real
tokens of the per-token gain. Per model: the last block's gain (mean over prompts, sd,
bootstrap CI), the final norm's gain, the per-layer curve, architecture facts and
rho = n_heads / d_head. Across models: Pearson and Spearman correlation of rho with the gain
(bootstrap CI), and the seeds' prediction table (rho >= 0.2 -> dampening, gain < 1).
"""

from __future__ import annotations

import gc
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from rloop import models as rloop_models
from rloop.capture.batching import encode, plan_batches
from rloop.capture.trace import Trace, address
from rloop.errors import ConfigError, RloopError
from rloop.experiments.runner import execute, prompts_manifest
from rloop.experiments.settings import check_context, load_prompt_set
from rloop.metrics.stats import bootstrap_ci, correlation_with_ci
from rloop.models.architecture import ArchitectureFacts, facts_of_model
from rloop.progress import progress_bar
from rloop.prompts import DEFAULT_BANK_VERSION
from rloop.runs import plots as plotting
from rloop.runs.layout import one_line_error
from rloop.runs.markdown import markdown_table

EXPERIMENT = "gain"
FINAL_NORM_STAGE = "final_norm"
BLOCK_STAGE = "block"

ModelLoader = Callable[..., object]  # (name, revision=, device=, dtype=) -> LoadedModel


@dataclass
class GainConfig:
    """Settings of the gain experiment (defaults match the CLI)."""

    models: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    revision: str | None = None  # applies to every model
    dtype: str | None = None
    device: str | None = None  # "auto" spreads each model over every GPU
    prompts: str | None = None  # a prompt file; None = the shipped bank
    bank_version: str = DEFAULT_BANK_VERSION  # v2; "v1" stays loadable
    groups: list[str] | None = None
    batch_size: int = 8
    rho_threshold: float = 0.2  # H25: rho >= threshold predicts dampening (gain < 1)
    n_boot: int = 2000
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def check_unique(names: list[str], what: str) -> None:
    """ConfigError naming the entries that appear more than once in ``names``."""
    seen: set[str] = set()
    repeated = [n for n in names if n in seen or seen.add(n)]  # type: ignore[func-returns-value]
    if repeated:
        raise ConfigError(
            f"{what} listed more than once: {', '.join(dict.fromkeys(repeated))}; "
            "give each one once"
        )


def validate_config(config: GainConfig) -> None:
    if not config.models:
        raise ConfigError("no model given: pass --model or --models a,b,c")
    check_unique(list(config.models), "model(s)")
    if config.batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {config.batch_size}")
    if config.n_boot < 100:
        raise ConfigError(f"n_boot must be at least 100 for a usable CI, got {config.n_boot}")
    if not config.rho_threshold > 0:
        raise ConfigError(f"rho threshold must be positive, got {config.rho_threshold}")


# ---------------------------------------------------------------------------- measurement


def _token_norms(hidden: torch.Tensor) -> torch.Tensor:
    """(B, T, d_model) on any device -> (B, T) float64 L2 norms on the CPU."""
    return torch.linalg.vector_norm(hidden.detach().to("cpu", torch.float64), dim=-1)  # (B, T)


def _gain_rows(
    norm_in: torch.Tensor, norm_out: torch.Tensor, n_tokens: list[int]
) -> list[tuple[float, float, float, float]]:
    """Per row of (B, T) norms: (||in|| last, ||out|| last, gain at last token, mean gain)."""
    rows = []
    for i, n in enumerate(n_tokens):
        ins, outs = norm_in[i, :n], norm_out[i, :n]  # (n,)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = (outs / ins).numpy()  # (n,) NaN/inf where ||in|| = 0
        ratio = np.where(np.isfinite(ratio), ratio, np.nan)
        mean_gain = float(ratio.mean()) if np.isfinite(ratio).all() else math.nan
        rows.append((float(ins[-1]), float(outs[-1]), float(ratio[-1]), mean_gain))
    return rows


def measure_gain(lm, prompt_set, batch_size: int = 8) -> pd.DataFrame:
    """Gain of every block and of the final norm, per prompt.

    Returns one row per prompt x stage x layer: prompt_id, group, n_tokens, stage ("block"
    or "final_norm"), layer (block index; n_layers for the final norm), norm_in_last,
    norm_out_last (L2 norms at the last real token), gain_last (their ratio) and gain_mean
    (mean over real tokens of the per-token ratio). Works with models dispatched across
    devices: every tensor is moved to the CPU in float64 before any arithmetic.
    """
    adapter, model = lm.adapter, lm.model
    prompts = list(prompt_set)
    texts = [p.text for p in prompts]
    lengths = [len(ids) for ids in lm.tokenizer(texts)["input_ids"]]
    n_layers = adapter.n_layers
    points = [address(layer, p) for layer in range(n_layers) for p in ("resid_pre", "resid_post")]
    final_norm = model.get_submodule(adapter.final_norm_path)
    input_device = model.get_input_embeddings().weight.device
    if input_device.type == "meta":  # offloaded embeddings execute on the main device
        input_device = torch.device(str(getattr(lm, "device", "cpu")))
    rows: list[dict] = []
    with progress_bar("measuring gain", total=len(texts)) as advance:
        for batch in plan_batches(lengths, batch_size):
            encoded = encode(lm.tokenizer, [texts[i] for i in batch], input_device)
            seen: dict[str, torch.Tensor] = {}

            def record_norm(module, args, output, seen=seen):
                seen["in"] = _token_norms(args[0])  # (B, T)
                seen["out"] = _token_norms(output[0] if isinstance(output, tuple) else output)

            handle = final_norm.register_forward_hook(record_norm)
            try:
                with torch.no_grad(), Trace(model, adapter, capture=points) as trace:
                    model(**encoded.model_inputs(), use_cache=False)
            finally:
                handle.remove()
            per_stage: list[tuple[str, int, torch.Tensor, torch.Tensor]] = [
                (
                    BLOCK_STAGE,
                    layer,
                    _token_norms(trace[address(layer, "resid_pre")]),  # (B, T)
                    _token_norms(trace[address(layer, "resid_post")]),  # (B, T)
                )
                for layer in range(n_layers)
            ]
            per_stage.append((FINAL_NORM_STAGE, n_layers, seen["in"], seen["out"]))
            for stage, layer, norm_in, norm_out in per_stage:
                values = _gain_rows(norm_in, norm_out, encoded.n_tokens)
                for row_index, item in enumerate(batch):
                    nin, nout, g_last, g_mean = values[row_index]
                    rows.append(
                        {
                            "prompt_id": prompts[item].id,
                            "group": prompts[item].group,
                            "n_tokens": encoded.n_tokens[row_index],
                            "stage": stage,
                            "layer": layer,
                            "norm_in_last": nin,
                            "norm_out_last": nout,
                            "gain_last": g_last,
                            "gain_mean": g_mean,
                        }
                    )
            advance(len(batch))
    table = pd.DataFrame(rows)
    return table.sort_values(["stage", "layer", "prompt_id"], ignore_index=True)


# ---------------------------------------------------------------------------- per-model summary


def summarize_model(
    layers: pd.DataFrame, facts: ArchitectureFacts, model: str, n_boot: int, seed: int
) -> dict:
    """One row of the models table: facts, rho and the gains that matter.

    gain = last block, last real token, mean over prompts (with sd and bootstrap CI);
    gain_token_mean = last block, mean over tokens; final_norm_gain = ||norm(x)|| / ||x||;
    penultimate_gain = block n-2 (what the seeds' hidden_states[-2]/[-3] measured).
    """
    blocks = layers[layers.stage == BLOCK_STAGE]
    last = blocks[blocks.layer == facts.n_layers - 1]
    norm = layers[layers.stage == FINAL_NORM_STAGE]
    gains = last["gain_last"].to_numpy(dtype=np.float64)
    ci = bootstrap_ci(gains, n_boot=n_boot, seed=seed)
    penultimate = blocks[blocks.layer == facts.n_layers - 2]["gain_last"]
    return {
        "model": model,
        **facts.to_dict(),
        "n_prompts": int(len(gains)),
        "n_nan": int((~np.isfinite(gains)).sum()),
        "gain": float(np.nanmean(gains)) if np.isfinite(gains).any() else math.nan,
        "gain_sd": float(np.nanstd(gains, ddof=1)) if np.isfinite(gains).sum() > 1 else math.nan,
        "gain_ci_low": ci.low,
        "gain_ci_high": ci.high,
        "gain_token_mean": float(last["gain_mean"].mean()),
        "final_norm_gain": float(norm["gain_last"].mean()),
        "final_norm_gain_token_mean": float(norm["gain_mean"].mean()),
        "penultimate_gain": float(penultimate.mean()) if len(penultimate) else math.nan,
        "mean_block_gain": float(blocks["gain_last"].mean()),
    }


def layer_curve(layers: pd.DataFrame, model: str) -> pd.DataFrame:
    """Mean (and sd) over prompts of the gain per stage x layer, for one model."""
    curve = (
        layers.groupby(["stage", "layer"])
        .agg(
            gain_last=("gain_last", "mean"),
            gain_last_sd=("gain_last", "std"),
            gain_mean=("gain_mean", "mean"),
            n=("gain_last", "size"),
        )
        .reset_index()
    )
    curve.insert(0, "model", model)
    return curve


# ---------------------------------------------------------------------------- H25 across models


def h25_predictions(models: pd.DataFrame, threshold: float = 0.2) -> tuple[pd.DataFrame, float]:
    """The seeds' prediction table: rho >= threshold predicts dampening (gain < 1).

    Returns (table, accuracy); accuracy is NaN without any model with a finite gain.
    ``ci_includes_1`` flags models whose observed direction is not resolved by the CI.
    """
    table = models[["model", "rho", "gain", "gain_ci_low", "gain_ci_high"]].copy()
    table["predicted"] = np.where(table["rho"] >= threshold, "dampening", "expansion")
    finite = np.isfinite(table["gain"].to_numpy(dtype=float))
    table["observed"] = np.where(
        ~finite, "undefined", np.where(table["gain"] < 1.0, "dampening", "expansion")
    )
    table["correct"] = (table["predicted"] == table["observed"]) & finite
    table["ci_includes_1"] = (table["gain_ci_low"] <= 1.0) & (table["gain_ci_high"] >= 1.0)
    accuracy = float(table.loc[finite, "correct"].mean()) if finite.any() else math.nan
    return table.sort_values("rho", ignore_index=True), accuracy


def rho_gain_correlations(models: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """Pearson and Spearman correlation of rho with each gain measure, bootstrap CI over models
    (NaN with fewer than 3 models or a constant rho)."""
    rows = []
    for measure in ("gain", "gain_token_mean", "penultimate_gain"):
        for method in ("pearson", "spearman"):
            c = correlation_with_ci(
                models["rho"].to_numpy(float),
                models[measure].to_numpy(float),
                method=method,
                n_boot=n_boot,
                seed=seed,
            )
            rows.append({"x": "rho", "y": measure, **c.to_dict()})
    return pd.DataFrame(rows)


def plot_h25(models: pd.DataFrame, curves: pd.DataFrame, path: Path, threshold: float) -> Path:
    """Seed 002's three panels: rho vs gain (CI error bars), gain by model (sorted by rho),
    per-layer gain curves (final norm drawn as a separate cross)."""

    plt = plotting.plt
    frame = models.sort_values("rho", ignore_index=True)
    colors = ["tab:blue" if g < 1.0 else "tab:red" for g in frame["gain"]]
    err = np.vstack(
        [
            (frame["gain"] - frame["gain_ci_low"]).clip(lower=0).fillna(0),
            (frame["gain_ci_high"] - frame["gain"]).clip(lower=0).fillna(0),
        ]
    )
    label_of = dict(zip(frame["model"], plotting.short_names(list(frame["model"])), strict=True))
    legend_width = 0.6 + 0.06 * max((len(label) for label in label_of.values()), default=0)
    fig, axes = plt.subplots(1, 3, figsize=(17 + legend_width, 5))
    ax = axes[0]
    ax.errorbar(frame["rho"], frame["gain"], yerr=err, fmt="none", ecolor="grey", alpha=0.7)
    ax.scatter(frame["rho"], frame["gain"], c=colors, s=70, zorder=5)
    for row in frame.itertuples():
        ax.annotate(
            label_of[row.model], (row.rho, row.gain), xytext=(5, 5), textcoords="offset points"
        )
    ax.axhline(1.0, color="black", ls="--", lw=0.8, label="gain = 1")
    ax.axvline(threshold, color="purple", ls=":", lw=0.8, label=f"rho = {threshold}")
    ax.set_xlabel("rho = n_heads / d_head")
    ax.set_ylabel("last-block gain (last token, 95% CI)")
    ax.set_title("rho vs last-block gain")
    ax.legend(fontsize=8)

    ax = axes[1]
    x = np.arange(len(frame))
    ax.bar(x, frame["gain"], color=colors, alpha=0.75, yerr=err, capsize=3)
    ax.axhline(1.0, color="black", ls="--", lw=0.8)
    ax.set_xticks(x, [label_of[m] for m in frame["model"]], rotation=45, ha="right")
    ax.set_ylabel("last-block gain")
    ax.set_title("gain by model (sorted by rho)")

    ax = axes[2]
    for model, curve in curves.groupby("model", sort=False):
        blocks = curve[curve.stage == BLOCK_STAGE]
        label = label_of.get(model, model)
        line = ax.plot(blocks["layer"], blocks["gain_last"], "-o", ms=2, label=label)[0]
        norm = curve[curve.stage == FINAL_NORM_STAGE]
        ax.scatter(norm["layer"], norm["gain_last"], marker="x", color=line.get_color())
    ax.axhline(1.0, color="black", ls="--", lw=0.8)
    ax.set_xlabel("block (x: final norm, after the last block)")
    ax.set_ylabel("gain ||out|| / ||in|| (last token)")
    ax.set_title("per-layer gain")
    plotting.legend_outside(ax, title="model")
    return plotting._save(fig, path)


# ---------------------------------------------------------------------------- pipeline


def free_model(lm) -> None:
    """Drop the model's weights from memory (CPU and GPU)."""
    model = getattr(lm, "model", None)
    if model is not None:
        lm.model = None
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def model_key(index: int, name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name.replace("/", "--")).strip("._-")[:60]
    return f"model-{index:03d}-{slug or 'model'}"


def default_loader(name: str, revision=None, device=None, dtype=None):
    """rloop.models.load_model; ``device="auto"`` spreads the model over every GPU
    (transformers' device_map="auto") for models larger than one GPU."""

    if device == "auto":
        return rloop_models.load_model(name, revision=revision, dtype=dtype, device_map="auto")
    return rloop_models.load_model(name, revision=revision, device=device, dtype=dtype)


def report_markdown(
    models: pd.DataFrame,
    predictions: pd.DataFrame,
    accuracy: float,
    correlations: pd.DataFrame,
    failures: pd.DataFrame,
    config: GainConfig,
) -> str:

    shown = models[
        [
            "model",
            "rho",
            "n_layers",
            "gain",
            "gain_ci_low",
            "gain_ci_high",
            "gain_token_mean",
            "final_norm_gain",
            "penultimate_gain",
        ]
    ]
    lines = [
        "# Residual-stream gain",
        "",
        "- gain = ||out|| / ||in|| of the **last block**, read by hooks on the block "
        "(last real token; mean over prompts, 95% bootstrap CI).",
        "- `final_norm_gain` is the final norm alone; `penultimate_gain` is block n-2, which "
        "is what the seeds' `hidden_states[-2] / hidden_states[-3]` measured.",
        f"- prompts: {config.prompts or 'shipped bank ' + config.bank_version}",
        "",
        "## Models",
        "",
        markdown_table(shown),
        "",
        f"## H25 predictions (rho >= {config.rho_threshold} -> dampening)",
        "",
        markdown_table(predictions),
        "",
        f"Accuracy: {accuracy:.0%}" if math.isfinite(accuracy) else "Accuracy: undefined",
        "",
        "## rho vs gain",
        "",
    ]
    if len(models) < 3:
        lines.append(f"Only {len(models)} model(s): correlations need at least 3 (NaN below).")
        lines.append("")
    lines += [markdown_table(correlations[["y", "method", "r", "p", "ci_low", "ci_high", "n"]])]
    if len(failures):
        lines += ["", "## Failed models", "", markdown_table(failures)]
    lines += [
        "",
        "Files: `models.*` (one row per model), `layers.*` (prompt x layer), `curves.*`, "
        "`predictions.*`, `correlations.*`, `failures.*`, `plots/h25.png`.",
    ]
    return "\n".join(lines) + "\n"


def run_gain(
    config: GainConfig,
    out: Path | None = None,
    force: bool = False,
    loader: ModelLoader | None = None,
) -> tuple[Path, bool, dict]:
    """Gain of every model in ``config.models``, one loaded at a time and freed after.

    Resumable: each finished model is a partial of the run; a model that fails to load or
    measure is recorded in ``failures`` and the others go on (all failing raises). With one
    model, it is loaded before the run directory is created, so a bad name writes nothing.
    """

    validate_config(config)
    prompt_set = load_prompt_set(config.prompts, config.bank_version, config.groups)
    load = loader or default_loader

    def load_one(name: str):
        return load(name, revision=config.revision, device=config.device, dtype=config.dtype)

    preloaded = load_one(config.models[0]) if len(config.models) == 1 else None
    if preloaded is not None:
        check_context(prompt_set, preloaded)  # a sweep checks each model as it loads it
    label = config.models[0] if len(config.models) == 1 else f"{len(config.models)}-models"

    def body(run) -> dict:
        done = run.finished_keys()
        failures: list[dict] = []
        prompts_recorded = False
        for index, name in enumerate(config.models):
            key = model_key(index, name)
            if key in done:
                continue
            started = time.perf_counter()
            lm = preloaded if preloaded is not None else None
            try:
                lm = lm if lm is not None else load_one(name)
                check_context(prompt_set, lm)
                if not prompts_recorded:
                    run.set_prompts(prompts_manifest(prompt_set, lm.tokenizer))
                    prompts_recorded = True
                facts = facts_of_model(lm.model)
                layers = measure_gain(lm, prompt_set, config.batch_size)
                layers.insert(0, "model", name)
                summary = summarize_model(layers, facts, name, config.n_boot, config.seed)
                summary["revision"] = config.revision
                summary["dtype"] = str(getattr(lm, "dtype", "")).replace("torch.", "")
                summary["measure_s"] = time.perf_counter() - started
                run.save_partial(f"summary-{key}", pd.DataFrame([summary]))
                run.save_partial(key, layers)
            except (RloopError, RuntimeError, OSError, ValueError) as err:
                failures.append({"model": name, "error": one_line_error(err)})
                run.update_manifest(failures=failures)
            finally:
                if lm is not None:
                    free_model(lm)
        keys = run.finished_keys()
        measured = [(i, n) for i, n in enumerate(config.models) if model_key(i, n) in keys]
        if not measured:
            raise RloopError(
                "no model could be measured: "
                + "; ".join(f"{f['model']}: {f['error']}" for f in failures)
            )
        layers = pd.concat(
            [pd.read_parquet(run.partial_dir / f"{model_key(i, n)}.parquet") for i, n in measured],
            ignore_index=True,
        )
        models = pd.concat(
            [
                pd.read_parquet(run.partial_dir / f"summary-{model_key(i, n)}.parquet")
                for i, n in measured
            ],
            ignore_index=True,
        )
        return write_gain_outputs(run, models, layers, pd.DataFrame(failures), config)

    return execute(EXPERIMENT, config.to_dict(), label, out, body, force=force).as_tuple()


def write_gain_outputs(
    run, models: pd.DataFrame, layers: pd.DataFrame, failures: pd.DataFrame, config: GainConfig
) -> dict:
    """Tables, the three-panel plot and summary.md of a gain run; returns the headline."""
    curves = pd.concat(
        [layer_curve(frame, name) for name, frame in layers.groupby("model", sort=False)],
        ignore_index=True,
    )
    predictions, accuracy = h25_predictions(models, config.rho_threshold)
    correlations = rho_gain_correlations(models, config.n_boot, config.seed)
    if failures.empty:
        failures = pd.DataFrame(columns=["model", "error"])
    run.write_table("models", models)
    run.write_table("layers", layers)
    run.write_table("curves", curves)
    run.write_table("predictions", predictions)
    run.write_table("correlations", correlations)
    run.write_table("failures", failures)
    plot_h25(models, curves, run.plot_path("h25"), config.rho_threshold)
    run.write_summary(
        report_markdown(models, predictions, accuracy, correlations, failures, config)
    )
    headline: dict = {"n_models": int(len(models)), "n_failed": int(len(failures))}
    for row in models.itertuples():
        headline[f"{row.model}:gain"] = row.gain
        headline[f"{row.model}:rho"] = row.rho
    headline["h25_accuracy"] = accuracy
    pearson = correlations[(correlations.y == "gain") & (correlations.method == "pearson")]
    headline["pearson_r_rho_gain"] = float(pearson["r"].iloc[0])
    return headline
