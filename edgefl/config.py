"""Typed settings of every role: TOML file < ``EDGEFL_`` environment < CLI flags.

One pydantic model per role, documented once and reused by the CLI (flags and
``--help`` are generated from the fields), the TOML files and the environment;
``sources.py`` reads and merges them. Never reads the network or starts anything.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .profiles.energy import Board
from .robust import Rule
from .sources import (
    ConfigError,
    describe_error,
    is_bool,
    iter_fields,
    load_settings,
    nest,
    parse_flag_value,
    values_only,
)
from .topics import ID_RE, Topics
from .wire import LINKS, Link, TrainConfig

#: An Ed25519 key, private or public, in hex (``edgefl.signing``).
KEY_PATTERN = r"^[0-9a-fA-F]{64}$"
#: An HMAC key in hex: at least 16 bytes.
HMAC_PATTERN = r"^(?:[0-9a-fA-F]{2}){16,512}$"
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MqttSettings(_Section):
    broker: str = Field("127.0.0.1:1883", description="broker address, HOST:PORT")
    protocol: Literal["3.1.1", "5"] = Field("3.1.1", description="MQTT protocol version")
    prefix: str = Field("edgefl", description="topic prefix")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive")
    username: str | None = Field(None, description="broker user name")
    password: str | None = Field(None, description="broker password")
    ca_file: Path | None = Field(None, description="CA certificate: connect over TLS")
    cert_file: Path | None = Field(None, description="client certificate (mutual TLS)")
    key_file: Path | None = Field(None, description="client private key (mutual TLS)")
    tls_insecure: bool = Field(False, description="skip server host name check (testing only)")
    max_message_bytes: int = Field(
        256 * 1024, ge=4096, description="payloads above this travel in chunks"
    )
    max_inflight: int = Field(16, ge=1, le=1000, description="QoS 1 publishes in flight")
    publish_timeout_s: float = Field(30.0, gt=0, description="give up waiting for a PUBACK")
    connect_timeout_s: float = Field(
        10.0, gt=0, le=300, description="give up waiting for a CONNACK, then dial again"
    )
    reconnect_min_s: float = Field(0.5, gt=0, description="first reconnect delay")
    reconnect_max_s: float = Field(30.0, gt=0, description="longest reconnect delay")

    @field_validator("broker")
    @classmethod
    def _host_port(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected HOST:PORT, got {v!r}")
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        Topics(v)
        return v

    @property
    def host(self) -> str:
        return self.broker.rpartition(":")[0]

    @property
    def port(self) -> int:
        return int(self.broker.rpartition(":")[2])


class PolicySettings(_Section):
    """Who may train: the same rules on the device and in the node's selection."""

    min_battery: float = Field(0.3, ge=0, le=1, description="unless charging")
    allowed_links: list[Link] = Field(
        default_factory=lambda: list(LINKS),
        description="link types allowed to train",
    )
    max_temp_c: float = Field(80.0, description="skip rounds above this CPU temperature")
    min_uplink_kbps: float = Field(0.0, ge=0, description="and enough to upload by the deadline")
    prefer_charging: bool = Field(
        False, description="on battery, train only at charged_battery or above"
    )
    charged_battery: float = Field(0.9, ge=0, le=1, description="the level prefer_charging needs")
    max_rounds_per_hour: int = Field(
        0, ge=0, description="duty cycle: most rounds a device trains in any hour (0: no cap)"
    )
    daily_energy_j: float = Field(
        0.0, ge=0, description="most joules a device spends on rounds in any 24 h (0: no budget)"
    )


class EnergySettings(_Section):
    """The power model of a round: the board's published figures, or your own."""

    board: Board = Field("pi4", description="pi4, pi5, jetson-orin-nano or phone")
    train_w: float | None = Field(None, ge=0, description="watts while training (board's)")
    up_j_per_mb: float | None = Field(None, ge=0, description="joules per MB sent (board's)")
    down_j_per_mb: float | None = Field(None, ge=0, description="joules per MB received (board's)")


class InferenceSettings(_Section):
    """Predictions from the newest model, for applications on the board."""

    port: int = Field(
        0, ge=0, le=65535, description="serve POST /predict on 127.0.0.1:PORT (0: off)"
    )
    int8: bool = Field(False, description="int8 dynamic quantization of Linear layers")
    max_batch: int = Field(256, ge=1, le=65536, description="most rows in one request")


