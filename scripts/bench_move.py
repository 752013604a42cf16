"""Benchmark: what a live layer move costs (pause, KV bytes) versus recomputing the KV.

    .venv/bin/python scripts/bench_move.py --context 1024 4096 --layers 5 --sessions 1 8

Starts a local 3-node cluster (SmolLM2 by default) with KV shadows off and then on
(``--shadow-every``), fills each session's cache to ``--context`` tokens, then moves
``--layers`` layers from the first node to the second (its shadow holder) while the sessions
keep generating. Reports the broker-measured pause (quiesce → commit → resume),
the KV bytes moved, the longest gap between two tokens a client saw around the move, and, for
comparison, the time the first node takes to prefill ``--context`` tokens (what recomputing the
moved layers' KV would cost at the very least).
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

from zpipe.cli.admin import AdminClient  # noqa: E402
from zpipe.models import resolve_model  # noqa: E402


async def _run(rc, sessions: int, context: int, layers: int, new_tokens: int) -> dict:
    prompt = [(i * 7919) % 40000 + 100 for i in range(context - 32)]
    arrivals: list[list[float]] = [[] for _ in range(sessions)]
    ready = asyncio.Event()

    def on_token(i: int):
        def cb(chunk) -> None:
            arrivals[i].append(time.perf_counter())
            if all(len(a) >= 8 for a in arrivals):
                ready.set()
        return cb

    async with rc.client() as client:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(client.generate(
            prompt_ids=[p + s for p in prompt], max_new_tokens=new_tokens, ignore_eos=True,
            on_token=on_token(s))) for s in range(sessions)]
        await asyncio.wait_for(ready.wait(), 600)
        prefill_s = time.perf_counter() - t0
        with AdminClient(rc.address, timeout=300) as admin:
            status = admin.request("status")
            first = status["placement"]["stages"][0]
            second = status["placement"]["stages"][1]
            a = first["end"] - layers
            t_move = time.perf_counter()
            record = await asyncio.to_thread(admin.request, "move", {
                "layers": f"{a}-{first['end'] - 1}", "to": second["node"]})
            t_done = time.perf_counter()
        await asyncio.gather(*tasks)
    # What a client saw: the gap between its last token before the move began and its first
    # after it ended, against its ordinary gaps between tokens after the prefills.
    around = [min(t for t in a if t >= t_done) - max(t for t in a if t <= t_move)
              for a in arrivals]
    normal = sorted(b - a for arr in arrivals for a, b in zip(arr[8:], arr[9:], strict=False)
                    if b < t_move or a > t_done)
    with AdminClient(rc.address, timeout=300) as admin:
        # The least a recomputation would cost: prefilling the context through the moved layers,
        # once per session (the profile runs it on the node that now holds them).
        prof = admin.request("profile", {"tokens": min(context, 2048), "timeout": 120})
    moved_layers = {f"layer.{i}" for i in range(a, a + layers)}
    recompute = sessions * sum(r["prefill_s"] for r in prof["parts"]
                               if r["part"] in moved_layers)
    return {
        "sessions": sessions, "context_tokens": context, "layers_moved": layers,
        "kv_bytes": record["kv_bytes"], "kv_shadow_bytes": record.get("kv_shadow_bytes", 0),
        "pause_s": record["pause_s"],
        **{k: record.get(k) for k in ("quiesce_s", "prepare_s", "kv_s", "commit_s")},
        "max_token_gap_s": max(around),
        "median_token_gap_s": normal[len(normal) // 2],
        "recompute_estimate_s": recompute,
        "prefill_all_sessions_s": prefill_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--context", type=int, nargs="+", default=[1024])
    ap.add_argument("--shadow-every", type=int, nargs="+", default=[0, 8],
                    help="recovery.shadow_every of each run (0: shadows off)")
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--sessions", type=int, nargs="+", default=[1])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    model = resolve_model(args.model)
    results = []
    for context in args.context:
        for n in args.sessions:
            for every in args.shadow_every:
                with tempfile.TemporaryDirectory() as tmp:
                    rc = start_cluster(model, Path(tmp), [{"name": x, "threads": 1}
                                                          for x in "abc"],
                                       recovery={"shadow_every": every})
                    try:
                        r = asyncio.run(_run(rc, n, context, args.layers, args.new_tokens))
                    finally:
                        rc.cluster.stop()
                r["shadow_every"] = every
                results.append(r)
                _print(r)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def _print(r: dict) -> None:
    print(f"{r['sessions']:>3} sessions x {r['context_tokens']} tokens, shadows every "
          f"{r['shadow_every']}: moved {r['layers_moved']} layers, "
          f"{r['kv_bytes'] / 1e6:.1f} MB of KV sent ({r['kv_shadow_bytes'] / 1e6:.1f} MB "
          f"from the shadow), pause {r['pause_s'] * 1000:.0f} ms, "
          f"token gap across the move {r['max_token_gap_s'] * 1000:.0f} ms (usual "
          f"{r['median_token_gap_s'] * 1000:.0f} ms); recomputing that KV instead: >= "
          f"{r['recompute_estimate_s'] * 1000:.0f} ms", flush=True)


if __name__ == "__main__":
    main()
