"""The static report site (rloop.runs.site) and its figures (rloop.runs.figures).

Run directories are written through the run store API with small synthetic tables (no
model); the pages are parsed back with the standard library's HTML parser and every number
checked against the tables it came from.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import zlib
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pandas as pd
import plotly.offline
import pytest

from rloop.errors import ConfigError
from rloop.runs.figures import (
    CompareInput,
    ablation_heatmaps,
    compare_figures,
    dose_responses,
    pr_profiles,
    r_v_strips,
    run_figures,
    spec_curves,
)
from rloop.runs.site import MAX_TABLE_ROWS, build_site, render_markdown, write_run_report
from rloop.runs.store import Run

# ---------------------------------------------------------------------------- a synthetic store

GROUPS = ("L5", "factual")
MODES = ("per-head", "whole")
N_LAYERS = 8
EARLY, LATE = 1, 6


def png_bytes(width: int = 48, height: int = 32) -> bytes:
    """A valid RGB PNG with horizontal colour bands (no imaging library needed)."""
    rows = []
    for y in range(height):
        colour = bytes((40 + 5 * y % 200, 90, 200 - 4 * y % 150))
        rows.append(b"\x00" + colour * width)

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + chunk(b"IEND", b"")
    )


def contraction_tables(seed: int, n_per_group: int = 6) -> dict[str, pd.DataFrame]:
    """profile, results, groups, contrasts, layer_sweep with the contraction columns."""
    rng = np.random.default_rng(seed)
    profile_rows = []
    for group in GROUPS:
        for k in range(n_per_group):
            prompt_id = f"{group}_{k:03d}"
            for mode in MODES:
                for layer in range(N_LAYERS):
                    drop = 1.5 if (group == "L5" and layer >= 4) else 0.0
                    pr = 6.0 + rng.normal(0, 0.5) - drop
                    profile_rows.append(
                        {
                            "prompt_id": prompt_id,
                            "group": group,
                            "n_tokens": 20 + k,
                            "layer": layer,
                            "pr_mode": mode,
                            "pr": pr,
                            "nan_reason": None,
                        }
                    )
    profile = pd.DataFrame(profile_rows)
    keyed = profile.set_index(["prompt_id", "pr_mode", "layer"])["pr"]
    results = (
        profile[profile.layer == EARLY][["prompt_id", "group", "n_tokens", "pr_mode"]]
        .reset_index(drop=True)
        .copy()
    )
    results["pr_early"] = [
        keyed[(p, m, EARLY)] for p, m in zip(results.prompt_id, results.pr_mode, strict=False)
    ]
    results["pr_late"] = [
        keyed[(p, m, LATE)] for p, m in zip(results.prompt_id, results.pr_mode, strict=False)
    ]
    results["r_v"] = results["pr_late"] / results["pr_early"]
    results["text"] = [f"Prompt {p} <about> itself & more" for p in results.prompt_id]
    groups = (
        results.groupby(["pr_mode", "group"])["r_v"]
        .agg(n="count", mean="mean", sd="std")
        .reset_index()
    )
    contrasts = pd.DataFrame(
        [
            {
                "pr_mode": mode,
                "mean_recursive": float(
                    results[(results.pr_mode == mode) & (results.group == "L5")].r_v.mean()
                ),
                "mean_baseline": float(
                    results[(results.pr_mode == mode) & (results.group == "factual")].r_v.mean()
                ),
                "hedges_g": -1.0 - 0.1 * seed,
            }
            for mode in MODES
        ]
    )
    sweep = pd.DataFrame(
        [
            {
                "pr_mode": mode,
                "layer_late": layer,
                "layer_early": EARLY,
                "hedges_g": -0.2 * layer - 0.05 * seed,
                "hedges_g_ci_low": -0.2 * layer - 0.5,
                "hedges_g_ci_high": -0.2 * layer + 0.5,
                "welch_p": 0.01 * layer,
            }
            for mode in MODES
            for layer in range(EARLY + 1, N_LAYERS)
        ]
    )
    return {
        "results": results,
        "profile": profile,
        "groups": groups,
        "contrasts": contrasts,
        "layer_sweep": sweep,
    }


def heads_table(n_layers: int = 3, n_heads: int = 4) -> pd.DataFrame:
    rows = []
    for layer in range(n_layers):
        for head in range(n_heads):
            value = layer * 10 + head
            rows.append(
                {
                    "layer": layer,
                    "head": head,
                    "mean_impact": float(value),
                    "ci_low": value - 0.5,
                    "ci_high": value + 0.25,
                    "p": 0.001 * (head + 1),
                    "p_bh": 0.002 * (head + 1),
                    "computed": layer < n_layers - 1,
                }
            )
    return pd.DataFrame(rows)


def generations_table() -> pd.DataFrame:
    rows = []
    for pair in range(3):
        for alpha in (0.0, 0.5, 1.0):
            rows.append(
                {
                    "pair_id": pair,
                    "condition": f"kv 4-7 a={alpha}",
                    "kind": "kv",
                    "range_label": "4-7",
                    "alpha": alpha,
                    "r_v_generated": 1.0 - 0.2 * alpha + 0.01 * pair,
                    "score": 0.1 + 0.5 * alpha + 0.02 * pair,
                    "text": f"generated text {pair}",
                }
            )
        for kind, r_v, score in (("natural_target", 1.0, 0.1), ("natural_source", 0.8, 0.6)):
            rows.append(
                {
                    "pair_id": pair,
                    "condition": kind,
                    "kind": kind,
                    "range_label": "",
                    "alpha": math.nan,
                    "r_v_generated": r_v + 0.01 * pair,
                    "score": score,
                    "text": "natural",
                }
            )
    return pd.DataFrame(rows)


def spec_curve_table() -> pd.DataFrame:
    """8 specifications over (window, layer_late); CIs chosen so that exactly 3 exclude 0."""
    effects = [-0.9, -0.7, -0.4, -0.2, -0.1, 0.05, 0.2, -0.5]
    half = [0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.55]  # |effect| > half: -0.9, -0.7, -0.4
    rows = []
    for k, (effect, width) in enumerate(zip(effects, half, strict=True)):
        rows.append(
            {
                "window": (8, 16)[k % 2],
                "layer_late": 20 + k // 2,
                "effect": effect,
                "ci_low": effect - width,
                "ci_high": effect + width,
                "p": 0.01 * (k + 1),
            }
        )
    return pd.DataFrame(rows)


def _write_run(root: Path, name: str, experiment: str, config: dict, tables: dict, **extra) -> Run:
    run = Run.open(root / name, experiment=experiment, config=config, index_root=root)
    run.set_model({"name": config.get("model", "tiny"), "revision": config.get("revision")})
    for table_name, frame in tables.items():
        run.write_table(table_name, frame)
    if extra.get("summary"):
        run.write_summary(extra["summary"])
    for plot in extra.get("plots", []):
        run.plot_path(plot).write_bytes(png_bytes())
    if extra.get("headline"):
        run.update_manifest(headline=extra["headline"])
    if extra.get("layers"):
        run.update_manifest(layers=extra["layers"])
    return run


def make_store(root: Path) -> dict:
    """A run store with every kind of run the site must show. Returns what was written:
    ``ids`` (name -> run id), ``dirs`` (name -> run dir), ``headlines``, ``tables``."""
    root.mkdir(parents=True, exist_ok=True)
    ids, dirs, headlines, tables = {}, {}, {}, {}
    layers = {"early": EARLY, "late": LATE, "rule": "given"}

    for name, seed, window, revision in (("c1", 1, 16, None), ("c2", 2, 8, "step1000")):
        t = contraction_tables(seed)
        headline = {
            "layer_early": EARLY,
            "layer_late": LATE,
            "per-head:hedges_g": float(t["contrasts"].hedges_g.iloc[0]),
            "per-head:r_v_recursive": float(t["contrasts"].mean_recursive.iloc[0]),
        }
        config = {"model": "tiny-llama", "revision": revision, "window": window, "seed": seed}
        summary = (
            "# Contraction experiment\n\n- window: "
            f"{window}\n\n| group | n |\n|---|---|\n| L5 | 6 |\n\n<script>alert('x')</script>\n"
        )
        run = _write_run(
            root,
            name,
            "contraction",
            config,
            t,
            summary=summary,
            plots=["r_v_by_group", "pr_profile"],
            headline=headline,
            layers=layers,
        )
        run.complete()
        ids[name], dirs[name], headlines[name], tables[name] = run.run_id, run.path, headline, t

    big = pd.DataFrame(
        {
            "prompt_id": [f"p{k % 40:02d}" for k in range(640)],
            "layer": np.repeat(np.arange(4), 160),
            "head": np.tile(np.repeat(np.arange(4), 40), 4),
            "impact": np.linspace(-1, 1, 640),
        }
    )
    heads = heads_table(4, 4)
    run = _write_run(
        root,
        "a1",
        "ablate",
        {"model": "tiny-gpt2", "mode": "zero"},
        {"results": big, "heads": heads},
        summary="# Head ablation\n\nTop head L2H3.\n",
        plots=["impact_heatmap"],
        headline={"top_head": "L2H3", "noise_floor": 0.125},
        layers=layers,
    )
    run.complete()
    ids["a1"], dirs["a1"], tables["a1"] = run.run_id, run.path, {"results": big, "heads": heads}

    run = _write_run(
        root,
        "k1",
        "kv-patch",
        {"model": "tiny-llama", "alphas": [0, 0.5, 1]},
        {"generations": generations_table()},
        headline={"transfer_pct": 41.5},
    )
    run.complete()
    ids["k1"], dirs["k1"] = run.run_id, run.path

    run = _write_run(
        root, "s1", "robustness", {"model": "tiny-llama"}, {"spec_curve": spec_curve_table()}
    )
    run.complete()
    ids["s1"], dirs["s1"] = run.run_id, run.path

    # failed: the context manager records the error
    with (
        pytest.raises(ValueError),
        Run.open(
            root / "f1",
            experiment="contraction",
            config={"model": "m", "window": 99},
            index_root=root,
        ) as run,
    ):
        ids["f1"], dirs["f1"] = run.run_id, run.path
        raise ValueError("window 99 is longer than the shortest prompt")

    # partial: complete, then a table's Parquet file disappears (its CSV stays)
    run = _write_run(
        root, "p1", "contraction", {"model": "tiny-llama", "window": 4}, contraction_tables(3)
    )
    run.complete()
    (run.path / "groups.parquet").unlink()
    ids["p1"], dirs["p1"] = run.run_id, run.path

    # corrupted manifest JSON
    run = _write_run(root, "bad-json", "contraction", {"model": "m", "n": 1}, {})
    run.complete()
    (run.path / "manifest.json").write_text('{"run_id": "x", not json', encoding="utf-8")
    dirs["bad-json"] = run.path

    # outputs without any manifest
    orphan = root / "orphan"
    orphan.mkdir()
    (orphan / "summary.md").write_text("# Orphaned outputs\n", encoding="utf-8")
    contraction_tables(4)["groups"].to_parquet(orphan / "groups.parquet", index=False)
    dirs["orphan"] = orphan

    # interrupted: still "running", and the process that wrote it is gone
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    run = Run.open(root / "i1", experiment="ablate", config={"model": "m", "k": 2}, index_root=root)
    run.save_partial("batch-00000", [{"x": 1.0}])
    run.update_manifest(host={"pid": finished.pid})
    ids["i1"], dirs["i1"] = run.run_id, run.path

    return {"ids": ids, "dirs": dirs, "headlines": headlines, "tables": tables, "root": root}


# ---------------------------------------------------------------------------- parsing pages


class Page(HTMLParser):
    """Elements (tag, attrs), ids, and the rows (cells: text, attrs) of every table by id."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict]] = []
        self.ids: set[str] = set()
        self.tables: dict[str, list[list[tuple[str, dict]]]] = {}
        self.row_attrs: dict[str, list[dict]] = {}
        self._tables: list[str] = []
        self._cell: list | None = None
        self._script: str | None = None
        self.scripts: dict[str, str] = {}
        self.text_parts: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attributes = {k: v or "" for k, v in attrs}
        self.elements.append((tag, attributes))
        if "id" in attributes:
            self.ids.add(attributes["id"])
        if tag == "table":
            self._tables.append(attributes.get("id", f"anon-{len(self.tables)}"))
            self.tables.setdefault(self._tables[-1], [])
            self.row_attrs.setdefault(self._tables[-1], [])
        elif tag == "tr" and self._tables:
            self.tables[self._tables[-1]].append([])
            self.row_attrs[self._tables[-1]].append(attributes)
        elif tag in ("td", "th") and self._tables:
            self._cell = ["", attributes]
        elif tag == "script" and attributes.get("type") == "application/json":
            self._script = attributes.get("id", "")
            self.scripts[self._script] = ""

    def handle_endtag(self, tag):
        if tag == "table" and self._tables:
            self._tables.pop()
        elif tag in ("td", "th") and self._cell is not None and self._tables:
            rows = self.tables[self._tables[-1]]
            if rows:
                rows[-1].append((" ".join(self._cell[0].split()), self._cell[1]))
            self._cell = None
        elif tag == "script":
            self._script = None

    def handle_data(self, data):
        self.text_parts.append(data)
        if self._cell is not None:
            self._cell[0] += " " + data
        if self._script is not None:
            self.scripts[self._script] += data

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.text_parts).split())

    def refs(self) -> list[tuple[str, str, str]]:
        """(tag, attribute, value) of every href/src."""
        return [
            (tag, name, attrs[name])
            for tag, attrs in self.elements
            for name in ("href", "src")
            if name in attrs
        ]


