"""Battery, bandwidth and connectivity of a node: OS readers, simulated models, eligibility.

Readers only read and the policy only decides: nothing here trains, publishes or
sleeps. Simulated profiles are deterministic and run on an injected clock.
"""

from __future__ import annotations

from .policy import (
    BATTERY_LOW,
    LINK_NOT_ALLOWED,
    LOW_MEMORY,
    OK,
    REASONS,
    TOO_HOT,
    UPLINK_TOO_SLOW,
    Decision,
    EligibilityPolicy,
    HasProfile,
    policy_of,
)
from .readers import (
    OsReader,
    UplinkEstimator,
    cuda_available,
    default_route_interface,
    link_of,
    read_battery,
    read_cpu_temp,
    read_link,
    read_memory_mb,
)
from .reading import LINKS, Link, Reading
from .sim import (
    Connectivity,
    MarkovConnectivity,
    SimBattery,
    SimLink,
    SimProfile,
    SimReader,
    TraceConnectivity,
)
from .spec import Dist, ProfileSpec, draw_profile

__all__ = [
    "BATTERY_LOW",
    "LINKS",
    "LINK_NOT_ALLOWED",
    "LOW_MEMORY",
    "OK",
    "REASONS",
    "TOO_HOT",
    "UPLINK_TOO_SLOW",
    "Connectivity",
    "Decision",
    "Dist",
    "EligibilityPolicy",
    "HasProfile",
    "Link",
    "MarkovConnectivity",
    "OsReader",
    "ProfileSpec",
    "Reading",
    "SimBattery",
    "SimLink",
    "SimProfile",
    "SimReader",
    "TraceConnectivity",
    "UplinkEstimator",
    "cuda_available",
    "default_route_interface",
    "draw_profile",
    "link_of",
    "policy_of",
    "read_battery",
    "read_cpu_temp",
    "read_link",
    "read_memory_mb",
]
