"""Per-client limits and clients that are gone: a real broker in-process on its real ROUTER
socket, a node and a client speaking the protocol by hand (as in test_broker_cohorts)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import zmq
from test_broker_cohorts import _close, _frames, _pump, _recv, _serving

from zpipe import protocol


def _generate(rid: str) -> list[zmq.Frame]:
    return _frames(protocol.encode("generate", rid=rid, prompt_ids=[5, 6], max_new_tokens=8))


async def _answer(client: zmq.Socket, rid: str) -> protocol.Message:
    while True:
        msg = await _recv(client)
        if msg.get("rid") == rid:
            return msg


def test_a_client_is_held_to_its_limits(tiny_model: Path) -> None:
    async def run() -> None:
        broker, node, client = await _serving(tiny_model)
        broker.cfg.limits.max_client_sessions = 3
        broker.cfg.limits.max_client_queued = 2
        try:
            for rid in ("r1", "r2"):
                await broker.handle(_generate(rid))
                assert (await _answer(client, rid)).kind == "accepted"
            await broker.handle(_generate("r3"))
            err = await _answer(client, "r3")
            assert (err.kind, err["code"]) == ("error", "client_busy")
            assert "2 sessions waiting for their first token" in err["message"]
            # the first two sessions' prefills answered: one step or two, as they were sent
            answered = 0
            while answered < 2:
                step = await _recv(node)
                rows = [[sid, 0, n] for sid, _, _, n in step["rows"]]
                node.send_multipart(protocol.encode(
                    "result", epoch=step["epoch"], stage=0, compute_s=0.001, rows=rows,
                    tokens=[[42, -0.1]] * len(rows)))
                answered += len(rows)
            await _pump(broker, lambda: all(s.tokens for s in broker.sessions.values()))
            await broker.handle(_generate("r3"))
            assert (await _answer(client, "r3")).kind == "accepted"
            await broker.handle(_generate("r4"))
            err = await _answer(client, "r4")
            assert (err.kind, err["code"]) == ("error", "client_busy")
            assert "3 sessions running, the limit per client is 3" in err["message"]
        finally:
            _close(broker, node, client)

    asyncio.run(run())


def test_the_sessions_of_a_client_gone_end(tiny_model: Path) -> None:
    """The broker cannot reach the client of a new session: it ends it and frees its KV."""
    async def run() -> None:
        broker, node, client = await _serving(tiny_model)
        try:
            frames = _generate("r1")
            frames[0] = zmq.Frame(b"nobody-here")
            await broker.handle(frames)
            await _pump(broker, lambda: not broker.sessions and not broker.losses)
            free = await _recv(node)
            assert free.kind == "free" and len(free["sids"]) == 1
            assert broker.metrics.sessions_finished["client_gone"] == 1
        finally:
            _close(broker, node, client)

    asyncio.run(run())
