"""What a GPU node's prefill batch costs the first time its size comes, and warm.

    python scripts/profile_prefill.py --model /tmp/llama-1b --layers 8-15 --batches 1 4 12 32

One node's executor in-process, no broker. Each batch is ``k`` fresh sessions with a
``--prompt``-token prompt each, run twice in a row: the first run pays whatever a new shape
costs (kernel choice and loading, attention plans), the second is the warm figure. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from profile_decode import _step_msg  # noqa: E402 (beside this script)

from nodes.executor import Executor  # noqa: E402
from zpipe.config import StaticKV, parse_layers  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--layers", default=None, help="e.g. 8-15 (default: all)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 12, 32])
    ap.add_argument("--prompt", type=int, default=32, help="tokens per prompt")
    ap.add_argument("--warm", type=int, nargs="*", default=[],
                    help="first run one prompt of each of these lengths (warms those shapes)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    ex = Executor(Path(args.model), "bfloat16", "cuda:0", max_batch=max(args.batches),
                  static_kv=StaticKV())
    start, end = parse_layers(args.layers) if args.layers else (0, ex.spec.num_layers)
    ex.load(start, end, epoch=1)
    out: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                 "layers": [start, end - 1], "prompt": args.prompt,
                 "load_s": round(time.perf_counter() - t0, 2), "batches": {}}
    first, n = ex.stage.first, 0

    def prefill(k: int, prompt: int) -> float:
        nonlocal n
        sids = [f"s{n}.{i}" for i in range(k)]
        n += 1
        x = (torch.randint(0, 1000, (k * prompt,)) if first
             else torch.randn(k * prompt, ex.spec.hidden_size, dtype=torch.bfloat16))
        rows = ex.rows_of(_step_msg([[s, 0, 0, prompt] for s in sids], x))
        torch.cuda.synchronize()
        t = time.perf_counter()
        ex.step_batch(rows)
        torch.cuda.synchronize()
        ex.free(sids)
        return round((time.perf_counter() - t) * 1e3, 2)

    # The process's first prefill pays for everything used the first time: not a batch size's.
    out["process_first_ms"] = prefill(1, args.prompt + 1)
    out["warm_ms"] = {t: prefill(1, t) for t in args.warm}
    for k in args.batches:
        times = [prefill(k, args.prompt) for _ in range(2)]
        out["batches"][k] = {"first_ms": times[0], "warm_ms": times[1]}
        print(k, times, file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
