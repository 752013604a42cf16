"""Property-based fuzzing (Hypothesis) of what zpipe takes from the network.

- ``protocol.decode`` on random multiparts (random tags, msgpack headers with random kinds,
  fields and types, random tensor specs, frame counts and sizes, truncated and oversized
  buffers): it returns a ``Message`` whose tensors can be read, or raises ``ProtocolError``.
- The broker's ``Broker.handle`` and a node's ``Node.dispatch`` / ``Node.run_batch`` on random
  sequences of messages (kinds out of order, random fields, sessions that do not exist, steps
  at random positions and epochs): nothing escapes but the protocol's error replies, every
  example ends within a bound, and afterwards the broker and the node still give
  transformers' greedy tokens.

The budget is fixed and the examples derandomized: every run (CI's too) tries the same cases.
A case that once broke something stays as an ``@example``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from pathlib import Path

import msgpack
import pytest
import torch
import zmq
from conftest import free_port
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_broker_cohorts import _close, _frames, _pump, _recv, _serving

from bench.common import greedy_reference
from brokers.broker import Broker
from nodes.node import Node
from zpipe import protocol
from zpipe.client import Client
from zpipe.config import BrokerConfig, NodeConfig
from zpipe.protocol import SCHEMAS, TAG, Message, ProtocolError

VOCAB, HIDDEN, LAYERS = 512, 64, 6  # the tiny model's (conftest.tiny_model)
EXAMPLE_S = 20.0  # the most one example may take, however loaded the machine
NEW_TOKENS = 8

# The budget: about 15 s in all on 2 idle cores, a minute at load 10 (docs/protocol.md).
DECODE_EXAMPLES, BROKER_EXAMPLES, NODE_EXAMPLES = 500, 250, 200
FUZZ = {"derandomize": True, "database": None, "deadline": None,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}

# ------------------------------------------------------------------ strategies

SIDS = ["s0", "s1", "s2"]
small = st.integers(-2, 9)
ints = st.one_of(small, small, st.integers(-(1 << 63), (1 << 64) - 1))
nums = st.one_of(ints, st.floats(-2, 4), st.floats())
texts = st.one_of(st.sampled_from([*SIDS, "", "a", "r1"]), st.text(max_size=10))
leaf = st.one_of(st.none(), st.booleans(), ints, st.floats(), st.text(max_size=8),
                 st.binary(max_size=8))
anything = st.recursive(leaf, lambda c: st.one_of(
    st.lists(c, max_size=4), st.dictionaries(st.text(max_size=6), c, max_size=4)), max_leaves=12)
sids = st.one_of(st.sampled_from(SIDS), texts)
rows4 = st.lists(st.tuples(sids, st.integers(0, 4), st.one_of(st.just(0), small),
                          st.one_of(st.integers(1, 4), small)).map(list),
                 min_size=1, max_size=3)
rows3 = st.lists(st.tuples(sids, small, st.integers(0, 5)).map(list), min_size=1, max_size=3)
sampling = st.one_of(st.just({}), st.fixed_dictionaries({}, optional={
    "temperature": nums, "top_k": ints, "top_p": nums, "seed": ints, "greedy": anything}))
# Loopback or nowhere only: a route is where a node sends hidden states.
routes = st.lists(st.sampled_from(["tcp://127.0.0.1:9", "ipc:///nonexistent/zpipe-fuzz",
                                   "tcp://[bad", "", "udp://x:1"]), max_size=3)

# Fields whose shape matters to the handlers get values near the legitimate ones (by name,
# where the schema's type is the one given here).
NEAR = {
    "rows": ("list", rows4),  # a step's; a result's are rows3 (``messages``)
    "sids": ("list", st.lists(sids, max_size=4)),
    "sessions": ("list", st.lists(st.tuples(sids, small).map(list), max_size=3)),
    "route": ("list", routes),
    "sampling": ("list", st.lists(sampling, max_size=3)),
    "prompt_ids": ("list", st.lists(st.integers(-1, VOCAB + 1), max_size=6)),
    "stop_token_ids": ("list", st.lists(ints, max_size=3)),
    "tokens": ("list", st.lists(st.tuples(st.integers(-1, VOCAB + 1), nums).map(list),
                                max_size=3)),
    "times": ("list", st.lists(st.tuples(texts, nums).map(list), max_size=3)),
    "messages": ("list", st.lists(st.fixed_dictionaries({"role": texts, "content": texts}),
                                  max_size=2)),
    "epoch": ("int", st.sampled_from([1, 1, 1, 1, 1, 2, 0, -1, 1 << 40])),
    "stage": ("int", st.sampled_from([0, 0, 0, 0, 1, -1, 1 << 40])),
    "start": ("int", st.integers(-1, LAYERS + 1)),
    "end": ("int", st.integers(-1, LAYERS + 1)),
    "length": ("int", st.one_of(st.integers(0, 12), ints)),
    "max_new_tokens": ("int", st.integers(-1, 6)),
    "factor": ("num", st.one_of(st.floats(-1, 4), small)),  # a node's slow-down: kept short
    # admin ops that change the cluster on purpose (move, drain, rebalance, slow) are left
    # out: whom to allow them is the keys' job, and a drained node serves no generation
    "op": ("str", st.sampled_from(["status", "nodes", "sessions", "metrics", "profile", "plan",
                                   "nope"])),
}
BY_TYPE = {"int": ints, "num": nums, "str": texts, "bool": st.booleans(),
           "list": st.lists(anything, max_size=4), "dict": st.dictionaries(texts, anything,
                                                                          max_size=3)}


@st.composite
def tensors(draw: st.DrawFn, clean: bool = False) -> tuple[list, list[bytes]]:
    """A header's ``t`` and the tensor frames: right sizes mostly, sometimes off or random."""
    meta, frames = [], []
    for i in range(draw(st.integers(0, 1 if clean else 3))):
        name = draw(st.sampled_from(["x", "hidden", "k.0", f"t{i}", *([] if clean else [""])]))
        dtype = draw(st.sampled_from([*protocol.DTYPES, *([] if clean else ["float64", 7])]))
        shape = draw(st.lists(st.integers(0, 9), max_size=3)) if clean else draw(st.one_of(
            st.lists(st.integers(0, 9), max_size=3),
            st.lists(st.integers(-1, 1 << 40), max_size=9), anything))
        size = 0
        if isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape):
            size = math.prod(shape) * (protocol.DTYPES[dtype].itemsize
                                       if dtype in protocol.DTYPES else 4)
        if size > 4096 or (not clean and draw(st.integers(0, 9)) == 0):
            size = draw(st.integers(0, 64))
        meta.append(draw(anything) if not clean and draw(st.integers(0, 9)) == 0
                    else [name, dtype, shape])
        frames.append(bytes(draw(st.binary(min_size=min(size, 8), max_size=8)).ljust(size, b"\1")))
    if not clean and draw(st.integers(0, 9)) == 0:  # a frame more or less than described
        frames = frames[:-1] if frames and draw(st.booleans()) else [*frames, b"\0" * 4]
    return meta, frames


