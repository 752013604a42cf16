"""Benchmark: transformers ``generate`` vs zpipe with 1..N stages.

``compare`` runs, in one invocation and on the same model, dtype, device and thread count:

* the baseline: transformers ``LlamaForCausalLM.generate`` (greedy, exactly ``new_tokens``
  tokens) in its own subprocess, so its memory and threads are measured like a node's; batch 1
  over each prompt in turn, then all ``concurrency`` prompts as one left-padded batch;
* zpipe: a real broker and 1, 2, 3... stage-node processes (``zpipe.cli.up.Cluster``), a
  warm-up generation, batch 1 over each prompt in turn, then ``concurrency`` sessions at once
  (``asyncio.gather``), whose tokens must equal each prompt's batch-1 tokens.

It returns a plain dict (what ``--json`` writes); ``format_compare`` turns it into a table.
The transport benchmark is in ``bench.transport``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.baseline import Baseline
from bench.common import (
    CpuMeter,
    Progress,
    _free_port,
    _lat_summary,
    _median,
    loadavg,
    machine_info,
    now_iso,
    vm_hwm,
)

TTFT_METHOD = (
    "zpipe: client-side, from sending the generate request to receiving token 0 (includes "
    "the prefill through every stage). transformers: a streamer records the time each new "
    "token is handed out by generate(); TTFT is generate() call -> first new token (the "
    "prefill); also reported: the wall time of a separate 1-token generate() "
    "(ttft_1tok_s), as a cross-check.")
TPS_METHOD = (
    "batch 1: new tokens / total generate time (TTFT included), median over the prompts; "
    "concurrent: all sessions' new tokens / wall time from the first request to the last "
    "token (transformers: one left-padded batch of all prompts, generate() wall time).")

# Text the prompts are cut from (any tokenizer works; the tiny synthetic one is byte-level).
_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based ink and a screw press adapted from wine "
    "making. Within fifty years presses were at work in more than two hundred European towns, "
    "and the price of books fell so far that ordinary merchants could own them. Scholars "
    "argue about how much of the Reformation, the scientific revolution and the rise of "
    "vernacular literature followed from cheap printing, but few doubt that it changed how "
    "ideas travelled. Photosynthesis is the process by which plants, algae and some bacteria "
    "turn light, water and carbon dioxide into sugars and oxygen; it happens in chloroplasts, "
    "whose green pigment absorbs red and blue light and reflects green. ")


def make_prompts(model_dir: Path, prompt_len: int, n: int) -> list[list[int]]:
    """``n`` distinct prompts of exactly ``prompt_len`` token ids, cut from a fixed text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    stride = 7
    ids: list[int] = []
    text = _TEXT
    while len(ids) < prompt_len + stride * n:
        ids = tok(text, add_special_tokens=False).input_ids
        text += _TEXT
    prompts = [ids[i * stride:i * stride + prompt_len] for i in range(n)]
    bos = tok.bos_token_id
    if bos is not None:  # start like a real prompt does
        prompts = [[bos, *p[:-1]] for p in prompts]
    return prompts


# ----------------------------------------------------------------------------- config
@dataclass
class CompareConfig:
    model: str = "smollm2"
    dtype: str = "float32"
    device: str = "cpu"
    prompt_len: int = 64
    new_tokens: int = 128
    concurrency: int = 16
    stages: list[int] = field(default_factory=lambda: [1, 2, 3])
    threads: int | None = None  # per process; None = every core
    max_batch: int | None = None  # node YAML max_batch; None = the node default
    direct: bool = False  # the broker's ``direct``: activations go node to node
    baseline: bool = True
    warmup_tokens: int = 8
    # Batch-1 runs per system: None = max(concurrency, 3) (each concurrent session needs its
    # batch-1 tokens for the exactness check, so fewer than ``concurrency`` is raised to it).
    batch1_runs: int | None = None
    # OMP_WAIT_POLICY of the transformers subprocess. zpipe's CLI sets PASSIVE for its broker
    # and nodes; the baseline gets the same by default ("" or None = leave it unset: libgomp
    # then spins, which is much slower whenever other processes share the cores).
    baseline_omp_wait_policy: str | None = "PASSIVE"
    log_dir: str | None = None
    ready_timeout_s: float = 600.0

    def n_threads(self) -> int:
        return self.threads or os.cpu_count() or 1

    def n_batch1(self) -> int:
        return max(self.batch1_runs or max(self.concurrency, 3), self.concurrency)


