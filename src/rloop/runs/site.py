"""Static HTML report site over a run store (``rloop report``) and one run's ``report.html``.

Site layout (everything relative, so it works opened from disk or behind any static server)::

    <out_dir>/
      index.html                all runs: filters by experiment / model / status, sortable
      runs/<page_id>.html       one page per run
      runs/<page_id>/           copies of the run's CSVs, plots, manifest.json, summary.md
      compare/<experiment>.html runs of one experiment side by side (when there are >= 2)
      assets/plotly.min.js      written once, from the installed plotly package
      assets/site.css, site.js  styles; sortable tables, filters and plot rendering (plain JS)
      .rloop-site.json          marker: lets a rebuild clean pages of runs that are gone

Pages are rendered from the Jinja2 templates in ``rloop/runs/templates``. No page references
anything outside the site (no CDN, no fonts): the site works with the network off.

Bad input never stops a build: a run whose manifest is missing or unreadable, whose tables
are missing or corrupt, or whose figures cannot be drawn is still listed, marked with the
reason. Only a missing store directory or an unusable output directory raise ConfigError.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd
import plotly.io as pio
import plotly.offline
from markdown_it import MarkdownIt
from markupsafe import Markup

from rloop.errors import ConfigError
from rloop.runs import layout
from rloop.runs.figures import CompareInput, Figure, compare_figures, format_number, run_figures
from rloop.runs.index import flatten, index_path, list_runs
from rloop.runs.layout import MANIFEST_NAME, PARTIAL_DIR, PLOTS_DIR, json_default, path_slug

TEMPLATES_DIR = Path(__file__).parent / "templates"
ASSETS_DIR = "assets"
PLOTLY_ASSET = "plotly.min.js"
STATIC_ASSETS = ("site.css", "site.js")
SITE_MARKER = ".rloop-site.json"
REPORT_NAME = "report.html"
SUMMARY_NAME = "summary.md"
CHILD_RUNS_DIR = "jobs"  # a sweep's child runs, one per job (rloop.experiments.sweeps)

MAX_TABLE_ROWS = 500  # rows shown per table on a page; the CSV link has them all
MAX_CELL_CHARS = 200
MAX_COMPARE_RUNS = 12
INDEX_HEADLINE_ITEMS = 4

# Display statuses (the manifest's running/complete/failed, refined by what is on disk).
SHOW_COMPLETE = "complete"
SHOW_PARTIAL = "partial"  # manifest says complete, but a table is missing or unreadable
SHOW_FAILED = "failed"
SHOW_INTERRUPTED = "interrupted"  # "running" but its process is gone (or on another host)
SHOW_RUNNING = "running"  # "running" and its process is alive on this host
SHOW_CORRUPTED = "corrupted"  # no usable manifest
STATUSES = (
    SHOW_COMPLETE,
    SHOW_PARTIAL,
    SHOW_RUNNING,
    SHOW_INTERRUPTED,
    SHOW_FAILED,
    SHOW_CORRUPTED,
)

_RUN_FILE_SUFFIXES = (".parquet", ".csv")


# ---------------------------------------------------------------------------- loading runs


@dataclass
class TableData:
    """One tidy table of a run: the frame (None if unreadable) and where its CSV is."""

    name: str
    frame: pd.DataFrame | None
    csv_path: Path | None
    problem: str | None = None


@dataclass
class RunRecord:
    """What a report knows about one run directory, however damaged it is."""

    run_dir: Path
    manifest: dict | None
    status: str
    reasons: list[str] = field(default_factory=list)
    tables: list[TableData] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    summary: str | None = None
    page_id: str = ""

    @property
    def run_id(self) -> str:
        run_id = (self.manifest or {}).get("run_id")
        return str(run_id) if run_id else self.run_dir.name

    @property
    def experiment(self) -> str:
        return str((self.manifest or {}).get("experiment") or "unknown")

    @property
    def model(self) -> str:
        """The manifest's model name, else the config's ``model``, else its ``models`` (a run
        over several models, e.g. ``gain``), comma-separated; "unknown" if none."""
        name = self._model_setting("name", "model")
        if not name:
            config = (self.manifest or {}).get("config")
            models = config.get("models") if isinstance(config, dict) else None
            if isinstance(models, list) and models:
                name = ", ".join(str(m) for m in models)
        return str(name or "unknown")

    @property
    def revision(self) -> str:
        return str(self._model_setting("revision", "revision") or "")

    def _model_setting(self, model_key: str, config_key: str) -> object:
        """The manifest's model[model_key], else its config[config_key] (None if neither)."""
        manifest = self.manifest or {}
        model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
        config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
        return model.get(model_key) or config.get(config_key)

    @property
    def started(self) -> str:
        timings = (self.manifest or {}).get("timings")
        return str(timings.get("started") or "") if isinstance(timings, dict) else ""

    @property
    def headline(self) -> dict:
        headline = (self.manifest or {}).get("headline")
        return flatten(headline) if isinstance(headline, dict) else {}

    def frames(self) -> dict[str, pd.DataFrame]:
        return {t.name: t.frame for t in self.tables if t.frame is not None}


