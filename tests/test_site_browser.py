"""The report site in a real browser: headless Chromium driven by selenium.

The site is built from the synthetic store of ``test_site`` and opened from disk (file://)
and through a local ``http.server``, with the network blocked (every proxied request goes to
a closed port and every host name but localhost fails to resolve). Checks: every page
loads, every link resolves, every figure container holds a rendered plotly SVG, the console
has no errors, and no request leaves the machine. Screenshots of the index and a run page
are written to the test's tmp directory and, when ``RLOOP_TEST_ARTIFACTS`` is set, copied
there.

Needs Debian's ``chromium`` and ``chromium-driver`` (``scripts/setup.sh --test`` installs
them); skipped, saying so, when they are not installed.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import threading
import urllib.request
from collections import deque
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlsplit

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from rloop.runs.site import build_site
from tests.test_site import make_store

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="headless Chromium is not installed: apt-get install chromium chromium-driver "
    "(scripts/setup.sh --test does it)",
)

LOCAL_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}
LOCAL_SCHEMES = {"file", "data", "about", "blob", "chrome-error"}
PAGE_LOAD_SECONDS = 30


def _driver() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        # The network is off: proxied requests go to a closed local port and no host name
        # but localhost resolves. Loopback itself bypasses the proxy (Chromium's default).
        "--proxy-server=127.0.0.1:9",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(PAGE_LOAD_SECONDS)
    return driver


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    store = make_store(tmp_path_factory.mktemp("browser-store") / "runs")
    out = tmp_path_factory.mktemp("browser-site") / "site"
    build_site(store["root"], out)
    return out


@pytest.fixture(scope="module")
def browser():
    driver = _driver()
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def server(site):
    """The site served on an ephemeral loopback port; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # keep the test output clean
        pass


# ---------------------------------------------------------------------------- helpers


def _drain_logs(driver) -> tuple[list[dict], list[str]]:
    """Console entries and the URLs of every request since the last call."""
    console = driver.get_log("browser")
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return console, urls


def _is_local(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in LOCAL_SCHEMES or (
        parts.scheme in ("http", "https", "ws") and parts.hostname in LOCAL_HOSTS
    )


def _open(driver, url: str) -> None:
    driver.get(url)
    driver.execute_async_script(
        "var done = arguments[arguments.length - 1];"
        "if (document.readyState === 'complete') { done(); }"
        "else { window.addEventListener('load', function () { done(); }); }"
    )


def _plot_state(driver) -> dict:
    """Figure containers, how many hold a rendered plotly SVG, and plot error messages."""
    return driver.execute_script(
        "var plots = Array.from(document.querySelectorAll('.plot[data-figure]'));"
        "return {n: plots.length,"
        " rendered: plots.filter(p => p.classList.contains('js-plotly-plot')"
        "   && p.querySelector('.main-svg') !== null).length,"
        " errors: plots.filter(p => p.classList.contains('plot-error')).map(p => p.textContent)};"
    )


def _links(driver) -> list[str]:
    """Absolute URLs of every href/src on the page (the browser resolves them)."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('[href], [src]'))"
        ".map(e => e.href || e.src).filter(u => typeof u === 'string' && u.length);"
    )


def _resource_exists(url: str, site: Path, base: str | None) -> bool:
    parts = urlsplit(url)
    if parts.scheme == "file":
        return Path(unquote(parts.path)).is_file()
    assert base is not None and url.startswith(base), url
    with urllib.request.urlopen(url, timeout=10) as response:  # loopback only
        return response.status == 200


def _crawl(driver, start: str, site: Path, base: str | None = None) -> dict[str, dict]:
    """Visit every page reachable from ``start``; returns per page its plot state, console
    errors and requests. Every non-page link must resolve, every #fragment must exist."""
    _drain_logs(driver)
    seen: dict[str, dict] = {}
    queue = deque([start])
    while queue:
        url = queue.popleft()
        if url in seen:
            continue
        _open(driver, url)
        assert driver.execute_script("return document.title"), f"{url} has no title"
        fragments_missing = []
        for link in _links(driver):
            target, fragment = urldefrag(link)
            if not _is_local(target):
                continue  # asserted below through the request log and the ref check
            if target.endswith(".html"):
                if target not in seen:
                    queue.append(target)
                if fragment and target == url:
                    found = driver.execute_script(
                        "return document.getElementById(arguments[0]) !== null;", fragment
                    )
                    if not found:
                        fragments_missing.append(fragment)
            elif urlsplit(target).scheme in ("file", "http"):
                assert _resource_exists(target, site, base), f"{url}: {link} does not resolve"
        assert not fragments_missing, f"{url}: missing anchors {fragments_missing}"
        refs = _links(driver)
        console, requests = _drain_logs(driver)
        seen[url] = {
            "plots": _plot_state(driver),
            "errors": [e for e in console if e["level"] in ("SEVERE", "ERROR")],
            "requests": requests,
            "external_refs": [r for r in refs if not _is_local(r)],
        }
    return seen


def _screenshot(driver, url: str, path: Path) -> Path:
    _open(driver, url)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, max(800, min(int(height), 5000)))
    driver.save_screenshot(str(path))
    driver.set_window_size(1400, 1000)
    artefacts = os.environ.get("RLOOP_TEST_ARTIFACTS")
    if artefacts:
        Path(artefacts).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, Path(artefacts) / path.name)
    return path


