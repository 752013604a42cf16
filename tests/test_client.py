"""zpipe.Client pieces that need no cluster."""

from __future__ import annotations

import asyncio

import pytest

from zpipe.client import Client, ZpipeError
from zpipe.protocol import Message


async def test_a_cancel_is_not_swallowed_when_a_message_arrives_at_once() -> None:
    """asyncio.wait_for (before Python 3.12) returned the message instead of raising when the
    caller was cancelled as a message arrived; a cancelled generate then went on and never
    told the broker: the cause of a rare failure of the e2e cancel test."""
    client = Client("tcp://127.0.0.1:9")
    queue: asyncio.Queue = asyncio.Queue()
    task = asyncio.create_task(client._next(queue, 10))
    await asyncio.sleep(0)  # the task waits on the queue
    queue.put_nowait(Message("token", {"rid": "r"}))
    task.cancel()  # in the same turn of the loop as the message
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_next_returns_messages_and_raises_errors() -> None:
    client = Client("tcp://127.0.0.1:9")
    queue: asyncio.Queue = asyncio.Queue()
    queue.put_nowait(Message("token", {"rid": "r", "index": 0}))
    queue.put_nowait(Message("error", {"code": "bad_value", "message": "no"}))
    assert (await client._next(queue, 1))["index"] == 0
    with pytest.raises(ZpipeError, match="bad_value"):
        await client._next(queue, 1)
    with pytest.raises(ZpipeError, match="timeout"):
        await client._next(queue, 0)
