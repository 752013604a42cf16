"""Benchmark: performance-driven reallocation around a node slowed on purpose.

    .venv/bin/python scripts/bench_rebalance.py --factor 3 --tokens 96

Starts a local 3-node cluster (SmolLM2 by default) with performance-driven reallocation on,
slows the middle node by ``--factor`` (``zpipe admin slow``), and generates the same greedy
prompt twice: the first run is measured while the slow node still holds its uniform third
(and is what the broker measures), then the broker re-plans and moves layers; the second run is
measured on the new placement. Reports per-token p50 before and after, the reallocation the
broker made, and whether the tokens are identical.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import start_cluster  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from zpipe.cli.admin import AdminClient  # noqa: E402
from zpipe.models import resolve_model  # noqa: E402

PROMPT = "The history of the printing press begins"


def _p50(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


async def _generate(rc, ids: list[int], tokens: int):
    async with rc.client() as client:
        return await client.generate(prompt_ids=ids, max_new_tokens=tokens, ignore_eos=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--factor", type=float, default=3.0)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--perf-weight", type=float, default=0.3)
    ap.add_argument("--threshold", type=float, default=0.15)
    ap.add_argument("--json")
    args = ap.parse_args()
    model = resolve_model(args.model)
    ids = AutoTokenizer.from_pretrained(model)(PROMPT).input_ids
    with tempfile.TemporaryDirectory() as tmp:
        rc = start_cluster(model, Path(tmp), [{"name": n, "threads": 1} for n in "abc"],
                           rebalance={"enabled": True, "strategy": "compute",
                                      # measured over the whole first run, then moved
                                      "min_tokens": args.tokens - 2, "cooldown_s": 5.0,
                                      "check_interval_s": 1.0,
                                      "perf_weight": args.perf_weight,
                                      "threshold": args.threshold})
        try:
            with AdminClient(rc.address, timeout=120) as admin:
                admin.request("slow", {"node": "b", "factor": args.factor})
                before_placement = admin.request("status")["placement"]["stages"]
                before = asyncio.run(_generate(rc, ids, args.tokens))
                deadline = time.monotonic() + 60
                moves: list = []
                while not moves and time.monotonic() < deadline:
                    time.sleep(0.5)
                    moves = [r for r in admin.request("status")["reallocations"]
                             if r["reason"].startswith("performance")]
                after = asyncio.run(_generate(rc, ids, args.tokens))
                after_placement = admin.request("status")["placement"]["stages"]
        finally:
            rc.cluster.stop()
    result = {
        "model": str(model), "slow_node": "b", "factor": args.factor, "tokens": args.tokens,
        "perf_weight": args.perf_weight, "threshold": args.threshold,
        "placement_before": before_placement, "placement_after": after_placement,
        "reallocation": moves[0] if moves else None,
        "p50_before_ms": _p50(before.latencies_s[1:]) * 1000,
        "p50_after_ms": _p50(after.latencies_s[1:]) * 1000,
        "tokens_per_s_before": before.tokens_per_s, "tokens_per_s_after": after.tokens_per_s,
        "tokens_identical": before.token_ids == after.token_ids,
    }
    fmt = ", ".join(f"{s['node']}[{s['start']}-{s['end'] - 1}]" for s in after_placement)
    print(f"node b slowed {args.factor:g}x: per-token p50 {result['p50_before_ms']:.1f} ms -> "
          f"{result['p50_after_ms']:.1f} ms after the broker moved layers ({fmt}); "
          f"tokens identical: {result['tokens_identical']}")
    if moves:
        print(f"reallocation: {moves[0]['reason']}; {moves[0]['kv_bytes'] / 1e6:.2f} MB KV, "
              f"pause {moves[0]['pause_s'] * 1000:.0f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
