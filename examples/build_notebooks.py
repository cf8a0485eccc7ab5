"""Write the example notebooks of ``examples/`` (without outputs) from the cells below.

    python examples/build_notebooks.py

Edit the cells here, not the ``.ipynb`` files: this script is their source, and
``tests/test_examples.py`` executes what it writes. Each notebook runs on the embedded model
(smollm2-135m) in under 3 minutes on a 2-core CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def md(text: str) -> nbformat.NotebookNode:
    return new_markdown_cell(text.strip("\n"))


def code(text: str) -> nbformat.NotebookNode:
    return new_code_cell(text.strip("\n"))


LOAD = """
{imports}
import rloop

lm = rloop.load("smollm2-135m")  # the embedded model: offline, ~1 s after the first load
adapter = lm.adapter
print(f"{lm.name}: {adapter.family}, {adapter.n_layers} layers, {adapter.n_heads} heads")
"""


def load_cell(*imports: str) -> nbformat.NotebookNode:
    """The notebook's imports and ``rloop.load`` of the embedded model."""
    lines = "\n".join(imports) + "\n\n" if imports else ""
    return code(LOAD.replace("{imports}\n", lines))


PLT, PD = "import matplotlib.pyplot as plt", "import pandas as pd"

# ---------------------------------------------------------------------------- 1. contraction

