"""Every completed run writes its own ``report.html`` (rloop.experiments.runner.execute).

A tiny random-weight Llama runs the contraction experiment; the report is parsed back with
the standard library's HTML parser and its headline numbers checked against the run's own
tables (recomputed here with pandas), its plots against ``plots/``. A report that cannot be
rendered must leave the run complete with all its results. The report is also opened in
headless Chromium with the network off (skipped, saying so, without the browser).
"""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import rloop.runs.site as site
from rloop.experiments.contraction import ContractionConfig, run_contraction
from rloop.runs.figures import run_figures
from rloop.runs.layout import read_manifest
from tests.test_contraction import prompt_set
from tests.test_site_browser import CHROMEDRIVER, CHROMIUM, _drain_logs, _driver, _is_local, _open
from tests.tiny_models import tiny_lm

SETTINGS = {"layers": [0, 2], "window": 5, "n_boot": 200}


class _ReportParser(HTMLParser):
    """Headline rows (key -> data-value), <img> sources, figure containers, script srcs."""

    def __init__(self) -> None:
        super().__init__()
        self.headline: dict[str, str] = {}
        self.images: list[str] = []
        self.figures: list[str] = []
        self.script_srcs: list[str] = []
        self.figure_json: dict[str, str] = {}
        self._in_headline = False
        self._key: str | None = None
        self._capture: str | None = None  # "key" | "json:<id>"
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "table" and a.get("id") == "headline-table":
            self._in_headline = True
        elif self._in_headline and tag == "th" and a.get("scope") == "row":
            self._capture, self._text = "key", []
        elif self._in_headline and tag == "td" and self._key is not None:
            self.headline[self._key] = a.get("data-value", "")
            self._key = None
        elif tag == "img":
            self.images.append(a["src"])
        elif tag == "div" and "data-figure" in a:
            self.figures.append(a["data-figure"])
        elif tag == "script" and a.get("src"):
            self.script_srcs.append(a["src"])
        elif tag == "script" and a.get("type") == "application/json":
            self._capture, self._text = f"json:{a['id']}", []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_headline = False
        elif tag == "th" and self._capture == "key":
            self._key, self._capture = "".join(self._text).strip(), None
        elif tag == "script" and (self._capture or "").startswith("json:"):
            self.figure_json[self._capture[5:]] = "".join(self._text)
            self._capture = None

    def handle_data(self, data: str) -> None:
        if self._capture is not None:
            self._text.append(data)


def _parse(path: Path) -> _ReportParser:
    parser = _ReportParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def _prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"id": p.id, "group": p.group, "text": p.text}) for p in prompt_set(4)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _config(tmp: Path) -> ContractionConfig:
    return ContractionConfig(
        prompts=str(_prompts_file(tmp)),
        groups=["L5", "factual"],
        recursive_group="L5",
        baseline_group="factual",
        **SETTINGS,
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("run-report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLOOP_RUNS", str(tmp / "store"))
        run_dir, _, _ = run_contraction(_config(tmp), out=tmp / "run", lm=tiny_lm())
    return Path(run_dir)


def test_completed_run_writes_report_with_headline_and_every_plot(finished_run) -> None:
    report = finished_run / "report.html"
    assert report.is_file() and (finished_run / "summary.md").is_file()
    manifest = read_manifest(finished_run)
    assert manifest["status"] == "complete" and "report_error" not in manifest
    parsed = _parse(report)

    # Headline: R_V means per group recomputed from the per-prompt table, then found in the
    # report with full precision (the data-value of its cell).
    results = pd.read_parquet(finished_run / "results.parquet")
    for mode in ("per-head", "whole"):
        rows = results[results["pr_mode"] == mode]
        for group, name in (("L5", "recursive"), ("factual", "baseline")):
            expected = float(rows.loc[rows["group"] == group, "r_v"].mean())
            shown = float(parsed.headline[f"{mode}:r_v_{name}"])
            np.testing.assert_allclose(shown, expected, rtol=1e-12)
    headline = manifest["headline"]
    assert set(parsed.headline) == set(headline)
    for key, value in headline.items():
        if isinstance(value, int | float):
            assert float(parsed.headline[key]) == pytest.approx(value, rel=1e-12), key

    # Every plot of the run, linked relative to the report, and the file is there.
    plots = sorted(p.name for p in (finished_run / "plots").glob("*.png"))
    assert len(plots) >= 3
    assert sorted(set(parsed.images)) == [f"plots/{name}" for name in plots]
    assert all((finished_run / src).is_file() for src in parsed.images)

    # Interactive figures carry their data inline; no script is loaded from anywhere.
    assert parsed.figures and parsed.script_srcs == []
    for figure in parsed.figures:
        data = json.loads(parsed.figure_json[figure])["data"]
        assert data and all(trace.get("type") for trace in data)


def test_report_failure_keeps_the_run_complete(tmp_path, monkeypatch) -> None:
    """A renderer that raises: the run stays complete with the same results, the manifest
    says why there is no report, a warning is shown, and no stale report is left."""
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    config, lm = _config(tmp_path), tiny_lm()
    run_dir, _, _ = run_contraction(config, out=tmp_path / "run", lm=lm)
    assert (run_dir / "report.html").is_file()  # the first, good run
    before = pd.read_parquet(run_dir / "results.parquet")

    def broken(*args, **kwargs):
        raise ValueError("figure exploded")

    monkeypatch.setattr(site, "run_figures", broken)
    with pytest.warns(RuntimeWarning, match="report.html not written"):
        _, _, headline = run_contraction(config, out=run_dir, lm=lm, force=True)
    after = read_manifest(run_dir)
    assert after["status"] == "complete" and after["error"] is None
    assert "ValueError: figure exploded" in after["report_error"]
    assert not (run_dir / "report.html").exists()  # the earlier report is not left behind
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "results.parquet"), before)
    assert (run_dir / "summary.md").is_file() and after["headline"] == headline
    # the complete run is reused as it is, and its report can be written afterwards
    assert run_contraction(config, out=run_dir, lm=lm)[1] is True
    monkeypatch.setattr(site, "run_figures", run_figures)
    assert site.write_run_report(run_dir).is_file()


@pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="headless Chromium is not installed: apt-get install chromium chromium-driver "
    "(scripts/setup.sh --test does it)",
)
def test_report_renders_offline_in_a_browser(finished_run) -> None:
    driver = _driver()
    try:
        _open(driver, (finished_run / "report.html").as_uri())
        # The PNGs are lazy-loaded: load them all now and wait until each has finished.
        driver.execute_async_script(
            "var done = arguments[arguments.length - 1];"
            "var images = Array.from(document.images);"
            "images.forEach(i => { i.loading = 'eager'; });"
            "Promise.all(images.map(i => i.complete ? null : new Promise(r => {"
            " i.addEventListener('load', r); i.addEventListener('error', r); })))"
            ".then(() => done());"
        )
        state = driver.execute_script(
            "var plots = Array.from(document.querySelectorAll('.plot[data-figure]'));"
            "return {n: plots.length, rendered: plots.filter(p => p.querySelector('.main-svg'))"
            ".length, images: Array.from(document.images).filter(i => i.naturalWidth > 0)"
            ".length, n_images: document.images.length};"
        )
        console, requests = _drain_logs(driver)
    finally:
        driver.quit()
    assert state["n"] >= 1 and state["rendered"] == state["n"], state
    assert state["n_images"] >= 3 and state["images"] == state["n_images"], state
    assert [e for e in console if e["level"] in ("SEVERE", "ERROR")] == []
    assert [u for u in requests if not _is_local(u)] == []