class _RoleSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="EDGEFL_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    id: str = Field(description="this node's id, [A-Za-z0-9_-]{1,64}")
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    task: str = Field("digits", description="learning task: 'digits' or 'module:attribute'")
    task_options: dict[str, Any] = Field(
        default_factory=dict, description="keyword options for the task (JSON on the CLI)"
    )
    state_dir: Path = Field(Path("./edgefl-state"), description="outbox, checkpoints, residual")
    log_level: LogLevel = Field("INFO", description="least severe log lines shown")
    seed: int = Field(0, description="seed for shuffling, rounding and selection")
    metrics: bool = Field(True, description="publish JSON metrics")

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        return check_id(v)

    @field_validator("update_codec", check_fields=False)
    @classmethod
    def _codec(cls, v: str) -> str:
        """A registered codec, or one of one's own loaded (and registered) from its ref."""
        if v == "auto":
            return v
        from . import codecs  # numpy and torch: only for the roles that send updates

        return codecs.load_codec(v).name


def check_id(v: str) -> str:
    """A node id as topics need it; ``ValueError`` with the rule otherwise."""
    if not ID_RE.match(v):
        raise ValueError(f"{v!r} is not an id: use 1-64 of A-Z a-z 0-9 _ -")
    return v


class DeviceSettings(_RoleSettings):
    """A device agent (a board, or one simulated device)."""

    gateway: str = Field("gw-1", description="the gateway this device reports to")
    shard: int = Field(0, ge=0, description="which partition of the task's data is local")
    num_shards: int = Field(1, ge=1, description="how many partitions the data is split into")
    precision: Literal["fp32", "auto", "fp16", "bf16"] = Field(
        "fp32", description="fp16: CUDA autocast; bf16: CPU autocast; auto: fp16 on CUDA"
    )
    compute: Literal["cpu", "cuda", "auto"] = Field("auto", description="where to train")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads")
    heartbeat_s: float = Field(30.0, gt=0, description="status republish period")
    update_codec: str = Field(
        "auto",
        description="auto: u8, or topk when the uplink is too slow for the deadline; "
        "or a codec: u8, topk, f32, f16, 'module:attribute'",
    )
    topk_fraction: float = Field(0.1, gt=0, le=1, description="share of values topk keeps")
    stochastic_rounding: bool = Field(False, description="unbiased rounding of deltas")
    error_feedback: bool = Field(True, description="carry the quantization error forward")
    hmac_key: str | None = Field(
        None, pattern=HMAC_PATTERN, description="hex key to sign updates (HMAC-SHA256)"
    )
    outbox_max_entries: int = Field(1000, ge=1, description="oldest dropped beyond this")
    outbox_max_bytes: int = Field(
        256 * 1024 * 1024, ge=1024, description="oldest dropped beyond this many bytes"
    )
    parent_key: str | None = Field(
        None,
        pattern=KEY_PATTERN,
        description="hex Ed25519 public key of the gateway: only models it signed are taken",
    )
    max_version_jump: int = Field(
        100, ge=0, description="refuse an unsigned model more versions ahead of the one held"
    )
    max_epochs: int = Field(20, ge=1, description="most local epochs a model may ask for")
    min_batch_size: int = Field(8, ge=1, description="smallest batch size a model may ask for")
    max_train_s: float = Field(300.0, gt=0, description="a round's training is stopped after this")
    free_memory_mb: float | None = Field(
        None,
        gt=0,
        description="free memory (MiB) training plans its batches against; default: measured",
    )
    policy: PolicySettings = Field(default_factory=PolicySettings)
    energy: EnergySettings = Field(default_factory=EnergySettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)

    @field_validator("gateway")
    @classmethod
    def _gateway(cls, v: str) -> str:
        return check_id(v)