# ----------------------------------------------------------------------------- baseline
# ----------------------------------------------------------------------------- zpipe runs
def decode_breakdown(gens: list[Any]) -> dict:
    """Medians over decode tokens of the broker's per-token timings."""
    step, compute, hop, per_hop = [], [], [], []
    for g in gens:
        for t in g.timings[1:]:
            stages = t.get("stages") or []
            step.append(t["step_s"])
            c = sum(s[1] for s in stages)
            h = sum(s[2] for s in stages)
            compute.append(c)
            hop.append(h)
            per_hop.extend(s[2] for s in stages)
    return {"step_s_p50": _median(step), "compute_s_p50": _median(compute),
            "hop_overhead_s_p50": _median(hop), "per_hop_overhead_s_p50": _median(per_hop),
            "note": "broker-side, per decode token: step = stage 0 send -> last stage result; "
                    "compute = sum of the nodes' own compute times; hop overhead = the rest "
                    "(transfers both ways, queueing, the node's thread hand-off), summed over "
                    "stages; per hop = one stage's share"}


def start_cluster(model_dir: Path, n_stages: int, cfg: CompareConfig, log_dir: Path):
    """A broker and ``n_stages`` nodes as real processes; returns (Cluster, address, info)."""
    from zpipe.cli.up import Cluster
    from zpipe.client import Client
    from zpipe.config import ClusterConfig, validate

    address = f"tcp://127.0.0.1:{_free_port()}"
    nodes = [{"name": f"s{i}", "device": cfg.device, "dtype": cfg.dtype,
              "threads": cfg.n_threads(),
              **({"max_batch": cfg.max_batch} if cfg.max_batch else {})}
             for i in range(n_stages)]
    ccfg = validate({"model": str(model_dir), "broker": {"bind": address, "direct": cfg.direct},
                     "nodes": nodes}, ClusterConfig)
    cluster = Cluster(ccfg, log_dir)
    cluster.start()

    async def wait() -> dict:
        async with Client(address) as client:
            deadline = time.monotonic() + cfg.ready_timeout_s
            while True:
                dead = cluster.dead()
                if dead:
                    raise RuntimeError(f"{dead} stopped early:\n"
                                       + "\n".join(cluster.tail(d) for d in dead))
                with contextlib.suppress(Exception):
                    info = await client.info(timeout=1.0)
                    if info["ready"]:
                        return info
                if time.monotonic() > deadline:
                    raise TimeoutError(f"cluster not ready in {cfg.ready_timeout_s} s")
                await asyncio.sleep(0.2)

    try:
        info = asyncio.run(wait())
    except BaseException:
        cluster.stop()
        raise
    return cluster, address, info


def _summarize_zpipe(b1: list[Any], conc: tuple | None, cfg: CompareConfig) -> dict:
    n = cfg.new_tokens
    ref = [g.token_ids for g in b1]
    out: dict[str, Any] = {"batch1": {
        "runs": len(b1),
        "ttft_s": _median([g.ttft_s for g in b1]),
        "tokens_per_s": _median([len(g.token_ids) / g.total_s for g in b1]),
        "tokens_per_s_all": [len(g.token_ids) / g.total_s for g in b1],
        "total_s": [g.total_s for g in b1],
        "per_token": _lat_summary([x for g in b1 for x in g.latencies_s[1:]]),
        "all_full_length": all(len(g.token_ids) == n for g in b1),
        "breakdown": decode_breakdown(b1),
    }, "token_ids": ref}
    if conc is not None:
        gens, wall = conc
        total_tokens = sum(len(g.token_ids) for g in gens)
        out["concurrent"] = {
            "sessions": len(gens), "wall_s": wall, "tokens": total_tokens,
            "tokens_per_s": total_tokens / wall,
            "ttft_s_p50": _median([g.ttft_s for g in gens]),
            "ttft_s_max": max(g.ttft_s for g in gens),
            "per_token": _lat_summary([x for g in gens for x in g.latencies_s[1:]]),
            "tokens_match": all(g.token_ids == ref[i] for i, g in enumerate(gens)),
            "mismatched_sessions": [i for i, g in enumerate(gens) if g.token_ids != ref[i]],
            "breakdown": decode_breakdown(gens),
        }
    return out


