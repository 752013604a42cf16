"""The decode step's hand-written Triton kernels (GPUs only): attention straight from a slot
pool, and a fused residual add + RMSNorm.

Attention: the portable path (``zpipe.decode``) gathers each row's K/V out of the pool into a
``[B, n_kv, L, head_dim]`` copy and runs SDPA over a length bucket with a mask; at batch 32
on an H200 the gather alone was a quarter of the step. This kernel reads each row's keys and
values in place, exactly ``pos + 1`` of them (read from device memory, so one CUDA graph
serves every length), with an online softmax in float32.

Add + RMSNorm: ``torch.compile`` with dynamic shapes made this reduction ~20 µs per call at
batch 1 (31 calls a step: 0.6 ms of a 2.1 ms step); one program per row takes a few µs.
Its rounding steps are the eager ones (float32 statistics, then bfloat16 products); the sum of
squares is added in another order, so a value can differ from ``zpipe.shard._rms_norm`` in the
last bit.
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
    def _attn_kernel(q_ptr, q_stride, k_new, v_new, k_stride, v_stride, k_ptr, v_ptr, slots_ptr,
                     pos_ptr, out_ptr, stride_slot, stride_head, stride_tok, scale, N_KV: tl.constexpr,
                     G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        slot = tl.load(slots_ptr + b).to(tl.int64)
        pos = tl.load(pos_ptr + b).to(tl.int32)
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        base = slot * stride_slot + h * stride_head
        # The new token's K/V: stored into the pool for later steps, used from registers now.
        kn = tl.load(k_new + b * k_stride + h * D + d)
        vn = tl.load(v_new + b * v_stride + h * D + d)
        tl.store(k_ptr + base + pos.to(tl.int64) * stride_tok + d, kn)
        tl.store(v_ptr + base + pos.to(tl.int64) * stride_tok + d, vn)
        head_off = (h * G + g[:, None]) * D + d[None, :]
        q = tl.load(q_ptr + b * q_stride + head_off, mask=g[:, None] < G, other=0.0)
        m = tl.sum(q.to(tl.float32) * kn.to(tl.float32)[None, :], axis=1) * scale  # [GP]
        l_sum = tl.full([GP], 1.0, tl.float32)
        acc = tl.zeros([GP, D], tl.float32) + vn.to(tl.float32)[None, :]
        for start in range(0, pos, BLOCK):
            t = start + tl.arange(0, BLOCK)
            live = t < pos
            off = base + t[:, None].to(tl.int64) * stride_tok + d[None, :]
            k = tl.load(k_ptr + off, mask=live[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale  # [GP, BLOCK], float32
            s = tl.where(live[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            v = tl.load(v_ptr + off, mask=live[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            m = m_new
        out = acc / l_sum[:, None]
        tl.store(out_ptr + b * (N_KV * G * D) + head_off, out.to(out_ptr.dtype.element_ty),
                 mask=g[:, None] < G)


def slot_attention(q: Tensor, k: Tensor, v: Tensor, k_pool: Tensor, v_pool: Tensor,
                   slots: Tensor, pos: Tensor, scale: float) -> Tensor:
    """Store each row's new ``k, v [B, n_kv, hd]`` at ``pos`` of pool slot ``slots[row]``
    (pools ``[S, n_kv, max_len, hd]``, contiguous), and attend ``q [B, n_kv, G, hd]`` (query
    heads grouped by KV head) to that slot's first ``pos + 1`` keys. ``q``, ``k`` and ``v`` may
    be row slices of a wider tensor (the fused qkv projection). Returns ``[B, n_kv, G, hd]``,
    contiguous."""
    b, n_kv, g, hd = q.shape
    if hd & (hd - 1) or hd < 16 or not k_pool.is_contiguous() or not v_pool.is_contiguous():
        raise ValueError("slot_attention needs a power-of-two head_dim >= 16 and contiguous "
                         "pools")
    if k.stride()[1:] != (hd, 1) or v.stride()[1:] != (hd, 1):
        raise ValueError("k and v need contiguous heads")
    if q.stride()[1:] != (g * hd, hd, 1):
        q = q.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _attn_kernel[(b, n_kv)](q, q.stride(0), k, v, k.stride(0), v.stride(0), k_pool, v_pool, slots, pos, out,
                            k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), scale,
                            N_KV=n_kv, G=g, GP=max(16, triton.next_power_of_2(g)), D=hd,
                            BLOCK=64, num_warps=4)
    return out


if triton is not None:
    @triton.jit
    def _add_rms_kernel(h_ptr, r_ptr, w_ptr, h_out, x_out, eps, N: tl.constexpr,
                        BLOCK: tl.constexpr, ADD: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        live = cols < N
        h = tl.load(h_ptr + row * N + cols, mask=live, other=0.0)
        if ADD:
            r = tl.load(r_ptr + row * N + cols, mask=live, other=0.0)
            h = (h.to(tl.float32) + r.to(tl.float32)).to(h_ptr.dtype.element_ty)
            tl.store(h_out + row * N + cols, h, mask=live)
        f = h.to(tl.float32)
        var = tl.sum(f * f, axis=0) / N
        normed = (f * tl.math.rsqrt(var + eps)).to(h_ptr.dtype.element_ty)
        w = tl.load(w_ptr + cols, mask=live, other=0.0)
        x = (w.to(tl.float32) * normed.to(tl.float32)).to(x_out.dtype.element_ty)
        tl.store(x_out + row * N + cols, x, mask=live)


def add_rms(h: Tensor, r: Tensor | None, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(h + r, rms_norm(h + r) * w)`` for ``[rows, n]`` tensors (``r`` None: no add)."""
    rows, n = h.shape
    h = h.contiguous()
    h_new = torch.empty_like(h) if r is not None else h
    x = torch.empty(rows, n, dtype=torch.promote_types(w.dtype, h.dtype), device=h.device)
    _add_rms_kernel[(rows,)](h, r.contiguous() if r is not None else h, w, h_new, x, eps,
                             N=n, BLOCK=triton.next_power_of_2(n), ADD=r is not None,
                             num_warps=4 if n <= 4096 else 8)
    return h_new, x
