"""Benchmark: performance-driven reallocation around a node slowed on purpose.

    .venv/bin/python scripts/bench_rebalance.py --factor 3 --json out.json

Starts a local 3-node cluster (SmolLM2 by default, one thread per node) with performance-driven
reallocation on at the broker's default ``rebalance`` settings (or ``--rebalance KEY=VALUE``),
slows the middle node b by ``--factor`` (``zpipe admin slow``) and generates one greedy prompt
twice, one session at a time:

1. the first run starts on the uniform placement; once the broker has measured
   ``min_tokens`` tokens it re-plans and moves layers while the run goes on. "Before" is the
   per-token latency of the tokens that arrived before that move began;
2. the second run, after the move, is "after" (all its tokens); if the broker's check of its
   prediction undoes the move meanwhile, that is in the reallocations reported.

Reports per-token p50 before and after, the placements, every reallocation (reason, pause) and
whether both runs gave the same tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import start_cluster  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from zpipe.cli.admin import AdminClient  # noqa: E402
from zpipe.models import resolve_model  # noqa: E402

PROMPT = "The history of the printing press begins"


async def _generate(rc, ids: list[int], tokens: int) -> tuple[object, list[float]]:
    """The generation and each token's wall-clock arrival time."""
    arrivals: list[float] = []
    async with rc.client() as client:
        gen = await client.generate(prompt_ids=ids, max_new_tokens=tokens, ignore_eos=True,
                                    on_token=lambda _: arrivals.append(time.time()))
    return gen, arrivals


def _fmt(stages: list[dict]) -> str:
    return ", ".join(f"{s['node']}[{s['start']}-{s['end'] - 1}]" for s in stages)


def _layers(stages: list[dict], node: str) -> int:
    return sum(s["end"] - s["start"] for s in stages if s["node"] == node)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--factor", type=float, default=3.0)
    ap.add_argument("--tokens", type=int, default=160, help="tokens per run")
    ap.add_argument("--rebalance", action="append", default=[], metavar="KEY=VALUE",
                    help="a broker rebalance setting other than its default (repeatable)")
    ap.add_argument("--wait", type=float, default=120.0, help="longest wait for the move (s)")
    ap.add_argument("--json")
    args = ap.parse_args()
    settings = {"enabled": True}
    for kv in args.rebalance:
        key, _, value = kv.partition("=")
        settings[key] = yaml.safe_load(value)
    model = resolve_model(args.model)
    ids = AutoTokenizer.from_pretrained(model)(PROMPT).input_ids
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        rc = start_cluster(model, Path(tmp), [{"name": n, "threads": 1} for n in "abc"],
                           rebalance=settings)
        try:
            with AdminClient(rc.address, timeout=120) as admin:
                admin.request("slow", {"node": "b", "factor": args.factor})
                placement_before = admin.request("status")["placement"]["stages"]
                first, arrivals = asyncio.run(_generate(rc, ids, args.tokens))
                deadline = time.monotonic() + args.wait
                moves: list = []
                while not moves and time.monotonic() < deadline:
                    moves = [r for r in admin.request("status")["reallocations"]
                             if r["reason"].startswith("performance") and r["ok"]]
                    if not moves:
                        time.sleep(0.5)
                placement_moved = admin.request("status")["placement"]["stages"]
                second, _ = asyncio.run(_generate(rc, ids, args.tokens))
                status = admin.request("status")
        finally:
            rc.cluster.stop()
    load_after = os.getloadavg()
    t_move = moves[0]["time"] if moves else float("inf")
    before = [lat for t, lat in zip(arrivals[1:], first.latencies_s[1:], strict=True)
              if t < t_move]
    after = second.latencies_s[1:]
    # the first run's tokens once the move was over: its session's KV was moved with the layers
    t_done = t_move + (moves[0]["pause_s"] if moves else 0.0)
    moved_kv = [lat for t, lat in zip(arrivals[1:], first.latencies_s[1:], strict=True)
                if t > t_done]
    p50_before = statistics.median(before) * 1000
    p50_after = statistics.median(after) * 1000
    result = {
        "model": str(model), "slow_node": "b", "factor": args.factor, "tokens": args.tokens,
        "rebalance": settings, "loadavg_before": load_before, "loadavg_after": load_after,
        "placement_before": placement_before, "placement_moved": placement_moved,
        "placement_after": status["placement"]["stages"],
        "reallocations": status["reallocations"],
        "tokens_before_move": len(before), "tokens_after": len(after),
        "p50_before_ms": round(p50_before, 3), "p50_after_ms": round(p50_after, 3),
        "p50_first_run_after_move_ms": round(statistics.median(moved_kv) * 1000, 3)
        if moved_kv else None,
        "ratio": round(p50_after / p50_before, 4),
        "b_layers_before": _layers(placement_before, "b"),
        "b_layers_after": _layers(placement_moved, "b"),
        "tokens_identical": first.token_ids == second.token_ids,
    }
    print(f"node b slowed {args.factor:g}x: per-token p50 {p50_before:.1f} ms ({len(before)} "
          f"tokens on {_fmt(placement_before)}) -> {p50_after:.1f} ms ({len(after)} tokens on "
          f"{_fmt(placement_moved)}), ratio {result['ratio']:.3f}; tokens identical: "
          f"{result['tokens_identical']}; load {load_before[0]:.2f} -> {load_after[0]:.2f}")
    for r in status["reallocations"]:
        print(f"  reallocation ok={r['ok']}: {_fmt(r['before'])} -> {_fmt(r['after'])}, pause "
              f"{r['pause_s'] * 1000:.0f} ms: {r['reason']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
