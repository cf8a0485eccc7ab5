"""Scaling sweeps (many models) and training-checkpoint sweeps (one model, many revisions).

Seed 000 cells 10, 11 (checkpoints) and 14 (scaling). Every (model, revision, experiment) is
an independent :class:`SweepJob` that loads its model, runs one experiment into its own
child run directory ``<sweep run>/jobs/<key>/`` (a complete contraction or gain run), frees
the model and optionally evicts the checkpoint's files. Jobs run in this process or on Ray
(:mod:`rloop.experiments.executors`). The sweep run saves one partial per finished job, so an
interrupted sweep resumes with the unfinished jobs; a failing job is recorded with its error
and the others go on (the CLI then exits with :data:`FAILED_JOBS_EXIT`). Job writes are
idempotent: a job whose child run is complete (a Ray retry, a resumed sweep) returns the
recorded result without loading the model, so a checkpoint that was measured and evicted is
taken from the record and not needed on disk again.

Everything the jobs share (settings, prompts, the contrasted groups and their sizes) is
checked once, before the sweep run directory is created. The sweep run itself goes through
:func:`rloop.experiments.runner.execute` like every experiment (complete or failed, headline,
``report.html``); its manifest's ``model`` names the swept model(s) and checkpoints.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from rloop.errors import ConfigError, RloopError
from rloop.experiments.contraction import (
    ContractionConfig,
    resolve_design,
    run_contraction,
    validate_config,
)
from rloop.experiments.executors import LocalExecutor
from rloop.experiments.gain import (
    GainConfig,
    check_unique,
    default_loader,
    free_model,
    h25_predictions,
    plot_h25,
    rho_gain_correlations,
    run_gain,
)
from rloop.experiments.runner import execute
from rloop.experiments.settings import (
    check_groups,
    check_point_name,
    contrasted_groups,
    load_prompt_set,
)
from rloop.interventions.engine import check_mode_for_point
from rloop.models.architecture import count_parameters
from rloop.prompts import DEFAULT_BANK_VERSION
from rloop.runs import Run, default_run_dir, runs_root
from rloop.runs import plots as plotting
from rloop.runs.layout import atomic_write_text, config_hash, one_line_error, read_manifest
from rloop.runs.markdown import markdown_table

JOB_FILE = "job.json"
FAILED_JOBS_EXIT = 3  # CLI exit code of a sweep that completed with failed jobs
SCALING = "scaling"
CHECKPOINTS = "checkpoints"
_STEP = re.compile(r"(\d+)(?!.*\d)")  # the last number in a revision or directory name


# ---------------------------------------------------------------------------- configs


@dataclass
class ContractionSettings:
    """The contraction settings every job of a sweep uses (see ContractionConfig)."""

    prompts: str | None = None
    bank_version: str = DEFAULT_BANK_VERSION  # as contraction (v2); "v1" stays loadable
    groups: list[str] | None = None
    layers: list[int] | None = None
    window: int = 16
    pr_modes: list[str] = field(default_factory=lambda: ["per-head", "whole"])
    point: str = "v"
    recursive_group: str = "L5"
    baseline_group: str = "factual"
    batch_size: int = 16
    n_boot: int = 2000
    seed: int = 0
    dtype: str | None = None
    device: str | None = None  # "auto" spreads a model over all GPUs (device_map="auto")
    # --verify: the fidelity self-check on each model before its contraction job (a FAIL
    # fails that job). Not part of the sweep's identity (left out of to_dict's hash input).
    verify: bool = False


def _sweep_dict(config) -> dict:
    """``asdict(config)`` without ``settings.verify`` (it must not change the run directory)."""
    values = asdict(config)
    values["settings"].pop("verify", None)
    return values


@dataclass
class ScalingConfig:
    models: list[str] = field(default_factory=list)
    revision: str | None = None
    gain: bool = False  # also run the gain experiment on every model
    settings: ContractionSettings = field(default_factory=ContractionSettings)

    def to_dict(self) -> dict:
        return _sweep_dict(self)


@dataclass
class CheckpointConfig:
    model: str | None = None  # hub id / registry name with --revisions
    revisions: list[str] | None = None
    checkpoint_dirs: list[str] | None = None  # local directories, one per checkpoint
    evict: bool = False  # delete each checkpoint's files after it is measured
    settings: ContractionSettings = field(default_factory=ContractionSettings)

    def to_dict(self) -> dict:
        return _sweep_dict(self)


# ---------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class SweepJob:
    """One (model, revision, experiment). ``out`` is the absolute child run directory."""

    key: str
    experiment: str  # "contraction" | "gain"
    model: str
    revision: str | None
    label: str
    step: int | None
    out: str
    config: dict
    evict: str | None = None  # None | "hub" (HF cache entry) | "local" (the directory)
    verify: bool = False  # the fidelity self-check before a contraction job (not in config)


@dataclass
class JobResult:
    key: str
    status: str  # "done" | "failed"
    error: str | None = None
    run_dir: str | None = None
    wall_s: float = 0.0
    n_params: int | None = None
    evicted: list[str] = field(default_factory=list)
    tables: dict[str, list[dict]] = field(default_factory=dict)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace("/", "--")).strip("._-")[:50] or "x"


def step_of(text: str | None) -> int | None:
    """``step143000`` -> 143000; ``ckpt/step-5000`` -> 5000; no number -> None."""
    if not text:
        return None
    match = _STEP.search(Path(text).name)
    return int(match.group(1)) if match else None


def failed_result(job: SweepJob, error: BaseException) -> JobResult:

    return JobResult(job.key, "failed", error=one_line_error(error), run_dir=job.out)


def _read_job_file(job: SweepJob) -> JobResult | None:
    """The recorded result of a job whose child run is complete with the same config."""

    path = Path(job.out) / JOB_FILE
    try:
        manifest = json.loads((Path(job.out) / "manifest.json").read_text())
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("status") != "complete" or manifest.get("config_hash") != config_hash(
        job.config
    ):
        return None
    return JobResult(**recorded)


def evict_checkpoint(path: str | Path, mode: str) -> list[str]:
    """Delete a measured checkpoint's files; returns what was deleted.

    mode "hub": ``path`` is a snapshot in a Hugging Face cache
    (``.../models--org--name/snapshots/<commit>``): that revision is deleted with
    huggingface_hub's cache API (blobs shared with other revisions are kept).
    mode "local": the directory itself is removed.
    """
    path = Path(path)
    if mode == "local":
        if path.is_dir():
            shutil.rmtree(path)
            return [str(path)]
        return []
    if mode != "hub":
        raise ConfigError(f"unknown eviction mode {mode!r}")
    if path.parent.name != "snapshots" or not path.parent.parent.name.startswith("models--"):
        return []  # not in a hub cache (e.g. an embedded model): nothing to evict
    from huggingface_hub import scan_cache_dir

    repo_dir = path.parent.parent
    info = scan_cache_dir(repo_dir.parent)
    for repo in info.repos:
        if Path(repo.repo_path).resolve() == repo_dir.resolve():
            hashes = [r.commit_hash for r in repo.revisions if r.commit_hash == path.name]
            if hashes:
                info.delete_revisions(*hashes).execute()
                return [str(path)]
    return []


def run_job(job: SweepJob, loader: Callable | None = None) -> JobResult:
    """Run one sweep job (in this process or a Ray worker); never raises for job failures."""

    recorded = _read_job_file(job)
    if recorded is not None:
        if job.evict and recorded.status == "done" and not recorded.evicted:
            recorded.evicted = _evict_quietly(job, None)
        return recorded
    load = loader or default_loader
    started = time.perf_counter()
    lm = None
    try:
        settings = {k: v for k, v in job.config.items() if k not in ("model", "revision")}
        lm = load(job.model, revision=job.revision, device=settings.get("device"),
                  dtype=settings.get("dtype"))  # fmt: skip
        n_params = count_parameters(lm.model)
        snapshot_path = getattr(lm, "path", None)
        tables = _run_experiment(job, lm)
    except (RloopError, RuntimeError, OSError, ValueError, KeyError) as err:
        return failed_result(job, err)
    finally:
        if lm is not None:
            free_model(lm)
    result = JobResult(
        job.key,
        "done",
        run_dir=job.out,
        wall_s=time.perf_counter() - started,
        n_params=n_params,
        tables=tables,
    )
    # The record comes first: a checkpoint evicted after it is measured must never be needed
    # again, even if the process dies between the two (the record then says not yet evicted,
    # and the next run evicts it).
    _write_job_file(job, result)
    if job.evict:
        result.evicted = _evict_quietly(job, snapshot_path)
        _write_job_file(job, result)
    return result


def _write_job_file(job: SweepJob, result: JobResult) -> None:
    text = json.dumps(asdict(result), default=str)
    atomic_write_text(Path(job.out) / JOB_FILE, text)  # same content on every retry


def _evict_quietly(job: SweepJob, snapshot_path) -> list[str]:
    target = job.model if job.evict == "local" else snapshot_path
    if target is None:
        return []
    try:
        return evict_checkpoint(target, job.evict)
    except OSError as err:
        return [f"eviction failed: {err}"]


def _run_experiment(job: SweepJob, lm) -> dict[str, list[dict]]:
    if job.experiment == "contraction":
        config = ContractionConfig(**job.config, verify=job.verify)
        run_dir, _, _ = run_contraction(config, out=Path(job.out), lm=lm)
        return {
            "contrasts": _records(run_dir / "contrasts.parquet"),
            "groups": _records(run_dir / "groups.parquet"),
        }
    if job.experiment == "gain":
        run_dir, _, _ = run_gain(
            GainConfig(**job.config), out=Path(job.out), loader=lambda *a, **k: lm
        )
        return {"models": _records(run_dir / "models.parquet"),
                "curves": _records(run_dir / "curves.parquet")}  # fmt: skip
    raise ConfigError(f"unknown sweep experiment {job.experiment!r}")


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    # 15 decimals (the most to_json writes; its default 10 would round the tables)
    return json.loads(pd.read_parquet(path).to_json(orient="records", double_precision=15))


# ---------------------------------------------------------------------------- job lists


def _contraction_config(settings: ContractionSettings, model: str, revision) -> dict:
    """The job's full contraction config (defaults filled in: hashes like the child run's)."""
    values = {k: v for k, v in asdict(settings).items() if k != "verify"}
    return ContractionConfig(model=model, revision=revision, **values).to_dict()


def _gain_config(settings: ContractionSettings, model: str, revision) -> dict:
    return {
        "models": [model],
        "revision": revision,
        "prompts": settings.prompts,
        "bank_version": settings.bank_version,
        "groups": settings.groups,
        "batch_size": settings.batch_size,
        "rho_threshold": 0.2,
        "n_boot": settings.n_boot,
        "seed": settings.seed,
        "dtype": settings.dtype,
        "device": settings.device,
    }


def scaling_jobs(config: ScalingConfig, sweep_dir: Path) -> list[SweepJob]:
    if not config.models:
        raise ConfigError("no models given: pass --models a,b,c")
    check_unique(list(config.models), "model(s)")
    experiments = ["contraction", "gain"] if config.gain else ["contraction"]
    jobs = []
    for index, model in enumerate(config.models):
        for experiment in experiments:
            key = f"job-{index:03d}-{experiment}-{_slug(model)}"
            make = _contraction_config if experiment == "contraction" else _gain_config
            jobs.append(
                SweepJob(
                    key=key,
                    experiment=experiment,
                    model=model,
                    revision=config.revision,
                    label=model,
                    step=None,
                    out=str(sweep_dir / "jobs" / key),
                    config=make(config.settings, model, config.revision),
                    verify=config.settings.verify and experiment == "contraction",
                )
            )
    return jobs


def checkpoint_jobs(config: CheckpointConfig, sweep_dir: Path) -> list[SweepJob]:
    if bool(config.revisions) == bool(config.checkpoint_dirs):
        raise ConfigError("give either --revisions (with --model) or --checkpoint-dirs, not both")
    jobs = []
    if config.revisions:
        if not config.model:
            raise ConfigError("--revisions needs --model (the hub id the revisions belong to)")
        check_unique(list(config.revisions), "revision(s)")
        entries = [(config.model, r, r, "hub") for r in config.revisions]
    else:
        dirs = [str(Path(d).expanduser().absolute()) for d in config.checkpoint_dirs or []]
        check_unique(dirs, "checkpoint director(y/ies)")
        entries = [(d, None, Path(d).name, "local") for d in dirs]
    for index, (model, revision, label, mode) in enumerate(entries):
        key = f"job-{index:03d}-contraction-{_slug(label)}"
        jobs.append(
            SweepJob(
                key=key,
                experiment="contraction",
                model=model,
                revision=revision,
                label=label,
                step=step_of(label),
                out=str(sweep_dir / "jobs" / key),
                config=_contraction_config(config.settings, model, revision),
                evict=mode if config.evict else None,
                verify=config.settings.verify,
            )
        )
    _check_checkpoints_on_disk(jobs)
    return jobs


def _check_checkpoints_on_disk(jobs: list[SweepJob]) -> None:
    """ConfigError naming every local checkpoint directory that is missing and not already
    measured (a job whose result is recorded by an earlier run of this sweep, e.g. before
    ``--evict`` deleted it, needs no files)."""
    missing = [
        job.model
        for job in jobs
        if job.evict != "hub" and job.revision is None and not Path(job.model).is_dir()
        and _read_job_file(job) is None
    ]  # fmt: skip
    if missing:
        raise ConfigError(
            f"checkpoint director(y/ies) not found: {', '.join(missing)} (and not measured by "
            "an earlier run of this sweep); check the paths"
        )


def _validate_settings(settings: ContractionSettings) -> None:
    """Everything the jobs share, once, before the first job: the settings, the hook point,
    the prompt file, the contrasted groups (present, at least 2 prompts each) and the design
    (twin group and pairs). A model-specific problem (layers, window) fails only its job."""
    config = ContractionConfig(**_contraction_config(settings, "-", None))
    validate_config(config)
    check_point_name(settings.point)
    check_mode_for_point(settings.point, settings.pr_modes)
    prompt_set = load_prompt_set(settings.prompts, settings.bank_version, settings.groups)
    check_groups(prompt_set, contrasted_groups(settings))
    resolve_design(prompt_set, config)


def failed_jobs(run_dir: Path) -> list[dict]:
    """The jobs (or models, for ``gain``) a finished sweep recorded as failed: dicts with
    ``label`` and ``error`` (empty when none failed or the manifest has no record)."""
    failures = read_manifest(Path(run_dir)).get("failures") or []
    return [
        {"label": f.get("label") or f.get("model") or f.get("key"), "error": f.get("error")}
        for f in failures
        if isinstance(f, dict)
    ]


# ---------------------------------------------------------------------------- the sweep run


@dataclass
class SweepOutcome:
    run_dir: Path
    already_complete: bool
    headline: dict


def _run_sweep(
    experiment: str,
    config_dict: dict,
    label: str,
    make_jobs: Callable[[Path], list[SweepJob]],
    settings: ContractionSettings,
    write_outputs: Callable,
    out: Path | None,
    force: bool,
    executor,
    loader: Callable | None,
) -> SweepOutcome:
    """Validate, plan the jobs, then run the sweep run through the runner (see the module)."""
    _validate_settings(settings)
    run_dir = (
        Path(out)
        if out is not None
        else default_run_dir(runs_root(), experiment, label, config_dict)
    )
    run_dir = run_dir.expanduser().absolute()
    jobs = make_jobs(run_dir)  # validates the lists before anything is written
    executor = executor or LocalExecutor()

    def body(run: Run) -> dict:
        run.set_model(sweep_model_record(experiment, config_dict, jobs))
        return _sweep_body(run, jobs, executor, loader, write_outputs)

    outcome = execute(experiment, config_dict, label, run_dir, body, force=force)
    return SweepOutcome(outcome.run_dir, outcome.already_complete, outcome.headline)


def sweep_model_record(experiment: str, config_dict: dict, jobs: list[SweepJob]) -> dict:
    """The sweep manifest's ``model``: what the site index and ``rloop runs list`` show.

    scaling: the models, comma-separated (``models`` lists them). checkpoints: the hub id
    with its revisions, or for local checkpoint directories the directory holding them
    (``path``); ``checkpoints`` lists the checkpoint labels in sweep order.
    """
    if experiment == SCALING:
        models = [job.model for job in jobs if job.experiment == "contraction"]
        return {
            "name": ", ".join(models),
            "models": models,
            "revision": config_dict.get("revision"),
            "source": "sweep",
        }
    labels = [job.label for job in jobs]
    if config_dict.get("revisions"):
        return {
            "name": config_dict.get("model"),
            "revision": ", ".join(config_dict["revisions"]),
            "checkpoints": labels,
            "source": "hub",
        }
    parents = {str(Path(job.model).parent) for job in jobs}
    parent = parents.pop() if len(parents) == 1 else None
    return {
        "name": Path(parent).name if parent else ", ".join(labels),
        "path": parent,
        "revision": None,
        "checkpoints": labels,
        "source": "local",
    }


def _sweep_body(run: Run, jobs: list[SweepJob], executor, loader, write_outputs) -> dict:
    """Run the unfinished jobs, record each result, write the sweep's tables; the headline."""
    done = run.finished_keys()
    todo = [job for job in jobs if job.key not in done]
    run.update_manifest(
        sweep={
            "n_jobs": len(jobs),
            "executor": executor.name,
            "resumed_with_done": len(jobs) - len(todo),
        }  # fmt: skip
    )

    def on_result(job: SweepJob, result: JobResult) -> None:
        if result.status == "done":
            for name, rows in result.tables.items():
                run.save_partial(f"{job.key}.{name}", pd.DataFrame(rows))
        row = {k: v for k, v in asdict(result).items() if k != "tables"}
        row["evicted"] = "; ".join(result.evicted)
        row.update(model=job.model, revision=job.revision, label=job.label, step=job.step,
                   experiment=job.experiment)  # fmt: skip
        if result.status == "done":
            run.save_partial(job.key, pd.DataFrame([row]))
        else:
            failures = [f for f in run.manifest.get("failures", []) if f["key"] != job.key]
            run.update_manifest(failures=[*failures, row])

    executor.run(todo, functools.partial(run_job, loader=loader), on_result, failed_result)
    keys = run.finished_keys()
    finished = [job for job in jobs if job.key in keys]
    failures = [f for f in run.manifest.get("failures", []) if f["key"] not in keys]
    run.update_manifest(failures=failures)
    if not finished:
        raise RloopError(
            "every job failed: " + "; ".join(f"{f['label']}: {f['error']}" for f in failures)
        )
    status = _load(run, [job.key for job in finished])
    tables = {
        name: _load(run, [f"{j.key}.{name}" for j in finished], job_frame=finished)
        for name in ("contrasts", "groups", "models", "curves")
    }
    failed = pd.DataFrame(failures, columns=["key", "label", "model", "revision", "error"])
    headline = write_outputs(run, status, tables, failed)
    headline.update(n_jobs=len(jobs), n_failed=len(failed))
    return headline


