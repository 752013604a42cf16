"""The decoder's pieces on their own: batch and length buckets, the last stage's pick, and the
Triton kernels (zpipe/decode.py, zpipe/shard.py, zpipe/triton_kernels.py)."""

from __future__ import annotations

import pytest
import torch

from zpipe import triton_kernels
from zpipe.decode import _pick, bucket
from zpipe.shard import _rms_norm, padded_rows


def test_bucket() -> None:
    assert [bucket(n, 64) for n in (1, 2, 3, 5, 33, 64, 65)] == [1, 2, 4, 8, 64, 64, 64]
    assert bucket(1, 2048, 256) == 256 and bucket(300, 2048, 256) == 512
    assert bucket(3000, 2048, 256) == 2048


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pick_is_the_argmax_and_its_log_softmax(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    logits = (torch.randn(5, 1000) * 4).to(dtype)
    logits[2, 10] = logits[2, 700] = logits[2].max() + 1  # a tie: the first index wins
    picks = _pick(logits)
    x = logits.float()
    assert picks.dtype == torch.float64 and picks.shape == (5, 2)
    assert picks[:, 0].long().tolist() == x.argmax(dim=-1).tolist()
    assert picks[2, 0] == 10
    want = torch.log_softmax(x, dim=-1).gather(1, x.argmax(dim=-1)[:, None])[:, 0]
    torch.testing.assert_close(picks[:, 1].float(), want, rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_pick_on_the_gpu_matches_eager() -> None:
    torch.manual_seed(0)
    compiled = torch.compile(_pick, dynamic=True)
    for b in (1, 3, 32):  # one compiled kernel for every batch size
        logits = (torch.randn(b, 128256, device="cuda:0") * 4).to(torch.bfloat16)
        got, want = compiled(logits).cpu(), _pick(logits.cpu())
        assert got[:, 0].tolist() == want[:, 0].tolist()
        torch.testing.assert_close(got[:, 1], want[:, 1], rtol=0, atol=1e-4)


needs_triton = pytest.mark.skipif(not torch.cuda.is_available()
                                  or not triton_kernels.available(torch.device("cuda")),
                                  reason="needs Triton and a CUDA device")


@needs_triton
def test_triton_slot_attention_matches_sdpa() -> None:
    torch.manual_seed(0)
    dev, dt = "cuda:0", torch.bfloat16
    kp, vp = (torch.randn(5, 2, 300, 64, device=dev, dtype=dt) for _ in range(2))
    slots = torch.tensor([3, 0, 4, 1], device=dev)
    pos = torch.tensor([0, 17, 299, 64], device=dev)
    q = torch.randn(4, 2, 3, 64, device=dev, dtype=dt)  # 3 query heads per KV head
    kv = torch.randn(4, 2 * 2 * 64, device=dev, dtype=dt)  # new K and V, side by side
    k, v = kv[:, :128].view(4, 2, 64), kv[:, 128:].view(4, 2, 64)
    out = triton_kernels.slot_attention(q, k, v, kp, vp, slots, pos, 0.125)
    for i, (s, p) in enumerate(zip(slots.tolist(), pos.tolist(), strict=True)):
        assert torch.equal(kp[s, :, p], k[i]) and torch.equal(vp[s, :, p], v[i])
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[i:i + 1].float(), kp[s:s + 1, :, :p + 1].float(), vp[s:s + 1, :, :p + 1].float(),
            scale=0.125)
        torch.testing.assert_close(out[i:i + 1].float(), ref, atol=2e-2, rtol=2e-2)
    # q as rows of a wider tensor (the roped q and k heads side by side), not copied first
    qk = torch.cat([q.reshape(4, -1), torch.randn(4, 128, device=dev, dtype=dt)], dim=1)
    kp2, vp2 = kp.clone(), vp.clone()
    sliced = triton_kernels.slot_attention(qk[:, :384].view(4, 2, 3, 64), k, v, kp2, vp2,
                                           slots, pos, 0.125)
    assert sliced.is_contiguous() and torch.equal(sliced, out)


@needs_triton
def test_triton_add_rms_matches_eager() -> None:
    torch.manual_seed(0)
    h, r = (torch.randn(5, 2048, device="cuda:0", dtype=torch.bfloat16) for _ in range(2))
    w = torch.randn(2048, device="cuda:0", dtype=torch.bfloat16)
    h2, x = triton_kernels.add_rms(h, r, w, 1e-5)
    assert torch.equal(h2, h + r)
    torch.testing.assert_close(x, _rms_norm(h + r, w, 1e-5), atol=0, rtol=1e-2)
    _, x1 = triton_kernels.add_rms(h, None, w, 1e-5)
    torch.testing.assert_close(x1, _rms_norm(h, w, 1e-5), atol=0, rtol=1e-2)


def test_padded_rows_bucket_token_counts() -> None:
    assert [padded_rows(n) for n in (1, 2, 3, 5, 33, 64, 65, 128, 129, 1000, 1024)] == \
        [1, 2, 4, 8, 64, 64, 128, 128, 192, 1024, 1024]
    # few shapes: every count up to 8,192 runs as one of 7 powers of two or 127 multiples of 64
    assert len({padded_rows(n) for n in range(1, 8193)}) == 134
