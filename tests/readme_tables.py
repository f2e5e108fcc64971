"""The names a README table documents: every backquoted name in a row's first cell."""

from __future__ import annotations

import re

_FIRST_CELL = re.compile(r"^\| ((?:`[^`]+`(?:, )?)+) \|", flags=re.MULTILINE)


def table_names(text: str) -> list[str]:
    """Names in the first cell of each table row of ``text`` (``| `a`, `b` | ...``)."""
    return [n for cell in _FIRST_CELL.findall(text) for n in re.findall(r"`([^`]+)`", cell)]
