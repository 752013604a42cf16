"""The broker's admin interface: ``admin`` requests (status, nodes, sessions, metrics, profile).

Replies are ``admin_reply`` messages whose ``data`` is plain JSON-able values (seconds, bytes;
``None`` where a figure is not known yet). ``profile`` asks every stage node of the placement
for a per-part timing profile and answers once all replied or the timeout passed; it runs as
its own task so that the broker keeps routing (the node replies come through the same loop).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from zpipe import protocol
from zpipe.metrics import Metrics
from zpipe.protocol import Message

log = logging.getLogger("zpipe.admin")

OPS = ("status", "nodes", "sessions", "metrics", "profile")
PROFILE_TIMEOUT_S = 10.0
MAX_PROFILE_TOKENS = 2048

# rid of a profile request sent to nodes -> (node name -> future of its profile_reply header)
_pending: dict[str, dict[str, asyncio.Future]] = {}
_tasks: set[asyncio.Task] = set()


class _BadRequest(ValueError):
    pass


async def handle(broker: Any, ident: bytes, msg: Message) -> None:
    rid, op, args = msg["rid"], msg["op"], msg.get("args") or {}
    try:
        if op == "profile":
            tokens = _int_arg(args, "tokens", 16, 1, MAX_PROFILE_TOKENS)
            timeout = _num_arg(args, "timeout", PROFILE_TIMEOUT_S, 0.1, 120.0)
            if broker.placement is None or not broker.ready:
                await broker._send(ident, protocol.error(
                    "no_placement", f"no placement to profile: {broker.waiting_for}", rid=rid))
                return
            task = asyncio.create_task(_profile(broker, ident, rid, tokens, timeout))
            _tasks.add(task)
            task.add_done_callback(_tasks.discard)
            return
        if args and op != "profile":
            raise _BadRequest(f"op {op!r} takes no args, got {sorted(args)}")
        if op == "status":
            data = status(broker)
        elif op == "nodes":
            data = {"nodes": nodes(broker)}
        elif op == "sessions":
            data = {"sessions": sessions(broker)}
        elif op == "metrics":
            m = _metrics(broker)
            data = {"text": m.prometheus(node_gauges(broker)), "overall": m.overall(),
                    "nodes": {n: m.node_summary(n) for n in m.node_names()}}
        else:
            raise _BadRequest(f"unknown admin op {op!r}; one of {', '.join(OPS)}")
    except _BadRequest as e:
        await broker._send(ident, protocol.error("bad_request", str(e), rid=rid))
        return
    await broker._send(ident, protocol.encode("admin_reply", rid=rid, op=op, data=data))


def _int_arg(args: dict, key: str, default: int, lo: int, hi: int) -> int:
    v = args.get(key, default)
    if type(v) is not int or not lo <= v <= hi:
        raise _BadRequest(f"{key} must be an integer in {lo}..{hi}, got {v!r}")
    return v


def _num_arg(args: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = args.get(key, default)
    if type(v) not in (int, float) or not lo <= v <= hi:
        raise _BadRequest(f"{key} must be a number in {lo}..{hi}, got {v!r}")
    return float(v)


def _metrics(broker: Any) -> Metrics:
    m = getattr(broker, "metrics", None)
    if m is None:  # a broker without metrics wired: empty figures, not a crash
        m = broker.metrics = Metrics()
    return m


# ---------------------------------------------------------------- views of broker state
def _ordered_nodes(broker: Any) -> list:
    """Nodes in pipeline order first, then the others by name."""
    order = {st.node: i for i, st in enumerate(broker.placement.stages)} if broker.placement else {}
    return sorted(broker.registry.all(), key=lambda n: (order.get(n.name, len(order)), n.name))


def nodes(broker: Any) -> list[dict]:
    m, spec = _metrics(broker), broker.spec
    out = []
    for n in _ordered_nodes(broker):
        d = n.to_dict()
        held = n.state in ("loading", "ready")
        rss = int(n.stats.get("rss", 0) or 0)
        kv = int(n.stats.get("kv_bytes", 0) or 0)
        s = m.node_summary(n.name)
        d.update({
            "heartbeat_age_s": round(time.monotonic() - n.last_seen, 3),
            # memory: the device's total/free as the node last told (register or heartbeat),
            # used = what the process holds (its rss; for a GPU node the weights + KV)
            "mem_free": int(n.stats.get("mem_free", n.mem_free)),
            "mem_used": int(n.stats.get("mem_used", 0) or (
                rss if not n.device.startswith("cuda") else n.weight_bytes + kv)),
            "rss": rss, "kv_bytes": kv,
            "layers": [n.start, n.end] if held else None,
            "num_layers": n.end - n.start if held else 0,
            "heads": "all" if held else None,
            "num_heads": spec.num_heads if held else 0,
            "kv_heads": spec.num_kv_heads if held else 0,
            "tokens": s["tokens"], "compute": s["compute"], "hop": s["hop"],
            "prefill": s["prefill"],
        })
        out.append(d)
    return out


def sessions(broker: Any) -> list[dict]:
    m = _metrics(broker)
    now = time.perf_counter()
    out = []
    for sid, s in list(broker.sessions.items()):
        row = {"sid": sid, "rid": s.rid, "prompt_tokens": len(s.prompt_ids),
               "tokens": len(s.tokens), "tokens_per_s": None,
               "ttft_s": None if s.first_token_s is None else round(s.first_token_s, 6),
               "step_p50_s": None, "step_p99_s": None, "age_s": round(now - s.created, 3),
               "state": "running"}
        ms = m.session_summary(sid)
        if ms is not None:
            row.update({k: ms[k] for k in ("tokens_per_s", "step_p50_s", "step_p99_s")})
        out.append(row)
    return out


def status(broker: Any) -> dict:
    p = broker.placement
    return {
        "ready": broker.ready, "waiting_for": broker.waiting_for,
        "model": str(broker.model_dir), "num_layers": broker.spec.num_layers,
        "placement": {"epoch": p.epoch, "stages": p.to_list()} if p else None,
        "nodes": nodes(broker), "sessions": sessions(broker),
        "overall": _metrics(broker).overall(),
    }


def node_gauges(broker: Any) -> list[tuple[str, str, dict, float]]:
    """Per-node gauges for the Prometheus text: up, heartbeat age, memory, layers."""
    out = [("zpipe_ready", "1 when a placement is loaded and serving.", {}, int(broker.ready)),
           ("zpipe_placement_epoch", "Epoch of the current placement (0: none).", {},
            broker.placement.epoch if broker.placement else 0)]
    for d in nodes(broker):
        lab = {"node": d["name"]}
        out += [
            ("zpipe_node_up", "1 when the node is alive and holds its layers.", lab,
             int(d["state"] == "ready")),
            ("zpipe_node_heartbeat_age_seconds", "Seconds since the node was last heard.", lab,
             d["heartbeat_age_s"]),
            ("zpipe_node_rss_bytes", "Resident memory of the node process.", lab, d["rss"]),
            ("zpipe_node_kv_bytes", "KV cache bytes the node holds.", lab, d["kv_bytes"]),
            ("zpipe_node_weight_bytes", "Weight bytes the node holds.", lab, d["weight_bytes"]),
            ("zpipe_node_memory_free_bytes", "Free memory of the node's device.", lab,
             d["mem_free"]),
            ("zpipe_node_memory_total_bytes", "Total memory of the node's device.", lab,
             d["mem_total"]),
            ("zpipe_node_layers", "Decoder layers the node holds.", lab, d["num_layers"]),
            ("zpipe_node_sessions", "Sessions with a KV cache on the node.", lab, d["sessions"]),
        ]
    return out


# ---------------------------------------------------------------- profile
async def on_profile_reply(broker: Any, node: Any, msg: Message) -> None:
    waiting = _pending.get(msg["rid"], {})
    fut = waiting.get(node.name)
    if fut is None or fut.done():
        log.info("late or unknown profile reply from %s", node.name)
        return
    fut.set_result(dict(msg.header))


async def _profile(broker: Any, ident: bytes, rid: str, tokens: int, timeout: float) -> None:
    try:
        data = await profile(broker, tokens, timeout)
    except Exception as e:  # answer the admin client whatever happens
        log.exception("profile failed")
        await broker._send(ident, protocol.error("internal", f"profile failed: {e!r}", rid=rid))
        return
    await broker._send(ident, protocol.encode("admin_reply", rid=rid, op="profile", data=data))


async def profile(broker: Any, tokens: int, timeout: float = PROFILE_TIMEOUT_S) -> dict:
    stages = list(broker.placement.stages)
    prid = uuid.uuid4().hex
    loop = asyncio.get_running_loop()
    futs = {st.node: loop.create_future() for st in stages}
    _pending[prid] = futs
    try:
        frames = protocol.encode("profile", rid=prid, tokens=tokens)
        for st in stages:
            node = broker.registry.by_name.get(st.node)
            if node is None or not await broker._send(node.ident, frames):
                futs[st.node].set_exception(ConnectionError("unreachable"))
        await asyncio.wait(list(futs.values()), timeout=timeout)
    finally:
        _pending.pop(prid, None)
    return merge(stages, futs, tokens, timeout)


def merge(stages: list, futs: dict[str, asyncio.Future], tokens: int, timeout: float) -> dict:
    """One table for the whole model, in pipeline order; a silent node gets an error row."""
    rows, node_rows = [], []
    total_prefill = total_decode = 0.0
    for st in stages:
        fut = futs[st.node]
        info: dict = {"node": st.node, "start": st.start, "end": st.end, "ok": False}
        if not fut.done():
            fut.cancel()
            info["error"] = f"no answer in {timeout:g} s"
        elif fut.cancelled() or fut.exception() is not None:
            info["error"] = "unreachable"
        else:
            r = fut.result()
            info.update(ok=True, weight_bytes=r["weight_bytes"], kv_bytes=r["kv_bytes"],
                        rss=r["rss"], device_mem=r.get("device_mem"))
            for part in r["parts"]:
                name, pre = part[0], float(part[1])
                dec = float(part[2]) if len(part) > 2 else None
                rows.append({"part": name, "node": st.node, "prefill_s": pre, "decode_s": dec})
                total_prefill += pre
                total_decode += dec or 0.0
        if not info["ok"]:
            rows.append({"part": f"layers {st.start}-{st.end - 1}", "node": st.node,
                         "prefill_s": None, "decode_s": None, "error": info["error"]})
        node_rows.append(info)
    for row in rows:
        if row["decode_s"] is not None and total_decode > 0:
            row["decode_share"] = round(row["decode_s"] / total_decode, 4)
    return {"tokens": tokens, "parts": rows, "nodes": node_rows,
            "total": {"prefill_s": round(total_prefill, 6), "decode_s": round(total_decode, 6)},
            "complete": all(n["ok"] for n in node_rows)}
