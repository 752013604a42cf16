"""``zpipe generate`` and ``zpipe chat``: a client on the command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import defaultdict

from zpipe import aio
from zpipe.client import Client, Generation, ZpipeError
from zpipe.stats import summary

SAMPLING = ("temperature", "top_k", "top_p", "frequency_penalty", "presence_penalty",
            "repetition_penalty")


def _options(args: argparse.Namespace, defaults: dict | None = None) -> dict:
    """The client options the flags give: each sampling flag left out takes its value from
    ``defaults`` (a chat's), else the client's (greedy)."""
    out = {"max_new_tokens": args.max_new_tokens, "seed": args.seed}
    base = defaults if defaults is not None and args.temperature is None else {}
    for key in SAMPLING:
        value = getattr(args, key)
        if value is None:
            value = base.get(key)
        if value is not None:
            out[key] = value
    return out


def latency_report(gen: Generation) -> str:
    """A few lines: time to first token, per-token latency percentiles, per-stage split."""
    decode = gen.latencies_s[1:]
    s = summary(decode)
    lines = [f"{len(gen.token_ids)} tokens ({gen.finish_reason}), prompt "
             f"{len(gen.prompt_token_ids)} tokens; time to first token "
             f"{gen.ttft_s * 1000:.1f} ms; {gen.tokens_per_s:.1f} tokens/s"]
    if decode:
        lines.append(f"per-token latency: p50 {s['p50'] * 1000:.1f} ms, p90 "
                     f"{s['p90'] * 1000:.1f} ms, p99 {s['p99'] * 1000:.1f} ms, "
                     f"mean {s['mean'] * 1000:.1f} ms")
    per_node: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for t in gen.timings[1:]:
        for node, compute, hop in t["stages"]:
            per_node[node].append((compute, hop))
    for node, vals in per_node.items():
        c = summary([v[0] for v in vals])
        h = summary([v[1] for v in vals])
        lines.append(f"  stage {node}: compute p50 {c['p50'] * 1000:.2f} ms, "
                     f"hop+queue p50 {h['p50'] * 1000:.2f} ms")
    return "\n".join(lines)


async def _generate(args: argparse.Namespace) -> int:
    async with Client(args.broker, key=args.key, broker_key=args.broker_key) as client:
        if args.json:
            gen = await client.generate(args.prompt, chat=args.chat, **_options(args))
            print(json.dumps({
                "text": gen.text, "prompt_token_ids": gen.prompt_token_ids,
                "token_ids": gen.token_ids, "finish_reason": gen.finish_reason,
                "ttft_s": gen.ttft_s, "total_s": gen.total_s, "tokens_per_s": gen.tokens_per_s,
                "timings": gen.timings}))
            return 0
        gen = await stream_to_stdout(client, args.prompt, args.chat, _options(args))
        print(latency_report(gen), file=sys.stderr)
        return 0


async def stream_to_stdout(client: Client, prompt: str | list, chat: bool,
                           options: dict) -> Generation:
    """Print tokens as they arrive; returns the whole record."""
    gen = await client.generate(prompt, chat=chat, **options,
                                on_token=lambda c: print(c.text, end="", flush=True))
    print()
    return gen


def run_generate(args: argparse.Namespace) -> int:
    try:
        return aio.run(_generate(args))
    except ZpipeError as e:
        print(f"zpipe: {e}", file=sys.stderr)
        return 1


async def _chat(args: argparse.Namespace) -> int:
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    async with Client(args.broker, key=args.key, broker_key=args.broker_key) as client:
        from zpipe.sampling import chat_sampling  # torch: only where a chat needs it

        info = await client.info()
        options = _options(args, chat_sampling(info.get("generation")))
        shown = ", ".join(f"{k} {options[k]}" for k in SAMPLING if k in options) or "greedy"
        print(f"chatting with {info['model']} ({len(info['placement'])} stages; {shown}). "
              "/reset starts over, /exit or Ctrl-D quits.", file=sys.stderr)
        while True:
            try:
                line = await asyncio.to_thread(input, "you> ")
            except EOFError:
                print()
                return 0
            if line.strip() in ("/exit", "/quit"):
                return 0
            if line.strip() == "/reset":
                del messages[int(bool(args.system)):]
                continue
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            print("model> ", end="", flush=True)
            try:
                gen = await stream_to_stdout(client, messages, False, options)
            except ZpipeError as e:
                print(f"\n[error: {e}]", file=sys.stderr)
                messages.pop()
                continue
            messages.append({"role": "assistant", "content": gen.text})


def run_chat(args: argparse.Namespace) -> int:
    try:
        return aio.run(_chat(args))
    except ZpipeError as e:
        print(f"zpipe: {e}", file=sys.stderr)
        return 1