def _read_manifest_safely(run_dir: Path) -> tuple[dict | None, str | None]:
    path = run_dir / MANIFEST_NAME
    if not path.exists():
        return None, f"{MANIFEST_NAME} is missing"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        first = (str(err).splitlines() or [""])[0]
        return None, f"{MANIFEST_NAME} is unreadable ({type(err).__name__}: {first})"
    if not isinstance(manifest, dict):
        return None, f"{MANIFEST_NAME} holds a {type(manifest).__name__}, not an object"
    return manifest, None


def _process_state(manifest: dict) -> tuple[str, str]:
    """Display status and reason of a run whose manifest says "running" (the same liveness
    rule as ``rloop runs list``: :func:`rloop.runs.layout.owner_state`)."""
    status, why = layout.owner_state(manifest)
    if status == layout.STATUS_INTERRUPTED:
        return SHOW_INTERRUPTED, f"unfinished: {why}"
    return SHOW_RUNNING, f"still running ({why})"


def _load_table(run_dir: Path, name: str) -> TableData:
    parquet, csv = run_dir / f"{name}.parquet", run_dir / f"{name}.csv"
    csv_path = csv if csv.is_file() else None
    if parquet.is_file():
        try:
            return TableData(name, pd.read_parquet(parquet), csv_path)
        except Exception as err:
            problem = f"{parquet.name} is unreadable ({type(err).__name__})"
    else:
        problem = f"{parquet.name} is missing"
    if csv_path is not None:
        try:
            return TableData(name, pd.read_csv(csv_path), csv_path, f"{problem}; shown from CSV")
        except Exception as err:
            problem += f"; {csv.name} is unreadable too ({type(err).__name__})"
    return TableData(name, None, None, problem)


def _table_names(run_dir: Path, manifest: dict | None) -> list[str]:
    listed = (manifest or {}).get("tables")
    names = [str(n) for n in listed] if isinstance(listed, list) else []
    on_disk = sorted(
        {
            p.stem
            for p in run_dir.iterdir()
            if p.suffix in _RUN_FILE_SUFFIXES and p.is_file() and not p.name.startswith(".")
        }
    )
    return list(dict.fromkeys([*names, *on_disk]))


def load_run(run_dir: Path) -> RunRecord:
    """Read everything a report shows about ``run_dir``; never raises for bad content."""
    run_dir = Path(run_dir)
    manifest, problem = _read_manifest_safely(run_dir)
    reasons = [problem] if problem else []
    if manifest is None:
        status = SHOW_CORRUPTED
    else:
        state = manifest.get("status")
        if state == layout.STATUS_COMPLETE:
            status = SHOW_COMPLETE
        elif state == layout.STATUS_FAILED:
            status = SHOW_FAILED
            reasons.append(f"failed: {manifest.get('error') or 'no error recorded'}")
        elif state == layout.STATUS_RUNNING:
            status, reason = _process_state(manifest)
            reasons.append(reason)
        else:
            status = SHOW_CORRUPTED
            reasons.append(f"unknown status {state!r} in {MANIFEST_NAME}")
        for key in ("run_id", "experiment"):
            if not manifest.get(key):
                status = SHOW_CORRUPTED
                reasons.append(f"{MANIFEST_NAME} has no {key}")
    tables = [_load_table(run_dir, name) for name in _table_names(run_dir, manifest)]
    bad = [t for t in tables if t.problem]
    for table in bad:
        reasons.append(f"table {table.name}: {table.problem}")
    if bad and status == SHOW_COMPLETE:
        status = SHOW_PARTIAL
    partial = run_dir / PARTIAL_DIR
    if partial.is_dir():
        n = sum(1 for p in partial.glob("*.parquet") if not p.name.startswith("."))
        if n and status != SHOW_COMPLETE:
            reasons.append(f"{n} resume checkpoint(s) in {PARTIAL_DIR}/")
    plots_dir = run_dir / PLOTS_DIR
    plots = sorted(plots_dir.glob("*.png")) if plots_dir.is_dir() else []
    plots = [p for p in plots if not p.name.startswith(".")]
    summary = None
    with contextlib.suppress(OSError, UnicodeDecodeError):
        summary = (run_dir / SUMMARY_NAME).read_text(encoding="utf-8")
    return RunRecord(run_dir, manifest, status, reasons, tables, plots, summary)


