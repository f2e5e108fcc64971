"""edgefl: hierarchical edge-to-cloud federated learning for IoT fleets, over MQTT."""

from __future__ import annotations

__version__ = "0.1.0"
