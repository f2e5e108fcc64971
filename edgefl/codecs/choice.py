"""Which codec and k a sender uses this round: from its uplink, the deadline and the
limits of its node's round config. Pure: the caller passes the measured figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..params import Spec
from .registry import known, update_bytes

#: The upload may take this share of the time left before the deadline.
UPLOAD_SHARE = 0.5
#: The shares of values ``auto`` tries for topk, largest first.
FRACTIONS = (0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)


@dataclass(frozen=True)
class Plan:
    """A round's codec, the share of values asked of it (dense codecs send them all), and
    the update's expected bytes."""

    codec: str
    fraction: float
    bytes: int


def _plan(spec: Spec, codec: str, fraction: float) -> Plan:
    return Plan(codec, fraction, update_bytes(spec, codec, fraction))


def plan(
    spec: Spec,
    *,
    prefer: str,
    allowed: Sequence[str],
    min_fraction: float,
    fraction: float = 0.1,
    kbps: float | None = None,
    seconds: float | None = None,
) -> Plan:
    """The codec for an update of ``spec``.

    ``prefer`` a codec name: that one (topk at ``fraction``, raised to ``min_fraction``)
    when ``allowed``, else ``u8`` or the first allowed one the sender knows. ``auto``:
    ``u8`` while it goes out within ``UPLOAD_SHARE`` of ``seconds`` at ``kbps`` (or
    either is unknown); else topk with the largest of ``FRACTIONS`` that fits, and
    ``min_fraction`` when none does (the deadline check then decides).
    """
    usable = [c for c in allowed if known(c)]
    if prefer != "auto":
        if prefer in usable:
            return _plan(spec, prefer, max(fraction, min_fraction))
        prefer = "auto"
    dense = "u8" if "u8" in usable else (usable[0] if usable else "u8")
    if kbps is None or seconds is None or "topk" not in usable:
        return _plan(spec, dense, 1.0)
    budget = kbps * 1000.0 / 8.0 * max(seconds, 0.0) * UPLOAD_SHARE
    chosen = _plan(spec, dense, 1.0)
    if chosen.bytes <= budget:
        return chosen
    for f in FRACTIONS:
        if f < min_fraction:
            break
        candidate = _plan(spec, "topk", f)
        if candidate.bytes <= budget:
            return candidate
    return _plan(spec, "topk", min_fraction)


def least_bytes(spec: Spec, allowed: Sequence[str], min_fraction: float) -> int:
    """The smallest update a child may send under these limits: what a node's selection
    weighs against a child's uplink and the deadline."""
    sizes = [update_bytes(spec, c, min_fraction) for c in allowed if known(c)]
    return min(sizes) if sizes else update_bytes(spec)
