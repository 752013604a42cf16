"""asyncio helpers: running on uvloop, and a lean asyncio wrapper for a ZeroMQ socket."""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import Coroutine
from typing import Any

import zmq

from zpipe.config import ConfigError

# pyzmq's Cython calls, under its Python layers (routing ids, groups, per-call type checks,
# IntFlag arithmetic): those cost several µs per frame and option, and every step message has
# 3-5 frames. A 3-frame send and receive took 34 µs this way, 66 µs through the sugar.
_send_frame = zmq.backend.Socket.send
_recv_frame = zmq.backend.Socket.recv
_get = zmq.backend.Socket.get
_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_LAST = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


def pin(ctx: zmq.Context, cpu: int) -> None:
    """Pin the calling thread (the event loop's) and ``ctx``'s I/O thread to ``cpu``. Call it
    before ``ctx`` makes its first socket (that starts the I/O thread) and after the threads
    that must not be pinned exist (a new thread inherits its creator's CPUs)."""
    try:
        os.sched_setaffinity(0, {cpu})  # pid 0: this thread only
    except OSError as e:  # the CLI reports a ConfigError without a traceback
        raise ConfigError(f"cpu: cannot pin to CPU {cpu} (this process may use "
                          f"{sorted(os.sched_getaffinity(0))}): {e}") from None
    ctx.set(zmq.THREAD_AFFINITY_CPU_ADD, cpu)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop
    except ImportError:  # uvloop is optional where it does not build
        return asyncio.run(coro)
    return uvloop.run(coro)


class Socket:
    """An asyncio face for a plain (blocking-type) ZeroMQ socket, for the hot path.

    pyzmq's ``zmq.asyncio`` socket costs tens of µs per message in futures and poller
    bookkeeping. Here the socket's FD stays registered with the loop for good: a readable FD
    drains every waiting message into a buffer, ``recv`` hands them out, and ``send`` is a
    plain non-blocking call (ROUTER and DEALER queue outgoing messages; a full queue raises
    ``zmq.Again`` instead of stalling the loop). The FD is edge-triggered, so ``EVENTS`` is
    checked again before every wait and after every send.

    ``busy_poll_s`` > 0: ``recv`` keeps the event loop turning (other tasks still run) and
    looks at the socket on every turn for that long before it sleeps in the poller. Waking
    a sleeping process cost ~0.2 ms per message on a virtualised GPU host; polling costs
    a CPU core while it lasts.
    """

    def __init__(self, sock: zmq.Socket, busy_poll_s: float = 0.0) -> None:
        self.sock = sock
        self.busy_poll_s = busy_poll_s
        self.loop = asyncio.get_running_loop()
        self.fd = sock.getsockopt(zmq.FD)
        self.inbox: collections.deque[list] = collections.deque()
        self.waiter: asyncio.Future | None = None
        self.closed = False
        self.loop.add_reader(self.fd, self._drain)

    def _drain(self) -> None:
        if self.closed:
            return
        sock = self.sock
        while _get(sock, _EVENTS) & _POLLIN:
            self.inbox.append(recv(sock))
        w = self.waiter
        if self.inbox and w is not None and not w.done():
            w.set_result(True)

    async def recv(self, timeout: float | None = None) -> list | None:
        """The next message's frames (zmq.Frame), or None after ``timeout`` seconds."""
        if not self.inbox:
            self._drain()
        if not self.inbox and self.busy_poll_s > 0 and not self.closed:
            await self._poll(min(self.busy_poll_s, timeout if timeout is not None else 1e9))
            if timeout is not None and not self.inbox:
                timeout = max(0.0, timeout - self.busy_poll_s)
        if not self.inbox:
            if self.closed:
                raise zmq.ZMQError(zmq.ENOTSOCK, "socket closed")
            self.waiter = w = self.loop.create_future()
            timer = (self.loop.call_later(timeout, _set, w, False)
                     if timeout is not None else None)
            try:
                await w
            finally:
                self.waiter = None
                if timer is not None:
                    timer.cancel()
            if not self.inbox:
                return None
        return self.inbox.popleft()

    async def _poll(self, seconds: float) -> None:
        """Turn the loop until a message comes, ``seconds`` pass, or ``busy_poll_s`` is set
        to 0 (the owner stops the polling while another thread needs the GIL)."""
        end = time.perf_counter() + seconds
        while (not self.inbox and not self.closed and self.busy_poll_s > 0
               and time.perf_counter() < end):
            await asyncio.sleep(0)  # one turn of the loop: its poller is asked not to wait
            if not self.inbox:
                self._drain()

    def recv_nowait(self) -> list | None:
        """The next message already here, or None."""
        if not self.inbox:
            self._drain()
        return self.inbox.popleft() if self.inbox else None

    def send(self, frames: list) -> None:
        """Queue a message without waiting; raises zmq.ZMQError (zmq.Again when full)."""
        send(self.sock, frames)
        if self.waiter is not None:  # a send can swallow the FD's edge: look again
            self.loop.call_soon(self._drain)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.remove_reader(self.fd)
            self.sock.close(0)
            w = self.waiter
            if w is not None and not w.done():
                w.set_result(False)


def recv(sock: zmq.Socket) -> list:
    """``sock.recv_multipart(zmq.NOBLOCK, copy=False)``, leaner (a message is here: its
    parts come together)."""
    parts = [_recv_frame(sock, _LAST, copy=False)]
    while parts[-1].more:
        parts.append(_recv_frame(sock, _LAST, copy=False))
    return parts


def send(sock: zmq.Socket, frames: list) -> None:
    """``sock.send_multipart(frames, zmq.NOBLOCK, copy=False)``, leaner. ZeroMQ queues a
    multipart atomically: a full queue or an unroutable peer fails its first frame."""
    for f in frames[:-1]:
        _send_frame(sock, f, _MORE, copy=False)
    _send_frame(sock, frames[-1], _LAST, copy=False)


def _set(fut: asyncio.Future, value: bool) -> None:
    if not fut.done():
        fut.set_result(value)
