"""The contracted subspace (``rloop subspace``): into what does the value space narrow?

At one hook point (V by default; any per-head or stream point) the last W real tokens of every
prompt are captured at the measured layer and at every layer (for the layer-to-layer curve) by
the R_V engine in one forward per batch. Per group: the top-k directions of the stacked
windows with the share of the squared norm each carries (whole mode: heads flattened, so the
(W, n_heads * d_head) window of V); per prompt: the share of its window inside its group's
top-k span. Between the recursive and the baseline group: principal angles with a bootstrap
over prompts and a null from random halves of the baseline group. Stability: split-half
overlap of the recursive group's subspace. Relay: the overlap of layer l's top recursive
directions with layer l+1's.

Read-out (logit lens of each top direction, table ``readout``): a direction at a stream point
(resid_pre, resid_post, attn_out, mlp_out) is already a residual-stream direction; a direction
of V is mapped into the residual through the output projection of the heads that read it
(KV head g's part goes to every query head of its group, each through its own o_proj slice,
and the results add up); a direction of z through o_proj directly. The mapped direction is
normalised, fed to the final norm at unit RMS (length sqrt(d_model); RMSNorm and LayerNorm are
scale invariant up to eps) and unembedded; the tokens with the highest logits are listed for
+u and -u (singular vectors have no sign). The unembedding's bias, where a family has one,
is left out: it does not depend on the direction. q and k are not written into the residual
and get no read-out.

A run keeps no resume checkpoints: it is short (about 100 s on the embedded model) and its
per-batch state, the raw activation windows at every relay layer, is far larger than its
tables, so an interrupted run is simply run again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from rloop.errors import ConfigError, PromptError
from rloop.experiments.runner import execute, prompt_batches, record_inputs
from rloop.experiments.settings import Settings, check_point_name, layer_list, prepare
from rloop.interventions.engine import measure_pr
from rloop.metrics.subspace import (
    bootstrap_principal_angles,
    layer_to_layer_overlap,
    logit_lens_tokens,
    random_overlap,
    random_split_null,
    split_half_overlap,
    subspace_share,
    top_directions,
)
from rloop.progress import progress_bar
from rloop.runs.markdown import markdown_table, model_line
from rloop.runs.plots import _save, plt

EXPERIMENT = "subspace"
READOUT_POINTS = ("v", "z", "attn_out", "mlp_out", "resid_pre", "resid_post")


@dataclass
class SubspaceConfig(Settings):
    """Settings of ``rloop subspace`` (defaults match the CLI)."""

    layer: int | None = None  # the measured layer; None = the late R_V layer (depth 0.84)
    point: str = "v"
    k: int = 8
    recursive_group: str = "L5"
    baseline_group: str = "factual"
    layers: list[int] | None = None  # layers of the relay curve; None = every layer
    n_splits: int = 100
    batch_size: int = 16
    readout_top_n: int = 10  # tokens per direction and sign in the logit-lens read-out


def _check(config: SubspaceConfig) -> None:
    check_point_name(config.point)
    if config.k < 1:
        raise ConfigError(f"--k must be at least 1, got {config.k}")
    if config.recursive_group == config.baseline_group:
        raise ConfigError("--recursive-group and --baseline-group must differ")
    if config.readout_top_n < 1:
        raise ConfigError(f"--readout-top-n must be at least 1, got {config.readout_top_n}")


def capture_windows(lm, prompts, layers, point: str, window: int, batch_size: int):
    """Windows of every prompt at every layer, flattened over heads: layer -> (n, W, d)."""
    found: dict[int, list[torch.Tensor]] = {layer: [None] * len(prompts) for layer in layers}
    batches = prompt_batches(lm, prompts, batch_size)
    with progress_bar("capturing windows", total=len(prompts)) as advance:
        for batch in batches:
            measured = measure_pr(
                lm.model, lm.adapter, batch.encode(lm), layers, window, point=point,
                modes=["whole"], keep_windows=True,
            )  # fmt: skip
            for layer in layers:
                flat = measured.windows[layer].flatten(2).to(torch.float64).cpu()  # (B, W, d)
                for row, index in enumerate(batch.indices):
                    found[layer][index] = flat[row]
            advance(len(batch.prompts))
    return {layer: torch.stack(rows) for layer, rows in found.items()}  # (n, W, d)


def _group_tables(windows, groups, prompts, k: int):
    """(spectra, per-prompt shares, directions per group) at one layer."""
    spectra, shares, bases = [], [], {}
    for group, index in groups.items():
        top = top_directions(windows[index], k)
        bases[group] = top
        for i, share in enumerate(top.variance_share.tolist()):
            spectra.append({"group": group, "direction": i + 1, "variance_share": share})
        for j, value in zip(
            index, subspace_share(windows[index], top.directions).tolist(), strict=True
        ):
            shares.append({"prompt_id": prompts[j].id, "group": group, "share_in_top_k": value})
    return pd.DataFrame(spectra), pd.DataFrame(shares), bases


def _angle_table(rec, base, k, config) -> tuple[pd.DataFrame, dict]:
    boot = bootstrap_principal_angles(rec, base, k, n_boot=config.n_boot, seed=config.seed)
    null = random_split_null(base, k, n_splits=config.n_splits, seed=config.seed)
    p = null.exceedance(boot.angles)  # (k,) share of null angles >= observed
    table = pd.DataFrame(
        {
            "angle": np.arange(1, k + 1),
            "radians": boot.angles.numpy(),
            "ci_low": boot.low.numpy(),
            "ci_high": boot.high.numpy(),
            "null_mean": null.mean.numpy(),
            "null_q_high": null.q_high.numpy(),
            "p_vs_null": p.numpy(),
        }
    )
    return table, {"overlap": float(boot.overlap), "n_boot_undefined": int(boot.n_undefined)}


def residual_directions(lm, point: str, layer: int, directions: torch.Tensor) -> torch.Tensor:
    """What directions (k, width) at ``point`` write into the residual stream -> (k, d_model)
    float64, each normalised to unit length (see the module docstring for V and z)."""
    adapter = lm.adapter
    if point not in READOUT_POINTS:
        raise ConfigError(f"{point!r} is not written into the residual: no read-out")
    rows = directions.to(torch.float64)  # (k, width)
    if point in ("v", "z"):
        heads = rows.unflatten(-1, (adapter.heads_at(point), adapter.d_head))  # (k, Hp, D)
        if point == "v":  # KV head g is read by query heads g * n_rep .. (g + 1) * n_rep - 1
            heads = heads.repeat_interleave(adapter.n_heads // adapter.n_kv_heads, dim=1)
        o_proj = adapter.module_for(lm.model, layer, "z")  # the output projection
        weight = next(o_proj.parameters())
        z = heads.flatten(1).to(device=weight.device, dtype=weight.dtype)  # (k, H * D)
        with torch.no_grad():
            # o_proj(z) - o_proj(0): the linear part, whatever the module type (Linear, Conv1D)
            rows = (o_proj(z) - o_proj(torch.zeros_like(z))).to("cpu", torch.float64)  # (k, d)
    norms = rows.norm(dim=-1, keepdim=True)  # (k, 1)
    return rows / torch.where(norms > 0, norms, 1.0)  # (k, d_model)


def readout_table(lm, point: str, layer: int, bases: dict, top_n: int) -> pd.DataFrame:
    """Logit-lens read-out of every group's top directions (empty for q and k): group,
    direction (1-based, as in ``spectra``), sign, rank, token_id, logit[, token]."""
    if point not in READOUT_POINTS:
        return pd.DataFrame()
    final_norm = lm.model.get_submodule(lm.adapter.final_norm_path)
    unembed = lm.model.get_output_embeddings().weight  # (vocab, d_model)
    decode = getattr(lm.tokenizer, "decode", None)
    frames = []
    for group, top in bases.items():
        rows = residual_directions(lm, point, layer, top.directions)  # (k, d_model)
        frame = logit_lens_tokens(
            rows, final_norm, unembed, top_n=min(top_n, unembed.shape[0]),
            scale=float(lm.adapter.d_model) ** 0.5,
            decode=(lambda i: decode([i])) if decode is not None else None,
        )  # fmt: skip
        frame["direction"] += 1
        frames.append(frame.assign(group=group))
    table = pd.concat(frames, ignore_index=True)
    return table[["group", *[c for c in table.columns if c != "group"]]]


def point_width(adapter, point: str) -> int:
    """Width of a window row at ``point`` with heads flattened."""
    if point in ("v", "k"):
        return adapter.n_kv_heads * adapter.d_head
    if point in ("q", "z"):
        return adapter.n_heads * adapter.d_head
    return adapter.d_model


def _groups_of(prompts, config) -> dict[str, list[int]]:
    groups = {
        g: [i for i, p in enumerate(prompts) if p.group == g]
        for g in (config.recursive_group, config.baseline_group)
    }
    for group, index in groups.items():
        if len(index) < 4:
            raise PromptError(
                f"group {group} has {len(index)} prompts; the subspace statistics need at least 4"
            )
    return groups


def run_subspace(config: SubspaceConfig, out=None, force: bool = False, lm=None):
    """``rloop subspace``: returns (run_dir, already_complete, headline)."""
    _check(config)
    prepared = prepare(config, [config.recursive_group, config.baseline_group], lm)
    lm = prepared.lm
    layer = prepared.late if config.layer is None else config.layer
    lm.adapter.check_layer(layer)
    relay = layer_list(lm.adapter, config.layers)
    prompts = list(prepared.prompts)
    groups = _groups_of(prompts, config)
    d = point_width(lm.adapter, config.point)
    if config.k > min(d, config.window * min(len(i) for i in groups.values())):
        raise ConfigError(
            f"--k {config.k} is larger than the window rows or the width ({d}); use a smaller --k"
        )

    def body(run) -> dict:
        record_inputs(
            run, prepared, subspace={"layer": layer, "point": config.point, "k": config.k}
        )
        started = time.perf_counter()
        windows = capture_windows(
            lm,
            prompts,
            sorted(set(relay) | {layer}),
            config.point,
            config.window,
            config.batch_size,
        )
        spectra, shares, bases = _group_tables(windows[layer], groups, prompts, config.k)
        rec = windows[layer][groups[config.recursive_group]]
        base = windows[layer][groups[config.baseline_group]]
        angles, extra = _angle_table(rec, base, config.k, config)
        halves = split_half_overlap(rec, config.k, n_splits=config.n_splits, seed=config.seed)
        stability = pd.DataFrame([{"group": config.recursive_group, **halves.to_dict()}])
        tops = [
            top_directions(windows[lay][groups[config.recursive_group]], config.k).directions
            for lay in relay
        ]
        curve = layer_to_layer_overlap(tops).numpy() if len(relay) > 1 else np.array([])
        relay_table = (
            pd.DataFrame({"layer": relay[:-1], "next_layer": relay[1:], "overlap": curve})
            if len(relay) > 1
            else pd.DataFrame()
        )
        readout = readout_table(lm, config.point, layer, bases, config.readout_top_n)
        seconds = time.perf_counter() - started
        for name, table in (
            ("spectra", spectra),
            ("prompt_shares", shares),
            ("angles", angles),
            ("stability", stability),
            ("relay", relay_table),
            ("readout", readout),
        ):
            if not table.empty:
                run.write_table(name, table)
        _plots(spectra, angles, relay_table, run.plot_path, config)
        chance = random_overlap(config.k, config.k, int(rec.shape[-1]))
        run.write_summary(
            _markdown(prepared, config, layer, spectra, angles, extra, stability, chance, seconds)
            + _readout_markdown(readout, config.point)
        )
        run.update_manifest(timings={"subspace_s": seconds})
        return {
            "layer": layer,
            "overlap_rec_base": extra["overlap"],
            "chance_overlap": chance,
            "first_angle": float(angles["radians"].iloc[0]),
            "first_angle_p_vs_null": float(angles["p_vs_null"].iloc[0]),
            "split_half_overlap": float(np.mean(halves.overlaps.numpy())),
        }

    return execute(EXPERIMENT, config.to_dict(), lm.name, out, body, force=force).as_tuple()


def _plots(spectra, angles, relay_table, plot_path, config) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for group, frame in spectra.groupby("group"):
        ax.plot(frame["direction"], frame["variance_share"], marker="o", label=group)
    ax.set_xlabel("direction")
    ax.set_ylabel("share of squared norm")
    ax.set_title(f"Top-{config.k} spectrum of {config.point} windows")
    ax.legend()
    _save(fig, plot_path("spectra"))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(
        angles["angle"],
        angles["radians"],
        # a percentile interval need not contain the full-sample angle: clip the bars at 0
        yerr=[
            (angles["radians"] - angles["ci_low"]).clip(lower=0),
            (angles["ci_high"] - angles["radians"]).clip(lower=0),
        ],
        marker="o",
        capsize=3,
        label="recursive vs baseline",
    )
    ax.plot(angles["angle"], angles["null_mean"], ls="--", label="baseline halves (null)")
    ax.set_xlabel("principal angle")
    ax.set_ylabel("radians")
    ax.legend()
    _save(fig, plot_path("principal_angles"))
    if not relay_table.empty:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(relay_table["layer"], relay_table["overlap"], marker="o")
        ax.set_xlabel("layer l (overlap with l + 1)")
        ax.set_ylabel("top-k subspace overlap")
        _save(fig, plot_path("relay"))


def _markdown(prepared, config, layer, spectra, angles, extra, stability, chance, seconds) -> str:
    top = spectra.groupby("group")["variance_share"].sum().rename("top_k_share").reset_index()
    return (
        "\n".join(
            [
                "# Contracted subspace",
                "",
                f"- model: {model_line(prepared.lm)}",
                f"- hook point `{config.point}` at layer {layer}, window {config.window}, k = {config.k} (heads flattened, uncentred)",
                f"- overlap of the {config.recursive_group} and {config.baseline_group} subspaces: {extra['overlap']:.3f} (chance for random subspaces: {chance:.3f})",
                f"- time: {seconds:.1f} s",
                "",
                "## Share of the squared norm in the top-k directions",
                "",
                markdown_table(top),
                "",
                "## Principal angles (bootstrap CI over prompts; null: random halves of the baseline)",
                "",
                markdown_table(angles),
                "",
                "## Split-half stability",
                "",
                markdown_table(stability),
            ]
        )
        + "\n"
    )


def _readout_markdown(readout: pd.DataFrame, point: str, shown: int = 5) -> str:
    """The read-out section of summary.md: the first tokens of each group's directions."""
    if readout.empty:
        return f"\nNo logit-lens read-out: `{point}` is not written into the residual stream.\n"
    label = "token" if "token" in readout.columns else "token_id"
    top = readout[readout["rank"] < shown]
    lines = (
        top.groupby(["group", "direction", "sign"], sort=True)[label]
        .agg(lambda values: " · ".join(repr(str(v)).replace("|", "\\|") for v in values))
        .rename("tokens")
        .reset_index()
    )
    return (
        "\n## Logit-lens read-out (final norm + unembedding; table `readout`)\n\n"
        + markdown_table(lines)
        + "\n"
    )