def _load(run, keys: list[str], job_frame: list[SweepJob] | None = None) -> pd.DataFrame:
    frames = []
    by_key = {f"{j.key}.": j for j in job_frame or []}
    for key in keys:
        path = run.partial_dir / f"{key}.parquet"
        if not path.exists():
            continue
        frame = pd.read_parquet(path)
        for prefix, job in by_key.items():
            if key.startswith(prefix):
                for column, value in (("step", job.step), ("revision", job.revision),
                                      ("label", job.label), ("job_model", job.model)):  # fmt: skip
                    if column not in frame.columns:
                        frame.insert(0, column, value)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# ---------------------------------------------------------------------------- scaling


def scaling_table(status: pd.DataFrame, contrasts: pd.DataFrame) -> pd.DataFrame:
    """Seed 000 cell 14: per model and PR mode, params, R_V recursive / baseline, contraction %,
    Hedges' g with its CI (from the model's contraction run)."""
    if contrasts.empty:
        return pd.DataFrame()
    params = status[status.experiment == "contraction"].set_index("model")["n_params"]
    table = contrasts.rename(columns={"job_model": "model"})
    table["n_params"] = table["model"].map(params)
    keep = ["model", "n_params", "pr_mode", "n_recursive", "n_baseline", "mean_recursive",
            "mean_baseline", "contraction_pct", "hedges_g", "hedges_g_ci_low",
            "hedges_g_ci_high", "welch_p"]  # fmt: skip
    table = table[[c for c in keep if c in table.columns]]
    table = table.rename(columns={"mean_recursive": "r_v_recursive",
                                  "mean_baseline": "r_v_baseline"})  # fmt: skip
    return table.sort_values(["pr_mode", "n_params", "model"], ignore_index=True)


