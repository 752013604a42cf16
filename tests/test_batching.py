"""What batching promises on the CPU: float32 rows of a batch are bit-identical to running
each session alone; bfloat16 rows agree within bfloat16 rounding and pick the same greedy token
wherever the choice is not a near-tie.

Why the two differ: single-token rows of a CPU batch run as one-row products (``bmm``), the
shape a session alone runs. In float32 MKL computes a one-row product the same way inside
``bmm`` as alone, on every instruction set it dispatches to (checked below with AVX-512 and
with AVX2 forced). In bfloat16 the products go through oneDNN, whose kernels for one row
alone and for a batch of rows may round an intermediate differently (they do on CPUs with
AVX-512 BF16 or AMX), so a logit may move by a few bfloat16 units in the last place.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from zpipe.shard import Stage

PROMPT_LENS = (5, 9, 1, 13, 7)
STEPS = 12


def _logits(tiny_model: Path, dtype: torch.dtype) -> tuple[list, list]:
    """Per step, the logits of every session alone and in one batch (a 2-stage chain). Both
    runs feed the tokens the sessions chose alone, so every step compares the same inputs."""
    torch.manual_seed(0)
    first = Stage(tiny_model, 0, 3, dtype=dtype)
    last = Stage(tiny_model, 3, 6, dtype=dtype)
    prompts = [torch.randint(0, 500, (n,)) for n in PROMPT_LENS]
    alone_c = [(first.new_cache(), last.new_cache()) for _ in prompts]
    batch_c = [(first.new_cache(), last.new_cache()) for _ in prompts]
    inputs = list(prompts)
    alone, together = [], []
    for _ in range(STEPS):
        a = [last.forward(c2, first.forward(c1, x, c1.length), c2.length)
             for (c1, c2), x in zip(alone_c, inputs, strict=True)]
        h = first.forward_batch([(c1, x, c1.length)
                                 for (c1, _), x in zip(batch_c, inputs, strict=True)])
        b = last.forward_batch([(c2, hi, c2.length)
                                for (_, c2), hi in zip(batch_c, h, strict=True)])
        alone.append(a)
        together.append(b)
        inputs = [torch.tensor([int(lg.argmax())]) for lg in a]
    return alone, together


def test_float32_batch_is_bit_identical(tiny_model: Path) -> None:
    alone, together = _logits(tiny_model, torch.float32)
    for a, b in zip(alone, together, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)


def test_float32_batch_is_bit_identical_without_avx512(tiny_model: Path) -> None:
    """The same on the code paths of a CPU without AVX-512 (MKL, oneDNN and ATen's own
    kernels limited to AVX2), in a fresh process: these settings are read at load time."""
    env = {**os.environ, "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
           "ATEN_CPU_CAPABILITY": "avx2"}
    test = f"{__file__}::test_float32_batch_is_bit_identical"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def test_bfloat16_batch_within_rounding(tiny_model: Path) -> None:
    """Each batched logit within ``tol`` of the one alone: a few bfloat16 roundings, 4 ``eps``
    relative to the row's largest logit (the largest difference seen, on AVX-512 BF16 and with
    oneDNN limited to AVX-512 or AVX2, is 0.8 ``eps``). Where the alone row's top two logits
    are further apart than 2 ``tol``, the batched row's argmax is the same token."""
    eps = torch.finfo(torch.bfloat16).eps
    alone, together = _logits(tiny_model, torch.bfloat16)
    decided = 0
    for a, b in zip(alone, together, strict=True):
        for x, y in zip(a, b, strict=True):
            tol = 4 * eps * float(x.abs().max())
            assert float((x - y).abs().max()) <= tol
            top2 = x.topk(2).values
            if float(top2[0] - top2[1]) > 2 * tol:
                assert int(y.argmax()) == int(x.argmax())
                decided += 1
    assert decided >= len(PROMPT_LENS) * STEPS // 4  # the token check did run


def test_mixed_prefill_and_decode_batch(tiny_model: Path) -> None:
    """A batch holding a new session's prefill beside other sessions' decodes (float32)."""
    stage = Stage(tiny_model, 0, 6)
    old = [stage.new_cache() for _ in range(3)]
    for c, p in zip(old, ([1, 2, 3], [4, 5], [6]), strict=True):
        stage.forward(c, torch.tensor(p), 0)
    ref = [stage.forward(_clone(c), torch.tensor([7]), c.length) for c in old]
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