def _looks_like_run(directory: Path, files: Sequence[str], subdirs: Sequence[str]) -> bool:
    """A directory without a manifest that still holds run outputs (a damaged run)."""
    if MANIFEST_NAME in files or SUMMARY_NAME in files:
        return True
    if any(name.endswith(".parquet") for name in files):
        return True
    return PARTIAL_DIR in subdirs and PLOTS_DIR in subdirs


def discover_runs(runs_dir: Path, exclude: Path | None = None) -> list[Path]:
    """Run directories under ``runs_dir`` (those with a manifest, and damaged ones without),
    plus runs recorded in the store's index that live elsewhere (written with ``--out``).

    ``exclude`` (e.g. the site being built inside the store) is not searched.
    """
    runs_dir = Path(runs_dir)
    excluded = exclude.resolve() if exclude is not None else None
    found: list[Path] = []
    for directory, subdirs, files in os.walk(runs_dir):
        here = Path(directory)
        if excluded is not None and here.resolve() == excluded:
            subdirs.clear()
            continue
        if SITE_MARKER in files:
            subdirs.clear()  # a report site, not a run
            continue
        if here != runs_dir and _looks_like_run(here, files, subdirs):
            found.append(here)
            subdirs.clear()
            continue
        if here == runs_dir and MANIFEST_NAME in files:
            found.append(here)  # the "store" is itself one run directory
            subdirs.clear()
            continue
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and d != PARTIAL_DIR)
    known = {p.resolve() for p in found}
    if index_path(runs_dir).is_file():
        try:
            indexed = list_runs(runs_dir)["path"]
        except Exception:  # the index is a cache: a broken one must not stop the report
            indexed = []
        for path in indexed:
            candidate = Path(str(path))
            if candidate.resolve() not in known and (candidate / MANIFEST_NAME).is_file():
                found.append(candidate)
                known.add(candidate.resolve())
    return found


def _assign_page_ids(records: Sequence[RunRecord]) -> None:
    used: set[str] = set()
    for record in records:
        base = path_slug(record.run_id)
        page_id, n = base, 2
        while page_id in used:
            page_id, n = f"{base}-{n}", n + 1
        used.add(page_id)
        record.page_id = page_id


def _select(records: list[RunRecord], run_ids: Sequence[str]) -> list[RunRecord]:
    chosen: dict[int, RunRecord] = {}
    for wanted in run_ids:
        text = str(wanted)
        exact = [r for r in records if text in (r.run_id, r.run_dir.name, str(r.run_dir))]
        matches = exact or [r for r in records if r.run_id.startswith(text)]
        if len(matches) != 1:
            what = "no run" if not matches else f"{len(matches)} runs"
            raise ConfigError(
                f"{what} match {text!r} in the run store; give a run id, a unique id prefix "
                "or a run directory name (see `rloop runs list`)"
            )
        chosen[id(matches[0])] = matches[0]
    return list(chosen.values())


# ---------------------------------------------------------------------------- rendering values


@dataclass(frozen=True)
class Cell:
    """A table cell: what is shown, the sort key (numbers as text; "" for text cells) and
    the full text when the shown text is shortened."""

    text: str
    sort: str = ""
    full: str = ""


