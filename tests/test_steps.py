"""Step messages with several sessions' rows: the executor's checks and the node's batching."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import pytest
import torch
import zmq

from nodes.executor import Executor, StepError
from nodes.node import Node
from zpipe import protocol
from zpipe.config import NodeConfig
from zpipe.protocol import ProtocolError, result_rows, step_rows
from zpipe.sampling import SamplingParams


def _msg(kind: str, tensors: dict | None = None, **fields) -> protocol.Message:
    frames = protocol.encode(kind, tensors, **fields)
    return protocol.decode([zmq.Frame(bytes(f)) for f in frames])


def _step(rows: list, x: torch.Tensor, epoch: int = 1, **extra) -> protocol.Message:
    return _msg("step", {"x": x}, epoch=epoch, stage=0, rows=rows, **extra)


@pytest.fixture()
def executor(tiny_model: Path) -> Executor:
    ex = Executor(tiny_model, "float32", "cpu")
    ex.load(0, ex.spec.num_layers, epoch=1)
    return ex


def test_rows_of_several_messages_run_as_one_batch(executor: Executor) -> None:
    prompts = {"a": [1, 2, 3], "b": [4, 5], "c": [6, 7, 8, 9]}
    alone = {}
    for sid, p in prompts.items():  # each session alone, as its own message
        out = executor.step_batch(executor.rows_of(_step([[sid, 0, 0, len(p)]],
                                                         torch.tensor(p))))
        alone[sid] = out[0]
    executor.free(list(prompts))
    m1 = _step([["a", 0, 0, 3], ["b", 0, 0, 2]], torch.tensor([1, 2, 3, 4, 5]))
    m2 = _step([["c", 0, 0, 4]], torch.tensor([6, 7, 8, 9]))
    outs = executor.step_batch(executor.rows_of(m1) + executor.rows_of(m2))
    assert [o[0] for o in outs] == [alone["a"][0], alone["b"][0], alone["c"][0]]
    assert executor.last_compute_s > 0


def test_run_rows_splits_what_exceeds_the_limits(executor: Executor) -> None:
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10], [11, 12]]
    rows = [executor.rows_of(_step([[f"s{i}", 0, 0, len(p)]], torch.tensor(p)))[0]
            for i, p in enumerate(prompts)]
    whole = executor.step_batch(rows)
    calls = []
    real = executor.step_batch
    executor.step_batch = lambda rs: calls.append(len(rs)) or real(rs)
    again = executor.run_rows(rows, max_rows=2, max_tokens=5)
    assert calls == [2, 2, 1]  # [3+2 tokens], [4+1 tokens], [2 tokens]
    assert [o[0] for o in again] == [o[0] for o in whole]
    calls.clear()
    executor.run_rows(rows, max_rows=64, max_tokens=3)  # prefills longer than 3 run alone
    assert calls == [1, 1, 1, 2]


def test_one_refused_row_does_not_stop_the_others(executor: Executor) -> None:
    executor.step_batch(executor.rows_of(_step([["a", 0, 0, 2]], torch.tensor([1, 2]))))
    m = _step([["a", 1, 2, 1], ["ghost", 1, 5, 1], ["a2", 0, 0, 1]], torch.tensor([3, 4, 5]))
    out = executor.step_batch(executor.rows_of(m))
    assert isinstance(out[1], StepError) and out[1].code == "unknown_session"
    assert not isinstance(out[0], StepError) and not isinstance(out[2], StepError)
    bad_pos = _step([["a", 2, 99, 1]], torch.tensor([3]))
    assert executor.step_batch(executor.rows_of(bad_pos))[0].code == "bad_position"


@pytest.mark.parametrize("make, code", [
    (lambda: _step([["a", 0, 0, 3]], torch.tensor([1, 2])), "bad_shape"),
    (lambda: _step([["a", 0, 0, 1]], torch.tensor([1]), epoch=7), "stale_epoch"),
    (lambda: _step([["a", 0, 0, 1], ["a", 0, 0, 1]], torch.tensor([1, 2])), "bad_value"),
    (lambda: _step([["a", 0, 0, 1]], torch.tensor([10**6])), "bad_value"),
    (lambda: _step([["a", 0, 0, 1]], torch.tensor([1]), sampling=[{}, {}]), "bad_message"),
    (lambda: _step([["a", 0, 0, 1]], torch.tensor([1]), sampling=[{"temperature": -1}]),
     "bad_sampling"),
    (lambda: _step([["a", 0, 0, 1], ["b", 0, 0, 1]], torch.tensor([1, 2]),
                   sampling=[{}, {"temperature": -1}]), "bad_sampling"),
    (lambda: _step([["a", 0, 0, 1], ["b", 0, 0, 1]], torch.tensor([1, 2]), sampling=[{}, 5]),
     "bad_sampling"),
    (lambda: _step([["a", 0, 0, 2]], torch.zeros(2, 3)), "bad_shape"),
])
def test_rows_of_refuses_a_bad_message(executor: Executor, make, code: str) -> None:
    with pytest.raises(StepError) as e:
        executor.rows_of(make())
    assert e.value.code == code


def test_rows_take_their_sampling_params(executor: Executor) -> None:
    """Rows whose entries are all ``{}`` (the defaults, greedy) share the default params;
    otherwise each row gets its own."""
    ids = torch.tensor([1, 2])
    rows = [["a", 0, 0, 1], ["b", 0, 0, 1]]
    for sampling in (None, [{}, {}]):
        got = executor.rows_of(_step(rows, ids, **({"sampling": sampling} if sampling else {})))
        assert [r.params for r in got] == [SamplingParams()] * 2
    got = executor.rows_of(_step(rows, ids, sampling=[{}, {"temperature": 0.5, "seed": 3}]))
    assert [r.params for r in got] == [SamplingParams(),
                                       SamplingParams(temperature=0.5, seed=3)]


def test_node_merges_waiting_step_messages_up_to_max_batch(tiny_model: Path) -> None:
    async def run() -> list:
        node = Node(NodeConfig(name="t", model=str(tiny_model), max_batch=3))
        try:
            one = torch.tensor([1])
            queue = [
                _step([["a", 0, 0, 1], ["b", 0, 0, 1]], torch.tensor([1, 2])),
                _step([["c", 0, 0, 1]], one),
                _step([["d", 0, 0, 1]], one),       # would pass max_batch 3: next batch
                _step([["e", 0, 0, 1]], one),
                _step([["d", 1, 1, 1]], one),       # d again: cannot join d's batch
                _step([["f", 0, 0, 1]], one, epoch=2),  # another epoch: its own batch
                _msg("free", sids=["a"]),
                _step([["g", 0, 0, 1]], one),
            ]
            for m in queue:
                node.queue.put_nowait(m)
            batches = []
            for _ in range(6):
                batch = await node._next_batch()
                batches.append([r[0] for m in batch for r in m.get("rows", [["free"]])])
            return batches
        finally:
            node.pool.shutdown(wait=False)

    assert asyncio.run(run()) == [["a", "b", "c"], ["d", "e"], ["d"], ["f"], ["free"], ["g"]]


def test_a_load_leaves_nothing_for_the_collector_to_walk(tiny_model: Path) -> None:
    """What a load creates is frozen before the broker hears "loaded" (a full collection
    over torch.compile's objects would otherwise stall a later step by 100-200 ms)."""
    class Sock:
        def send(self, frames: list) -> None:
            self.sent = protocol.decode([zmq.Frame(bytes(f)) for f in frames])

    async def run() -> tuple:
        node = Node(NodeConfig(name="t", model=str(tiny_model)))
        node.sock = Sock()
        try:
            gc.collect()
            gc.freeze()
            frozen = gc.get_freeze_count()
            await node._load(_msg("load", epoch=1, start=0, end=2))
            return frozen, gc.get_freeze_count(), len(gc.get_objects()), node.sock.sent
        finally:
            node.pool.shutdown(wait=False)

    try:
        before, after, tracked, sent = asyncio.run(run())
    finally:
        gc.unfreeze()
    assert sent.kind == "loaded" and (sent["start"], sent["end"]) == (0, 2)
    assert after > before  # the stage's objects joined the frozen generation
    assert tracked < 50  # what the collector still walks (172 objects without the freeze)


# --------------------------------------------------------------------------- step rows
def test_step_rows_accept_a_batch() -> None:
    rows = [["a", 0, 0, 7], ["b", 3, 12, 1]]
    assert step_rows(rows) == [("a", 0, 0, 7), ("b", 3, 12, 1)]
    assert result_rows([["a", 0, 7], ["b", 3, 1]]) == [("a", 0, 7), ("b", 3, 1)]


@pytest.mark.parametrize("rows, match", [
    ([], "1..4096 rows"),
    ([["a", 0, 0, 1]] * 4097, "1..4096 rows"),
    ([["a", 0, 0]], "must be"),
    ([["a", 0, 0, 1.0]], "must be"),
    ([[1, 0, 0, 1]], "must be"),
    ([["", 0, 0, 1]], "must be"),
    ([["x" * 200, 0, 0, 1]], "must be"),
    ([["a", 0, 0, True]], "must be"),
    ([["a", 0, 0, 0]], "n >= 1"),
    ([["a", -1, 0, 1]], ">= 0"),
    ([["a", 0, -5, 1]], ">= 0"),
    ([["a", 0, 0, 1], ["a", 1, 1, 1]], "twice"),
    (["a"], "must be"),
])
def test_step_rows_reject(rows: list, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        step_rows(rows)


def test_result_rows_reject() -> None:
    for rows in ([], [["a", 0]], [["a", 0, 0]], [["a", 0, 1], ["a", 0, 1]], [[None, 0, 1]]):
        with pytest.raises(ProtocolError):
            result_rows(rows)
