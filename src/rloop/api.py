"""The notebook-first Python API: ``import rloop`` gives the main verbs.

    import rloop
    lm = rloop.load("smollm2-135m")
    result = rloop.contraction(lm, prompts={"rec": [...], "base": [...]},
                               recursive_group="rec", baseline_group="base")
    result["contrasts"]        # a pandas DataFrame
    result.summary()           # the Markdown summary
    result                     # in Jupyter: a compact HTML report

Every verb takes the same settings (names and defaults) as the CLI command of the same name,
runs through the same runner (run record, resume, ``force``), and returns a
[`Result`][rloop.api.Result].
Prompts may be a path, a DataFrame (``text`` and optional ``group``, ``id``, ``pair_id``, ...
columns), a list of strings, or a dict ``group -> list of strings``; in-memory prompts are
written once to a content-addressed JSONL file, so the same prompts give the same run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd

from rloop.errors import ConfigError
from rloop.experiments.ablate import AblationConfig, run_head_sweep
from rloop.experiments.ablate_group import GroupAblationConfig, run_group_ablation
from rloop.experiments.ablate_layer import LayerAblationConfig, run_layer_ablation
from rloop.experiments.attn_vs_mlp import ComponentsConfig, run_components
from rloop.experiments.attribution import AttributionConfig, run_attribution
from rloop.experiments.contraction import ContractionConfig, run_contraction
from rloop.experiments.gain import GainConfig, run_gain
from rloop.experiments.heads import HeadDiagnosticsConfig, run_head_diagnostics
from rloop.experiments.kv_patch import KVPatchConfig, run_kv_patching
from rloop.experiments.patch import PatchConfig, run_patching
from rloop.experiments.robustness import RobustnessConfig, run_robustness
from rloop.experiments.saliency import SaliencyConfig, run_saliency
from rloop.experiments.subspace import SubspaceConfig, run_subspace
from rloop.experiments.temporal import TemporalConfig, run_temporal
from rloop.experiments.validate import load_validate_config, run_validate
from rloop.experiments.verify import VerifyConfig, run_verify
from rloop.models import LoadedModel, load_model
from rloop.models.embedded import cache_root
from rloop.runs.layout import read_manifest
from rloop.runs.markdown import markdown_table

PromptsLike = str | Path | pd.DataFrame | Sequence[str] | Mapping[str, Sequence[str]] | None


@dataclass
class Result:
    """A finished run: its directory, headline numbers, tidy tables, summary and plots."""

    path: Path
    headline: dict
    already_complete: bool = False
    _tables: dict[str, pd.DataFrame] = field(default_factory=dict, repr=False)

    @property
    def manifest(self) -> dict:
        """The run's ``manifest.json``: config, model, prompts, layers, versions, timings."""
        return read_manifest(self.path)

    @property
    def table_names(self) -> list[str]:
        """Names of the run's tidy tables, e.g. ``["results", "groups", "contrasts"]``."""
        return list(self.manifest.get("tables", []))

    def table(self, name: str) -> pd.DataFrame:
        """The tidy table ``name`` (e.g. "results") as a DataFrame."""
        if name not in self.table_names:
            raise ConfigError(
                f"this run has no table {name!r}; tables: {', '.join(self.table_names)}"
            )
        if name not in self._tables:
            self._tables[name] = pd.read_parquet(self.path / f"{name}.parquet")
        return self._tables[name]

    __getitem__ = table

    def summary(self) -> str:
        """The run's Markdown summary."""
        return (self.path / "summary.md").read_text(encoding="utf-8")

    @property
    def plot_names(self) -> list[str]:
        """Names of the run's plots (``plots/<name>.png``)."""
        return sorted(p.stem for p in (self.path / "plots").glob("*.png"))

    def plot(self, name: str):
        """The run's plot ``name`` as a matplotlib figure."""
        path = self.path / "plots" / f"{name}.png"
        if not path.exists():
            raise ConfigError(f"this run has no plot {name!r}; plots: {', '.join(self.plot_names)}")
        import matplotlib.pyplot as plt  # noqa: PLC0415 - only when a plot is asked for

        image = plt.imread(path)
        fig, ax = plt.subplots(figsize=(image.shape[1] / 100, image.shape[0] / 100), dpi=100)
        ax.imshow(image)
        ax.axis("off")
        return fig

    def save(self, directory: str | Path) -> Path:
        """Copy the run directory to ``directory`` (created) and return the copy's path."""
        target = Path(directory)
        shutil.copytree(self.path, target, dirs_exist_ok=True)
        return target

    def _repr_html_(self) -> str:
        from rloop.runs.site import render_markdown  # noqa: PLC0415 - Jupyter display only

        headline = pd.DataFrame([{"metric": k, "value": v} for k, v in self.headline.items()])
        tables = ", ".join(self.table_names)
        return (
            f"<div><p><b>{self.manifest.get('experiment')}</b> run <code>{self.path}</code>"
            f"</p>{render_markdown(markdown_table(headline))}<p>tables: {tables}</p>"
            f"<details><summary>summary</summary>{render_markdown(self.summary())}</details></div>"
        )

    def __repr__(self) -> str:
        return f"Result({self.path}, headline={self.headline})"


