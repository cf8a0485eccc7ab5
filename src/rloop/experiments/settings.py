"""Settings every experiment shares, and the checks and loading that come before any compute.

:class:`Settings` holds the fields of every experiment (model, revision, prompts, groups,
window, seed, dtype, device, bootstrap size); :class:`RVSettings` adds the R_V measurement
(early/late layers and PR mode) that the causal battery shares. An experiment's config
subclasses one of them and adds only its own fields.

:func:`prepare` checks the settings, loads the prompts and the model, resolves the R_V layers
and checks the window against every prompt — all before a run directory is created, so that
bad input writes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from rloop import models
from rloop.capture.generation import SamplingConfig
from rloop.errors import ConfigError, PromptError
from rloop.interventions.edits import mean_activations
from rloop.interventions.engine import check_mode_for_point, resolve_layers
from rloop.models import LoadedModel
from rloop.prompts import (
    DEFAULT_BANK_VERSION,
    PromptSet,
    check_window,
    load_bank,
    load_prompt_file,
)

MIN_BOOTSTRAP = 100


@dataclass
class Settings:
    """Fields every experiment shares (defaults match the CLI)."""

    model: str = "smollm2-135m"
    revision: str | None = None
    prompts: str | None = None  # a prompt file; None = the shipped bank
    bank_version: str = DEFAULT_BANK_VERSION
    groups: list[str] | None = None  # None = the experiment's default groups
    max_prompts: int | None = None  # per group; None = all
    window: int = 16
    n_boot: int = 2000
    seed: int = 0
    dtype: str | None = None
    device: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RVSettings(Settings):
    """Settings of an experiment that measures R_V = PR(V, late) / PR(V, early)."""

    max_prompts: int | None = 10
    measure_layers: list[int] | None = None  # [early, late]; None = depth fractions
    pr_mode: str = "per-head"


@dataclass
class GenerationSettings(Settings):
    """Settings of an experiment that generates from recursive and baseline prompts and
    measures R_V on the generated windows."""

    recursive_group: str = "L5"
    baseline_group: str = "factual"
    layers: list[int] | None = None  # [early, late] of R_V; None = depth fractions
    pr_mode: str = "per-head"
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0

    def sampling(self) -> SamplingConfig:
        """Greedy (temperature 0) or seeded sampling of ``max_new_tokens`` tokens."""
        return SamplingConfig(self.max_new_tokens, self.temperature, self.top_p, self.seed)


@dataclass
class Prepared:
    """What :func:`prepare` checked and loaded."""

    lm: LoadedModel
    prompts: PromptSet  # the prompts used (at most max_prompts per group)
    early: int
    late: int
    rule: str


def check_settings(settings: Settings) -> None:
    """One-line errors for shared settings that cannot work (before anything is loaded)."""
    if settings.window < 2:
        raise ConfigError(f"window must be at least 2 tokens, got {settings.window}")
    if settings.max_prompts is not None and settings.max_prompts < 1:
        raise ConfigError(f"--max-prompts must be at least 1 (0 = all), got {settings.max_prompts}")
    if settings.n_boot < MIN_BOOTSTRAP:
        raise ConfigError(
            f"n_boot must be at least {MIN_BOOTSTRAP} for a usable CI, got {settings.n_boot}"
        )
    batch_size = getattr(settings, "batch_size", None)
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if isinstance(settings, RVSettings):
        check_mode_for_point("v", [settings.pr_mode])


def load_prompt_set(
    prompts: str | None,
    bank_version: str = DEFAULT_BANK_VERSION,
    groups: Sequence[str] | None = None,
) -> PromptSet:
    """The shipped bank (``prompts`` None) or a user file, optionally restricted to groups."""
    prompt_set = load_bank(bank_version) if prompts is None else load_prompt_file(prompts)
    if groups:
        prompt_set = prompt_set.select(groups)
    if len(prompt_set) == 0:
        raise PromptError("the prompt set is empty: pass a file with at least one prompt")
    return prompt_set


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


def load(settings: Settings, lm: LoadedModel | None = None) -> LoadedModel:
    """The model of ``settings`` (or ``lm`` when the caller already loaded one)."""
    if lm is not None:
        return lm
    return models.load_model(
        settings.model, revision=settings.revision, device=settings.device, dtype=settings.dtype
    )


def load_reference(settings: Settings, group: str, lm: LoadedModel) -> PromptSet:
    """A reference prompt group of the same source (e.g. for mean ablation), window-checked."""
    reference = load_prompt_set(settings.prompts, settings.bank_version, [group])
    check_window(reference, lm.tokenizer, settings.window)
    return reference


def prepare(
    settings: Settings,
    default_groups: list[str] | None,
    lm: LoadedModel | None = None,
    measure_layers: Sequence[int] | None = None,
    layers_flag: str = "--measure-layers",
) -> Prepared:
    """Check settings, load prompts and model, resolve the R_V layers, check the window.

    default_groups: groups used when ``settings.groups`` is None and the prompts come from the
    shipped bank (a user file uses all its groups). measure_layers: [early, late]; default
    ``settings.measure_layers`` for :class:`RVSettings`.
    """
    check_settings(settings)
    groups = settings.groups or (default_groups if settings.prompts is None else None)
    prompt_set = load_prompt_set(settings.prompts, settings.bank_version, groups)
    used = limit_per_group(prompt_set, settings.max_prompts)
    lm = load(settings, lm)
    if measure_layers is None and isinstance(settings, RVSettings):
        measure_layers = settings.measure_layers
    early, late, rule = resolve_layers(lm.adapter, measure_layers, layers_flag)
    check_window(used, lm.tokenizer, settings.window)
    return Prepared(lm, used, early, late, rule)


def reference_means(
    lm: LoadedModel, reference: PromptSet | None, layers: Sequence[int], point: str
) -> dict[int, torch.Tensor] | None:
    """Mean of ``point`` over the reference set per layer, or None (zero ablation)."""
    if reference is None:
        return None
    texts = [p.text for p in reference]
    return mean_activations(lm.model, lm.adapter, lm.tokenizer, texts, sorted(set(layers)), point)


def layer_list(adapter, layers: Sequence[int] | None) -> list[int]:
    """The requested layers sorted and de-duplicated (every layer when None or empty),
    each range-checked against the model."""
    chosen = list(layers) if layers else list(range(adapter.n_layers))
    for layer in chosen:
        adapter.check_layer(layer)
    return sorted(set(chosen))


def prepare_contrast(
    settings: Settings, lm: LoadedModel | None = None
) -> tuple[Prepared, list[int]]:
    """:func:`prepare` for an experiment that contrasts ``settings.recursive_group`` with
    ``settings.baseline_group`` over ``settings.layers`` (every layer when None): the
    prepared inputs and the checked, sorted layers."""
    groups = [settings.recursive_group, settings.baseline_group]  # type: ignore[attr-defined]
    prepared = prepare(settings, groups, lm)
    return prepared, layer_list(prepared.lm.adapter, settings.layers)  # type: ignore[attr-defined]
