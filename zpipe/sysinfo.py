"""What a node reports about itself when it registers: memory and measured matmul speed."""

from __future__ import annotations

import os
import time

import torch


def memory(device: str) -> tuple[int, int]:
    """(total, free) bytes of the memory the node's tensors live in."""
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(torch.device(device))
        return int(total), int(free)
    page = os.sysconf("SC_PAGE_SIZE")
    return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")


def rss_bytes() -> int:
    """Resident memory of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def matmul_gflops(device: str, dtype: torch.dtype, seconds: float = 0.3, n: int = 512) -> float:
    """Measured dense matmul throughput, the capability figure placement strategies weigh.

    The best of many short trials: nodes often start together on shared cores, and a trial
    that lost the CPU to a neighbour says nothing about this node's speed.
    """
    dev = torch.device(device)
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    torch.mm(a, b)  # warm-up
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best
