"""The combine of a split stage's members over real ZeroMQ sockets (nodes/group.py)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import msgpack
import pytest
import torch
import zmq

from nodes.group import Group, GroupError

HIDDEN = 8


@pytest.fixture
def groups():
    ctx = zmq.Context.instance()
    made: list[Group] = []

    def make(n: int, timeout_s: float = 20.0) -> list[Group]:
        gs = [Group(ctx, "tcp://127.0.0.1:0") for _ in range(n)]
        for i, g in enumerate(gs):
            g.join(7, i, [x.addr for x in gs], timeout_s)
        made.extend(gs)
        return gs

    yield make
    for g in made:
        g.close()


def _run(gs: list[Group], steps: int = 3, layers: int = 4) -> list[list[torch.Tensor]]:
    """Every member runs ``steps`` batches of ``layers`` combines; their sums, per member."""
    def member(i: int) -> list[torch.Tensor]:
        out = []
        for step in range(steps):
            gs[i].begin("s", step)
            for layer in range(layers):
                part = torch.full((step + 1, HIDDEN), float(10 ** i * (layer + 1)))
                out.append(gs[i].combine(part))
        return out

    with ThreadPoolExecutor(len(gs)) as pool:
        return [f.result(timeout=60) for f in [pool.submit(member, i) for i in range(len(gs))]]


@pytest.mark.parametrize("n", [2, 3])
def test_members_get_the_same_sum(groups, n: int) -> None:
    gs = groups(n)
    outs = _run(gs)
    for k, total in enumerate(outs[0]):
        layer, step = k % 4, k // 4
        want = sum(10 ** i for i in range(n)) * (layer + 1)
        assert total.shape == (step + 1, HIDDEN) and torch.all(total == want)
        for other in outs[1:]:
            assert torch.equal(other[k], total)
    assert all(g.combines == 12 and g.steps == 3 for g in gs)


def test_malformed_partials_are_dropped(groups) -> None:
    gs = groups(2)
    junk = zmq.Context.instance().socket(zmq.PUSH)
    junk.connect(gs[0].addr)
    try:
        for frames in ([b"x"], [b"\xc1", b""], [msgpack.packb([7, "s", 0, 0, 5, [1, HIDDEN],
                                                               "float32"]), b"\0" * 32],
                       [msgpack.packb([7, "s", 0, 0, 1, [1, HIDDEN], "float32"]), b"\0" * 3],
                       [msgpack.packb([7, ["s"], 0, 0, 1, [1, HIDDEN], "float32"]),
                        b"\0" * 32]):
            junk.send_multipart(frames)
        outs = _run(gs, steps=1, layers=2)
    finally:
        junk.close(linger=0)
    assert torch.all(outs[0][0] == 11) and torch.all(outs[1][1] == 22)


def test_members_that_ran_different_batches_are_refused(groups) -> None:
    gs = groups(2)

    def member(i: int) -> str:
        gs[i].begin("s", 0)
        try:
            gs[i].combine(torch.zeros(1 + i, HIDDEN))
        except GroupError as e:
            return e.code
        return "ok"

    with ThreadPoolExecutor(2) as pool:
        codes = [f.result(timeout=60) for f in [pool.submit(member, i) for i in range(2)]]
    assert codes == ["group_mismatch", "group_mismatch"]


def test_a_waiting_combine_gives_up_when_interrupted(groups) -> None:
    g, _ = groups(2, timeout_s=600.0)  # the other member never sends
    g.begin("s", 0)
    threading.Timer(0.2, g.interrupt).start()
    with pytest.raises(GroupError, match="new placement"):
        g.combine(torch.zeros(1, HIDDEN))
    g.join(8, 0, [g.addr, "tcp://127.0.0.1:1"], 0.2)  # a join starts listening again
    g.begin("s", 1)
    with pytest.raises(GroupError, match="no partial"):
        g.combine(torch.zeros(1, HIDDEN))
