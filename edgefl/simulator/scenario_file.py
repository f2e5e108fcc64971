"""Scenario files on disk: finding one (as given, under ``simulators/``, or packaged),
parsing its TOML and validating it into a ``Scenario``, with one readable line on error.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..config import ConfigError, describe_error
from .scenario import Scenario

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def repo_scenarios() -> Path:
    """``simulators/`` of the source tree this package runs from."""
    return Path(__file__).resolve().parents[2] / "simulators"


#: A copy of simulators/default.toml shipped in the wheel (a test keeps them equal).
PACKAGED_DEFAULT = Path(__file__).resolve().parent.parent / "data" / "simulator-default.toml"


def resolve(path: str | os.PathLike[str] | None) -> Path | None:
    """The scenario file to load: as given, else under ``simulators/``.

    ``None`` is ``simulators/default.toml``, or its packaged copy when the
    package is installed without the repository (else the schema's defaults).
    """
    if path is None:
        for default in (repo_scenarios() / "default.toml", PACKAGED_DEFAULT):
            if default.is_file():
                return default
        return None
    given = Path(path)
    if given.is_file():
        return given
    for candidate in (repo_scenarios() / given, repo_scenarios() / f"{given}.toml"):
        if given.parent == Path(".") and candidate.is_file():
            return candidate
    raise ConfigError(f"scenario {str(path)!r} not found (looked in . and {repo_scenarios()})")


def load_scenario(
    path: str | os.PathLike[str] | None = None,
    *,
    flags: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Scenario:
    """Parse and validate a scenario file, then apply ``overrides`` (dotted keys allowed).

    ``flags`` names the flag of each override, which an error then blames.
    Raises ``ConfigError`` with one readable line on any problem.
    """
    found = resolve(path)
    doc: dict[str, Any] = {}
    if found is not None:
        try:
            doc = tomllib.loads(found.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{found}: {exc}".splitlines()[0]) from None
        doc.setdefault("name", "default" if found == PACKAGED_DEFAULT else found.stem)
        _anchor_traces(doc, found.parent)
    for dotted, value in overrides.items():
        _set(doc, dotted, value)
    try:
        return Scenario.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, found, flags or {})) from None


def _one_line(exc: ValidationError, path: Path | None, flags: Mapping[str, str]) -> str:
    # The model validator's own messages already say where: drop pydantic's prefix.
    text = describe_error(exc, path, flags)
    return text.replace("settings: Value error, ", "").replace("Value error, ", "")


def _anchor_traces(doc: dict[str, Any], base: Path) -> None:
    """Trace paths in a scenario are relative to the scenario file."""
    for cohort in doc.get("profiles", []):
        if isinstance(cohort, dict) and isinstance(cohort.get("trace"), str):
            trace = Path(cohort["trace"])
            cohort["trace"] = str(trace if trace.is_absolute() else base / trace)


def _set(doc: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = doc
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