def load(
    model: str = "smollm2-135m",
    revision: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> LoadedModel:
    """Load a model by registry name, hub id (+ revision), local directory or GGUF file."""
    return load_model(model, revision=revision, device=device, dtype=dtype)


def prompts_file(prompts: PromptsLike) -> str | None:
    """A path rloop's loaders read, for any accepted form of ``prompts`` (None = the bank)."""
    if prompts is None or isinstance(prompts, str | Path):
        return None if prompts is None else str(prompts)
    if isinstance(prompts, pd.DataFrame):
        # a missing cell (NaN / None, e.g. no pair_id on a baseline prompt) is no field at all
        records = [
            {k: v for k, v in record.items() if not (pd.api.types.is_scalar(v) and pd.isna(v))}
            for record in prompts.to_dict(orient="records")
        ]
    elif isinstance(prompts, Mapping):
        records = [{"group": g, "text": t} for g, texts in prompts.items() for t in texts]
    else:
        records = [{"text": t} for t in prompts]
    lines = "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in records)
    digest = hashlib.sha256(lines.encode("utf-8")).hexdigest()[:16]
    path = cache_root() / "prompts" / f"prompts-{digest}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(lines, encoding="utf-8")
    return str(path)


def _setting_value(value: object) -> object:
    """A setting as the config takes it: a [`Result`][rloop.api.Result] becomes its run
    directory (e.g. ``from_sweep=sweep``), a list of ``(layer, head)`` pairs the CLI's
    ``"L.H,L.H"`` text."""
    if isinstance(value, Result):
        return str(value.path)
    if (
        isinstance(value, list | tuple)
        and value
        and all(isinstance(v, tuple) and len(v) == 2 for v in value)
    ):
        return ",".join(f"{layer}.{head}" for layer, head in value)
    return value


def _outcome(returned: object) -> tuple[Path, bool, dict]:
    """(run_dir, already_complete, headline) from a run function's tuple or outcome object."""
    if isinstance(returned, tuple):
        run_dir, already, headline = returned
        return Path(run_dir), bool(already), dict(headline)
    return (
        Path(returned.run_dir),
        bool(returned.already_complete),
        dict(returned.headline),
    )


def _run(
    make_config: Callable[..., Any],
    run: Callable[..., Any],
    lm: LoadedModel | str | None,
    prompts: PromptsLike,
    settings: dict,
    out: str | Path | None,
    force: bool,
) -> Result:
    model = None if lm is None or isinstance(lm, str) else lm  # a loaded model (duck-typed)
    names = {f.name for f in fields(make_config)} if isinstance(make_config, type) else None
    if names is not None:
        unknown = sorted(set(settings) - names)
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; see help of the command")
    settings = {key: _setting_value(value) for key, value in settings.items()}
    if isinstance(lm, str):
        settings["model"] = lm
    elif model is not None:
        settings["model"] = getattr(model, "name", settings.get("model"))
    if prompts is not None:
        settings["prompts"] = prompts_file(prompts)
    returned = run(make_config(**settings), out=out, force=force, lm=model)
    run_dir, already, headline = _outcome(returned)
    return Result(run_dir, headline, already)


# Every verb: ``lm`` is a loaded model (``rloop.load``) or a model name (default: the
# embedded model), ``prompts`` any accepted form (default: the shipped bank), ``out`` the run
# directory (default: one under the run store named by the settings), ``force`` recomputes a
# complete run; every other keyword is a field of the experiment's config (the CLI's names).


def contraction(lm=None, prompts: PromptsLike = None, *, out=None, force=False, **settings):
    """R_V per prompt and group with contrasts (``rloop contraction``; settings: the fields
    of [`ContractionConfig`][rloop.experiments.contraction.ContractionConfig])."""
    return _run(ContractionConfig, run_contraction, lm, prompts, settings, out, force)


def ablate(lm=None, prompts: PromptsLike = None, *, out=None, force=False, **settings):
    """The exact head-ablation sweep (``rloop ablate``; settings: the fields of
    [`AblationConfig`][rloop.experiments.ablate.AblationConfig])."""
    return _run(AblationConfig, run_head_sweep, lm, prompts, settings, out, force)


def ablate_group(lm=None, prompts: PromptsLike = None, *, out=None, force=False, **settings):
    """Ablate a set of heads together, against random head sets of the same size
    (``rloop ablate-group``; settings: the fields of
    [`GroupAblationConfig`][rloop.experiments.ablate_group.GroupAblationConfig]). ``heads`` may be
    ``"20.3,21.7"`` or ``[(20, 3), (21, 7)]``; ``from_sweep`` a run directory or the
    [`Result`][rloop.api.Result] of [`ablate`][rloop.api.ablate]."""
    return _run(GroupAblationConfig, run_group_ablation, lm, prompts, settings, out, force)


def ablate_layer(lm=None, prompts: PromptsLike = None, *, out=None, force=False, **settings):
    """Ablate whole attention / MLP outputs per layer (``rloop ablate-layer``; settings: the
    fields of [`LayerAblationConfig`][rloop.experiments.ablate_layer.LayerAblationConfig])."""
    return _run(LayerAblationConfig, run_layer_ablation, lm, prompts, settings, out, force)


def attn_vs_mlp(lm=None, prompts: PromptsLike = None, *, out=None, force=False, **settings):
    """PR of the attention vs the MLP output per layer (``rloop attn-vs-mlp``; settings: the
    fields of [`ComponentsConfig`][rloop.experiments.attn_vs_mlp.ComponentsConfig])."""
    return _run(ComponentsConfig, run_components, lm, prompts, settings, out, force)


def attribution(lm=None, prompts: PromptsLike = None, *, out=None, force=False, **settings):
    """Attribution patching: the linear estimate of every head's ablation effect on R_V
    (``rloop attribution``; settings: the fields of
    [`AttributionConfig`][rloop.experiments.attribution.AttributionConfig]); ``from_sweep`` (a run
    directory or the [`Result`][rloop.api.Result] of [`ablate`][rloop.api.ablate]) compares it
    with the exact sweep."""
    return _run(AttributionConfig, run_attribution, lm, prompts, settings, out, force)


def heads(lm=None, prompts: PromptsLike = None, *, out=None, force=False, **settings):
    """Per-head norm, PR, attention self-score and entropy (``rloop heads``; settings: the
    fields of [`HeadDiagnosticsConfig`][rloop.experiments.heads.HeadDiagnosticsConfig])."""
    return _run(HeadDiagnosticsConfig, run_head_diagnostics, lm, prompts, settings, out, force)


def saliency(lm=None, prompts: PromptsLike = None, *, out=None, force=False, **settings):
    """Gradient saliency ||dR_V/dz|| of every head (``rloop saliency``; settings: the fields
    of [`SaliencyConfig`][rloop.experiments.saliency.SaliencyConfig])."""
    return _run(SaliencyConfig, run_saliency, lm, prompts, settings, out, force)


def patch(lm=None, prompts: PromptsLike = None, *, out=None, force=False, **settings):
    """Activation patching from source to target prompts, with transfer % (``rloop patch``;
    settings: the fields of [`PatchConfig`][rloop.experiments.patch.PatchConfig])."""
    return _run(PatchConfig, run_patching, lm, prompts, settings, out, force)


def kv_patch(lm=None, prompts: PromptsLike = None, *, out=None, force=False, **settings):
    """KV-cache substitution and alpha mixing over layer ranges, then generation and R_V on
    the generated windows (``rloop kv-patch``; settings: the fields of
    [`KVPatchConfig`][rloop.experiments.kv_patch.KVPatchConfig], e.g. ``ranges=["15-29", "25"]``,
    ``alphas=[0, 0.5, 1]``, ``n_pairs``, ``max_new_tokens``)."""
    return _run(KVPatchConfig, run_kv_patching, lm, prompts, settings, out, force)


def temporal(lm=None, prompts: PromptsLike = None, *, out=None, force=False, **settings):
    """R_V after every generated token (``rloop temporal``; settings: the fields of
    [`TemporalConfig`][rloop.experiments.temporal.TemporalConfig])."""
    return _run(TemporalConfig, run_temporal, lm, prompts, settings, out, force)


def robustness(lm=None, prompts: PromptsLike = None, *, out=None, force=False, **settings):
    """The specification curve of the contraction effect over layers, windows, hook points,
    PR modes and estimators (``rloop robustness``; settings: the fields of
    [`RobustnessConfig`][rloop.experiments.robustness.RobustnessConfig])."""
    return _run(RobustnessConfig, run_robustness, lm, prompts, settings, out, force)


def subspace(lm=None, prompts: PromptsLike = None, *, out=None, force=False, **settings):
    """Geometry of the contracted subspace (``rloop subspace``; settings: the fields of
    [`SubspaceConfig`][rloop.experiments.subspace.SubspaceConfig])."""
    return _run(SubspaceConfig, run_subspace, lm, prompts, settings, out, force)


def verify(lm=None, *, out=None, force=False, **settings):
    """Fidelity self-check of the model (``rloop verify``; settings: the fields of
    [`VerifyConfig`][rloop.experiments.verify.VerifyConfig])."""
    return _run(VerifyConfig, run_verify, lm, None, settings, out, force)


def validate(
    lm=None, prompts: PromptsLike = None, *, config=None, out=None, force=False, **settings
):
    """The 4-phase validation run (``rloop validate``): R_V contraction statistics, a
    V-patching null, KV-cache patching and an alpha dose-response, each with a verdict.
    ``config``: a TOML file (default: the shipped one); settings override its fields
    ([`ValidateConfig`][rloop.experiments.validate.ValidateConfig])."""

    def make(**values):
        return load_validate_config(config, **values)

    return _run(make, run_validate, lm, prompts, settings, out, force)


def gain(models=None, prompts: PromptsLike = None, *, out=None, force=False, **settings):
    """Residual-stream gain per block across models (``rloop gain``; settings: the fields of
    [`GainConfig`][rloop.experiments.gain.GainConfig]); ``models``: one name or a list."""
    if models is not None:
        settings["models"] = [models] if isinstance(models, str) else list(models)

    def run(cfg, out=None, force=False, lm=None):
        return run_gain(cfg, out=out, force=force)

    return _run(GainConfig, run, None, prompts, settings, out, force)


VERBS = (
    "load",
    "contraction",
    "ablate",
    "ablate_group",
    "ablate_layer",
    "attn_vs_mlp",
    "attribution",
    "heads",
    "saliency",
    "patch",
    "kv_patch",
    "temporal",
    "robustness",
    "subspace",
    "verify",
    "validate",
    "gain",
)
"""The verbs ``import rloop`` puts at the top level."""