def parse(path: Path) -> Page:
    return Page(path.read_text(encoding="utf-8"))


def html_pages(site: Path) -> list[Path]:
    return sorted(site.rglob("*.html"))


def runs_table(site: Path) -> dict[str, dict]:
    """Index rows by run link text: {id: {"status": ..., "cells": [...], "attrs": {...}}}."""
    page = parse(site / "index.html")
    rows = {}
    for cells, attrs in zip(page.tables["runs"][1:], page.row_attrs["runs"][1:], strict=True):
        run_id = cells[0][0].split()[0]
        rows[run_id] = {
            "cells": [c[0] for c in cells],
            "attrs": attrs,
            "status": attrs["data-status"],
        }
    return rows


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    return make_store(tmp_path_factory.mktemp("store") / "runs")


@pytest.fixture(scope="module")
def site(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site") / "site"
    index = build_site(store["root"], out)
    assert index == out / "index.html"
    return out


# ---------------------------------------------------------------------------- the index


def test_index_lists_every_run_with_status(store, site):
    rows = runs_table(site)
    ids = store["ids"]
    expected = {
        ids["c1"]: "complete",
        ids["c2"]: "complete",
        ids["a1"]: "complete",
        ids["k1"]: "complete",
        ids["s1"]: "complete",
        ids["f1"]: "failed",
        ids["p1"]: "partial",
        ids["i1"]: "interrupted",
        "bad-json": "corrupted",
        "orphan": "corrupted",
    }
    assert {run_id: row["status"] for run_id, row in rows.items()} == expected
    c2 = rows[ids["c2"]]
    assert c2["attrs"]["data-experiment"] == "contraction"
    assert c2["attrs"]["data-model"] == "tiny-llama"
    assert "step1000" in c2["cells"]  # the revision column
    # newest first: c2 was started after c1
    order = list(rows)
    assert order.index(ids["c2"]) < order.index(ids["c1"])


def test_damaged_runs_are_marked_with_their_reason(store, site):
    rows = runs_table(site)
    ids = store["ids"]
    status_cell = {run_id: row["cells"][5] for run_id, row in rows.items()}
    assert "manifest.json is unreadable (JSONDecodeError" in status_cell["bad-json"]
    assert "manifest.json is missing" in status_cell["orphan"]
    assert "groups.parquet is missing; shown from CSV" in status_cell[ids["p1"]]
    assert "window 99 is longer than the shortest prompt" in status_cell[ids["f1"]]
    assert "is no longer running" in status_cell[ids["i1"]]
    assert "1 resume checkpoint(s) in partial/" in status_cell[ids["i1"]]
    # the damaged runs still get a page, and it repeats the reason
    page = parse(site / "runs" / "bad-json.html")
    assert "manifest.json is unreadable" in page.text
    partial = parse(site / "runs" / f"{ids['p1']}.html")
    csv_rows = pd.read_csv(store["dirs"]["p1"] / "groups.csv")
    assert len(partial.tables["table-groups-data"]) - 1 == len(csv_rows)  # shown from the CSV


def test_headline_numbers_on_index_match_the_manifests(store, site):
    page = parse(site / "index.html")
    table = page.tables["headline-contraction-table"]
    header = [c[0] for c in table[0]]
    column = header.index("per-head:hedges_g")
    for row in table[1:]:
        run_id = row[0][0]
        name = next(k for k, v in store["ids"].items() if v == run_id)
        if name not in store["headlines"]:
            continue
        cell_text, cell_attrs = row[column]
        assert float(cell_attrs["data-value"]) == store["headlines"][name]["per-head:hedges_g"]
        assert cell_text == f"{store['headlines'][name]['per-head:hedges_g']:.4g}"


def test_every_link_resolves(site):
    pages = html_pages(site)
    assert len(pages) >= 12  # index, 10 run pages, a compare page
    parsed = {path.resolve(): parse(path) for path in pages}
    for path, page in parsed.items():
        for tag, attribute, value in page.refs():
            parts = urlsplit(value)
            if parts.scheme == "data":
                continue
            assert not parts.scheme and not parts.netloc, f"{path.name}: {tag} {attribute}={value}"
            target = (path.parent / unquote(parts.path)).resolve() if parts.path else path
            assert target.is_file(), f"{path.name}: {value} -> {target} is missing"
            if parts.fragment:
                assert parts.fragment in parsed[target].ids, f"{path.name}: #{parts.fragment}"


def test_no_page_references_the_network(site):
    for path in html_pages(site):
        page = parse(path)
        for tag, _attribute, value in page.refs():
            assert not value.lower().startswith(("http:", "https:", "//")), (path, tag, value)
        text = path.read_text(encoding="utf-8")
        for marker in ('src="http', "src='http", 'href="http', "href='http", "url(http", "@import"):
            assert marker not in text, (path, marker)
    for asset in ("site.css", "site.js"):
        text = (site / "assets" / asset).read_text(encoding="utf-8")
        assert "http:" not in text and "https:" not in text and "url(" not in text


def test_plotly_is_written_once_and_referenced_locally(store, site, tmp_path):
    copies = [p for p in site.rglob("*") if p.name.endswith(".js") and "plotly" in p.name]
    assert copies == [site / "assets" / "plotly.min.js"]
    assert copies[0].read_text(encoding="utf-8") == plotly.offline.get_plotlyjs()
    plotly_head = plotly.offline.get_plotlyjs()[:200]
    n_with_figures = 0
    for path in html_pages(site):
        text = path.read_text(encoding="utf-8")
        assert plotly_head not in text  # never inlined into a site page
        page = parse(path)
        plots = [a for t, a in page.elements if t == "div" and "plot" in a.get("class", "").split()]
        scripts = [a["src"] for t, a in page.elements if t == "script" and "src" in a]
        if plots:
            n_with_figures += 1
            assert [s for s in scripts if s.endswith("plotly.min.js")] == [
                "../assets/plotly.min.js"
            ]
            for div in plots:  # every container has its figure JSON, which parses
                figure = json.loads(page.scripts[div["data-figure"]])
                assert figure["data"], (path.name, div["data-figure"])
    assert n_with_figures >= 5  # 2 contraction, ablate, kv-patch, robustness (+ compare)
    # A rebuild leaves the asset alone (it is written once, not per build).
    before = copies[0].stat().st_mtime_ns
    build_site(store["root"], site)
    assert copies[0].stat().st_mtime_ns == before


def test_tables_are_sortable_and_capped(store, site):
    ids = store["ids"]
    page = parse(site / "runs" / f"{ids['a1']}.html")
    tables = [a for t, a in page.elements if t == "table"]
    assert tables and all("sortable" in a["class"].split() for a in tables)
    big = store["tables"]["a1"]["results"]
    rows = page.tables["table-results-data"]
    assert len(rows) - 1 == MAX_TABLE_ROWS < len(big)
    assert f"Showing the first {MAX_TABLE_ROWS} of {len(big)} rows" in page.text
    header = [c[0] for c in rows[0]]
    impact = header.index("impact")
    for k in (0, 123, MAX_TABLE_ROWS - 1):
        assert float(rows[k + 1][impact][1]["data-value"]) == big["impact"].iloc[k]
    # the CSV link holds every row
    link = next(
        a["href"]
        for t, a in page.elements
        if t == "a" and a.get("href", "").endswith("results.csv")
    )
    copied = pd.read_csv(site / "runs" / link)
    pd.testing.assert_frame_equal(copied, big, check_dtype=False)


def test_run_page_shows_summary_plots_and_manifest(store, site):
    ids = store["ids"]
    page = parse(site / "runs" / f"{ids['c1']}.html")
    tags = [t for t, _ in page.elements]
    assert "h1" in tags and "Contraction experiment" in page.text
    # raw HTML in the summary is shown as text, never run
    assert "<script>alert('x')</script>" in page.text
    assert not any(t == "script" and not a for t, a in page.elements)
    images = [a["src"] for t, a in page.elements if t == "img"]
    assert sorted(Path(s).name for s in images) == ["pr_profile.png", "r_v_by_group.png"]
    assert (site / "runs" / images[0]).read_bytes() == png_bytes()
    manifest = dict((row[0][0], row[1][0]) for row in page.tables["manifest-table"][1:])
    assert manifest["run_id"] == ids["c1"]
    assert manifest["config.window"] == "16"
    # figure ids: the ones the contraction tables allow
    figures = {
        a["id"] for t, a in page.elements if t == "figure" and "interactive" in a.get("class", "")
    }
    assert figures == {
        "fig-pr-profile-per-head",
        "fig-pr-profile-whole",
        "fig-r-v-strip-per-head",
        "fig-r-v-strip-whole",
        "fig-layer-sweep-effect",
    }


def test_compare_page_puts_runs_side_by_side(store, site):
    page_path = site / "compare" / "contraction.html"
    page = parse(page_path)
    ids, headlines = store["ids"], store["headlines"]
    table = page.tables["compare-headline"]
    header = [c[0] for c in table[0]]
    complete = [ids["c2"], ids["c1"], ids["p1"]]  # failed runs count too; corrupted ones not
    assert set(header[1:]) == {*complete, ids["f1"]}
    rows = {row[0][0]: row[1:] for row in table[1:]}
    for name in ("c1", "c2"):
        column = header.index(ids[name]) - 1
        assert (
            float(rows["per-head:hedges_g"][column][1]["data-value"])
            == headlines[name]["per-head:hedges_g"]
        )
    config = {row[0][0]: [c[0] for c in row[1:]] for row in page.tables["compare-config"][1:]}
    assert config["window"][header.index(ids["c1"]) - 1] == "16"
    assert config["window"][header.index(ids["c2"]) - 1] == "8"
    figures = {a["id"] for t, a in page.elements if t == "figure"}
    assert "fig-compare-sweep-per-head" in figures
    assert "fig-compare-profile-per-head-l5" in figures
    sweep = json.loads(page.scripts["fig-compare-sweep-per-head-data"])
    assert {trace["name"] for trace in sweep["data"]} == {ids["c1"], ids["c2"], ids["p1"]}
    index = parse(site / "index.html")
    assert "compare/contraction.html" in [a.get("href") for t, a in index.elements if t == "a"]


# ---------------------------------------------------------------------------- building


def test_empty_store_says_no_runs(tmp_path):
    (tmp_path / "runs").mkdir()
    index = build_site(tmp_path / "runs", tmp_path / "site")
    page = parse(index)
    assert "no-runs" in page.ids
    assert "No runs in this store yet" in page.text
    assert (tmp_path / "site" / "assets" / "plotly.min.js").is_file()


def test_missing_store_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist") as caught:
        build_site(tmp_path / "nowhere", tmp_path / "site")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "site").exists()


