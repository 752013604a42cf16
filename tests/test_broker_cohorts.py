"""The broker starts requests that arrive in one burst as one cohort: a real broker in-process,
its real ROUTER socket, and DEALER sockets speaking the protocol as a node and a client."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
import torch
import zmq
from conftest import free_port

from brokers.broker import Broker
from zpipe import aio, protocol
from zpipe.config import BrokerConfig


async def _recv(sock: zmq.Socket, timeout_s: float = 5.0) -> protocol.Message:
    for _ in range(int(timeout_s * 100)):
        try:
            return protocol.decode(sock.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:
            await asyncio.sleep(0.01)
    raise AssertionError("nothing received")


def _frames(frames: list) -> list[zmq.Frame]:
    """A client's message as the broker's ROUTER hands it over."""
    return [zmq.Frame(bytes(f)) for f in [b"client-1", *frames]]


async def _pump(broker: Broker, until, limit: int = 200) -> None:
    """Let the broker handle what reached its socket until ``until()`` holds."""
    for _ in range(limit):
        if until():
            return
        frames = await broker.sock.recv(timeout=0.05)
        if frames is not None:
            await broker.handle(frames)
    raise AssertionError("the broker never got there")


async def _serving(tiny_model: Path, **register) -> tuple[Broker, zmq.Socket, zmq.Socket]:
    """A broker on a real ROUTER socket with one node ("a", every layer) loaded and ready,
    and a client; the node's and client's DEALER sockets speak the protocol by hand."""
    broker, nodes, client = await _serving_stages(tiny_model, {"a": (0, 6)}, **register)
    return broker, nodes[0], client


async def _serving_stages(tiny_model: Path, stages: dict[str, tuple[int, int]],
                          recovery: dict | None = None,
                          **register) -> tuple[Broker, list[zmq.Socket], zmq.Socket]:
    """As ``_serving``, with one node per entry of ``stages`` (name: layers [start, end))."""
    addr = f"tcp://127.0.0.1:{free_port()}"
    # Shadows off unless asked for: these fake nodes send none, and most of these tests drive
    # the replay path (tests/test_shadows.py turns them on).
    recovery = {"shadow_every": 0, **(recovery or {})}
    broker = Broker(BrokerConfig(model=str(tiny_model), bind=addr, recovery=recovery,
                                 placement={"strategy": "custom", "stages": [
                                     {"node": n, "layers": f"{a}-{b - 1}"}
                                     for n, (a, b) in stages.items()]}))
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.bind(addr)
    broker.sock = aio.Socket(router)
    nodes = [ctx.socket(zmq.DEALER) for _ in stages]
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.IDENTITY, b"client-1")
    for s in (*nodes, client):
        s.setsockopt(zmq.LINGER, 0)
        s.connect(addr)
    await broker.place()
    for name, node in zip(stages, nodes, strict=True):
        node.send_multipart(protocol.encode("register", **{
            "name": name, "pid": os.getpid(), "host": "test", "device": "cpu",
            "dtype": "float32", "model": str(tiny_model), "num_layers": 6,
            "identity": broker.identity, "mem_total": 1 << 34, "mem_free": 1 << 33,
            "gflops": 10.0, **register}))
        await _pump(broker, lambda n=name: n in broker.registry.by_name)
    await _pump(broker, lambda: broker.placement is not None)
    for node in nodes:
        assert (await _recv(node)).kind == "welcome"
        load = await _recv(node)
        assert load.kind == "load"
        node.send_multipart(protocol.encode("loaded", epoch=load["epoch"], start=load["start"],
                                            end=load["end"], weight_bytes=1, load_s=0.1))
    await _pump(broker, lambda: broker.ready)
    return broker, nodes, client


def _close(broker: Broker, *socks: zmq.Socket) -> None:
    for s in socks:
        s.close(0)
    broker.sock.close()


def test_a_burst_of_requests_starts_as_one_cohort(tiny_model: Path) -> None:
    async def run() -> None:
        broker, node, client = await _serving(tiny_model)
        try:
            # Three requests handled back to back (one burst), a fourth cancelled in it.
            prompts = {"r1": [5, 6, 7], "r2": [8, 9], "r3": [10, 11, 12, 13], "r4": [14]}
            for rid, ids in prompts.items():
                await broker.handle(_frames(protocol.encode(
                    "generate", rid=rid, prompt_ids=ids, max_new_tokens=4)))
            await broker.handle(_frames(protocol.encode("cancel", rid="r4")))
            await asyncio.sleep(0)  # the loop turns: the burst's prefills go out
            free = await _recv(node)  # the cancelled session's (never started) cache
            assert free.kind == "free" and len(free["sids"]) == 1
            step = await _recv(node)
            assert free["sids"][0] not in [r[0] for r in step["rows"]]
            assert step.kind == "step" and step["stage"] == 0
            assert [r[3] for r in step["rows"]] == [3, 2, 4]
            assert step.tensors["x"].tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13]
            assert broker.metrics.steps_started == 1 and broker.metrics.step_rows == 3
            # The last (only) stage answers for all three: their next step is again one message.
            node.send_multipart(protocol.encode(
                "result", epoch=step["epoch"], stage=0, compute_s=0.001,
                rows=[[sid, 0, n] for sid, _, _, n in step["rows"]], tokens=[[42, -0.1]] * 3))
            await _pump(broker, lambda: broker.metrics.steps_started == 2)
            nxt = await _recv(node)
            assert [r[:3] for r in nxt["rows"]] == [[r[0], 1, r[3]] for r in step["rows"]]
            assert nxt.tensors["x"].tolist() == [42, 42, 42]
        finally:
            _close(broker, node, client)

    asyncio.run(run())


def test_cohorts_are_no_bigger_than_the_nodes_max_batch(tiny_model: Path) -> None:
    """A node that runs at most 2 rows a batch: a burst of 5 starts as cohorts of 2, 2 and 1,
    and their next steps go on as those cohorts."""
    async def run() -> None:
        broker, node, client = await _serving(tiny_model, max_batch=2)
        try:
            assert broker.registry.by_name["a"].max_batch == 2
            for i in range(5):
                await broker.handle(_frames(protocol.encode(
                    "generate", rid=f"r{i}", prompt_ids=[5 + i, 6], max_new_tokens=4)))
            await asyncio.sleep(0)
            steps = [await _recv(node) for _ in range(3)]
            assert [len(m["rows"]) for m in steps] == [2, 2, 1]
            assert [t for m in steps for t in m.tensors["x"].tolist()] == [
                v for i in range(5) for v in (5 + i, 6)]
            node.send_multipart(protocol.encode(
                "result", epoch=steps[1]["epoch"], stage=0, compute_s=0.001,
                rows=[[sid, 0, n] for sid, _, _, n in steps[1]["rows"]],
                tokens=[[42, -0.1]] * 2))
            await _pump(broker, lambda: broker.metrics.steps_started == 4)
            nxt = await _recv(node)
            assert [r[0] for r in nxt["rows"]] == [r[0] for r in steps[1]["rows"]]
        finally:
            _close(broker, node, client)

    asyncio.run(run())


def test_a_bad_max_batch_is_ignored(tiny_model: Path) -> None:
    async def run() -> None:
        broker, node, client = await _serving(tiny_model, max_batch=-3)
        try:
            assert broker.registry.by_name["a"].max_batch == 0
            assert broker.steps.cohort_cap() == broker.cfg.limits.max_batch  # the broker's own
        finally:
            _close(broker, node, client)

    asyncio.run(run())


async def _next(sock: zmq.Socket, kind: str) -> protocol.Message:
    for _ in range(20):
        msg = await _recv(sock)
        if msg.kind == kind:
            return msg
    raise AssertionError(f"no {kind!r} message")


def _hidden_result(step: protocol.Message, hidden: torch.Tensor, rows: list | None = None) -> list:
    rows = rows if rows is not None else [[sid, st, n] for sid, st, _, n in step["rows"]]
    return protocol.encode("result", {"hidden": hidden}, epoch=step["epoch"], stage=0,
                           compute_s=0.001, rows=rows)


def _tokens_result(step: protocol.Message, token: int = 42) -> list:
    return protocol.encode("result", epoch=step["epoch"], stage=1, compute_s=0.001,
                           rows=[[sid, st, n] for sid, st, _, n in step["rows"]],
                           tokens=[[token, -0.1]] * len(step["rows"]))


def test_a_cohort_goes_on_whole_and_drops_a_row_cancelled_mid_step(tiny_model: Path) -> None:
    """Two stages. A cohort's answers for exactly its rows go on untouched (one comparison,
    no check per row); a session cancelled while its cohort is at stage 0 is dropped from
    what goes to stage 1: its row of the hidden state is cut out, the others' go on."""
    async def run() -> None:
        broker, (a, b), client = await _serving_stages(tiny_model, {"a": (0, 3), "b": (3, 6)})
        hidden_size = broker.spec.hidden_size
        try:
            for rid, ids in {"r1": [5, 6, 7], "r2": [8, 9], "r3": [10]}.items():
                await broker.handle(_frames(protocol.encode(
                    "generate", rid=rid, prompt_ids=ids, max_new_tokens=4)))
            await asyncio.sleep(0)
            step = await _next(a, "step")
            sids = [r[0] for r in step["rows"]]
            cohort = broker.sessions[sids[0]].cohort
            assert [broker.sessions[s].cohort for s in sids] == [cohort] * 3
            hidden = torch.arange(6 * hidden_size, dtype=torch.float32).view(6, hidden_size)
            a.send_multipart(_hidden_result(step, hidden))
            await _pump(broker, lambda: cohort.stage == 1)
            on = await _next(b, "step")
            assert on["stage"] == 1 and on["rows"] == step["rows"]
            assert on["sampling"] == [{}, {}, {}]
            assert torch.equal(on.tensors["x"], hidden) and cohort.intact
            b.send_multipart(_tokens_result(on))
            await _pump(broker, lambda: broker.metrics.steps_started == 2)
            tokens = await _next(client, "tokens")
            # one entry per stage: the cohort's shared stage times are not repeated per row
            assert [[e[0] for e in it["timing"]["stages"]] for it in tokens["items"]] == [
                ["a", "b"]] * 3
            step = await _next(a, "step")  # step 1 of all three, one cohort again
            assert [r[:2] for r in step["rows"]] == [[s, 1] for s in sids]
            cohort = broker.sessions[sids[0]].cohort
            await broker.handle(_frames(protocol.encode("cancel", rid="r2")))
            assert not cohort.intact
            hidden = torch.arange(3 * hidden_size, dtype=torch.float32).view(3, hidden_size)
            a.send_multipart(_hidden_result(step, hidden))  # still answers the cancelled row
            await _pump(broker, lambda: broker.sessions[sids[0]].stage == 1)
            on = await _next(b, "step")
            assert [r[0] for r in on["rows"]] == [sids[0], sids[2]]
            assert torch.equal(on.tensors["x"], hidden[[0, 2]])
            b.send_multipart(_tokens_result(on))
            await _pump(broker, lambda: broker.metrics.steps_started == 3)
            step = await _next(a, "step")
            assert [r[0] for r in step["rows"]] == [sids[0], sids[2]]
            assert broker.sessions[sids[0]].cohort.intact
        finally:
            _close(broker, a, b, client)

    asyncio.run(run())


