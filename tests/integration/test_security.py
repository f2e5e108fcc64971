"""The secure deployment for real: cloud/mosquitto-secure.conf, cloud's ACL rules, TLS, HMAC.

Users come from ``edgefl credentials``; the broker runs the shipped config with
only paths and ports filled in (``secure_fleet``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
from secure_fleet import ConfBroker, make_certs, secure_broker
from timeouts import within

from edgefl.aggregator import Aggregator
from edgefl.codecs import encode_params
from edgefl.config import AggregatorSettings, DeviceSettings, MqttSettings
from edgefl.device import DeviceAgent
from edgefl.tasks import Task, load_task
from edgefl.topics import Topics
from edgefl.transport import Message, Transport
from edgefl.wire import Update, decode_announcement, decode_metrics, encode_update, sign

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

pytestmark = pytest.mark.integration

T = Topics()
USERS = {
    "cloud": ("cloud", None),
    "gw-1": ("gateway", None),
    "gw-2": ("gateway", None),
    "dev-1": ("device", "gw-1"),
    "dev-2": ("device", "gw-1"),
    "mon": ("monitor", None),
}


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[ConfBroker]:
    broker = secure_broker(tmp_path / "broker", USERS)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def task() -> Task:
    return load_task("digits", model="mlp")


def settings_for(secure: ConfBroker, user: str, *, tls: bool = False) -> MqttSettings:
    port = secure.tls_port if tls else secure.port
    return MqttSettings(
        broker=f"127.0.0.1:{port}",
        username=user,
        password=secure.passwords[user],
        ca_file=secure.certs.ca if tls and secure.certs else None,
        reconnect_min_s=0.1,
        reconnect_max_s=1.0,
    )


class Inbox:
    """A connected Transport and the messages it received, for bounded waits."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.messages: list[Message] = []
        self._changed = asyncio.Event()

    async def collect(self) -> None:
        async for message in self.transport.messages():
            self.messages.append(message)
            self._changed.set()

    async def until(self, done: Callable[[list[Message]], bool], timeout: float) -> None:
        async with within(timeout):
            while not done(self.messages):
                self._changed.clear()
                await self._changed.wait()


@contextlib.asynccontextmanager
async def client(settings: MqttSettings, name: str, *topics: str) -> AsyncIterator[Inbox]:
    transport = Transport(settings, f"test-{name}-{secrets.token_hex(3)}")
    for topic in topics:
        await transport.subscribe(topic)
    async with transport:
        inbox = Inbox(transport)
        collector = asyncio.ensure_future(inbox.collect())
        try:
            await transport.wait_connected(10)
            yield inbox
        finally:
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector


# ------------------------------------------------------------ authentication


@pytest.mark.parametrize(
    ("username", "password"), [(None, None), ("dev-1", "wrong"), ("intruder", "guess")]
)
async def test_anonymous_and_wrong_password_connections_are_refused(
    secure: ConfBroker, username: str | None, password: str | None
) -> None:
    with pytest.raises(aiomqtt.MqttError, match=r"(?i)not authori"):
        async with (
            within(10),
            aiomqtt.Client("127.0.0.1", secure.port, username=username, password=password),
        ):
            pass


# ----------------------------------------------------------------------- ACL


FORBIDDEN = [
    ("dev-1", T.update("gw-1", "dev-2")),  # another device's update
    ("dev-1", T.status("gw-1", "dev-2")),  # another device's status
    ("dev-1", T.model("gw-1")),  # a model
    ("dev-1", T.round("gw-1")),  # a round announcement
    ("dev-1", T.delta("gw-1")),  # a delta
    ("dev-1", T.metrics("gateway", "gw-1")),  # another node's metrics
    ("gw-2", T.update("cloud", "gw-1")),  # another gateway's sync
    ("gw-2", T.model("cloud")),  # the global model
    ("gw-2", T.round("cloud")),  # the cloud's round
    ("mon", T.status("gw-1", "dev-2")),  # a monitor writes nothing
]


async def test_the_broker_drops_forbidden_publishes_and_disconnects_their_senders(
    secure: ConfBroker,
) -> None:
    s = lambda user: settings_for(secure, user)  # noqa: E731
    # No intruder logs in as an observer: the broker would hand it the observer's session.
    watched = (T.updates_of("gw-1"), T.statuses_of("gw-1"), *T.downlink("cloud"))
    async with (
        client(s("gw-1"), "gw", *watched) as gateway,
        client(s("dev-2"), "victim", *T.downlink("gw-1")) as victim,
        client(s("cloud"), "cloud", T.updates_of("cloud")) as cloud,
    ):
        for user, topic in FORBIDDEN:
            async with aiomqtt.Client(
                "127.0.0.1", secure.port, username=user, password=secure.passwords[user]
            ) as intruder:
                await intruder.publish(topic, b"forged", qos=1, retain=True)
                # Mosquitto 2.0 drops the message and the MQTT 3.1.1 connection with it.
                with pytest.raises(aiomqtt.MqttError):
                    async with within(5):
                        while True:
                            await asyncio.sleep(0.05)
                            await intruder.publish(T.update("gw-1", user), b"", qos=1)
        # The broker routes a message before it acknowledges it: anything it had
        # let through would be queued ahead of these.
        async with client(s("dev-1"), "dev-1") as device:
            await device.transport.publish(T.update("gw-1", "dev-1"), b"own update")
        await gateway.transport.publish(T.model("gw-1"), b"real model", retain=True)
        await gateway.transport.publish(T.update("cloud", "gw-1"), b"own sync")
        for inbox in (gateway, victim, cloud):
            await inbox.until(lambda m: len(m) >= 1, timeout=10)
    assert [(m.topic, m.payload) for m in gateway.messages] == [
        (T.update("gw-1", "dev-1"), b"own update")
    ]
    assert [m.payload for m in victim.messages] == [b"real model"]
    assert [(m.topic, m.payload) for m in cloud.messages] == [
        (T.update("cloud", "gw-1"), b"own sync")
    ]


