"""The failover campaign: one node of a 3-node cluster killed (SIGKILL) or frozen (SIGSTOP) at
a random token while 4 greedy sessions run; every session's tokens compared with transformers'
``generate`` on the same weights.

    .venv/bin/python scripts/failover_campaign.py --runs 10 --json out.json

Each run starts a fresh local cluster (SmolLM2 fp32 by default, nodes a, b, c of one thread,
the broker's default recovery: KV shadows on), starts the 4 sessions together, and signals the
victim when the first session's k-th token (k drawn at random, seeded) reaches the client. A
frozen node stays frozen until the run ends. Reports per run: exact or not (per session),
the longest gap between two tokens the first session saw, and the broker's recovery record
(how the loss was seen, the silence before it, how the KV was restored, tokens replayed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import start_cluster  # noqa: E402

from bench.common import greedy_reference  # noqa: E402
from zpipe.cli.admin import AdminClient  # noqa: E402
from zpipe.models import resolve_model  # noqa: E402

PROMPTS = [
    "The history of the printing press begins",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Photosynthesis is the process by which plants",
    "Q: What are three good reasons to learn a second language?\nA:",
]
SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}


def references(model: Path, new_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, transformers' greedy new ids) for each prompt, fp32, in this process."""
    tok = AutoTokenizer.from_pretrained(model)
    return [(ids, greedy_reference(model, ids, new_tokens))
            for ids in (tok(p).input_ids for p in PROMPTS)]


async def _run(rc, refs: list, new_tokens: int, victim: str, how: str, at: int) -> dict:
    proc = dict(rc.cluster.procs)[f"node-{victim}"]
    arrivals: list[float] = []
    signalled: list[float] = []

    def on_token(chunk) -> None:
        arrivals.append(time.perf_counter())
        if chunk.index == at and not signalled:
            os.kill(proc.pid, SIGNALS[how])
            signalled.append(time.perf_counter())

    async with rc.client(timeout=300) as client:
        gens = await asyncio.wait_for(asyncio.gather(*[
            client.generate(prompt_ids=ids, max_new_tokens=new_tokens,
                            on_token=on_token if i == 0 else None)
            for i, (ids, _) in enumerate(refs)], return_exceptions=True), 600)
    exact = [not isinstance(g, BaseException) and g.token_ids == want
             for g, (_, want) in zip(gens, refs, strict=True)]
    errors = [f"{type(g).__name__}: {g}" for g in gens if isinstance(g, BaseException)]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    with AdminClient(rc.address, timeout=30) as admin:
        records = admin.request("status")["reallocations"]
    record = records[-1] if records else {}
    return {"victim": victim, "signal": how, "at_token": at, "exact": exact, "errors": errors,
            "client_pause_s": round(max(gaps), 4) if gaps else None,
            "usual_gap_s": round(sorted(gaps)[len(gaps) // 2], 4) if gaps else None,
            **{k: record.get(k) for k in ("reason", "seen_by", "silent_s", "restored",
                                          "replay_tokens", "rebuilt_rows", "pause_s", "ok")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--runs", type=int, default=10, help="runs per victim and signal")
    ap.add_argument("--victims", nargs="*", default=["b", "c", "a"])
    ap.add_argument("--signals", nargs="*", default=["kill", "stop"], choices=list(SIGNALS))
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shadow-every", type=int, default=None,
                    help="recovery.shadow_every (default: the broker's; 0: no shadows, so a "
                         "death is rebuilt by the dead node's neighbour)")
    ap.add_argument("--heartbeat", type=float, nargs=2, metavar=("INTERVAL_S", "LIVENESS"),
                    help="heartbeat.interval_s and .liveness (default: the broker's, 1 s x 3)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    model = resolve_model(args.model)
    refs = references(model, args.new_tokens)
    rng = random.Random(args.seed)
    broker: dict = {}
    if args.shadow_every is not None:
        broker["recovery"] = {"shadow_every": args.shadow_every}
    if args.heartbeat:
        broker["heartbeat"] = {"interval_s": args.heartbeat[0], "liveness": int(args.heartbeat[1])}
    out: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                 "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                 "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
                 "model": str(model), "sessions": len(refs), "new_tokens": args.new_tokens,
                 "shadow_every": args.shadow_every, "heartbeat": args.heartbeat,
                 "runs": []}
    for how in args.signals:
        for victim in args.victims:
            for _ in range(args.runs):
                at = rng.randrange(1, args.new_tokens - 1)
                with tempfile.TemporaryDirectory() as tmp:
                    rc = start_cluster(model, Path(tmp), [{"name": n, "threads": 1}
                                                          for n in "abc"], **broker)
                    try:
                        r = asyncio.run(_run(rc, refs, args.new_tokens, victim, how, at))
                    finally:
                        for name, p in rc.cluster.procs:  # a frozen node takes no SIGTERM
                            if name == f"node-{victim}" and p.poll() is None:
                                p.kill()
                        rc.cluster.stop()
                out["runs"].append(r)
                print(f"{how} {victim} at token {at:>2}: exact {sum(r['exact'])}/{len(r['exact'])}"
                      f", pause {r['client_pause_s']} s, seen by {r['seen_by']} after "
                      f"{r['silent_s']} s, restored {r['restored']} ({r['replay_tokens']} tokens"
                      f" replayed){' ' + '; '.join(r['errors']) if r['errors'] else ''}",
                      flush=True)
    runs = out["runs"]
    out["summary"] = {
        "runs": len(runs), "sessions": sum(len(r["exact"]) for r in runs),
        "sessions_exact": sum(sum(r["exact"]) for r in runs),
        "loadavg_end": Path("/proc/loadavg").read_text().split()[:3]}
    print(json.dumps(out["summary"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
