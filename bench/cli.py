"""``python -m bench compare`` and ``python -m bench transport``, from the repository root (the
benchmarks are not part of the installed package).

compare    transformers generate in one process vs zpipe with 1, 2, 3... stages, same model,
           dtype, device and threads, in one run: TTFT, per-token p50/p99, tokens/s, the ratio
           to transformers, concurrency, peak memory per process; table, --json, --plot.
http       the same greedy generations through ``zpipe serve`` (HTTP, SSE) and through the
           Python client, on one cluster, taking turns: time to first token and tokens/s.
transport  round trips of tensor frames (decode activations, 4 KiB .. 64 MiB) between a
           broker-like ROUTER and a node-like DEALER process: µs per message and GB/s.
netns      the broker and each node in a network namespace of their own (veth, bridge, tc tbf
           caps; needs root): tokens/s, TTFT and per-hop latency at each bandwidth cap.

"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {s}")
    return v


def _int_list(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,2,3, got {s!r}") from None
    if not out or any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"expected numbers >= 1 like 1,2,3, got {s!r}")
    return out


def _size(s: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = s.strip().lower().removesuffix("ib").removesuffix("b")
    mult = units.get(t[-1:], 1)
    if t[-1:] in units:
        t = t[:-1]
    try:
        v = int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 4K or 16M, got {s!r}") from None
    if v < 4 or v % 4:
        raise argparse.ArgumentTypeError(f"sizes must be multiples of 4 bytes, got {s!r}")
    return v


def _progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _write_outputs(result: dict, args: argparse.Namespace, plot) -> int:
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        _progress(f"wrote {args.json}")
    if args.plot:
        try:
            plot(result, args.plot)
            _progress(f"wrote {args.plot}")
        except ImportError:
            _progress("--plot skipped: matplotlib is not installed (pip install matplotlib)")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from bench import compare, report

    cfg = compare.CompareConfig(
        model=args.model, dtype=args.dtype, device=args.device, prompt_len=args.prompt_len,
        new_tokens=args.new_tokens, concurrency=args.concurrency, stages=args.stages,
        threads=args.threads, max_batch=args.max_batch, direct=args.direct,
        baseline=not args.no_baseline, batch1_runs=args.batch1_runs,
        baseline_omp_wait_policy=(None if args.baseline_omp_wait_policy == "unset"
                                  else args.baseline_omp_wait_policy), log_dir=args.logs)
    result = compare.compare(cfg, progress=_progress)
    print(report.format_compare(result))
    return _write_outputs(result, args, report.plot_compare)


def _cmd_http(args: argparse.Namespace) -> int:
    from bench import serving

    cfg = serving.HttpConfig(model=args.model, stages=args.stages, prompt_len=args.prompt_len,
                             new_tokens=args.new_tokens, concurrency=args.concurrency,
                             rounds=args.rounds, threads=args.threads, log_dir=args.logs)
    result = serving.http_bench(cfg, progress=_progress)
    print(serving.format_http(result))
    return _write_outputs(result, args, None)


def _cmd_transport(args: argparse.Namespace) -> int:
    from bench import transport

    cfg = transport.TransportConfig(
        sizes=args.sizes, activations=not args.no_activations, modes=args.modes,
        max_iters=args.max_iters, max_seconds=args.max_seconds)
    result = transport.transport(cfg, progress=_progress)
    print(transport.format_transport(result))
    return _write_outputs(result, args, transport.plot_transport)


def _cmd_netns(args: argparse.Namespace) -> int:
    from bench import netns

    cfg = netns.NetnsBenchConfig(
        model=args.model, nodes=args.nodes, rates=tuple(args.rates), new_tokens=args.new_tokens,
        runs=args.runs, threads=args.threads, direct=args.direct, delay_ms=args.delay_ms,
        reference=not args.no_reference, log_dir=Path(args.logs) if args.logs else None)
    try:
        result = netns.bench(cfg, progress=_progress)
    except netns.NetnsError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    print(netns.format_bench(result))
    return _write_outputs(result, args, None)


def build_parser() -> argparse.ArgumentParser:
    """``python -m bench`` with its modes ``compare`` and ``transport``."""
    from bench.transport import DEFAULT_SIZES, MODES

    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = p.add_subparsers(dest="bench_mode", metavar="{compare,http,transport,netns}",
                             required=True)

    c = modes.add_parser("compare", help="transformers generate vs zpipe with 1..N stages")
    c.add_argument("--model", default="smollm2", help="cached model name or HF directory")
    c.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    c.add_argument("--device", default="cpu", help="cpu or cuda:N")
    c.add_argument("--prompt-len", type=_positive_int, default=64, help="prompt tokens")
    c.add_argument("--new-tokens", type=_positive_int, default=128)
    c.add_argument("--concurrency", type=_positive_int, default=16,
                   help="sessions at once (transformers: one padded batch); 1 = batch 1 only")
    c.add_argument("--stages", type=_int_list, default=[1, 2, 3], help="e.g. 1,2,3")
    c.add_argument("--threads", type=_positive_int, default=None,
                   help="torch threads per process (default: every core)")
    c.add_argument("--max-batch", type=_positive_int, default=None,
                   help="the nodes' max_batch: most sessions merged into one batch "
                        "(default: the node default, 64)")
    c.add_argument("--direct", action="store_true",
                   help="activations go node to node (the broker's 'direct'), not via the broker")
    c.add_argument("--batch1-runs", type=_positive_int, default=None,
                   help="batch-1 generations per system (default: max(concurrency, 3))")
    c.add_argument("--baseline-omp-wait-policy", choices=("PASSIVE", "ACTIVE", "unset"),
                   default="PASSIVE", help="OMP_WAIT_POLICY of the transformers process "
                   "(default PASSIVE, as zpipe's nodes)")
    c.add_argument("--no-baseline", action="store_true", help="skip transformers")
    c.add_argument("--logs", help="directory for the clusters' logs (default: a temp dir)")
    c.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    c.add_argument("--plot", metavar="PATH.png", help="draw a PNG (needs matplotlib)")
    c.set_defaults(func=_cmd_compare)

    h = modes.add_parser("http", help="zpipe serve (HTTP) vs the Python client, same cluster")
    h.add_argument("--model", default="smollm2", help="cached model name or HF directory")
    h.add_argument("--stages", type=_positive_int, default=2)
    h.add_argument("--prompt-len", type=_positive_int, default=64, help="prompt tokens")
    h.add_argument("--new-tokens", type=_positive_int, default=64)
    h.add_argument("--concurrency", type=_int_list, default=[1, 8],
                   help="sessions at once, e.g. 1,8 (default)")
    h.add_argument("--rounds", type=_positive_int, default=3,
                   help="rounds per path and concurrency, the paths taking turns")
    h.add_argument("--threads", type=_positive_int, default=None,
                   help="torch threads per node (default: every core)")
    h.add_argument("--logs", help="directory for the logs (default: a temp dir)")
    h.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    h.set_defaults(func=_cmd_http, plot=None)

    t = modes.add_parser("transport", help="tensor-frame round trips broker <-> node")
    t.add_argument("--sizes", type=lambda s: [_size(x) for x in s.split(",") if x.strip()],
                   default=list(DEFAULT_SIZES), help="frame sizes, e.g. 4K,64K,1M,16M,64M "
                   "(default: 4K..64M in powers of 4)")
    t.add_argument("--no-activations", action="store_true",
                   help="skip the decode-sized activations (SmolLM2, Llama-3.2-1B, -3-8B)")
    t.add_argument("--modes", type=lambda s: [x for x in s.split(",") if x],
                   default=list(MODES), help=f"comma list of {', '.join(MODES)}")
    t.add_argument("--max-iters", type=_positive_int, default=2000,
                   help="most round trips per size and mode")
    t.add_argument("--max-seconds", type=float, default=1.0,
                   help="most seconds per size and mode (at least 5 round trips)")
    t.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    t.add_argument("--plot", metavar="PATH.png", help="draw a PNG (needs matplotlib)")
    t.set_defaults(func=_cmd_transport)

    n = modes.add_parser("netns", help="a cluster across network namespaces, capped links")
    n.add_argument("--model", default="smollm2", help="cached model name or HF directory")
    n.add_argument("--nodes", type=_positive_int, default=2)
    n.add_argument("--rates", type=lambda s: [x for x in s.split(",") if x],
                   default=["1gbit", "20mbit"], help="tc tbf caps, e.g. 1gbit,20mbit")
    n.add_argument("--new-tokens", type=_positive_int, default=64)
    n.add_argument("--runs", type=_positive_int, default=3, help="generations per cap")
    n.add_argument("--threads", type=_positive_int, default=1, help="torch threads per node")
    n.add_argument("--direct", action="store_true", help="activations go node to node")
    n.add_argument("--delay-ms", type=float, default=0.0,
                   help="latency added each way between the nodes and the broker (a TCP proxy)")
    n.add_argument("--no-reference", action="store_true", help="skip transformers' tokens")
    n.add_argument("--logs", help="directory for the processes' logs (default: a temp dir)")
    n.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    n.set_defaults(func=_cmd_netns, plot=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    try:
        return args.func(args)
    except LookupError as e:  # a model that is not there, with what to do about it
        print(f"bench: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2

