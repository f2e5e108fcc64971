"""What a node says about a round: the Metrics record and the one INFO line.

Pure functions of a round and the node's counters; the shell publishes and logs them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

from ..wire import MetricValue, Reason
from .rounds import Round
from .selection import Children


def round_fields(
    rnd: Round,
    *,
    aggregations: int,
    children: Children,
    rejected: Counter[Reason],
    parent_version: int | None,
    redelivered: int = 0,
) -> dict[str, MetricValue]:
    """The fields every round record carries (``reannounce`` records carry only these).

    Rejection counts are cumulative since the node started, one field per reason.
    """
    fields: dict[str, MetricValue] = {
        "round": rnd.number,
        "version": rnd.version,
        "aggregations": aggregations,
        "selected": len(rnd.selected),
        "participants": rnd.participants,
        "updates": rnd.updates,
        "samples": rnd.samples,
        "bytes_in": rnd.bytes_in,
        "staleness_max": rnd.staleness_max,
        "staleness_mean": round(rnd.staleness_mean, 3),
        "fold_ms": round(rnd.fold_s * 1e3, 3),
        "reannounced": rnd.reannounced,
        "children_known": len(children),
        "children_online": len(children.online),
        "children_eligible": len(children.online_eligible),
        "parent_version": parent_version,
    }
    for reason in Reason:
        if reason is not Reason.DUPLICATE:  # a redelivery, not a rejection
            fields[f"rejected_{reason.value}"] = rejected[reason]
    fields["rejected_total"] = sum(rejected.values())
    fields["redelivered"] = redelivered
    return fields


def evaluation_fields(result: Mapping[str, Any] | None, eval_ms: float) -> dict[str, MetricValue]:
    """``accuracy``, ``loss`` (None when not finite) and ``eval_ms``; nothing without a result."""
    if not result:
        return {}
    return {
        "accuracy": _finite(result.get("accuracy")),
        "loss": _finite(result.get("loss")),
        "eval_ms": round(eval_ms, 1),
    }


def round_story(node: str, rnd: Round, f: Mapping[str, MetricValue], version: int) -> str:
    """The round in one line: why it closed, how long, who, how much, what it became."""
    who = f"{rnd.participants}/{len(rnd.selected)} selected" if rnd.selected else "open round"
    accuracy = f", accuracy {f['accuracy']:.3f}" if isinstance(f.get("accuracy"), float) else ""
    sync = f", synced as seq {f['sync_seq']}" if f.get("synced") else ""
    seconds = float(f.get("round_ms") or 0) / 1e3
    return (
        f"{node} round {rnd.number} closed ({f.get('close')}) after {seconds:.2f} s: "
        f"v{rnd.version} -> v{version} from {rnd.updates} updates ({who}), "
        f"{rnd.samples} samples, {rnd.bytes_in / 1024:.0f} KB, "
        f"staleness <= {rnd.staleness_max}, agg {f.get('agg_ms')} ms{accuracy}, "
        f"rejected {f.get('rejected_total')} so far{sync}"
    )


def _finite(value: Any) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None