def _check_pages(pages: dict[str, dict], expected_pages: int) -> None:
    assert len(pages) == expected_pages, sorted(pages)
    n_figures = 0
    for url, state in pages.items():
        plots = state["plots"]
        assert plots["errors"] == [], (url, plots["errors"])
        assert plots["rendered"] == plots["n"], (url, plots)
        n_figures += plots["n"]
        assert state["errors"] == [], (url, state["errors"])
        assert state["external_refs"] == [], (url, state["external_refs"])
        outside = [u for u in state["requests"] if not _is_local(u)]
        assert outside == [], (url, outside)
    assert n_figures >= 12


# ---------------------------------------------------------------------------- tests


def test_site_from_disk_renders_offline(site, browser, tmp_path):
    index = (site / "index.html").as_uri()
    pages = _crawl(browser, index, site)
    n_pages = len(list(site.rglob("*.html")))
    _check_pages(pages, n_pages)
    # the plotly asset was loaded from the site itself
    plotly_uri = (site / "assets" / "plotly.min.js").as_uri()
    assert any(plotly_uri in state["requests"] for state in pages.values())
    # screenshots (look at them when changing the templates)
    _open(browser, index)
    run_link = browser.find_element(By.CSS_SELECTOR, "table#runs tbody tr a.run-link")
    first_contraction = browser.execute_script(
        "return Array.from(document.querySelectorAll('table#runs tbody tr'))"
        ".find(r => r.dataset.experiment === 'contraction' && r.dataset.status === 'complete')"
        ".querySelector('a.run-link').href;"
    )
    assert run_link.get_attribute("href")
    shot_index = _screenshot(browser, index, tmp_path / "site-index.png")
    shot_run = _screenshot(browser, first_contraction, tmp_path / "site-run-contraction.png")
    for shot in (shot_index, shot_run):
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_site_over_http_renders_offline(site, browser, server):
    # The disk crawl visits every page; over HTTP the index, every compare page and the
    # run pages with figures of each kind are enough to show the served site works.
    _drain_logs(browser)
    urls = [server + "index.html"]
    urls += [server + f"compare/{p.name}" for p in sorted((site / "compare").glob("*.html"))]
    for page in sorted((site / "runs").glob("*.html")):
        text = page.read_text(encoding="utf-8")
        if any(f'id="fig-{kind}' in text for kind in ("ablation", "dose", "spec", "pr-profile")):
            urls.append(server + f"runs/{page.name}")
    assert len(urls) >= 6
    for url in urls:
        _open(browser, url)
        plots = _plot_state(browser)
        assert plots["rendered"] == plots["n"] and not plots["errors"], (url, plots)
        for link in _links(browser):
            target = urldefrag(link)[0]
            assert _is_local(target), (url, link)
            if urlsplit(target).scheme == "http":
                assert _resource_exists(target, site, server), (url, link)
        console, requests = _drain_logs(browser)
        assert [e for e in console if e["level"] in ("SEVERE", "ERROR")] == [], (url, console)
        assert requests and all(_is_local(u) for u in requests), (url, requests)


def test_hover_shows_the_prompt_text(site, browser):
    """Hovering a point of the R_V strip plot shows the prompt text as written (plotly
    reads <...> in labels as markup, so the figure escapes it; the browser shows it back)."""
    page = next(
        p
        for p in (site / "runs").glob("*.html")
        if 'id="fig-r-v-strip-whole"' in p.read_text("utf-8")
    )
    _open(browser, page.as_uri())
    label = browser.execute_async_script(
        "var done = arguments[arguments.length - 1];"
        "var plot = document.querySelector('#fig-r-v-strip-whole .plot');"
        "Plotly.Fx.hover(plot, [{curveNumber: 0, pointNumber: 0}]);"
        "setTimeout(function () {"
        "  var text = plot.querySelector('.hoverlayer .hovertext');"
        "  done(text ? text.textContent : null); }, 200);"
    )
    assert label is not None
    assert "L5_000 (L5)" in label and "Prompt L5_000 <about> itself & more" in label


