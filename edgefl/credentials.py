"""``edgefl credentials``: broker passwords, ACL blocks, update and model signing keys.

A broker user's name is the node's id, so the ACL can tie every write to the
sender's own topics. Passwords go through ``mosquitto_passwd -b`` (so, for a
moment, on its command line) and are stored only hashed; they are printed once.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .acl import ROLES, CredentialsError, acl_block, acl_users, upsert_acl
from .signing import generate_key_pair, load_private_key, public_hex
from .topics import TopicError, check_id

INSTALL_HINT = "install it with: sudo apt-get install -y mosquitto (it ships mosquitto_passwd)"
KEY_BYTES = 32

#: Lines of a Mosquitto password file (``user:$7$...``) and of its ACL file.
_PASSWD_LINE = re.compile(r"^[^:\s]+:\$\d+\$\S*$")
_ACL_LINE = re.compile(r"^(#.*|(user|topic|pattern)\s.*)$")


def _check_format(path: Path, text: str, line: re.Pattern[str], kind: str) -> None:
    """A file given by mistake (``/etc/passwd``) is refused, never written into."""
    for number, content in enumerate(text.splitlines(), 1):
        if content.strip() and not line.match(content.strip()):
            raise CredentialsError(f"{path} is not a Mosquitto {kind} file (line {number})")


@dataclass(frozen=True)
class Credential:
    role: str
    id: str
    password: str
    hmac_key: str | None  # hex; only nodes with a parent sign
    key_file: Path | None
    parent: str | None
    #: hex Ed25519 private key that signs this node's models (gateways and the cloud)
    model_key: str | None = None
    #: hex Ed25519 public key of the parent's models, when its key is in the keys dir
    parent_key: str | None = None


# ------------------------------------------------------------------ pure rules


def config_lines(cred: Credential, *, broker: str = "CLOUD_HOST:8883") -> str:
    """What to paste where: the node's own TOML, the entry its parent needs, and the
    ``parent_key`` its children need."""
    out = [f"# --- {cred.role} {cred.id}: its config file (TOML) ---"]
    if cred.role in ("device", "gateway", "cloud"):
        out.append(f'id = "{cred.id}"')
    if cred.hmac_key is not None and cred.role in ("device", "gateway"):
        out.append(f'hmac_key = "{cred.hmac_key}"')
    if cred.role == "gateway":
        out.append(f'parent = "{cred.parent or "cloud"}"')
    if cred.role == "device" and cred.parent:
        out.append(f'gateway = "{cred.parent}"')
    if cred.parent_key is not None:
        out.append(f'parent_key = "{cred.parent_key}"')
    if cred.model_key is not None:
        out += [
            "require_signature = true",
            "# model_key is a secret: rather set EDGEFL_MODEL_KEY in the node's environment",
            f'model_key = "{cred.model_key}"',
        ]
    out += [
        "",
        "[mqtt]",
        f'broker = "{broker}"',
        f'username = "{cred.id}"',
        f'password = "{cred.password}"',
        '# ca_file = "/etc/edgefl/ca.crt"   # TLS listener',
    ]
    if cred.role in ("device", "gateway") and cred.hmac_key is not None:
        parent = cred.parent or ("cloud" if cred.role == "gateway" else "its gateway")
        out += [
            "",
            f"# --- on {parent}: add under [keys] in its config file ---",
            "[keys]",
            f'{cred.id} = "{cred.hmac_key}"',
        ]
    if cred.model_key is not None:
        children = "device" if cred.role == "gateway" else "gateway"
        public = public_hex(load_private_key(cred.model_key))
        out += [
            "",
            f"# --- on each {children} of {cred.id}: add at the top of its config file ---",
            f'parent_key = "{public}"',
        ]
    return "\n".join(out)


# -------------------------------------------------------------------- the shell


def add(
    role: str,
    node_id: str,
    *,
    passwd_file: Path,
    acl_file: Path,
    keys_dir: Path,
    prefix: str = "edgefl",
    parent: str | None = None,
    password: str | None = None,
    rotate_key: bool = False,
) -> Credential:
    """Create or update one broker user, its ACL block, its HMAC key (devices, gateways)
    and its model signing key (gateways, the cloud).

    Existing keys are kept unless ``rotate_key``: the parent and the children already
    trust them. The parent's public model key is looked up in ``keys_dir``.
    """
    node_id, parent = _check_ids(role, node_id, parent)
    try:
        block = acl_block(role, node_id, prefix=prefix, parent=parent)
    except TopicError as exc:
        raise CredentialsError(str(exc)) from None
    previous = acl_file.read_text() if acl_file.exists() else ""
    _check_format(acl_file, previous, _ACL_LINE, "ACL")
    if passwd_file.exists():
        _check_format(passwd_file, passwd_file.read_text(), _PASSWD_LINE, "password")
    parent_role = acl_users(previous).get(parent or "")
    if role == "device" and parent_role not in (None, "gateway"):
        raise CredentialsError(f"--parent {parent} is a {parent_role}, not a gateway")
    password = password or secrets.token_urlsafe(24)
    set_password(passwd_file, node_id, password)
    acl_file.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(acl_file, upsert_acl(previous, node_id, block), mode=0o644)
    key, key_file, model_key = None, None, None
    if role in ("device", "gateway"):  # the cloud has no parent to sign for
        key_file = keys_dir / f"{node_id}.key"
        key = _load_or_make_key(key_file, rotate_key)
    if role in ("gateway", "cloud"):  # nodes that publish models
        model_key = _load_or_make_key(model_key_file(keys_dir, node_id), rotate_key, _model_key)
    parent_key = _parent_key(keys_dir, parent or ("cloud" if role == "gateway" else None))
    return Credential(role, node_id, password, key, key_file, parent, model_key, parent_key)


def model_key_file(keys_dir: Path, node_id: str) -> Path:
    """Where a node's Ed25519 model signing key is kept (ids have no dots: no clash)."""
    return keys_dir / f"{node_id}.model.key"


