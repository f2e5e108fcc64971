"""Aggregation nodes: a gateway and the cloud are the same code, one tier apart.

``Aggregator`` is the asyncio shell; ``rounds``, ``selection``, ``admission`` and
``sync`` hold the pure rules it applies. Nothing here trains a model.
"""

from __future__ import annotations

from .admission import Admitted, UpdateGate
from .node import Aggregator, serve_aggregator
from .rounds import Round, quorum_target
from .selection import Children, select
from .sync import ParentSync

__all__ = [
    "Admitted",
    "Aggregator",
    "Children",
    "ParentSync",
    "Round",
    "UpdateGate",
    "quorum_target",
    "select",
    "serve_aggregator",
]