def test_an_altered_or_repeated_answer_is_not_taken_for_the_cohort(tiny_model: Path) -> None:
    """Rows that differ from the cohort's (here one row's step) are checked row by row: the
    rows not awaited are dropped, the others go on, and the cohort travels apart from then on.
    An answer repeated after its rows went on is dropped whole."""
    async def run() -> None:
        broker, (a, b), client = await _serving_stages(tiny_model, {"a": (0, 3), "b": (3, 6)})
        size = broker.spec.hidden_size
        hidden = torch.arange(3 * size, dtype=torch.float32).view(3, size)
        try:
            for rid, ids in {"r1": [5, 6], "r2": [8]}.items():
                await broker.handle(_frames(protocol.encode(
                    "generate", rid=rid, prompt_ids=ids, max_new_tokens=4)))
            await asyncio.sleep(0)
            step = await _next(a, "step")
            (s1, _, _, n1), (s2, _, _, n2) = step["rows"]
            cohort = broker.sessions[s1].cohort
            a.send_multipart(_hidden_result(step, hidden, [[s1, 1, n1], [s2, 0, n2]]))
            await _pump(broker, lambda: broker.sessions[s2].stage == 1)
            on = await _next(b, "step")
            assert [r[0] for r in on["rows"]] == [s2] and not cohort.intact
            assert torch.equal(on.tensors["x"], hidden[2:])
            a.send_multipart(_hidden_result(step, hidden))  # the true answer: s1 goes on
            await _pump(broker, lambda: broker.sessions[s1].stage == 1)
            on = await _next(b, "step")
            assert [r[0] for r in on["rows"]] == [s1]
            assert torch.equal(on.tensors["x"], hidden[:2])
            a.send_multipart(_hidden_result(step, hidden))  # and again: nobody awaits it
            for _ in range(5):
                frames = await broker.sock.recv(timeout=0.02)
                if frames is not None:
                    await broker.handle(frames)
            with pytest.raises(AssertionError):
                await _recv(b, timeout_s=0.2)
            assert set(broker.sessions) == {s1, s2}
        finally:
            _close(broker, a, b, client)

    asyncio.run(run())


