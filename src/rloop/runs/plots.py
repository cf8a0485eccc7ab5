"""Plots (PNG, matplotlib Agg) shared by the experiments. Each function writes one file."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def r_v_by_group(results: pd.DataFrame, path: Path) -> Path:
    """Strip + box plot of R_V per prompt group, one panel per PR mode."""
    modes = sorted(results["pr_mode"].unique())
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        frame = results[results.pr_mode == mode]
        groups = sorted(frame["group"].unique())
        data = [frame.loc[frame.group == g, "r_v"].dropna().to_numpy() for g in groups]
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(groups) + 1), groups)
        rng = np.random.default_rng(0)
        for i, values in enumerate(data, start=1):
            ax.scatter(i + rng.uniform(-0.15, 0.15, len(values)), values, s=10, alpha=0.6)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        e, late = int(frame.layer_early.iloc[0]), int(frame.layer_late.iloc[0])
        ax.set_title(f"R_V = PR(L{late}) / PR(L{e}), {mode}")
        ax.set_ylabel("R_V")
        ax.tick_params(axis="x", rotation=45)
    return _save(fig, path)


def pr_profile(profile: pd.DataFrame, path: Path, early: int, late: int) -> Path:
    """Mean PR by layer per group (shaded: +-1 standard error), one panel per PR mode."""
    modes = sorted(profile["pr_mode"].unique())
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        frame = profile[profile.pr_mode == mode]
        stats = frame.groupby(["group", "layer"])["pr"].agg(["mean", "sem"]).reset_index()
        colours = plt.get_cmap("tab20")
        for i, (group, g) in enumerate(stats.groupby("group")):
            colour = colours(i % 20)
            ax.plot(g["layer"], g["mean"], label=group, lw=1.2, color=colour)
            ax.fill_between(
                g["layer"], g["mean"] - g["sem"], g["mean"] + g["sem"], alpha=0.15, color=colour
            )
        for layer in (early, late):
            ax.axvline(layer, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("layer")
        ax.set_ylabel("participation ratio")
        ax.set_title(f"PR by layer ({mode})")
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def effect_by_layer(sweep: pd.DataFrame, path: Path) -> Path:
    """Hedges' g of R_V (recursive vs baseline) against the late layer, with bootstrap CI."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, frame in sweep.groupby("pr_mode"):
        ax.plot(frame["layer_late"], frame["hedges_g"], marker="o", ms=3, label=mode)
        ax.fill_between(
            frame["layer_late"], frame["hedges_g_ci_low"], frame["hedges_g_ci_high"], alpha=0.15
        )
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("late layer")
    ax.set_ylabel("Hedges' g (recursive - baseline)")
    ax.set_title("Effect size of R_V by late layer")
    ax.legend()
    return _save(fig, path)


def heatmap(
    matrix: np.ndarray,
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
    row_labels=None,
    col_labels=None,
    center: bool = True,
) -> Path:
    """A labelled heatmap (e.g. layer x head); diverging colours centred on 0 if ``center``."""
    fig, ax = plt.subplots(
        figsize=(max(5, 0.35 * matrix.shape[1] + 2), max(4, 0.3 * matrix.shape[0] + 1))
    )
    finite = np.abs(matrix[np.isfinite(matrix)])
    vmax = float(finite.max()) if finite.size else 1.0
    kwargs = {"cmap": "RdBu_r", "vmin": -vmax, "vmax": vmax} if center else {"cmap": "viridis"}
    image = ax.imshow(matrix, aspect="auto", **kwargs)
    fig.colorbar(image, ax=ax)
    if row_labels is not None:
        ax.set_yticks(range(len(row_labels)), row_labels)
    if col_labels is not None:
        ax.set_xticks(range(len(col_labels)), col_labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path)


def paired_scatter(pair_values: pd.DataFrame, path: Path) -> Path:
    """R_V of each recursive prompt against its structural twin (one point per pair, one
    colour per paired contrast), with the identity line; one panel per PR mode. Points below
    the line contract more than their twin."""
    modes = sorted(pair_values["pr_mode"].unique())
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        frame = pair_values[pair_values.pr_mode == mode]
        for label, pairs in frame.groupby(["recursive_group", "twin_group"], sort=False):
            ax.scatter(pairs["r_v_twin"], pairs["r_v_recursive"], s=14, alpha=0.7,
                       label=f"{label[0]} vs {label[1]}")  # fmt: skip
        values = frame[["r_v_twin", "r_v_recursive"]].to_numpy(dtype=float)
        finite = values[np.isfinite(values)]
        if finite.size:
            low, high = float(finite.min()), float(finite.max())
            ax.plot([low, high], [low, high], color="grey", lw=0.8, ls="--")
        ax.set_xlabel("R_V of the twin")
        ax.set_ylabel("R_V of the recursive prompt")
        ax.set_title(f"Minimal pairs ({mode})")
        ax.legend(fontsize=7)
    return _save(fig, path)


def covariate_scatter(
    frame: pd.DataFrame, covariates: list[str], path: Path, outcome: str = "r_v"
) -> Path:
    """A grid of ``outcome`` against each covariate: one row per PR mode, one column per
    covariate, one colour per prompt family. ``frame`` has pr_mode, family, the outcome and
    the covariate columns (one row per prompt x mode)."""
    modes = sorted(frame["pr_mode"].unique())
    families = sorted(frame["family"].astype(str).unique())
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(
        len(modes),
        len(covariates),
        figsize=(2.6 * len(covariates) + 1, 2.4 * len(modes) + 0.6),
        squeeze=False,
    )
    for row, mode in enumerate(modes):
        rows = frame[frame.pr_mode == mode]
        for column, covariate in enumerate(covariates):
            ax = axes[row][column]
            for i, family in enumerate(families):
                chosen = rows[rows["family"].astype(str) == family]
                ax.scatter(chosen[covariate], chosen[outcome], s=6, alpha=0.6,
                           color=colours(i % 10), label=family)  # fmt: skip
            ax.set_xlabel(covariate, fontsize=8)
            if column == 0:
                ax.set_ylabel(f"{outcome} ({mode})", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6, markerscale=2)
    fig.suptitle(f"{outcome} against prompt covariates", fontsize=10)
    return _save(fig, path)
