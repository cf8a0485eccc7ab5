"""Null models of the contraction contrast: what the same measurement gives without the thing
being claimed (``rloop contraction --null random-init:K,token-shuffle:K``).

- ``random-init``: K models of the same architecture with random weights
  (``AutoModelForCausalLM.from_config`` of the loaded model's config under
  ``torch.manual_seed(seed_k)``, built on the CPU in float32 and then moved to the loaded
  model's device and dtype), the same tokenizer, the same prompts. An effect a random network
  of this shape also shows comes from the architecture and the prompts' token statistics, not
  from anything learned.
- ``token-shuffle``: the trained model on the same prompts with their words shuffled within
  each prompt (words split on whitespace and joined with single spaces; K seeded shuffles).
  Same bag of words, no order: an effect that survives comes from which words appear.

Every null repeats the run's main contrast (:class:`MainContrast`: paired recursive vs twin
when the design has minimal pairs, else recursive vs baseline) with the same statistics, on
the prompts of that contrast only. The seeds of the nulls derive from the run seed
(:func:`null_units`) and are recorded in every row, so a null can be rebuilt by hand.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from transformers import AutoModelForCausalLM

from rloop.adapters import adapter_for
from rloop.errors import ConfigError
from rloop.metrics.contrasts import paired_contrast
from rloop.metrics.stats import contrast
from rloop.prompts import PromptSet

RANDOM_INIT = "random-init"
TOKEN_SHUFFLE = "token-shuffle"
NULL_KINDS = (RANDOM_INIT, TOKEN_SHUFFLE)
TRAINED = "trained"  # the ``null`` value of the trained model's own row in the nulls table

NULL_MEANINGS = {
    RANDOM_INIT: (
        "the same architecture (same config, tokenizer, dtype and device) with random weights: "
        "what the contrast is when nothing has been learned. A trained effect inside this "
        "range says the architecture and the prompts' token statistics produce it, not training."
    ),
    TOKEN_SHUFFLE: (
        "the trained model on the same prompts with their words shuffled within each prompt "
        "(whitespace-split words joined with single spaces): the same bag of words without "
        "their order. An effect that survives comes from which words the prompts contain."
    ),
}


@dataclass(frozen=True)
class NullSpec:
    """``count`` nulls of one ``kind`` (one of NULL_KINDS)."""

    kind: str
    count: int

    def text(self) -> str:
        return f"{self.kind}:{self.count}"


def parse_nulls(value: str | Sequence[str] | None, flag: str = "--null") -> list[NullSpec]:
    """The null specs of ``value``: None, "" or "none" = no nulls; else a comma list (or a list)
    of KIND:K items with KIND in NULL_KINDS and K >= 1, each kind at most once. One-line
    ConfigError (naming ``flag``) for anything else."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [str(item).strip() for item in items]
    if items in ([""], ["none"]) or not items:
        return []
    specs: list[NullSpec] = []
    for item in items:
        kind, colon, count_text = item.partition(":")
        kind, count = kind.strip(), count_text if colon else None
        if kind not in NULL_KINDS:
            raise ConfigError(
                f"{flag} {item!r}: unknown null {kind!r}; choose {' or '.join(NULL_KINDS)} "
                f"with a count, e.g. {flag} {RANDOM_INIT}:3,{TOKEN_SHUFFLE}:2"
            )
        if count is None or not count.strip().isdigit() or int(count) < 1:
            got = "no count" if count is None or not count.strip() else f"count {count!r}"
            raise ConfigError(
                f"{flag} {item!r}: give the number of nulls as a positive integer K, "
                f"{kind}:K (e.g. {kind}:3); got {got}"
            )
        if any(spec.kind == kind for spec in specs):
            raise ConfigError(f"{flag}: {kind} is given twice; give each null kind once")
        specs.append(NullSpec(kind, int(count)))
    return specs


def canonical_nulls(value: str | Sequence[str] | None, flag: str = "nulls") -> list[str]:
    """``value`` (as :func:`parse_nulls` reads it) as the config stores it: ["kind:K", ...]."""
    return [spec.text() for spec in parse_nulls(value, flag)]