def _cell(value: object) -> Cell:
    """A table cell for ``value``: numbers keep full precision in the sort key (infinities
    as ``Infinity``, which JavaScript's ``Number`` reads); NaN shows as "NaN" and sorts last."""
    if value is None or value is pd.NA or value is pd.NaT:
        return Cell("")
    if isinstance(value, bool | np.bool_):
        return Cell(str(bool(value)).lower())
    if isinstance(value, int | np.integer):
        return Cell(str(int(value)), str(int(value)))
    if isinstance(value, float | np.floating):
        number = float(value)
        if math.isnan(number):
            return Cell("NaN")
        if math.isinf(number):
            return Cell(format_number(number), "Infinity" if number > 0 else "-Infinity")
        return Cell(format_number(number), repr(number))
    if isinstance(value, dict | list | tuple | np.ndarray):
        value = json.dumps(value, default=json_default, ensure_ascii=False)
    text = str(value)
    if len(text) > MAX_CELL_CHARS:
        return Cell(text[: MAX_CELL_CHARS - 1] + "…", "", text)
    return Cell(text)


def _table_view(table: TableData, anchor: str, csv_href: str | None) -> dict:
    frame = table.frame
    view = {
        "name": table.name,
        "anchor": anchor,
        "problem": table.problem,
        "csv_href": csv_href,
        "columns": [],
        "rows": [],
        "n_rows": 0,
        "n_shown": 0,
    }
    if frame is None:
        return view
    shown = frame.head(MAX_TABLE_ROWS)
    view["columns"] = [str(c) for c in frame.columns]
    view["rows"] = [[_cell(v) for v in row] for row in shown.itertuples(index=False, name=None)]
    view["n_rows"], view["n_shown"] = len(frame), len(shown)
    return view


def _manifest_rows(manifest: dict | None) -> list[tuple[str, Cell]]:
    if not manifest:
        return []
    plain = {k: v for k, v in manifest.items() if k not in ("error_traceback", "headline")}
    rows = []
    for key, value in flatten(plain).items():
        if isinstance(value, list) and all(not isinstance(v, dict | list) for v in value):
            value = ", ".join(format_number(v) for v in value)
        rows.append((key, _cell(value)))
    return rows


def _headline_rows(record: RunRecord) -> list[tuple[str, Cell]]:
    return [(key, _cell(value)) for key, value in record.headline.items()]


def _markdown() -> MarkdownIt:
    # Raw HTML in a summary is shown as text (html=False): a summary cannot inject scripts.
    return MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")


def render_markdown(text: str) -> Markup:
    """summary.md as HTML (CommonMark + tables; raw HTML escaped)."""
    return Markup(_markdown().render(text))


def _figure_json(figure: Figure) -> Markup:
    """The figure as JSON safe inside a ``<script type="application/json">`` element."""
    text = pio.to_json(figure.figure, validate=False)
    # "<", ">" and "&" only occur inside JSON strings, where \u escapes mean the same.
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return Markup(text)


def _figure_views(figures: Iterable[Figure], prefix: str) -> list[dict]:
    return [
        {
            "id": f"{prefix}{f.key}",
            "title": f.title,
            "caption": f.caption,
            "json": _figure_json(f),
        }
        for f in figures
    ]


def _date(iso: str) -> str:
    try:
        moment = dt.datetime.fromisoformat(iso)
    except (TypeError, ValueError):
        return iso or ""
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.UTC)
    return moment.strftime("%Y-%m-%d %H:%M") + (" UTC" if moment.tzinfo else "")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["slug"] = lambda text: path_slug(str(text)).lower()
    return env


# ---------------------------------------------------------------------------- pages


@dataclass
class _PageLinks:
    """Where, relative to a page, the site's pieces are."""

    assets: str  # prefix of asset files, e.g. "../assets/"
    index: str | None  # the index page, None in a stand-alone report
    data: str  # prefix of the run's copied files, e.g. "<page_id>/"
    compare: str | None = None
    inline_assets: dict | None = None  # stand-alone report: asset contents inlined
    child_href: Callable[[Path], str | None] | None = None  # a child run's page, if any


