"""Every option the commands share, declared once; option groups; error and result printing.

An option is a ``typing.Annotated`` alias made by :func:`option` (type, help, flag names and
how its value is read, :class:`ReadAs`); a command writes
``model: Model = DEFAULT_MODEL`` and typer reads the rest from the alias. Options that come
together in several commands (the causal battery's model/prompts/R_V/statistics options, the
contraction settings of ``contraction``/``scaling``/``checkpoints``, sampling, executors) are an
*option group*: a dataclass whose fields are options. A command takes a group as one
parameter (``inputs: CausalOptions``) and :func:`command` shows typer the group's fields in
its place. :func:`command` also turns an RloopError into one line on stderr and exit code 2;
:func:`experiment` makes the command of one experiment from its config class and run
function, so a command is its signature, its help and the config values it derives itself.
Where an option means more in one command, :func:`with_help` gives it that command's help
text (same flags and type), e.g. ``AblatedLayers = with_help(Layers, "Layers to ablate...")``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, Protocol, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from typer.models import ParameterInfo

from rloop.cli.parsing import (
    parse_int_list,
    parse_layer_pair,
    parse_max_prompts,
    parse_names,
    path_text,
)
from rloop.errors import RloopError
from rloop.prompts import DEFAULT_BANK_VERSION

DEFAULT_MODEL = "smollm2-135m"

out_console = Console()
err_console = Console(stderr=True)


@dataclasses.dataclass(frozen=True)
class ReadAs:
    """``Annotated`` metadata of an option: how its command-line value becomes the config's
    value. ``read(value, flag)`` raises ConfigError (naming ``flag``) on bad input."""

    read: Callable[[Any, str], Any]


def read_option(name: str, annotation: Any, value: Any) -> Any:
    """``value`` of option ``name`` read by the :class:`ReadAs` of its annotation (if any)."""
    for extra in typing.get_args(annotation)[1:]:
        if isinstance(extra, ReadAs):
            return extra.read(value, "--" + name.replace("_", "-"))
    return value


def option(kind: Any, help_text: str, *flags: str, read: ReadAs | None = None) -> Any:
    """The option alias ``Annotated[kind, typer.Option(*flags, help=help_text), read]`` that
    commands and option groups annotate a parameter with (``read`` omitted when None)."""
    extras = (typer.Option(*flags, help=help_text),) + ((read,) if read is not None else ())
    return Annotated[(kind, *extras)]


AS_PATH = ReadAs(lambda path, _flag: path_text(path))
AS_NAMES = ReadAs(lambda text, _flag: parse_names(text))
AS_INTS = ReadAs(parse_int_list)
AS_LAYER_PAIR = ReadAs(parse_layer_pair)
AS_PROMPT_LIMIT = ReadAs(parse_max_prompts)

# ----------------------------------------------------------------------------- model and prompts
Model = option(str | None, "Registry name, hub id, local dir or .gguf file.", "--model", "-m")
Models = option(str | None, "Comma-separated models, e.g. pythia-70m,pythia-160m.", read=AS_NAMES)
Revision = option(str | None, "Hub revision (of every model), e.g. step5000 (Pythia checkpoints).")
Prompts = option(
    Path | None,
    "Prompt file (.json/.jsonl/.csv/.txt); default: the shipped bank.",
    "--prompts",
    "-p",
    read=AS_PATH,
)
BankVersion = option(str, "Version of the shipped prompt bank (v1, v2); ignored with --prompts.")
Groups = option(
    str | None,
    "Comma-separated prompt groups to keep, e.g. L5,factual (default: per command).",
    read=AS_NAMES,
)
MaxPrompts = option(int, "At most this many prompts per group (0 = all).", read=AS_PROMPT_LIMIT)
RecursiveGroup = option(str, "Recursive group of the contrast.")
BaselineGroup = option(str, "Baseline group of the contrast.")
NPairs = option(int | None, "(target, source) prompt pairs.")

# ----------------------------------------------------------------------------- layers and R_V
Layers = option(
    str | None,
    "Layers: numbers and LOW-HIGH ranges, e.g. 28, 3,7 or 15-30 (default all).",
    read=AS_INTS,
)
EarlyLate = option(
    str | None,
    "EARLY,LATE layer indices of R_V, e.g. 5,28; default by depth (15%/84%).",
    read=AS_LAYER_PAIR,
)
MeasureLayers = option(
    str | None, "EARLY,LATE layers of R_V, e.g. 5,28 (default by depth).", read=AS_LAYER_PAIR
)
Window = option(int, "Window: the last W real tokens of each prompt.")
PrMode = option(str, "per-head | whole.")
PrModes = option(str, "per-head | whole | both.")
Point = option(str | None, "Hook point: v, k, q, z, attn_out, mlp_out, resid_pre, resid_post.")

# ----------------------------------------------------------------------------- heads and ablation
Heads = option(str | None, "Heads to ablate together: LAYER.HEAD,... e.g. 15.4,16.2")
Mode = option(str, "zero | mean (mean over --reference-group).")
ReferenceGroup = option(str, "Mean-ablation reference prompt group.")
Unit = option(str, "query | kv_group (GQA: a whole KV group).")
TopK = option(int, "Heads listed in the summary.")
FromSweep = option(
    Path | None, "Run directory of a finished `rloop ablate`: take its top heads.", read=AS_PATH
)
MaxRows = option(
    int | None,
    "Cap on rows (head x prompt) per stacked forward (default: as many as fit a quarter of "
    "free GPU memory, or 1 GiB of activations on the CPU).",
)

# ----------------------------------------------------------------------------- generation
MaxNewTokens = option(int | None, "Tokens to generate.")
Temperature = option(float, "0 = greedy.")
TopP = option(float, "Nucleus sampling mass.")

# ----------------------------------------------------------------------------- compute and runs
BatchSize = option(int, "Prompts per forward pass.")
BackwardBatchSize = option(int, "Prompts per forward + backward.")
NBoot = option(int, "Bootstrap resamples for CIs.")
Seed = option(int, "Seed of every bootstrap and random draw.")
Out = option(
    Path | None,
    "Run directory (default: rloop-runs/<experiment>-<model>-<config hash>).",
    "--out",
    "-o",
)
Force = option(bool, "Recompute even if the run directory holds a complete run.")
Dtype = option(
    str | None, "float32 | bfloat16 | float16 | float64 (default: float32 CPU, bfloat16 GPU)."
)
Device = option(str | None, "cpu | cuda | cuda:N (default: auto).")
Verify = option(
    bool,
    "Run the fidelity self-check of `rloop verify` on the loaded model first; refuse to start "
    "on a FAIL (not part of the run's config: the run directory is the same).",
    "--verify",
)
Executor = option(str, "local (sequential) | ray.")
RayAddress = option(str | None, "Ray cluster address (host:port or auto).")
GpusPerJob = option(float | None, "GPUs per Ray job (default: 1 if any).")


# ----------------------------------------------------------------------------- option groups
class OptionGroup:
    """Base of the option groups whose fields are config fields: :meth:`settings` reads them."""

    def settings(self) -> dict[str, Any]:
        """The group's fields as config values, each read by its option's :class:`ReadAs`."""
        hints = typing.get_type_hints(type(self), include_extras=True)
        return {
            field.name: read_option(field.name, hints[field.name], getattr(self, field.name))
            for field in dataclasses.fields(self)  # type: ignore[arg-type]
        }


@dataclasses.dataclass(frozen=True)
class ModelOptions(OptionGroup):
    """Which model, and where and in which dtype it runs."""

    model: Model = DEFAULT_MODEL
    revision: Revision = None
    dtype: Dtype = None
    device: Device = None
    verify: Verify = False

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "model": self.model or DEFAULT_MODEL}


@dataclasses.dataclass(frozen=True)
class ContrastOptions(OptionGroup):
    """The two prompt groups a command contrasts."""

    recursive_group: RecursiveGroup = "L5"
    baseline_group: BaselineGroup = "factual"


@dataclasses.dataclass(frozen=True)
class PromptOptions(OptionGroup):
    """Which prompts: a file or the shipped bank, and the groups kept."""

    prompts: Prompts = None
    groups: Groups = None


@dataclasses.dataclass(frozen=True)
class WindowOptions(OptionGroup):
    """How R_V is read on a window: the early and late layers, the window, the PR mode."""

    layers: EarlyLate = None
    window: Window = 16
    pr_mode: PrMode = "per-head"


@dataclasses.dataclass(frozen=True)
class CausalOptions(ModelOptions):
    """Options of every causal-battery command: model, prompts, R_V and statistics."""

    prompts: Prompts = None
    groups: Groups = None
    max_prompts: MaxPrompts = 10
    measure_layers: MeasureLayers = None
    window: Window = 16
    pr_mode: PrMode = "per-head"
    n_boot: NBoot = 2000
    seed: Seed = 0


@dataclasses.dataclass(frozen=True)
class ContractionOptions(OptionGroup):
    """How ``contraction``, ``scaling`` and ``checkpoints`` measure R_V on each model (the
    contrasted groups are :class:`ContrastOptions`)."""

    prompts: Prompts = None
    bank_version: BankVersion = DEFAULT_BANK_VERSION
    groups: Groups = None
    layers: EarlyLate = None
    window: Window = 16
    pr_mode: PrModes = "both"
    point: Point = "v"
    batch_size: BatchSize = 16
    n_boot: NBoot = 2000
    seed: Seed = 0
    dtype: Dtype = None
    device: Device = None
    verify: Verify = False

    def settings(self) -> dict[str, Any]:
        values = super().settings()
        mode = values.pop("pr_mode")
        return {**values, "pr_modes": ["per-head", "whole"] if mode == "both" else [mode]}


@dataclasses.dataclass(frozen=True)
class SamplingOptions(OptionGroup):
    """Generation length and sampling of ``temporal`` and ``kv-patch`` (fields as in configs)."""

    max_new_tokens: MaxNewTokens = 64
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    seed: Seed = 0


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Where the run is written, and whether a complete run there is recomputed."""

    out: Out = None
    force: Force = False

    def launch(self, run: Callable[..., Any], config: Any, **extra: Any) -> Path:
        """Run ``run(config)`` into this run directory and print its outcome."""
        return print_outcome(run(config, out=self.out, force=self.force, **extra))


