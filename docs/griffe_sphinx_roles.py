"""Griffe extension of the docs build: Sphinx roles in docstrings become cross-references.

rloop's docstrings name other objects the Sphinx way (``:func:`window_pr```,
``:class:`~rloop.prompts.PromptSet```, ``:mod:`rloop.metrics.stats```). mkdocstrings reads
them as Markdown, where they would show literally (``:func:`` followed by code). After griffe
has loaded the package, this extension rewrites each role into an *optional* autorefs
reference: the name, resolved in the scope of the object whose docstring it is in (its module's
imports included), links to that object's entry when the API reference renders it, and shows
as plain code otherwise (optional references never warn, so ``mkdocs build --strict`` stays
clean). ``~`` shows only the last component of the name, as in Sphinx.

Registered in ``mkdocs.yml`` under the python handler's ``extensions`` option.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

ROLE = re.compile(
    r":(?:py:)?(?P<role>func|meth|class|mod|attr|data|exc|obj|const|type):"
    r"`(?P<tilde>~?)(?P<name>[^`<>\s]+)`"
)


def resolve(obj: griffe.Object, name: str) -> str:
    """The full path of ``name`` as written in ``obj``'s docstring (``name`` itself when it is
    already a full path or cannot be resolved)."""
    head, _, rest = name.partition(".")
    try:
        base = obj.resolve(head)
    except (griffe.NameResolutionError, KeyError):
        return name
    return f"{base}.{rest}" if rest else base


def rewrite_roles(text: str, obj: griffe.Object) -> str:
    """``text`` with every Sphinx role replaced by an optional autorefs reference."""

    def replace(match: re.Match) -> str:
        name = match["name"].rstrip("()")
        shown = name.rsplit(".", 1)[-1] if match["tilde"] else name
        if match["role"] in ("func", "meth"):
            shown += "()"
        identifier = html.escape(resolve(obj, name), quote=True)
        return f'<autoref identifier="{identifier}" optional><code>{html.escape(shown)}</code></autoref>'

    return ROLE.sub(replace, text)


def _objects(obj: griffe.Object):
    """``obj`` and every object defined (not imported) under it."""
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring of a loaded package (see the module docs)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for obj in _objects(pkg):
            docstring = obj.docstring
            if docstring is None or ":" not in docstring.value:
                continue
            rewritten = rewrite_roles(docstring.value, obj)
            if rewritten != docstring.value:
                docstring.value = rewritten
                docstring.__dict__.pop("parsed", None)  # parsed lazily from the new value