def _child_runs(run_dir: Path, href: Callable[[Path], str | None] | None) -> list[dict]:
    """The child runs under ``<run_dir>/jobs/`` (a sweep's jobs): name, run id, experiment,
    model, status (from each manifest, "corrupted" if unreadable) and the link to its page."""
    root = run_dir / CHILD_RUNS_DIR
    if not root.is_dir():
        return []
    children = []
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        manifest, problem = _read_manifest_safely(path)
        child = RunRecord(path, manifest, str((manifest or {}).get("status") or SHOW_CORRUPTED))
        children.append(
            {
                "name": path.name,
                "id": child.run_id,
                "experiment": child.experiment,
                "model": child.model,
                "revision": child.revision,
                "status": child.status,
                "problem": problem,
                "href": href(path) if href is not None else None,
            }
        )
    return children


def _run_context(record: RunRecord, links: _PageLinks, csv_hrefs: dict[str, str | None]) -> dict:
    figures, figure_notes = run_figures(record.frames(), record.manifest)
    manifest = record.manifest or {}
    timings = manifest.get("timings") if isinstance(manifest.get("timings"), dict) else {}
    return {
        "title": f"{record.experiment} · {record.run_id}",
        "links": links,
        "run": {
            "id": record.run_id,
            "dir": str(record.run_dir),
            "experiment": record.experiment,
            "model": record.model,
            "revision": record.revision,
            "status": record.status,
            "reasons": record.reasons,
            "started": _date(record.started),
            "finished": _date(str(timings.get("finished") or "")),
            "elapsed": format_number(timings.get("elapsed_seconds"))
            if timings.get("elapsed_seconds") is not None
            else "",
            "headline": _headline_rows(record),
            "summary_html": render_markdown(record.summary) if record.summary else None,
            "figures": _figure_views(figures, "fig-"),
            "figure_notes": figure_notes,
            "plots": [
                {"name": p.stem, "href": f"{links.data}{PLOTS_DIR}/{p.name}"} for p in record.plots
            ],
            "tables": [
                _table_view(t, f"table-{path_slug(t.name)}", csv_hrefs.get(t.name))
                for t in record.tables
            ],
            "manifest_rows": _manifest_rows(record.manifest),
            "children": _child_runs(record.run_dir, links.child_href),
            "manifest_href": f"{links.data}{MANIFEST_NAME}"
            if (record.run_dir / MANIFEST_NAME).is_file()
            else None,
            "traceback": manifest.get("error_traceback"),
        },
        "max_rows": MAX_TABLE_ROWS,
    }


def _index_row(record: RunRecord, compare_href: str | None) -> dict:
    items = list(_headline_rows(record))
    return {
        "href": f"runs/{record.page_id}.html",
        "id": record.run_id,
        "dir": record.run_dir.name,
        "experiment": record.experiment,
        "model": record.model,
        "revision": record.revision,
        "started": record.started,
        "date": _date(record.started),
        "status": record.status,
        "reasons": record.reasons,
        "headline_short": items[:INDEX_HEADLINE_ITEMS],
        "headline_more": max(0, len(items) - INDEX_HEADLINE_ITEMS),
        "headline": dict(items),
        "compare_href": compare_href,
    }


def _experiment_sections(rows: list[dict], compare_hrefs: dict[str, str]) -> list[dict]:
    sections = []
    for experiment in sorted({row["experiment"] for row in rows}):
        members = [row for row in rows if row["experiment"] == experiment]
        keys = list(dict.fromkeys(k for row in members for k in row["headline"]))
        if not keys:
            continue
        sections.append(
            {
                "experiment": experiment,
                "anchor": f"headline-{path_slug(experiment).lower()}",
                "columns": keys,
                "runs": members,
                "compare_href": compare_hrefs.get(experiment),
            }
        )
    return sections