def _summarize_baseline(runs: list[dict], batch: dict | None, cfg: CompareConfig) -> dict:
    n = cfg.new_tokens
    out: dict[str, Any] = {"batch1": {
        "runs": len(runs),
        "ttft_s": _median([r["ttft_s"] for r in runs]),
        "ttft_1tok_s": _median([r["ttft_1tok_s"] for r in runs]),
        "tokens_per_s": _median([n / r["total_s"] for r in runs]),
        "tokens_per_s_all": [n / r["total_s"] for r in runs],
        "total_s": [r["total_s"] for r in runs],
        "per_token": _lat_summary([x for r in runs for x in r["latencies_s"][1:]]),
    }, "token_ids": [r["token_ids"] for r in runs]}
    if batch:
        size = len(batch["token_ids"])
        out["concurrent"] = {
            "sessions": size, "how": f"one left-padded batch of {size} prompts "
                                     f"(width {batch['padded_width']})",
            "wall_s": batch["total_s"], "tokens": size * n,
            "tokens_per_s": size * n / batch["total_s"], "ttft_s_p50": batch["ttft_s"],
            "ttft_s_max": batch["ttft_s"], "per_token": _lat_summary(batch["latencies_s"][1:]),
            "tokens_match": all(t == out["token_ids"][i]
                                for i, t in enumerate(batch["token_ids"])),
            "mismatched_sessions": [i for i, t in enumerate(batch["token_ids"])
                                    if t != out["token_ids"][i]],
        }
    return out


async def _measure(cfg: CompareConfig, prompts: list[list[int]], base: Baseline | None,
                   clusters: dict[int, tuple], progress: Progress) -> dict:
    """Batch-1 runs interleaved prompt by prompt across the systems (the order rotates), then
    each system's concurrent run in turn: load from other processes hits all systems alike."""
    from zpipe.client import Client

    loop = asyncio.get_running_loop()
    n = cfg.new_tokens
    names: list[Any] = (["transformers"] if base is not None else []) + list(clusters)
    b1: dict[Any, list] = {k: [] for k in names}
    conc: dict[Any, Any] = {}
    loads: dict[Any, list] = {k: [] for k in names}
    pids = [os.getpid(), *([base.proc.pid] if base is not None else []),
            *(p.pid for c, _, _ in clusters.values() for _, p in c.procs)]
    whole = CpuMeter(pids)
    meter = CpuMeter(pids)
    cpu: dict[Any, dict] = {k: {"batch1": [], "concurrent": None} for k in names}
    async with contextlib.AsyncExitStack() as stack:
        clients = {s: await stack.enter_async_context(Client(addr))
                   for s, (_, addr, _) in clusters.items()}

        async def run_one(k: Any, prompt: list[int], tokens: int) -> Any:
            if k == "transformers":
                return await loop.run_in_executor(
                    None, lambda: base.call(op="one", prompt=prompt, tokens=tokens))
            return await clients[k].generate(prompt_ids=prompt, max_new_tokens=tokens,
                                             ignore_eos=True)

        for k in names:  # warm-up
            await run_one(k, prompts[0], cfg.warmup_tokens)
        runs = cfg.n_batch1()
        for i, prompt in enumerate(prompts[:runs]):
            order = names[i % len(names):] + names[:i % len(names)]
            progress(f"batch 1: prompt {i + 1}/{runs} on {', '.join(map(_label, order))}")
            for k in order:
                loads[k].append(os.getloadavg()[0])
                meter.read()
                b1[k].append(await run_one(k, prompt, n))
                cpu[k]["batch1"].append(meter.read())
        if cfg.concurrency > 1:
            c = cfg.concurrency
            for k in names:
                progress(f"concurrency {c}: {_label(k)}")
                loads[k].append(os.getloadavg()[0])
                meter.read()
                if k == "transformers":
                    conc[k] = await loop.run_in_executor(
                        None, lambda: base.call(op="batch", prompts=prompts[:c], tokens=n))
                else:
                    t0 = time.perf_counter()
                    gens = await asyncio.gather(*[
                        clients[k].generate(prompt_ids=p, max_new_tokens=n, ignore_eos=True)
                        for p in prompts[:c]])
                    conc[k] = (gens, time.perf_counter() - t0)
                cpu[k]["concurrent"] = meter.read()
    return {"batch1": b1, "concurrent": conc, "loads": loads, "cpu": cpu, "cpu_all": whole.read()}


def _cpu_summary(c: dict) -> dict:
    """Time-weighted foreign/steal/own cores over a system's batch-1 runs, and its concurrent
    run."""
    runs = c["batch1"]
    wall = sum(r["wall_s"] for r in runs) or 1e-9
    out = {"batch1": {k: round(sum(r[k] * r["wall_s"] for r in runs) / wall, 3)
                      for k in ("foreign_cores", "steal_cores", "own_cores")}}
    out["batch1"]["max_foreign_cores"] = max((r["foreign_cores"] for r in runs), default=0.0)
    out["concurrent"] = c["concurrent"]
    return out


def _label(k: Any) -> str:
    return k if isinstance(k, str) else f"zpipe {k} stage" + ("s" if k != 1 else "")


