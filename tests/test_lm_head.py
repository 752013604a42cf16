"""The fast greedy lm_head of a batched float32 CPU last stage: every greedy row's argmax is the
one the session gets alone, rows it cannot prove are recomputed exactly, and non-greedy rows stay
bit-identical to running alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from zpipe.kvcache import KVCache
from zpipe.shard import Stage, _max_row_norm


def _clone(cache: KVCache) -> KVCache:
    c = type(cache)(cache.layers, cache.n_kv_heads, cache.head_dim, cache.dtype, cache.device)
    c.import_(cache.export(cache.layers), cache.length)
    return c


def _prompts(vocab: int, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (3 + (7 * i) % 19,), generator=g) for i in range(n)]


def _decode(stage: Stage, prompts: list[torch.Tensor], steps: int, greedy: list[bool] | None,
            batched: bool) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Prefill each prompt alone, then ``steps`` decode steps (batched or one session at a
    time); every session follows its own argmax. Returns tokens and logits per session."""
    caches = [stage.new_cache() for _ in prompts]
    tokens = [[int(stage.forward(c, p, 0).argmax())] for c, p in zip(caches, prompts, strict=True)]
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    for _ in range(steps):
        items = [(c, torch.tensor([t[-1]]), c.length) for c, t in zip(caches, tokens, strict=True)]
        if batched:
            outs = stage.forward_batch(items, greedy=greedy)
        else:
            outs = [stage.forward(*item) for item in items]
        for i, o in enumerate(outs):
            tokens[i].append(int(o.argmax()))
            logits[i].append(o.clone())
    return tokens, logits


@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_greedy_argmax_equals_alone(request: pytest.FixtureRequest, model: str) -> None:
    path = request.getfixturevalue("tiny_model" if model == "tiny" else "smollm2")
    stage = Stage(path, 0, Stage(path, 0, 1).spec.num_layers)
    n = 12
    prompts = _prompts(stage.spec.vocab_size, n, seed=3)
    steps = 6 if model == "smollm2" else 12
    alone, _ = _decode(stage, prompts, steps, None, batched=False)
    before = stage.lm_head_checked
    together, _ = _decode(stage, prompts, steps, [True] * n, batched=True)
    assert together == alone
    assert stage.lm_head_checked - before == n * steps  # the fast path did run


def test_mixed_greedy_and_sampling_rows(tiny_model: Path) -> None:
    """Non-greedy rows (and a prefill's row) bit-identical to alone; greedy rows same argmax."""
    stage = Stage(tiny_model, 0, 6)
    prompts = _prompts(stage.spec.vocab_size, 6, seed=5)
    caches = [stage.new_cache() for _ in prompts]
    for c, p in zip(caches, prompts, strict=True):
        stage.forward(c, p, 0)
    xs = [torch.tensor([7 + i]) for i in range(len(prompts))]
    ref = [stage.forward(_clone(c), x, c.length) for c, x in zip(caches, xs, strict=True)]
    new_prompt = torch.tensor([8, 9, 10, 11])
    ref_new = stage.forward(stage.new_cache(), new_prompt, 0)
    greedy = [True, False, True, True, False, True, False]
    items = [(c, x, c.length) for c, x in zip(caches, xs, strict=True)]
    items.append((stage.new_cache(), new_prompt, 0))
    out = stage.forward_batch(items, greedy=greedy)
    for o, r, g in zip(out, [*ref, ref_new], greedy, strict=True):
        if g:
            assert int(o.argmax()) == int(r.argmax())
        else:
            assert torch.equal(o, r)


def test_tiny_margin_takes_exact_fallback(tiny_model: Path) -> None:
    """Two equal head rows: the top-2 margin is 0, so such rows must be recomputed exactly."""
    stage = Stage(tiny_model, 5, 6)
    head = stage.lm_head.clone()
    head[7] = head[5]  # tie: the exact argmax is the first of them, 5
    stage.lm_head, stage.lm_head_max_norm = head, _max_row_norm(head)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, head.shape[1], generator=g)
    # x . w_5 = c ||w_5||^2 is the top logit, tied with row 7 (rows 0 and 2; row 1 is sampled)
    h[0], h[2] = head[5] * 3, head[5] * 0.5
    h[3] = head[5] * 2 + 1e-3 * h[3]
    checked, rechecks = stage.lm_head_checked, stage.lm_head_rechecks
    with torch.inference_mode():
        out = stage._greedy_lm_head(h, [True, False, True, True])
    assert stage.lm_head_checked - checked == 3
    assert stage.lm_head_rechecks - rechecks == 3
    for r in range(4):  # all three greedy rows fell back, and row 1 is exact anyway
        exact = F.linear(h[r:r + 1], head)[0]
        assert torch.equal(out[r], exact)
        if r != 1:
            assert int(exact.argmax()) == 5


def test_all_rows_fall_back_when_nothing_is_provable(tiny_model: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A huge bound proves nothing: every greedy row is the exact (alone) row, bit for bit."""
    stage = Stage(tiny_model, 5, 6)
    monkeypatch.setattr(stage, "lm_head_max_norm", 1e30)
    h = torch.randn(5, stage.spec.hidden_size, generator=torch.Generator().manual_seed(1))
    rechecks = stage.lm_head_rechecks
    with torch.inference_mode():
        out = stage._greedy_lm_head(h, [True, True, False, True, True])
    assert stage.lm_head_rechecks - rechecks == 4
    for r in range(5):
        assert torch.equal(out[r], F.linear(h[r:r + 1], stage.lm_head)[0])


def test_other_paths_unchanged(tiny_model: Path) -> None:
    """bf16 ignores ``greedy`` (the same logits as a batch without the flags; how a bf16 batch
    compares with running alone: test_batching); one item is the plain path; a wrong number of
    flags is refused."""
    stage = Stage(tiny_model, 0, 6, dtype=torch.bfloat16)
    assert stage.lm_head_max_norm is None
    prompts = _prompts(stage.spec.vocab_size, 4, seed=7)
    plain_tokens, plain = _decode(stage, prompts, 4, None, batched=True)
    tokens, flagged = _decode(stage, prompts, 4, [True] * 4, batched=True)
    assert tokens == plain_tokens
    assert all(torch.equal(a, b) for x, y in zip(plain, flagged, strict=True)
               for a, b in zip(x, y, strict=True))
    fp32 = Stage(tiny_model, 0, 6)
    c1, c2 = fp32.new_cache(), fp32.new_cache()
    a = fp32.forward(c1, prompts[0], 0)
    (b,) = fp32.forward_batch([(c2, prompts[0], 0)], greedy=[True])
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="greedy flags"):
        fp32.forward_batch([(c1, torch.tensor([1]), c1.length)], greedy=[True, False])