async def _through(broker: Broker, a: zmq.Socket, b: zmq.Socket,
                   step: protocol.Message) -> None:
    """Answer a two-stage step as its nodes would: stage 0's hidden states, then tokens."""
    n = sum(r[3] for r in step["rows"])
    a.send_multipart(_hidden_result(step, torch.zeros(n, broker.spec.hidden_size)))
    sid = step["rows"][0][0]
    await _pump(broker, lambda: broker.sessions[sid].stage == 1)
    b.send_multipart(_tokens_result(await _next(b, "step")))


def test_on_one_gpu_a_cohort_waits_for_the_one_in_flight_and_they_go_on_as_one(
        tiny_model: Path) -> None:
    """Both stages on one GPU: cohorts there take turns, each reading every weight. A cohort
    whose step ends while another is in flight is held, and both start their next step as one
    cohort when that one's step ends; a cancel of the one in flight lets the held one go."""
    async def run() -> None:
        broker, (a, b), client = await _serving_stages(
            tiny_model, {"a": (0, 3), "b": (3, 6)}, device="cuda:0")
        try:
            assert broker.steps.one_gpu()
            steps = []
            for rid in ("r1", "r2"):  # two bursts: two cohorts
                await broker.handle(_frames(protocol.encode(
                    "generate", rid=rid, prompt_ids=[5, 6], max_new_tokens=8)))
                await asyncio.sleep(0)
                steps.append(await _next(a, "step"))
            s1, s2 = (st["rows"][0][0] for st in steps)
            await _through(broker, a, b, steps[0])
            await _pump(broker, lambda: broker.steps.held)
            assert [s.sid for s in broker.steps.held] == [s1]  # r2's prefill is still in flight
            await _through(broker, a, b, steps[1])
            await _pump(broker, lambda: not broker.steps.held)
            together = await _next(a, "step")
            assert [r[0] for r in together["rows"]] == [s1, s2]
            assert broker.metrics.steps_started == 3
            # r3's prefill goes at once; its next step waits for r1 and r2's step in flight,
            # and goes when r1 and r2 are cancelled instead.
            await broker.handle(_frames(protocol.encode(
                "generate", rid="r3", prompt_ids=[7, 8], max_new_tokens=8)))
            await asyncio.sleep(0)
            prefill = await _next(a, "step")
            s3 = prefill["rows"][0][0]
            await _through(broker, a, b, prefill)
            await _pump(broker, lambda: broker.steps.held)
            for rid in ("r1", "r2"):
                await broker.handle(_frames(protocol.encode("cancel", rid=rid)))
            assert not broker.steps.held
            alone = await _next(a, "step")
            assert [r[0] for r in alone["rows"]] == [s3]
        finally:
            _close(broker, a, b, client)

    asyncio.run(run())


