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