class AggregatorSettings(_RoleSettings):
    """A gateway or the cloud: the same aggregation node, another tier."""

    role: Literal["gateway", "cloud"] = Field(
        "gateway", description="set by the command: edgefl gateway or edgefl cloud"
    )
    parent: str | None = Field(None, description="parent node id ('cloud'); none for the cloud")
    children: list[str] = Field(
        default_factory=list,
        description="allowed child ids; empty: any child that published a Status",
    )
    rounds: int = Field(0, ge=0, description="stop after this many local rounds (0: run on)")
    per_round: int = Field(0, ge=0, description="children selected per round (0: open round)")
    min_updates: int = Field(1, ge=1, description="close the round at this many updates")
    quorum: float = Field(
        1.0, gt=0, le=1, description="or at this fraction of the selected/known children"
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    sync_every: int = Field(1, ge=1, description="sync with the parent every K local rounds")
    min_round_interval_s: float = Field(
        0.0, ge=0, description="a round opens no earlier than this after the previous one opened"
    )
    max_staleness: int = Field(4, ge=0, description="reject updates older than this")
    staleness: Literal["constant", "polynomial", "hinge"] = Field(
        "polynomial", description="weight of a stale update: 1, (1+s)^-a, or 1 up to b then that"
    )
    staleness_a: float = Field(0.5, ge=0, description="staleness exponent a")
    staleness_b: int = Field(4, ge=0, description="hinge: versions behind weighted fully")
    rule: Rule = Field(
        "fedavg",
        description="fedavg (norm-bounded, streaming), median, trimmed_mean or krum "
        "(multi-Krum); the last three hold one update per child until the close",
    )
    trim: float = Field(0.1, ge=0, lt=0.5, description="fraction trimmed at each end")
    byzantine: int = Field(1, ge=0, description="krum: children assumed hostile per round")
    max_weight_share: float = Field(
        0.25,
        gt=0,
        le=1,
        description="no child holds more than this share of a round's total weight "
        "(1: off); with fewer than 1/share children, weights are equal",
    )
    max_samples: int = Field(
        100_000, ge=1, description="cap on any child's sample count (its weight)"
    )
    max_sample_ratio: float = Field(
        1.5,
        ge=0,
        description="cap on any child's sample count: this multiple of the median count "
        "the children declared (0: off)",
    )
    clip_factor: float = Field(
        2.0,
        ge=0,
        description="clip each delta to this multiple of the median norm of recently "
        "accepted updates (0: off)",
    )
    max_update_norm: float | None = Field(
        None, gt=0, description="reject deltas with a larger L2 norm (absolute; none: off)"
    )
    max_children: int = Field(
        10_000, ge=1, description="children remembered; long-offline ones are evicted first"
    )
    max_misses: int = Field(
        3,
        ge=1,
        description="rounds a child may be waited for in vain before it is no longer "
        "waited for (until it delivers again)",
    )
    max_update_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="reject larger update payloads"
    )
    evaluate: bool | None = Field(None, description="held-out evaluation (default: cloud only)")
    keys: dict[str, str] = Field(
        default_factory=dict, description="child id -> hex HMAC key; '*' for all"
    )
    require_signature: bool = Field(False, description="reject unsigned updates")
    hmac_key: str | None = Field(
        None, pattern=HMAC_PATTERN, description="hex key to sign this node's sync updates"
    )
    model_key: str | None = Field(
        None,
        pattern=KEY_PATTERN,
        description="hex Ed25519 private key that signs the models this node publishes "
        "(a secret: EDGEFL_MODEL_KEY)",
    )
    parent_key: str | None = Field(
        None,
        pattern=KEY_PATTERN,
        description="hex Ed25519 public key of the parent: only models it signed are adopted",
    )
    max_version_jump: int = Field(
        100, ge=0, description="refuse an unsigned parent model more versions ahead than this"
    )
    downlink_dtype: Literal["f32", "f16"] = Field(
        "f32", description="precision the published model is held in (f16: half the whole model)"
    )
    whole_model: Literal["exact", "u8"] = Field(
        "exact",
        description="the whole model for children that lack the version before: exact (as "
        "held) or u8 (a quarter of f32; such a child holds it within half a step per value)",
    )
    downlink_codec: str = Field(
        "u8", max_length=16, description="codec of each new version's delta to the children"
    )
    downlink_fraction: float = Field(
        0.1, gt=0, le=1, description="share of values a sparse downlink delta keeps (topk)"
    )
    update_codec: str = Field("u8", description="the sync update's codec (u8, topk, ...)")
    topk_fraction: float = Field(0.1, gt=0, le=1, description="share of values topk keeps")
    checkpoint: bool = Field(True, description="checkpoint to state_dir after each round")
    heartbeat_s: float = Field(30.0, gt=0, description="status republish period")
    policy: PolicySettings = Field(default_factory=PolicySettings)
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads (the fold, evaluation)")

    @field_validator("parent")
    @classmethod
    def _parent(cls, v: str | None) -> str | None:
        return None if v is None else check_id(v)

    @field_validator("children")
    @classmethod
    def _children(cls, v: list[str]) -> list[str]:
        for child in v:
            check_id(child)
        return v

    @field_validator("keys")
    @classmethod
    def _keys(cls, v: dict[str, str]) -> dict[str, str]:
        for child, key in v.items():
            if child != "*":
                check_id(child)
            if not re.match(HMAC_PATTERN, key):
                raise ValueError(f"{child}: expected an even number of hex digits, 32 or more")
        return v


__all__ = [
    "AggregatorSettings",
    "ConfigError",
    "DeviceSettings",
    "EnergySettings",
    "InferenceSettings",
    "MqttSettings",
    "PolicySettings",
    "check_id",
    "describe_error",
    "is_bool",
    "iter_fields",
    "load_settings",
    "nest",
    "parse_flag_value",
    "values_only",
]