def test_refuses_a_non_empty_foreign_output_directory(tmp_path):
    (tmp_path / "runs").mkdir()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(ConfigError, match="not empty"):
        build_site(tmp_path / "runs", foreign)
    with pytest.raises(ConfigError, match="contains the run store"):
        build_site(tmp_path / "runs", tmp_path)
    assert (foreign / "notes.txt").read_text(encoding="utf-8") == "keep me"


def test_selected_runs_and_stale_pages(tmp_path):
    root = tmp_path / "runs"
    ids = {}
    for name, window in (("c1", 16), ("c2", 8)):
        run = _write_run(root, name, "contraction", {"model": "m", "window": window}, {})
        run.complete()
        ids[name] = run.run_id
    site = tmp_path / "site"
    build_site(root, site)
    assert set(runs_table(site)) == set(ids.values())
    assert (site / "compare" / "contraction.html").is_file()
    build_site(root, site, run_ids=[ids["c1"][:-2]])  # a unique prefix
    assert set(runs_table(site)) == {ids["c1"]}
    assert not (site / "runs" / f"{ids['c2']}.html").exists()  # stale page removed
    assert not (site / "compare").exists()  # one run: nothing to compare
    with pytest.raises(ConfigError, match="no run match 'zzz'"):
        build_site(root, site, run_ids=["zzz"])


