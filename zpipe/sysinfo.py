"""What a node reports about itself: memory (at register and in every heartbeat) and its
measured matmul speed (at register: the planner's prior until its steps are measured)."""

from __future__ import annotations

import os
import time

import torch


def memory(device: str) -> tuple[int, int]:
    """(total, free) bytes of the memory the node's tensors live in.

    CPU: the host's ``MemAvailable`` (free pages plus the page cache the kernel can drop),
    shared by every process on the host. CUDA: the device's free memory, which does not count
    what this process's caching allocator keeps (see ``cached_bytes``).
    """
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(torch.device(device))
        return int(total), int(free)
    page = os.sysconf("SC_PAGE_SIZE")
    total = page * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return total, int(line.split()[1]) * 1024
    except OSError:
        pass
    return total, page * os.sysconf("SC_AVPHYS_PAGES")


def cached_bytes(device: str) -> int:
    """CUDA memory this process's allocator keeps but no tensor uses: free for its next tensors,
    not in ``memory``'s free figure. 0 on the CPU (freed tensors go back to the host)."""
    if not device.startswith("cuda"):
        return 0
    dev = torch.device(device)
    return int(torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))


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
