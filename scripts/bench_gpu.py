"""GPU benchmark: transformers vs zpipe on random-weight Llama shapes, side by side in one run.

    python scripts/bench_gpu.py --model /tmp/llama-1b --layouts 1x0 2x0 2x01 --out result.json
    python scripts/bench_gpu.py --model synth:llama-3-8b --hf-device-map auto \
        --layouts 2x01 2x01:heads 2x01:kill --out result.json

Measures, on the same model directory, dtype (bf16) and machine:
- the bound: weight bytes / measured device copy bandwidth (read + write counted), i.e. the
  fastest batch-1 decode that reads every weight once per token;
- transformers ``generate``: eager at batch 1, and a static cache + ``torch.compile`` at batch
  ``--concurrency``;
- transformers with ``--hf-device-map auto``: the layers spread over every GPU, one at a time
  (what ``from_pretrained(device_map="auto")`` does), at batch 1 and ``--concurrency``;
- zpipe: each layout's cluster (``2x01``: 2 nodes on cuda:0 and cuda:1; ``2x0``: 2 nodes both on
  cuda:0) at batch 1 (sequential) and with ``--concurrency`` sessions at once. Mode ``heads``
  gives every node all the layers and a share of the KV heads (one stage split by heads); mode
  ``kill`` SIGKILLs the last node while 4 sessions run and reports the pause. Mode ``mps`` runs
  that layout's nodes under CUDA MPS (started for it, stopped after; needs
  ``nvidia-cuda-mps-control`` and the right to start it), so nodes sharing a GPU share one
  context instead of time-slicing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median, median_low

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the checkout's bench/ and tests/conftest.py

from conftest import start_cluster  # noqa: E402

from bench.compare import decode_breakdown  # noqa: E402
from nodes.node import settle_gc  # noqa: E402
from zpipe import synth  # noqa: E402
from zpipe.models import resolve_model  # noqa: E402
from zpipe.shard import ModelSpec  # noqa: E402

# Layout modes (NxG:MODE+MODE): node settings to compare against the defaults.
MODES = {"eager": {"enabled": False}, "nocompile": {"compile": False},
         "nographs": {"cuda_graphs": False}, "sdpa": {"triton_attention": False}}


def copy_bandwidth(device: str = "cuda:0", nbytes: int = 2 << 30) -> float:
    """Bytes moved per second by a device-to-device copy, read and write both counted."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize(device)
    return 2 * nbytes * 10 / (time.perf_counter() - t0)


def hf_runs(model_dir: Path, prompt: list[int], new_tokens: int, batch: int,
            rounds: int = 1, device_map: str | None = None) -> dict:
    model = synth.hf_model(model_dir, torch.bfloat16, "cuda:0", device_map=device_map)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.tensor([prompt], device="cuda:0")
    kw = {"do_sample": False, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}

    def timed(inp: torch.Tensor, **extra) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(inp, attention_mask=torch.ones_like(inp), **kw, **extra)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(ids)  # warm-up
    eager = [new_tokens / timed(ids) for _ in range(rounds)]
    out = {"weight_bytes": weight_bytes, "hf_eager_b1_tok_s": median(eager),
           "hf_eager_b1_tok_s_rounds": eager}
    # A static cache makes generate compile the decode step itself (transformers' own path).
    batch_ids = ids.repeat(batch, 1)
    for b, inp in ((1, ids), (batch, batch_ids)):
        try:
            for _ in range(2):  # compile and capture
                timed(inp, cache_implementation="static")
            got = [b * new_tokens / timed(inp, cache_implementation="static")
                   for _ in range(rounds)]
            out[f"hf_static_compiled_b{b}_tok_s"] = median(got)
            out[f"hf_static_compiled_b{b}_tok_s_rounds"] = got
        except Exception as e:  # report, and still measure zpipe
            out[f"hf_static_compiled_b{b}_error"] = repr(e)[:300]
    model = None  # free the GPU memory for the zpipe nodes
    torch.cuda.empty_cache()
    return out