# ----------------------------------------------------------------- client ids


def login(secure: ConfBroker, user: str, identifier: str, **kwargs: Any) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1", secure.port, username=user, password=secure.passwords[user],
        identifier=identifier, **kwargs,
    )  # fmt: skip


async def test_a_user_cannot_take_over_another_users_client_id_or_session(
    secure: ConfBroker,
) -> None:
    """The broker names every session after its user: another user's id is no way in."""
    gateway_id = "edgefl-gateway-gw-1"  # what the aggregator node asks for
    update = T.update("gw-1", "dev-2")
    async with login(secure, "gw-1", gateway_id, clean_session=False) as gw:
        await gw.subscribe(T.updates_of("gw-1"), qos=1)
    # gw-1 is away; its persistent session keeps what arrives meanwhile.
    async with client(settings_for(secure, "mon"), "mon", T.status("gw-1", "dev-2")) as watcher:
        offline = aiomqtt.Will(T.status("gw-1", "dev-2"), b"offline", qos=1, retain=True)
        async with login(secure, "dev-2", "dev-2", will=offline) as victim:
            await victim.publish(update, b"queued for gw-1", qos=1)
            for target in ("dev-2", gateway_id):
                async with login(secure, "dev-1", target, clean_session=True) as intruder:
                    await intruder.publish(T.status("gw-1", "dev-1"), b"intruder", qos=1)
            await victim.publish(T.status("gw-1", "dev-2"), b"still here", qos=1)
        await watcher.until(lambda m: any(x.payload == b"still here" for x in m), timeout=10)
    assert [m.payload for m in watcher.messages] == [b"still here"]  # no will fired
    async with login(secure, "gw-1", gateway_id, clean_session=False) as gw, within(10):
        message = await anext(aiter(gw.messages))
    assert (str(message.topic), message.payload) == (update, b"queued for gw-1")


# ---------------------------------------------------------------------- HMAC


def forged_update(task: Task, round_payload: bytes, *, seq: int, key: bytes | None) -> bytes:
    announcement = decode_announcement(round_payload)
    delta = {name: np.zeros(shape, np.float32) for name, shape in task.spec().items()}
    update = Update(
        sender="dev-1", seq=seq, round=announcement.round, base=announcement.version, n=100,
        tensors=encode_params(delta),
    )  # fmt: skip
    return encode_update(sign(update, key) if key is not None else update)


async def test_updates_signed_with_a_wrong_key_or_unsigned_are_rejected_and_counted(
    secure: ConfBroker, task: Task, tmp_path: Path
) -> None:
    gateway = Aggregator(
        AggregatorSettings(
            id="gw-1", role="gateway", mqtt=settings_for(secure, "gw-1"), state_dir=tmp_path,
            checkpoint=False, children=["dev-1", "dev-2"], require_signature=True,
            keys={d: secure.keys[d] for d in ("dev-1", "dev-2")},
        ),
        task,
    )  # fmt: skip
    device = DeviceAgent(
        DeviceSettings(id="dev-2", gateway="gw-1", mqtt=settings_for(secure, "dev-2"),
                       state_dir=tmp_path, compute="cpu", hmac_key=secure.keys["dev-2"]),
        task,
    )  # fmt: skip
    metrics_topic = T.metrics("gateway", "gw-1")
    async with (
        gateway,
        device,
        client(settings_for(secure, "mon"), "mon", metrics_topic) as watcher,
        client(settings_for(secure, "dev-1"), "attacker", T.round("gw-1")) as attacker,
    ):
        workers = [asyncio.ensure_future(x.run()) for x in (gateway, device)]
        try:
            await attacker.until(lambda m: len(m) >= 1, timeout=20)
            announced = attacker.messages[-1].payload
            wrong = secrets.token_bytes(32)
            for seq, key in ((0, wrong), (1, None)):
                payload = forged_update(task, announced, seq=seq, key=key)
                await attacker.transport.publish(T.update("gw-1", "dev-1"), payload)

            def counted(messages: list[Message]) -> bool:
                return any(decode_metrics(m.payload).get("rejected_bad_signature") == 2
                           for m in messages)  # fmt: skip

            await watcher.until(counted, timeout=60)
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
    records = [decode_metrics(m.payload) for m in watcher.messages]
    final: dict[str, Any] = next(r for r in records if r.get("rejected_bad_signature") == 2)
    assert final["rejected_total"] == 2  # nothing else was refused
    closed = [r for r in records if r.get("event") == "round"]
    assert closed and all(r["participants"] == 1 for r in closed)  # dev-2's signed updates
    assert device.rounds_trained >= 1


