"""Decode attention straight from a slot pool, as one Triton kernel (GPUs only).

The portable path (``zpipe.decode``) gathers each row's K/V out of the pool into a
``[B, n_kv, L, head_dim]`` copy and runs SDPA over a length bucket with a mask; at batch 32
on an H200 the gather alone was a quarter of the step. This kernel reads each row's keys and
values in place, exactly ``pos + 1`` of them (read from device memory, so one CUDA graph
serves every length), with an online softmax in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the decoder keeps its portable path
    triton = None


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:
    @triton.jit
    def _kernel(q_ptr, k_ptr, v_ptr, slots_ptr, pos_ptr, out_ptr, stride_slot, stride_head,
                stride_tok, scale, N_KV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                D: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        slot = tl.load(slots_ptr + b).to(tl.int64)
        n = tl.load(pos_ptr + b).to(tl.int32) + 1
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        q_off = ((b * N_KV + h) * G + g[:, None]) * D + d[None, :]
        q = tl.load(q_ptr + q_off, mask=g[:, None] < G, other=0.0).to(tl.float32)
        m = tl.full([GP], float("-inf"), tl.float32)
        l_sum = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        base = slot * stride_slot + h * stride_head
        for start in range(0, n, BLOCK):
            t = start + tl.arange(0, BLOCK)
            live = t < n
            off = base + t[:, None].to(tl.int64) * stride_tok + d[None, :]
            k = tl.load(k_ptr + off, mask=live[:, None], other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [GP, BLOCK]
            s = tl.where(live[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            v = tl.load(v_ptr + off, mask=live[:, None], other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            m = m_new
        out = acc / l_sum[:, None]
        tl.store(out_ptr + q_off, out.to(out_ptr.dtype.element_ty), mask=g[:, None] < G)


def slot_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, slots: Tensor, pos: Tensor,
                   scale: float) -> Tensor:
    """``q [B, n_kv, G, hd]`` (query heads grouped by KV head) against each row's first
    ``pos + 1`` keys of pool slot ``slots[row]`` (pools ``[S, n_kv, max_len, hd]``,
    contiguous). Returns ``[B, n_kv, G, hd]`` in q's dtype."""
    b, n_kv, g, hd = q.shape
    if hd & (hd - 1) or not k_pool.is_contiguous() or not v_pool.is_contiguous():
        raise ValueError("slot_attention needs a power-of-two head_dim and contiguous pools")
    q = q.contiguous()
    out = torch.empty_like(q)
    _kernel[(b, n_kv)](q, k_pool, v_pool, slots, pos, out, k_pool.stride(0), k_pool.stride(1),
                       k_pool.stride(2), scale, N_KV=n_kv, G=g,
                       GP=triton.next_power_of_2(g), D=hd, BLOCK=32, num_warps=4)
    return out