def _model_key() -> str:
    return generate_key_pair()[0]


def _parent_key(keys_dir: Path, parent: str | None) -> str | None:
    """The public half of the parent's model key, if that key is kept here."""
    path = model_key_file(keys_dir, parent) if parent else None
    if path is None or not path.exists():
        return None
    return public_hex(load_private_key(path.read_text().strip(), str(path)))


def _check_ids(role: str, node_id: str, parent: str | None) -> tuple[str, str | None]:
    try:
        check_id(node_id, "id")
        if parent is not None:
            check_id(parent, "parent id")
    except TopicError as exc:
        raise CredentialsError(str(exc)) from None
    if role == "cloud" and parent is not None:
        raise CredentialsError("the cloud has no parent; drop --parent")
    return node_id, parent


def set_password(passwd_file: Path, user: str, password: str) -> None:
    """``mosquitto_passwd -b`` (with ``-c`` when the file does not exist yet)."""
    binary = shutil.which("mosquitto_passwd")
    if binary is None:
        raise CredentialsError(f"mosquitto_passwd not found; {INSTALL_HINT}")
    passwd_file.parent.mkdir(parents=True, exist_ok=True)
    create = [] if passwd_file.exists() else ["-c"]
    done = subprocess.run(
        [binary, *create, "-b", str(passwd_file), user, password],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        raise CredentialsError(f"mosquitto_passwd failed: {why[0] if why else done.returncode}")
    share_with_broker(passwd_file)


def share_with_broker(path: Path) -> None:
    """Owner read-write, group ``mosquitto`` read: the broker drops root before reading it."""
    os.chmod(path, 0o640)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        try:
            import grp

            os.chown(path, -1, grp.getgrnam("mosquitto").gr_gid)
        except (ImportError, KeyError):
            pass  # no mosquitto group on this host: the owner runs the broker


def _load_or_make_key(
    path: Path, rotate: bool, make: Callable[[], str] = lambda: secrets.token_hex(KEY_BYTES)
) -> str:
    if path.exists() and not rotate:
        key = path.read_text().strip()
        if re.fullmatch(r"[0-9a-f]{64}", key):
            return key
        raise CredentialsError(f"{path} does not hold a 64-digit hex key; use --rotate-key")
    key = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    _write_atomically(path, key + "\n", mode=0o600)
    return key


def _write_atomically(path: Path, text: str, *, mode: int) -> None:
    """Write through a temp file created with ``mode``: never readable by others in between."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


# ------------------------------------------------------------------------- CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser(
        "add",
        help="create or update a broker user, its ACL block and its signing keys",
        description="Create or update a broker user (name = node id), its ACL block, "
        "its HMAC key (devices, gateways) and its Ed25519 model key (gateways, the cloud), "
        "then print the config lines to paste.",
    )
    p.add_argument(
        "--role", required=True, choices=ROLES, help=f"the node's role: {', '.join(ROLES)}"
    )
    p.add_argument("--id", dest="node_id", help="node id (default for --role cloud: cloud)")
    p.add_argument(
        "--parent",
        help="gateway: its parent node (default cloud); device: its gateway (required)",
    )
    p.add_argument(
        "--passwd-file", type=Path, default=Path("passwd"), help="Mosquitto password file"
    )
    p.add_argument("--acl-file", type=Path, default=Path("acl"), help="Mosquitto ACL file")
    p.add_argument("--keys-dir", type=Path, default=Path("keys"), help="where keys are kept")
    p.add_argument("--prefix", default="edgefl", help="topic prefix")
    p.add_argument(
        "--password",
        default=os.environ.get("EDGEFL_NEW_PASSWORD"),
        help="set this password instead of a random one (or EDGEFL_NEW_PASSWORD)",
    )
    p.add_argument(
        "--rotate-key", action="store_true", help="replace the node's existing HMAC and model keys"
    )
    p.add_argument("--broker", default="CLOUD_HOST:8883", help="broker address shown in the config")


def main(args: argparse.Namespace) -> int:
    node_id = args.node_id or ("cloud" if args.role == "cloud" else None)
    if node_id is None:
        print("edgefl credentials: error: --id is required for this role", file=sys.stderr)
        return 2
    try:
        cred = add(
            args.role,
            node_id,
            passwd_file=args.passwd_file,
            acl_file=args.acl_file,
            keys_dir=args.keys_dir,
            prefix=args.prefix,
            parent=args.parent,
            password=args.password,
            rotate_key=args.rotate_key,
        )
    except (CredentialsError, OSError) as exc:
        print(f"edgefl credentials: error: {exc}", file=sys.stderr)
        return 2
    where = f"user {cred.id} in {args.passwd_file} and {args.acl_file}"
    if cred.key_file is not None:
        where += f"; key in {cred.key_file}"
    if cred.model_key is not None:
        where += f"; model key in {model_key_file(args.keys_dir, cred.id)}"
    print(f"# {where}; reload the broker (kill -HUP) to apply")
    print(config_lines(cred, broker=args.broker))
    return 0