def step_tensor(draw: st.DrawFn, header: dict) -> tuple[list, list[bytes]]:
    """A step's ``x`` that matches its rows: token ids (stage 0) or hidden states."""
    rows = header.get("rows")
    n = sum(r[-1] for r in rows if isinstance(r, list) and r and type(r[-1]) is int) \
        if isinstance(rows, list) else 1
    n = n if 1 <= n <= 32 else draw(st.integers(1, 4))
    if draw(st.booleans()):
        x = torch.tensor(draw(st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n)))
    else:
        x = torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(n))
    return [["x", protocol.DTYPE_NAMES[x.dtype], list(x.shape)]], [x.numpy().tobytes()]


@st.composite
def messages(draw: st.DrawFn, kinds: list[str]) -> list[bytes]:
    """One multipart: a kind from ``kinds`` (now and then any kind, or none), its fields
    present or not, of the right type or not, values near the legitimate ones."""
    clean = draw(st.booleans())  # every field there and of its type (values still random)
    die = draw(st.integers(0, 19))
    kind = draw(st.sampled_from(kinds)) if die > 1 else draw(
        st.one_of(st.sampled_from(sorted(SCHEMAS)), anything))
    header: dict = {"kind": kind}
    for field, typ in SCHEMAS.get(kind, {}).items() if isinstance(kind, str) else ():
        name = field.rstrip("?")
        if (not clean and draw(st.integers(0, 9)) == 0) or (field.endswith("?")
                                                              and draw(st.booleans())):
            continue
        near = ("list", rows3) if (kind, name) == ("result", "rows") else NEAR.get(name)
        good = near[1] if near is not None and near[0] == typ else BY_TYPE[typ]
        header[name] = draw(good) if clean or draw(st.integers(0, 9)) else draw(anything)
    if not clean and draw(st.integers(0, 14)) == 0:
        header[draw(st.text(max_size=6))] = draw(anything)
    meta, frames = step_tensor(draw, header) if kind == "step" and draw(st.integers(0, 3)) \
        else draw(tensors(clean))
    header["t"] = meta
    try:
        packed = msgpack.packb(header, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):  # an int beyond 64 bits, a bad key
        packed = msgpack.packb({"kind": "ping"})
    return [TAG, packed, *frames]


