"""The transport benchmark (``python -m bench transport``).

``transport`` measures round trips of tensor frames between a ROUTER "broker" (this process)
and a DEALER "node" (a child process) on loopback TCP, with the real protocol code.

It returns a plain dict (what ``--json`` writes); ``format_transport`` turns it into a
table."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    CpuMeter,
    Progress,
    _f,
    _free_port,
    loadavg,
    machine_info,
    now_iso,
)
from zpipe.stats import percentile

# ----------------------------------------------------------------------------- transport
# Decode-sized activations: one token's hidden state, as a stage sends it to the next.
ACTIVATIONS = [
    ("SmolLM2 decode (1x576 fp32)", "float32", [1, 576]),
    ("Llama-3.2-1B decode (1x2048 bf16)", "bfloat16", [1, 2048]),
    ("Llama-3-8B decode (1x4096 bf16)", "bfloat16", [1, 4096]),
]
POLL_S = 0.005  # the zpipe+poll mode's busy polling
DEFAULT_SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]


@dataclass
class TransportConfig:
    sizes: list[int] = field(default_factory=lambda: list(DEFAULT_SIZES))
    activations: bool = True
    modes: list[str] = field(default_factory=lambda: ["zpipe", "zpipe+pool", "zpipe-sync",
                                                      "raw"])
    max_iters: int = 2000
    max_seconds: float = 1.0  # per size and mode
    warmup: int = 5


MODES = {
    "zpipe": "asyncio (uvloop) ROUTER and DEALER through zpipe.aio.Socket; every message "
             "checked with protocol.decode and passed on with protocol.encode_forward, "
             "copy=False (what the broker and a node do)",
    "zpipe+pool": "as zpipe, and the node hands each step to a one-thread pool and back, as "
                  "nodes/node.py does before computing (no compute)",
    "zpipe+poll": "as zpipe, both sides busy-polling their socket (busy_poll_ms 5, as the broker "
                  "and node YAML key does): no sleep and wake-up between messages",
    "zpipe-sync": "blocking pyzmq sockets with the same protocol work (decode, "
                  "encode_forward, copy=False): the protocol's cost without asyncio",
    "raw": "blocking pyzmq send/recv of the bare frame, no protocol: the floor",
}


def _tensor_cases(cfg: TransportConfig) -> list[tuple[str, str, list[int], int]]:
    cases = []
    if cfg.activations:
        for label, dtype, shape in ACTIVATIONS:
            size = math.prod(shape) * (4 if dtype == "float32" else 2)
            cases.append((label, dtype, shape, size))
    for size in cfg.sizes:
        if size % 4:
            raise ValueError(f"frame sizes must be multiples of 4 bytes, got {size}")
        label = f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"
        cases.append((label, "float32", [1, size // 4], size))
    return cases


def _echo_child(address: str, mode: str) -> None:
    """The "node": a DEALER that sends every step straight back as a result."""
    import zmq

    if mode == "raw":
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        sock.send(b"hello")
        while True:
            frames = sock.recv_multipart(copy=False)
            if len(frames) == 1 and frames[0].bytes == b"stop":
                return
            sock.send_multipart(frames, copy=False)

    from zpipe import aio, protocol

    def reply(msg: Any) -> list:
        meta = msg["t"][0]
        return protocol.encode_forward(
            "result", msg.frames, [["hidden", meta[1], meta[2]]], epoch=msg["epoch"],
            stage=msg["stage"], compute_s=0.0,
            rows=[[sid, step, n] for sid, step, _, n in protocol.step_rows(msg["rows"])])

    if mode == "zpipe-sync":
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        sock.send_multipart(protocol.encode("heartbeat"))
        while True:
            msg = protocol.decode(sock.recv_multipart(copy=False))
            if msg.kind == "free":
                return
            sock.send_multipart(reply(msg), copy=False)

    async def serve() -> None:
        raw = zmq.Context().socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(address)
        sock = aio.Socket(raw, busy_poll_s=POLL_S if mode == "zpipe+poll" else 0.0)
        sock.send(protocol.encode("heartbeat"))
        pool = None
        if mode == "zpipe+pool":
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(1)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        async def work() -> None:
            while True:
                msg = await queue.get()
                if pool is not None:
                    await loop.run_in_executor(pool, lambda: None)
                sock.send(reply(msg))

        worker = asyncio.create_task(work())
        while True:
            msg = protocol.decode(await sock.recv())
            if msg.kind == "free":
                break
            queue.put_nowait(msg)  # as nodes/node.py does: the receive loop never computes
        worker.cancel()
        sock.close()

    aio.run(serve())


def _spawn_echo(address: str, mode: str) -> subprocess.Popen:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return subprocess.Popen(
        [sys.executable, "-m", "bench.transport", "echo", address, mode], cwd=REPO,
        env=env, start_new_session=True)


def _enough(rtts: list[float], cap: int, t_start: float, cfg: TransportConfig) -> bool:
    """Stop a size: enough round trips, or past its time with at least 5 measured."""
    return len(rtts) >= cap or (len(rtts) >= 5
                                and time.perf_counter() - t_start > cfg.max_seconds)


def _row(label: str, dtype: str, shape: list[int], size: int, rtts: list[float],
         t_start: float, progress: Progress) -> dict:
    """One size's figures, announced as they are done."""
    row = _finish_stats(label, dtype, shape, size, rtts, time.perf_counter() - t_start)
    progress(f"  {label:<36} {row['rtt_us_p50']:10.1f} us  {row['gb_per_s']:7.2f} GB/s")
    return row