def _compare_context(experiment: str, records: Sequence[RunRecord], note: str | None) -> dict:
    headlines = [r.headline for r in records]
    keys = list(dict.fromkeys(k for h in headlines for k in h))
    headline_rows = [(k, [_cell(h.get(k)) for h in headlines]) for k in keys]
    configs = [
        flatten(r.manifest.get("config") or {})
        if isinstance((r.manifest or {}).get("config"), dict)
        else {}
        for r in records
    ]
    config_rows = []
    for key in dict.fromkeys(k for c in configs for k in c):
        values = [c.get(key) for c in configs]
        texts = {json.dumps(v, sort_keys=True, default=json_default) for v in values}
        if len(texts) > 1 or not all(key in c for c in configs):
            config_rows.append(
                (
                    key,
                    [
                        _cell(v if not isinstance(v, list) else ", ".join(map(str, v)))
                        for v in values
                    ],
                )
            )
    figures, notes = compare_figures(
        [CompareInput(r.run_id, r.frames(), r.manifest or {}) for r in records]
    )
    return {
        "title": f"Compare {experiment} runs",
        "links": _PageLinks(assets=f"../{ASSETS_DIR}/", index="../index.html", data=""),
        "experiment": experiment,
        "runs": [
            {
                "id": r.run_id,
                "href": f"../runs/{r.page_id}.html",
                "model": r.model,
                "revision": r.revision,
                "status": r.status,
                "date": _date(r.started),
            }
            for r in records
        ],
        "headline_rows": headline_rows,
        "config_rows": config_rows,
        "figures": _figure_views(figures, "fig-"),
        "figure_notes": notes,
        "note": note,
    }


# ---------------------------------------------------------------------------- writing


