"""KV shadows without processes: the node-side store (nodes/shadow.py), the rows a node sends
(``Executor.shadow_due``), the restore that takes a dead owner's layers from them
(``Executor.restore``), the holder rule and the restore message's checks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
import zmq
from test_broker_cohorts import _close, _frames, _next, _pump, _recv, _serving_stages

from brokers import admin
from brokers.shadows import holder_of
from nodes.executor import Executor, StepError
from nodes.rows import join_rows
from nodes.shadow import ShadowStore
from zpipe import protocol
from zpipe.cli.admin import format_nodes
from zpipe.kvcache import KVCache

PROMPT = [1, 5, 9, 33, 7]


def _wire(kind: str, tensors: dict | None = None, **fields) -> protocol.Message:
    """A message as the receiver decodes it (tensors: read-only views of the frames)."""
    frames = protocol.encode(kind, tensors, **fields)
    return protocol.decode([zmq.Frame(bytes(f)) for f in frames])


def _rows(cache: KVCache, start: int, length: int) -> dict[str, torch.Tensor]:
    return cache.export(cache.layers, tokens=range(start, length))


def _filled(layers: range, length: int) -> KVCache:
    cache = KVCache(layers, 2, 4, torch.float32, "cpu", chunk=8)
    for layer in layers:
        cache.append(layer, torch.randn(2, length, 4), torch.randn(2, length, 4))
    cache.advance(length)
    return cache


@pytest.mark.parametrize("since", [0, 6, 13, 20])
def test_a_move_to_the_holder_sends_only_the_rows_after_its_shadow(since: int) -> None:
    """The mover's KV for a holder: the source exports rows ``since`` on of the moved layers,
    over the wire, and the holder prefixes its shadow's rows: the cache the source has."""
    src = _filled(range(3, 6), 20)
    store = ShadowStore()
    assert store.add("a", "s1", 0, 13, _rows(src, 0, 13))
    owner = Executor.__new__(Executor)  # only its caches: export_kv reads nothing else
    owner.caches = {"s1": src}
    length, suffix = owner.export_kv("s1", 4, 6, since if since <= 13 else 0)
    msg = _wire("kv_import", suffix, rid="r", sid="s1", length=length, since=since,
                owner="a")
    if since > 13:  # past what the shadow holds
        with pytest.raises(ValueError, match="no shadow"):
            store.prefixed("a", "s1", since, msg.tensors)
        return
    assert all(t.shape[1] == 20 - since for t in msg.tensors.values())
    full = store.prefixed("a", "s1", since, msg.tensors) if since else msg.tensors
    want = src.export(range(4, 6))
    assert full.keys() == want.keys()
    assert all(torch.equal(full[n], want[n]) for n in want)
    with pytest.raises(ValueError, match="lacks a layer"):
        store.prefixed("a", "s1", 1, {"k.7": torch.zeros(2, 1, 4), "v.7": torch.zeros(2, 1, 4)})
    with pytest.raises(ValueError, match="no shadow"):
        store.prefixed("b", "s1", 1, msg.tensors)


def test_the_store_grows_by_suffixes_cuts_on_take_and_frees() -> None:
    src = _filled(range(3, 5), 20)
    store = ShadowStore()
    assert store.add("a", "s1", 0, 8, _rows(src, 0, 8))
    msg = _wire("shadow", _rows(src, 8, 13), epoch=1, sid="s1", start=8, length=13, owner="a")
    assert store.add("a", "s1", 8, 13, msg.tensors)
    assert store.add("b", "s1", 0, 4, _rows(_filled(range(5, 6), 4), 0, 4))
    assert store.nbytes() > 0
    assert not store.add("a", "s1", 14, 16, _rows(src, 14, 16))  # a gap: dropped
    assert ("a", "s1") not in store.caches
    assert store.add("a", "s1", 0, 13, _rows(src, 0, 13))  # starts again from row 0
    store.free(["s1"])
    assert store.caches == {} and store.nbytes() == 0
    assert store.add("a", "s2", 0, 13, _rows(src, 0, 13))
    assert store.add("a", "s3", 0, 2, _rows(src, 0, 2))
    taken = store.take("a", {"s2": 10, "s3": 5, "s4": 1})  # s3 is too short, s4 unknown
    assert list(taken) == ["s2"] and taken["s2"].length == 10 and store.caches == {}
    for kind, store_ in (("k", taken["s2"].k), ("v", taken["s2"].v)):
        for layer in (3, 4):
            assert torch.equal(store_[layer][:, :10], getattr(src, kind)[layer][:, :10])


def test_the_store_drops_rows_that_do_not_fit() -> None:
    store = ShadowStore()
    src = _filled(range(3, 5), 8)
    assert not store.add("a", "s", 0, 9, _rows(src, 0, 8))  # length says 9, 8 rows came
    assert not store.add("a", "s", 0, 8, {})
    assert store.add("a", "s", 0, 4, _rows(src, 0, 4))
    other = _filled(range(6, 7), 8)
    assert not store.add("a", "s", 4, 8, _rows(other, 4, 8))  # other layers than before
    assert store.caches == {}


