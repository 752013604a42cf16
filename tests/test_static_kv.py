"""The static KV pool (zpipe/slots.py) and batched decode over it (zpipe/decode.py), on the CPU
(no CUDA graphs here; the same step function is what a GPU node captures)."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch
import zmq

from nodes.executor import Executor
from nodes.rows import RowState, join_rows
from zpipe import protocol
from zpipe.config import StaticKV
from zpipe.decode import Decoder
from zpipe.kvcache import KVCache
from zpipe.shard import Stage, padded_counts, padded_rows
from zpipe.slots import KVFull, SlotKV, SlotPool

PROMPTS = {"a": [1, 5, 9, 33, 7], "b": [2, 8], "c": [4, 4, 4, 19, 20, 21]}


def _step(sid: str, step: int, pos: int, ids: list[int], epoch: int = 1) -> protocol.Message:
    frames = protocol.encode("step", {"x": torch.tensor(ids)}, epoch=epoch, stage=0,
                             rows=[[sid, step, pos, len(ids)]], sampling=[{}])
    return protocol.decode([zmq.Frame(bytes(f)) for f in frames])


def _generate(ex: Executor, steps: int) -> dict[str, list[int]]:
    """Greedy tokens of every prompt, all sessions stepped together after their prefills."""
    toks: dict[str, list[int]] = {}
    for sid, p in PROMPTS.items():
        (out,) = ex.step_batch(ex.rows_of(_step(sid, 0, 0, p)))
        toks[sid] = [out[0]]
    for s in range(1, steps):
        rows = [r for sid, p in PROMPTS.items()
                for r in ex.rows_of(_step(sid, s, len(p) + s - 1, [toks[sid][-1]]))]
        for t, out in zip(toks.values(), ex.step_batch(rows), strict=True):
            assert not isinstance(out, Exception), out
            t.append(out[0])
    return toks


def eager_reference(tiny_model: Path) -> dict[str, list[int]]:
    """Every prompt's greedy tokens from the eager path (no pool, no decoder)."""
    ex = Executor(tiny_model, "float32", "cpu")
    ex.load(0, ex.spec.num_layers, epoch=1)
    return _generate(ex, 24)


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> dict[str, list[int]]:
    return eager_reference(tiny_model)


def _static(tiny_model: Path, **kw) -> Executor:
    ex = Executor(tiny_model, "float32", "cpu", static_kv=StaticKV(enabled=True, **kw))
    ex.load(0, ex.spec.num_layers, epoch=1)
    return ex


def test_batched_decode_on_slots_gives_the_eager_tokens(tiny_model, reference) -> None:
    ex = _static(tiny_model)
    assert ex.decoder is not None and ex.pool is not None
    assert _generate(ex, 24) == reference
    assert all(isinstance(c, SlotKV) for c in ex.caches.values())


def test_a_replaced_stage_is_freed_without_the_collector(tiny_model) -> None:
    """Nodes freeze the collector's view after a load (``settle_gc``), so a stage and its
    decoder must not sit in reference cycles: refcounting alone frees them when a load
    replaces them, or their memory would stay after every move."""
    ex = _static(tiny_model)
    n = ex.spec.num_layers
    ex.load(0, n - 1, epoch=1)
    stage, decoder, pool = weakref.ref(ex.stage), weakref.ref(ex.decoder), weakref.ref(ex.pool)
    gc.disable()
    try:
        ex.load(1, n, epoch=2)
        assert stage() is None and decoder() is None and pool() is None
    finally:
        gc.enable()


def test_decode_rows_go_on_as_one_block(tiny_model) -> None:
    """An inner stage's decode rows come back as rows of one hidden block, which goes on
    whole (no copy); a part of it, reordered rows, or rows beside a prefill's are joined in
    order, each equal to its row of the block."""
    n = Executor(tiny_model, "float32", "cpu").spec.num_layers
    ex = _static(tiny_model)
    ex.load(0, n - 1, epoch=1)
    prefill = {}
    for sid, p in PROMPTS.items():
        prefill[sid] = join_rows(ex.step_batch(ex.rows_of(_step(sid, 0, 0, p))))
        assert prefill[sid].shape[0] == len(p)
    rows = [r for sid, p in PROMPTS.items() for r in ex.rows_of(_step(sid, 1, len(p), [3]))]
    outs = ex.step_batch(rows)
    assert [type(o) for o in outs] == [RowState] * 3 and [o.off for o in outs] == [0, 1, 2]
    block = join_rows(outs)
    assert block is outs[0].src and block.shape == (3, ex.spec.hidden_size)
    assert torch.equal(join_rows(outs[::-1]), block.flip(0))
    assert torch.equal(join_rows(outs[1:]), block[1:])
    assert torch.equal(join_rows([outs[2]]), block[2:])
    mixed = join_rows([outs[1], prefill["b"], outs[0]])
    assert torch.equal(mixed, torch.cat([block[1:2], prefill["b"], block[:1]]))


