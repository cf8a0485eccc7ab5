"""The one runner: what every experiment does around its measurement.

- :func:`execute` opens (or resumes) the run directory, calls the experiment's body, records
  the headline, marks the run complete (or failed, with a one-line error) and writes the
  run's ``report.html``. Everything that can be rejected is checked by the caller *before* it
  is called, so a rejected request writes nothing.
- :func:`run_units` runs the units of work of an experiment (prompt batches, layers, head
  chunks, generation chunks) with a progress bar, saves each finished unit's rows as a resume
  checkpoint, and on a resumed run skips what was already done (the bar counts it as done).
- :func:`prompt_batches` plans prompt batches of similar length whose padded token count fits
  a memory budget (:func:`token_budget`), never only a row count.
- :func:`record_inputs` writes the model, the prompts (with token lengths) and the R_V layers
  into the manifest.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pandas as pd

from rloop.capture.batching import EncodedBatch, encode, plan_batches, token_counts
from rloop.capture.memory import activation_bytes_per_token, default_memory_budget
from rloop.errors import RunStoreError
from rloop.experiments.settings import Prepared
from rloop.models import LoadedModel
from rloop.progress import progress_bar
from rloop.prompts import Prompt, PromptSet, token_length_report
from rloop.runs import Run, default_run_dir, runs_root
from rloop.runs.site import REPORT_NAME, write_run_report_safely

Unit = TypeVar("Unit")


@dataclass
class RunOutcome:
    run_dir: Path
    already_complete: bool
    headline: dict

    def as_tuple(self) -> tuple[Path, bool, dict]:
        """(run_dir, already_complete, headline): what the ``run_*`` functions return."""
        return self.run_dir, self.already_complete, self.headline


def model_manifest(lm: LoadedModel) -> dict:
    """The model as the manifest records it (name, source, revision, weights hash, sizes)."""
    return {
        "name": lm.name,
        "source": lm.source,
        "path": str(lm.path),
        "revision": lm.revision,
        "weights_sha256": lm.weights_sha256,
        "dtype": str(lm.dtype).replace("torch.", ""),
        "device": str(lm.device),
        "family": lm.adapter.family,
        "n_layers": lm.adapter.n_layers,
        "n_heads": lm.adapter.n_heads,
        "n_kv_heads": lm.adapter.n_kv_heads,
        "d_head": lm.adapter.d_head,
    }


def prompts_manifest(prompt_set: PromptSet, tokenizer) -> dict:
    """The prompt set as the manifest records it (source, version, sha256, token lengths)."""
    report = token_length_report(prompt_set, tokenizer)
    return {
        "source": str(prompt_set.source),
        "version": prompt_set.version,
        "sha256": prompt_set.sha256,
        "n": len(prompt_set),
        "groups": {g: int(n) for g, n in report.set_index("group")["n"].items()},
        "token_lengths": report.to_dict(orient="records"),
    }


def record_model_and_prompts(run: Run, lm: LoadedModel, prompts: PromptSet) -> None:
    """The model and the prompts used into the run manifest."""
    run.set_model(model_manifest(lm))
    run.set_prompts(prompts_manifest(prompts, lm.tokenizer))


def record_inputs(run: Run, prepared: Prepared, **extra: object) -> None:
    """Model, prompts and R_V layers (with their rule) into the run manifest."""
    record_model_and_prompts(run, prepared.lm, prepared.prompts)
    run.update_manifest(
        layers={"early": prepared.early, "late": prepared.late, "rule": prepared.rule}, **extra
    )


def run_identity(config, **resolved: object) -> dict:
    """The config that names a run (its hash picks the run directory): ``config.to_dict()``
    with the settings resolved against the model (e.g. ``measure_layers=[early, late]`` from
    the depth rule) written as their values. So the default and the same values given
    explicitly (``--layers 5,25`` on a 30-layer model) are one run, reused, not two."""
    values = config.to_dict()
    for name, value in resolved.items():
        if name not in values:
            raise KeyError(f"{type(config).__name__} has no setting {name!r}")
        values[name] = list(value) if isinstance(value, tuple) else value
    return values


def execute(
    experiment: str,
    config: dict,
    model_name: str,
    out: Path | None,
    body: Callable[[Run], dict],
    *,
    force: bool = False,
) -> RunOutcome:
    """Open the run directory and call ``body(run)``; ``body`` returns the headline metrics.

    A completed run gets ``report.html`` (:func:`rloop.runs.site.write_run_report`) next to
    its summary. A report that cannot be written does not fail the run: its tables, summary
    and plots are complete, so it stays "complete", and the manifest's ``report_error`` and a
    RuntimeWarning say why. A failed run gets no report.
    """
    run_dir = (
        Path(out)
        if out is not None
        else default_run_dir(runs_root(), experiment, model_name, config)
    )
    with Run.open(run_dir, experiment=experiment, config=config, resume=not force) as run:
        if run.already_complete and not force:
            return RunOutcome(run.path, True, run.manifest.get("headline", {}))
        with contextlib.suppress(FileNotFoundError):
            (run.path / REPORT_NAME).unlink()  # a report of earlier results must not outlive them
        started = time.time()
        headline = body(run)
        run.update_manifest(headline=headline, wall_seconds=time.time() - started)
        run.complete()
        _write_report(run)
    return RunOutcome(run_dir, False, headline)


def _write_report(run: Run) -> None:
    """``report.html`` of a complete run, or a note in the manifest saying why there is none."""
    problem = write_run_report_safely(run.path)
    if problem is None:
        return
    note = (
        f"report.html not written ({problem}); the results are complete: write it with "
        "rloop.runs.site.write_run_report(run_dir) or see the run in `rloop report`"
    )
    with contextlib.suppress(RunStoreError):  # the warning below still tells the user
        run.update_manifest(report_error=note)
    warnings.warn(f"run {run.run_id}: {note}", RuntimeWarning, stacklevel=3)


def run_units(
    run: Run | None,
    units: Sequence[Unit],
    compute: Callable[[Unit], pd.DataFrame],
    key: Callable[[Unit], str],
    label: str,
    weight: Callable[[Unit], int] = lambda unit: 1,
) -> pd.DataFrame:
    """Rows of every unit, computing only those not finished in an earlier session.

    compute(unit) returns the unit's tidy rows; they are saved as checkpoint ``key(unit)``
    when ``run`` is given. The progress bar advances by ``weight(unit)`` per unit (e.g. its
    number of prompts) and starts at what a resumed run had already done. Returns the rows of
    all units, in the order of ``units``.
    """
    done = run.finished_keys() if run is not None else set()
    frames: dict[str, pd.DataFrame] = {}
    total = sum(weight(unit) for unit in units)
    with progress_bar(label, total=total) as advance:
        advance(sum(weight(unit) for unit in units if key(unit) in done))
        for unit in units:
            name = key(unit)
            if name in done:
                continue
            rows = compute(unit)
            if run is not None:
                run.save_partial(name, rows)
            frames[name] = rows
            advance(weight(unit))
    if run is not None and done:
        saved = run.load_partial_frames({key(unit) for unit in units} & done)
        frames = {**saved, **frames}
    ordered = [frames[key(unit)] for unit in units if key(unit) in frames]
    ordered = [frame for frame in ordered if len(frame.columns)]
    return pd.concat(ordered, ignore_index=True) if ordered else pd.DataFrame()


@dataclass(frozen=True)
class PromptBatch:
    """One batch of prompts: its number (the checkpoint key), positions in the set, prompts."""

    number: int
    indices: list[int]
    prompts: list[Prompt]

    @property
    def key(self) -> str:
        return f"batch-{self.number:05d}"

    def encode(self, lm: LoadedModel) -> EncodedBatch:
        return encode(lm.tokenizer, [p.text for p in self.prompts], lm.device)


def token_budget(lm: LoadedModel, width: int, memory_bytes: int | None = None) -> int:
    """Padded tokens one forward may hold: the memory budget over the activation bytes of a
    ``width``-token row-token (a quarter of free GPU memory, 1 GiB on the CPU by default)."""
    budget = memory_bytes if memory_bytes is not None else default_memory_budget(lm.device)
    per_token = activation_bytes_per_token(lm.model, lm.adapter, width)
    return max(width, budget // max(1, per_token))


def prompt_batches(
    lm: LoadedModel, prompts: Sequence[Prompt], batch_size: int, max_tokens: int | None = None
) -> list[PromptBatch]:
    """Batches of similar-length prompts: at most ``batch_size`` rows and at most
    ``max_tokens`` padded tokens each (default: :func:`token_budget` of the longest prompt)."""
    prompts = list(prompts)
    lengths = token_counts(lm.tokenizer, [p.text for p in prompts])
    if max_tokens is None and lengths:
        max_tokens = token_budget(lm, max(lengths))
    plan = plan_batches(lengths, batch_size, max_tokens)
    return [
        PromptBatch(number, indices, [prompts[i] for i in indices])
        for number, indices in enumerate(plan)
    ]


def encode_prompts(lm: LoadedModel, prompts: PromptSet | Sequence[Prompt]) -> EncodedBatch:
    """All ``prompts`` as one right-padded batch on the model's device."""
    return encode(lm.tokenizer, [p.text for p in prompts], lm.device)