def test_index_filters_and_sorting(site, browser):
    _open(browser, (site / "index.html").as_uri())
    rows = browser.find_elements(By.CSS_SELECTOR, "table#runs tbody tr")
    experiments = [r.get_attribute("data-experiment") for r in rows]
    assert len(rows) == 10

    def visible(selector: str = "table#runs tbody tr") -> list:
        return [r for r in browser.find_elements(By.CSS_SELECTOR, selector) if r.is_displayed()]

    Select(browser.find_element(By.ID, "filter-experiment")).select_by_value("contraction")
    shown = visible()
    assert len(shown) == experiments.count("contraction")
    assert {r.get_attribute("data-experiment") for r in shown} == {"contraction"}
    assert browser.find_element(By.ID, "filter-count").text == (
        f"{experiments.count('contraction')} of 10 runs"
    )
    sections = browser.find_elements(By.CSS_SELECTOR, "[data-section-experiment]")
    assert {s.get_attribute("data-section-experiment") for s in sections if s.is_displayed()} == {
        "contraction"
    }
    Select(browser.find_element(By.ID, "filter-status")).select_by_value("complete")
    assert len(visible()) == 2  # c1 and c2
    Select(browser.find_element(By.ID, "filter-experiment")).select_by_value("")
    Select(browser.find_element(By.ID, "filter-status")).select_by_value("")
    browser.find_element(By.ID, "filter-text").send_keys("orphan")
    assert [r.get_attribute("data-status") for r in visible()] == ["corrupted"]
    browser.find_element(By.ID, "filter-text").clear()
    browser.execute_script(
        "document.getElementById('filter-text').dispatchEvent(new Event('input'));"
    )
    assert len(visible()) == 10

    # sorting by date: ascending, then descending (ISO timestamps sort as text)
    date_header = browser.find_elements(By.CSS_SELECTOR, "table#runs thead th")[4]
    date_header.click()
    keys = [
        c.get_attribute("data-value")
        for c in browser.find_elements(By.CSS_SELECTOR, "table#runs tbody tr td:nth-child(5)")
    ]
    dated = [k for k in keys if k]
    assert dated == sorted(dated) and keys[len(dated) :] == [""] * (len(keys) - len(dated))
    assert date_header.get_attribute("aria-sort") == "ascending"
    date_header.click()
    keys = [
        c.get_attribute("data-value")
        for c in browser.find_elements(By.CSS_SELECTOR, "table#runs tbody tr td:nth-child(5)")
    ]
    assert [k for k in keys if k] == sorted(dated, reverse=True)


def test_run_table_sorts_numbers_numerically(site, browser):
    page = next(p for p in (site / "runs").glob("*.html") if "kv-patch" in p.read_text("utf-8"))
    _open(browser, page.as_uri())
    header = browser.find_elements(By.CSS_SELECTOR, "#table-generations-data thead th")
    names = [h.text.strip(" ↕▲▼") for h in header]
    column = names.index("score") + 1
    header[column - 1].click()
    cells = browser.find_elements(
        By.CSS_SELECTOR, f"#table-generations-data tbody tr td:nth-child({column})"
    )
    values = [float(c.get_attribute("data-value")) for c in cells]
    assert values == sorted(values) and len(values) == 15
    # the per-table filter hides rows that do not contain the text
    box = browser.find_element(By.CSS_SELECTOR, "input[data-target='table-generations-data']")
    box.send_keys("natural_source")
    rows = browser.find_elements(By.CSS_SELECTOR, "#table-generations-data tbody tr")
    assert sum(r.is_displayed() for r in rows) == 3


@pytest.mark.parametrize("width", [1300, 1400])
def test_index_run_list_fits_the_page_without_clipping(site, browser, width):
    """At laptop widths the run list wraps instead of scrolling sideways: no column (the
    headline one was clipped at 1300 px) lies outside its box, and its table does not scroll."""
    browser.set_window_size(width, 1000)
    try:
        _open(browser, (site / "index.html").as_uri())
        state = browser.execute_script(
            "var box = document.getElementById('runs').parentElement;"
            "var right = box.getBoundingClientRect().right;"
            "var cells = Array.from(document.querySelectorAll('#runs th, #runs td'));"
            "return {scroll: box.scrollWidth, client: box.clientWidth,"
            " outside: cells.filter(c => c.getBoundingClientRect().right > right + 1)"
            "   .map(c => c.textContent.trim().slice(0, 40)),"
            " headline_cells: document.querySelectorAll('#runs td.headline').length};"
        )
    finally:
        browser.set_window_size(1400, 1000)
    assert state["headline_cells"] == 10
    assert state["outside"] == [] and state["scroll"] <= state["client"], state