def test_sessions_beyond_the_slots_or_their_length_fall_back_to_eager(tiny_model,
                                                                       reference) -> None:
    ex = _static(tiny_model, slots=2, max_len=16)  # c gets no slot; a and b outgrow theirs
    assert _generate(ex, 24) == reference
    assert not any(isinstance(c, SlotKV) for c in ex.caches.values())
    assert sorted(ex.pool.free_slots) == [0, 1]  # spilled slots went back to the pool
    ex.free(list(PROMPTS))
    assert ex.caches == {}


def test_free_and_a_new_prefill_release_the_slot(tiny_model) -> None:
    ex = _static(tiny_model, slots=1)
    ex.step_batch(ex.rows_of(_step("a", 0, 0, [1, 2])))
    assert ex.pool.free_slots == []
    ex.step_batch(ex.rows_of(_step("a", 0, 0, [3])))  # a restart of the same session
    assert isinstance(ex.caches["a"], SlotKV) and ex.caches["a"].length == 1
    ex.free(["a"])
    assert ex.pool.free_slots == [0]


def test_decoder_rows_in_any_order_and_batch_size(tiny_model) -> None:
    st = Stage(tiny_model, 0, 2)  # a first stage: hidden states out
    pool = SlotPool(range(0, 2), st.spec.num_kv_heads, st.spec.head_dim, 4, 32, st.dtype, "cpu")
    dec = Decoder(st, pool, max_batch=4)
    caches = [pool.session() for _ in range(3)]
    for c, n in zip(caches, (3, 5, 2), strict=True):
        st.forward(c, torch.arange(1, n + 1), 0)
    ids = torch.tensor([7, 8, 9])
    together = dec.run(ids, [c.slot for c in caches], [c.length for c in caches])
    alone = []
    for c, t in zip(reversed(caches), reversed(ids.tolist()), strict=True):
        alone.append(dec.run(torch.tensor([t]), [c.slot], [c.length]))
    torch.testing.assert_close(together, torch.cat(alone[::-1]), rtol=1e-5, atol=1e-5)
    # The same step eagerly, on a copy of each session's cache.
    for c, t, row in zip(caches, ids.tolist(), together, strict=True):
        plain = KVCache(range(0), c.n_kv_heads, c.head_dim, c.dtype, c.device)
        plain.import_(c.export(range(0, 2), tokens=range(c.length)), c.length)
        torch.testing.assert_close(st.forward(plain, torch.tensor([t]), c.length)[0], row,
                                   rtol=1e-4, atol=1e-5)


def test_pool_slots_retarget_and_spill(tiny_model) -> None:
    pool = SlotPool(range(0, 2), 2, 4, slots=2, max_len=8, dtype=torch.float32, device="cpu")
    a, b = pool.session(), pool.session()
    assert (a.slot, b.slot, pool.session(), pool.scratch) == (0, 1, None, 2)
    k = torch.randn(2, 3, 4)
    for layer in (0, 1):
        a.append(layer, k, -k)
    a.advance(3)
    with pytest.raises(KVFull):
        a.append(0, torch.randn(2, 6, 4), torch.randn(2, 6, 4))
    kept = pool.k[1]
    pool.retarget(range(1, 3))
    a.rebind()
    assert pool.k[1] is kept and sorted(a.k) == [1, 2] and 0 not in pool.k
    torch.testing.assert_close(a.k[1][:, :3], k)
    plain = a.spill()
    assert plain.length == 3 and sorted(plain.k) == [1, 2] and pool.free_slots == [0]
    torch.testing.assert_close(plain.v[1][:, :3], -k)
    with pytest.raises(ValueError):
        pool.give(0)  # already free