def test_write_run_report_is_self_contained(store):
    run_dir = store["dirs"]["a1"]
    report = write_run_report(run_dir)
    assert report == run_dir / "report.html"
    text = report.read_text(encoding="utf-8")
    assert plotly.offline.get_plotlyjs()[:200] in text  # plotly.js inlined
    page = Page(text)
    for tag, _attribute, value in page.refs():
        parts = urlsplit(value)
        if parts.scheme == "data" or (not parts.path and parts.fragment):
            continue
        assert not parts.scheme and not parts.netloc, (tag, value)
        assert (run_dir / unquote(parts.path)).is_file(), value
    assert [a for t, a in page.elements if t == "script" and "src" in a] == []
    assert [a for t, a in page.elements if t == "link" and a.get("rel") == "stylesheet"] == []
    assert "fig-ablation-heatmap-mean-impact" in page.ids


def test_markdown_renders_tables_and_escapes_html():
    html = str(render_markdown("| a | b |\n|---|---|\n| 1 | 2 |\n\n<b onclick=x>hi</b>\n"))
    assert "<table>" in html and "<td>2</td>" in html
    assert "<b onclick" not in html and "&lt;b onclick=x&gt;" in html


# ---------------------------------------------------------------------------- figures


def test_ablation_heatmap_grid_and_hover():
    heads = heads_table(3, 4).sample(frac=1.0, random_state=0)  # order must not matter
    (figure,) = ablation_heatmaps({"heads": heads}, {"layers": {"early": 1, "late": 2}})
    trace = figure.figure.data[0]
    z = np.asarray(trace.z, dtype=float)
    assert z.shape == (3, 4)
    expected = np.array([[10 * layer + head for head in range(4)] for layer in range(3)])
    np.testing.assert_array_equal(z, expected)
    assert list(trace.y) == ["0", "1", "2"]
    hover = trace.text[1][3]  # layer 1, head 3: value 13, CI [12.5, 13.25], p 0.004
    assert "layer 1, head 3" in hover and "R_V impact: 13" in hover
    assert "95% CI: [12.5, 13.25]" in hover and "p: 0.004" in hover and "p (BH): 0.008" in hover
    assert "not computed" in trace.text[2][0] and "not computed" not in hover