def _step(ex: Executor, sid: str, step: int, pos: int, x: torch.Tensor, stage: int,
          epoch: int):
    msg = _wire("step", {"x": x}, epoch=epoch, stage=stage, rows=[[sid, step, pos, len(x)]],
                **({"sampling": [{}]} if ex.stage.last else {}))
    (out,) = ex.step_batch(ex.rows_of(msg))
    assert not isinstance(out, Exception), out
    return out[0] if ex.stage.last else join_rows([out])


def test_a_restore_from_the_shadow_goes_on_with_the_tokens_of_a_run_that_lost_nothing(
        tiny_model: Path) -> None:
    """Stage a (layers 0-2) shadows its rows every 4 to stage b's node; a dies after 11
    tokens; b takes layers 0-2 from the shadow, keeps its own KV cut to the shadow's last row,
    recomputes the rows after it and goes on: the tokens of one executor holding it all."""
    full = Executor(tiny_model, "float32", "cpu")
    n = full.spec.num_layers
    full.load(0, n, 1)
    ref = [_step(full, "s", 0, 0, torch.tensor(PROMPT), 0, 1)]
    for k in range(1, 20):
        ref.append(_step(full, "s", k, len(PROMPT) + k - 1, torch.tensor([ref[-1]]), 0, 1))

    a, b = Executor(tiny_model, "float32", "cpu"), Executor(tiny_model, "float32", "cpu")
    a.load(0, 3, 1)
    b.load(3, n, 1)
    a.shadow_every = 4
    store = ShadowStore()
    tokens: list[int] = []
    for k in range(12):
        x = torch.tensor(PROMPT if k == 0 else [tokens[-1]])
        pos = 0 if k == 0 else len(PROMPT) + k - 1
        tokens.append(_step(b, "s", k, pos, _step(a, "s", k, pos, x, 0, 1), 1, 1))
        for sid, start, length, rows in a.shadow_due():
            m = _wire("shadow", rows, epoch=1, sid=sid, start=start, length=length)
            assert store.add("a", sid, start, length, m.tensors)
    assert tokens == ref[:12]
    at = store.caches[("a", "s")].length
    assert at % 4 == 1 and at < b.caches["s"].length  # the prompt and every 4 rows since
    b.restore(0, n, 2, {"s": at}, store.take("a", {"s": at}))
    assert sorted(b.caches["s"].k) == list(range(n)) and b.caches["s"].length == at
    assert b.shadowed == {} and b.epoch == 2
    for k in range(at - len(PROMPT) + 1, 20):  # replay the known tokens, then go on
        out = _step(b, "s", k, len(PROMPT) + k - 1, torch.tensor([ref[k - 1]]), 0, 2)
        if k < len(tokens):
            assert out == tokens[k]
        else:
            tokens.append(out)
    assert tokens == ref


def test_a_restore_keeps_the_listed_sessions_and_refuses_what_it_cannot_keep(
        tiny_model: Path) -> None:
    ex = Executor(tiny_model, "float32", "cpu")
    n = ex.spec.num_layers
    ex.load(3, n, 1)
    x = torch.zeros(4, ex.spec.hidden_size)
    for sid in ("s1", "s2"):
        _step(ex, sid, 0, 0, x, 1, 1)
    with pytest.raises(StepError, match="no shadow"):  # layers 0-2 new, no shadow of them
        ex.restore(0, n, 2, {"s1": 4}, {})
    with pytest.raises(StepError, match="5 rows to keep"):
        ex.restore(3, n, 2, {"s1": 5}, {})
    ex.restore(3, n, 2, {"s1": 2}, {})  # same layers: s1 cut to 2 rows, s2 freed
    assert list(ex.caches) == ["s1"] and ex.caches["s1"].length == 2 and ex.epoch == 2


def test_the_holder_is_the_next_stage_and_the_last_stage_the_one_before() -> None:
    assert holder_of(["a", "b", "c"], "a") == "b"
    assert holder_of(["a", "b", "c"], "b") == "c"
    assert holder_of(["a", "b", "c"], "c") == "b"
    assert holder_of(["a", "b"], "b") == "a"
    assert holder_of(["a"], "a") is None and holder_of(["a", "b"], "x") is None


def test_restore_sessions_are_checked() -> None:
    assert protocol.restore_lengths([["s1", 3], ["s2", 0]]) == {"s1": 3, "s2": 0}
    for bad in ([["s1", -1]], [["s1", 3], ["s1", 4]], [["", 1]], [["s1"]], [[1, 2]],
                [["s1", 1.5]]):
        with pytest.raises(protocol.ProtocolError):
            protocol.restore_lengths(bad)
    msg = _wire("restore", epoch=2, start=0, end=6, sessions=[["s1", 3]], shadow_every=8,
                owner="b")
    assert msg["owner"] == "b"
    with pytest.raises(protocol.ProtocolError):
        _wire("restore", epoch=2, start=0, end=6, sessions=[], shadow_every="8")