def test_a_move_keeps_slot_sessions_exact(tiny_model, reference) -> None:
    """Layers move between two static-KV executors mid-generation; the tokens do not change."""
    n = Executor(tiny_model, "float32", "cpu").spec.num_layers
    a = _static(tiny_model)
    a.load(0, n - 1, epoch=1)
    b = _static(tiny_model)
    b.load(n - 1, n, epoch=1)
    toks: dict[str, list[int]] = {}

    def step(sid: str, s: int, pos: int, ids: list[int]) -> int:
        h = join_rows(a.step_batch(a.rows_of(_step(sid, s, pos, ids, a.epoch))))
        msg = protocol.decode([zmq.Frame(bytes(f)) for f in protocol.encode(
            "step", {"x": h}, epoch=b.epoch, stage=1, rows=[[sid, s, pos, len(ids)]],
            sampling=[{}])])
        (out,) = b.step_batch(b.rows_of(msg))
        return out[0]

    for sid, p in PROMPTS.items():
        toks[sid] = [step(sid, 0, 0, p)]
    for s in range(1, 24):
        if s == 10:  # layer n-2 moves from a to b
            a.prepare(0, n - 2, 2)
            b.prepare(n - 2, n, 2)
            for sid in PROMPTS:
                length, kv = a.export_kv(sid, n - 2, n - 1)
                b.import_kv(sid, length, kv)
            a.commit(2)
            b.commit(2)
            assert all(isinstance(c, SlotKV) for c in b.caches.values())
            assert sorted(b.pool.k) == [n - 2, n - 1]
        for sid, p in PROMPTS.items():
            toks[sid].append(step(sid, s, len(p) + s - 1, [toks[sid][-1]]))
    assert toks == reference


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_replay_what_the_step_computes(tiny_model) -> None:
    """Graph replays (with padded, shrinking and growing batches) give exactly the tokens of
    the same decoder run without graphs, on one node and on two chained ones (hidden states
    handed on from the host), and never touch other sessions' slots. Prompts go through the
    decoder both ways (bucket 8 for 5 and 6 tokens: padded; 2: exact)."""
    n_layers = Executor(tiny_model, "float32", "cpu").spec.num_layers

    def run(graphs: bool, split: bool) -> dict[str, list[int]]:
        ranges = [(0, n_layers // 2), (n_layers // 2, n_layers)] if split else [(0, n_layers)]
        exs = []
        for start, end in ranges:
            ex = Executor(tiny_model, "bfloat16", "cuda:0", max_batch=8,
                          static_kv=StaticKV(cuda_graphs=graphs))
            ex.load(start, end, epoch=1)
            assert ex.decoder.prefills == graphs  # on by default with graphs
            ex.decoder.prefills = True
            exs.append(ex)

        def step(rows: list[list], x: torch.Tensor) -> list:
            for i, ex in enumerate(exs):
                frames = protocol.encode("step", {"x": x}, epoch=1, stage=i, rows=rows,
                                         sampling=[{}] * len(rows))
                outs = ex.step_batch(ex.rows_of(
                    protocol.decode([zmq.Frame(bytes(f)) for f in frames])))
                if i < len(exs) - 1:
                    x = join_rows(outs)
            return [o[0] for o in outs]

        toks = {sid: step([[sid, 0, 0, len(p)]], torch.tensor(p)) for sid, p in PROMPTS.items()}
        for s in range(1, 20):
            live = list(PROMPTS)[: 1 + s % 3]  # batches of 2, 3, 1, 2, ... rows
            rows = [[sid, len(toks[sid]), len(PROMPTS[sid]) + len(toks[sid]) - 1, 1]
                    for sid in live]
            for sid, t in zip(live, step(rows, torch.tensor([toks[sid][-1] for sid in live])),
                              strict=True):
                toks[sid].append(t)
        if graphs:
            assert all(ex.decoder.captures >= 3 for ex in exs)
        return toks

    alone = run(False, False)
    assert run(True, False) == alone
    assert run(True, True) == run(False, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decoder_rows_and_eager_rows_join_across_devices() -> None:
    """An inner GPU stage's batch can hold decoder rows (on the host) beside eager rows (on
    the GPU), e.g. a decode cohort and prompts that do not fit a replay: joined on the host."""
    host = torch.arange(6.0).view(3, 2)
    gpu = torch.arange(6.0, 10.0).view(2, 2).to("cuda:0")
    joined = join_rows([RowState(host, 1), gpu, RowState(host, 0, 1)])
    assert joined.device.type == "cpu"
    assert joined.tolist() == [[2.0, 3.0], [6.0, 7.0], [8.0, 9.0], [0.0, 1.0]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_prefills_stay_off_cudnn_attention(tiny_model: Path) -> None:
    """cuDNN's attention plans every new shape (50-100 ms on an H100 for each new prefill batch
    size): a GPU stage's prefills, alone and attended together, use another backend, and the
    process-wide backend flags are as they were afterwards."""
    from torch.profiler import ProfilerActivity, profile

    st = Stage(tiny_model, 0, 6, dtype=torch.bfloat16, device="cuda:0")
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        st.forward_batch([(st.new_cache(), torch.tensor([1, 5, 9, 33, 7]), 0)])
        st.forward_batch([(st.new_cache(), torch.tensor(p), 0) for p in ([2, 8, 3], [4, 4, 4])])
        torch.cuda.synchronize()
    ops = {e.key for e in prof.key_averages()}
    assert "aten::scaled_dot_product_attention" in ops
    assert not [op for op in ops if "cudnn_attention" in op]
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


@pytest.mark.parametrize("pooled", [False, True])
def test_prefills_attended_together_match_alone(tiny_model: Path, pooled: bool) -> None:
    """GPU nodes run a burst of fresh prefills through one attention call per layer
    (``PrefillRun``); forced on here on the CPU, it gives what each row gives alone: the same
    logits (to float32 rounding) and the same greedy tokens, and the same K/V in the caches."""
    prompts = [[1, 5, 9, 33, 7], [2, 8, 3, 3, 1], [4, 4, 4, 19], [7, 7], [9] * 6, [3, 1, 4] * 5]

    def run(group: bool) -> tuple[list, list]:
        st = Stage(tiny_model, 0, 6)
        st.group_prefills = group
        spec = st.spec
        pool = SlotPool(range(6), spec.num_kv_heads, spec.head_dim, 16, 64, st.dtype, "cpu")
        new = pool.session if pooled else st.new_cache
        old = new()
        st.forward_batch([(old, torch.tensor([5, 6, 7]), 0)])  # a session already under way
        caches = [new() for _ in prompts]
        items = [(c, torch.tensor(p), 0) for c, p in zip(caches, prompts, strict=True)]
        # A decode row splits the fresh prefills into two runs; the long last one pads 3x and
        # goes alone.
        items.insert(2, (old, torch.tensor([8]), 3))
        if group:
            runs = st._prefill_runs(items, [len(x) for _, x, _ in items])
            assert {i: len(r.caches) for i, r in runs.items()} == {0: 2, 3: 3}
        outs = st.forward_batch(items)
        kv = [(la, c.k[la][:, :c.length].clone(), c.v[la][:, :c.length].clone())
              for c, _, _ in items for la in range(6)]
        return outs, kv

    alone, kv_alone = run(False)
    together, kv_together = run(True)
    for a, b in zip(alone, together, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        assert int(a.argmax()) == int(b.argmax())
    for (la, ka, va), (_, kb, vb) in zip(kv_alone, kv_together, strict=True):
        if la == 0:  # the first layer's K/V come from the same numbers: written exactly
            assert torch.equal(ka, kb) and torch.equal(va, vb)
        torch.testing.assert_close(kb, ka, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vb, va, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("last", [False, True])
def test_padded_batches_give_what_unpadded_give(tiny_model: Path, last: bool) -> None:
    """GPU stages run a batch as ``padded_rows`` rows (``pad_rows``); forced on here on the CPU,
    a batch of a decode row and prefills (grouped and alone) gives the same outputs (to float32
    rounding), the same greedy tokens and the same K/V as unpadded, and the padding reaches
    no cache."""
    layers = (3, 6) if last else (0, 3)
    prompts = [[1, 5, 9, 33, 7], [2, 8, 3, 3, 1, 6], [4, 4, 4, 19]]

    rows: dict[bool, set[int]] = {False: set(), True: set()}

    def run(pad: bool) -> tuple[list, list]:
        torch.manual_seed(0)
        st = Stage(tiny_model, *layers)
        st.group_prefills, st.pad_rows = True, pad
        layer = st._layer

        def seen(i, w, h, *args):
            rows[pad].add(h.shape[0])
            return layer(i, w, h, *args)

        st._layer = seen

        def x(n: int) -> torch.Tensor:
            return (torch.randint(0, 100, (n,)) if st.first
                    else torch.randn(n, st.spec.hidden_size))

        old = st.new_cache()
        st.forward_batch([(old, x(3), 0)])
        caches = [st.new_cache() for _ in prompts]
        items = [(old, x(1), 3)] + [(c, x(len(p)), 0) for c, p in zip(caches, prompts,
                                                                       strict=True)]
        outs = st.forward_batch(items)  # 16 tokens: no padding
        caches.append(st.new_cache())
        outs += st.forward_batch([(caches[-1], x(5), 0), (old, x(1), 4)])  # 6 run as 8
        kv = [(c.length, c.k[la][:, :c.length].clone(), c.v[la][:, :c.length].clone())
              for c in [old, *caches] for la in range(*layers)]
        return outs, kv

    plain, kv_plain = run(False)
    padded, kv_padded = run(True)
    assert rows == {False: {3, 16, 6}, True: {4, 16, 8}}
    for a, b in zip(plain, padded, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        if last:
            assert int(a.argmax()) == int(b.argmax())
    for (na, ka, va), (nb, kb, vb) in zip(kv_plain, kv_padded, strict=True):
        assert na == nb and ka.shape == kb.shape
        torch.testing.assert_close(kb, ka, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vb, va, rtol=1e-5, atol=1e-5)


def test_warmed_counts_cover_every_padded_batch(tiny_model: Path) -> None:
    """``warm_matmuls`` meets the shape of every batch a GPU stage can run: each token count
    up to the limit pads to a warmed count; on the CPU (no padding) nodes skip it."""
    for limit in (1, 7, 64, 65, 1000, 8192):
        counts = padded_counts(limit)
        assert counts == sorted(set(counts))
        assert {padded_rows(n) for n in range(1, limit + 1)} == set(counts)
    st = Stage(tiny_model, 3, 6)
    assert st.warm_matmuls(130, 4) >= 0 and not st.pad_rows


def test_prompts_through_the_decoder_give_the_eager_tokens(tiny_model, reference) -> None:
    """Prefill through the decoder (on by default where CUDA graphs are): a prompt's tokens
    are decoder rows of one slot, causal because every row's K/V is written before any row
    attends. One prompt a message, and all three in one batch; more prompt tokens than the
    decoder's largest batch run eagerly."""
    ex = Executor(tiny_model, "float32", "cpu", static_kv=StaticKV(enabled=True))
    ex.load(0, ex.spec.num_layers, epoch=1)
    assert not ex.decoder.prefills  # the CPU's default: eager prompts, bit-exact
    ex.decoder.prefills = True
    through = []
    real = ex._prefill
    ex._prefill = lambda ready: through.append(len(ready)) or real(ready)
    assert _generate(ex, 24) == reference
    assert through == [1, 1, 1]
    for max_batch, expect in ((64, [3]), (8, [])):  # 13 prompt tokens in all
        ex.free(list(PROMPTS))
        ex.decoder.max_batch = max_batch
        through.clear()
        rows = [r for sid, p in PROMPTS.items() for r in ex.rows_of(_step(sid, 0, 0, p))]
        firsts = [out[0] for out in ex.step_batch(rows)]
        assert firsts == [t[0] for t in reference.values()] and through == expect
        assert all(ex.caches[sid].length == len(p) for sid, p in PROMPTS.items())


def test_an_inner_stage_prompt_through_the_decoder_gives_the_eager_states(tiny_model) -> None:
    n = Executor(tiny_model, "float32", "cpu").spec.num_layers
    eager = Executor(tiny_model, "float32", "cpu")
    eager.load(0, n - 1, epoch=1)
    ex = Executor(tiny_model, "float32", "cpu", static_kv=StaticKV(enabled=True))
    ex.load(0, n - 1, epoch=1)
    ex.decoder.prefills = True
    rows = [r for sid, p in PROMPTS.items() for r in ex.rows_of(_step(sid, 0, 0, p))]
    outs = ex.step_batch(rows)
    assert [type(o) for o in outs] == [RowState] * 3
    assert [o.n for o in outs] == [len(p) for p in PROMPTS.values()]
    block = join_rows(outs)
    assert block is outs[0].src and block.shape[0] == sum(map(len, PROMPTS.values()))
    for (sid, p), out in zip(PROMPTS.items(), outs, strict=True):
        (want,) = eager.step_batch(eager.rows_of(_step(sid, 0, 0, p)))
        torch.testing.assert_close(out.x, want, rtol=1e-4, atol=1e-4)