def plot_scaling(table: pd.DataFrame, path: Path) -> Path:
    """R_V (recursive, baseline) and contraction % vs parameter count (log x), per PR mode."""

    plt = plotting.plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode, frame in table.groupby("pr_mode"):
        frame = frame.sort_values("n_params")
        axes[0].plot(frame["n_params"], frame["r_v_recursive"], "-o", label=f"recursive ({mode})")
        axes[0].plot(frame["n_params"], frame["r_v_baseline"], "--s", label=f"baseline ({mode})")
        axes[1].plot(frame["n_params"], frame["contraction_pct"], "-o", label=mode)
        for row in frame.itertuples():
            axes[1].annotate(row.model, (row.n_params, row.contraction_pct), fontsize=7,
                             xytext=(3, 3), textcoords="offset points")  # fmt: skip
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.legend(fontsize=8)
    axes[0].axhline(1.0, color="grey", lw=0.8, ls=":")
    axes[0].set_ylabel("mean R_V")
    axes[1].axhline(0.0, color="grey", lw=0.8, ls=":")
    axes[1].set_ylabel("contraction % (baseline - recursive) / baseline")
    return plotting._save(fig, path)


def _write_scaling(run, status, tables, failed, config: ScalingConfig) -> dict:

    table = scaling_table(status, tables["contrasts"])
    run.write_table("jobs", status)
    run.write_table("failures", failed)
    if not table.empty:
        run.write_table("scaling", table)
        plot_scaling(table, run.plot_path("scaling"))
    headline: dict = {}
    lines = ["# Scaling sweep", "", f"Models: {', '.join(config.models)}", ""]
    if not table.empty:
        lines += ["## Contraction by model", "", markdown_table(table), ""]
        for row in table[table.pr_mode == table.pr_mode.iloc[0]].itertuples():
            headline[f"{row.model}:contraction_pct"] = row.contraction_pct
    if config.gain and not tables["models"].empty:
        extra = ["job_model", "label", "step"]
        models = tables["models"].drop(columns=extra, errors="ignore")
        curves = tables["curves"].drop(columns=[*extra, "revision"], errors="ignore")
        gain_config = GainConfig(models=list(config.models), n_boot=config.settings.n_boot,
                                 seed=config.settings.seed)  # fmt: skip
        predictions = _write_gain_subset(run, models, curves, gain_config)
        lines += ["## Last-block gain and H25 prediction (rho >= 0.2 -> gain < 1)", "",
                  markdown_table(predictions), "",
                  "Per-layer curves: `curves.*`; correlations: `correlations.*`; "
                  "figure: `plots/h25.png`.", ""]  # fmt: skip
    if len(failed):
        lines += ["## Failed jobs", "", markdown_table(failed), ""]
    lines.append("Child runs (one per model and experiment) are under `jobs/`.")
    run.write_summary("\n".join(lines) + "\n")
    return headline