def _finish_stats(label: str, dtype: str, shape: list[int], size: int,
                  rtts: list[float], elapsed: float) -> dict:
    p50 = percentile(rtts, 50)
    return {"label": label, "dtype": dtype, "shape": shape, "bytes": size, "iters": len(rtts),
            "seconds": elapsed, "rtt_us_p50": p50 * 1e6, "rtt_us_p99": percentile(rtts, 99) * 1e6,
            "rtt_us_min": min(rtts) * 1e6, "one_way_us": p50 / 2 * 1e6,
            "gb_per_s": 2 * size / p50 / 1e9}


def _iters_for(cfg: TransportConfig, size: int) -> tuple[int, int]:
    """(warm-up, max iterations): fewer for big frames, so a size takes bounded time."""
    cap = max(10, min(cfg.max_iters, int(4e9 / max(size, 1))))
    return min(cfg.warmup, cap), cap


def _proto_cases(cases: list, cfg: TransportConfig, progress: Progress):
    """The broker side of the protocol modes, as a generator: it yields frames to send and is
    sent back the received reply (so one loop serves both blocking and asyncio sockets)."""
    import torch

    from zpipe import protocol

    rows = []
    for label, dtype, shape, size in cases:
        x = torch.randn(shape).to(getattr(torch, dtype))
        n = shape[0]
        frames = protocol.encode("step", {"x": x}, epoch=1, stage=0, rows=[["bench", 0, 0, n]])
        warm, cap = _iters_for(cfg, size)
        rtts: list[float] = []
        t_start = time.perf_counter()
        i = 0
        while True:
            t0 = time.perf_counter()
            reply = yield frames
            msg = protocol.decode(reply[1:])
            # The next step forwards the received frames, as the broker does between stages.
            meta = msg["t"][0]
            frames = protocol.encode_forward("step", msg.frames, [["x", meta[1], meta[2]]],
                                             epoch=1, stage=0,
                                             rows=[["bench", i + 1, (i + 1) * n, n]])
            rtt = time.perf_counter() - t0
            if i == 0 and not torch.equal(msg.tensors["hidden"], x):
                raise RuntimeError(f"{label}: the frame came back changed")
            i += 1
            if i > warm:
                rtts.append(rtt)
            if _enough(rtts, cap, t_start, cfg):
                break
        rows.append(_row(label, dtype, shape, size, rtts, t_start, progress))
    return rows


async def _drive_zpipe(raw: Any, cases: list, cfg: TransportConfig,
                       progress: Progress, poll_s: float = 0.0) -> list[dict]:
    from zpipe import aio, protocol

    sock = aio.Socket(raw, busy_poll_s=poll_s)
    hello = await sock.recv(30)
    if hello is None:
        raise TimeoutError("the echo process did not connect")
    ident = hello[0].bytes
    protocol.decode(hello[1:])  # the node's hello: a heartbeat
    gen = _proto_cases(cases, cfg, progress)
    frames = next(gen)
    try:
        while True:
            sock.send([ident, *frames])
            frames = gen.send(await sock.recv())
    except StopIteration as stop:
        rows = stop.value
    sock.send([ident, *protocol.encode("free", sids=[])])
    return rows


def _drive_zpipe_sync(sock: Any, cases: list, cfg: TransportConfig,
                      progress: Progress) -> list[dict]:
    from zpipe import protocol

    if not sock.poll(30_000):
        raise TimeoutError("the echo process did not connect")
    hello = sock.recv_multipart(copy=False)
    ident = hello[0].bytes
    protocol.decode(hello[1:])
    gen = _proto_cases(cases, cfg, progress)
    frames = next(gen)
    try:
        while True:
            sock.send_multipart([ident, *frames], copy=False)
            frames = gen.send(sock.recv_multipart(copy=False))
    except StopIteration as stop:
        rows = stop.value
    sock.send_multipart([ident, *protocol.encode("free", sids=[])])
    return rows


def _drive_raw(sock: Any, cases: list, cfg: TransportConfig, progress: Progress) -> list[dict]:
    import numpy as np

    if not sock.poll(30_000):
        raise TimeoutError("the echo process did not connect")
    ident, _ = sock.recv_multipart()
    rows = []
    for label, dtype, shape, size in cases:
        payload = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
        frame: Any = memoryview(payload)
        warm, cap = _iters_for(cfg, size)
        rtts: list[float] = []
        t_start = time.perf_counter()
        i = 0
        while True:
            t0 = time.perf_counter()
            sock.send_multipart([ident, frame], copy=False)
            _, frame = sock.recv_multipart(copy=False)
            rtt = time.perf_counter() - t0
            if i == 0 and bytes(frame.buffer) != payload.tobytes():
                raise RuntimeError(f"{label}: the frame came back changed")
            i += 1
            if i > warm:
                rtts.append(rtt)
            if _enough(rtts, cap, t_start, cfg):
                break
        rows.append(_row(label, dtype, shape, size, rtts, t_start, progress))
    sock.send_multipart([ident, b"stop"])
    return rows