def test_stages_on_different_devices_keep_their_cohorts_apart(tiny_model: Path) -> None:
    """Stages on CPUs (or on GPUs of their own) work on different cohorts at once: a cohort's
    next step starts as soon as its step ends."""
    async def run() -> None:
        broker, (a, b), client = await _serving_stages(tiny_model, {"a": (0, 3), "b": (3, 6)})
        try:
            assert not broker.steps.one_gpu()
            steps = []
            for rid in ("r1", "r2"):
                await broker.handle(_frames(protocol.encode(
                    "generate", rid=rid, prompt_ids=[5, 6], max_new_tokens=8)))
                await asyncio.sleep(0)
                steps.append(await _next(a, "step"))
            await _through(broker, a, b, steps[0])
            await _pump(broker, lambda: broker.metrics.steps_started == 3)
            nxt = await _next(a, "step")
            assert [r[0] for r in nxt["rows"]] == [steps[0]["rows"][0][0]]
            assert not broker.steps.held
        finally:
            _close(broker, a, b, client)

    asyncio.run(run())


def test_sessions_replay_their_tokens_after_the_placement_is_lost(tiny_model: Path) -> None:
    """The node's KV is lost mid-generation: the session waits, and once a placement is ready
    again its steps feed the prompt and then its known tokens one by one (nothing goes to the
    client, a token that comes out differently is counted), then it goes on as before."""
    async def run() -> None:
        broker, node, client = await _serving(tiny_model)
        try:
            await broker.handle(_frames(protocol.encode(
                "generate", rid="r1", prompt_ids=[5, 6, 7], max_new_tokens=5)))
            await asyncio.sleep(0)
            await _pump(broker, lambda: len(broker.sessions) == 1)
            (s,) = broker.sessions.values()
            for token in (42, 43):
                step = await _next(node, "step")
                node.send_multipart(protocol.encode(
                    "result", epoch=step["epoch"], stage=0, compute_s=0.001,
                    rows=[[sid, st, n] for sid, st, _, n in step["rows"]],
                    tokens=[[token, -0.1]]))
                await _pump(broker, lambda t=token: t in s.tokens)
            await _next(node, "step")  # step 2, feeding 43: lost with the node's KV
            await broker.recovery.lose_placement("node a is dead (a test)", "node_dead")
            assert broker.steps.parked == [s] and (s.step, s.pos, s.in_flight) == (0, 0, False)
            assert broker.waiting_for == "node a is dead (a test); 1 session waits to go on"
            free = await _next(node, "free")  # its KV at the nodes still alive: of no use now
            assert free["sids"] == [s.sid]
            await broker.place()
            load = await _next(node, "load")
            node.send_multipart(protocol.encode("loaded", epoch=load["epoch"], start=0, end=6,
                                                weight_bytes=1, load_s=0.1))
            await _pump(broker, lambda: broker.ready)
            # An earlier placement's step, refused late (it was passing node to node): dropped.
            node.send_multipart(protocol.error("stale_epoch", "a: step for epoch 1, node is at 2",
                                               sid=s.sid, step=0, epoch=load["epoch"] - 1))
            await _pump(broker, lambda: broker.metrics.steps_started >= 4)
            await asyncio.sleep(0.05)
            frames = await broker.sock.recv(timeout=0.5)
            if frames is not None:
                await broker.handle(frames)
            assert s.sid in broker.sessions
            sent: list = []
            for answer in (99, 43, 44):  # the replayed prefill picks 99 this time, not 42
                step = await _next(node, "step")
                assert step["epoch"] == load["epoch"]
                sent.append((step["rows"][0][1:], step.tensors["x"].tolist()))
                node.send_multipart(protocol.encode(
                    "result", epoch=step["epoch"], stage=0, compute_s=0.001,
                    rows=[[sid, st, n] for sid, st, _, n in step["rows"]],
                    tokens=[[answer, -0.1]]))
                await _pump(broker, lambda: s.step >= len(sent))
            assert sent == [([0, 0, 3], [5, 6, 7]), ([1, 3, 1], [42]), ([2, 4, 1], [43])]
            assert s.tokens == [42, 43, 44] and s.replay_diff == 1 and s.replayed == 2
            (record,) = broker.mover.history  # shown by admin status
            assert record["reason"] == "recovery: node a is dead (a test)" and record["ok"]
            assert (record["sessions"], record["replay_tokens"]) == (1, 2)
            assert record["before"] == record["after"] and record["epoch_after"] == load["epoch"]
            items = []
            while len(items) < 3:
                msg = await _next(client, "tokens")
                items += msg["items"]
            assert [(i["index"], i["token_id"]) for i in items] == [(0, 42), (1, 43), (2, 44)]
        finally:
            _close(broker, node, client)

    asyncio.run(run())


