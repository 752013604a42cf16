"""Known cohorts (``nodes/executor.py``): a node that ran a step message's rows together
on pool slots runs exactly their next step as a block, without the per-row path; on the CPU,
with the decoder as a GPU node has it (no graphs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import zmq
from test_static_kv import PROMPTS, _static, _step, eager_reference

from nodes.executor import Executor
from nodes.rows import join_rows
from zpipe import protocol
from zpipe.slots import SlotKV


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> dict[str, list[int]]:
    return eager_reference(tiny_model)


def _cohort_step(step: int, tokens: dict[str, list[int]], epoch: int = 1,
                 pos_shift: int = 0) -> protocol.Message:
    """One step message for every prompt's session: its decode step ``step``."""
    rows = [[sid, step, len(p) + step - 1 + pos_shift, 1] for sid, p in PROMPTS.items()]
    frames = protocol.encode("step", {"x": torch.tensor([t[-1] for t in tokens.values()])},
                             epoch=epoch, stage=0, rows=rows, sampling=[{}] * len(rows))
    return protocol.decode([zmq.Frame(bytes(f)) for f in frames])


def _run(ex: Executor, msg: protocol.Message) -> tuple[bool, object]:
    """A node's way with one step message: the known cohort's path, else the per-row one
    (then expecting its next step). (took the known path, outputs in row order)"""
    known = ex.step_known(msg)
    if known is not None:
        cohort, out = known
        ex.expect_after(cohort)
        return True, out
    rows = ex.rows_of(msg)
    outs = ex.step_batch(rows)
    ex.expect(msg, rows)
    return False, outs


def test_a_known_cohort_steps_on_without_the_per_row_path(tiny_model, reference) -> None:
    """Sessions stepped together as one message: from their second decode step on, the node
    recognises the message as the step it expects and runs it as a block. Same tokens."""
    ex = _static(tiny_model)
    toks = {sid: [ex.step_batch(ex.rows_of(_step(sid, 0, 0, p)))[0][0]]
            for sid, p in PROMPTS.items()}
    paths = []
    for s in range(1, 24):
        known, outs = _run(ex, _cohort_step(s, toks))
        paths.append(known)
        for t, out in zip(toks.values(), outs, strict=True):
            t.append(out[0])
    assert toks == reference
    assert paths == [False] + [True] * 22 and ex.known_steps == 22


def test_an_inner_stage_known_cohort_gives_the_per_row_hidden_block(tiny_model) -> None:
    n = Executor(tiny_model, "float32", "cpu").spec.num_layers
    fast, slow = _static(tiny_model), _static(tiny_model)
    for ex in (fast, slow):
        ex.load(0, n - 1, epoch=1)
        for sid, p in PROMPTS.items():
            ex.step_batch(ex.rows_of(_step(sid, 0, 0, p)))
    toks = {sid: [3] for sid in PROMPTS}
    for s in range(1, 6):
        known, block = _run(fast, _cohort_step(s, toks))
        rows = slow.rows_of(_cohort_step(s, toks))
        want = join_rows(slow.step_batch(rows))
        assert known == (s > 1)
        assert torch.equal(block if known else join_rows(block), want)


def test_what_breaks_a_known_cohort(tiny_model) -> None:
    """A message that is not exactly the expected step, a free, a stale epoch or a step of
    one of its sessions elsewhere: the per-row path, with its checks."""
    ex = _static(tiny_model)
    toks = {sid: [ex.step_batch(ex.rows_of(_step(sid, 0, 0, p)))[0][0]]
            for sid, p in PROMPTS.items()}
    _run(ex, _cohort_step(1, toks))
    assert ex.known is not None
    assert ex.step_known(_cohort_step(2, toks, pos_shift=1)) is None  # a position off
    assert ex.step_known(_cohort_step(2, toks, epoch=2)) is None
    assert ex.step_known(_cohort_step(3, toks)) is None  # a step ahead
    misnamed = _cohort_step(2, toks)
    misnamed.specs = [("y", *misnamed.specs[0][1:])]
    misnamed._tensors = None
    assert ex.step_known(misnamed) is None  # its one tensor is not 'x'
    assert ex.known is not None and ex.known_steps == 0  # none of them ran
    ex.free(["b"])
    assert ex.known is None and ex.step_known(_cohort_step(2, toks)) is None
    toks2 = {sid: [ex.step_batch(ex.rows_of(_step(sid, 0, 0, p)))[0][0]]
             for sid, p in PROMPTS.items()}
    _run(ex, _cohort_step(1, toks2))
    ex.step_batch(ex.rows_of(_step("a", 2, len(PROMPTS["a"]) + 1, [5])))  # a alone
    assert ex.known is None


def test_a_known_cohort_ends_where_a_slot_is_full(tiny_model) -> None:
    """The step that fills a slot is the known cohort's last: the next one spills to a plain
    cache on the per-row path."""
    ex = _static(tiny_model, max_len=16)
    toks = {sid: [ex.step_batch(ex.rows_of(_step(sid, 0, 0, p)))[0][0]]
            for sid, p in PROMPTS.items()}
    longest = max(len(p) for p in PROMPTS.values())
    paths = []
    for s in range(1, 16 - longest + 3):
        known, outs = _run(ex, _cohort_step(s, toks))
        paths.append(known)
        for t, out in zip(toks.values(), outs, strict=True):
            t.append(out[0])
    assert paths[:2] == [False, True] and paths[-1] is False
    assert not isinstance(ex.caches["c"], SlotKV)
