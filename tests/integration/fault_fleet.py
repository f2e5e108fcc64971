"""A real fleet (cloud, gateways, devices as ``edgefl`` processes) under a seeded fault
schedule, and the accounting of every update by (sender, inc, seq) from the logs and the
outboxes. Shared by test_fault_schedule.py and bench/bench_faults.py; it only reads state.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from edgefl.broker import RunningBroker, base_config, free_port, start_mosquitto
from edgefl.wire import decode_update

#: Written by us into a member's log before each start: it splits the log by process.
MARK = "#### fault-fleet start"
#: A SIGTERM'd process that has not exited after this long is killed (and reported).
STOP_GRACE_S = 15.0
POLL_S = 0.2
#: How long a run waits: for the first cloud round; for one after the last fault (in
#: cloud deadlines, twice the target); for the settling rounds after it (in deadlines).
STARTUP_S = 90.0
RECOVERY_WAIT = 4
SETTLE_WAIT = 3
#: What one fault may take beyond its start: a SIGTERM ignored, then killed, plus the
#: longest outage; a broker stopped and started (10 s each at most) plus its outage.
FAULT_OVERRUN_S = 2 * STOP_GRACE_S + 6.0


def bound_s(seconds: float, shape: Shape) -> float:
    """The longest ``run_fleet(.., seconds, ..)`` can take: startup, faults, recovery,
    settling, and the stop (every role's SIGTERM grace, one role after another)."""
    waits = (RECOVERY_WAIT + SETTLE_WAIT) * shape.cloud_deadline_s
    return STARTUP_S + seconds + FAULT_OVERRUN_S + waits + 3 * STOP_GRACE_S


_STORED = re.compile(
    r"device (\S+): round (\d+) \(v(\d+)\) trained on \d+ samples.*update seq (\d+)"
)
_FOLDED = re.compile(r"(\S+) round (\d+) folded(.*)$")
_REFUSED = re.compile(r"(\S+): refused (\S+):(\d+):(\d+) \((\w+)\)")
_CHECKPOINT = re.compile(r"checkpoint state-\S+ saved")
_RESUMED = re.compile(r"resumed from checkpoint at version \d+, round (\d+)")
_CLOSED = re.compile(r"(\S+) round (\d+) closed .*?(?:synced as seq (\d+))?$")
_TOO_STALE = re.compile(r"(\S+): sync (\d+) \(base \d+\) is too stale")


# ------------------------------------------------------------------ the fleet
@dataclass(frozen=True)
class Shape:
    """How big the fleet is and how fast its rounds are."""

    gateways: int = 2
    devices_per_gateway: int = 4
    gateway_deadline_s: float = 5.0
    cloud_deadline_s: float = 10.0

    @property
    def devices(self) -> int:
        return self.gateways * self.devices_per_gateway


class LinkProxy:
    """A TCP proxy in front of the broker; ``cut(outage_s)`` drops every connection through
    it and refuses new ones for ``outage_s`` (a link down), then forwards again. Each
    connection's story (upstream connect time, bytes each way, end) goes to ``log``."""

    def __init__(self, name: str, upstream_port: int, log: Path) -> None:
        self.name, self.upstream_port, self.log = name, upstream_port, log
        self.port = free_port()
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._count = 0

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def cut(self, outage_s: float) -> None:
        self.cuts += 1
        self._note(f"cut for {outage_s:.1f} s")
        await self.close()
        await asyncio.sleep(outage_s)
        await self.start()
        self._note("open again")

    async def stop_listening(self) -> None:
        """Refuse new connections; those open stay until either end closes them."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def close(self) -> None:
        await self.stop_listening()
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()
        # The connections' handlers end once their ends are aborted: wait for them.
        await asyncio.gather(*self._handlers, return_exceptions=True)

    def _note(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S") + f".{int(time.time() * 1000) % 1000:03d}"
        with self.log.open("a") as f:
            f.write(f"{stamp} {text}\n")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        self._count += 1
        n, started = self._count, time.monotonic()
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError as exc:  # the broker is down: so is this connection
            self._note(f"#{n} upstream refused after {time.monotonic() - started:.3f} s: {exc}")
            writer.transport.abort()
            return
        self._note(f"#{n} upstream connected in {time.monotonic() - started:.3f} s")
        pair = {writer, up_writer}
        self._writers |= pair
        try:
            sent, got = await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            self._note(
                f"#{n} closed after {time.monotonic() - started:.1f} s: {sent} B up, {got} B down"
            )
        finally:
            for w in pair:
                w.transport.abort()
            self._writers -= pair


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> int:
    moved = 0
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while chunk := await src.read(65536):
            dst.write(chunk)
            moved += len(chunk)
            await dst.drain()
    dst.transport.abort()  # either side gone: the other goes too, as with a cut cable
    return moved


class Broker:
    """Mosquitto on one fixed port, stopped and started again with or without persistence."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.store = workdir / "mosquitto-db"
        self.running: RunningBroker | None = None
        self.persistent = False

    def start(self, persistent: bool) -> None:
        # Without persistence nothing survives: an old database is not loaded later either.
        if not persistent:
            shutil.rmtree(self.store, ignore_errors=True)
        self.store.mkdir(parents=True, exist_ok=True)
        config, extra = base_config(), []
        if persistent:
            config = config.replace("persistence false", "persistence true")
            extra = [f"persistence_location {self.store}/", "autosave_interval 0"]
        self.running = start_mosquitto(port=self.port, config=config, extra=extra)
        self.persistent = persistent

    def stop(self) -> None:
        if self.running is not None:
            self.running.stop()  # SIGTERM: a persistent broker saves its database
            self.running = None


@dataclass
class Member:
    """One fleet process: its command line, its log (all its lives) and its state dir."""

    name: str
    role: str  # cloud | gateway | device
    argv: list[str]
    log: Path
    state: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    down: bool = False  # stopped by a fault, not crashed

    def start(self) -> None:
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"{MARK} {self.starts} at {time.strftime('%H:%M:%S')}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
        self.down = False

    def stop(self, sig: int = signal.SIGTERM, grace_s: float = STOP_GRACE_S) -> str:
        """Signal the process and wait for it; '' or a note if it had to be killed."""
        self.down = True
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return ""
        proc.send_signal(sig)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace_s)
            return f"{self.name} ignored SIGTERM for {grace_s:.0f} s: killed"
        return ""

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines() if self.log.exists() else []


