"""Batched decode on a static KV pool: one new token for each of B sessions through a stage's
layers in fixed shapes, so that on a GPU it is captured once per (batch, length) bucket as a
CUDA graph and replayed every step (eager PyTorch spends ~0.5 ms per layer launching kernels).

The math is ``zpipe.shard``'s (its RMSNorm, RoPE tables and layer order), rearranged for
decode: q/k/v and gate/up are each one matmul over fused weights, every session's K/V is
written into and read from its pool slot by index, and attention masks each row to its own
length. Not bit-identical to ``Stage.forward`` (fused matmuls round differently); the same
greedy tokens in the tests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from zpipe import triton_kernels
from zpipe.shard import Stage, _rms_norm, _rotate_half
from zpipe.slots import SlotPool

log = logging.getLogger("zpipe.decode")

MIN_LEN_BUCKET = 256


def _add_rms(h: Tensor, r: Tensor | None, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    if r is not None:
        h = h + r
    return h, _rms_norm(h, w, eps)


def _rope(qk: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE over the query and key heads together (``[B, heads + kv_heads, hd]``): one
    kernel where two tensors would take two."""
    return qk * cos + _rotate_half(qk) * sin


def _silu_mul(gu: Tensor) -> Tensor:
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


def _pick(logits: Tensor) -> Tensor:
    """Per row (argmax id, its logprob) as float64 ``[B, 2]`` (one transfer brings both back;
    float64 holds every token id exactly). The logprob of the argmax is ``-log(sum(exp(x -
    max)))``: no float32 copy of the logits nor a full log-softmax. The argmax is the first
    index holding the max, found with ``amin``: compiled, plain min/max/sum reductions split
    a 128k-long row across the GPU, where an argmax runs it in one program (31 µs)."""
    x = logits.float()
    vocab = x.shape[-1]
    top = x.amax(dim=-1, keepdim=True)
    index = torch.arange(vocab, device=x.device)
    ids = torch.where(x == top, index, vocab).amin(dim=-1).clamp(max=vocab - 1)  # NaN: last id
    lp = -torch.log(torch.exp(x - top).sum(dim=-1))
    return torch.stack([ids.double(), lp.double()], dim=1)


def compiled_or_eager(f: Callable, *example: Tensor,
                      backend: str | Callable = "inductor") -> Callable:
    """``torch.compile(f)``, tried once on ``example``; ``f`` itself if that fails.

    Compilation is lazy: a missing compiler or toolchain raises at the first call, not at
    ``torch.compile``, so only a call shows whether the compiled function can run here.
    """
    try:
        compiled = torch.compile(f, dynamic=True, backend=backend)
        with torch.inference_mode():
            compiled(*example)
        return compiled
    except Exception as e:  # any compiler or toolchain failure: run uncompiled
        log.warning("torch.compile of %s failed (%s: %.300s); running it uncompiled",
                    f.__name__, type(e).__name__, " ".join(str(e).split()))
        return f


def bucket(n: int, limit: int, smallest: int = 1) -> int:
    """The power of two ``>= n`` (at least ``smallest``), capped at ``limit``."""
    b = smallest
    while b < n:
        b *= 2
    return min(b, limit)