@st.composite
def session_steps(draw: st.DrawFn) -> list[list]:
    """Steps of up to three sessions as the broker sends them to a node holding every layer
    at epoch 1 (a prefill, then one token at a time; several sessions in one message), then
    maybe reordered: steps out of order, before their prefill, after a free."""
    out, pos, count = [], {}, {}
    for _ in range(draw(st.integers(1, 5))):
        group = draw(st.lists(st.sampled_from(SIDS), min_size=1, max_size=3, unique=True))
        rows, ids = [], []
        for sid in group:
            n = 1 if sid in pos else draw(st.integers(1, 4))
            rows.append([sid, count.get(sid, 0), pos.get(sid, 0), n])
            ids += draw(st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n))
            pos[sid], count[sid] = pos.get(sid, 0) + n, count.get(sid, 0) + 1
        fields = {"sampling": [draw(sampling) for _ in rows]} if draw(st.booleans()) else {}
        out.append(protocol.encode("step", {"x": torch.tensor(ids)}, epoch=1, stage=0,
                                   rows=rows, **fields))
    if draw(st.booleans()):
        out.insert(draw(st.integers(0, len(out))), protocol.encode(
            "free", sids=draw(st.lists(st.sampled_from(SIDS), max_size=2))))
    return draw(st.permutations(out)) if draw(st.booleans()) else out


@st.composite
def client_requests(draw: st.DrawFn) -> list:
    """A client's requests as the client library sends them: generations (some cancelled,
    some with a request id already running), info, pings and admin reads."""
    rid = draw(st.sampled_from(["r1", "r2", "r3"]))
    how = draw(st.sampled_from(["prompt_ids", "prompt", "messages"]))
    prompt = {"prompt_ids": draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6)),
              "prompt": draw(st.text(min_size=1, max_size=20)),
              "messages": [{"role": "user", "content": draw(st.text(max_size=20))}]}[how]
    extra = draw(st.fixed_dictionaries({}, optional={
        "sampling": sampling, "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=2),
        "ignore_eos": st.booleans()}))
    out = [protocol.encode("generate", rid=rid, max_new_tokens=draw(st.integers(1, 6)),
                           **{how: prompt}, **extra)]
    for _ in range(draw(st.integers(0, 2))):
        out.append(draw(st.sampled_from([
            protocol.encode("cancel", rid=rid), protocol.encode("info", rid=rid),
            protocol.encode("ping"), protocol.encode("admin", rid=rid, op="sessions"),
            protocol.encode("admin", rid=rid, op="metrics")])))
    return out


@st.composite
def mangled(draw: st.DrawFn) -> list:
    """A multipart as anyone on the network may send one: a message, then maybe broken."""
    frames = draw(messages(sorted(SCHEMAS)))
    how = draw(st.integers(0, 11))  # 0-5: as it is
    if how == 6:
        frames[0] = draw(st.one_of(st.binary(max_size=10), st.just(b"ZPIPE/2")))
    elif how == 7:
        frames[1] = frames[1][:draw(st.integers(0, len(frames[1])))]  # truncated header
    elif how == 8:
        frames[1] = draw(st.binary(max_size=40))
    elif how == 9:
        frames = frames[:draw(st.integers(0, 2))]
    elif how == 10:
        frames[1] = frames[1] + b"\0" * draw(st.sampled_from([1, protocol.MAX_HEADER_BYTES]))
    elif how == 11 and len(frames) > 2:  # a tensor frame truncated or grown
        i = draw(st.integers(2, len(frames) - 1))
        frames[i] = frames[i][:-1] if frames[i] and draw(st.booleans()) else frames[i] + b"\0"
    return frames if draw(st.booleans()) else [zmq.Frame(f) for f in frames]