@pytest.mark.parametrize("back_in_time", [True, False])
def test_a_lost_node_keeps_its_layers_if_it_is_back_within_wait_s(tiny_model: Path,
                                                                 back_in_time: bool) -> None:
    """Node b is declared dead. Registering again within ``recovery.wait_s`` it gets its layers
    back (a hiccup); otherwise, after the wait, node a takes every layer."""
    async def run() -> None:
        broker, (a, b), client = await _serving_stages(
            tiny_model, {"a": (0, 3), "b": (3, 6)}, recovery={"wait_s": 0.5})
        try:
            t0 = time.monotonic()
            await broker.declare_dead(broker.registry.by_name["b"], 1.0)
            assert broker.placement is None and "waiting for node(s) b" in broker.waiting_for
            if back_in_time:
                b.send_multipart(protocol.encode("register", **{
                    "name": "b", "pid": os.getpid(), "host": "test", "device": "cpu",
                    "dtype": "float32", "model": str(tiny_model), "num_layers": 6,
                    "identity": broker.identity, "mem_total": 1 << 34, "mem_free": 1 << 33,
                    "gflops": 10.0}))
                await _pump(broker, lambda: broker.placement is not None)
                assert [(st.node, st.start, st.end) for st in broker.placement.stages] == [
                    ("a", 0, 3), ("b", 3, 6)]
            else:
                for _ in range(3000):  # the broker's own task places over the survivors
                    if broker.placement is not None:
                        break
                    await asyncio.sleep(0.01)
                assert time.monotonic() - t0 >= 0.5 - 0.01  # not before wait_s: b could be back
                assert [(st.node, st.start, st.end) for st in broker.placement.stages] == [
                    ("a", 0, 6)]
        finally:
            _close(broker, a, b, client)

    asyncio.run(run())