def test_pr_profile_means_match_a_direct_computation():
    profile = contraction_tables(5)["profile"]
    figures = pr_profiles({"profile": profile}, {"layers": {"early": EARLY, "late": LATE}})
    assert [f.key for f in figures] == ["pr-profile-per-head", "pr-profile-whole"]
    for figure, mode in zip(figures, MODES, strict=True):
        traces = {t.name: t for t in figure.figure.data}
        assert set(traces) == set(GROUPS)
        for group in GROUPS:
            for layer in range(N_LAYERS):
                values = [
                    row.pr
                    for row in profile.itertuples()
                    if row.group == group and row.pr_mode == mode and row.layer == layer
                ]
                assert traces[group].y[layer] == pytest.approx(sum(values) / len(values), rel=1e-12)
        lines = [s for s in figure.figure.layout.shapes if s.type == "line"]
        assert sorted(s.x0 for s in lines) == [EARLY, LATE]


def test_r_v_strip_has_every_prompt_with_its_text():
    results = contraction_tables(6)["results"]
    figures = r_v_strips({"results": results}, {})
    figure = figures[0].figure  # per-head
    points = [t for t in figure.data if t.mode == "markers"]
    assert [t.name for t in points] == sorted(GROUPS)
    for trace in points:
        expected = results[(results.pr_mode == "per-head") & (results.group == trace.name)]
        np.testing.assert_allclose(np.asarray(trace.y, dtype=float), expected.r_v.to_numpy())
        # plotly reads <...> in hover labels as markup: the prompt text arrives escaped
        assert all("&lt;about&gt; itself &amp; more" in h for h in trace.text)
    means = [t for t in figure.data if t.mode == "lines"]
    expected_means = results[results.pr_mode == "per-head"].groupby("group").r_v.mean()
    assert [t.y[0] for t in means] == pytest.approx(list(expected_means.sort_index()))