CONTRACTION = [
    md(
        """
# R_V contraction on your own prompts

R_V compares how many directions the attention **value vectors** spread over at a late layer
with an early one: the participation ratio PR = (Σσ²)² / Σσ⁴ of the singular values of the
last W real tokens' V, late over early. R_V < 1 means the late layer's values live in fewer
effective dimensions.

This notebook measures R_V on prompts you write yourself, contrasts a recursive
(self-referential) group with its structural twins and with a factual baseline, and then
recomputes one number by hand from captured activations. About a minute on a laptop CPU.
"""
    ),
    load_cell(PLT, PD),
    md(
        """
## Your prompts

A contrast between two groups measures *everything* that differs between them, so the best
design is the **minimal pair**: each recursive prompt gets a twin with the same syntax and
about the same length that is not about itself, linked by `pair_id`. A factual baseline
group is kept for comparison.

Prompts can be a file path (CSV / JSON / JSONL / TXT), a DataFrame, a list of strings or a
dict `group -> list of strings`. Every prompt needs at least W = 16 real tokens (the window).
"""
    ),
    code(
        """
recursive = {
    "p1": "Notice how this sentence is being read by you right now, and notice the noticing itself as it happens.",
    "p2": "As I write this answer I am watching myself write it, and watching that watching unfold word by word.",
    "p3": "This thought is thinking about itself: it turns back on its own shape and asks what is doing the asking.",
    "p4": "The reply you are reading describes the process that is producing the reply you are reading at this moment.",
    "p5": "Attend to the attention that attends to these words, and then to whatever is attending to that attention.",
    "p6": "I am generating a description of how I am generating this very description, one token after another.",
}
twins = {
    "p1": "Notice how this river is being crossed by the herd right now, and notice the current itself as it moves.",
    "p2": "As the baker shapes this loaf she is checking the oven heat, and checking the timer on the wall nearby.",
    "p3": "This bridge is carrying heavy trucks: it bends under their weight and holds what the engineers expected.",
    "p4": "The letter the clerk is stamping describes the parcel that is leaving the depot on the truck this morning.",
    "p5": "Listen to the rain that falls on these roofs, and then to the gutters that carry the water down to the street.",
    "p6": "The farmer is planting a row of beans beside the row of peas she planted last spring, one seed after another.",
}
baseline = [
    "The Amazon river carries more water than any other river on Earth and drains a large part of South America.",
    "Photosynthesis in green plants turns carbon dioxide and water into sugar and oxygen using the energy of sunlight.",
    "The Great Wall of China was built and rebuilt over many centuries to protect northern borders from invasions.",
    "Copper conducts electricity well, which is why most household wiring is made from thin strands of copper metal.",
    "Mount Kilimanjaro in Tanzania is the highest mountain in Africa and has glaciers near its volcanic summit.",
    "The printing press spread across Europe in the fifteenth century and made books far cheaper to produce.",
]
prompts = pd.DataFrame(
    [{"group": "rec", "pair_id": k, "text": t} for k, t in recursive.items()]
    + [{"group": "rec_twin", "pair_id": k, "text": t} for k, t in twins.items()]
    + [{"group": "base", "text": t} for t in baseline]
)
prompts["n_tokens"] = [len(lm.tokenizer(t)["input_ids"]) for t in prompts["text"]]
prompts.groupby("group")["n_tokens"].describe()[["count", "min", "mean", "max"]]
"""
    ),
    md(
        """
## Measure

`rloop.contraction` takes the CLI's settings by name. The layers are given explicitly here
(5 and 25 of 30, the depth-fraction defaults); both PR modes are computed: **per-head** (PR of
each KV head's window, averaged over heads) and **whole** (PR of all heads' values together).
The result is a run directory under `rloop-runs/`; running the cell again reuses it.
"""
    ),
    code(
        """
result = rloop.contraction(
    lm,
    prompts=prompts.drop(columns="n_tokens"),
    recursive_group="rec",
    baseline_group="base",
    twin_group="rec_twin",
    layers=[5, 25],
    window=16,
    n_boot=500,
)
result  # in Jupyter: the headline numbers and the summary
"""
    ),
    code(
        """
result["groups"]  # R_V per group and PR mode: n, mean, sd, bootstrap CI over prompts
"""
    ),
    code(
        """
# The paired contrast (recursive - twin, per pair): mean difference, d_z with CI, exact tests
columns = ["pr_mode", "n_pairs", "mean_diff", "mean_diff_ci_low", "mean_diff_ci_high", "d_z"]
result["paired"][[*columns, "wilcoxon_p", "sign_flip_p"]]
"""
    ),
    code(
        """
result.plot("r_v_by_group");
"""
    ),
    md(
        """
## Where does the contraction appear? PR at every layer

One forward pass captured V at every layer, so the whole profile is in the `profile` table.
"""
    ),
    code(
        """
profile = result["profile"]
per_head = profile[profile["pr_mode"] == "per-head"]
fig, ax = plt.subplots(figsize=(7, 3.5))
for group, rows in per_head.groupby("group"):
    mean = rows.groupby("layer")["pr"].mean()
    ax.plot(mean.index, mean.values, marker=".", label=group)
ax.axvline(5, color="grey", lw=0.5)
ax.axvline(25, color="grey", lw=0.5)
ax.set(xlabel="layer", ylabel="PR of V (per-head mean)", title="PR profile by group")
ax.legend();
"""
    ),
    md(
        """
## Too-short prompts are refused, by name

rloop never shrinks the window silently: a prompt with fewer than W real tokens stops the run
before anything is computed or written.
"""
    ),
    code(
        """
from rloop.errors import RloopError

try:
    rloop.contraction(
        lm,
        prompts={"rec": ["Look at yourself."], "base": baseline},
        recursive_group="rec",
        baseline_group="base",
        twin_group=None,
    )
except RloopError as err:
    print(type(err).__name__, "-", err)
"""
    ),
    md(
        """
## The same number by hand

The measurement pieces compose directly: capture V at two layers in one forward pass that
stops after the late layer, take the last 16 real tokens, and compute the PR ratio.
"""
    ),
    code(
        """
from rloop.capture import Trace
from rloop.capture.batching import encode, gather_windows
from rloop.metrics import r_v, window_pr

text = recursive["p1"]
batch = encode(lm.tokenizer, [text], lm.device)  # right-padded, with real-token counts
with Trace(lm.model, lm.adapter, capture=["blocks.5.v", "blocks.25.v"], stop_after_layer=25) as tr:
    lm.model(**batch.model_inputs(), use_cache=False)
late = gather_windows(tr["blocks.25.v"], batch.n_tokens, 16)  # (1, 16, kv_heads, head_dim)
early = gather_windows(tr["blocks.5.v"], batch.n_tokens, 16)
by_hand = float(r_v(window_pr(late, "per-head"), window_pr(early, "per-head"))[0])

rows = result["results"]
from_run = rows[(rows["group"] == "rec") & (rows["pr_mode"] == "per-head")]["r_v"].iloc[0]
print(f"by hand {by_hand:.6f}   from the run {from_run:.6f}")
assert abs(by_hand - from_run) < 1e-4
"""
    ),
    md(
        """
## Share it

The run directory holds `manifest.json` (model, revision, weights hash, prompts hash, layers,
versions), tidy tables as Parquet and CSV, `summary.md`, plots and `report.html`, a
self-contained page that opens offline. `rloop report` builds a site over all runs.
"""
    ),
    code(
        """
print(result.path)
print(sorted(p.name for p in result.path.iterdir() if p.is_file()))
"""
    ),
]

