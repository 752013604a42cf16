"""CurveZMQ keys and the roles they carry: node, client, admin.

A key directory, made by ``zpipe keys DIR``, holds pyzmq certificate files::

    DIR/broker.key  DIR/broker.key_secret       the broker's pair
    DIR/nodes/NAME.key[_secret]                 one per node; NAME is the node's name
    DIR/clients/NAME.key[_secret]               clients: generate, cancel, info
    DIR/admins/NAME.key[_secret]                admins: also the admin operations

A secret file is readable by its owner only. The broker admits the public keys of
``nodes/``, ``clients/`` and ``admins/`` (a ZAP allow-list) and learns each connection's role
and name from the ZAP User-Id, ``ROLE:NAME``; a node's peer socket admits node keys only.
A host needs only its own secret file and the public keys of those it talks to.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from zpipe import aio
from zpipe.config import ConfigError

log = logging.getLogger("zpipe.auth")

ROLES = {"node": "nodes", "client": "clients", "admin": "admins"}  # role -> its folder
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
BROKER = "broker"
DOMAIN = "zpipe"  # the ZAP domain of every server socket
LOOPBACK = re.compile(r"^(tcp://(127\.\d+\.\d+\.\d+|localhost|\[::1\]):\d+|ipc://.*|inproc://.*)$")


def make_keys(root: Path, nodes: Sequence[str] = (), clients: Sequence[str] = (),
              admins: Sequence[str] = ()) -> list[Path]:
    """Create the broker's pair and the named ones under ``root`` where missing (an existing
    pair is kept). Returns the secret files made."""
    made = []
    old = os.umask(0o077)  # files are born private: no moment readable by others
    try:
        wanted = [(root, BROKER)] + [(root / ROLES[role], name) for role, names in
                                     (("node", nodes), ("client", clients), ("admin", admins))
                                     for name in names]
        for folder, name in wanted:
            if not NAME.match(name):
                raise ConfigError(f"bad key name {name!r}: letters, digits, '_', '.', '-'")
            secret = folder / f"{name}.key_secret"
            if secret.exists():
                continue
            folder.mkdir(parents=True, exist_ok=True)
            zmq.auth.create_certificates(folder, name)
            secret.chmod(0o600)
            made.append(secret)
    finally:
        os.umask(old)
    return made


def keys_command(root: str | Path, nodes: Sequence[str] = (), clients: Sequence[str] = (),
                 admins: Sequence[str] = ()) -> str:
    """The ``zpipe keys`` command line that makes these keys (for error messages)."""
    parts = [f"zpipe keys {root}"]
    for flag, names in (("--nodes", nodes), ("--clients", clients), ("--admins", admins)):
        if names:
            parts.append(f"{flag} {','.join(names)}")
    return " ".join(parts)


@dataclass
class Pair:
    public: bytes  # z85
    secret: bytes


def load_pair(path: Path, hint: str) -> Pair:
    """A secret certificate file (``hint``: the command that makes it, for the error)."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the CURVE key {path}: {e}; make it with `{hint}`") \
            from None
    if secret is None:
        raise ConfigError(f"{path} holds no secret key (give the .key_secret file)")
    return Pair(public, secret)


def load_public(path: Path, hint: str) -> bytes:
    try:
        return zmq.auth.load_certificate(path)[0]
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the CURVE public key {path}: {e}; make it with "
                          f"`{hint}`") from None


def allow_list(root: Path, roles: tuple[str, ...] = tuple(ROLES)) -> dict[bytes, str]:
    """z85 public key -> User-Id ``ROLE:NAME`` for the keys of ``roles`` under ``root``."""
    allowed: dict[bytes, str] = {}
    for role in roles:
        folder = root / ROLES[role]
        for path in sorted(folder.glob("*.key")) if folder.is_dir() else []:
            allowed[load_public(path, keys_command(root))] = f"{role}:{path.stem}"
    return allowed


