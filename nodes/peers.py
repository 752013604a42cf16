"""Direct routing's sockets in a node: the PULL socket other nodes send it steps on, and the
PUSH sockets it sends the next stage's steps through.

The broker announces each placement to its nodes (a ``peers`` message, before they load,
restore or commit it): the node's stage, the node before it and the route. A step is taken
only for an announced epoch and this node's stage, and with CURVE keys only from the node
before it (the User-Id of its connection); a step is sent on only to the announced route.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass

import zmq

from zpipe import aio, bounds, keys, protocol
from zpipe.protocol import Message, ProtocolError

log = logging.getLogger("zpipe.node")

MAX_PEERS = 64  # open sockets to other nodes; the oldest closes beyond that
KEEP_EPOCHS = 4  # announcements kept at most (besides the serving epoch's)


@dataclass(frozen=True)
class Announced:
    stage: int
    prev: str  # the node of the stage before ("" for stage 0)
    route: tuple[str, ...]  # peer addresses of stages 1..last
    names: tuple[str, ...]  # their nodes


def announcement(msg: Message) -> tuple[int, Announced]:
    """A ``peers`` message, checked (it comes from the broker, but is untrusted all the same)."""
    route, names = msg["route"], msg["names"]
    if not (len(route) == len(names) <= protocol.MAX_STAGES
            and all(protocol.is_peer_address(a) for a in route)
            and all(isinstance(n, str) and keys.NAME.match(n) for n in names)
            and 0 <= msg["stage"] <= len(route)):
        raise ProtocolError("a malformed peers announcement", "bad_route")
    return msg["epoch"], Announced(msg["stage"], msg["prev"], tuple(route), tuple(names))


class Peers:
    """Steps taken in (after ``bind``) go to ``queue``, checked like the broker's. A node
    sends on with ``send`` whether or not it binds: the first stage's node needs no address."""

    def __init__(self, ctx: zmq.Context, queue: asyncio.Queue[Message], max_frame: int,
                 node_keys: keys.NodeKeys | None = None) -> None:
        self.ctx = ctx
        self.queue = queue
        self.max_frame = max_frame
        self.keys = node_keys
        self.addr = ""  # what the node registers as its ``peer``, once bound
        self.sock: aio.Socket | None = None
        self.pushes: dict[tuple[str, str], zmq.Socket] = {}  # (address, node) -> socket
        self.announced: dict[int, Announced] = {}  # epoch -> what the broker said
        self.auth: keys.Authenticator | None = None
        self.watch: asyncio.Task | None = None

    def bind(self, bind: str, busy_poll_s: float) -> None:
        sock = self.ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        bounds.limit(sock, self.max_frame)
        if self.keys is not None:  # only nodes' keys get in; ``_take`` checks which node
            self.auth = keys.Authenticator(self.ctx, keys.allow_list(self.keys.root, ("node",)),
                                           "peer socket")
            self.auth.start()
            keys.serve(sock, self.keys.pair)
        self.watch = keys.watch_handshakes(sock, "peer socket")
        sock.bind(bind)
        # The address a ':0' bind got; a wildcard host is reached by this host's name.
        addr = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        host = addr.removeprefix("tcp://").rpartition(":")[0]
        if host in ("0.0.0.0", "*", "[::]"):
            addr = addr.replace(host, socket.gethostname(), 1)
        self.addr = addr
        self.sock = aio.Socket(sock, busy_poll_s=busy_poll_s)

    def announce(self, msg: Message, serving: int) -> None:
        """The broker's ``peers`` for a placement; ``serving``: the epoch the node is at.
        Kept: that epoch's and newer ones (moves being committed, or rolled back), a few."""
        try:
            epoch, what = announcement(msg)
        except ProtocolError as e:
            log.warning("ignored peers from the broker: %s", e)
            return
        self.announced[epoch] = what
        for old in [e for e in self.announced if e < serving]:
            del self.announced[old]
        for old in sorted(self.announced)[:-KEEP_EPOCHS]:
            if old != serving:
                del self.announced[old]

    async def serve(self) -> None:
        while True:
            frames = await self.sock.recv()
            if frames is not None:  # None: ``pump`` took what woke us
                self._take(frames)

    def pump(self) -> None:
        """Take in every step already on the socket."""
        while self.sock is not None and (frames := self.sock.recv_nowait()) is not None:
            self._take(frames)

    def _take(self, frames: list) -> None:
        try:
            msg = protocol.decode(frames)
        except ProtocolError as e:
            log.warning("dropped a bad message from a peer: %s", e)
            return
        if msg.kind != "step":
            log.warning("ignored a %r message from a peer", msg.kind)
            return
        epoch, stage = msg.get("epoch"), msg.get("stage")
        what = self.announced.get(epoch) if type(epoch) is int else None
        if what is None or stage != what.stage or what.stage == 0:
            log.warning("dropped a peer step for epoch %r stage %r: not this node's (the "
                        "broker announced %s)", epoch, stage,
                        {e: a.stage for e, a in self.announced.items()})
            return
        if self.keys is not None:
            sender = keys.user_id(frames[1])
            if sender != f"node:{what.prev}":
                log.warning("dropped a peer step of epoch %d from %r: it takes steps from "
                            "node %s only", epoch, sender, what.prev)
                return
        self.queue.put_nowait(msg)

    def check_route(self, epoch: object, stage: object, addr: str) -> Announced:
        """What the broker announced for ``epoch`` if it put stage ``stage`` + 1 at ``addr``;
        else ``ProtocolError``: a step never sends data where the broker did not say."""
        what = self.announced.get(epoch) if type(epoch) is int else None
        if (what is None or type(stage) is not int or not 0 <= stage < len(what.route)
                or what.route[stage] != addr):
            raise ProtocolError(f"{addr!r:.80} is not where the broker said stage "
                                f"{stage!r} + 1 of epoch {epoch!r} is", "bad_route")
        return what

    def send(self, epoch: int, stage: int, addr: str, frames: list) -> None:
        """Queue ``frames`` for the node at ``addr``, stage ``stage`` + 1 of ``epoch``: only to
        the route the broker announced (raises ``ProtocolError``), and ``zmq.ZMQError`` when
        its queue is full."""
        what = self.check_route(epoch, stage, addr)
        to = (addr, what.names[stage])
        sock = self.pushes.get(to)
        if sock is None:
            if len(self.pushes) >= MAX_PEERS:
                self.pushes.pop(next(iter(self.pushes))).close(0)
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            bounds.limit(sock, bounds.client_frame())  # it receives nothing
            if self.keys is not None:
                keys.connect_as(sock, self.keys.pair, self.keys.peer(to[1]))
            sock.connect(addr)
            self.pushes[to] = sock
        aio.send(sock, frames)

    def close(self) -> None:
        if self.watch is not None:
            self.watch.cancel()
        if self.sock is not None:
            self.sock.close()
        for push in self.pushes.values():
            push.close(0)
        self.pushes.clear()
        if self.auth is not None:
            self.auth.stop()