# ---------------------------------------------------------------------------- 2. heads

HEADS = [
    md(
        """
# Which heads matter? Sweep, group ablation, attribution

Three ways to ask which attention heads produce the R_V contraction, from exact to cheap:

1. **The exact sweep** (`rloop.ablate`): remove each head (zero ablation at the input of the
   output projection) and measure R_V again, every head of the chosen layers, batched.
2. **Group ablation** (`rloop.ablate_group`): remove the top heads of the sweep *together* and
   compare with random head sets of the same size — is the group special, or would any heads do?
3. **Attribution patching** (`rloop.attribution`): a gradient (linear) estimate of every head's
   effect in one backward pass per batch, checked against the exact sweep.

Small settings (4 prompts, 7 layers) keep it to about a minute on a CPU.
"""
    ),
    load_cell(PLT),
    md(
        """
## 1. The exact sweep

R_V is measured at layers 5 and 25. A head at layer 25 or later cannot change V at layer 25
(causality), so the sweep covers layers 18–24. The `heads` table has each head's mean impact
on R_V with a bootstrap CI, p-values adjusted across all heads (Benjamini–Hochberg) and a
noise floor.
"""
    ),
    code(
        """
LAYERS = list(range(18, 25))
sweep = rloop.ablate(lm, layers=LAYERS, measure_layers=[5, 25], max_prompts=4, n_boot=500)
sweep  # headline: noise floor, top head, heads significant after BH
"""
    ),
    code(
        """
sweep["heads"].sort_values("rank").head(8)[
    ["layer", "head", "mean_impact", "ci_low", "ci_high", "p_bh", "above_noise", "rank"]
]
"""
    ),
    code(
        """
sweep.plot("impact_heatmap");
"""
    ),
    md(
        """
## 2. The top heads together, against random heads

`from_sweep` takes the sweep's result (or its run directory); the top 5 heads by absolute
impact are ablated together, then 10 random sets of 5 heads from the same layers.
"""
    ),
    code(
        """
group = rloop.ablate_group(
    lm, from_sweep=sweep, top_k=5, n_random=10, measure_layers=[5, 25], max_prompts=4, n_boot=500
)
columns = ["n", "r_v_clean", "r_v_ablated", "mean_change", "ci_low", "ci_high"]
group["summary"][[*columns, "random_mean_change", "random_p"]]
"""
    ),
    code(
        """
group.plot("group_vs_random");
"""
    ),
    md(
        """
## 3. Attribution patching vs the exact sweep

The linear estimate is cheap enough for every head of a large model; how well it ranks heads
is checked here against the exact sweep (Spearman correlation with a bootstrap CI, overlap of
the top 10).
"""
    ),
    code(
        """
attr = rloop.attribution(
    lm, from_sweep=sweep, layers=LAYERS, measure_layers=[5, 25], max_prompts=4, n_boot=500
)
attr["agreement"]
"""
    ),
    code(
        """
heads = attr["heads"]
fig, ax = plt.subplots(figsize=(4.5, 4))
ax.scatter(heads["exact_mean"], heads["attribution_mean"], s=12)
ax.axhline(0, color="grey", lw=0.5)
ax.axvline(0, color="grey", lw=0.5)
ax.set(xlabel="exact ablation impact on R_V", ylabel="attribution estimate")
ax.set_title("one point per head");
"""
    ),
    md(
        """
## Before you conclude

Zero, mean and resample ablation answer different questions: repeat the sweep with
`mode="mean"` (the mean over a named reference set, recorded in the manifest) before calling
any head a "hero head" — or concluding there is none. With 4 prompts nothing here is
significant; the defaults of `rloop ablate` use more.
"""
    ),
]