def _cli(role: str, name: str, url: str, state: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "edgefl.cli", role, "--id", name, "--broker", url,
            "--state-dir", str(state), "--task", "digits", *flags]  # fmt: skip


@dataclass
class Fault:
    """One fault of the schedule, with when it started and when the fleet was whole again."""

    kind: str  # kill | term | broker | cut
    target: str
    down_s: float
    persistent: bool = False
    started: float = 0.0
    ended: float = 0.0
    clock: str = ""
    note: str = ""

    def __str__(self) -> str:
        what = {
            "kill": f"SIGKILL {self.target}, restarted after {self.down_s:.1f} s",
            "term": f"SIGTERM {self.target}, restarted after {self.down_s:.1f} s",
            "broker": f"broker restart ({'persistent' if self.persistent else 'no persistence'}),"
            f" down {self.down_s:.1f} s",
            "cut": f"link cut ({self.target}) for {self.down_s:.1f} s",
        }[self.kind]
        return f"{self.clock} {what}{'; ' + self.note if self.note else ''}"


class Fleet:
    """1 cloud, ``shape.gateways`` gateways, ``shape.devices`` devices on one Mosquitto.

    Devices reach the broker through the ``devices`` link, the last gateway through its
    own; both can be cut. A background watcher notes every cloud round close and
    restarts (and reports) any member that exits without a fault having stopped it.
    """

    def __init__(self, workdir: Path, shape: Shape = Shape()) -> None:
        self.dir, self.shape = workdir, shape
        self.broker = Broker(workdir)
        self.links: dict[str, LinkProxy] = {}
        self.members: dict[str, Member] = {}
        self.closes: list[tuple[float, int]] = []  # (monotonic, cloud round)
        self.crashes: list[str] = []
        self._watcher: asyncio.Task[None] | None = None

    @property
    def gateway_ids(self) -> list[str]:
        return [f"gw-{g + 1}" for g in range(self.shape.gateways)]

    @property
    def device_ids(self) -> list[str]:
        return [f"dev-{i}" for i in range(self.shape.devices)]

    async def __aenter__(self) -> Fleet:
        await asyncio.to_thread(self.broker.start, True)
        last_gw = self.gateway_ids[-1]
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        for name in ("devices", last_gw):
            log = self.dir / "logs" / f"link-{name}.log"
            self.links[name] = LinkProxy(name, self.broker.port, log)
            await self.links[name].start()
        self._add_members()
        try:
            for member in self.members.values():
                member.start()
            self._watcher = asyncio.create_task(self._watch())
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self.stop_all()
        for link in self.links.values():
            await link.close()
        await asyncio.to_thread(self.broker.stop)

    async def stop_all(self) -> None:
        """SIGTERM every member, devices first; all of them at once within a role."""
        for role in ("device", "gateway", "cloud"):
            group = [m for m in self.members.values() if m.role == role]
            notes = await asyncio.gather(*(asyncio.to_thread(m.stop) for m in group))
            self.crashes += [n for n in notes if n]

    def _add_members(self) -> None:
        s, direct = self.shape, f"127.0.0.1:{self.broker.port}"
        node_flags = ["--log-level", "DEBUG"]
        self._member("cloud", "cloud", direct, *node_flags,
                     "--train-deadline-s", f"{s.cloud_deadline_s:g}")  # fmt: skip
        for name in self.gateway_ids:
            url = self.links[name].url if name in self.links else direct
            self._member("gateway", name, url, *node_flags, "--parent", "cloud",
                         "--sync-every", "1", "--train-deadline-s", f"{s.gateway_deadline_s:g}",
                         "--train-epochs", "1")  # fmt: skip
        for i, name in enumerate(self.device_ids):
            gateway = self.gateway_ids[i // s.devices_per_gateway]
            shard = ["--shard", str(i), "--num-shards", str(s.devices), "--seed", str(i)]
            self._member("device", name, self.links["devices"].url, "--gateway", gateway, *shard)

    def _member(self, role: str, name: str, url: str, *flags: str) -> None:
        state = self.dir / "state" / name
        state.mkdir(parents=True, exist_ok=True)
        log = self.dir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.members[name] = Member(name, role, _cli(role, name, url, state, *flags), log, state)

    async def _watch(self) -> None:
        cloud, offset, tail = self.members["cloud"], 0, b""
        while True:
            with contextlib.suppress(FileNotFoundError), cloud.log.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
                offset += len(chunk)
                *done, tail = (tail + chunk).split(b"\n")
                now = time.monotonic()
                for raw in done:
                    m = _CLOSED.search(raw.decode(errors="replace"))
                    if m and m.group(1) == "cloud":
                        self.closes.append((now, int(m.group(2))))
            for member in self.members.values():
                if member.proc is not None and not member.down and member.proc.poll() is not None:
                    tail_lines = "\n    ".join(member.lines()[-8:])
                    self.crashes.append(
                        f"{member.name} exited by itself with code {member.proc.returncode}:"
                        f"\n    {tail_lines}"
                    )
                    member.start()
            await asyncio.sleep(POLL_S)

    # ------------------------------------------------------------- waiting
    async def cloud_round_after(self, since: float, timeout_s: float) -> float | None:
        """Seconds from ``since`` to the first cloud round closed after it (None: none came)."""
        end = since + timeout_s
        while time.monotonic() < end:
            for at, _ in self.closes:
                if at > since:
                    return at - since
            await asyncio.sleep(POLL_S)
        return None

    async def cloud_rounds(self, count: int, timeout_s: float) -> bool:
        """Wait until ``count`` more cloud rounds have closed."""
        target, end = len(self.closes) + count, time.monotonic() + timeout_s
        while len(self.closes) < target and time.monotonic() < end:
            await asyncio.sleep(POLL_S)
        return len(self.closes) >= target

    # ------------------------------------------------------------- faults
    def draw(self, rng: random.Random) -> Fault:
        """One fault: a node or device killed or stopped, the broker restarted, a link cut."""
        kind = rng.choices(["node", "device", "broker", "cut"], weights=[3, 3, 2, 2])[0]
        if kind in ("node", "device"):
            names = ["cloud", *self.gateway_ids] if kind == "node" else self.device_ids
            return Fault(rng.choice(["kill", "term"]), rng.choice(names), rng.uniform(0.5, 3.0))
        if kind == "broker":
            return Fault("broker", "broker", rng.uniform(0.5, 3.0), persistent=rng.random() < 0.5)
        return Fault("cut", rng.choice(sorted(self.links)), rng.uniform(2.0, 6.0))

    async def apply(self, fault: Fault) -> None:
        fault.started, fault.clock = time.monotonic(), time.strftime("%H:%M:%S")
        if fault.kind in ("kill", "term"):
            member = self.members[fault.target]
            sig = signal.SIGKILL if fault.kind == "kill" else signal.SIGTERM
            fault.note = await asyncio.to_thread(member.stop, sig)
            await asyncio.sleep(fault.down_s)
            member.start()
        elif fault.kind == "broker":
            # The links listen only while the broker does: a device then finds nobody
            # there, as on a direct connection. (A proxy that accepts and then resets is a
            # load balancer; the transport waits out its 30 s connect timeout on that.)
            for link in self.links.values():
                await link.stop_listening()
            await asyncio.to_thread(self.broker.stop)
            await asyncio.sleep(fault.down_s)
            await asyncio.to_thread(self.broker.start, fault.persistent)
            for link in self.links.values():
                await link.start()
        else:
            await self.links[fault.target].cut(fault.down_s)
        fault.ended = time.monotonic()
        with (self.dir / "logs" / "faults.log").open("a") as f:
            f.write(f"{fault} (whole again at {time.strftime('%H:%M:%S')})\n")

    async def run_schedule(self, seconds: float, rng: random.Random) -> list[Fault]:
        """Faults one after another, 1 to 6 s apart, none starting past ``seconds``."""
        faults: list[Fault] = []
        end = time.monotonic() + seconds
        while True:
            await asyncio.sleep(rng.uniform(1.0, 6.0))
            if time.monotonic() >= end:
                return faults
            fault = self.draw(rng)
            await self.apply(fault)
            faults.append(fault)


# ------------------------------------------------------------------ accounting
Key = tuple[str, int, int]  # (sender, inc, seq)


@dataclass
class Fold:
    node: str
    round: int
    key: Key
    persisted: bool
    line: str


@dataclass
class NodeLog:
    """What a node's log says it did with updates, over all its lives."""

    folds: list[Fold] = field(default_factory=list)
    refused: dict[Key, tuple[str, str]] = field(default_factory=dict)  # key -> (reason, line)
    syncs: set[int] = field(default_factory=set)  # seqs of the syncs it sent
    stale_syncs: set[int] = field(default_factory=set)  # syncs it gave up as too stale


def lives(lines: Iterable[str]) -> list[list[str]]:
    """A member's log cut into the lines of each process that wrote it."""
    out: list[list[str]] = []
    for line in lines:
        if line.startswith(MARK) or not out:
            out.append([])
        if not line.startswith(MARK):
            out[-1].append(line)
    return out


def parse_node(lines: Iterable[str]) -> NodeLog:
    """A fold counts as persisted when its round's checkpoint landed: a checkpoint line
    follows it in the same life, or the next life resumed past that round."""
    out = NodeLog()
    parts = lives(lines)
    resumed = [_resumed_round(life) for life in parts]
    for k, life in enumerate(parts):
        later_checkpoint = [False] * (len(life) + 1)
        for i in range(len(life) - 1, -1, -1):
            later_checkpoint[i] = later_checkpoint[i + 1] or bool(_CHECKPOINT.search(life[i]))
        next_resumed = resumed[k + 1] if k + 1 < len(parts) else None
        for i, line in enumerate(life):
            if m := _FOLDED.search(line):
                rnd = int(m.group(2))
                saved = later_checkpoint[i + 1] or (
                    next_resumed is not None and next_resumed >= rnd + 2
                )
                for token in m.group(3).split():
                    sender, inc, seq = token.rsplit(":", 2)
                    out.folds.append(
                        Fold(m.group(1), rnd, (sender, int(inc), int(seq)), saved, line)
                    )
            elif m := _REFUSED.search(line):
                key = (m.group(2), int(m.group(3)), int(m.group(4)))
                out.refused.setdefault(key, (m.group(5), line))
            elif (m := _CLOSED.search(line)) and m.group(3) is not None:
                out.syncs.add(int(m.group(3)))
            elif m := _TOO_STALE.search(line):
                out.stale_syncs.add(int(m.group(2)))
    return out


def _resumed_round(life: list[str]) -> int | None:
    for line in life:
        if m := _RESUMED.search(line):
            return int(m.group(1))
    return None


def parse_device(lines: Iterable[str]) -> dict[int, str]:
    """seq -> the INFO line of the device that stored it."""
    return {int(m.group(4)): line for line in lines if (m := _STORED.search(line))}


@dataclass
class Outbox:
    """What a device's (or a gateway uplink's) outbox file holds, read read-only."""

    incarnation: int
    issued: dict[str, int]  # sender -> next seq
    pending: set[tuple[str, int]]  # (sender, seq) of entries not settled
    counters: dict[str, int]


def read_outbox(path: Path) -> Outbox | None:
    """Read a copy of the file and its WAL, so that the original is never opened for writing."""
    if not path.exists():
        return None
    with tempfile.TemporaryDirectory(prefix="fault-fleet-") as tmp:
        for suffix in ("", "-wal"):
            src = Path(str(path) + suffix)
            if src.exists():
                shutil.copy(src, Path(tmp) / (path.name + suffix))
        db = sqlite3.connect(Path(tmp) / path.name)
        try:
            inc = db.execute("SELECT value FROM meta WHERE key = 'incarnation'").fetchone()
            issued = dict(db.execute("SELECT sender, next FROM seqs").fetchall())
            rows = db.execute("SELECT sender, seq, payload FROM entries").fetchall()
            counters = dict(db.execute("SELECT name, value FROM counters").fetchall())
        finally:
            db.close()
    pending = set()
    for sender, seq, payload in rows:
        if seq is None:  # a gateway's sync entry: its seq is in the payload
            update = decode_update(payload)
            sender, seq = update.sender, update.seq
        pending.add((sender, int(seq)))
    return Outbox(int(inc[0]) if inc else 0, issued, pending, counters)


@dataclass
class Tally:
    """Every update stored, by (sender, seq): folded once, more, refused, pending or lost."""

    what: str
    stored: int = 0
    folded_once: int = 0
    double: list[str] = field(default_factory=list)
    refused: Counter[str] = field(default_factory=Counter)
    refused_lines: list[str] = field(default_factory=list)
    pending: int = 0
    lost: list[str] = field(default_factory=list)
    rolled_back: int = 0  # folds whose round a crash undid (folded again after, or lost)
    unlogged: int = 0  # stored (seq issued) without its log line: the process died first
    foreign: list[str] = field(default_factory=list)  # folds of an inc the sender never had
    dropped: int = 0  # taken out of an outbox by its caps

    def row(self) -> dict[str, object]:
        return {
            "stored": self.stored,
            "folded once": self.folded_once,
            "double-counted": len(self.double),
            "refused": sum(self.refused.values()),
            "pending": self.pending,
            "lost": len(self.lost),
        }


def _classify(
    tally: Tally,
    key: Key,
    folds: list[Fold],
    refused: tuple[str, str] | None,
    pending: bool,
    evidence: str,
    resent_as_refused: bool = False,
) -> None:
    saved = [f for f in folds if f.persisted]
    tally.rolled_back += len(folds) - len(saved)
    label = f"{key[0]}:{key[1]}:{key[2]}"
    if len(saved) > 1 or (saved and resent_as_refused):
        why = "; also given up as too stale, its work re-sent" if resent_as_refused else ""
        tally.double.append(f"{label} folded {len(saved)}x{why}:\n    " + "\n    ".join(
            f.line for f in saved))  # fmt: skip
    elif saved:
        tally.folded_once += 1
    elif refused is not None:
        tally.refused[refused[0]] += 1
        tally.refused_lines += [refused[1]] if refused[1] else []
    elif pending:
        tally.pending += 1
    else:
        undone = "".join(f"\n    rolled back: {f.line}" for f in folds)
        tally.lost.append(f"{label}: {evidence}{undone}")


def account(fleet: Fleet) -> tuple[Tally, Tally]:
    """Device updates (folded at the gateways) and gateway syncs (folded at the cloud)."""
    nodes = {
        name: parse_node(fleet.members[name].lines()) for name in ["cloud", *fleet.gateway_ids]
    }
    updates, syncs = Tally("device updates"), Tally("gateway syncs")
    by_key: dict[Key, list[Fold]] = defaultdict(list)
    for log in nodes.values():
        for fold in log.folds:
            by_key[fold.key].append(fold)
    refused = {k: v for log in nodes.values() for k, v in log.refused.items()}

    for name in fleet.device_ids:
        member = fleet.members[name]
        logged = parse_device(member.lines())
        box = read_outbox(member.state / f"device-{name}.db")
        inc = box.incarnation if box else 0
        issued = box.issued.get(name, 0) if box else 0
        seqs = set(range(issued)) | set(logged)
        updates.unlogged += len(seqs - set(logged))
        updates.dropped += sum(box.counters.values()) if box else 0
        for seq in sorted(seqs):
            key = (name, inc, seq)
            pending = box is not None and (name, seq) in box.pending
            why = logged.get(seq, f"seq {seq} issued (no log line)")
            _classify(updates, key, by_key.pop(key, []), refused.get(key), pending, why)
        updates.stored += len(seqs)
        _foreign(updates, by_key, name)

    for name in fleet.gateway_ids:
        box = read_outbox(fleet.members[name].state / name / "sync.sqlite")
        log = nodes[name]
        # Syncs carry the incarnation their gateway's uplink state holds: the one the
        # cloud folded most often (another one is reported as foreign).
        incs = Counter(f.key[1] for k, fs in by_key.items() if k[0] == name for f in fs)
        inc = incs.most_common(1)[0][0] if incs else 0
        seqs = log.syncs | {k[2] for k in by_key if k[0] == name and k[1] == inc}
        last = max(seqs, default=-1)
        for seq in sorted(seqs):
            key = (name, inc, seq)
            pending = (box is not None and (name, seq) in box.pending) or seq == last
            why = f"sync {seq}" + ("" if seq in log.syncs else " (no closed line)")
            stale = seq in log.stale_syncs
            # Given up by the gateway: its work goes into the next sync. Refused by the
            # cloud alone: the receipt settles it and its work is dropped (line kept).
            verdict = ("given up, re-sent", "") if stale else refused.get(key)
            _classify(syncs, key, by_key.pop(key, []), verdict, pending, why,
                      resent_as_refused=stale)  # fmt: skip
        syncs.stored += len(seqs)
        _foreign(syncs, by_key, name)
    return updates, syncs


def _foreign(tally: Tally, by_key: dict[Key, list[Fold]], sender: str) -> None:
    for key in [k for k in by_key if k[0] == sender]:
        tally.foreign += [f.line for f in by_key.pop(key)]


# ------------------------------------------------------------------ one run
@dataclass
class Run:
    """What one run of the fleet gave: the faults, the tallies, the cloud's pace."""

    faults: list[Fault]
    updates: Tally
    syncs: Tally
    recovery_s: float | None
    deadline_s: float
    rounds_per_min: float
    seconds: float
    crashes: list[str]
    logs: Path

    @property
    def recovery_deadlines(self) -> float | None:
        return None if self.recovery_s is None else self.recovery_s / self.deadline_s


async def run_fleet(
    workdir: Path,
    seconds: float,
    *,
    seed: int | None,
    shape: Shape = Shape(),
    settle_rounds: int = 3,
    startup_s: float = STARTUP_S,
) -> Run:
    """Start the fleet, wait for its first cloud round, run ``seconds`` of faults (none with
    ``seed=None``), wait for the next cloud round after the last one and ``settle_rounds``
    more, stop everything and account for every update."""
    deadline = shape.cloud_deadline_s
    faults: list[Fault] = []
    recovery: float | None = None
    async with Fleet(workdir, shape) as fleet:
        if not await fleet.cloud_rounds(1, startup_s):
            raise AssertionError(f"no cloud round within {startup_s:.0f} s of the start")
        started, first = time.monotonic(), len(fleet.closes)
        if seed is None:
            await asyncio.sleep(seconds)
        else:
            faults = await fleet.run_schedule(seconds, random.Random(seed))
        measured = time.monotonic() - started
        rounds = len(fleet.closes) - first
        since = faults[-1].ended if faults else time.monotonic()
        recovery = await fleet.cloud_round_after(since, RECOVERY_WAIT * deadline)
        if recovery is not None:
            await fleet.cloud_rounds(settle_rounds, SETTLE_WAIT * deadline)
        await fleet.stop_all()
        updates, syncs = account(fleet)
        crashes = fleet.crashes
    return Run(faults, updates, syncs, recovery, deadline, rounds * 60 / measured, measured,
               crashes, workdir / "logs")  # fmt: skip


def describe(run: Run) -> Iterator[str]:
    """The faults, then every defect found, with its log lines."""
    for fault in run.faults:
        yield f"  fault {fault}"
    for tally in (run.updates, run.syncs):
        for line in tally.lost:
            yield f"  LOST {tally.what}: {line}"
        for line in tally.double:
            yield f"  DOUBLE {tally.what}: {line}"
        for line in tally.foreign:
            yield f"  FOREIGN {tally.what}: {line}"
    for line in run.syncs.refused_lines:  # the work in a sync the cloud refused is dropped
        yield f"  REFUSED sync: {line}"
    for crash in run.crashes:
        yield f"  CRASH {crash}"