def _write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` atomically unless the file already holds exactly it."""
    data = text.encode("utf-8")
    with contextlib.suppress(OSError):
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    layout.atomic_write(path, lambda tmp: tmp.write_bytes(data))


def _copy_if_changed(source: Path, target: Path) -> None:
    with contextlib.suppress(OSError):
        src, dst = source.stat(), target.stat()
        if src.st_size == dst.st_size and int(src.st_mtime) == int(dst.st_mtime):
            return
    target.parent.mkdir(parents=True, exist_ok=True)
    layout.atomic_write(target, lambda tmp: shutil.copy2(source, tmp))


def write_assets(out_dir: Path) -> Path:
    """``assets/plotly.min.js`` (from the installed plotly), ``site.css`` and ``site.js``;
    files already up to date are not rewritten. Returns the assets directory."""
    assets = Path(out_dir) / ASSETS_DIR
    assets.mkdir(parents=True, exist_ok=True)
    _write_if_changed(assets / PLOTLY_ASSET, plotly.offline.get_plotlyjs())
    for name in STATIC_ASSETS:
        _write_if_changed(assets / name, (TEMPLATES_DIR / name).read_text(encoding="utf-8"))
    return assets


def _copy_run_files(record: RunRecord, data_dir: Path) -> dict[str, str | None]:
    """Copy the run's CSVs (written from the frame when only Parquet exists), plots, manifest
    and summary into ``data_dir``; returns the CSV file name per table (None: no CSV)."""
    written: dict[str, str | None] = {}
    for table in record.tables:
        target = data_dir / f"{table.name}.csv"
        try:
            if table.csv_path is not None:
                _copy_if_changed(table.csv_path, target)
            elif table.frame is not None:
                data_dir.mkdir(parents=True, exist_ok=True)
                frame = table.frame
                layout.atomic_write(target, lambda tmp, f=frame: f.to_csv(tmp, index=False))
            else:
                written[table.name] = None
                continue
            written[table.name] = target.name
        except OSError:
            written[table.name] = None
    for plot in record.plots:
        with contextlib.suppress(OSError):
            _copy_if_changed(plot, data_dir / PLOTS_DIR / plot.name)
    for name in (MANIFEST_NAME, SUMMARY_NAME):
        source = record.run_dir / name
        if source.is_file():
            with contextlib.suppress(OSError):
                _copy_if_changed(source, data_dir / name)
    return written


def _check_out_dir(runs_dir: Path, out_dir: Path) -> None:
    runs, out = runs_dir.resolve(), out_dir.resolve()
    if out == runs or out in runs.parents:
        raise ConfigError(
            f"the report directory {out_dir} contains the run store {runs_dir}; "
            "choose another --out (e.g. a new directory)"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} is a file; choose a directory for the report site")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / SITE_MARKER).is_file():
        raise ConfigError(
            f"{out_dir} is not empty and holds no rloop report site; choose an empty or new "
            "directory for --out"
        )


def _remove_stale(out_dir: Path, keep: set[Path]) -> None:
    """Delete pages and copied files of runs that are no longer in the site."""
    for sub in ("runs", "compare"):
        root = out_dir / sub
        if not root.is_dir():
            continue
        for directory, _subdirs, files in os.walk(root, topdown=False):
            for name in files:
                path = Path(directory) / name
                if path.resolve() not in keep:
                    with contextlib.suppress(OSError):
                        path.unlink()
            with contextlib.suppress(OSError):
                Path(directory).rmdir()  # only succeeds when empty


def _kept_files(directory: Path) -> set[Path]:
    return (
        {p.resolve() for p in directory.rglob("*") if p.is_file()} if directory.is_dir() else set()
    )


def build_site(runs_dir: Path, out_dir: Path, run_ids: list[str] | None = None) -> Path:
    """Write the static report site of the run store ``runs_dir`` into ``out_dir``.

    ``run_ids``: only these runs (run ids, unique id prefixes or directory names); default
    all. An empty store gives an index saying there are no runs; damaged runs are listed with
    the reason. Returns the path of ``index.html``.

    Raises ConfigError when ``runs_dir`` does not exist, when ``out_dir`` is a non-empty
    directory that is not a site built here, or when a requested run id matches no run.
    """
    runs_dir, out_dir = Path(runs_dir).expanduser(), Path(out_dir).expanduser()
    if not runs_dir.is_dir():
        raise ConfigError(
            f"run store {runs_dir} does not exist; pass the directory holding the runs "
            "(or set RLOOP_RUNS)"
        )
    _check_out_dir(runs_dir, out_dir)
    records = [load_run(path) for path in discover_runs(runs_dir, exclude=out_dir)]
    if run_ids:
        records = _select(records, run_ids)
    records.sort(key=lambda r: (r.started, r.run_id), reverse=True)  # newest first
    _assign_page_ids(records)

    out_dir.mkdir(parents=True, exist_ok=True)
    layout.atomic_write_text(
        out_dir / SITE_MARKER,
        json.dumps({"generator": "rloop report", "runs_dir": str(runs_dir.absolute())}) + "\n",
    )
    write_assets(out_dir)
    env = _environment()
    keep: set[Path] = set()
    compare_hrefs = _write_compare_pages(env, out_dir, records, keep)
    pages = {r.run_dir.resolve(): f"{r.page_id}.html" for r in records}
    for record in records:
        _write_run_page(env, out_dir, record, compare_hrefs.get(record.experiment), keep, pages)
    index = _write_index(env, out_dir, runs_dir, records, compare_hrefs)
    _remove_stale(out_dir, keep)
    return index


def _write_compare_pages(
    env: jinja2.Environment, out_dir: Path, records: Sequence[RunRecord], keep: set[Path]
) -> dict[str, str]:
    """One compare page per experiment with at least two usable runs (the newest
    MAX_COMPARE_RUNS); adds the pages to ``keep`` and returns experiment -> href from the
    index."""
    by_experiment: dict[str, list[RunRecord]] = {}
    for record in records:
        if record.manifest is not None and record.status != SHOW_CORRUPTED:
            by_experiment.setdefault(record.experiment, []).append(record)
    compare_hrefs: dict[str, str] = {}
    for experiment, members in sorted(by_experiment.items()):
        if len(members) < 2:
            continue
        shown = members[:MAX_COMPARE_RUNS]
        note = (
            f"showing the {MAX_COMPARE_RUNS} newest of {len(members)} runs"
            if len(members) > MAX_COMPARE_RUNS
            else None
        )
        page = out_dir / "compare" / f"{path_slug(experiment)}.html"
        try:
            html = env.get_template("compare.html.j2").render(
                **_compare_context(experiment, shown, note)
            )
        except Exception as err:  # a comparison that cannot render is left out, not fatal
            html = env.get_template("error.html.j2").render(
                title=f"Compare {experiment} runs",
                links=_PageLinks(assets=f"../{ASSETS_DIR}/", index="../index.html", data=""),
                message=f"this comparison could not be rendered: {type(err).__name__}: {err}",
            )
        _write_if_changed(page, html)
        keep.add(page.resolve())
        compare_hrefs[experiment] = f"compare/{page.name}"
    return compare_hrefs


def _write_run_page(
    env: jinja2.Environment,
    out_dir: Path,
    record: RunRecord,
    compare: str | None,
    keep: set[Path],
    pages: dict[Path, str],
) -> None:
    """The run's page and its copied files (``compare``: its compare page, from the index;
    ``pages``: run directory -> page, for links to child runs); a page that cannot render
    becomes an error page and marks the run partial."""
    data_dir = out_dir / "runs" / record.page_id
    page = out_dir / "runs" / f"{record.page_id}.html"
    links = _PageLinks(
        assets=f"../{ASSETS_DIR}/",
        index="../index.html",
        data=f"{record.page_id}/",
        compare=f"../{compare}" if compare else None,
        child_href=lambda path: pages.get(path.resolve()),
    )
    try:
        csv_names = _copy_run_files(record, data_dir)
        hrefs = {k: f"{record.page_id}/{v}" if v else None for k, v in csv_names.items()}
        html = env.get_template("run.html.j2").render(**_run_context(record, links, hrefs))
    except Exception as err:  # one broken run must not stop the site
        record.reasons.append(f"its page could not be rendered ({type(err).__name__}: {err})")
        if record.status == SHOW_COMPLETE:
            record.status = SHOW_PARTIAL
        html = env.get_template("error.html.j2").render(
            title=f"run {record.run_id}",
            links=links,
            message="; ".join(record.reasons),
        )
    _write_if_changed(page, html)
    keep.add(page.resolve())
    keep |= _kept_files(data_dir)


def _write_index(
    env: jinja2.Environment,
    out_dir: Path,
    runs_dir: Path,
    records: Sequence[RunRecord],
    compare_hrefs: dict[str, str],
) -> Path:
    """``index.html``: every run, the headline sections and the compare pages."""
    rows = [_index_row(r, compare_hrefs.get(r.experiment)) for r in records]
    index_html = env.get_template("index.html.j2").render(
        title="rloop runs",
        links=_PageLinks(assets=f"{ASSETS_DIR}/", index=None, data=""),
        runs=rows,
        sections=_experiment_sections(rows, compare_hrefs),
        compare_pages=sorted(compare_hrefs.items()),
        experiments=sorted({r["experiment"] for r in rows}),
        models=sorted({r["model"] for r in rows}),
        statuses=[s for s in STATUSES if any(r["status"] == s for r in rows)],
        runs_dir=str(runs_dir.absolute()),
        generated=_date(dt.datetime.now(dt.UTC).isoformat()),
    )
    index = out_dir / "index.html"
    _write_if_changed(index, index_html)
    return index


def write_run_report(run_dir: Path) -> Path:
    """Write ``<run_dir>/report.html``: the run's page, self-contained (plotly.js, styles and
    scripts inlined, ~5 MB) and linking the run's own CSVs and plots, so it works from disk
    with no network. Returns its path. ConfigError if ``run_dir`` is not a directory."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist; give the path of a run")
    record = load_run(run_dir)
    inline = {
        "plotly": Markup(plotly.offline.get_plotlyjs()),
        **{
            name.replace(".", "_"): Markup((TEMPLATES_DIR / name).read_text(encoding="utf-8"))
            for name in STATIC_ASSETS
        },
    }
    links = _PageLinks(
        assets="", index=None, data="", inline_assets=inline, child_href=_child_report_href
    )
    hrefs = {t.name: t.csv_path.name if t.csv_path is not None else None for t in record.tables}
    env = _environment()
    html = env.get_template("run.html.j2").render(**_run_context(record, links, hrefs))
    target = run_dir / REPORT_NAME
    layout.atomic_write_text(target, html)
    return target


def _child_report_href(child_dir: Path) -> str | None:
    """A child run's ``report.html``, relative to the parent's report (None if it has none)."""
    if not (child_dir / REPORT_NAME).is_file():
        return None
    return f"{CHILD_RUNS_DIR}/{child_dir.name}/{REPORT_NAME}"


def write_run_report_safely(run_dir: Path) -> str | None:
    """:func:`write_run_report` for the runner: never raises. Returns None when
    ``report.html`` was written, else the one-line reason; a report that cannot be written is
    removed, so a run directory never holds a report of other results than its own."""
    try:
        write_run_report(run_dir)
    except Exception as err:  # a derived view: it must never cost the run its results
        with contextlib.suppress(OSError):
            (Path(run_dir) / REPORT_NAME).unlink()
        return layout.one_line_error(err)
    return None
