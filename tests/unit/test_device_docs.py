"""The device's README fragment lists every setting with its real default and every Status field."""

from __future__ import annotations

import re
from pathlib import Path

from edgefl.cli import _default_text
from edgefl.config import DeviceSettings, iter_fields
from edgefl.wire import Status

DOC = Path(__file__).resolve().parents[2] / "README.md"


def table(heading: str) -> dict[str, str]:
    """First column -> second column of the table under ``heading``."""
    section = re.split(r"\n#{2,4} ", DOC.read_text().split(heading, 1)[1], maxsplit=1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| (.+?) \|", section, flags=re.MULTILINE)
    return dict(rows)


def test_every_setting_is_documented_with_its_default() -> None:
    documented = table("### Device settings")
    fields = dict(iter_fields(DeviceSettings))
    assert set(documented) == set(fields)
    for name, info in fields.items():
        assert documented[name].strip("`") == _default_text(info), name


def test_every_status_field_is_documented() -> None:
    names = {info.alias or name for name, info in Status.model_fields.items()}
    assert set(table("#### Status (")) == names


def documented_metrics() -> set[str]:
    return set(table("#### Device metrics")) | set(table("#### Metrics of every role"))
