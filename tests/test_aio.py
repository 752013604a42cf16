"""zpipe.aio.Socket: the broker's and nodes' asyncio face for ZeroMQ sockets."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest
import zmq

from zpipe import aio


@pytest.fixture()
def pair():
    """A connected plain ROUTER and DEALER (identity b"d") on their own context; closed after."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("inproc://pair")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.IDENTITY, b"d")
    dealer.connect("inproc://pair")
    yield router, dealer
    router.close(0)
    dealer.close(0)
    ctx.term()


async def _ping_pong(router: aio.Socket, dealer: aio.Socket, n: int) -> None:
    """n round trips, the router echoing each message back; every one must arrive."""
    async def echo() -> None:
        for _ in range(n):
            frames = await router.recv(5)
            assert frames is not None
            router.send([frames[0].bytes, *frames[1:]])

    task = asyncio.create_task(echo())
    for i in range(n):
        dealer.send([str(i).encode()])
        frames = await dealer.recv(5)
        assert frames is not None and frames[0].bytes == str(i).encode()
    await task


async def test_ping_pong_loses_no_wakeup(pair) -> None:
    r, d = pair
    router, dealer = aio.Socket(r), aio.Socket(d)
    await _ping_pong(router, dealer, 500)
    router.close()  # its FD leaves the loop; the fixture closes what is left
    dealer.close()


async def test_recv_times_out_with_none(pair) -> None:
    r, d = pair
    router = aio.Socket(r)
    t0 = time.monotonic()
    assert await router.recv(0.05) is None
    assert 0.04 < time.monotonic() - t0 < 1.0
    router.close()


async def test_message_waiting_before_recv_and_burst(pair) -> None:
    r, d = pair
    router = aio.Socket(r)
    for i in range(100):
        d.send(str(i).encode())
    got = []
    for _ in range(100):
        frames = await router.recv(5)
        assert frames is not None
        got.append(int(frames[1].bytes))
    assert got == list(range(100))
    router.close()


async def test_send_from_another_task_while_waiting(pair) -> None:
    """A send can consume the FD's edge; the waiting recv must still wake up."""
    r, d = pair
    dealer = aio.Socket(d)

    async def peer() -> None:  # the other side answers each message at once, blocking-style
        for _ in range(50):
            while not r.poll(0):
                await asyncio.sleep(0)
            ident, body = r.recv_multipart()
            r.send_multipart([ident, body])

    peer_task = asyncio.create_task(peer())
    for i in range(50):
        waiting = asyncio.create_task(dealer.recv(5))
        await asyncio.sleep(0)  # the receiver waits first
        dealer.send([str(i).encode()])  # ... then this task sends
        frames = await waiting
        assert frames is not None and frames[0].bytes == str(i).encode()
    await peer_task
    dealer.close()


async def test_close_wakes_the_waiter_and_send_after_close_fails(pair) -> None:
    r, d = pair
    router = aio.Socket(r)
    waiting = asyncio.create_task(router.recv())
    await asyncio.sleep(0.01)
    router.close()
    assert await asyncio.wait_for(waiting, 1) is None
    with pytest.raises(zmq.ZMQError):
        await router.recv()


async def test_busy_poll_delivers_keeps_other_tasks_running_and_times_out(pair) -> None:
    r, d = pair
    router, dealer = aio.Socket(r, busy_poll_s=0.05), aio.Socket(d, busy_poll_s=0.05)
    ticks = 0

    async def ticker() -> None:  # other tasks keep running while a recv polls
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    other = asyncio.create_task(ticker())
    await _ping_pong(router, dealer, 200)
    t0 = time.monotonic()
    assert await router.recv(0.02) is None  # a timeout shorter than the polling window
    assert await router.recv(0.12) is None  # and a longer one: polls, then sleeps
    assert 0.12 < time.monotonic() - t0 < 1.0
    assert ticks > 20
    other.cancel()
    router.close()
    dealer.close()


async def test_busy_poll_turned_off_mid_poll_sleeps_in_the_poller(pair) -> None:
    """A node sets ``busy_poll_s`` to 0 while its compute thread runs (a turning loop holds
    the GIL that thread needs): a recv already polling stops and waits in the poller, and
    still gets the next message."""
    r, d = pair
    router, dealer = aio.Socket(r, busy_poll_s=60.0), aio.Socket(d)
    got = asyncio.create_task(router.recv(30))
    for _ in range(5):
        await asyncio.sleep(0)
    assert router.waiter is None  # polling: turning the loop, no future to wait on
    router.busy_poll_s = 0.0
    for _ in range(50):
        if router.waiter is not None:
            break
        await asyncio.sleep(0.001)
    assert router.waiter is not None and not got.done()  # asleep in the poller
    dealer.send([b"hi"])
    frames = await asyncio.wait_for(got, 5)
    assert frames is not None and frames[-1].bytes == b"hi"
    router.close()
    dealer.close()


def test_pin_binds_the_calling_thread_and_the_io_thread() -> None:
    """In a thread of its own (pinning the test's thread would pin everything after it); the
    context's I/O thread, started by its first socket, is found by name in /proc."""
    cpu = max(os.sched_getaffinity(0))
    seen: dict = {}

    def io_threads() -> dict[int, set[int]]:
        found = {}
        for task in Path("/proc/self/task").iterdir():
            try:  # another test's thread may end meanwhile
                if (task / "comm").read_text().startswith("ZMQbg/IO"):
                    found[int(task.name)] = os.sched_getaffinity(int(task.name))
            except (FileNotFoundError, ProcessLookupError):
                pass
        return found

    def body() -> None:
        before = set(io_threads())
        ctx = zmq.Context()
        try:
            aio.pin(ctx, cpu)
            seen["thread"] = os.sched_getaffinity(0)
            sock = ctx.socket(zmq.PAIR)  # starts the I/O thread, which names itself soon after
            for _ in range(200):
                seen["io"] = [a for tid, a in io_threads().items() if tid not in before]
                if seen["io"]:
                    break
                time.sleep(0.01)
            sock.close(0)
            try:
                aio.pin(ctx, 4095)
            except ValueError as e:
                seen["error"] = str(e)
        finally:
            ctx.term()

    t = threading.Thread(target=body)
    t.start()
    t.join(10)
    assert seen["thread"] == {cpu}
    assert seen["io"] == [{cpu}]
    assert "cannot pin to CPU 4095" in seen["error"]