# ------------------------------------------------------------------ decode


@settings(max_examples=DECODE_EXAMPLES, **FUZZ)
@given(mangled())
@example([TAG, msgpack.packb({"kind": "step", "epoch": 0, "stage": 0, "rows": [],
                              "t": [["x", "int64", [1 << 30, 1 << 30]]]}), b""])
@example([TAG, msgpack.packb({"kind": "ping", "t": [["x", "uint8", [0, 1 << 40]]]}), b""])
@example([TAG, b"\x91" * 100_000])  # nested arrays, deeper than any stack
def test_decode_returns_a_message_or_raises_protocol_error(frames: list) -> None:
    try:
        msg = protocol.decode(frames)
    except ProtocolError as e:
        assert e.code and str(e)
        return
    assert isinstance(msg, Message) and msg.kind in SCHEMAS
    for (name, dtype, shape), t in zip(msg.specs, msg.tensors.values(), strict=True):
        assert t.dtype == dtype and list(t.shape) == shape, name


# ------------------------------------------------------------------ broker and node



class Escaped(logging.Handler):
    """Log records with a traceback: an exception a handler caught only as a last resort."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


@pytest.fixture
def escaped():
    handler = Escaped()
    root = logging.getLogger("zpipe")
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)


def test_broker_handles_random_messages_and_still_serves(tiny_model: Path, escaped) -> None:
    """A real broker and a real node (in-process, real sockets): random messages from a
    client and from the node's identity go to ``Broker.handle`` between real generations."""
    prompt = [5, 6, 7, 8]
    want = greedy_reference(tiny_model, prompt, NEW_TOKENS)
    addr = f"tcp://127.0.0.1:{free_port()}"
    loop = asyncio.new_event_loop()
    broker = Broker(BrokerConfig(model=str(tiny_model), bind=addr))
    node = Node(NodeConfig(name="a", broker=addr, model=str(tiny_model), threads=1))
    tasks = [loop.create_task(broker.run()), loop.create_task(node.run())]

    async def ready() -> None:
        deadline = time.monotonic() + 120
        while not broker.ready:
            assert time.monotonic() < deadline, broker.waiting_for
            assert not any(t.done() for t in tasks), [t.result() for t in tasks if t.done()]
            await asyncio.sleep(0.05)

    async def greedy() -> list[int]:
        async with Client(addr, timeout=60) as client:
            gen = await client.generate(prompt_ids=prompt, max_new_tokens=NEW_TOKENS)
        return gen.token_ids

    kinds = sorted(SCHEMAS)
    sockets: list[zmq.Socket] = []
    try:
        loop.run_until_complete(ready())
        assert loop.run_until_complete(greedy()) == want
        ident = broker.registry.by_name["a"].ident
        handled: list = []
        replies: list[Message] = []
        client = zmq.Context.instance().socket(zmq.DEALER)  # the fuzzing client's replies
        sockets.append(client)
        client.setsockopt(zmq.IDENTITY, b"fuzz-client")
        client.setsockopt(zmq.LINGER, 0)
        client.connect(addr)

        async def hello() -> None:  # until the broker's ROUTER knows the client: a pong back
            client.send_multipart(protocol.encode("ping", rid="hello"))
            deadline = time.monotonic() + 60
            while not client.poll(0):
                assert time.monotonic() < deadline, "no pong"
                await asyncio.sleep(0.01)
            assert protocol.decode(client.recv_multipart()).kind == "pong"

        loop.run_until_complete(hello())

        def answers() -> list[Message]:
            got = []
            while client.poll(0):
                got.append(protocol.decode(client.recv_multipart()))
                if got[-1].kind == "tokens":
                    protocol.token_items(got[-1])  # what the client checks: must pass
            return got

        # The node's answer or error about a live session, at a step it may not be at. Drawn
        # whether or not a session is live (the draws must not depend on the broker's state).
        forgery = st.tuples(st.integers(0, 3), st.integers(0, 7), st.integers(-1, 8),
                            st.booleans(), texts, st.sampled_from([0, 0, 1]),
                            st.integers(-1, VOCAB), nums)

        def forged(f: tuple) -> list | None:
            _, i, step, as_error, code, stage, token, logprob = f
            live = sorted(broker.sessions)
            if not live:
                return None
            sid = live[i % len(live)]
            epoch = broker.placement.epoch if broker.placement else 1
            if as_error:
                return protocol.encode("error", code=code, message="fuzz", sid=sid, step=step,
                                       epoch=epoch)
            return protocol.encode("result", epoch=epoch, stage=stage, compute_s=0.001,
                                   rows=[[sid, step, 1]], tokens=[[token, logprob]])

        @settings(max_examples=BROKER_EXAMPLES, **FUZZ)
        @given(st.lists(st.one_of(st.tuples(st.booleans(), messages(kinds)).map(lambda m: [m]),
                                  client_requests().map(lambda ms: [(False, m) for m in ms])),
                        min_size=1, max_size=5).map(lambda parts: sum(parts, [])),
               st.lists(forgery, min_size=30, max_size=30))
        @example(batch=[(False, protocol.encode("generate", rid="r1", prompt_ids=[5, 6],
                                                max_new_tokens=4)),
                        (False, protocol.encode("ping"))],
                 forgeries=[(1, 0, 0, False, "", 0, 42, 0.0),
                            (0, 0, 0, False, "", 0, 42, math.nan)] * 15)
        def fuzz(batch: list[tuple[bool, list[bytes]]], forgeries: list[tuple]) -> None:
            async def one() -> None:
                for (as_node, frames), f in zip(batch, forgeries * 2, strict=False):
                    if f[0] == 0 and (forgery := forged(f)) is not None:
                        as_node, frames = True, forgery
                    sender = ident if as_node else b"fuzz-client"
                    await broker.handle([zmq.Frame(sender),
                                         *[zmq.Frame(bytes(f)) for f in frames]])
                    handled.append(frames)
                    await asyncio.sleep(0)  # tasks the messages started run too
            loop.run_until_complete(asyncio.wait_for(one(), EXAMPLE_S))
            replies.extend(answers())
            assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
            assert escaped.records == [], escaped.records[0].getMessage()

        fuzz()
        kinds = Counter(m["code"] if m.kind == "error" else m.kind for m in replies)
        print(f"broker: {len(handled)} messages handled; replies: {dict(kinds)}")
        loop.run_until_complete(ready())
        assert loop.run_until_complete(greedy()) == want
    finally:
        for sock in sockets:
            sock.close(0)
        for t in tasks:
            t.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.close()


