"""A stage split by KV-head groups computes what the whole stage computes.

Each member holds some KV heads (their q/k/v rows, their o_proj columns) and the matching
share of the MLP's intermediate columns; the members' partial outputs are added per layer (after
attention and after the MLP) and the residual once. The members here are threads of one process
whose combine meets at a barrier, so the math is tested apart from the network.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from zpipe.heads import split_heads
from zpipe.shard import Stage, head_slices, sum_partials

N_NEW = 24
PROMPT = "The history of the printing press begins"
# float32 partial sums change the order of a layer's reductions, not their terms: the split's
# logits stay within this of the whole stage's over a generation (measured: 1e-4 on SmolLM2,
# 2e-7 on the tiny model; not bit-exact), while greedy tokens come out the same.
LOGIT_TOL = 1e-3


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class ThreadGroup:
    """The members of one split stage as threads: ``combine`` adds every member's partial in
    member order (``sum_partials``), as the node group does over its sockets."""

    def __init__(self, stages: list[Stage]) -> None:
        self.stages = stages
        self.parts: list[torch.Tensor | None] = [None] * len(stages)
        self.barrier = threading.Barrier(len(stages))
        for i, stage in enumerate(stages):
            stage.combine = self._combiner(i)
        self.pool = ThreadPoolExecutor(len(stages))

    def _combiner(self, i: int):
        def combine(part: torch.Tensor) -> torch.Tensor:
            self.parts[i] = part
            self.barrier.wait()
            total = sum_partials(self.parts)
            self.barrier.wait()  # nobody overwrites a part before everyone has added them
            return total
        return combine

    def forward(self, caches: list, x: torch.Tensor, pos: int) -> list[torch.Tensor]:
        runs = [self.pool.submit(s.forward, c, x, pos)
                for s, c in zip(self.stages, caches, strict=True)]
        return [r.result(timeout=120) for r in runs]


def _generate(forward, n_new: int, prompt: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    tokens, logits = [], []
    out = forward(torch.tensor(prompt), 0)
    for i in range(n_new):
        logits.append(out)
        tokens.append(int(out.argmax()))
        if i + 1 < n_new:
            out = forward(torch.tensor(tokens[-1:]), len(prompt) + i)
    return tokens, logits


def _whole(model: Path, prompt: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    stage = Stage(model, 0, Stage(model, 0, 1).spec.num_layers)
    cache = stage.new_cache()
    return _generate(lambda x, pos: stage.forward(cache, x, pos), N_NEW, prompt)


def _split(model: Path, parts: int, prompt: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    layers = Stage(model, 0, 1).spec.num_layers
    kv = Stage(model, 0, 1).spec.num_kv_heads
    stages = [Stage(model, 0, layers, heads=h) for h in split_heads(kv, parts)]
    group = ThreadGroup(stages)
    caches = [s.new_cache() for s in stages]

    def forward(x: torch.Tensor, pos: int) -> torch.Tensor:
        outs = group.forward(caches, x, pos)
        for o in outs[1:]:  # every member ends with the same bits
            assert torch.equal(o, outs[0])
        return outs[0]

    try:
        return _generate(forward, N_NEW, prompt)
    finally:
        group.pool.shutdown()


def _reference(model: Path, prompt: list[int]) -> list[int]:
    hf = LlamaForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=N_NEW, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_head_slices_cover_the_layer(smollm2: Path) -> None:
    """The members' slices of every part tile it exactly, whatever the split."""
    spec = Stage(smollm2, 0, 1).spec
    for parts in (1, 2, 3):
        cuts = [head_slices(spec, h) for h in split_heads(spec.num_kv_heads, parts)]
        for part in cuts[0]:
            spans = [c[part][1:] for c in cuts]
            assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in pairwise(spans))
    full = head_slices(spec, (0, spec.num_kv_heads))
    assert full["self_attn.q_proj"][2] == spec.num_heads * spec.head_dim
    assert full["mlp.down_proj"][2] == spec.config.intermediate_size
    with pytest.raises(ValueError):
        head_slices(spec, (2, 4))


def test_split_stage_holds_its_share(smollm2: Path) -> None:
    whole = Stage(smollm2, 3, 5)
    part = Stage(smollm2, 3, 5, heads=(1, 2))
    assert part.kv_heads == 1 and part.new_cache().n_kv_heads == 1
    assert whole.weight_bytes() > 2.5 * part.weight_bytes()
    w, p = whole.layers[0], part.layers[0]
    hd, rep = whole.spec.head_dim, whole.spec.num_heads // whole.spec.num_kv_heads
    assert torch.equal(p[1], w[1][rep * hd:2 * rep * hd])  # q rows of KV head 1's queries
    assert torch.equal(p[2], w[2][hd:2 * hd])  # k rows of KV head 1
    assert torch.equal(p[4], w[4][:, rep * hd:2 * rep * hd])  # their o_proj columns
    assert torch.equal(p[8], w[8][:, 512:1024])  # a third of down_proj's columns
    assert Stage(smollm2, 3, 5, heads=(0, 3)).heads is None  # every head: a plain stage
    with pytest.raises(ValueError, match="combine"):
        part.forward(part.new_cache(), torch.zeros(1, 576), 0)


@pytest.mark.parametrize("parts", [2, 3])
def test_smollm2_split_matches_whole_and_transformers(smollm2: Path, parts: int) -> None:
    prompt = AutoTokenizer.from_pretrained(smollm2)(PROMPT).input_ids
    want = _reference(smollm2, prompt)
    tokens, logits = _whole(smollm2, prompt)
    split_tokens, split_logits = _split(smollm2, parts, prompt)
    assert tokens == want
    assert split_tokens == want
    diff = max((a - b).abs().max().item() for a, b in zip(logits, split_logits, strict=True))
    assert diff <= LOGIT_TOL


def test_tiny_split_matches_whole_and_transformers(tiny_model: Path) -> None:
    prompt = [1, 15, 300, 42, 9, 77, 3]
    want = _reference(tiny_model, prompt)
    tokens, logits = _whole(tiny_model, prompt)
    split_tokens, split_logits = _split(tiny_model, 2, prompt)
    assert tokens == want and split_tokens == want
    diff = max((a - b).abs().max().item() for a, b in zip(logits, split_logits, strict=True))
    assert diff <= LOGIT_TOL
