"""A node's per-part timing profile of its stage, for ``zpipe admin profile``.

Runs on the node's compute thread, on a throwaway KV cache: one warm-up, a prefill of
``tokens`` tokens, then ``DECODE_STEPS`` single-token decode steps. Inputs are random: token
ids below the vocabulary size on stage 0, a random hidden state elsewhere.

The result's ``parts`` is a list of ``[name, prefill_s, decode_s]`` in model order ("embed",
"layer.N", ..., "norm", "lm_head"): ``prefill_s`` the seconds of that part for the whole
prefill of ``tokens`` tokens, ``decode_s`` its mean seconds per decode step.
"""

from __future__ import annotations

import torch

from nodes.executor import Executor, StepError
from zpipe import protocol, sysinfo

DECODE_STEPS = 8
MAX_TOKENS = 2048


def run(executor: Executor, tokens: int = 16) -> dict:
    stage = executor.stage
    if stage is None:
        raise StepError("not_loaded", "this node holds no layers yet")
    tokens = max(1, min(int(tokens), MAX_TOKENS, executor.max_step_tokens))
    spec = stage.spec
    gen = torch.Generator().manual_seed(0)

    def inputs(n: int) -> torch.Tensor:
        if stage.first:
            return torch.randint(0, spec.vocab_size, (n,), dtype=torch.int64, generator=gen)
        return torch.randn(n, spec.hidden_size, generator=gen).to(stage.dtype)

    warm = stage.new_cache()  # warm-up of both shapes, not counted
    stage.forward(warm, inputs(min(tokens, 4)), 0)
    stage.forward(warm, inputs(1), warm.length)
    del warm
    cache = stage.new_cache()
    prefill: dict[str, float] = {}
    stage.forward(cache, inputs(tokens), 0, prefill)
    decode: dict[str, float] = {}
    for _ in range(DECODE_STEPS):
        stage.forward(cache, inputs(1), cache.length, decode)
    parts = [[name, round(secs, 9), round(decode.get(name, 0.0) / DECODE_STEPS, 9)]
             for name, secs in prefill.items()]
    out = {"parts": parts, "weight_bytes": stage.weight_bytes(), "kv_bytes": executor.kv_bytes(),
           "rss": sysinfo.rss_bytes()}
    # Device memory travels only once the protocol has the (optional) field for it.
    if stage.device.type == "cuda" and "device_mem?" in protocol.SCHEMAS["profile_reply"]:
        out["device_mem"] = int(torch.cuda.memory_allocated(stage.device))
    del cache
    return out
