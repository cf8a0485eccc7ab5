"""Every option the commands share, declared once; option groups; error and result printing.

An option is a ``typing.Annotated`` alias (flag names, type, help); a command writes
``model: Model = DEFAULT_MODEL`` and typer reads the rest from the alias. Options that come
together in several commands (the causal battery's model/prompts/R_V/statistics options, the
contraction settings of ``contraction``/``scaling``/``checkpoints``, sampling, executors) are an
*option group*: a dataclass whose fields are options. A command takes a group as one
parameter (``inputs: CausalOptions``) and :func:`command` shows typer the group's fields in
its place. :func:`command` also turns an RloopError into one line on stderr and exit code 2.
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

# ----------------------------------------------------------------------------- model and prompts
Model = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Registry name, hub id, local dir or .gguf file."),
]
Models = Annotated[
    str | None, typer.Option(help="Comma-separated models, e.g. pythia-70m,pythia-160m.")
]
Revision = Annotated[
    str | None,
    typer.Option(help="Hub revision (of every model), e.g. step5000 for Pythia checkpoints."),
]
Prompts = Annotated[
    Path | None,
    typer.Option(
        "--prompts",
        "-p",
        help="Prompt file (.json/.jsonl/.csv/.txt); default: the shipped bank.",
    ),
]
BankVersion = Annotated[
    str, typer.Option(help="Version of the shipped prompt bank (v1, v2); ignored with --prompts.")
]
Groups = Annotated[
    str | None,
    typer.Option(
        help="Comma-separated prompt groups to keep, e.g. L5,factual (default: per command)."
    ),
]
MaxPrompts = Annotated[int, typer.Option(help="At most this many prompts per group (0 = all).")]
RecursiveGroup = Annotated[str, typer.Option(help="Recursive group of the contrast.")]
BaselineGroup = Annotated[str, typer.Option(help="Baseline group of the contrast.")]
NPairs = Annotated[int | None, typer.Option(help="(target, source) prompt pairs.")]

# ----------------------------------------------------------------------------- layers and R_V
Layers = Annotated[
    str | None,
    typer.Option(help="Layers: numbers and LOW-HIGH ranges, e.g. 28, 3,7 or 15-30 (default all)."),
]
EarlyLate = Annotated[
    str | None,
    typer.Option(help="EARLY,LATE layer indices of R_V, e.g. 5,28; default by depth (15%/84%)."),
]
MeasureLayers = Annotated[
    str | None, typer.Option(help="EARLY,LATE layers of R_V, e.g. 5,28 (default by depth).")
]
Window = Annotated[int, typer.Option(help="Window: the last W real tokens of each prompt.")]
PrMode = Annotated[str, typer.Option(help="per-head | whole.")]
PrModes = Annotated[str, typer.Option(help="per-head | whole | both.")]
Point = Annotated[
    str | None,
    typer.Option(help="Hook point: v, k, q, z, attn_out, mlp_out, resid_pre, resid_post."),
]

# ----------------------------------------------------------------------------- heads and ablation
Heads = Annotated[
    str | None, typer.Option(help="Heads to ablate together: LAYER.HEAD,... e.g. 15.4,16.2")
]
Mode = Annotated[str, typer.Option(help="zero | mean (mean over --reference-group).")]
ReferenceGroup = Annotated[str, typer.Option(help="Mean-ablation reference prompt group.")]
Unit = Annotated[str, typer.Option(help="query | kv_group (GQA: a whole KV group).")]
TopK = Annotated[int, typer.Option(help="Heads listed in the summary.")]
FromSweep = Annotated[
    Path | None,
    typer.Option(help="Run directory of a finished `rloop ablate`: take its top heads."),
]
MaxRows = Annotated[
    int | None,
    typer.Option(
        help="Cap on rows (head x prompt) per stacked forward (default: as many as fit a "
        "quarter of free GPU memory, or 1 GiB of activations on the CPU)."
    ),
]

# ----------------------------------------------------------------------------- generation
MaxNewTokens = Annotated[int | None, typer.Option(help="Tokens to generate.")]
Temperature = Annotated[float, typer.Option(help="0 = greedy.")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling mass.")]

# ----------------------------------------------------------------------------- compute and runs
BatchSize = Annotated[int, typer.Option(help="Prompts per forward pass.")]
BackwardBatchSize = Annotated[int, typer.Option(help="Prompts per forward + backward.")]
NBoot = Annotated[int, typer.Option(help="Bootstrap resamples for CIs.")]
Seed = Annotated[int, typer.Option(help="Seed of every bootstrap and random draw.")]
Dtype = Annotated[
    str | None,
    typer.Option(
        help="float32 | bfloat16 | float16 | float64 (default: float32 CPU, bfloat16 GPU)."
    ),
]
Device = Annotated[str | None, typer.Option(help="cpu | cuda | cuda:N (default: auto).")]
Executor = Annotated[str, typer.Option(help="local (sequential) | ray.")]
RayAddress = Annotated[str | None, typer.Option(help="Ray cluster address (host:port or auto).")]
GpusPerJob = Annotated[float | None, typer.Option(help="GPUs per Ray job (default: 1 if any).")]
Out = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help="Run directory (default: rloop-runs/<experiment>-<model>-<config hash>).",
    ),
]
Force = Annotated[
    bool, typer.Option(help="Recompute even if the run directory holds a complete run.")
]


# ----------------------------------------------------------------------------- option groups
@dataclasses.dataclass(frozen=True)
class CausalOptions:
    """Options of every causal-battery command: model, prompts, R_V, statistics, run directory."""

    model: Model = DEFAULT_MODEL
    revision: Revision = None
    prompts: Prompts = None
    groups: Groups = None
    max_prompts: MaxPrompts = 10
    measure_layers: MeasureLayers = None
    window: Window = 16
    pr_mode: PrMode = "per-head"
    n_boot: NBoot = 2000
    seed: Seed = 0
    dtype: Dtype = None
    device: Device = None
    out: Out = None
    force: Force = False

    def settings(self) -> dict[str, Any]:
        """The fields of the experiments' CausalSettings, read and checked (ConfigError)."""
        return {
            "model": self.model,
            "revision": self.revision,
            "prompts": path_text(self.prompts),
            "groups": parse_names(self.groups),
            "max_prompts": parse_max_prompts(self.max_prompts),
            "measure_layers": parse_layer_pair(self.measure_layers, "--measure-layers"),
            "window": self.window,
            "pr_mode": self.pr_mode,
            "n_boot": self.n_boot,
            "seed": self.seed,
            "dtype": self.dtype,
            "device": self.device,
        }


