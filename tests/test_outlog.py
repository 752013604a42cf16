"""The output log a node keeps of what it sent on, and a restore's rebuild request."""

from __future__ import annotations

import pytest
import torch

from nodes.executor import _batches, _chunks
from nodes.outlog import OutputLog
from zpipe import protocol
from zpipe.protocol import ProtocolError


def _rows(n: int, start: float = 0.0) -> torch.Tensor:
    return torch.arange(start, start + 4 * n, dtype=torch.float32).reshape(n, 4)


def test_rows_of_each_session_in_order_of_position() -> None:
    log = OutputLog(1 << 20)
    a, b = _rows(3), _rows(2, 100.0)
    log.record(5, [("s1", 0, 3), ("s2", 0, 2)], torch.cat([a, b]))
    nxt = _rows(1, 1000.0)
    log.record(5, [("s1", 3, 1)], nxt)
    assert torch.equal(log.take(5, "s1", 4), torch.cat([a, nxt]))
    assert torch.equal(log.take(5, "s2", 2), b)
    assert log.take(5, "s2", 3) is None  # not held
    assert log.take(6, "s1", 1) is None  # the output of another boundary


def test_a_replay_overwrites_and_a_new_boundary_starts_again() -> None:
    log = OutputLog(1 << 20)
    log.record(5, [("s", 0, 4)], _rows(4))
    again = _rows(2, 50.0)
    log.record(5, [("s", 2, 2)], again)  # rows 2.. computed again after a recovery
    assert torch.equal(log.take(5, "s", 4)[2:], again)
    log.record(7, [("s", 4, 1)], _rows(1))  # the stage now ends elsewhere: rows before unknown
    assert log.take(7, "s", 1) is None and log.nbytes() == 0


def test_a_gap_or_the_budget_leaves_a_session_out_until_it_starts_again() -> None:
    log = OutputLog(300 * 4 * 4)  # room for 300 rows of 4 floats
    log.record(1, [("s", 3, 1)], _rows(1))  # it came here mid-way: rows 0-2 never did
    assert log.take(1, "s", 4) is None
    log.record(1, [("s", 4, 1)], _rows(1))
    assert log.take(1, "s", 5) is None
    log.record(1, [("s", 0, 2)], _rows(2))  # a new prefill: logged again
    assert log.take(1, "s", 2) is not None
    log.record(1, [("big", 0, 200)], _rows(200))  # 256 rows of room: over the budget
    assert log.take(1, "big", 200) is None and log.take(1, "s", 2) is not None
    assert log.nbytes() <= log.budget
    log.free(["s"])
    assert log.nbytes() == 0


def test_no_budget_keeps_nothing() -> None:
    log = OutputLog(0)
    log.record(1, [("s", 0, 2)], _rows(2))
    assert log.take(1, "s", 2) is None and log.nbytes() == 0


def test_rebuild_chunks_follow_the_prompt() -> None:
    assert _chunks(10, 4, 8192) == [(0, 4), (4, 10)]
    assert _chunks(10, 10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert _chunks(5, 0, 3) == [(0, 3), (3, 5)]


def test_batches_keep_order_and_bounds() -> None:
    assert _batches([1, 1, 1, 1, 1], 2, 100) == [(0, 2), (2, 4), (4, 5)]
    assert _batches([3, 3, 9, 1], 10, 6) == [(0, 2), (2, 3), (3, 4)]  # 9 goes alone
    assert _batches([], 4, 4) == []


def _restore(tensors: dict | None = None, **fields) -> protocol.Message:
    return protocol.decode(protocol.encode(
        "restore", tensors, epoch=3, start=0, end=4, sessions=[["a", 2], ["b", 3]],
        shadow_every=0, **fields))


def test_a_rebuild_request_is_checked() -> None:
    lengths = {"a": 2, "b": 3}
    ids = torch.tensor([1, 2, 3, 4, 5])
    a, b, prompts, got = protocol.rebuild_request(
        _restore({"ids": ids}, rebuild=[0, 2], prompts=[1, 2]), lengths, 4, 10)
    assert (a, b, prompts) == (0, 2, {"a": 1, "b": 2})
    assert got["a"].tolist() == [1, 2] and got["b"].tolist() == [3, 4, 5]
    assert protocol.rebuild_request(_restore(rebuild=[2, 4], prompts=[1, 2]), lengths, 4,
                                    10)[3] is None
    for bad, match in ((_restore(rebuild=[3, 5], prompts=[1, 2]), "within 4 layers"),
                       (_restore(rebuild=[1, 2], prompts=[1]), "one length"),
                       (_restore(rebuild=[0, 2], prompts=[1, 2]), "needs tensor 'ids'"),
                       (_restore({"ids": torch.tensor([1, 2, 3, 4, 10])}, rebuild=[0, 2],
                                 prompts=[1, 2]), "outside the vocabulary")):
        with pytest.raises(ProtocolError, match=match):
            protocol.rebuild_request(bad, lengths, 4, 10)