@dataclasses.dataclass(frozen=True)
class ExecutorOptions:
    """Where the jobs of a sweep run: one after another here, or on a Ray cluster."""

    executor: Executor = "local"
    ray_address: RayAddress = None
    gpus_per_job: GpusPerJob = None


@dataclasses.dataclass(frozen=True)
class AblationOptions(OptionGroup):
    """How a head or layer is ablated: zeroed, or set to its mean over a reference group."""

    mode: Mode = "zero"
    reference_group: ReferenceGroup = "factual"


# ----------------------------------------------------------------------------- errors and output
def fail(message: str) -> typing.NoReturn:
    """Print ``error: <message>`` (literally, no markup) on stderr and exit with code 2."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


T = TypeVar("T")


def run_guarded(action: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``action``; an RloopError or Ctrl-C becomes one line on stderr and exit code 2."""
    try:
        return action(*args, **kwargs)
    except RloopError as err:
        fail(str(err))
    except KeyboardInterrupt:
        fail("interrupted; run the same command again to resume where it stopped")


class RunResult(Protocol):
    run_dir: Path
    already_complete: bool
    headline: dict


def print_outcome(outcome: tuple[Path, bool, dict] | RunResult) -> Path:
    """Print a finished run: 'already complete' if reused, the headline, the report path.

    ``outcome`` is what a run function returns: ``(run_dir, already_complete, headline)`` or
    an object with those attributes. Floats print with 4 decimals; None values not at all.
    Returns the run directory.
    """
    if isinstance(outcome, tuple):
        run_dir, already_complete, headline = outcome
    else:
        run_dir, already_complete, headline = (
            outcome.run_dir,
            outcome.already_complete,
            outcome.headline,
        )
    if already_complete:
        out_console.print(f"already complete (use --force to recompute): {run_dir}", markup=False)
    for key, value in headline.items():
        if value is None:
            continue
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        out_console.print(f"  {key}: {shown}", markup=False)
    out_console.print(f"report: {Path(run_dir) / 'summary.md'}", markup=False)
    return Path(run_dir)