@pytest.mark.parametrize("refused", [False, True])
def test_the_broker_forwards_shadows_and_restores_from_them(tiny_model: Path,
                                                             refused: bool) -> None:
    """Nodes by hand: each node's shadow goes to its holder with ``owner``; when b is found
    dead, c (its holder) gets b's layers and every survivor a ``restore`` keeping the session
    up to its shadowed row (no ``free``), and the session goes on from there without a
    replay. A node that refuses its restore makes the sessions replay from their prompts."""
    async def run() -> None:
        broker, (a, b, c), client = await _serving_stages(
            tiny_model, {"a": (0, 2), "b": (2, 4), "c": (4, 6)},
            recovery={"shadow_every": 2, "wait_s": 0.1})
        socks = {"a": a, "b": b, "c": c}
        try:
            await broker.handle(_frames(protocol.encode(
                "generate", rid="r1", prompt_ids=[5, 6, 7], max_new_tokens=5)))
            await asyncio.sleep(0)
            (s,) = broker.sessions.values()
            hidden = torch.zeros(3, broker.spec.hidden_size)
            for name, stage in (("a", 0), ("b", 1)):
                step = await _next(socks[name], "step")
                socks[name].send_multipart(protocol.encode(
                    "result", {"hidden": hidden}, epoch=step["epoch"], stage=stage,
                    compute_s=0.001, rows=[[s.sid, 0, 3]]))
                await _pump(broker, lambda st=stage: s.stage == st + 1)
            step = await _next(c, "step")
            c.send_multipart(protocol.encode("result", epoch=step["epoch"], stage=2,
                                             compute_s=0.001, rows=[[s.sid, 0, 3]],
                                             tokens=[[42, -0.1]]))
            await _pump(broker, lambda: s.tokens == [42] and s.in_flight)
            epoch = step["epoch"]
            rows = {"k.2": torch.ones(1, 3, 2), "v.2": torch.ones(1, 3, 2)}
            for name, holder in (("a", "b"), ("b", "c"), ("c", "b")):
                socks[name].send_multipart(protocol.encode(
                    "shadow", rows, epoch=epoch, sid=s.sid, start=0, length=3))
                await _pump(broker, lambda n=name: broker.recovery.shadows.rows.get(
                    n, {}).get(s.sid) == 3)  # passed on, and counted
                got = await _next(socks[holder], "shadow")
                assert (got["owner"], got["length"]) == (name, 3)
                assert torch.equal(got.tensors["k.2"], rows["k.2"])
            # what the holder holds shows in admin nodes, from its heartbeats
            c.send_multipart(protocol.encode("heartbeat", shadow_bytes=3 << 20))
            await _pump(broker, lambda: broker.registry.by_name["c"].stats.get(
                "shadow_bytes") == 3 << 20)
            listed = admin.nodes(broker)
            assert {n["name"]: n["shadow_bytes"] for n in listed} == {
                "a": 0, "b": 0, "c": 3 << 20}
            assert "SHADOW MB" in format_nodes(listed)
            broker.node_unreachable(broker.registry.by_name["b"])
            await _pump(broker, lambda: broker.placement is not None
                        and broker.placement.epoch > epoch)
            assert [(st.node, st.start, st.end) for st in broker.placement.stages] == \
                [("a", 0, 2), ("c", 2, 6)]
            for name, owner in (("a", None), ("c", "b")):
                msg = await _recv(socks[name])
                while msg.kind == "step":  # step 1, sent to a before b was found dead
                    msg = await _recv(socks[name])
                assert msg.kind == "restore" and msg.get("owner") == owner  # no free first
                assert msg["sessions"] == [[s.sid, 3]] and msg["shadow_every"] == 2
            record = broker.recovery.recovering.record
            assert record["restored"] == "shadow" and record["replay_tokens"] == 0
            restore = broker.placement.epoch
            if refused:
                c.send_multipart(protocol.error("bad_kv", "c: no shadow"))
                await _pump(broker, lambda: broker.placement is not None
                            and broker.placement.epoch > restore)
                assert record["restored"] == "replay" and s.step == 0
                assert (await _next(a, "free"))["sids"] == [s.sid]
                return
            for name, (start, end) in (("a", (0, 2)), ("c", (2, 6))):
                socks[name].send_multipart(protocol.encode(
                    "loaded", epoch=restore, start=start, end=end, weight_bytes=1, load_s=0.1))
            await _pump(broker, lambda: broker.ready and s.in_flight)
            step = await _next(a, "step")
            assert step["rows"] == [[s.sid, 1, 3, 1]] and step.tensors["x"].tolist() == [42]
            (done,) = broker.recovery.history
            assert done["ok"] and done["restored"] == "shadow"
        finally:
            _close(broker, a, b, c, client)

    asyncio.run(run())
