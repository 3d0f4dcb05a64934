"""Markdown tables that check their own shape: every row has as many cells as there are headers, and no cell can
split a row, because a bare `|` inside a cell (a run named `noise0.5|genrecal`, say) is escaped before writing."""
from __future__ import annotations

import re

_UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")


def run_label(key: str) -> str:
    """A results key `regime|method` as a table shows it: `noise0.5 / genrecal` (no pipe for a renderer to split)."""
    return key.replace("|", " / ")


def cell_text(value, digits: int = 3) -> str:
    """One cell: None as a dash, floats rounded to `digits`, newlines as spaces, `|` escaped as `\\|`."""
    if value is None:
        text = "-"
    elif isinstance(value, float):
        text = f"{value:.{digits}f}"
    else:
        text = str(value)
    return _UNESCAPED_PIPE.sub(r"\\|", text.replace("\n", " "))


def count_cells(line: str) -> int:
    """How many cells a markdown table line has, as a GFM renderer splits it (escaped `\\|` does not split)."""
    body = line.strip()
    if body.startswith("|"):
        body = body[1:]
    if body.endswith("|") and not body.endswith("\\|"):
        body = body[:-1]
    return len(_UNESCAPED_PIPE.split(body))


def md_table(headers: list[str], rows: list[list], digits: int = 3) -> list[str]:
    """Markdown lines of a table: a header, its rule, one line per row. Raises ValueError naming the row when a row
    has more or fewer cells than there are headers, and checks the written lines split back into that many cells."""
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"table row {i} ({row[0]!r}...) has {len(row)} cells for {len(headers)} headers")
    lines = ["| " + " | ".join(cell_text(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell_text(v, digits) for v in row) + " |" for row in rows]
    for i, line in enumerate(lines):
        if count_cells(line) != len(headers):  # e.g. a cell ending in a backslash that escaped its own border
            raise ValueError(f"table line {i} renders as {count_cells(line)} cells for {len(headers)} headers: {line}")
    return lines
