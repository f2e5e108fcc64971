"""Test plumbing for fleets on brokers run from the shipped configs.

The configs in ``cloud/`` and ``gateways/`` are started as they are, with only
their paths, ports and addresses filled in here, so a test failing means the
shipped file is wrong. ``serving`` runs nodes and devices for the length of a block.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import getpass
import ipaddress
import re
import subprocess
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from timeouts import within

from edgefl import credentials
from edgefl.broker import RunningBroker, free_port, start_mosquitto

REPO = Path(__file__).resolve().parents[2]
SECURE_CONF = REPO / "cloud" / "mosquitto-secure.conf"
BRIDGE_CONF = REPO / "gateways" / "mosquitto-bridge.conf"


@dataclass(frozen=True)
class Certs:
    ca: Path
    cert: Path
    key: Path


def make_certs(directory: Path) -> Certs:
    """A throw-away CA and a server certificate for 127.0.0.1 and localhost."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import cryptography  # noqa: F401
    except ImportError:
        return _certs_with_openssl(directory)
    return _certs_with_cryptography(directory)


def _certs_with_cryptography(d: Path) -> Certs:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgefl test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    certs = Certs(d / "ca.crt", d / "server.crt", d / "server.key")
    certs.ca.write_bytes(ca.public_bytes(pem))
    certs.cert.write_bytes(cert.public_bytes(pem))
    certs.key.write_bytes(
        key.private_bytes(
            pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )
    certs.key.chmod(0o600)
    return certs


def _certs_with_openssl(d: Path) -> Certs:
    certs = Certs(d / "ca.crt", d / "server.crt", d / "server.key")
    ca_key, csr, ext = d / "ca.key", d / "server.csr", d / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for cmd in (
        f"openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 "
        f"-subj /CN=edgefl-test-CA -keyout {ca_key} -out {certs.ca}",
        f"openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
        f"-subj /CN=127.0.0.1 -keyout {certs.key} -out {csr}",
        f"openssl x509 -req -in {csr} -CA {certs.ca} -CAkey {ca_key} -CAcreateserial "
        f"-days 1 -extfile {ext} -out {certs.cert}",
    ):
        subprocess.run(cmd.split(), check=True, capture_output=True, timeout=30)
    return certs


def fill(template: str, values: Mapping[str, str]) -> str:
    """Replace the argument of each directive named in ``values`` (first word of a line).

    Keys may carry the old argument to tell repeated directives apart
    (``"listener 8883"``). Every key must match, so a renamed directive in the
    shipped file fails loudly instead of leaving a placeholder behind.
    """
    out, used = [], set()
    for line in template.splitlines():
        for key, value in values.items():
            if re.match(rf"^{re.escape(key)}(\s|$)", line):
                line = f"{key.split()[0]} {value}"
                used.add(key)
                break
        out.append(line)
    missing = set(values) - used
    assert not missing, f"directives not found in the template: {sorted(missing)}"
    return "\n".join(out) + "\n"


@dataclass
class ConfBroker:
    """A Mosquitto run from a filled-in shipped config; it can stop and start on the same ports."""

    conf: str
    port: int
    directory: Path
    passwords: dict[str, str] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    tls_port: int | None = None
    certs: Certs | None = None
    running: RunningBroker | None = None

    def start(self) -> ConfBroker:
        # Run as the test's user: as root, mosquitto would drop to ``mosquitto``,
        # which cannot enter the test's private temp directory.
        self.running = start_mosquitto(
            port=self.port, config=self.conf, extra=[f"user {getpass.getuser()}"], listener=False
        )
        return self

    def stop(self) -> None:
        if self.running is not None:
            self.running.stop()
            self.running = None

    def __enter__(self) -> ConfBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def add_users(
    directory: Path, users: Mapping[str, tuple[str, str | None]]
) -> tuple[dict[str, str], dict[str, str]]:
    """``users``: id -> (role, parent). Returns the passwords and HMAC keys created."""
    passwords, keys = {}, {}
    for node_id, (role, parent) in users.items():
        cred = credentials.add(
            role,
            node_id,
            passwd_file=directory / "passwd",
            acl_file=directory / "acl",
            keys_dir=directory / "keys",
            parent=parent,
        )
        passwords[node_id] = cred.password
        if cred.hmac_key:
            keys[node_id] = cred.hmac_key
    return passwords, keys


def secure_broker(directory: Path, users: Mapping[str, tuple[str, str | None]]) -> ConfBroker:
    """cloud/mosquitto-secure.conf with these users, a plain and a TLS listener on loopback."""
    directory.mkdir(parents=True, exist_ok=True)
    passwords, keys = add_users(directory, users)
    certs = make_certs(directory / "certs")
    plain, tls = free_port(), free_port()
    (directory / "data").mkdir(exist_ok=True)
    conf = fill(
        SECURE_CONF.read_text(),
        {
            "password_file": str(directory / "passwd"),
            "acl_file": str(directory / "acl"),
            "persistence_location": f"{directory / 'data'}/",
            "listener 1883": f"{plain} 127.0.0.1",
            "listener 8883": f"{tls} 127.0.0.1",
            "cafile": str(certs.ca),
            "certfile": str(certs.cert),
            "keyfile": str(certs.key),
        },
    )
    return ConfBroker(conf, plain, directory, passwords, keys, tls, certs).start()


def bridged_gateway_broker(
    directory: Path, cloud: ConfBroker, gateway: str, users: Mapping[str, tuple[str, str | None]]
) -> ConfBroker:
    """gateways/mosquitto-bridge.conf for ``gateway``, bridged over TLS to ``cloud``.

    ``gateway`` must be a user of ``cloud``; ``users`` are this broker's own.
    """
    assert cloud.certs is not None and cloud.tls_port is not None
    directory.mkdir(parents=True, exist_ok=True)
    passwords, keys = add_users(directory, users)
    port = free_port()
    (directory / "data").mkdir(exist_ok=True)
    conf = fill(
        BRIDGE_CONF.read_text().replace("gw-1", gateway),
        {
            "password_file": str(directory / "passwd"),
            "acl_file": str(directory / "acl"),
            "persistence_location": f"{directory / 'data'}/",
            "listener 1883": f"{port} 127.0.0.1",
            "address": f"127.0.0.1:{cloud.tls_port}",
            "remote_password": cloud.passwords[gateway],
            "bridge_cafile": str(cloud.certs.ca),
            "restart_timeout": "1 2",
        },
    )
    return ConfBroker(conf, port, directory, passwords, keys).start()


@contextlib.asynccontextmanager
async def serving(*members: Any) -> AsyncIterator[None]:
    """Enter each Aggregator or DeviceAgent and run it until the block ends."""
    async with contextlib.AsyncExitStack() as stack:
        for member in members:
            await stack.enter_async_context(member)
        tasks = [asyncio.ensure_future(m.run()) for m in members]
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def until(condition: Callable[[], bool], timeout: float) -> None:
    """Poll ``condition`` until it holds; ``TimeoutError`` after ``timeout`` seconds."""
    async with within(timeout):
        while not condition():
            await asyncio.sleep(0.05)