def _write_gain_subset(run, models, curves, gain_config) -> pd.DataFrame:
    """H25 tables and plot over the gain jobs (curves stand in for per-prompt layers)."""

    predictions, _ = h25_predictions(models, gain_config.rho_threshold)
    correlations = rho_gain_correlations(models, gain_config.n_boot, gain_config.seed)
    run.write_table("models", models)
    run.write_table("curves", curves)
    run.write_table("predictions", predictions)
    run.write_table("correlations", correlations)
    plot_h25(models, curves, run.plot_path("h25"), gain_config.rho_threshold)
    return predictions


def run_scaling(
    config: ScalingConfig,
    out: Path | None = None,
    force: bool = False,
    executor=None,
    loader: Callable | None = None,
) -> SweepOutcome:
    """Contraction (and gain with ``config.gain``) for every model; see the module docstring."""
    label = f"{len(config.models)}-models"
    return _run_sweep(
        SCALING,
        config.to_dict(),
        label,
        lambda d: scaling_jobs(config, d),
        config.settings,
        lambda run, s, t, f: _write_scaling(run, s, t, f, config),
        out,
        force,
        executor,
        loader,
    )


# ---------------------------------------------------------------------------- checkpoints


def checkpoint_table(contrasts: pd.DataFrame) -> pd.DataFrame:
    """Seed 000 cells 10-11: per checkpoint and PR mode, R_V recursive / baseline and the gap
    (baseline - recursive; positive = the recursive group contracts more)."""
    if contrasts.empty:
        return pd.DataFrame()
    table = contrasts.rename(columns={"mean_recursive": "r_v_recursive",
                                      "mean_baseline": "r_v_baseline"})  # fmt: skip
    table["gap"] = table["r_v_baseline"] - table["r_v_recursive"]
    keep = ["label", "revision", "step", "pr_mode", "r_v_recursive", "r_v_baseline", "gap",
            "contraction_pct", "hedges_g", "hedges_g_ci_low", "hedges_g_ci_high", "welch_p"]  # fmt: skip
    table = table[[c for c in keep if c in table.columns]]
    return table.sort_values(["pr_mode", "step", "label"], ignore_index=True, na_position="last")