@pytest.mark.parametrize("ending", ["answer", "cancel"])
def test_quiesce_returns_when_the_last_step_in_flight_ends(tiny_model: Path, ending: str) -> None:
    """A move's quiesce waits while a step is in flight and returns once it ends (its answer,
    or its session's end); a session that goes on waits at the token boundary until resume."""
    async def run() -> None:
        broker, node, client = await _serving(tiny_model)
        try:
            await broker.handle(_frames(protocol.encode(
                "generate", rid="r1", prompt_ids=[5, 6, 7], max_new_tokens=5)))
            step = await _next(node, "step")
            (s,) = broker.sessions.values()
            quiet = asyncio.create_task(broker.steps.quiesce())
            await asyncio.sleep(0)
            assert not quiet.done() and s.in_flight
            if ending == "answer":
                node.send_multipart(protocol.encode(
                    "result", epoch=step["epoch"], stage=0, compute_s=0.001,
                    rows=[[sid, st, n] for sid, st, _, n in step["rows"]], tokens=[[42, -0.1]]))
                await _pump(broker, quiet.done)
                assert broker.steps.parked == [s] and s.tokens == [42]
                await broker.steps.resume()
                assert not broker.steps.parked
                nxt = await _next(node, "step")
                assert nxt["rows"][0][:2] == [s.sid, 1] and nxt.tensors["x"].tolist() == [42]
            else:
                await broker.handle(_frames(protocol.encode("cancel", rid="r1")))
                await _pump(broker, quiet.done)
                assert not broker.sessions and not broker.steps.parked
            await quiet
        finally:
            _close(broker, node, client)

    asyncio.run(run())
