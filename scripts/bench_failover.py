"""Benchmark: the client's pause when a node dies, restored from KV shadows, rebuilt from
its neighbour's output log, or replayed from the prompt; and what shadows and the log cost in
decode speed.

    .venv/bin/python scripts/bench_failover.py --context 50 200 1000 2000 --json out.json

For each context and mode, a fresh local 3-node cluster (SmolLM2 by default, fp32, one thread
a node, recovery on) serves one greedy session whose prompt fills the context but the tokens
generated before the kill (``--generated``, at most the context less 10); node b is SIGKILLed
as the last of those reaches the client. Modes: ``shadow`` (the defaults: shadows every
``--every`` rows; b's holder c takes its layers and their KV from the shadow), ``rebuild`` (no
shadows: a rebuilds b's layers' KV from the hidden states it sent b) and ``replay`` (no
shadows, no output log: the session replays from its prompt). Reports the longest gap between
two tokens the client saw, the recovery record (how restored, tokens replayed) and whether the
tokens equal those of an uninterrupted run on the same cluster. Then decode tokens/s with
both aids off and with the defaults, at each of ``--sessions``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import start_cluster  # noqa: E402

from zpipe.cli.admin import AdminClient  # noqa: E402
from zpipe.models import resolve_model  # noqa: E402

# --heads: configs/heads.yaml's layout (a plain stage, then one split by KV heads over b and
# c); b, a head-holding member, is the one killed
HEADS = [{"name": "a", "layers": "0-14"}, {"name": "b", "layers": "15-29", "heads": "0-1"},
         {"name": "c", "layers": "15-29", "heads": "2"}]


MODES = ("shadow", "rebuild", "replay")


def _cluster(model: Path, tmp: str, mode: str, every: int, heads: bool = False):
    """A cluster whose recovery restores from shadows, rebuilds, or replays (``MODES``)."""
    every = every if mode == "shadow" else 0
    log = {"output_log_mb": 0} if mode == "replay" else {}
    if heads:  # custom stages: without shadows, re-place over the survivors at once
        return start_cluster(model, Path(tmp), [{**n, "threads": 1, **log} for n in HEADS],
                             recovery={"shadow_every": every, "wait_s": 0})
    return start_cluster(model, Path(tmp), [{"name": x, "threads": 1, **log} for x in "abc"],
                         recovery={"shadow_every": every})


def _prompt(n: int, salt: int = 0) -> list[int]:
    return [(i * 7919 + salt * 31) % 40000 + 100 for i in range(n)]


async def _kill_run(rc, context: int, generated: int, after: int) -> dict:
    prompt = _prompt(context - generated)
    gen = {"prompt_ids": prompt, "max_new_tokens": generated + after, "ignore_eos": True}
    victim = dict(rc.cluster.procs)["node-b"]
    arrivals: list[float] = []
    killed: list[float] = []

    def on_token(chunk) -> None:
        arrivals.append(time.perf_counter())
        if chunk.index == generated - 1:
            victim.kill()
            killed.append(time.time())

    async with rc.client() as client:
        reference = await client.generate(**gen)
        got = await asyncio.wait_for(client.generate(on_token=on_token, **gen), 1800)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    with AdminClient(rc.address, timeout=30) as admin:
        record = admin.request("status")["reallocations"][-1]
    usual = sorted(gaps[: generated - 1])
    pause = max(gaps[generated - 1:])
    detect = record["time"] - killed[0]  # both wall clocks of this host
    return {"context_tokens": context, "prompt_tokens": len(prompt),
            "killed_after_tokens": generated,
            "client_pause_s": round(pause, 4),
            # the pause: the kill until the broker knew (detect), until the new placement was
            # ready (restore or load), then the replay and the next token's step
            "detect_s": round(detect, 4), "placement_s": record["pause_s"],
            "replay_and_step_s": round(pause - detect - record["pause_s"], 4),
            "usual_gap_s": round(usual[len(usual) // 2], 4),
            "exact": got.token_ids == reference.token_ids,
            "restored": record.get("restored", "replay"),
            "replay_tokens": record["replay_tokens"],
            "rebuilt_rows": record.get("rebuilt_rows", 0),
            "rebuild_s": record.get("rebuild_s", 0.0),
            "restored_kv_bytes": record.get("kv_bytes", 0)}


async def _decode_rate(rc, sessions: int, tokens: int) -> float:
    """Decode tokens/s over all sessions, from each one's 4th token to its last."""
    arrivals: list[list[float]] = [[] for _ in range(sessions)]

    def on_token(i: int):
        return lambda chunk: arrivals[i].append(time.perf_counter())

    async with rc.client() as client:
        await asyncio.gather(*[client.generate(
            prompt_ids=_prompt(16, s), max_new_tokens=tokens, ignore_eos=True,
            on_token=on_token(s)) for s in range(sessions)])
    t0 = max(a[3] for a in arrivals)
    t1 = max(a[-1] for a in arrivals)
    n = sum(sum(1 for t in a if t > t0) for a in arrivals)
    return n / (t1 - t0)