def plot_checkpoints(table: pd.DataFrame, groups: pd.DataFrame, path: Path) -> Path:
    """Mean R_V per group and the gap vs training step (symlog x: step 0 is drawn)."""

    plt = plotting.plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    order = {label: i for i, label in enumerate(table["label"].drop_duplicates())}
    use_steps = table["step"].notna().all()

    def xs(frame):
        return frame["step"] if use_steps else frame["label"].map(order)

    for (mode, group), frame in groups.groupby(["pr_mode", "group"]):
        frame = frame.assign(x=xs(frame)).sort_values("x")
        axes[0].plot(frame["x"], frame["mean"], "-o", ms=3, label=f"{group} ({mode})")
    for mode, frame in table.groupby("pr_mode"):
        frame = frame.assign(x=xs(frame)).sort_values("x")
        axes[1].plot(frame["x"], frame["gap"], "-o", label=mode)
    for ax in axes:
        if use_steps:
            ax.set_xscale("symlog", linthresh=1000)
            ax.set_xlabel("training step")
        else:
            ax.set_xticks(list(order.values()), list(order), rotation=45, ha="right")
            ax.set_xlabel("checkpoint")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("mean R_V")
    axes[1].axhline(0.0, color="grey", lw=0.8, ls=":")
    axes[1].set_ylabel("gap = R_V baseline - R_V recursive")
    return plotting._save(fig, path)