@pytest.mark.parametrize("logprob", [math.nan, math.inf])
def test_a_non_finite_logprob_fails_its_session_not_the_clients_message(
        tiny_model: Path, logprob: float) -> None:
    """Found by the fuzzer: the broker passed a node's NaN logprob on to the client, whose
    check then dropped the whole tokens message (every session's token in it)."""
    async def run() -> None:
        broker, node, client = await _serving(tiny_model)
        try:
            await broker.handle(_frames(protocol.encode(
                "generate", rid="r1", prompt_ids=[5, 6], max_new_tokens=4)))
            await asyncio.sleep(0)
            step = await _recv(node)
            assert step.kind == "step"
            node.send_multipart(protocol.encode(
                "result", epoch=step["epoch"], stage=0, compute_s=0.001,
                rows=[[r[0], 0, r[3]] for r in step["rows"]], tokens=[[42, logprob]]))
            replies = []
            while not replies or replies[-1].kind not in ("error", "done"):
                await _pump(broker, lambda: client.poll(0))
                replies.append(protocol.decode(client.recv_multipart()))
            assert [m.kind for m in replies] == ["accepted", "error"]
            assert replies[-1]["code"] == "bad_result" and not broker.sessions
        finally:
            _close(broker, node, client)

    asyncio.run(run())


# What a node takes from the broker (and, under direct routing, steps from other nodes).
NODE_KINDS = ["step"] * 8 + ["free", "load", "restore", "shadow", "profile", "prepare",
              "kv_export", "kv_import", "commit", "abort", "set_slow", "welcome", "heartbeat",
              "error"]


