"""The one error family edgefl raises on purpose: ``EdgeflError`` and its children.

Each part converts what its libraries raise into a child of this at its edge, as
aiomqtt does with ``MqttError``. Programming errors are never wrapped.
"""

from __future__ import annotations


class EdgeflError(Exception):
    """Base of every error edgefl raises by design."""
