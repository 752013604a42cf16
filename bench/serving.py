"""``python -m bench http``: the same greedy generations through ``zpipe serve`` (OpenAI-style
streaming completions over HTTP) and through the Python client, on one cluster, in one run,
taking turns: time to first token and tokens/s per session, and tokens/s over all sessions.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import Progress, _free_port, _lat_summary, _median, machine_info, now_iso
from bench.compare import CompareConfig, make_prompts, start_cluster


@dataclass
class HttpConfig:
    model: str = "smollm2"
    stages: int = 2
    prompt_len: int = 64
    new_tokens: int = 64
    concurrency: list[int] | None = None  # sessions at once per round; default [1, 8]
    rounds: int = 3  # rounds per system and concurrency, taking turns
    threads: int | None = None
    log_dir: str | None = None


@dataclass
class Run:
    ttft_s: float
    first_to_last_s: float
    tokens: int

    @property
    def tokens_per_s(self) -> float | None:
        return (self.tokens - 1) / self.first_to_last_s if self.tokens > 1 and \
            self.first_to_last_s > 0 else None


async def _client_run(client: Any, ids: list[int], new: int) -> Run:
    t0 = time.perf_counter()
    first = last = None
    n = 0
    async for _ in client.stream(prompt_ids=ids, max_new_tokens=new):
        last = time.perf_counter()
        first = first or last
        n += 1
    return Run(first - t0, last - first, n)


async def _http_run(http: Any, url: str, ids: list[int], new: int) -> Run:
    body = {"model": "zpipe", "prompt": ids, "max_tokens": new, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    n = 0
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                last = time.perf_counter()
                first = first or last
    return Run(first - t0, last - first, n)


def start_server(broker: str, log: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """``zpipe serve`` for ``broker`` as a child process (its output to ``log``), once its
    /health answers: (the process, its base URL)."""
    import httpx

    port = _free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "zpipe.cli.main", "serve", "--broker",
                                 broker, "--bind", f"127.0.0.1:{port}", *args],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"zpipe serve exited:\n{log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError("zpipe serve did not answer in 120 s")


async def _measure(cfg: HttpConfig, address: str, url: str, prompts: list[list[int]],
                   progress: Progress) -> dict:
    import httpx

    from zpipe.client import Client

    out: dict[str, Any] = {}
    async with Client(address) as client, httpx.AsyncClient(timeout=600) as http:
        systems = {"client": lambda ids: _client_run(client, ids, cfg.new_tokens),
                   "http": lambda ids: _http_run(http, url, ids, cfg.new_tokens)}
        for run in systems.values():  # warm-up: first prefills, connections
            await run(prompts[0])
        for conc in cfg.concurrency:
            runs: dict[str, list[Run]] = {k: [] for k in systems}
            walls: dict[str, list[float]] = {k: [] for k in systems}
            for r in range(cfg.rounds):
                for name, run in systems.items():
                    t0 = time.perf_counter()
                    res = await asyncio.gather(*[run(prompts[(r * conc + i) % len(prompts)])
                                                 for i in range(conc)])
                    walls[name].append(time.perf_counter() - t0)
                    runs[name].extend(res)
                progress(f"concurrency {conc}: round {r + 1}/{cfg.rounds}")
            out[str(conc)] = {name: {
                "ttft": _lat_summary([x.ttft_s for x in rs]),
                "tokens_per_s_p50": _median([x.tokens_per_s for x in rs if x.tokens_per_s]),
                "tokens": sum(x.tokens for x in rs),
                "total_tokens_per_s": _median([sum(x.tokens for x in rs[i * conc:(i + 1) * conc])
                                               / w for i, w in enumerate(walls[name])]),
            } for name, rs in runs.items()}
    return out


def http_bench(cfg: HttpConfig, progress: Progress = lambda m: None) -> dict:
    import tempfile

    from zpipe.models import resolve_model

    cfg.concurrency = cfg.concurrency or [1, 8]
    model_dir = resolve_model(cfg.model)
    log_root = Path(cfg.log_dir or tempfile.mkdtemp(prefix="zpipe-bench-http-"))
    prompts = make_prompts(model_dir, cfg.prompt_len, max(cfg.concurrency) * cfg.rounds)
    ccfg = CompareConfig(model=cfg.model, threads=cfg.threads)
    progress(f"starting {cfg.stages} stages of {model_dir.name} and zpipe serve")
    cluster, address, _ = start_cluster(model_dir, cfg.stages, ccfg, log_root / "cluster")
    proc = None
    try:
        proc, url = start_server(address, log_root / "serve.log")
        results = asyncio.run(_measure(cfg, address, url, prompts, progress))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        cluster.stop()
    return {"date": now_iso(), "machine": machine_info(), "config": cfg.__dict__,
            "command": " ".join(sys.argv), "results": results}


def format_http(result: dict) -> str:
    lines = [f"{result['config']['model']}, {result['config']['stages']} stages, "
             f"{result['config']['prompt_len']}-token prompts, "
             f"{result['config']['new_tokens']} new tokens, greedy; {result['date']}",
             f"{'sessions':>8}  {'path':<7} {'TTFT p50 ms':>11} {'TTFT p99 ms':>11} "
             f"{'tok/s/session':>13} {'tok/s total':>11}"]
    for conc, systems in result["results"].items():
        for name, r in systems.items():
            p50, p99 = r["ttft"]["p50_s"], r["ttft"]["p99_s"]
            lines.append(f"{conc:>8}  {name:<7} {p50 * 1000:>11.1f} {p99 * 1000:>11.1f} "
                         f"{r['tokens_per_s_p50'] or 0:>13.2f} {r['total_tokens_per_s']:>11.2f}")
    return "\n".join(lines)