def test_node_handles_random_messages_and_still_serves(tiny_model: Path, escaped) -> None:
    """A real node (in-process) takes random messages through ``dispatch`` and runs what they
    queue with ``run_batch``, as its worker does; its answers go to a ROUTER socket here."""
    prompt = [5, 6, 7, 8]
    want = greedy_reference(tiny_model, prompt, NEW_TOKENS)
    addr = f"tcp://127.0.0.1:{free_port()}"
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(addr)
    loop = asyncio.new_event_loop()
    node = Node(NodeConfig(name="a", broker=addr, model=str(tiny_model), threads=1))
    replies: list[Message] = []

    async def connect() -> None:
        await node._connect()  # a DEALER to the router, and the node's register

    def answers(until: tuple[str, ...] = ()) -> list[Message]:
        """What the node sent since the last call (every one a valid message); with ``until``,
        up to the first message of those kinds (bounded wait: sends cross a real socket)."""
        got: list[Message] = []
        while True:
            if not router.poll(int(EXAMPLE_S * 1000) if until else 0):
                assert not until, f"no {until} from the node in {EXAMPLE_S} s"
                return got
            _, *frames = router.recv_multipart()
            got.append(protocol.decode(frames))
            if got[-1].kind in until:
                return got

    async def send(kind: str, tensors: dict | None = None, **fields) -> None:
        await node.dispatch(protocol.encode(kind, tensors, **fields))
        while not node.queue.empty() or node._held is not None:
            await node.run_batch(await node._next_batch())

    async def settled() -> list[Message]:
        """Everything the node sent so far: it answers in order on one socket, so once the
        answer to a profile sent now is in (or its refusal, if the node holds nothing), every
        earlier answer is."""
        await send("profile", rid="settle", tokens=1)
        got: list[Message] = []
        while not (got and got[-1].get("rid") == "settle"):
            got += answers(("profile_reply", "error"))
        return got[:-1]

    async def greedy(epoch: int) -> list[int]:
        await send("set_slow", factor=1.0)
        await send("load", epoch=epoch, start=0, end=LAYERS)
        await settled()
        ids, out, pos = list(prompt), [], 0
        for step in range(NEW_TOKENS):
            await send("step", {"x": torch.tensor(ids)}, epoch=epoch, stage=0,
                       rows=[["check", step, pos, len(ids)]])
            got = [m for m in answers(("result", "error")) if m.kind in ("result", "error")]
            assert [m.kind for m in got] == ["result"], [m.header for m in got]
            pos += len(ids)
            ids = [got[0]["tokens"][0][0]]
            out += ids
            if ids[0] in node.executor.spec.eos_token_ids:  # where transformers stops too
                break
        return out

    try:
        loop.run_until_complete(connect())
        assert loop.run_until_complete(greedy(1)) == want

        @settings(max_examples=NODE_EXAMPLES, **FUZZ)
        @given(st.lists(st.one_of(messages(NODE_KINDS).map(lambda m: [m]), session_steps()),
                        min_size=1, max_size=4).map(lambda parts: sum(parts, [])))
        def fuzz(batch: list[list[bytes]]) -> None:
            async def one() -> None:
                # From where the broker's placement leaves it: holding every layer at epoch 1.
                await send("load", epoch=1, start=0, end=LAYERS)
                for frames in batch:
                    try:
                        await node.dispatch([zmq.Frame(bytes(f)) for f in frames])
                    except SystemExit:  # the broker "rejected" it: the node stops, as it should
                        pass
                while not node.queue.empty() or node._held is not None:
                    await node.run_batch(await node._next_batch())
            loop.run_until_complete(asyncio.wait_for(one(), EXAMPLE_S))
            got = loop.run_until_complete(asyncio.wait_for(settled(), EXAMPLE_S))
            replies.extend(got)
            assert escaped.records == [], escaped.records[0].getMessage()
            assert [m.header for m in got if m.kind == "error" and m["code"] == "internal"] == []

        fuzz()
        kinds = Counter(m["code"] if m.kind == "error" else m.kind for m in replies)
        print(f"node: {len(replies)} replies: {dict(kinds)}")
        assert loop.run_until_complete(greedy(1000)) == want
    finally:
        if node.sock is not None:
            node.sock.close()
        node.pool.shutdown(wait=False, cancel_futures=True)
        router.close(0)
        loop.close()
