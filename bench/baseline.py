"""The transformers side of ``python -m bench compare``: ``generate`` in a process of its own.

It is driven one JSON command per line on stdin (``one``: batch 1 of a prompt; ``batch``: a
left-padded batch; ``peak``: peak memory) and answers one JSON line each, so the benchmark can
interleave its runs with zpipe's. Started as ``python -m bench.baseline SPEC_JSON``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import REPO, vm_hwm

if TYPE_CHECKING:
    from bench.compare import CompareConfig


class Baseline:
    """transformers ``generate`` in its own process, driven one command at a time (JSON lines
    on its stdin/stdout), so that its runs can be interleaved with zpipe's."""

    def __init__(self, cfg: CompareConfig, model_dir: Path, log: Path) -> None:
        self.log = log
        spec = {"model_dir": str(model_dir), "dtype": cfg.dtype, "device": cfg.device,
                "threads": cfg.n_threads()}
        env = dict(os.environ)
        env.pop("OMP_WAIT_POLICY", None)
        if cfg.baseline_omp_wait_policy:
            env["OMP_WAIT_POLICY"] = cfg.baseline_omp_wait_policy
        self.omp_wait_policy = env.get("OMP_WAIT_POLICY", "(unset)")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.baseline", json.dumps(spec)], env=env, cwd=REPO,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                start_new_session=True)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"the transformers process stopped (exit "
                               f"{self.proc.returncode}); {self.log}:\n{tail}")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"transformers process: {out['error']}")
        return out

    def call(self, **cmd: Any) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class _Stamps:
    """A generate() streamer that records when each new token comes out."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # the first put is the prompt
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def child(spec_json: str) -> None:
    """The transformers process: one JSON command per stdin line, one JSON answer per line."""
    out_fd = os.dup(1)
    os.dup2(2, 1)  # library chatter goes to stderr, answers to the saved stdout
    answers = os.fdopen(out_fd, "w", buffering=1)

    import torch
    from transformers import LlamaForCausalLM

    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    dev = torch.device(spec["device"])
    t_load = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype).to(dev).eval()
    load_s = time.perf_counter() - t_load
    pad = model.config.pad_token_id
    if pad is None:
        eos = model.config.eos_token_id
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def timed(prompts: list[list[int]], tokens: int) -> dict:
        """Greedy generate of exactly ``tokens`` tokens for a left-padded batch of prompts."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        st = _Stamps()
        sync()
        t0 = st.t0 = time.perf_counter()
        res = model.generate(ids, attention_mask=mask, do_sample=False, temperature=None,
                             top_p=None, top_k=None, min_new_tokens=tokens,
                             max_new_tokens=tokens, pad_token_id=pad, streamer=st)
        sync()
        total = time.perf_counter() - t0
        times = [t0, *st.times]
        lat = [b - a for a, b in zip(times, times[1:], strict=False)]
        return {"ttft_s": lat[0], "total_s": total, "latencies_s": lat, "padded_width": width,
                "token_ids": [r[width:].tolist() for r in res]}

    def pid_peak() -> dict:
        out = {"peak_rss_bytes": vm_hwm(os.getpid())}
        if dev.type == "cuda":
            out["gpu_peak_bytes"] = torch.cuda.max_memory_allocated(dev)
        return out

    answers.write(json.dumps({"load_s": load_s, "threads": torch.get_num_threads(),
                              "pid": os.getpid()}) + "\n")
    with torch.inference_mode():
        for line in sys.stdin:
            cmd = json.loads(line)
            try:
                if cmd["op"] == "one":  # batch 1, plus a 1-token generate for TTFT
                    t0 = time.perf_counter()
                    timed([cmd["prompt"]], 1)
                    ttft_1tok = time.perf_counter() - t0
                    r = timed([cmd["prompt"]], cmd["tokens"])
                    r["token_ids"] = r["token_ids"][0]
                    r["ttft_1tok_s"] = ttft_1tok
                elif cmd["op"] == "batch":
                    r = timed(cmd["prompts"], cmd["tokens"])
                elif cmd["op"] == "peak":
                    r = pid_peak()
                else:
                    r = {"error": f"unknown op {cmd['op']!r}"}
            except Exception as e:  # reported to the parent, which stops
                r = {"error": f"{type(e).__name__}: {e}"}
            answers.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bench.baseline SPEC_JSON (internal; use `python -m bench`)")
    child(sys.argv[1])
