"""Who may say what to the broker: CURVE keys (zpipe/keys.py) and their roles, and the
bounds of its socket (zpipe/bounds.py).

With CURVE on, each message carries the ZAP User-Id of its connection, ``ROLE:NAME``: node
messages need a node key, and a node key speaks only for the node of its name (a node of
another name cannot register under it); admin operations need an admin key; generate and
cancel a client or admin key. Open (loopback, no keys), everything is taken, as before.
"""

from __future__ import annotations

import logging
from pathlib import Path

import zmq

from zpipe import bounds, keys
from zpipe.config import BrokerConfig, ConfigError
from zpipe.protocol import Message
from zpipe.shard import ModelSpec

log = logging.getLogger("zpipe.broker")

CLIENT_KINDS = {"generate", "cancel"}


def max_frame(cfg: BrokerConfig, spec: ModelSpec, max_positions: int) -> int:
    """The largest frame the broker takes: a result of ``limits.max_batch`` sessions of the
    longest context they may reach (a replay after a node's loss carries them whole)."""
    lim = cfg.limits
    context = min(lim.max_prompt_tokens + lim.max_new_tokens, max_positions)
    return bounds.largest_frame(spec.hidden_size, lim.max_batch, context)


def guard(cfg: BrokerConfig, ctx: zmq.Context, sock: zmq.Socket,
          limit: int) -> keys.Authenticator | None:
    """Bound ``sock`` and, when CURVE is wanted, make it a CURVE server behind a ZAP
    allow-list of the key directory's node, client and admin keys (before it binds)."""
    bounds.limit(sock, limit)
    if not keys.curve_wanted(cfg.curve, cfg.keys, [cfg.bind], "broker"):
        return None
    root = Path(cfg.keys)
    pair = keys.load_pair(root / f"{keys.BROKER}.key_secret", keys.keys_command(root))
    allowed = keys.allow_list(root)
    if not allowed:
        raise ConfigError(f"{root}: no node, client or admin keys to admit; make them with "
                          f"`{keys.keys_command(root, ['NAME'], ['NAME'], ['NAME'])}`")
    auth = keys.Authenticator(ctx, allowed, "broker")
    auth.start()
    keys.serve(sock, pair)
    roles = [r for r in allowed.values()]
    log.info("CURVE on: %s from %s", ", ".join(
        f"{sum(r.startswith(role + ':') for r in roles)} {role} keys" for role in keys.ROLES),
        root)
    return auth


def refusal(user: str, msg: Message, node_kinds: set[str], node_name: str | None) -> str:
    """Why the holder of the key ``user`` (``ROLE:NAME``) may not send ``msg`` ("" if it may).
    ``node_name``: the node registered on this connection, if any."""
    role, _, name = user.partition(":")
    kind = msg.kind
    if kind in node_kinds or (kind == "error" and node_name is not None):
        if role != "node":
            return f"a {role} key ({name}) may not send node messages ({kind!r})"
        claimed = msg.get("name") if kind == "register" else node_name
        if claimed is not None and claimed != name:
            return f"the key of node {name!r} may not speak for node {claimed!r}"
    elif kind == "admin" and role != "admin":
        return f"admin operations need an admin key; {name!r} holds a {role} key"
    elif kind in CLIENT_KINDS and role not in ("client", "admin"):
        return f"a {role} key ({name}) may not send {kind!r}"
    return ""