def _transport_mode(mode: str, cases: list, cfg: TransportConfig,
                    progress: Progress) -> tuple[list, dict]:
    import zmq

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(address)
    child = _spawn_echo(address, mode)
    meter = CpuMeter([os.getpid(), child.pid])
    try:
        if mode == "raw":
            rows = _drive_raw(sock, cases, cfg, progress)
        elif mode == "zpipe-sync":
            rows = _drive_zpipe_sync(sock, cases, cfg, progress)
        else:
            from zpipe import aio

            rows = aio.run(_drive_zpipe(sock, cases, cfg, progress,
                                        POLL_S if mode == "zpipe+poll" else 0.0))
        cpu = meter.read()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(5)
    finally:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        sock.close(0)
        ctx.term()
    return rows, cpu


def transport(cfg: TransportConfig, progress: Progress = lambda m: None) -> dict:
    """Round trips broker -> node -> broker of tensor frames; the dict --json writes."""
    cases = _tensor_cases(cfg)
    result: dict[str, Any] = {
        "kind": "zpipe-bench-transport", "machine": machine_info(),
        "config": asdict(cfg),
        "method": {
            "setup": "this process is the broker (ROUTER, bound on 127.0.0.1 tcp); a child "
                     "process is the node (DEALER). A round trip = broker sends a 'step' "
                     "with one tensor frame, the node answers a 'result' that forwards the "
                     "same frame, the broker decodes it. Times are the broker's, per round "
                     "trip, after a warm-up; iterations are capped by count and seconds.",
            "one_way_us": "round trip p50 / 2: the cost of one message crossing one hop "
                          "(broker->node or node->broker), all overheads included",
            "gb_per_s": "2 x frame bytes / round-trip p50 (the frame crosses twice)",
            "modes": {m: MODES[m] for m in cfg.modes}},
        "modes": {}}
    for mode in cfg.modes:
        if mode not in MODES:
            raise ValueError(f"unknown transport mode {mode!r}; choose from {sorted(MODES)}")
        progress(f"transport, mode {mode}")
        result["modes"][mode], result.setdefault("cpu", {})[mode] = _transport_mode(
            mode, cases, cfg, progress)
    result["machine"]["loadavg_after"] = loadavg()
    result["finished"] = now_iso()
    return result


def format_transport(result: dict) -> str:
    m = result["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores; {m['date']}; load average "
             f"{m['loadavg']} -> {m.get('loadavg_after')}"]
    for mode, rows in result["modes"].items():
        cpu = (result.get("cpu") or {}).get(mode) or {}
        lines += ["", f"mode {mode}: {MODES[mode]}",
                  f"  (other processes kept {_f(cpu.get('foreign_cores'), '.2f')} cores busy "
                  f"meanwhile; steal {_f(cpu.get('steal_cores'), '.2f')})",
                  f"  {'frame':<36} {'bytes':>10} {'RTT p50 us':>11} {'RTT p99 us':>11} "
                  f"{'one-way us':>10} {'GB/s':>7} {'iters':>6}"]
        for r in rows:
            lines.append(f"  {r['label']:<36} {r['bytes']:>10} {r['rtt_us_p50']:>11.1f} "
                         f"{r['rtt_us_p99']:>11.1f} {r['one_way_us']:>10.1f} "
                         f"{r['gb_per_s']:>7.2f} {r['iters']:>6}")
    lines += ["", "one-way = RTT p50 / 2; GB/s = 2 x bytes / RTT p50."]
    return "\n".join(lines)


def plot_transport(result: dict, path: str | Path) -> None:
    """A PNG of µs per round trip and GB/s against frame size (raises ImportError without
    matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode, rows in result["modes"].items():
        rows = sorted(rows, key=lambda r: r["bytes"])
        xs = [r["bytes"] for r in rows]
        axes[0].plot(xs, [r["rtt_us_p50"] for r in rows], marker="o", label=mode)
        axes[1].plot(xs, [r["gb_per_s"] for r in rows], marker="o", label=mode)
    for ax, title in zip(axes, ("round trip p50 (µs)", "GB/s (2 x bytes / RTT)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("frame bytes")
        ax.set_title(title)
        ax.legend()
        ax.grid(True, alpha=0.3)
    axes[0].set_yscale("log")
    fig.suptitle(f"zpipe transport, loopback tcp — {result['machine']['cpu']}, "
                 f"{result['machine']['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _main(argv: list[str]) -> None:
    """Entry point of the echo child process: ``echo ADDRESS MODE``."""
    if argv[:1] == ["echo"] and len(argv) == 3:
        _echo_child(argv[1], argv[2])
    else:
        sys.exit("usage: python -m bench.transport echo ADDRESS MODE "
                 "(internal; use `python -m bench`)")


if __name__ == "__main__":
    _main(sys.argv[1:])
