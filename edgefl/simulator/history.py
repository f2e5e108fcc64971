"""From the metrics topics to one row per cloud round, and from rows and tallies to a summary.

Pure bookkeeping over decoded Metrics records: the simulator feeds what its
monitoring subscription receives, in arrival order. No MQTT, no clocks.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..wire import Reason

REJECT_REASONS = tuple(r.value for r in Reason)


@dataclass
class _Tier:
    """Gateway rounds closed since the last cloud round."""

    rounds: int = 0
    updates: int = 0
    participants: int = 0
    known: int = 0
    online: int = 0
    samples: int = 0
    staleness_max: int = 0
    clipped: int = 0
    energy_j: float = 0.0  # the devices' rounds, by their power model


@dataclass
class History:
    """Accumulates gateway and device metrics; a cloud round closes one history row.

    Bytes are measured: devices and gateways report their cumulative MQTT bytes to
    their parent and from it (``telemetry.ByteMeter``); a row holds what they grew.
    Aggregators count rejections since they started, so rows hold the differences.
    """

    devices: int
    gateways: int
    model_bytes: int = 0
    float32_update_bytes: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    started: float | None = None
    _tier: _Tier = field(default_factory=_Tier)
    _trained: set[str] = field(default_factory=set)
    _rejected: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))
    _rejected_seen: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _declined: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    #: the last cumulative (bytes_up, bytes_down) each device and gateway reported
    _bytes: dict[str, dict[str, tuple[int, int]]] = field(default_factory=lambda: defaultdict(dict))
    _bytes_seen: dict[str, tuple[int, int]] = field(
        default_factory=lambda: defaultdict(lambda: (0, 0))
    )

    def feed(self, doc: Mapping[str, Any]) -> dict[str, Any] | None:
        """One metrics record; returns the new history row when it closes a cloud round."""
        role, event = doc.get("role"), doc.get("event")
        if role in ("device", "gateway") and "bytes_up" in doc:
            self._bytes[str(role)][str(doc.get("id"))] = (
                _int(doc.get("bytes_up")),
                _int(doc.get("bytes_down")),
            )
        if role == "device":
            if event == "round":
                self._trained.add(str(doc.get("id")))
                self._tier.energy_j += _float(doc.get("energy_j")) or 0.0
            elif event == "declined":
                self._declined[str(doc.get("reason", "unknown"))] += 1
            return None
        if event != "round" or role not in ("gateway", "cloud"):
            return None
        self._count_rejections(f"{role}/{doc.get('id')}", doc)
        if role == "gateway":
            self._gateway_round(doc)
            return None
        return self._cloud_round(doc)

    def _gateway_round(self, doc: Mapping[str, Any]) -> None:
        t = self._tier
        t.rounds += 1
        t.updates += _int(doc.get("updates"))
        t.participants += _int(doc.get("participants"))
        t.known += _int(doc.get("children_known"))
        t.online += _int(doc.get("children_online"))
        t.samples += _int(doc.get("samples"))
        t.staleness_max = max(t.staleness_max, _int(doc.get("staleness_max")))
        t.clipped += _int(doc.get("clipped"))

    def _cloud_round(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        t = self._tier
        ts = _float(doc.get("ts"))
        if self.started is None:
            self.started = ts
        elapsed = None if ts is None or self.started is None else round(ts - self.started, 3)
        rejected = self._take_rejections()
        row: dict[str, Any] = {
            "round": len(self.rows) + 1,
            "version": _int(doc.get("version")),
            "elapsed_s": elapsed,
            "accuracy": _float(doc.get("accuracy")),
            "loss": _float(doc.get("loss")),
            "gateways": _int(doc.get("participants")),
            "gateway_rounds": t.rounds,
            "device_updates": t.updates,
            "devices_trained": len(self._trained),
            "participation": t.participants / t.known if t.known else 0.0,
            "online": t.online / t.known if t.known else None,
            "samples": t.samples,
            **self._take_bytes(),
            "staleness_max": t.staleness_max,
            "clipped": t.clipped,
            "energy_j": round(t.energy_j, 6),
            "rejected": sum(rejected.values()),
            **{f"rejected_{k}": v for k, v in sorted(rejected.items())},
        }
        self.rows.append(row)
        self._tier = _Tier()
        self._trained = set()
        return row

    def _take_bytes(self) -> dict[str, int]:
        """MQTT bytes each tier's children counted since the previous cloud round: what
        devices and gateways sent up and received down (``telemetry.ByteMeter``)."""
        out = {}
        for role in ("device", "gateway"):
            up = sum(u for u, _ in self._bytes[role].values())
            down = sum(d for _, d in self._bytes[role].values())
            seen = self._bytes_seen[role]
            out[f"bytes_up_{role}"], out[f"bytes_down_{role}"] = up - seen[0], down - seen[1]
            self._bytes_seen[role] = (up, down)
        return out

    def _count_rejections(self, node: str, doc: Mapping[str, Any]) -> None:
        for reason in REJECT_REASONS:
            value = doc.get(f"rejected_{reason}")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._rejected[node][reason] = int(value)

    def _take_rejections(self) -> dict[str, int]:
        """Rejections since the previous cloud round, by reason, over every node."""
        totals: dict[str, int] = defaultdict(int)
        for counts in self._rejected.values():
            for reason, value in counts.items():
                totals[reason] += value
        out = {}
        for reason in REJECT_REASONS:
            now = totals.get(reason, 0)
            delta = now - self._rejected_seen[reason]
            self._rejected_seen[reason] = now
            if delta:
                out[reason] = delta
        return out

    @property
    def declined(self) -> dict[str, int]:
        return dict(self._declined)


def summarize(
    rows: list[dict[str, Any]],
    tallies: Iterable[Mapping[str, Any]],
    *,
    float32_update_bytes: int,
    **fields: Any,
) -> dict[str, Any]:
    """The run's totals: the history rows summed, the device tallies summed, and ``fields``."""
    tallies = list(tallies)
    sums = {
        key: sum(_int(r.get(key)) for r in rows)
        for key in (
            "device_updates",
            "bytes_up_device",
            "bytes_up_gateway",
            "bytes_down_device",
            "bytes_down_gateway",
            "samples",
            "clipped",
        )
    }
    rejected: dict[str, int] = defaultdict(int)
    for row in rows:
        for key, value in row.items():
            if key.startswith("rejected_"):
                rejected[key[len("rejected_") :]] += _int(value)
    per_update = sums["bytes_up_device"] / sums["device_updates"] if sums["device_updates"] else 0
    participation = [r["participation"] for r in rows if r.get("participation") is not None]
    last = rows[-1] if rows else {}
    energy = [float(t["energy_wh"]) for t in tallies if t.get("energy_wh") is not None]
    return {
        **fields,
        "rounds": len(rows),
        "final_accuracy": last.get("accuracy"),
        "final_loss": last.get("loss"),
        "best_accuracy": max(
            (r["accuracy"] for r in rows if r.get("accuracy") is not None), default=None
        ),
        **sums,
        "bytes_per_update": per_update,
        "compression_ratio": float32_update_bytes / per_update if per_update else None,
        "participation": sum(participation) / len(participation) if participation else None,
        "updates_sent": sum(_int(t.get("updates")) for t in tallies),
        "updates_buffered": sum(_int(t.get("buffered")) for t in tallies),
        "updates_late": sum(_int(t.get("late")) for t in tallies),
        "updates_pending": sum(_int(t.get("pending")) for t in tallies),
        "updates_dropped": sum(_int(t.get("dropped")) for t in tallies),
        "device_bytes_up_measured": sum(_int(t.get("bytes_up")) for t in tallies),
        "device_bytes_down_measured": sum(_int(t.get("bytes_down")) for t in tallies),
        "energy_wh": sum(energy) if energy else None,
        "energy_model_j": sum(_float(r.get("energy_j")) or 0.0 for r in rows),
        "rejected": dict(sorted(rejected.items())),
        "cohorts": _cohorts(tallies),
    }


def _cohorts(tallies: list[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """Per profile cohort: its devices, the updates they sent, and what is still waiting."""
    out: dict[str, dict[str, int]] = {}
    for t in tallies:
        c = out.setdefault(
            str(t.get("cohort")), {"devices": 0, "updates_sent": 0, "pending": 0, "dropped": 0}
        )
        c["devices"] += 1
        c["updates_sent"] += _int(t.get("updates"))
        c["pending"] += _int(t.get("pending"))
        c["dropped"] += _int(t.get("dropped"))
    return dict(sorted(out.items()))


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    return int(value) if math.isfinite(value) else 0


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None