def compare(cfg: CompareConfig, progress: Progress = lambda m: None) -> dict:
    """Run the baseline and every zpipe stage count; the result dict is what --json writes.

    Every system is started first (the idle ones sleep: PASSIVE OpenMP, no spinning), then the
    measurements are interleaved so that changing load on a shared machine is shared fairly."""
    from zpipe import aio
    from zpipe.models import resolve_model

    model_dir = resolve_model(cfg.model)
    prompts = make_prompts(model_dir, cfg.prompt_len, cfg.n_batch1())
    result: dict[str, Any] = {
        "kind": "zpipe-bench-compare", "machine": machine_info(),
        "config": {**asdict(cfg), "model_dir": str(model_dir), "threads": cfg.n_threads(),
                   "batch1_runs": cfg.n_batch1(),
                   # zpipe's CLI sets PASSIVE unless the environment says otherwise
                   "zpipe_omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")},
        "method": {"ttft": TTFT_METHOD, "tokens_per_s": TPS_METHOD,
                   "order": "all systems run side by side (idle ones sleep); batch-1 runs go "
                            "prompt by prompt across the systems in a rotating order, then "
                            "each system's concurrent run in turn",
                   "per_token": "inter-token latency of decode tokens (token 1 onwards); "
                                "transformers batch: one decode step of the whole batch",
                   "peak_rss": "VmHWM from /proc/<pid>/status of each process at the end",
                   "tokens_match": "concurrent tokens equal each prompt's own batch-1 tokens "
                                   "(greedy)"},
        "systems": []}
    log_root = Path(cfg.log_dir) if cfg.log_dir else Path(tempfile.mkdtemp(prefix="zpipe-bench-"))
    result["log_dir"] = str(log_root)
    base: Baseline | None = None
    clusters: dict[int, tuple] = {}
    try:
        if cfg.baseline:
            progress("starting the transformers process")
            base = Baseline(cfg, model_dir, log_root / "transformers.log")
        for s in cfg.stages:
            progress(f"starting zpipe with {s} stage(s)")
            clusters[s] = start_cluster(model_dir, s, cfg, log_root / f"stages-{s}")
            stages = ", ".join(f"{p['node']}[{p['start']}-{p['end'] - 1}]"
                               for p in clusters[s][2]["placement"])
            progress(f"  ready: {stages}")
        raw = aio.run(_measure(cfg, prompts, base, clusters, progress))
        peaks = {s: {name: vm_hwm(p.pid) for name, p in c.procs}
                 for s, (c, _, _) in clusters.items()}
        for s, (c, _, _) in clusters.items():
            if c.dead():
                raise RuntimeError(f"zpipe {s} stages: {c.dead()} stopped during the benchmark")
        base_peak = base.call(op="peak") if base is not None else None
    finally:
        if base is not None:
            base.stop()
        for c, _, _ in clusters.values():
            c.stop()

    b = None
    if base is not None:
        b = _summarize_baseline(raw["batch1"]["transformers"],
                                raw["concurrent"].get("transformers"), cfg)
        b.update(name="transformers", stages=0, omp_wait_policy=base.omp_wait_policy,
                 threads=base.info.get("threads"), load_s=base.info.get("load_s"),
                 peak_rss_bytes={"transformers": base_peak["peak_rss_bytes"]},
                 loadavg_1m=raw["loads"]["transformers"],
                 cpu=_cpu_summary(raw["cpu"]["transformers"]))
        if "gpu_peak_bytes" in base_peak:
            b["gpu_peak_bytes"] = base_peak["gpu_peak_bytes"]
        result["systems"].append(b)
    for s, (_, _, info) in clusters.items():
        z = _summarize_zpipe(raw["batch1"][s], raw["concurrent"].get(s), cfg)
        z.update(name=_label(s), stages=s, placement=info["placement"], peak_rss_bytes=peaks[s],
                 loadavg_1m=raw["loads"][s], cpu=_cpu_summary(raw["cpu"][s]))
        if b is not None:
            z["batch1"]["matches_transformers"] = z["token_ids"] == b["token_ids"]
        result["systems"].append(z)
    for z in result["systems"]:
        for mode in ("batch1", "concurrent"):
            m = z.get(mode)
            if m and b is not None and b.get(mode):
                m["ratio_to_transformers"] = m["tokens_per_s"] / b[mode]["tokens_per_s"]
        if z.get("concurrent"):
            z["concurrent"]["gain_over_batch1"] = (z["concurrent"]["tokens_per_s"]
                                                   / z["batch1"]["tokens_per_s"])
    result["machine"]["loadavg_after"] = loadavg()
    result["machine"]["cpu_during_measurement"] = raw["cpu_all"]
    result["finished"] = now_iso()
    return result
