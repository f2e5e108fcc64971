"""Start an MQTT broker for local runs and tests: Mosquitto, or the embedded one.

Mosquitto runs with the repository's ``mosquitto.conf`` plus a loopback
listener on a free port; where it is absent, amqtt runs in a subprocess
instead. This module never talks MQTT itself.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .cli import port
from .errors import EdgeflError
from .supervise import bounded, wait_event

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


class BrokerError(EdgeflError, RuntimeError):
    """A broker could not be started or did not come up."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    """Whether nothing listens on ``host:port`` (a bind there would succeed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


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

    def log_tail(self, chars: int = 300) -> str:
        """The end of the broker's log, on one line: why it exited."""
        logs = list(self.workdir.glob("*.log")) if self.workdir is not None else []
        text = logs[0].read_text(errors="replace")[-chars:] if logs else ""
        return " / ".join(line.strip() for line in text.splitlines() if line.strip()) or "no log"

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
    return _launch([binary, "-c", str(conf)], host, port, "mosquitto", workdir, timeout_s)


def _launch(
    cmd: list[str], host: str, port: int, kind: str, workdir: Path, timeout_s: float
) -> RunningBroker:
    """Start a broker process logging to ``workdir`` and wait until it accepts connections."""
    logpath = workdir / f"{kind}.log"
    with logpath.open("wb") as logfile:
        proc = subprocess.Popen(
            cmd,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the terminal reaches us, we stop it
        )
    broker = RunningBroker(host, port, kind, proc, workdir)
    try:
        _wait_alive(proc, host, port, timeout_s, logpath, name=kind)
    except BaseException:
        broker.stop()
        raise
    log.debug("%s pid %d on %s:%d", kind, proc.pid, host, port)
    return broker


def _wait_alive(
    proc: subprocess.Popen[bytes],
    host: str,
    port: int,
    timeout_s: float,
    logpath: Path,
    *,
    name: str = "mosquitto",
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = logpath.read_text(errors="replace")[-500:] if logpath.exists() else ""
            raise BrokerError(f"{name} exited with code {proc.returncode}: {tail.strip()}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise BrokerError(f"{name} did not accept connections on {host}:{port} in {timeout_s}s")


def env_without_mosquitto() -> dict[str, str]:
    """An environment whose PATH hides ``mosquitto`` (to exercise the embedded broker).

    Every PATH entry holding one is dropped: ``/sbin`` is often a link to ``/usr/sbin``.
    """
    env = dict(os.environ)
    entries = env.get("PATH", "").split(os.pathsep)
    env["PATH"] = os.pathsep.join(
        p for p in entries if not shutil.which("mosquitto", path=p or os.curdir)
    )
    return env


# ------------------------------------------------------------ embedded broker

EMBEDDED_NOTE = "the embedded amqtt broker (MQTT 3.1.1 only)"


def embedded_config(host: str, port: int) -> dict[str, object]:
    """amqtt settings: one TCP listener, anonymous clients, no $SYS or packet logging."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 0}},
        "timeout_disconnect_delay": 0,
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


def serve_embedded(host: str, port: int, parent_pid: int | None = None) -> None:
    """Run amqtt on ``host:port`` until SIGTERM/SIGINT, or until ``parent_pid`` is gone.

    The entry point of the broker subprocess that ``start_embedded`` launches.
    """
    import asyncio

    logging.basicConfig(level=logging.WARNING, format="amqtt: %(levelname)s %(message)s")
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    async def serve() -> None:
        from amqtt.broker import Broker

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        broker = Broker(embedded_config(host, port))
        await broker.start()
        try:
            while not stop.is_set():
                if parent_pid is not None and os.getppid() != parent_pid:
                    break  # our parent died without stopping us: do not outlive it
                await wait_event(stop, 1.0)
        finally:
            with contextlib.suppress(Exception):
                await bounded(broker.shutdown(), 5.0)

    asyncio.run(serve())


def start_embedded(
    host: str = "127.0.0.1", port: int | None = None, *, timeout_s: float = 20.0
) -> RunningBroker:
    """Start the pure-Python amqtt broker in a subprocess on ``host:port`` (a free port if None).

    A subprocess rather than a thread: the broker gets its own interpreter and
    core, and a simulation's event loop never waits on it. It stops when this
    process does, even if this process is killed.
    """
    try:
        import amqtt  # noqa: F401
    except ImportError:
        raise BrokerError(
            "neither mosquitto nor amqtt is installed; "
            f"{INSTALL_HINT}, or: pip install '.[sim]' in the edgefl checkout"
        ) from None
    port = port or free_port(host)
    workdir = Path(tempfile.mkdtemp(prefix="edgefl-amqtt-"))
    code = (
        "import edgefl.broker as b; "
        f"b.serve_embedded({host!r}, {int(port)}, parent_pid={os.getpid()})"
    )
    return _launch([sys.executable, "-c", code], host, port, "amqtt", workdir, timeout_s)


def start_broker(
    prefer: str = "mosquitto", *, host: str = "127.0.0.1", port: int | None = None
) -> RunningBroker:
    """Mosquitto where its binary exists (and is preferred), else the embedded broker.

    Falling back is said in one warning line: amqtt is slower and speaks 3.1.1 only.
    """
    if prefer not in ("mosquitto", "embedded"):
        raise ValueError(f"prefer must be 'mosquitto' or 'embedded', got {prefer!r}")
    if prefer == "mosquitto" and mosquitto_path() is not None:
        return start_mosquitto(host=host, port=port)
    broker = start_embedded(host, port)
    if prefer == "mosquitto":
        log.warning("mosquitto not found; using %s on %s", EMBEDDED_NOTE, broker.url)
    return broker


# -------------------------------------------------------------- edgefl broker


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=port, default=1883, help="port to listen on (0: a free one)")
    parser.add_argument(
        "--embedded",
        action="store_true",
        help="run the embedded amqtt broker even where mosquitto is installed",
    )
    parser.add_argument(
        "--mosquitto-config",
        metavar="FILE",
        help="mosquitto config to use instead of the repository's mosquitto.conf",
    )


def main(args: argparse.Namespace) -> int:
    """Run a broker in the foreground until Ctrl-C or SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    port = args.port
    if port and not port_free(args.host, port):
        print(
            f"edgefl broker: error: {args.host}:{port} is already in use (another broker?)",
            file=sys.stderr,
        )
        return 2
    conf = Path(args.mosquitto_config) if args.mosquitto_config else None
    if conf is not None and not conf.is_file():
        print(f"edgefl broker: error: {conf} does not exist", file=sys.stderr)
        return 2
    stopped = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        stopped.set()

    # Handlers first: a Ctrl-C while the broker starts must still stop it.
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            running = _start_for_command(args.host, port or None, conf, args.embedded)
        except BrokerError as exc:
            print(f"edgefl broker: error: {exc}", file=sys.stderr)
            return 1
        try:
            print(f"{running.kind} listening on {running.url} (Ctrl-C stops it)", flush=True)
            while not stopped.is_set() and running.process is not None:
                if running.process.poll() is not None:
                    print(
                        f"edgefl broker: error: {running.kind} exited with code "
                        f"{running.process.returncode}: {running.log_tail()}",
                        file=sys.stderr,
                    )
                    return 1
                stopped.wait(0.5)
        finally:
            running.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _start_for_command(
    host: str, port: int | None, conf: Path | None, embedded: bool
) -> RunningBroker:
    if conf is not None and not embedded:
        return start_mosquitto(host=host, port=port, config=conf.read_text())
    return start_broker("embedded" if embedded else "mosquitto", host=host, port=port)
