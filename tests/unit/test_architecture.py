"""docs/architecture.md stays true: every module it names exists, every module is named."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"


def _layout() -> set[str]:
    """Paths under edgefl/ that the layout block names, from its indentation."""
    block = DOC.read_text().split("## 2. Layout", 1)[1].split("```")[1]
    named: set[str] = set()
    stack: list[tuple[int, str]] = []
    for line in block.splitlines():
        m = re.match(r"^( *)(\S+\.py|\S+/)(?:\s|$)", line)
        if not m:
            continue
        indent, name = len(m[1]), m[2]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = "".join(p for _, p in stack) + name
        named.add(path.rstrip("/"))
        if name.endswith("/"):
            stack.append((indent, name))
    return named


def _modules() -> set[str]:
    found = set()
    for path in (ROOT / "edgefl").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if path.name in ("__init__.py", "__main__.py"):
            found.add(path.parent.relative_to(ROOT).as_posix())
        else:
            found.add(rel)
    return found


def test_every_module_named_in_the_architecture_exists() -> None:
    missing = {p for p in _layout() if not (ROOT / p).exists()}
    assert missing == set()


def test_every_package_and_module_is_named_in_the_architecture() -> None:
    assert _modules() - _layout() == set()


def test_every_module_the_extension_table_names_exists() -> None:
    table = DOC.read_text().split("## 6. Extension points", 1)[1]
    for path in re.findall(r"`(edgefl/[\w/]+\.py)`", table):
        assert (ROOT / path).is_file(), path


def _occurrences(pattern: str) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{n}"
        for path in sorted((ROOT / "edgefl").rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(pattern, line) and not line.lstrip().startswith("#")
    ]


def test_the_kinds_of_link_are_written_once() -> None:
    """Status, Reading and the eligibility settings share one ``Link``."""
    assert len(_occurrences(r'"ethernet",\s*"wifi",\s*"cellular"')) == 1


def test_no_asyncio_wait_for() -> None:
    """Before Python 3.12 it can swallow a cancellation; ``supervise`` has the safe forms."""
    assert [p for p in _occurrences(r"asyncio\.wait_for\(") if "supervise.py" not in p] == []
