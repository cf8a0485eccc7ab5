"""Settings every experiment shares, and the checks and loading that come before any compute.

:class:`Settings` holds the fields of every experiment (model, revision, prompts, groups,
window, seed, dtype, device, bootstrap size); :class:`RVSettings` adds the R_V measurement
(early/late layers and PR mode) that the causal battery shares. An experiment's config
subclasses one of them and adds only its own fields.

:func:`prepare` checks the settings, loads the prompts and the model, resolves the R_V layers
and checks the window against every prompt — all before a run directory is created, so that
bad input writes nothing. The checks any experiment's own flow can reuse live here too, so
each exists once: :func:`check_groups` (the contrasted groups exist and are large enough),
:func:`check_context` (no prompt is longer than the model's context) and
:func:`verify_if_asked` (``--verify``: the fidelity self-check before any compute).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from rloop import models
from rloop.adapters.base import HOOK_POINTS, text_config
from rloop.capture.generation import SamplingConfig
from rloop.errors import ConfigError, PromptError
from rloop.experiments.verify import VerifyConfig, require_verified, select_prompts
from rloop.interventions.edits import mean_activations
from rloop.interventions.engine import check_mode_for_point, resolve_layers
from rloop.models import LoadedModel
from rloop.prompts import (
    DEFAULT_BANK_VERSION,
    PromptSet,
    check_window,
    load_bank,
    load_prompt_file,
    token_counts,
)

MIN_BOOTSTRAP = 100
MIN_GROUP_SIZE = 2  # a contrast needs a spread in each group (sd, CIs, tests)
DEFAULT_GROUP = "user"  # the group of every prompt of a file without groups
# Config fields naming the groups an experiment contrasts, and their command-line flags.
CONTRAST_FIELDS = (
    ("recursive_group", "--recursive-group"),
    ("baseline_group", "--baseline-group"),
    ("source_group", "--source-group"),
    ("target_group", "--target-group"),
)
# Model config fields that give the context length (positions the model was trained on).
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length")


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
    # --verify: run the fidelity self-check on the loaded model first and refuse to start on a
    # FAIL. Not part of the run's identity: to_dict() leaves it out, so it never changes the
    # config hash or the run directory.
    verify: bool = field(default=False, compare=False)

    def to_dict(self) -> dict:
        values = asdict(self)
        values.pop("verify")
        return values


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
        if prompt_set.groups() == [DEFAULT_GROUP] and DEFAULT_GROUP not in groups:
            raise no_groups_error(prompt_set, f"groups {', '.join(groups)} are needed")
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


def check_point_name(point: str, flag: str = "--point") -> None:
    """ConfigError for a hook point name no adapter has (checked before a model is loaded)."""
    if point not in HOOK_POINTS:
        choices = ", ".join(HOOK_POINTS)
        raise ConfigError(f"unknown hook point {point!r} ({flag}): choose one of {choices}")


def contrasted_groups(settings: object) -> dict[str, str]:
    """The groups ``settings`` contrasts, by flag: recursive/baseline or source/target."""
    named = {flag: getattr(settings, name, None) for name, flag in CONTRAST_FIELDS}
    return {flag: group for flag, group in named.items() if isinstance(group, str)}


def no_groups_error(prompt_set: PromptSet, need: str) -> PromptError:
    """The error for a prompt file without groups (every prompt in group 'user') where
    ``need`` (a clause, e.g. "--recursive-group L5, --baseline-group factual contrast
    groups") needs them."""
    return PromptError(
        f"the prompts of {prompt_set.source} have no groups, but {need}: give every prompt a "
        'group (a group column in .csv, a "group" key in .json/.jsonl, group<TAB>text lines '
        "in .txt)"
    )


def check_groups(
    prompt_set: PromptSet, contrast: Mapping[str, str], min_size: int = MIN_GROUP_SIZE
) -> None:
    """PromptError, before any compute, when a contrasted group is not in ``prompt_set`` (a
    typo, a file without groups, a ``--groups`` that left it out) or has fewer than
    ``min_size`` prompts. ``contrast`` maps each flag to the group it names."""
    if not contrast:
        return
    present = prompt_set.groups()
    if present == [DEFAULT_GROUP] and DEFAULT_GROUP not in contrast.values():
        wanted = ", ".join(f"{flag} {group}" for flag, group in contrast.items())
        raise no_groups_error(prompt_set, f"{wanted} contrast groups")
    missing = [f"{group!r} ({flag})" for flag, group in contrast.items() if group not in present]
    if missing:
        raise PromptError(
            f"group(s) {', '.join(missing)} not in the prompt set; available: "
            f"{', '.join(present)}; name its groups with {' and '.join(contrast)}"
        )
    sizes = {group: 0 for group in contrast.values()}
    for prompt in prompt_set:
        if prompt.group in sizes:
            sizes[prompt.group] += 1
    small = [f"{group!r} has {n}" for group, n in sizes.items() if n < min_size]
    if small:
        raise PromptError(
            f"a contrast needs at least {min_size} prompts per group, but {', '.join(small)}: "
            "add prompts to the file or raise --max-prompts"
        )


def context_length(lm: LoadedModel) -> tuple[int, str] | None:
    """The model's context length in tokens and the config field it comes from, or None."""
    config = text_config(getattr(lm.model, "config", None))
    for name in CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, name
    return None


def check_context(prompt_set: PromptSet, lm: LoadedModel, new_tokens: int = 0) -> None:
    """PromptError naming the longest prompt when any prompt (plus ``new_tokens`` generated
    tokens) is longer than the model's context: positions past it are outside what the model
    was trained on, and one such prompt pads its whole batch to that length."""
    found = context_length(lm)
    if found is None or len(prompt_set) == 0:
        return
    limit, name = found
    counts = token_counts(prompt_set, lm.tokenizer)
    over = [(n, p.id) for p, n in zip(prompt_set, counts, strict=True) if n + new_tokens > limit]
    if not over:
        return
    n, prompt_id = max(over)
    plus = f" + {new_tokens} generated" if new_tokens else ""
    others = f" ({len(over) - 1} more prompts too)" if len(over) > 1 else ""
    raise PromptError(
        f"prompt {prompt_id} has {n} tokens{plus}, more than the model's context of {limit} "
        f"tokens ({name}){others}: shorten it or leave it out of the prompt file"
    )


def verify_if_asked(
    settings: Settings,
    lm: LoadedModel,
    prompts: PromptSet,
    layers: Sequence[int] | None = None,
) -> None:
    """With ``settings.verify``: the fidelity self-check (:func:`rloop.experiments.verify.
    require_verified`) on the loaded model, on prompts of the run's own set (at least
    ``settings.window`` tokens); VerificationError (one line) on any FAIL."""
    if not getattr(settings, "verify", False):
        return
    config = VerifyConfig(
        model=lm.name,
        window=settings.window,
        layers=list(layers) if layers is not None else None,
        seed=settings.seed,
    )
    chosen = select_prompts(prompts, lm.tokenizer, config.n_prompts, config.window)
    require_verified(lm, config, [p.text for p in chosen])


def load(settings: Settings, lm: LoadedModel | None = None, *, verify: bool = True) -> LoadedModel:
    """The model of ``settings`` (or ``lm`` when the caller already loaded one).

    With ``settings.verify`` the model is checked first (:func:`verify_if_asked`, on prompts
    of the settings' prompt file or bank); ``verify=False`` leaves that to the caller, which
    then calls :func:`verify_if_asked` itself after its cheaper checks (as :func:`prepare`).
    """
    if lm is None:
        lm = models.load_model(
            settings.model, revision=settings.revision, device=settings.device, dtype=settings.dtype
        )
    if verify and getattr(settings, "verify", False):
        verify_if_asked(settings, lm, load_prompt_set(settings.prompts, settings.bank_version))
    return lm


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

    In order, cheapest first: the settings; the prompts and the groups the experiment
    contrasts (:func:`contrasted_groups`: each present with at least 2 prompts); the model;
    the R_V layers; the window and the context length against every prompt; and with
    ``settings.verify`` the fidelity self-check. Any failure is one line, before any compute.

    default_groups: groups used when ``settings.groups`` is None and the prompts come from the
    shipped bank (a user file uses all its groups). measure_layers: [early, late]; default
    ``settings.measure_layers`` for :class:`RVSettings`.
    """
    check_settings(settings)
    groups = settings.groups or (default_groups if settings.prompts is None else None)
    prompt_set = load_prompt_set(settings.prompts, settings.bank_version, groups)
    used = limit_per_group(prompt_set, settings.max_prompts)
    check_groups(used, contrasted_groups(settings))
    lm = load(settings, lm, verify=False)
    if measure_layers is None and isinstance(settings, RVSettings):
        measure_layers = settings.measure_layers
    early, late, rule = resolve_layers(lm.adapter, measure_layers, layers_flag)
    check_window(used, lm.tokenizer, settings.window)
    check_context(used, lm, getattr(settings, "max_new_tokens", None) or 0)
    verify_if_asked(settings, lm, used, [early, late])
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
