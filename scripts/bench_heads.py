"""Benchmark: the per-token cost of splitting a stage across nodes by KV-head groups.

    .venv/bin/python scripts/bench_heads.py --tokens 64 --repeats 3 --json out.json

Three local clusters run at once (SmolLM2 by default, fp32, one thread a node), each serving
one stage of every layer: held by 1 node (unsplit), by 2 nodes (KV heads 0-1 and 2) and by 3
(one KV head each). Greedy generations go to them in turn (1, 2, 3, 1, 2, 3, ...), so a change
of the machine's load meets all three alike. Reports per configuration the median decode step
as the client saw it, the stage's compute as its answering member measured it, and each
member's time in the per-layer combines per step (sending its partial, waiting for the
others', adding them: 60 combines a step for 30 layers), from ``zpipe admin nodes``. Then the
exchange alone: member processes that only combine ``[1, hidden]`` partials, 60 a step, no
model: the transport's own cost per step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import start_cluster  # noqa: E402

from zpipe.cli.admin import AdminClient  # noqa: E402
from zpipe.heads import split_heads  # noqa: E402
from zpipe.models import resolve_model  # noqa: E402
from zpipe.shard import ModelSpec  # noqa: E402


def _nodes(spec: ModelSpec, parts: int) -> list[dict]:
    layers = f"0-{spec.num_layers - 1}"
    if parts == 1:
        return [{"name": "m0", "layers": layers, "threads": 1}]
    return [{"name": f"m{i}", "layers": layers, "threads": 1, "heads": f"{a}-{b - 1}"}
            for i, (a, b) in enumerate(split_heads(spec.num_kv_heads, parts))]


async def _generate(rc, prompt: list[int], tokens: int) -> tuple[list, list, list]:
    """(decode step times, the answering member's compute times, token ids)."""
    async with rc.client() as client:
        g = await client.generate(prompt_ids=prompt, max_new_tokens=tokens, ignore_eos=True)
    decode = g.timings[1:]
    return [t["step_s"] for t in decode], [t["stages"][0][1] for t in decode], g.token_ids


def _member(index: int, addrs: list, ready, steps: int, hidden: int, out) -> None:
    """One member of the exchange-only benchmark: ``steps`` steps of 60 combines."""
    import torch
    import zmq

    from nodes.group import Group

    torch.set_num_threads(1)
    g = Group(zmq.Context.instance(), "tcp://127.0.0.1:0")
    addrs[index] = g.addr
    ready.wait()
    g.join(0, index, list(addrs), 30.0)
    part = torch.full((1, hidden), float(index + 1))
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        g.begin("s", step)
        for _ in range(60):
            g.combine(part)
        times.append(time.perf_counter() - t0)
    out[index] = statistics.median(times[steps // 10:])
    g.close()


def _exchange(parts: int, hidden: int, steps: int = 200) -> float:
    """Median ms per step of 60 combines among ``parts`` processes."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Manager() as mgr:
        addrs, out = mgr.list([None] * parts), mgr.list([None] * parts)
        ready = mgr.Event()
        procs = [ctx.Process(target=_member, args=(i, addrs, ready, steps, hidden, out))
                 for i in range(parts)]
        for p in procs:
            p.start()
        while None in list(addrs):
            time.sleep(0.05)
        ready.set()
        for p in procs:
            p.join(300)
        return round(1000 * max(out), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per generation")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    model = resolve_model(args.model)
    spec = ModelSpec.load(model)
    prompt = [(i * 7919) % 40000 + 100 for i in range(args.prompt)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        clusters = {}
        try:
            for parts in args.parts:
                clusters[parts] = start_cluster(model, Path(tmp) / str(parts),
                                                _nodes(spec, parts))
            got: dict[int, tuple[list, list, list]] = {p: ([], [], []) for p in args.parts}
            for rc in clusters.values():  # warm
                asyncio.run(_generate(rc, prompt, 8))
            for _ in range(args.repeats):
                for p, rc in clusters.items():
                    steps, computes, ids = asyncio.run(_generate(rc, prompt, args.tokens))
                    got[p][0].extend(steps)
                    got[p][1].extend(computes)
                    got[p][2].append(ids)
            time.sleep(2.5)  # a heartbeat after the last step carries its combines
            for p, rc in clusters.items():
                with AdminClient(rc.address, timeout=30) as admin:
                    nodes = admin.request("nodes")["nodes"]
                steps, computes, ids = got[p]
                row = {"parts": p, "step_ms": round(1000 * statistics.median(steps), 2),
                       "compute_ms": round(1000 * statistics.median(computes), 2),
                       "combine_ms_per_step": {n["name"]: n["combine_ms_per_step"]
                                               for n in nodes},
                       "tokens": ids[0]}
                results.append(row)
                print(f"{p} node(s): decode step p50 {row['step_ms']:.2f} ms, stage compute "
                      f"p50 {row['compute_ms']:.2f} ms, combine per step "
                      f"{row['combine_ms_per_step']}", flush=True)
        finally:
            for rc in clusters.values():
                rc.cluster.stop()
    base = results[0]
    same = all(r["tokens"] == base["tokens"] for r in results)
    print(f"same tokens in every configuration: {same}")
    for r in results[1:]:
        print(f"{r['parts']}-way split: {r['step_ms'] / base['step_ms']:.2f}x the unsplit step")
    exchange = {p: _exchange(p, spec.hidden_size) for p in args.parts if p > 1}
    for p, t in exchange.items():
        print(f"exchange only, {p} members: {t:.3f} ms per step of 60 combines")
    if args.json:
        args.json.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                       f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
            "args": {k: str(v) for k, v in
                                                          vars(args).items()},
            "results": results, "same_tokens": same, "exchange_ms_per_step": exchange},
            indent=1))


if __name__ == "__main__":
    main()
