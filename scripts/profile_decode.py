"""Where a GPU node's decode step goes: one node's executor in-process, no broker.

    python scripts/profile_decode.py --model /tmp/llama-1b --layers 0-15 --batches 1 32

For each batch size: the graph replay's GPU time (CUDA events), the executor's whole
``step_batch`` wall time (host work, copies, replay, sync), and the top kernels of the same
step run without graphs (torch.profiler). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_gpu import copy_bandwidth  # noqa: E402 (beside this script)

from nodes.executor import Executor  # noqa: E402
from zpipe import protocol  # noqa: E402
from zpipe.config import StaticKV, parse_layers  # noqa: E402


def _step_msg(rows: list, x: torch.Tensor) -> protocol.Message:
    frames = protocol.encode("step", {"x": x}, epoch=1, stage=0, rows=rows,
                             sampling=[{}] * len(rows))
    return protocol.decode([zmq.Frame(bytes(f)) for f in frames])


def measure(ex: Executor, b: int, context: int, iters: int, bandwidth: float) -> dict:
    st, hidden = ex.stage, ex.spec.hidden_size
    sids = [f"s{i}" for i in range(b)]

    def x_of(n: int) -> torch.Tensor:
        return (torch.randint(0, 1000, (n,)) if st.first
                else torch.randn(n, hidden, dtype=torch.bfloat16))

    ex.step_batch(ex.rows_of(_step_msg([[s, 0, 0, context] for s in sids], x_of(b * context))))
    pos = context
    for i in range(5 + iters):
        if i == 5:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        ex.step_batch(ex.rows_of(_step_msg([[s, pos - context + 1, pos, 1] for s in sids],
                                           x_of(b))))
        pos += 1
    wall = (time.perf_counter() - t0) / iters
    dec = ex.decoder
    graph = dec._graphs[(b, dec.length_bucket(pos), False)][0]  # (batch, length, prefill)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(iters):
        graph.replay()
    e1.record()
    torch.cuda.synchronize()
    gpu = e0.elapsed_time(e1) / 1000 / iters
    slots = torch.tensor([ex.caches[s].slot for s in sids], device="cuda:0")
    pos_t = torch.full((b,), pos, device="cuda:0")
    xin = x_of(b).to("cuda:0")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            dec.step(xin, slots, pos_t, dec.length_bucket(pos + 1))
        torch.cuda.synchronize()
    kernels = sorted(((e.key, e.device_time_total / 5, e.count // 5)
                      for e in prof.key_averages()), key=lambda k: -k[1])[:14]
    ex.free(sids)
    return {"step_batch_ms": wall * 1e3, "graph_gpu_ms": gpu * 1e3,
            "host_ms": (wall - gpu) * 1e3,
            "weights_at_copy_bw_ms": st.weight_bytes() / bandwidth * 1e3,
            "top_kernels_us_per_step": [[k[:70], round(t, 1), c] for k, t, c in kernels]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--layers", default=None, help="e.g. 0-15 (default: all)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--context", type=int, default=100, help="tokens cached per session")
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    ex = Executor(Path(args.model), "bfloat16", "cuda:0", max_batch=max(args.batches),
                  static_kv=StaticKV())
    start, end = parse_layers(args.layers) if args.layers else (0, ex.spec.num_layers)
    ex.load(start, end, epoch=1)
    st = ex.stage
    bandwidth = copy_bandwidth()
    out: dict = {"gpu": torch.cuda.get_device_name(0), "layers": [start, end - 1],
                 "weight_bytes": st.weight_bytes(), "captures": ex.decoder.captures,
                 "capture_s": round(ex.decoder.capture_s, 3),
                 "copy_bandwidth_GB_s": round(bandwidth / 1e9, 1)}
    for b in args.batches:
        out[f"b{b}"] = measure(ex, b, args.context, args.iters, bandwidth)
        print(json.dumps(out[f"b{b}"], indent=1), flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
