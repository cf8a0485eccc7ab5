"""Markdown pieces of run summaries: tables and the one-line model description."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

_PIPE = re.compile(r"(\\*)\|")  # a "|" and the backslashes right before it
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def table_cell(text: object) -> str:
    """``text`` safe inside a Markdown (GFM) table cell: each ``|`` escaped as ``\\|`` (and
    backslashes right before it doubled, so they stay literal) and line breaks made spaces, so a
    value never splits its cell or its row."""
    text = _LINE_BREAK.sub(" ", str(text))
    return _PIPE.sub(lambda match: match[1] * 2 + "\\|", text)


def markdown_table(frame: pd.DataFrame, digits: int = 4) -> str:
    """A Markdown table of ``frame`` (floats to ``digits`` significant digits; cells escaped
    with :func:`table_cell`)."""

    def fmt(value) -> str:
        if isinstance(value, float | np.floating):
            return f"{value:.{digits}g}"
        return table_cell(value)

    header = "| " + " | ".join(table_cell(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def summary_head(title: str, lm) -> list[str]:
    """The first lines of a run summary: the title and the model line."""
    return [f"# {title}", "", f"- model: {model_line(lm)}"]


def model_line(lm) -> str:
    """'name (family, L layers, H heads, K KV heads, dtype)' of a loaded model."""
    a = lm.adapter
    return (
        f"{lm.name} ({a.family}, {a.n_layers} layers, {a.n_heads} heads, "
        f"{a.n_kv_heads} KV heads, {lm.dtype})"
    )
