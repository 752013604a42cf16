"""Helpers shared by the benchmarks (``bench.compare`` and ``bench.transport``)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import platform
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zpipe.stats import percentile

Progress = Callable[[str], None]


# ----------------------------------------------------------------------------- helpers
# The repository root: benchmark subprocesses run ``python -m bench.…`` from there.
REPO = Path(__file__).resolve().parents[1]


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


class CpuMeter:
    """How much CPU the rest of the machine used while we measured.

    ``foreign_cores`` = (busy CPU time of the whole machine − CPU time of our own processes)
    / wall time: 0.0 on a quiet machine, 1.0 when other processes kept one core busy.
    ``steal_cores``: time the hypervisor gave our vCPUs to someone else, per wall second."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.tick = os.sysconf("SC_CLK_TCK")
        self.start = self._snap()

    def _snap(self) -> tuple[float, float, float, float]:
        busy = steal = 0.0
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            busy = (v[0] + v[1] + v[2] + v[5] + v[6]) / self.tick
            steal = v[7] / self.tick if len(v) > 7 else 0.0
        mine = 0.0
        for pid in self.pids:
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                mine += (int(fields[11]) + int(fields[12])) / self.tick
        return time.monotonic(), busy, steal, mine

    def read(self) -> dict:
        """Since the start (or the last read): foreign and steal cores, and our own."""
        now = self._snap()
        (t0, b0, s0, m0), (t1, b1, s1, m1) = self.start, now
        self.start = now
        wall = max(t1 - t0, 1e-9)
        foreign = max(0.0, (b1 - b0) - (m1 - m0))
        return {"wall_s": round(wall, 3), "foreign_cores": round(foreign / wall, 3),
                "steal_cores": round((s1 - s0) / wall, 3), "own_cores": round((m1 - m0) / wall, 3)}


def vm_hwm(pid: int) -> int | None:
    """Peak resident memory (VmHWM) of a live process in bytes; None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def machine_info() -> dict:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    ram = 0
    with contextlib.suppress(ValueError, OSError):
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    info: dict[str, Any] = {
        "hostname": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(),
        "ram_bytes": ram, "platform": platform.platform(), "python": platform.python_version(),
        "date": now_iso(), "loadavg": loadavg()}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        repo = Path(__file__).resolve().parents[1]
        git = ["git", "-C", str(repo)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5)
        if head.returncode == 0:
            info["git_commit"] = head.stdout.strip()
            dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout
            info["git_modified"] = [line[3:] for line in dirty.splitlines()]
    for mod in ("torch", "transformers", "zmq"):
        with contextlib.suppress(Exception):
            info[mod] = __import__(mod).__version__
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ms(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x * 1000


def _lat_summary(values: list[float]) -> dict:
    """p50/p99/mean of a list of seconds (None for no values)."""
    if not values:
        return {"count": 0, "p50_s": None, "p99_s": None, "mean_s": None}
    return {"count": len(values), "p50_s": percentile(values, 50),
            "p99_s": percentile(values, 99), "mean_s": sum(values) / len(values)}


def _median(values: list[float]) -> float | None:
    return percentile(values, 50) if values else None


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}"


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def greedy_reference(model_dir: str | Path, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy new token ids for ``prompt_ids`` (float32, in this process): what
    a zpipe generation of the same weights must give."""
    import torch
    from transformers import AutoModelForCausalLM

    from zpipe import synth

    hf = (synth.hf_model(Path(model_dir), torch.float32) if synth.seeded(Path(model_dir))
          else AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval())
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=new_tokens)
    return out[0, ids.shape[1]:].tolist()