def _node_cost(model: Path, sessions: int, every: int, tokens: int = 64) -> dict:
    """In one process, a node's share: decode steps of ``sessions`` on layers 0-9 (stage 0,
    one thread) against the shadow work after them (export of the due rows and their encoding
    into a message), summed over ``tokens`` steps: the CPU shadows add to a node's step."""
    import torch
    import zmq

    from nodes.executor import Executor
    from nodes.outlog import OutputLog
    from nodes.rows import join_rows
    from zpipe import protocol

    torch.set_num_threads(1)
    ex = Executor(model, "float32", "cpu")
    ex.load(0, 10, 1)
    ex.shadow_every = every

    def step(rows: list, ids: list[int]) -> list:
        frames = protocol.encode("step", {"x": torch.tensor(ids)}, epoch=1, stage=0, rows=rows)
        return ex.run_rows(ex.rows_of(protocol.decode([zmq.Frame(bytes(f)) for f in frames])),
                           64, 8192)

    outlog = OutputLog(512 << 20)
    for s in range(sessions):
        outlog.record(10, [(f"s{s}", 0, 16)], join_rows(step([[f"s{s}", 0, 0, 16]],
                                                            _prompt(16, s))))
    compute = shadow = logged = 0.0
    sent = 0
    for k in range(1, tokens + 1):
        t0 = time.perf_counter()
        outs = step([[f"s{s}", k, 15 + k, 1] for s in range(sessions)],
                    [100 + s for s in range(sessions)])
        t1 = time.perf_counter()
        for sid, start, length, rows in ex.shadow_due():
            sent += sum(len(bytes(f)) for f in protocol.encode(
                "shadow", rows, epoch=1, sid=sid, start=start, length=length)[2:])
        t2 = time.perf_counter()
        outlog.record(10, [(f"s{s}", 15 + k, 1) for s in range(sessions)], join_rows(outs))
        t3 = time.perf_counter()
        compute, shadow, logged = compute + t1 - t0, shadow + t2 - t1, logged + t3 - t2
    return {"sessions": sessions, "every": every, "steps": tokens,
            "decode_compute_s": round(compute, 4), "shadow_work_s": round(shadow, 4),
            "shadow_share": round(shadow / compute, 4), "shadow_bytes_sent": sent,
            "output_log_s": round(logged, 4), "output_log_share": round(logged / compute, 4),
            "output_log_bytes": outlog.nbytes()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--context", type=int, nargs="*", default=[50, 200, 1000, 2000])
    ap.add_argument("--modes", nargs="*", choices=MODES, default=list(MODES))
    ap.add_argument("--generated", type=int, default=192,
                    help="tokens generated before the kill (the rest of the context: prompt)")
    ap.add_argument("--after", type=int, default=16, help="tokens generated after the kill")
    ap.add_argument("--every", type=int, default=8, help="recovery.shadow_every when on")
    ap.add_argument("--sessions", type=int, nargs="*", default=[1, 16])
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-clusters", action="store_true",
                    help="only the in-process node share of the shadow work")
    ap.add_argument("--heads", action="store_true",
                    help="configs/heads.yaml's layout: b holds KV heads 0-1 of layers 15-29")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.no_clusters:
        args.context = []
    model = resolve_model(args.model)
    out: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": platform.processor()
                 or platform.machine(), "cpus": os.cpu_count(),
                 "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
                 "every": args.every, "heads": args.heads, "failover": [], "decode": []}
    for context in args.context:
        for mode in args.modes:
            with tempfile.TemporaryDirectory() as tmp:
                rc = _cluster(model, tmp, mode, args.every, args.heads)
                try:
                    r = asyncio.run(_kill_run(rc, context, min(args.generated, context - 10),
                                              args.after))
                finally:
                    rc.cluster.stop()
            r["mode"] = mode
            out["failover"].append(r)
            print(f"context {context} {mode:>7}: client pause "
                  f"{r['client_pause_s']:.2f} s (detect {r['detect_s']:.2f}, placement "
                  f"{r['placement_s']:.2f}, replay and step {r['replay_and_step_s']:.2f}; usual "
                  f"gap {r['usual_gap_s'] * 1000:.0f} ms), replayed {r['replay_tokens']} tokens "
                  f"({r['restored']}), exact {r['exact']}", flush=True)
    if args.sessions and not args.no_clusters:
        # Both clusters up, measured in turn (the other idle), so a change of the machine's
        # load meanwhile falls on both: the median of --repeats runs each. "off": no shadows
        # and no output log; "on": the defaults (shadows every --every rows, the log).
        with tempfile.TemporaryDirectory() as t0, tempfile.TemporaryDirectory() as t1:
            clusters = {}
            try:
                for mode, key, tmp in (("replay", "off", t0), ("shadow", "on", t1)):
                    clusters[key] = _cluster(model, tmp, mode, args.every)
                rates: dict[tuple[str, int], list[float]] = {}
                for _ in range(args.repeats):
                    for n in args.sessions:
                        for mode, rc in clusters.items():
                            rates.setdefault((mode, n), []).append(
                                asyncio.run(_decode_rate(rc, n, args.decode_tokens)))
            finally:
                for rc in clusters.values():
                    rc.cluster.stop()
        for (mode, n), got in rates.items():
            median = sorted(got)[len(got) // 2]
            out["decode"].append({"shadows_and_log": mode, "sessions": n,
                                  "tokens_per_s": round(median, 2),
                                  "runs": [round(r, 2) for r in got]})
            print(f"decode, shadows and log {mode:>3}, {n:>2} sessions: {median:.1f} tokens/s "
                  f"(median of {len(got)})", flush=True)
    for n in args.sessions:
        r = _node_cost(model, n, args.every)
        out.setdefault("node_cost", []).append(r)
        print(f"node share, {n:>2} sessions: decode {r['decode_compute_s']:.3f} s, shadow work "
              f"{r['shadow_work_s']:.4f} s ({r['shadow_share']:.1%}), "
              f"{r['shadow_bytes_sent'] / 1e6:.1f} MB; output log {r['output_log_s']:.4f} s "
              f"({r['output_log_share']:.1%}), {r['output_log_bytes'] / 1e6:.1f} MB", flush=True)
    out["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