def test_dose_response_means_and_natural_levels():
    grid = generations_table()
    (figure,) = dose_responses({"generations": grid}, {})
    traces = figure.figure.data
    assert len(traces) == 2  # one range x two metrics
    for trace, metric in zip(traces, ("r_v_generated", "score"), strict=True):
        assert list(trace.x) == [0.0, 0.5, 1.0]
        for alpha, mean in zip(trace.x, trace.y, strict=True):
            rows = [
                getattr(r, metric) for r in grid.itertuples() if r.kind == "kv" and r.alpha == alpha
            ]
            assert mean == pytest.approx(float(np.mean(rows)))
    levels = sorted(s.y0 for s in figure.figure.layout.shapes)
    natural = grid[grid.kind.str.startswith("natural")].groupby("kind")
    expected = sorted([*natural.r_v_generated.mean(), *natural.score.mean()])
    assert levels == pytest.approx(expected)


def test_spec_curve_sorted_with_significance_split():
    table = spec_curve_table()
    (figure,) = spec_curves({"spec_curve": table}, {})
    effects = figure.figure.data[:2]
    significant = next(t for t in effects if t.name == "CI excludes 0")
    other = next(t for t in effects if t.name == "CI includes 0")
    xs = [*significant.x, *other.x]
    ys = [*significant.y, *other.y]
    ordered = [y for _, y in sorted(zip(xs, ys, strict=True))]
    assert ordered == sorted(table.effect)
    assert sorted(significant.y) == [-0.9, -0.7, -0.4]
    choices = figure.figure.data[2]
    assert set(choices.y) == {
        "window = 8",
        "window = 16",
        *(f"layer_late = {k}" for k in range(20, 24)),
    }
    assert len(choices.x) == 2 * len(table)  # each spec makes one choice per dimension
    assert "8 specifications, 38% with a CI excluding 0" in figure.figure.layout.title.text