# ---------------------------------------------------------------------------- 3. kv + validate

KV = [
    md(
        """
# KV-cache patching and the 4-phase validation

**KV-cache patching** runs a baseline (target) prompt with the key/value cache of a recursive
(source) prompt substituted — or mixed, (1 − α)·KV_target + α·KV_source in float32 — at a
range of layers, then generates. R_V is measured on the generated tokens' window and the text
is scored for self-referential behaviour. If the source's geometry *and* behaviour follow the
cache, the cache carries the effect.

The two caches are right-aligned on their last token, with the same positions in every layer
and the target's mask (see `rloop.interventions.kv_cache`).

**`rloop.validate`** chains four phases with verdicts computed from thresholds in its config:
(1) the R_V contrast, (2) a V-patching null, (3) KV patching, (4) the α dose-response.

A handful of pairs and 16 generated tokens keep this to a few minutes on a CPU; the numbers
are a demonstration, not a result — the command-line defaults use more pairs and tokens.
"""
    ),
    load_cell(PD),
    md(
        """
## A small prompt set from the shipped bank

Six recursive prompts (`L5`), their minimal-pair twins (`L5_twin`) and six factual prompts.
"""
    ),
    code(
        """
from rloop.prompts import load_bank

bank = pd.DataFrame([vars(p) for p in load_bank()])
recursive = bank[bank["group"] == "L5"].head(6)
twins = bank[(bank["group"] == "L5_twin") & bank["pair_id"].isin(recursive["pair_id"])]
factual = bank[bank["group"] == "factual"].head(6)
small = pd.concat([recursive, twins, factual])[["id", "group", "pair_id", "text"]]
small.groupby("group").size()
"""
    ),
    md(
        """
## KV patching with α mixing

Layers 15–29 (the second half of the model), α = 0, 0.5, 1, three (factual target, recursive
source) pairs. The natural runs of target and source and a V-patch are added as references.
"""
    ),
    code(
        """
kv = rloop.kv_patch(
    lm,
    prompts=small,
    ranges=["15-29"],
    alphas=[0.0, 0.5, 1.0],
    n_pairs=3,
    max_new_tokens=16,
    layers=[5, 25],
    n_boot=500,
)
kv["transfer"][
    ["condition", "metric", "n", "mean", "gap", "noise", "transfer_pct", "transfer_undefined"]
]
"""
    ),
    md(
        """
"Transfer %" divides by the gap between the natural source and target. When that gap is
within noise the ratio means nothing, and rloop says so in `transfer_undefined` instead of
printing a number.
"""
    ),
    code(
        """
kv["generations"][["condition", "alpha", "r_v_generated", "score", "text"]].head(6)
"""
    ),
    code(
        """
kv.plot("dose_response_15-29");
"""
    ),
    md(
        """
## The 4-phase validation

Settings override the shipped TOML config (`src/rloop/configs/validate_default.toml`); pass
your own with `config="my.toml"`.
"""
    ),
    code(
        """
validation = rloop.validate(
    lm, prompts=small, n_pairs=3, max_new_tokens=16, n_boot=500, alphas=[0.0, 0.5, 1.0]
)
validation  # headline: one verdict per phase
"""
    ),
    code(
        """
validation["verdicts"]
"""
    ),
    code(
        """
print(validation.summary()[:1500])
"""
    ),
]

NOTEBOOKS = {
    "01_contraction_on_your_prompts.ipynb": CONTRACTION,
    "02_which_heads_matter.ipynb": HEADS,
    "03_kv_patching_and_validation.ipynb": KV,
}


def build(directory: Path = HERE) -> list[Path]:
    """Write every notebook into ``directory``; returns their paths."""
    written = []
    for name, cells in NOTEBOOKS.items():
        for number, cell in enumerate(cells):
            cell["id"] = f"cell-{number:02d}"  # stable ids: a rebuild changes only what changed
        notebook = new_notebook(
            cells=cells,
            metadata={
                "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                "language_info": {"name": "python"},
            },
        )
        nbformat.validate(notebook)
        path = directory / name
        nbformat.write(notebook, path)
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    for path in build(target):
        print(path)
