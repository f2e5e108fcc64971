"""Monitoring payloads as JSON, for any MQTT tool: Status (retained) and metrics records."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping

from pydantic import ValidationError

from ..errors import Reason, Rejected
from .schemas import (
    MONITOR_SCHEMA,
    Status,
    first_error,
)

# ------------------------------------------------------------------ JSON codec


def encode_status(status: Status) -> bytes:
    return status.model_dump_json(by_alias=True).encode()


def decode_status(data: bytes, *, max_bytes: int = 64 * 1024) -> Status:
    if len(data) > max_bytes:
        raise Rejected(Reason.OVERSIZED, f"status of {len(data)} bytes")
    try:
        return Status.model_validate_json(data)
    except ValidationError as exc:
        raise Rejected(Reason.MALFORMED, first_error(exc)) from None


MetricValue = float | int | str | bool | None


def encode_metrics(role: str, sender: str, fields: Mapping[str, MetricValue]) -> bytes:
    """Metrics are a flat JSON object: ``schema``, ``role``, ``id``, ``ts``, then the fields."""
    doc: dict[str, MetricValue] = {"schema": MONITOR_SCHEMA, "role": role, "id": sender}
    doc["ts"] = round(time.time(), 3)
    doc.update(fields)
    return json.dumps(doc, allow_nan=False, default=float).encode()


def decode_metrics(data: bytes) -> dict[str, MetricValue]:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise Rejected(Reason.MALFORMED, f"metrics not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise Rejected(Reason.MALFORMED, "metrics not an object")
    return doc