def is_loopback(address: str) -> bool:
    return LOOPBACK.match(address) is not None


def curve_wanted(curve: bool | None, keys: str | None, binds: list[str], what: str) -> bool:
    """Whether a process runs CURVE: as configured, else when it has keys or binds beyond
    loopback. On without keys is refused, naming the command that makes them."""
    on = curve if curve is not None else (keys is not None or
                                          not all(is_loopback(b) for b in binds))
    if on and keys is None:
        open_binds = [b for b in binds if not is_loopback(b)]
        why = f"it binds {', '.join(open_binds)} (not loopback)" if open_binds else "curve: true"
        raise ConfigError(f"{what}: CURVE keys are needed, as {why}: make them with "
                          "`zpipe keys DIR --nodes NAME,... --clients NAME --admins NAME` and "
                          "set `keys: DIR`, or set `curve: false` to run open")
    if not on:
        log.warning("%s runs open (no CURVE keys): anyone who can reach %s may send it "
                    "anything", what, ", ".join(binds) or "it")
    return on


class Authenticator(AsyncioAuthenticator):
    """ZAP for one process's context: admits the keys of an allow-list, gives each the User-Id
    ``ROLE:NAME`` and logs every key it refuses, with the peer's address."""

    def __init__(self, ctx: zmq.Context, allowed: dict[bytes, str], what: str) -> None:
        super().__init__(ctx, log=logging.getLogger("zpipe.auth.zap"))
        self.allowed = allowed
        self.what = what
        self._address = ""
        self._said: dict[tuple[bytes, str], float] = {}  # refused (key, address) -> logged at
        self.configure_curve_callback(DOMAIN, credentials_provider=self)

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self._address = msg[3].decode(errors="replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.allowed:
            return True
        # A refused peer retries every 100 ms: each key and address is logged once in so long.
        now, seen = time.monotonic(), (key, self._address)
        if now - self._said.get(seen, -LOG_EVERY_S) >= LOG_EVERY_S:
            if len(self._said) > 1024:
                self._said.clear()
            self._said[seen] = now
            log.warning("%s refused an unknown CURVE key %s from %s", self.what, key.decode(),
                        self._address)
        return False

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.allowed[z85.encode(client_public_key)]


def serve(sock: zmq.Socket, pair: Pair) -> None:
    """Make ``sock`` a CURVE server (before it binds); ZAP decides who gets in."""
    sock.curve_server = True
    sock.curve_publickey = pair.public
    sock.curve_secretkey = pair.secret
    sock.zap_domain = DOMAIN.encode()


def connect_as(sock: zmq.Socket, pair: Pair, server_public: bytes) -> None:
    """Make ``sock`` a CURVE client of the server with ``server_public`` (before it connects)."""
    sock.curve_publickey = pair.public
    sock.curve_secretkey = pair.secret
    sock.curve_serverkey = server_public


def user_id(frame: zmq.Frame) -> str:
    """The ZAP User-Id of the connection a received frame came on ("" without one)."""
    try:
        return frame.get("User-Id") or ""
    except zmq.ZMQError:  # no such property: the connection had no ZAP handshake
        return ""


HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
LOG_EVERY_S = 10.0
_PROTOCOL_ERRORS = {int(v): k.removeprefix("PROTOCOL_ERROR_") for k, v in vars(zmq).items()
                    if k.startswith("PROTOCOL_ERROR_") and isinstance(v, int)}


def watch_handshakes(sock: zmq.Socket, what: str,
                     on_fail: Callable[[str, str], None] | None = None,
                     on_disconnect: Callable[[], None] | None = None) -> asyncio.Task:
    """A task that logs every failed handshake on ``sock`` (a peer without a key, with another
    mechanism, or refused by ZAP) until cancelled; ``on_fail(kind, detail)`` hears of each
    too, and ``on_disconnect()`` of every connection that closes (a socket has one monitor: it
    serves both). Call it before ``sock`` connects: the monitor is attached here, at once,
    and a connection that fails its handshake is not retried, so a monitor attached later
    would never hear of it."""
    mask = HANDSHAKE_FAILED | (zmq.EVENT_DISCONNECTED if on_disconnect else 0)
    mon = aio.Socket(sock.get_monitor_socket(mask))
    return asyncio.get_running_loop().create_task(
        _watch(mon, what, on_fail, on_disconnect))


async def _watch(mon: aio.Socket, what: str, on_fail: Callable[[str, str], None] | None,
                 on_disconnect: Callable[[], None] | None) -> None:
    last, quiet = -LOG_EVERY_S, 0  # libzmq retries every 100 ms: log one failure in so many
    try:
        while True:
            frames = await mon.recv()
            event = parse_monitor_message([f.bytes for f in frames])
            if event["event"] == zmq.EVENT_DISCONNECTED:
                if on_disconnect is not None:
                    on_disconnect()
                continue
            kind = zmq.Event(event["event"]).name.removeprefix("HANDSHAKE_FAILED_")
            value = event["value"]
            detail = (_PROTOCOL_ERRORS.get(value, hex(value)) if kind == "PROTOCOL"
                      else f"ZAP status {value}" if kind == "AUTH" else zmq.strerror(value))
            now = time.monotonic()
            if now - last < LOG_EVERY_S:
                quiet += 1
            else:
                more = f"; {quiet} more since the last said" if quiet else ""
                log.warning("%s: a handshake failed on %s (%s: %s%s)", what,
                            event["endpoint"].decode(errors="replace"), kind.lower(), detail,
                            more)
                last, quiet = now, 0
            if on_fail is not None:
                on_fail(kind.lower(), detail)
    finally:
        mon.close()


@dataclass
class NodeKeys:
    """A node's keys: its own pair (for the broker and for its peer socket), the broker's
    public key, and where the other nodes' public keys are (their peer sockets)."""

    root: Path
    pair: Pair
    broker: bytes

    def peer(self, name: str) -> bytes:
        """The public key of node ``name``'s peer socket."""
        if not NAME.match(name):
            raise ConfigError(f"bad node name {name!r}")
        return load_public(self.root / ROLES["node"] / f"{name}.key", keys_command(self.root, [name]))


def node_keys(name: str, root: str | None, curve: bool | None, binds: list[str]) -> NodeKeys | None:
    """Node ``name``'s keys under ``root`` when it runs CURVE (``curve_wanted``), else None."""
    if not curve_wanted(curve, root, binds, f"node {name}"):
        return None
    path = Path(root)
    hint = keys_command(path, [name])
    return NodeKeys(path, load_pair(path / ROLES["node"] / f"{name}.key_secret", hint),
                    load_public(path / f"{BROKER}.key", hint))


def client_keys(key: str | None = None, broker_key: str | None = None
                ) -> tuple[Pair, bytes] | None:
    """A client's or admin's secret key file and the broker's public key: as given, else
    ``$ZPIPE_KEY`` / ``$ZPIPE_BROKER_KEY``; the broker's key defaults to the ``broker.key``
    beside the key file or one folder up (as ``zpipe keys`` lays them out). None: no key."""
    key = key or os.environ.get("ZPIPE_KEY") or None
    if key is None:
        return None
    path = Path(key)
    hint = "zpipe keys DIR --clients NAME"
    pair = load_pair(path, hint)
    broker_key = broker_key or os.environ.get("ZPIPE_BROKER_KEY") or None
    if broker_key is None:
        near = [p / f"{BROKER}.key" for p in (path.parent, path.parent.parent)]
        found = [p for p in near if p.is_file()]
        if not found:
            raise ConfigError(f"no {BROKER}.key beside {path} or one folder up: give the "
                              "broker's public key (--broker-key FILE or $ZPIPE_BROKER_KEY)")
        broker_key = found[0]
    return pair, load_public(Path(broker_key), hint)
