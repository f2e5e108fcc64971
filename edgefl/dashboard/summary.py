"""What the dashboard page draws: a FleetState as plain JSON-able data.

Pure: reads the monitor's state, never changes it; no HTTP, no MQTT.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from ..monitor.state import BYTE_COUNTERS, FleetState, NodeView

#: Device fields the page shows in the fleet tree.
DEVICE_FIELDS = (
    "online", "eligible", "reason", "battery", "charging", "link", "last_round",
    "model_version", "buffered",
)  # fmt: skip


def summary(state: FleetState) -> dict[str, Any]:
    """The tree (cloud, gateways, devices) and the per-node figures, as the page wants them."""
    nodes = state.sorted_nodes()
    return {
        "tree": _tree(state),
        "accuracy": {
            n.id: [[v, acc] for v, acc in sorted(n.accuracy_by_version.items())]
            for n in nodes
            if n.history
        },
        "participation": {
            n.id: {k: n.figures.get(k) for k in ("round", "participants", "selected")}
            for n in nodes
            if "participants" in n.figures
        },
        "bytes": _bytes_per_role(state),
        "rejected": {n.id: _refused(n) for n in nodes if n.rejected_total},
        "clipping": {
            n.id: {k: n.figures.get(k) for k in ("clipped", "clip_bound")}
            for n in nodes
            if "clipped" in n.figures
        },
        "messages": state.messages,
        "ignored": state.ignored,
    }


def _tree(state: FleetState) -> list[dict[str, Any]]:
    """Nodes nested under their parents and devices under their gateways.

    A parent nobody has heard from yet (a gateway's cloud before its first
    record) still appears, with nothing known about it.
    """
    entries: dict[str, dict[str, Any]] = {}
    for n in state.sorted_nodes():
        entries[n.id] = _node_entry(n.id, n.role, n.online, n.figures)
    parents = {n.id: n.parent for n in state.nodes.values()}
    for d in state.sorted_devices():
        gateway = d.gateway or "?"
        if gateway not in entries:
            entries[gateway] = _node_entry(gateway, "gateway", None, {})
            parents.setdefault(gateway, None)
        device = {"id": d.id, **{k: getattr(d, k) for k in DEVICE_FIELDS}}
        entries[gateway]["devices"].append(device)
    for parent in list(parents.values()):
        if parent is not None and parent not in entries:
            entries[parent] = _node_entry(parent, "cloud", None, {})
    roots = []
    for node_id, entry in entries.items():
        parent = parents.get(node_id)
        if parent is None or _is_above(node_id, parent, parents):
            roots.append(entry)  # a claimed cycle is broken here, not drawn
        else:
            entries[parent]["children"].append(entry)
    return sorted(roots, key=lambda e: (e["role"] != "cloud", e["id"]))


def _is_above(node_id: str, other: str, parents: dict[str, str | None]) -> bool:
    """Whether ``node_id`` is ``other`` or one of its ancestors."""
    seen: set[str] = set()
    current: str | None = other
    while current is not None and current not in seen:
        if current == node_id:
            return True
        seen.add(current)
        current = parents.get(current)
    return False


def _node_entry(
    node_id: str, role: str, online: bool | None, figures: dict[str, float]
) -> dict[str, Any]:
    shown = ("round", "version", "participants", "selected", "accuracy")
    return {
        "id": node_id,
        "role": role,
        "online": online,
        **{k: figures.get(k) for k in shown},
        "children": [],
        "devices": [],
    }


def _refused(node: NodeView) -> dict[str, int]:
    """The reasons the node refused anything for (records carry every reason, 0 or not)."""
    return {reason: count for reason, count in sorted(node.rejected.items()) if count}


def _bytes_per_role(state: FleetState) -> dict[str, dict[str, float]]:
    """Each byte figure (``bytes_in`` and the MQTT counters) summed over a role's members."""
    members: list[tuple[str, dict[str, float]]] = [
        (n.role, {k: v for k, v in n.figures.items() if k == "bytes_in" or k in BYTE_COUNTERS})
        for n in state.sorted_nodes()
    ]
    members += [("device", d.bytes) for d in state.sorted_devices()]
    per_role: dict[str, dict[str, float]] = defaultdict(dict)
    for role, figures in members:
        for name, value in figures.items():
            per_role[role][name] = per_role[role].get(name, 0) + value
    return dict(per_role)