class Decoder:
    """Decode steps for the sessions of ``pool`` through ``stage``.

    ``graphs``: capture and replay CUDA graphs (CUDA devices only). ``compile``: fuse RoPE, SiLU
    and the last stage's pick with ``torch.compile`` (CUDA only; residual add + RMSNorm is a
    Triton kernel there).
    ``triton_attention``: attention read in place from the pool by a Triton kernel (CUDA
    only; else each row's K/V is gathered and SDPA runs over a masked length bucket).
    """

    def __init__(self, stage: Stage, pool: SlotPool, max_batch: int, *, graphs: bool = True,
                 compile: bool = True, triton_attention: bool = True) -> None:
        if stage.spec.config.hidden_act != "silu":
            raise ValueError(f"static decode supports hidden_act 'silu', not "
                             f"{stage.spec.config.hidden_act!r}")
        self.stage, self.pool = stage, pool
        self.device = stage.device
        self.graphs_on = graphs and self.device.type == "cuda"
        self.max_batch = bucket(max(1, min(max_batch, pool.slots)), 1 << 30)
        spec = stage.spec
        self.n_heads, self.n_kv, self.hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.triton_attention = (triton_attention and triton_kernels.available(self.device)
                                 and not self.hd & (self.hd - 1) and self.hd >= 16)
        self.layers = self._fuse(stage)
        with torch.inference_mode():
            pos = torch.arange(pool.max_len, device=self.device)
            probe = torch.empty(0, dtype=stage.dtype, device=self.device)
            cos, sin = stage.rotary(probe, pos[None])  # transformers' RoPE, in stage.dtype
            self.cos, self.sin = cos[0], sin[0]
            self.key_pos = pos
        self.add_rms, self.rope, self.silu_mul, self.pick = _add_rms, _rope, _silu_mul, _pick
        if compile and self.device.type == "cuda":
            # Each compiled now on a batch of 2 (each falls back to eager on its own if its
            # compile fails: the graphs still remove launch cost). The pick: split reductions,
            # 61 -> ~14 µs per step at batch 1 on an H100.
            dt, dev = stage.dtype, self.device
            cs = self.cos[:2][:, None]
            self.rope = compiled_or_eager(
                _rope, torch.zeros(2, self.n_heads + self.n_kv, self.hd, dtype=dt, device=dev),
                cs, cs)
            self.silu_mul = compiled_or_eager(_silu_mul, torch.zeros(
                2, 2 * int(spec.config.intermediate_size), dtype=dt, device=dev))
            if stage.last:
                self.pick = compiled_or_eager(_pick, torch.zeros(
                    2, spec.vocab_size, dtype=dt, device=dev))
        if triton_kernels.available(self.device):
            self.add_rms = triton_kernels.add_rms
        # Prompts through the decoder's graphs too (``run(prefill=True)``): on by default
        # where graphs are (an eager prefill launches every kernel from Python).
        self.prefills = self.graphs_on
        self._graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, object]] = {}
        if self.graphs_on:
            b = self.max_batch
            # A step's slots (row 0), positions (row 1) and, on the first stage, token ids (row
            # 2), then on later stages its hidden states, lie in one pinned staging buffer and
            # go to the GPU in one asynchronous copy (each copy costs ~20-40 µs of host time).
            # The host does not wait for it: the replay queues behind it.
            rows = 3 if stage.first else 2
            n_idx = rows * b * 8
            n_x = 0 if stage.first else b * spec.hidden_size * stage.dtype.itemsize
            self._host = torch.zeros(n_idx + n_x, dtype=torch.uint8).pin_memory()
            self._dev = torch.zeros(n_idx + n_x, dtype=torch.uint8, device=self.device)
            self._host_np = self._host.numpy()
            self._host_idx_np = self._host_np[:n_idx].view(np.int64).reshape(rows, b)
            self._idx = self._dev[:n_idx].view(torch.int64).view(rows, b)
            self._slots, self._pos = self._idx[0], self._idx[1]
            self._n_idx = n_idx
            if stage.first:
                self._x = self._idx[2]
            else:
                self._x = self._dev[n_idx:].view(stage.dtype).view(b, spec.hidden_size)
            self._mempool = torch.cuda.graph_pool_handle()
        self.captures = 0
        self.capture_s = 0.0

    @staticmethod
    def _fuse(stage: Stage) -> list[tuple[Tensor, ...]]:
        """Per layer (ln1, wqkv, wo, ln2, wgu, wd). The stage's own q/k/v and gate/up weights
        become views of the fused ones, so the weights are not held twice."""
        fused = []
        for i, (ln1, wq, wk, wv, wo, ln2, wg, wu, wd) in enumerate(stage.layers):
            wqkv, wgu = torch.cat([wq, wk, wv]), torch.cat([wg, wu])
            q, k = wq.shape[0], wk.shape[0]
            views = (wqkv[:q], wqkv[q:q + k], wqkv[q + k:], wgu[:wg.shape[0]], wgu[wg.shape[0]:])
            stage.layers[i] = (ln1, views[0], views[1], views[2], wo, ln2, views[3], views[4], wd)
            prefix = f"model.layers.{stage.start + i}."
            for part, t in zip(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                "mlp.gate_proj", "mlp.up_proj"), views, strict=True):
                stage.weights[f"{prefix}{part}.weight"] = t
            fused.append((ln1, wqkv, wo, ln2, wgu, wd))
        return fused

    def length_bucket(self, longest: int, prefill: bool = False) -> int:
        """The key length a step is shaped for; 0 with the Triton kernel, which reads each
        row's true length on the device (one graph per batch bucket then). Prefills always
        take the portable path."""
        if self.triton_attention and not prefill:
            return 0
        return bucket(longest, self.pool.max_len, MIN_LEN_BUCKET)

    @torch.inference_mode()
    def step(self, x: Tensor, slots: Tensor, pos: Tensor, length: int, prefill: bool = False):
        """One token per row: ``x`` ids ``[B]`` (first stage) or hidden ``[B, hidden]``,
        ``slots``/``pos`` ``[B]`` on the device, every ``pos < length`` (unless 0: the Triton
        kernel). Writes each row's K/V at ``pos`` of its slot. Returns hidden ``[B, hidden]``,
        or on the last stage
        ``(logits [B, vocab] in the stage's dtype, [B, 2] float64 of (argmax id, its
        logprob))``.

        ``prefill``: rows may share a slot (a prompt's tokens at consecutive positions). Every
        row's K/V is written before any row attends (the portable path), so each token sees
        the prompt up to itself: causal. The Triton kernel writes and reads in one launch."""
        st, pool = self.stage, self.pool
        b, hd, n_kv = slots.shape[0], self.hd, self.n_kv
        in_place = self.triton_attention and not prefill
        h = F.embedding(x, st.embed) if st.first else x
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # [B, 1, hd]
        if not in_place:
            mask = (self.key_pos[:length][None] <= pos[:, None])[:, None, None]  # [B, 1, 1, L]
        qd, kd = self.n_heads * hd, n_kv * hd
        r = None
        for layer, (ln1, wqkv, wo, ln2, wgu, wd) in enumerate(self.layers, st.start):
            h, xn = self.add_rms(h, r, ln1, st.eps)
            qkv = F.linear(xn, wqkv)
            qk = self.rope(qkv[:, :qd + kd].view(b, -1, hd), cos, sin)
            q, k = qk[:, :self.n_heads], qk[:, self.n_heads:]
            v = qkv[:, qd + kd:].view(b, n_kv, hd)
            kc, vc = pool.k[layer], pool.v[layer]
            # Query heads grouped per KV head ([B, n_kv, heads/n_kv, hd]): GQA with no repeat.
            if in_place:
                a = triton_kernels.slot_attention(q.reshape(b, n_kv, -1, hd), k, v, kc, vc,
                                                  slots, pos, st.scale)
            else:
                kc[slots, :, pos] = k
                vc[slots, :, pos] = v
                keys = kc[:, :, :length].index_select(0, slots)  # [B, n_kv, L, hd]
                values = vc[:, :, :length].index_select(0, slots)
                a = F.scaled_dot_product_attention(q.reshape(b, n_kv, -1, hd), keys, values,
                                                   attn_mask=mask, scale=st.scale)
            h, xn = self.add_rms(h, F.linear(a.reshape(b, -1), wo), ln2, st.eps)
            r = F.linear(self.silu_mul(F.linear(xn, wgu)), wd)
        h = h + r
        if not st.last:
            return h
        logits = F.linear(_rms_norm(h, st.norm, st.eps), st.lm_head)
        return logits, self.pick(logits)  # sampled rows take their logits to float32

    def run(self, x: Tensor, slots: list[int], pos: list[int], prefill: bool = False):
        """``step`` for ``len(slots)`` rows given on the host; on CUDA through a graph of the
        next batch bucket (padding rows go to the scratch slot). Outputs cover the real rows."""
        n = len(slots)
        length = self.length_bucket(max(pos) + 1, prefill)
        if not self.graphs_on or n > self.max_batch:
            idx = torch.tensor([slots, pos], dtype=torch.int64).to(self.device)
            return self.step(x.to(self.device), idx[0], idx[1], length, prefill)
        b = bucket(n, self.max_batch)
        graph = self._graphs.get((b, length, prefill))
        if graph is None:
            graph = self._capture(b, length, prefill)
        # Padding rows (scratch slot, position 0) in the same copy: rows left from a bigger
        # batch must not write into their sessions. The pinned buffers are free again: every
        # step ends waiting for its output, after these copies.
        h = self._host_idx_np
        h[0, :n], h[0, n:b], h[1, :n], h[1, n:b] = slots, self.pool.scratch, pos, 0
        end = self._n_idx
        if self.stage.first:
            h[2, :n] = x.numpy()
        else:  # the rows' bytes, copied by numpy (bf16 has no numpy dtype: as bytes)
            raw = x.to(self.stage.dtype).reshape(-1).view(torch.uint8).numpy()
            self._host_np[end:end + raw.size] = raw
            end += raw.size
        self._dev[:end].copy_(self._host[:end], non_blocking=True)
        graph[0].replay()
        out = graph[1]
        return tuple(t[:n] for t in out) if isinstance(out, tuple) else out[:n]

    def warm(self) -> None:
        """Capture every batch bucket at the shortest length now, not during the first steps
        (decode steps, and prefills where they take the graphs)."""
        if self.graphs_on:
            for prefill in (False, True) if self.prefills else (False,):
                length, b = self.length_bucket(1, prefill), 1
                while b <= self.max_batch:
                    if (b, length, prefill) not in self._graphs:
                        self._capture(b, length, prefill)
                    b *= 2

    def _pad(self, start: int, stop: int) -> None:
        self._slots[start:stop].fill_(self.pool.scratch)
        self._pos[start:stop].zero_()

    def _capture(self, b: int, length: int, prefill: bool = False) -> tuple:
        """Record ``step`` for bucket (b, length) (a prefill's or a decode step's). The buffers
        hold padding (scratch slot, position 0) meanwhile, so the warm-up runs write only to
        the scratch slot."""
        t0 = time.perf_counter()
        self._pad(0, b)
        args = (self._x[:b], self._slots[:b], self._pos[:b], length, prefill)
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # compile, cuBLAS workspaces: nothing new during capture
                    self.step(*args)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._mempool):
                out = self.step(*args)
        self._graphs[(b, length, prefill)] = (graph, out)
        self.captures += 1
        self.capture_s += time.perf_counter() - t0
        log.info("captured the %s graph for batch %d, length %d in %.2f s",
                 "prefill" if prefill else "decode", b, length, time.perf_counter() - t0)
        return graph, out
