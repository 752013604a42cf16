"""Direct routing's sockets in a node: the PULL socket other nodes send it steps on, and the
PUSH sockets it sends the next stage's steps through."""

from __future__ import annotations

import asyncio
import logging
import socket

import zmq

from zpipe import aio, protocol
from zpipe.protocol import Message, ProtocolError

log = logging.getLogger("zpipe.node")

MAX_PEERS = 64  # open sockets to other nodes; the oldest closes beyond that


class Peers:
    """Steps taken in (after ``bind``) go to ``queue``, checked like the broker's. A node
    sends on with ``send`` whether or not it binds: the first stage's node needs no address."""

    def __init__(self, ctx: zmq.Context, queue: asyncio.Queue[Message]) -> None:
        self.ctx = ctx
        self.queue = queue
        self.addr = ""  # what the node registers as its ``peer``, once bound
        self.sock: aio.Socket | None = None
        self.pushes: dict[str, zmq.Socket] = {}

    def bind(self, bind: str, busy_poll_s: float) -> None:
        sock = self.ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(bind)
        # The address a ':0' bind got; a wildcard host is reached by this host's name.
        addr = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        host = addr.removeprefix("tcp://").rpartition(":")[0]
        if host in ("0.0.0.0", "*", "[::]"):
            addr = addr.replace(host, socket.gethostname(), 1)
        self.addr = addr
        self.sock = aio.Socket(sock, busy_poll_s=busy_poll_s)

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
        self.queue.put_nowait(msg)

    def send(self, addr: str, frames: list) -> None:
        """Queue ``frames`` for the node at ``addr`` (raises ``zmq.ZMQError`` when its queue
        is full)."""
        sock = self.pushes.get(addr)
        if sock is None:
            if len(self.pushes) >= MAX_PEERS:
                self.pushes.pop(next(iter(self.pushes))).close(0)
            sock = self.pushes[addr] = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(addr)
        aio.send(sock, frames)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        for push in self.pushes.values():
            push.close(0)
        self.pushes.clear()