def test_figures_skip_bad_tables_with_a_note():
    tables = {
        "profile": pd.DataFrame({"group": ["a"], "layer": [0]}),  # no pr column
        "results": pd.DataFrame({"x": [1]}),  # not an R_V table: silently no figure
        "spec_curve": pd.DataFrame({"effect": [0.1], "ci_low": [0.0]}),
    }
    figures, notes = run_figures(tables, None)
    assert figures == []
    assert notes == [
        "PR profile skipped: table profile lacks column(s) pr",
        "specification curve skipped: table spec_curve lacks column(s) ci_high",
    ]
    assert run_figures({}, {}) == ([], [])


def test_compare_overlays_one_line_per_run():
    runs = [
        CompareInput(f"run{k}", {"heads": heads_table(2, 3), "spec_curve": spec_curve_table()}, {})
        for k in range(3)
    ]
    figures, notes = compare_figures(runs)
    assert notes == []
    by_key = {f.key: f for f in figures}
    assert set(by_key) == {"compare-heads", "compare-spec-curve"}
    heads = by_key["compare-heads"].figure
    assert [t.name for t in heads.data] == ["run0", "run1", "run2"]
    assert list(heads.data[0].x) == ["L0H0", "L0H1", "L0H2", "L1H0", "L1H1", "L1H2"]
    assert list(by_key["compare-spec-curve"].figure.data[1].y) == sorted(spec_curve_table().effect)