# ----------------------------------------------------------------------------- the command decorator
def with_help(annotation: Any, text: str) -> Any:
    """The option ``annotation`` (an ``Annotated[type, typer.Option(...)]`` alias) with another
    help text: the same flags and type, for a command where the option means more."""
    base, *extras = typing.get_args(annotation)
    replaced = []
    for extra in extras:
        if isinstance(extra, ParameterInfo):
            extra = copy.copy(extra)
            extra.help = text
        replaced.append(extra)
    return Annotated[(base, *replaced)]


def command(
    *, helps: Mapping[str, str] | None = None, without: Collection[str] = ()
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Make a plain function an rloop command (register it with ``app.command(name)``).

    In the signature typer reads, a parameter annotated with an option group (a dataclass
    such as :class:`CausalOptions`) is replaced by the group's fields, in field order; the
    function receives one instance of the group. ``without`` leaves group fields out (they
    keep their defaults); ``helps`` gives this command its own help text for options, by
    parameter name. An RloopError raised by the function is one line on stderr, exit 2.
    """
    helps = dict(helps or {})

    def decorate(func: Callable[..., None]) -> Callable[..., None]:
        hints = typing.get_type_hints(func, include_extras=True)
        visible: list[inspect.Parameter] = []
        groups: dict[str, type] = {}
        for param in inspect.signature(func).parameters.values():
            annotation = hints[param.name]
            if not dataclasses.is_dataclass(annotation):
                visible.append(param.replace(kind=param.KEYWORD_ONLY, annotation=annotation))
                continue
            groups[param.name] = annotation
            field_hints = typing.get_type_hints(annotation, include_extras=True)
            for field in dataclasses.fields(annotation):
                if field.name not in without:
                    visible.append(
                        inspect.Parameter(
                            field.name,
                            inspect.Parameter.KEYWORD_ONLY,
                            default=field.default,
                            annotation=field_hints[field.name],
                        )
                    )
        names = [param.name for param in visible]
        group_fields = {f.name for group in groups.values() for f in dataclasses.fields(group)}
        if len(set(names)) != len(names):
            raise TypeError(f"{func.__name__}: an option name is repeated in {names}")
        if set(helps) - set(names) or set(without) - group_fields:
            raise TypeError(f"{func.__name__}: helps or without names an unknown option")
        visible = [
            p.replace(annotation=with_help(p.annotation, helps[p.name])) if p.name in helps else p
            for p in visible
        ]

        @functools.wraps(func)
        def run_command(**values: Any) -> None:
            for name, group in groups.items():
                members = {f.name for f in dataclasses.fields(group)} & set(values)
                values[name] = group(**{member: values.pop(member) for member in members})
            run_guarded(func, **values)

        run_command.__signature__ = inspect.Signature(visible, return_annotation=None)
        run_command.__annotations__ = {p.name: p.annotation for p in visible}
        return run_command

    return decorate


def experiment(
    config_class: type,
    run: Callable[..., Any],
    *,
    helps: Mapping[str, str] | None = None,
    without: Collection[str] = (),
) -> Callable[[Callable[..., dict[str, Any] | None]], Callable[..., None]]:
    """Make a function the rloop command of one experiment: options in, config, run, outcome.

    The command reads every option by its :class:`ReadAs`, then builds ``config_class`` from
    the settings of its :class:`OptionGroup` parameters and from every plain option named as a
    config field, updated with what the decorated function returns (the values it derives
    itself, e.g. ``{"components": [...]}``; it may return None). The config is run with
    ``run(config, out=..., force=...)`` of the command's :class:`RunOptions` parameter, and the
    outcome printed. ``helps`` and ``without`` are as in :func:`command`. A config without a
    ``verify`` field (e.g. ``rloop verify`` itself) does not show ``--verify``.
    """
    config_fields = {field.name for field in dataclasses.fields(config_class)}

    def decorate(func: Callable[..., dict[str, Any] | None]) -> Callable[..., None]:
        hints = typing.get_type_hints(func, include_extras=True)
        hidden = tuple(without)
        group_fields = {
            f.name for hint in hints.values() if dataclasses.is_dataclass(hint)
            for f in dataclasses.fields(hint)
        }  # fmt: skip
        if "verify" in group_fields and "verify" not in config_fields:
            hidden = (*hidden, "verify")

        @functools.wraps(func)
        def run_experiment(**values: Any) -> None:
            values = {name: read_option(name, hints[name], value) for name, value in values.items()}
            config_values: dict[str, Any] = {}
            for value in values.values():
                if isinstance(value, OptionGroup):
                    config_values.update(value.settings())
            config_values.update({name: values[name] for name in config_fields & set(values)})
            config_values.update(func(**values) or {})
            if "verify" not in config_fields:
                config_values.pop("verify", None)
            (launcher,) = [value for value in values.values() if isinstance(value, RunOptions)]
            launcher.launch(run, config_class(**config_values))

        return command(helps=helps, without=hidden)(run_experiment)

    return decorate