async def _zpipe(rc, prompt: list[int], new_tokens: int, concurrency: int,
                 rounds: int = 1) -> dict:
    async with rc.client() as client:
        kw = {"max_new_tokens": new_tokens, "ignore_eos": True}
        await client.generate(prompt_ids=prompt, **kw)  # warm-up
        # Concurrent warm-up, twice: a burst does not always form the same cohorts, and a
        # batch shape a node meets for the first time loads its kernels then (CUDA loads
        # lazily), which would land in the measured round's prefill.
        for _ in range(2):
            await asyncio.gather(*[client.generate(prompt_ids=prompt, max_new_tokens=8,
                                                   ignore_eos=True) for _ in range(concurrency)])
        ones, manys, walls, starts = [], [], [], []
        for _ in range(rounds):  # batch 1 then the burst, in turns
            starts.append(time.time())  # to line rounds up with other logs (nvidia-smi)
            ones.append(await client.generate(prompt_ids=prompt, **kw))
            starts.append(time.time())
            t0 = time.perf_counter()
            manys.append(await asyncio.gather(*[client.generate(prompt_ids=prompt, **kw)
                                                for _ in range(concurrency)]))
            walls.append(time.perf_counter() - t0)
    b1 = [new_tokens / o.total_s for o in ones]
    cs = [sum(len(g.token_ids) for g in m) / w for m, w in zip(manys, walls, strict=True)]
    # The figures below describe the median round of each kind (the lower of two middles).
    one = ones[b1.index(median_low(b1))]
    i = cs.index(median_low(cs))
    many, wall = manys[i], walls[i]
    decode = sorted(one.latencies_s[1:])
    gaps = sorted(g for m in many for g in m.latencies_s[1:])  # client-side, between tokens
    ttfts = sorted(m.ttft_s for m in many)
    # The first token's step (the prefill): the nodes' compute and the rest (queueing, hops).
    first = [m.timings[0]["stages"] for m in many if m.timings]
    prefill = sorted(sum(c for _, c, _ in st) for st in first)
    prefill_rest = sorted(sum(h for _, _, h in st) for st in first)
    return {
        "b1_breakdown": decode_breakdown([one]),
        "c_breakdown": decode_breakdown(many),
        "b1_tok_s": median(b1),
        "b1_tok_s_rounds": b1,
        "b1_decode_tok_s": one.tokens_per_s,
        "b1_p50_ms": decode[len(decode) // 2] * 1000,
        # the slow tokens' share: a mean well above the median is jitter, not the step
        "b1_gap_ms_mean_p90_p99_max": [sum(decode) / len(decode) * 1000,
                                       decode[int(len(decode) * 0.9)] * 1000,
                                       decode[int(len(decode) * 0.99)] * 1000, decode[-1] * 1000],
        "b1_gaps_ms": [round(g * 1000, 3) for g in one.latencies_s[1:]],  # in token order
        "b1_ttft_ms": one.ttft_s * 1000,
        f"c{concurrency}_tok_s": median(cs),
        f"c{concurrency}_tok_s_rounds": cs,
        "round_starts_unix_s": starts,  # batch 1, burst, batch 1, ...
        "c_wall_s": wall,
        "c_ttft_ms_p50_max": [ttfts[len(ttfts) // 2] * 1000, ttfts[-1] * 1000],
        "c_prefill_compute_ms_p50_max": [prefill[len(prefill) // 2] * 1000, prefill[-1] * 1000],
        "c_prefill_hops_ms_p50_max": [prefill_rest[len(prefill_rest) // 2] * 1000,
                                      prefill_rest[-1] * 1000],
        "c_gap_ms_mean_p50_p99": [sum(gaps) / len(gaps) * 1000, gaps[len(gaps) // 2] * 1000,
                                  gaps[int(len(gaps) * 0.99)] * 1000],
        "tokens_match": all(g.token_ids == o.token_ids
                            for o, m in zip(ones, manys, strict=True) for g in m),
        "sessions_matching_b1": sum(g.token_ids == one.token_ids for g in many),
    }


def _split_by_heads(model: Path, nodes: list[dict]) -> list[dict]:
    """Every node all the layers and an equal share of the KV heads: one stage split by heads."""
    spec = ModelSpec.load(model)
    share = spec.num_kv_heads // len(nodes)
    return [{**n, "layers": f"0-{spec.num_layers - 1}",
             "heads": f"{i * share}-{(i + 1) * share - 1}"} for i, n in enumerate(nodes)]


async def _kill(rc, prompt: list[int], new_tokens: int, sessions: int = 4) -> dict:
    """``sessions`` greedy sessions; the last node SIGKILLed as session 0's token
    ``new_tokens // 2`` arrives. The sessions' tokens against a run that lost nothing, the
    longest gap session 0 saw, and the broker's recovery record."""
    from zpipe.cli.admin import AdminClient

    victim = rc.cluster.procs[-1][1]
    arrivals: list[float] = []

    def on_token(chunk) -> None:
        arrivals.append(time.perf_counter())
        if chunk.index == new_tokens // 2:
            victim.kill()

    kw = {"max_new_tokens": new_tokens, "ignore_eos": True}
    prompts = [[*prompt, 300 + i] for i in range(sessions)]
    async with rc.client() as client:
        want = [(await client.generate(prompt_ids=p, **kw)).token_ids for p in prompts]
        got = await asyncio.gather(*[client.generate(
            prompt_ids=p, on_token=on_token if i == 0 else None, **kw)
            for i, p in enumerate(prompts)], return_exceptions=True)
    with AdminClient(rc.address, timeout=30) as admin:
        records = admin.request("status")["reallocations"]
    gaps = sorted(b - a for a, b in zip(arrivals, arrivals[1:], strict=False))
    return {"sessions": sessions, "killed": rc.cluster.procs[-1][0],
            "finished": sum(not isinstance(g, BaseException) for g in got),
            "exact": sum(not isinstance(g, BaseException) and g.token_ids == w
                         for g, w in zip(got, want, strict=True)),
            "errors": [repr(g)[:200] for g in got if isinstance(g, BaseException)],
            "pause_s": gaps[-1] if gaps else None,
            "usual_gap_s": gaps[len(gaps) // 2] if gaps else None,
            "record": records[-1] if records else None}


LOADED = re.compile(r"loaded layers \S+: [\d.]+ MB in ([\d.]+) s")
CAPTURED = re.compile(r"captured the (decode|prefill) graph for batch \d+, length \d+ in ([\d.]+) s")


def load_times(log_dir: Path) -> dict:
    """Per node, from its log: the whole load (weights, warm-up, graph captures) and the
    seconds its decode and prefill graph captures took within it."""
    out = {}
    for path in sorted(log_dir.glob("node-*.log")):
        text = path.read_text(errors="replace")
        node = {"load_s": sum(float(t) for t in LOADED.findall(text))}
        for kind, took in CAPTURED.findall(text):
            node[f"{kind}_graphs"] = node.get(f"{kind}_graphs", 0) + 1
            node[f"{kind}_graphs_s"] = round(node.get(f"{kind}_graphs_s", 0) + float(took), 3)
        out[path.stem.removeprefix("node-")] = node
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--layouts", nargs="+", default=["1x0", "2x0"],
                    help="NODESxGPUS[:MODE]: 1x0 one node on cuda:0; 2x0 two on cuda:0; 2x01 one "
                         "each; MODE: eager (no static KV), nocompile, nographs, sdpa (no Triton "
                         "attention), mbN (max_batch N), pollN (busy-poll N ms), direct "
                         "(activations node to node), mps (nodes under CUDA MPS) or pin (each process's "
                         "event loop and ZeroMQ I/O on a CPU of its own), joined by +")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3,
                    help="measurements of each figure (batch 1 and the burst in turns); the "
                         "medians are reported, every round's figure beside them")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--hf-device-map", choices=["auto"],
                    help="transformers over every GPU (device_map=auto), not on cuda:0 alone")
    ap.add_argument("--out")
    args = ap.parse_args()
    model = resolve_model(args.model)
    prompt = [(i * 997) % 30000 + 200 for i in range(args.prompt_len)]
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    "gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
                    "torch": torch.__version__, "args": vars(args)}
    result["copy_bandwidth_GB_s"] = copy_bandwidth() / 1e9
    if not args.skip_hf:
        try:
            result.update(hf_runs(model, prompt, args.new_tokens, args.concurrency,
                                  args.rounds, args.hf_device_map))
        except Exception as e:  # report, and still measure zpipe
            result["hf_error"] = repr(e)[:500]
    # bf16 weights: 2 bytes each (from the config's shapes, whether or not transformers ran)
    result["weight_bytes"] = 2 * sum(math.prod(s) for s in synth.tensor_shapes(model).values())
    result["bound_b1_tok_s"] = result["copy_bandwidth_GB_s"] * 1e9 / result["weight_bytes"]
    # A bound that counts a copy's bytes once (half of the above; ~600 tokens/s for
    # Llama-3.2-1B on an H100) is also common: both are reported.
    result["bound_b1_tok_s_bytes_once"] = result["bound_b1_tok_s"] / 2
    # torch.compile left ~300k objects here; a full collection over them would stall the
    # client that times zpipe below by 100-200 ms (as nodes do after a load).
    settle_gc()
    print(json.dumps(result, indent=1), flush=True)
    for done, layout in enumerate(args.layouts):
        # a layout given twice is measured twice: "2x0", "2x0#2"
        seen = args.layouts[:done].count(layout)
        key = f"zpipe_{layout}" + (f"#{seen + 1}" if seen else "")
        shape, _, mode = layout.partition(":")
        n, gpus = shape.split("x")
        devices = [f"cuda:{gpus[i % len(gpus)]}" for i in range(int(n))]
        node: dict = {"dtype": "bfloat16", "static_kv": {}}
        broker: dict = {}
        mps = pinned = heads = kill = False
        for m in filter(None, mode.split("+")):
            if m == "mps":
                mps = True
            elif m == "heads":
                heads = True
            elif m == "kill":
                kill = True
            elif m.startswith("mb"):
                node["max_batch"] = int(m[2:])
            elif m == "pin":  # broker on CPU 2, node i on CPU 4 + 2i (the cluster's pin_cpus)
                pinned = True
            elif m == "direct":  # activations node to node, not through the broker
                broker["direct"] = True
            elif m.startswith("poll"):  # poll5: broker and nodes busy-poll 5 ms
                node["busy_poll_ms"] = broker["busy_poll_ms"] = float(m[4:])
            else:
                node["static_kv"].update(MODES[m])
        try:
            if mps:  # the daemon serves the processes started from now on: the nodes
                subprocess.run(["nvidia-cuda-mps-control", "-d"], check=True)
            with tempfile.TemporaryDirectory() as tmp:
                nodes = [{"name": f"n{i}", "device": d, **node} for i, d in enumerate(devices)]
                if heads:
                    nodes = _split_by_heads(model, nodes)
                rc = start_cluster(model, Path(tmp), nodes, timeout=600, pin_cpus=pinned,
                                   **broker)
                try:
                    load = load_times(Path(tmp))
                    if kill:
                        result[key] = asyncio.run(_kill(rc, prompt, args.new_tokens))
                    else:
                        result[key] = asyncio.run(
                            _zpipe(rc, prompt, args.new_tokens, args.concurrency, args.rounds))
                    result[key]["load"] = load
                finally:
                    rc.cluster.stop()
        except Exception as e:  # one layout's failure still leaves the others' figures
            result[key] = {"error": repr(e)[:500]}
        finally:
            if mps:
                subprocess.run(["nvidia-cuda-mps-control"], input=b"quit\n", check=False)
        print(key.removeprefix("zpipe_"), json.dumps(result[key]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
