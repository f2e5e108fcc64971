"""Battery, bandwidth, connectivity and energy of a node: OS readers, simulated models,
eligibility, the power model.

Readers only read and the policy only decides: nothing here trains, publishes or
sleeps. Simulated profiles are deterministic and run on an injected clock.
"""

from __future__ import annotations

from .energy import BOARDS, Board, Energy, PowerModel, Usage, power_model
from .policy import (
    BATTERY_LOW,
    DUTY_CYCLE,
    ENERGY_BUDGET,
    LINK_NOT_ALLOWED,
    LOW_MEMORY,
    NOT_CHARGING,
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
    "BOARDS",
    "DUTY_CYCLE",
    "ENERGY_BUDGET",
    "LINKS",
    "LINK_NOT_ALLOWED",
    "LOW_MEMORY",
    "NOT_CHARGING",
    "OK",
    "REASONS",
    "TOO_HOT",
    "UPLINK_TOO_SLOW",
    "Board",
    "Connectivity",
    "Decision",
    "Dist",
    "EligibilityPolicy",
    "Energy",
    "HasProfile",
    "Link",
    "MarkovConnectivity",
    "OsReader",
    "PowerModel",
    "ProfileSpec",
    "Reading",
    "SimBattery",
    "SimLink",
    "SimProfile",
    "SimReader",
    "TraceConnectivity",
    "UplinkEstimator",
    "Usage",
    "cuda_available",
    "default_route_interface",
    "draw_profile",
    "link_of",
    "policy_of",
    "power_model",
    "read_battery",
    "read_cpu_temp",
    "read_link",
    "read_memory_mb",
]