# ----------------------------------------------------------------------- TLS


async def test_a_device_delivers_over_tls_and_plain_mqtt_on_the_tls_port_fails(
    secure: ConfBroker, task: Task, tmp_path: Path
) -> None:
    gateway = Aggregator(
        AggregatorSettings(id="gw-1", role="gateway", mqtt=settings_for(secure, "gw-1"),
                           state_dir=tmp_path, checkpoint=False, rounds=1),
        task,
    )  # fmt: skip
    over_tls = settings_for(secure, "dev-1", tls=True)
    device = DeviceAgent(
        DeviceSettings(id="dev-1", gateway="gw-1", mqtt=over_tls, state_dir=tmp_path,
                       compute="cpu"),
        task,
    )  # fmt: skip
    async with gateway, device:
        device_run = asyncio.ensure_future(device.run())
        try:
            async with within(60):
                await gateway.run()  # one round, closed by the device's update
        finally:
            device_run.cancel()
            await asyncio.gather(device_run, return_exceptions=True)
    assert gateway.last_metrics["participants"] == 1
    assert gateway.last_metrics["samples"] == len(device.data)

    # The broker resets a plain MQTT connection; the client never gets a CONNACK.
    with pytest.raises(aiomqtt.MqttError):
        async with within(10), aiomqtt.Client(
            "127.0.0.1", secure.tls_port, username="dev-1",
            password=secure.passwords["dev-1"], timeout=3,
        ):  # fmt: skip
            pass
    stranger = make_certs(tmp_path / "other-ca").ca
    foreign = over_tls.model_copy(update={"ca_file": stranger})
    with pytest.raises(aiomqtt.MqttError, match=r"(?i)certificate"):
        async with within(10), aiomqtt.Client(
            "127.0.0.1", secure.tls_port, username="dev-1",
            password=secure.passwords["dev-1"], tls_context=tls_context_of(foreign),
        ):  # fmt: skip
            pass


def tls_context_of(settings: MqttSettings) -> Any:
    from edgefl.transport import tls_context

    return tls_context(settings)


# --------------------------------------------------------------- credentials


def _sections(printed: str) -> list[str]:
    """The TOML snippets between ``# --- where ---`` headers (comments alone are skipped)."""
    parts = re.split(r"^# --- .*$", printed, flags=re.MULTILINE)
    return [p for p in parts if any(ln and not ln.startswith("#") for ln in p.splitlines())]


async def test_credentials_command_adds_a_device_that_can_connect_after_a_reload(
    secure: ConfBroker,
) -> None:
    d = secure.directory
    done = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgefl.cli", "credentials", "add", "--role", "device",
        "--id", "dev-9", "--parent", "gw-1", "--passwd-file", str(d / "passwd"),
        "--acl-file", str(d / "acl"), "--keys-dir", str(d / "keys"),
        "--broker", f"127.0.0.1:{secure.port}", stdout=subprocess.PIPE,
    )  # fmt: skip
    async with within(30):
        out, _ = await done.communicate()
    assert done.returncode == 0
    own, parents = map(tomllib.loads, _sections(out.decode()))
    settings = DeviceSettings(**own)
    key_file = d / "keys" / "dev-9.key"
    assert key_file.read_text().strip() == settings.hmac_key == parents["keys"]["dev-9"]
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "passwd").stat().st_mode) == 0o640

    assert secure.running is not None and secure.running.process is not None
    os.kill(secure.running.process.pid, signal.SIGHUP)  # reload passwords and ACLs
    gateway_view = settings_for(secure, "gw-1")
    status = b'{"online": true}'
    async with client(gateway_view, "gw", T.statuses_of("gw-1")) as gateway:
        async with within(10):
            while True:  # the reload is asynchronous: retry the new user's connection
                try:
                    async with aiomqtt.Client(
                        "127.0.0.1", secure.port, username="dev-9",
                        password=settings.mqtt.password,
                    ) as dev9:  # fmt: skip
                        await dev9.publish(T.status("gw-1", "dev-9"), status, qos=1)
                        await dev9.publish(T.status("gw-1", "dev-1"), b"not mine", qos=1)
                        break
                except aiomqtt.MqttError:
                    await asyncio.sleep(0.1)
        await gateway.until(
            lambda m: any(x.topic == T.status("gw-1", "dev-9") for x in m), timeout=10
        )
    assert all(m.topic != T.status("gw-1", "dev-1") for m in gateway.messages)