@dataclasses.dataclass(frozen=True)
class ContractionOptions:
    """How ``contraction``, ``scaling`` and ``checkpoints`` measure R_V on each model."""

    prompts: Prompts = None
    bank_version: BankVersion = DEFAULT_BANK_VERSION
    groups: Groups = None
    layers: EarlyLate = None
    window: Window = 16
    pr_mode: PrModes = "both"
    point: Point = "v"
    recursive_group: RecursiveGroup = "L5"
    baseline_group: BaselineGroup = "factual"
    batch_size: BatchSize = 16
    n_boot: NBoot = 2000
    seed: Seed = 0
    dtype: Dtype = None
    device: Device = None

    def settings(self) -> dict[str, Any]:
        """The fields of the experiments' ContractionSettings, read and checked (ConfigError)."""
        return {
            "prompts": path_text(self.prompts),
            "bank_version": self.bank_version,
            "groups": parse_names(self.groups),
            "layers": parse_layer_pair(self.layers, "--layers"),
            "window": self.window,
            "pr_modes": ["per-head", "whole"] if self.pr_mode == "both" else [self.pr_mode],
            "point": self.point,
            "recursive_group": self.recursive_group,
            "baseline_group": self.baseline_group,
            "batch_size": self.batch_size,
            "n_boot": self.n_boot,
            "seed": self.seed,
            "dtype": self.dtype,
            "device": self.device,
        }


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """Generation length and sampling of ``temporal`` and ``kv-patch`` (fields as in configs)."""

    max_new_tokens: MaxNewTokens = 64
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    seed: Seed = 0

    def settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ExecutorOptions:
    """Where the jobs of a sweep run: one after another here, or on a Ray cluster."""

    executor: Executor = "local"
    ray_address: RayAddress = None
    gpus_per_job: GpusPerJob = None


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
