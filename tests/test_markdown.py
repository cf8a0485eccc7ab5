"""Markdown tables of run summaries: a ``|`` (or a line break) inside a value never splits a
cell or a row; checked against a hand-written table and by parsing the output with a GFM table
parser (markdown-it, the one the report site renders summaries with)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from markdown_it import MarkdownIt

from rloop.runs.markdown import markdown_table, table_cell

VALUES = ["a|b", "a\\|b", "||x", "C:\\dir\\", "one\ntwo|x", "plain"]


def _parsed_cells(text: str) -> list[list[str]]:
    """The text of every cell, row by row, as a GFM parser reads the table."""
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    rows, row = [], []
    for token in tokens:
        if token.type == "inline":
            row.append("".join(c.content for c in token.children or [] if c.type == "text"))
        elif token.type == "tr_close":
            rows.append(row)
            row = []
    return rows


def test_pipes_in_cells_are_escaped_by_hand() -> None:
    frame = pd.DataFrame({"prompt|text": ["a|b", "x\\|y", "two\nlines"], "r_v": [0.5, 1.25, 2.0]})
    expected = "\n".join(
        [
            "| prompt\\|text | r_v |",
            "|---|---|",
            "| a\\|b | 0.5 |",
            "| x\\\\\\|y | 1.25 |",
            "| two lines | 2 |",
        ]
    )
    assert markdown_table(frame) == expected


def test_a_gfm_parser_reads_every_value_back() -> None:
    frame = pd.DataFrame({"text": VALUES, "n|m": np.arange(len(VALUES))})
    rows = _parsed_cells(markdown_table(frame))
    assert rows[0] == ["text", "n|m"]
    assert len(rows) == len(VALUES) + 1
    for row, value, number in zip(rows[1:], VALUES, range(len(VALUES)), strict=True):
        assert row == [value.replace("\n", " "), str(number)]


def test_table_cell_leaves_text_without_pipes_alone() -> None:
    assert table_cell("L5_000 (L5) \\ done") == "L5_000 (L5) \\ done"
    assert table_cell(3) == "3"
