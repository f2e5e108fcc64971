"""Start an MQTT broker for local runs and tests: Mosquitto, or the embedded one.

Mosquitto runs with the repository's ``mosquitto.conf`` plus a loopback
listener on a free port. This module never talks MQTT itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

INSTALL_HINT = "install it with: sudo apt-get install -y mosquitto mosquitto-clients"
REPO_CONF = Path(__file__).resolve().parent.parent / "mosquitto.conf"
# Used where the package is installed without the repository's mosquitto.conf.
FALLBACK_CONF = """\
allow_anonymous true
persistence false
max_queued_messages 0
max_queued_bytes 1073741824
max_inflight_messages 100
log_type error
log_type warning
connection_messages false
"""


class BrokerError(RuntimeError):
    """A broker could not be started or did not come up."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float = 10.0) -> None:
    """Block until ``host:port`` accepts TCP connections, or raise ``BrokerError``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise BrokerError(f"nothing accepts connections on {host}:{port} after {timeout_s:.0f}s")


def mosquitto_path() -> str | None:
    return shutil.which("mosquitto")


def base_config() -> str:
    return REPO_CONF.read_text() if REPO_CONF.exists() else FALLBACK_CONF


@dataclass
class RunningBroker:
    """A broker this process started; ``stop()`` ends it (idempotent)."""

    host: str
    port: int
    kind: str
    process: subprocess.Popen[bytes] | None = None
    workdir: Path | None = None
    _stopper: object = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, timeout_s: float = 10.0) -> None:
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)
        if callable(self._stopper):
            self._stopper()
            self._stopper = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> RunningBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_mosquitto(
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    config: str | None = None,
    extra: Iterable[str] = (),
    listener: bool = True,
    timeout_s: float = 10.0,
) -> RunningBroker:
    """Start ``mosquitto`` on ``host:port`` (a free port if None) and wait until it accepts.

    ``config`` replaces the repository's ``mosquitto.conf``; ``extra`` lines are
    appended (``max_packet_size 131072``, bridge sections, ...).
    """
    binary = mosquitto_path()
    if binary is None:
        raise BrokerError(f"mosquitto is not installed; {INSTALL_HINT}")
    port = port or free_port(host)
    workdir = Path(tempfile.mkdtemp(prefix="edgefl-mosquitto-"))
    lines = [config if config is not None else base_config()]
    if listener:
        lines.append(f"listener {port} {host}")
    lines.extend(extra)
    conf = workdir / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    logfile = (workdir / "mosquitto.log").open("wb")
    proc = subprocess.Popen(
        [binary, "-c", str(conf)],
        stdout=logfile,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a Ctrl-C in the terminal reaches us, we stop it
    )
    logfile.close()
    broker = RunningBroker(host, port, "mosquitto", proc, workdir)
    try:
        _wait_alive(proc, host, port, timeout_s, workdir / "mosquitto.log")
    except BaseException:
        broker.stop()
        raise
    log.debug("mosquitto pid %d on %s:%d", proc.pid, host, port)
    return broker


def _wait_alive(
    proc: subprocess.Popen[bytes], host: str, port: int, timeout_s: float, logpath: Path
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = logpath.read_text(errors="replace")[-500:] if logpath.exists() else ""
            raise BrokerError(f"mosquitto exited with code {proc.returncode}: {tail.strip()}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise BrokerError(f"mosquitto did not accept connections on {host}:{port} in {timeout_s}s")


@contextlib.contextmanager
def mosquitto(**kwargs: object) -> Iterator[RunningBroker]:
    broker = start_mosquitto(**kwargs)  # type: ignore[arg-type]
    try:
        yield broker
    finally:
        broker.stop()


def env_without_mosquitto() -> dict[str, str]:
    """An environment whose PATH hides ``mosquitto`` (to exercise the embedded broker)."""
    env = dict(os.environ)
    found = mosquitto_path()
    if found:
        hidden = str(Path(found).parent)
        env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != hidden)
    return env
