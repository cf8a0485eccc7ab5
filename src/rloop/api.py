"""The notebook-first Python API: ``import rloop`` gives the main verbs.

    import rloop
    lm = rloop.load("smollm2-135m")
    result = rloop.contraction(lm, prompts={"rec": [...], "base": [...]},
                               recursive_group="rec", baseline_group="base")
    result["contrasts"]        # a pandas DataFrame
    result.summary()           # the Markdown summary
    result                     # in Jupyter: a compact HTML report

Every verb takes the same settings (names and defaults) as the CLI command of the same name,
runs through the same runner (run record, resume, ``force``), and returns a :class:`Result`.
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
from rloop.experiments.contraction import ContractionConfig, run_contraction
from rloop.experiments.gain import GainConfig, run_gain
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
        return read_manifest(self.path)

    @property
    def table_names(self) -> list[str]:
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
        records = prompts.to_dict(orient="records")
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


def _run(
    make_config: Callable[..., Any],
    run: Callable[..., tuple],
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
    if isinstance(lm, str):
        settings["model"] = lm
    elif model is not None:
        settings["model"] = getattr(model, "name", settings.get("model"))
    if prompts is not None:
        settings["prompts"] = prompts_file(prompts)
    run_dir, already, headline = run(make_config(**settings), out=out, force=force, lm=model)
    return Result(Path(run_dir), headline, already)


def contraction(lm=None, prompts: PromptsLike = None, *, out=None, force=False, **settings):
    """R_V per prompt and group with contrasts (``rloop contraction``)."""
    return _run(ContractionConfig, run_contraction, lm, prompts, settings, out, force)


def ablate(lm=None, prompts: PromptsLike = None, *, out=None, force=False, **settings):
    """The exact head-ablation sweep (``rloop ablate``)."""
    return _run(AblationConfig, run_head_sweep, lm, prompts, settings, out, force)


def verify(lm=None, *, out=None, force=False, **settings):
    """Fidelity self-check of the model (``rloop verify``)."""
    return _run(VerifyConfig, run_verify, lm, None, settings, out, force)


def validate(
    lm=None, prompts: PromptsLike = None, *, config=None, out=None, force=False, **settings
):
    """The 4-phase validation run (``rloop validate``); ``config``: a TOML file."""

    def make(**values):
        return load_validate_config(config, **values)

    return _run(make, run_validate, lm, prompts, settings, out, force)


def gain(models=None, prompts: PromptsLike = None, *, out=None, force=False, **settings):
    """Residual-stream gain per block across models (``rloop gain``)."""
    if models is not None:
        settings["models"] = [models] if isinstance(models, str) else list(models)

    def run(cfg, out=None, force=False, lm=None):
        return run_gain(cfg, out=out, force=force)

    return _run(GainConfig, run, None, prompts, settings, out, force)