def test_runs_with_their_own_reports_still_get_plotly_once(tmp_path):
    """Each run's report.html is self-contained (plotly.js inlined, so it opens alone, e.g.
    mailed to a collaborator); the site never copies those reports: plotly.js is in the site
    once, in assets/."""
    from rloop.runs.site import write_run_report

    made = make_store(tmp_path / "runs")
    complete = [p for p in made["root"].iterdir() if (p / "manifest.json").is_file()]
    reports = [write_run_report(p) for p in complete]
    plotly_head = plotly.offline.get_plotlyjs()[:200]
    assert sum(plotly_head in r.read_text(encoding="utf-8") for r in reports) >= 2
    out = build_site(made["root"], tmp_path / "site").parent
    head = plotly_head.encode("utf-8")
    carrying = [p for p in out.rglob("*") if p.is_file() and head in p.read_bytes()]
    assert carrying == [out / "assets" / "plotly.min.js"]
    assert not list(out.rglob("report.html"))


def test_a_steer_generations_table_is_not_taken_for_a_kv_grid():
    """rloop steer's generations (kinds none/direction/random) get no KV dose-response figure
    and no 'skipped' note; a KV grid with one alpha still gets the note."""
    steer = pd.DataFrame(
        {
            "kind": ["none", "direction", "direction", "random"],
            "alpha": [0.0, 1.0, 2.0, 1.0],
            "r_v_generated": [0.9, 0.8, 0.7, 0.9],
        }
    )
    assert dose_responses({"generations": steer}, {}) == []
    _, notes = run_figures({"generations": steer}, {})
    assert not [n for n in notes if n.startswith("dose-response")]
    kv = steer.assign(
        kind=["natural_target", "kv", "kv", "natural_source"], alpha=[None, 1, 1, None]
    )
    _, notes = run_figures({"generations": kv}, {})
    assert any("fewer than two alpha values" in n for n in notes)
