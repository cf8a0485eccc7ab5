"""The docs site: ``mkdocs build --strict`` passes (no warning: no broken link or anchor, no
unresolved API cross-reference, no docstring mkdocstrings cannot render), every CLI command has
a page with a figure, and the figures stay small.

Skipped, saying so, when mkdocs-material or mkdocstrings[python] is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from rloop.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MAX_FIGURE_BYTES = 200_000
NEEDED = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")

missing = [name for name in NEEDED if importlib.util.find_spec(name.split(".")[0]) is None]
needs_mkdocs = pytest.mark.skipif(
    bool(missing),
    reason=f"mkdocs is not installed ({', '.join(missing)} missing): "
    "pip install mkdocs-material 'mkdocstrings[python]'",
)


def _commands() -> list[str]:
    return sorted(typer.main.get_command(app).commands)


@needs_mkdocs
def test_mkdocs_build_is_strict_clean(tmp_path) -> None:
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert not re.search(r"^WARNING", output, re.MULTILINE), output[-4000:]
    # the pages exist and the API reference was generated from the docstrings
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for verb in ("rloop.api.contraction", "rloop.api.kv_patch", "rloop.api.Result"):
        assert f'id="{verb}"' in api, verb
    for command in _commands():
        assert (site / "commands" / command / "index.html").is_file(), command
    # Sphinx roles in docstrings render as code or links, never literally (":func:`x`")
    for page in (site / "api").rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert not re.search(r":(func|class|meth|mod|attr|data|exc|obj):(<code>|`)", text), page
    configs = (site / "api" / "configs" / "index.html").read_text(encoding="utf-8")
    assert re.search(
        r'<a class="autorefs autorefs-internal"[^>]*href="#rloop\.experiments\.settings\.Settings">'
        r"<code>Settings</code></a>",
        configs,
    )  # :class:`Settings` in a config docstring links to the Settings entry on the same page


def test_every_command_has_a_page_with_a_small_figure() -> None:
    commands = _commands()
    assert len(commands) >= 20
    pages = {p.stem for p in (DOCS / "commands").glob("*.md")} - {"index"}
    assert pages == set(commands), "docs/commands/ must have one page per command"
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    index = (DOCS / "commands" / "index.md").read_text(encoding="utf-8")
    for command in commands:
        page = (DOCS / "commands" / f"{command}.md").read_text(encoding="utf-8")
        figures = re.findall(r"!\[[^\]]*\]\(\.\./figures/([^)]+\.png)\)", page)
        assert figures, f"docs/commands/{command}.md shows no figure"
        for name in figures:
            path = DOCS / "figures" / name
            assert path.is_file(), f"{command}: {path} is missing"
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert path.stat().st_size < MAX_FIGURE_BYTES, f"{path} is over 200 KB"
        assert f"commands/{command}.md" in nav, f"{command} is not in the mkdocs nav"
        assert f"({command}.md)" in index, f"{command} is not listed in commands/index.md"


def _roles_extension():
    spec = importlib.util.spec_from_file_location(
        "griffe_sphinx_roles", DOCS / "griffe_sphinx_roles.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(
    importlib.util.find_spec("griffe") is None, reason="griffe (mkdocstrings[python]) is missing"
)
def test_sphinx_roles_become_optional_references_resolved_in_scope() -> None:
    import griffe

    roles = _roles_extension()
    module = griffe.load("rloop.metrics.participation", search_paths=[str(ROOT / "src")])
    text = (
        "See :func:`window_pr`, :class:`~rloop.prompts.PromptSet`, :mod:`rloop.metrics.stats` "
        "and :data:`NOT_A_NAME`; ``code`` stays."
    )
    assert roles.rewrite_roles(text, module["window_pr"]) == (
        'See <autoref identifier="rloop.metrics.participation.window_pr" optional>'
        "<code>window_pr()</code></autoref>, "
        '<autoref identifier="rloop.prompts.PromptSet" optional><code>PromptSet</code></autoref>, '
        '<autoref identifier="rloop.metrics.stats" optional><code>rloop.metrics.stats</code>'
        "</autoref> and "
        '<autoref identifier="NOT_A_NAME" optional><code>NOT_A_NAME</code></autoref>; '
        "``code`` stays."
    )
