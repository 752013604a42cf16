"""Batched steps give every session bit-identical numbers to running it alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zpipe.shard import Stage


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_equals_alone(tiny_model: Path, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    first = Stage(tiny_model, 0, 3, dtype=dtype)
    last = Stage(tiny_model, 3, 6, dtype=dtype)
    prompts = [torch.randint(0, 500, (n,)) for n in (5, 9, 1, 13, 7)]

    def run(batched: bool) -> list[list[int]]:
        c1 = [first.new_cache() for _ in prompts]
        c2 = [last.new_cache() for _ in prompts]
        inputs = list(prompts)
        tokens: list[list[int]] = [[] for _ in prompts]
        for _ in range(12):
            items = list(range(len(prompts)))
            if batched:
                h = first.forward_batch([(c1[i], inputs[i], c1[i].length) for i in items])
                logits = last.forward_batch([(c2[i], h[i], c2[i].length) for i in items])
            else:
                logits = []
                for i in items:
                    hi = first.forward(c1[i], inputs[i], c1[i].length)
                    logits.append(last.forward(c2[i], hi, c2[i].length))
            for i, lg in enumerate(logits):
                tokens[i].append(int(lg.argmax()))
                inputs[i] = torch.tensor([tokens[i][-1]])
            outs.append([lg.clone() for lg in logits])
        return tokens

    outs: list = []
    alone = run(False)
    alone_logits, outs[:] = outs[:], []
    together = run(True)
    assert together == alone
    for a, b in zip(alone_logits, outs, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)


def test_mixed_prefill_and_decode_batch(tiny_model: Path) -> None:
    """A batch holding a new session's prefill beside other sessions' decodes."""
    stage = Stage(tiny_model, 0, 6)
    old = [stage.new_cache() for _ in range(3)]
    for c, p in zip(old, ([1, 2, 3], [4, 5], [6]), strict=True):
        stage.forward(c, torch.tensor(p), 0)
    alone_old = [old_c for old_c in old]
    ref = [stage.forward(_clone(c), torch.tensor([7]), c.length) for c in alone_old]
    new = stage.new_cache()
    ref_new = stage.forward(stage.new_cache(), torch.tensor([8, 9, 10, 11]), 0)
    out = stage.forward_batch([(old[0], torch.tensor([7]), old[0].length),
                               (new, torch.tensor([8, 9, 10, 11]), 0),
                               (old[1], torch.tensor([7]), old[1].length),
                               (old[2], torch.tensor([7]), old[2].length)])
    assert torch.equal(out[0], ref[0]) and torch.equal(out[2], ref[1])
    assert torch.equal(out[3], ref[2]) and torch.equal(out[1], ref_new)


def _clone(cache):
    c = type(cache)(cache.layers, cache.n_kv_heads, cache.head_dim, cache.dtype, cache.device)
    c.import_(cache.export(cache.layers), cache.length)
    return c