def _write_checkpoints(run, status, tables, failed, config: CheckpointConfig) -> dict:

    table = checkpoint_table(tables["contrasts"])
    groups = tables["groups"]
    run.write_table("jobs", status)
    run.write_table("failures", failed)
    if not groups.empty:
        run.write_table("groups", groups.drop(columns=["job_model"]))
    headline: dict = {}
    where = (run.manifest.get("model") or {}).get("path")
    local = (
        f"local checkpoint directories in `{where}`" if where else "local checkpoint directories"
    )
    lines = ["# Checkpoint sweep", "", f"Model: {config.model or local}"]
    if not table.empty:
        run.write_table("checkpoints", table)
        plot_checkpoints(table, groups, run.plot_path("checkpoints"))
        first_mode = table.pr_mode.iloc[0]
        for row in table[table.pr_mode == first_mode].itertuples():
            headline[f"{row.label}:gap"] = row.gap
        lines += ["", "## R_V and gap by checkpoint", "", markdown_table(table)]
    evicted = [e for e in status.get("evicted", pd.Series(dtype=str)) if e]
    if evicted:
        lines += ["", f"Evicted after measuring: {'; '.join(evicted)}"]
    if len(failed):
        lines += ["", "## Failed checkpoints", "", markdown_table(failed)]
    lines += ["", "Child runs (one per checkpoint) are under `jobs/`."]
    run.write_summary("\n".join(lines) + "\n")
    return headline


def run_checkpoints(
    config: CheckpointConfig,
    out: Path | None = None,
    force: bool = False,
    executor=None,
    loader: Callable | None = None,
) -> SweepOutcome:
    """Contraction at every checkpoint of one model; see the module docstring."""
    if config.revisions:
        label = config.model or "model"
    else:
        label = Path((config.checkpoint_dirs or ["checkpoints"])[0]).parent.name or "checkpoints"
    return _run_sweep(
        CHECKPOINTS,
        config.to_dict(),
        label,
        lambda d: checkpoint_jobs(config, d),
        config.settings,
        lambda run, s, t, f: _write_checkpoints(run, s, t, f, config),
        out,
        force,
        executor,
        loader,
    )
