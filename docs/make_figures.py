"""Make the figures of the docs (``docs/figures/*.png``) from real, small runs.

    python docs/make_figures.py [NAME ...]      # all figures, or only the named ones

Every command page shows one figure; each comes from the command printed on that page, run
here on the embedded model (smollm2-135m) with a small prompt file cut from the shipped bank,
except ``scaling`` and ``checkpoints``, which need several models and run on random-weight
8-layer Llamas built here (their pages say so). ``models``, ``runs`` and ``report`` show the
terminal output or the report site, captured with headless Chromium. Figures are shrunk to
at most 900 px wide and 256 colours, so each stays well under 200 KB. Takes about 20 minutes
on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from html import escape
from pathlib import Path

from PIL import Image

DOCS = Path(__file__).resolve().parent
FIGURES = DOCS / "figures"
MAX_WIDTH = 900
MAX_BYTES = 200_000
RLOOP = str(Path(sys.executable).with_name("rloop"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# The prompt file: 8 recursive prompts (L5), their twins (L5_twin), 8 factual ones.
N_PER_GROUP = 8

SMALL = ["--prompts", "{prompts}", "--max-prompts", "4", "--n-boot", "500"]
# name: (command arguments after `rloop`, plot to show; None: a screenshot of report.html)
RUNS: dict[str, tuple[list[str], str | None]] = {
    "contraction": (
        ["contraction", "--prompts", "{prompts}", "--twin-group", "L5_twin", "--n-boot", "500"],
        "pr_profile",
    ),
    "robustness": (
        ["robustness", *SMALL, "--twin-group", "L5_twin", "--layer-step", "3"]
        + ["--windows", "8,16", "--n-perm", "200"],
        "spec_curve",
    ),
    "ablate": (["ablate", *SMALL, "--groups", "L5", "--layers", "18-24"], "impact_heatmap"),
    "ablate-group": (
        ["ablate-group", *SMALL, "--groups", "L5", "--from-sweep", "{runs}/ablate"]
        + ["--top-k", "5", "--n-random", "10"],
        "group_vs_random",
    ),
    "ablate-layer": (
        ["ablate-layer", *SMALL, "--groups", "L5", "--layers", "0-24", "--component", "both"],
        "layer_ablation",
    ),
    "attn-vs-mlp": (["attn-vs-mlp", *SMALL], "attn_vs_mlp"),
    "heads": (["heads", *SMALL, "--layers", "18-24"], "pr_z_effect"),
    "saliency": (["saliency", *SMALL, "--groups", "L5"], "saliency"),
    "patch": (["patch", *SMALL, "--heads", "20.3,21.7,24.6"], "patching"),
    "attribution": (
        ["attribution", *SMALL, "--groups", "L5", "--from-sweep", "{runs}/ablate"]
        + ["--layers", "18-24"],
        "attribution_vs_exact",
    ),
    "gain": (["gain", "--prompts", "{prompts}", "--n-boot", "500"], "h25"),
    "temporal": (["temporal", "--prompts", "{prompts}", "--max-new-tokens", "24"], "temporal_r_v"),
    "kv-patch": (
        ["kv-patch", "--prompts", "{prompts}", "--n-pairs", "4", "--ranges", "15-29;25"]
        + ["--alphas", "0,0.5,1", "--max-new-tokens", "16"],
        "transfer",
    ),
    "validate": (["validate", "--n-pairs", "4", "--max-new-tokens", "16"], "dose_response"),
    "verify": (["verify"], None),
    "subspace": (["subspace", "--prompts", "{prompts}", "--n-boot", "500"], None),
    "steer": (
        ["steer", "--prompts", "{prompts}", "--max-prompts", "4", "--alphas", "0,0.5,1"]
        + ["--n-random", "2", "--max-new-tokens", "16", "--n-boot", "500"],
        None,
    ),
    "sae": (
        ["sae", "train", "--prompts", "{prompts}", "--d-sae", "256", "--steps", "300"]
        + ["--continuation-tokens", "0"],
        None,
    ),
    "scaling": (
        ["scaling", "--models", "{tiny}/d64,{tiny}/d128,{tiny}/d256", "--prompts", "{prompts}"]
        + ["--layers", "1,6", "--window", "8", "--n-boot", "500"],
        None,
    ),
    "checkpoints": (
        ["checkpoints", "--checkpoint-dirs", "{tiny}/step0,{tiny}/step1000,{tiny}/step5000"]
        + ["--prompts", "{prompts}", "--layers", "1,6", "--window", "8", "--n-boot", "500"],
        None,
    ),
}
TERMINAL = {"models": ["models"], "runs": ["runs", "list"]}


def write_prompts(path: Path) -> Path:
    """L5 prompts, their twins and factual prompts from the shipped bank, as JSONL."""
    from rloop.prompts import load_bank  # noqa: PLC0415 - heavy; only when figures are made

    bank = list(load_bank())
    recursive = [p for p in bank if p.group == "L5"][:N_PER_GROUP]
    pair_ids = {p.pair_id for p in recursive}
    twins = [p for p in bank if p.group == "L5_twin" and p.pair_id in pair_ids]
    factual = [p for p in bank if p.group == "factual"][:N_PER_GROUP]
    lines = [
        json.dumps({"id": p.id, "group": p.group, "pair_id": p.pair_id, "text": p.text})
        for p in [*recursive, *twins, *factual]
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_tiny_models(directory: Path) -> None:
    """Random-weight 8-layer Llamas with the embedded tokenizer: three widths (scaling) and
    three seeds named like checkpoints (checkpoints)."""
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: PLC0415

    from rloop.models import load_model  # noqa: PLC0415

    tokenizer = load_model("smollm2-135m").tokenizer
    specs = {"d64": (64, 0), "d128": (128, 0), "d256": (256, 0)}
    specs |= {"step0": (128, 1), "step1000": (128, 2), "step5000": (128, 3)}
    for name, (width, seed) in specs.items():
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=8,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        AutoModelForCausalLM.from_config(config).save_pretrained(directory / name)
        tokenizer.save_pretrained(directory / name)


def shrink(source: Path, target: Path) -> Path:
    """``source`` as a PNG of at most MAX_WIDTH px and 256 colours at ``target``."""
    image = Image.open(source).convert("RGB")
    if image.width > MAX_WIDTH:
        height = round(image.height * MAX_WIDTH / image.width)
        image = image.resize((MAX_WIDTH, height), Image.Resampling.LANCZOS)
    image = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    target.parent.mkdir(parents=True, exist_ok=True)
    image.save(target, optimize=True)
    size = target.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{target} is {size} bytes, over {MAX_BYTES}")
    return target


def screenshot(url: str, target: Path, width: int = 1200, height: int = 900) -> Path:
    """A headless-Chromium screenshot of ``url`` (network off), shrunk into ``target``."""
    if CHROMIUM is None:
        raise SystemExit("chromium is not installed: apt-get install chromium")
    raw = target.with_suffix(".raw.png")
    subprocess.run(
        [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--proxy-server=127.0.0.1:9",
            f"--window-size={width},{height}",
            "--virtual-time-budget=8000",
            f"--screenshot={raw}",
            url,
        ],
        check=True,
        capture_output=True,
    )
    try:
        return shrink(raw, target)
    finally:
        raw.unlink()


def terminal_figure(args: list[str], env: dict, work: Path, name: str) -> Path:
    """The output of ``rloop ARGS`` as a terminal-like page, screenshotted."""
    done = subprocess.run(
        [RLOOP, *args],
        env={**env, "COLUMNS": "150"},
        capture_output=True,
        text=True,
        check=True,
    )
    lines = [f"$ rloop {' '.join(args)}", *done.stdout.rstrip().splitlines()]
    page = work / f"{name}.html"
    page.write_text(
        "<html><body style='margin:0;background:#1e1e1e'><pre style='margin:0;padding:16px;"
        "color:#ddd;font:14px/1.35 monospace'>" + escape("\n".join(lines)) + "</pre></body></html>",
        encoding="utf-8",
    )
    return screenshot(page.as_uri(), FIGURES / f"{name}.png", 1300, 40 + 19 * len(lines))


def run_command(name: str, args: list[str], env: dict, fill: dict[str, str]) -> Path:
    """Run ``rloop ARGS --out RUNS/NAME`` (``sae train`` writes its SAE there too)."""
    out = Path(fill["runs"]) / name
    filled = [a.format(**fill) for a in args]
    print(f"$ rloop {' '.join(filled)}", flush=True)
    done = subprocess.run([RLOOP, *filled, "--out", str(out)], env=env, check=False)
    if done.returncode not in (0, 3):  # 3: a sweep finished with some failed jobs
        raise SystemExit(f"rloop {name} failed with exit code {done.returncode}")
    return out


def figure_of_run(name: str, run_dir: Path, plot: str | None) -> Path:
    target = FIGURES / f"{name}.png"
    plots = sorted((run_dir / "plots").glob("*.png"))
    if plot is not None and (run_dir / "plots" / f"{plot}.png").is_file():
        return shrink(run_dir / "plots" / f"{plot}.png", target)
    if plot is not None:
        print(f"{name}: no plot {plot!r}; plots: {[p.stem for p in plots]}", flush=True)
    if plots:
        return shrink(plots[0], target)
    return screenshot((run_dir / "report.html").as_uri(), target)  # no plot: the run's page


def main(wanted: list[str]) -> None:
    # RLOOP_DOCS_WORK: reuse the runs of an earlier call (complete runs are not recomputed)
    work = Path(os.environ.get("RLOOP_DOCS_WORK") or tempfile.mkdtemp(prefix="rloop-docs-"))
    work.mkdir(parents=True, exist_ok=True)
    runs, tiny = work / "runs", work / "tiny"
    env = {**os.environ, "RLOOP_RUNS": str(runs), "RLOOP_PROGRESS": "0"}
    fill = {"prompts": str(write_prompts(work / "prompts.jsonl")), "runs": str(runs)}
    fill["tiny"] = str(tiny)
    names = wanted or [*RUNS, "report", *TERMINAL]
    if {"scaling", "checkpoints"} & set(names) and not tiny.is_dir():
        write_tiny_models(tiny)
    if {"ablate-group", "attribution"} & set(names) and "ablate" not in names:
        names = ["ablate", *names]  # they read the sweep
    for name in names:
        if name in RUNS:
            args, plot = RUNS[name]
            print(figure_of_run(name, run_command(name, args, env, fill), plot), flush=True)
    if "report" in names:
        site = work / "site"
        subprocess.run([RLOOP, "report", "--runs", str(runs), "--out", str(site)], env=env)
        print(screenshot((site / "index.html").as_uri(), FIGURES / "report.png", 1300, 900))
    for name, args in TERMINAL.items():
        if name in names:
            print(terminal_figure(args, env, work, name))
    print(f"runs kept in {runs}")


if __name__ == "__main__":
    main(sys.argv[1:])