@dataclass(frozen=True)
class NullUnit:
    """One null model or shuffle: its kind, replicate number (0..K-1) and seed."""

    kind: str
    replicate: int
    seed: int

    @property
    def key(self) -> str:
        """The resume checkpoint of this null in the run directory."""
        return f"null-{self.kind}-{self.replicate:03d}"

    @property
    def label(self) -> str:
        return f"{self.kind} #{self.replicate} (seed {self.seed})"


def null_seed(run_seed: int, kind: str, replicate: int) -> int:
    """The seed of replicate ``replicate`` of null ``kind`` in a run with seed ``run_seed``
    (a 32-bit draw of ``numpy.random.SeedSequence([run_seed, crc32(kind), replicate])``)."""
    sequence = np.random.SeedSequence([int(run_seed), zlib.crc32(kind.encode()), replicate])
    return int(sequence.generate_state(1)[0])


def null_units(nulls: Sequence[str], run_seed: int) -> list[NullUnit]:
    """Every null of the config's ``nulls`` (["kind:K", ...]) with its derived seed."""
    return [
        NullUnit(spec.kind, k, null_seed(run_seed, spec.kind, k))
        for spec in parse_nulls(list(nulls))
        for k in range(spec.count)
    ]


# --------------------------------------------------------------------------- the two nulls


def shuffle_words(text: str, seed: int) -> str:
    """The words of ``text`` (split on whitespace) in a seeded random order, joined with
    single spaces (line breaks and repeated spaces are not kept)."""
    words = text.split()
    order = np.random.default_rng(seed).permutation(len(words))
    return " ".join(words[i] for i in order)


def shuffled_prompt_set(prompt_set: PromptSet, seed: int) -> PromptSet:
    """``prompt_set`` with the words of every prompt shuffled (:func:`shuffle_words`); each
    prompt's shuffle depends only on ``seed`` and its id, so a subset shuffles the same way.
    Ids, groups, pair ids and levels are kept."""
    prompts = [
        dataclasses.replace(prompt, text=shuffle_words(prompt.text, _prompt_seed(seed, prompt.id)))
        for prompt in prompt_set
    ]
    return PromptSet(prompts, prompt_set.source, prompt_set.version, prompt_set.sha256)


def _prompt_seed(seed: int, prompt_id: str) -> int:
    return int(np.random.SeedSequence([seed, zlib.crc32(prompt_id.encode())]).generate_state(1)[0])


def check_random_init_supported(lm) -> None:
    """ConfigError for a model spread over several devices (a random copy is built on one)."""
    device_map = getattr(lm.model, "hf_device_map", None) or {}
    if len({str(device) for device in device_map.values()}) > 1:
        raise ConfigError(
            f"--null {RANDOM_INIT} builds a random copy of the model on one device, but "
            f"{lm.name} is spread over {len(set(map(str, device_map.values())))} devices: "
            f"drop {RANDOM_INIT} or load the model on one device"
        )


def random_init_model(lm, seed: int):
    """A copy of the loaded model ``lm`` (a :class:`rloop.models.LoadedModel`) with random
    weights: ``AutoModelForCausalLM.from_config(config)`` under ``torch.manual_seed(seed)``
    (on the CPU, float32, the loaded model's attention implementation), moved to ``lm``'s
    device and dtype, eval mode, no gradients. The same tokenizer; the adapter of the copy.
    The global torch random state is left as it was."""
    config = copy.deepcopy(lm.model.config)
    attn = getattr(config, "_attn_implementation", None)
    extra = {"attn_implementation": attn} if attn else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **extra)
    model = model.to(device=lm.device, dtype=lm.dtype).eval().requires_grad_(False)
    return dataclasses.replace(
        lm,
        model=model,
        adapter=adapter_for(model),
        name=f"{lm.name} ({RANDOM_INIT}, seed {seed})",
        weights_sha256=f"{RANDOM_INIT}:{seed}",
    )


def free_memory(device) -> None:
    """Collect a dropped random-init copy (models hold reference cycles) and give its GPU
    blocks back to the allocator."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- the contrast


@dataclass(frozen=True)
class MainContrast:
    """The contrast every null repeats: paired (``pairs`` of (recursive id, twin id), the
    difference recursive - twin) or unpaired (``pairs`` empty: recursive vs ``other_group``)."""

    recursive_group: str
    other_group: str
    pairs: tuple[tuple[str, str], ...] = ()

    @property
    def paired(self) -> bool:
        return bool(self.pairs)

    @property
    def effect(self) -> str:
        return "d_z" if self.paired else "hedges_g"

    @property
    def p_test(self) -> str:
        return "sign_flip" if self.paired else "welch"

    @property
    def label(self) -> str:
        kind = "paired" if self.paired else "unpaired"
        return f"{self.recursive_group} vs {self.other_group} ({kind})"

    def prompt_ids(self) -> set[str]:
        return {pid for pair in self.pairs for pid in pair}

    def prompts(self, prompt_set: PromptSet) -> PromptSet:
        """The prompts this contrast reads (the pairs' prompts, or both groups)."""
        if self.paired:
            wanted = self.prompt_ids()
            kept = [p for p in prompt_set if p.id in wanted]
        else:
            groups = (self.recursive_group, self.other_group)
            kept = [p for p in prompt_set if p.group in groups]
        return PromptSet(kept, prompt_set.source, prompt_set.version, prompt_set.sha256)


def main_contrast_row(
    results: pd.DataFrame, main: MainContrast, n_boot: int, n_perm: int, seed: int
) -> dict:
    """The main contrast on per-prompt R_V ``results`` of one pr_mode (prompt_id, group,
    r_v): effect (d_z or Hedges g) with its bootstrap CI, p (sign-flip or Welch), n, mean
    difference, and why any of it is undefined."""
    if main.paired:
        r_v = results.set_index("prompt_id")["r_v"]
        rec = np.array([r_v.get(a, math.nan) for a, _ in main.pairs], dtype=np.float64)
        twin = np.array([r_v.get(b, math.nan) for _, b in main.pairs], dtype=np.float64)
        paired = paired_contrast(rec, twin, n_boot=n_boot, n_perm=n_perm, seed=seed)
        return {
            "value": paired.d_z,
            "ci_low": paired.d_z_ci_low,
            "ci_high": paired.d_z_ci_high,
            "p": paired.sign_flip_p,
            "n": paired.n_pairs,
            "mean_diff": paired.mean_diff,
            "reason": paired.reason,
        }
    rec = results.loc[results.group == main.recursive_group, "r_v"].to_numpy(dtype=np.float64)
    base = results.loc[results.group == main.other_group, "r_v"].to_numpy(dtype=np.float64)
    c = contrast(rec, base, n_boot=n_boot, seed=seed)
    undefined = not math.isfinite(c.hedges_g)
    return {
        "value": c.hedges_g,
        "ci_low": c.hedges_g_ci_low,
        "ci_high": c.hedges_g_ci_high,
        "p": c.welch_p,
        "n": c.n_recursive + c.n_baseline,
        "mean_diff": c.diff,
        "reason": "Hedges g undefined (a group has fewer than 2 finite values or no spread)"
        if undefined
        else None,
    }


NULL_COLUMNS = ["pr_mode", "null", "replicate", "seed", "contrast", "effect", "value", "ci_low",
                "ci_high", "p", "p_test", "n", "mean_diff", "trained_value", "reason"]  # fmt: skip


def null_table(rows: list[dict], main: MainContrast) -> pd.DataFrame:
    """The ``nulls`` table: one row per pr_mode x (trained model, then every null), each row
    with the trained model's value of its mode beside it (``trained_value``)."""
    table = pd.DataFrame(rows)
    table["contrast"] = main.label
    table["effect"] = main.effect
    table["p_test"] = main.p_test
    trained = table[table["null"] == TRAINED].set_index("pr_mode")["value"]
    table["trained_value"] = table["pr_mode"].map(trained)
    for column in ("replicate", "seed"):
        table[column] = table[column].astype("Int64")
    table["reason"] = table["reason"].astype(object)
    return table[NULL_COLUMNS]


@dataclass(frozen=True)
class NullComparison:
    """The trained model's effect against the K nulls of one kind (one pr_mode).

    n_as_extreme: nulls at least as large in magnitude (|null| >= |trained|);
    n_as_far: nulls at least as far in the trained effect's own direction (null <= trained
    for a negative trained effect, null >= trained for a positive one).
    """

    pr_mode: str
    kind: str
    effect: str
    k: int
    k_defined: int
    null_min: float
    null_max: float
    trained: float
    n_as_extreme: int
    n_as_far: int
    position: str  # "below every null" | "above every null" | "inside the null range" | ...


def compare_with_nulls(table: pd.DataFrame) -> list[NullComparison]:
    """One :class:`NullComparison` per pr_mode and null kind of a ``nulls`` table."""
    comparisons = []
    nulls = table[table["null"] != TRAINED]
    for (mode, kind), frame in nulls.groupby(["pr_mode", "null"], sort=False):
        values = frame["value"].to_numpy(dtype=np.float64)
        finite = values[np.isfinite(values)]
        trained = float(frame["trained_value"].iloc[0])
        low = float(finite.min()) if finite.size else math.nan
        high = float(finite.max()) if finite.size else math.nan
        position, extreme, far = "undefined", 0, 0
        if finite.size and math.isfinite(trained):
            position = (
                "below every null" if trained < low
                else "above every null" if trained > high
                else "inside the null range"
            )  # fmt: skip
            extreme = int((np.abs(finite) >= abs(trained)).sum())
            far = int((finite <= trained).sum() if trained < 0 else (finite >= trained).sum())
        comparisons.append(
            NullComparison(
                pr_mode=mode, kind=kind, effect=frame["effect"].iloc[0], k=len(values),
                k_defined=int(finite.size), null_min=low, null_max=high, trained=trained,
                n_as_extreme=extreme, n_as_far=far, position=position,
            )
        )  # fmt: skip
    return comparisons


def _num(value: float, spec: str = ".3g") -> str:
    return "undefined" if not math.isfinite(value) else format(value, spec)


def comparison_sentence(c: NullComparison) -> str:
    """One plain sentence: the null range, the trained value, and whether it stands out, by
    direction and by magnitude."""
    head = (
        f"{c.pr_mode}: {c.kind} null (K={c.k}): {c.effect} {_num(c.null_min)}..{_num(c.null_max)}"
        f"; trained model {c.effect} {_num(c.trained)}"
    )
    if c.position == "undefined":
        return f"{head} — comparison undefined (no finite null or trained value)"
    undefined = f" ({c.k - c.k_defined} null(s) undefined)" if c.k_defined < c.k else ""
    direction = f"{c.n_as_far} of {c.k_defined} nulls as far in its direction"
    if c.n_as_extreme == 0:
        verdict = (
            f"{c.position} ({direction}); larger in magnitude than all {c.k_defined} nulls"
            f"{undefined} (with K={c.k} the smallest possible rank p is {1 / (c.k + 1):.2g})"
        )
    else:
        verdict = (
            f"{c.position} ({direction}); {c.n_as_extreme} of {c.k_defined} nulls are at least "
            f"as large in magnitude{undefined} — by magnitude the trained effect does not stand "
            "out from this null"
        )
    return f"{head}: {verdict}"


def null_headline(table: pd.DataFrame) -> dict:
    """Headline numbers per pr_mode and null kind: K, the null range of the effect, how many
    nulls are at least as large in magnitude as the trained effect (``n_as_extreme``) and how
    many are at least as far in its direction (``n_as_far``)."""
    headline: dict = {}
    for c in compare_with_nulls(table):
        prefix = f"{c.pr_mode}:null_{c.kind}"
        headline[f"{prefix}_k"] = c.k
        headline[f"{prefix}_{c.effect}_min"] = c.null_min if math.isfinite(c.null_min) else None
        headline[f"{prefix}_{c.effect}_max"] = c.null_max if math.isfinite(c.null_max) else None
        headline[f"{prefix}_n_as_extreme"] = c.n_as_extreme
        headline[f"{prefix}_n_as_far"] = c.n_as_far
    return headline
