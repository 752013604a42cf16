"""The broker's admin interface: ``admin`` requests.

Reading: status, nodes, sessions, metrics, profile, plan. Acting: move, rebalance, drain, slow.

Replies are ``admin_reply`` messages whose ``data`` is plain JSON-able values (seconds, bytes;
``None`` where a figure is not known yet). ``profile`` asks every stage node of the placement
for a per-part timing profile and answers once all replied or the timeout passed; it runs as
its own task so that the broker keeps routing (the node replies come through the same loop).
The acting ops run as tasks for the same reason: they wait on the mover (layer moves: loads
and KV transfers that come back through the same loop). A failed move answers the error
``move_failed`` with the mover's message; an infeasible ``plan`` answers ``infeasible`` with the
numbers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

from brokers import rebalance
from brokers.core import Core
from brokers.mover import MoveError, Mover
from brokers.registry import NodeInfo
from zpipe import protocol
from zpipe.config import parse_layers
from zpipe.placement import STRATEGIES, PlacementError, PlanResult
from zpipe.protocol import Message

log = logging.getLogger("zpipe.admin")

OPS = ("status", "nodes", "sessions", "metrics", "profile", "plan", "move", "rebalance", "drain",
       "slow")
ARGS = {"profile": ("tokens", "timeout"), "plan": ("strategy",), "move": ("layers", "to", "heads"),
        "rebalance": ("strategy",), "drain": ("node",), "slow": ("node", "factor")}
PROFILE_TIMEOUT_S = 10.0
MAX_PROFILE_TOKENS = 2048
MAX_SLOW_FACTOR = 1000.0
HISTORY_SHOWN = 20

class _BadRequest(ValueError):
    pass


class Admin:
    """The broker's admin component: given the core (``brokers.core.Core``) and the mover.
    Its state: the profile requests waiting for node replies, and the tasks it runs."""

    def __init__(self, core: Core, mover: Mover) -> None:
        self.core = core
        self.mover = mover
        # rid of a profile request sent to nodes -> (node name -> future of its profile_reply)
        self.pending: dict[str, dict[str, asyncio.Future]] = {}
        # The running profile and acting ops: the event loop keeps only weak references.
        self.tasks: set[asyncio.Task] = set()

    async def handle(self, ident: bytes, msg: Message) -> None:
        """An ``admin`` request: answered now, or by a task for profile and the acting ops."""
        core = self.core
        rid, op, args = msg["rid"], msg["op"], msg.get("args") or {}
        try:
            if op not in OPS:
                raise _BadRequest(f"unknown admin op {op!r}; one of {', '.join(OPS)}")
            allowed = ARGS.get(op, ())
            extra = sorted(k for k in args if k not in allowed)
            if extra:
                raise _BadRequest(f"op {op!r} takes no args, got {extra}" if not allowed else
                                  f"op {op!r} takes args {', '.join(allowed)}; got {extra}")
            if op == "profile":
                tokens = _int_arg(args, "tokens", 16, 1, MAX_PROFILE_TOKENS)
                timeout = _num_arg(args, "timeout", PROFILE_TIMEOUT_S, 0.1, 120.0)
                if core.placement is None or not core.ready:
                    await core.send(ident, protocol.error(
                        "no_placement", f"no placement to profile: {core.waiting_for}", rid=rid))
                    return
                self._spawn(self._profile(ident, rid, tokens, timeout))
                return
            if op in ("move", "rebalance", "drain", "slow"):
                call = self._action(op, args)
                self._spawn(self._act(ident, rid, op, call))
                return
            if op == "status":
                data = status(core, self.mover.history)
            elif op == "nodes":
                data = {"nodes": nodes(core)}
            elif op == "sessions":
                data = {"sessions": sessions(core)}
            elif op == "metrics":
                m = core.metrics
                data = {"text": m.prometheus(node_gauges(core)), "overall": m.overall(),
                        "nodes": {n: m.node_summary(n) for n in m.node_names()}}
            else:  # plan
                try:
                    data = plan(core, _strategy_arg(core, args))
                except PlacementError as e:
                    await core.send(ident, protocol.error("infeasible", str(e), rid=rid))
                    return
        except _BadRequest as e:
            await core.send(ident, protocol.error("bad_request", str(e), rid=rid))
            return
        await core.send(ident, protocol.encode("admin_reply", rid=rid, op=op, data=data))

    def _spawn(self, coro: Coroutine) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def idle(self) -> None:
        """Wait for the running profile and acting ops to end."""
        while self.tasks:
            await asyncio.gather(*self.tasks)

    # ------------------------------------------------------------ acting: the mover
    def _action(self, op: str, args: dict) -> Callable[[], Awaitable[Any]]:
        """Validate the args of an acting op; returns a no-argument coroutine function."""
        core, mover = self.core, self.mover
        if op == "move":
            try:
                start, end = parse_layers(args.get("layers"))
            except ValueError as e:
                raise _BadRequest(str(e)) from None
            n = core.spec.num_layers
            if end > n:
                raise _BadRequest(f"layers {start}-{end - 1} are out of range: the model has "
                                  f"{n} layers (0-{n - 1})")
            to = _node_arg(core, args, "to")
            if args.get("heads") is not None:  # KV heads of a stage, with their KV
                try:
                    heads = parse_layers(args["heads"])
                except ValueError as e:
                    raise _BadRequest(f"heads: {e}") from None
                return lambda: mover.move_heads(start, end, heads, to, reason="admin move heads")
            return lambda: mover.move_layers(start, end, to, reason="admin move")
        if op == "rebalance":
            strategy = _strategy_arg(core, args)
            return lambda: mover.rebalance(strategy, reason="admin rebalance")
        if op == "drain":
            node = _node_arg(core, args, "node")
            return lambda: mover.drain(node, reason="admin drain")
        node = _node_arg(core, args, "node")  # slow
        factor = args.get("factor")
        if (type(factor) not in (int, float) or not math.isfinite(factor)
                or not 0 < factor <= MAX_SLOW_FACTOR):
            raise _BadRequest(f"factor must be a number > 0 and ≤ {MAX_SLOW_FACTOR:g}, "
                              f"got {factor!r}")
        return lambda: self.slow(node, float(factor))

    async def slow(self, name: str, factor: float) -> dict:
        """Make node ``name`` compute ``factor`` times slower (benchmarks and tests)."""
        node = self.core.registry.by_name.get(name)
        if node is None or node.state == "dead":
            raise MoveError(f"node {name} is not alive")
        await self.core.send(node.ident, protocol.encode("set_slow", factor=float(factor)))
        return {"node": name, "factor": factor}

    async def _act(self, ident: bytes, rid: str, op: str,
                   call: Callable[[], Awaitable[Any]]) -> None:
        send = self.core.send
        try:
            result = await call()
        except MoveError as e:
            await send(ident, protocol.error("move_failed", str(e), rid=rid))
            return
        except Exception as e:  # answer the admin client whatever happens
            log.exception("admin %s failed", op)
            await send(ident, protocol.error("internal", f"{op} failed: {e!r}", rid=rid))
            return
        data = jsonable(result) if isinstance(result, dict) else {"result": jsonable(result)}
        await send(ident, protocol.encode("admin_reply", rid=rid, op=op, data=data))

    # ------------------------------------------------------------ profile
    async def on_profile_reply(self, node: NodeInfo, msg: Message) -> None:
        waiting = self.pending.get(msg["rid"], {})
        fut = waiting.get(node.name)
        if fut is None or fut.done():
            log.info("late or unknown profile reply from %s", node.name)
            return
        fut.set_result(dict(msg.header))

    async def _profile(self, ident: bytes, rid: str, tokens: int, timeout: float) -> None:
        send = self.core.send
        try:
            data = await self.profile(tokens, timeout)
        except Exception as e:  # answer the admin client whatever happens
            log.exception("profile failed")
            await send(ident, protocol.error("internal", f"profile failed: {e!r}", rid=rid))
            return
        await send(ident, protocol.encode("admin_reply", rid=rid, op="profile", data=data))

    async def profile(self, tokens: int, timeout: float = PROFILE_TIMEOUT_S) -> dict:
        """Every stage node's per-part timing profile, merged in pipeline order."""
        core = self.core
        stages = list(core.placement.stages)
        prid = uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        futs = {st.node: loop.create_future() for st in stages}
        self.pending[prid] = futs
        try:
            frames = protocol.encode("profile", rid=prid, tokens=tokens)
            for st in stages:
                node = core.registry.by_name.get(st.node)
                if node is None or not await core.send(node.ident, frames):
                    futs[st.node].set_exception(ConnectionError("unreachable"))
            await asyncio.wait(list(futs.values()), timeout=timeout)
        finally:
            self.pending.pop(prid, None)
        return merge(stages, futs, tokens, timeout)


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


def _str_arg(args: dict, key: str) -> str:
    v = args.get(key)
    if not isinstance(v, str) or not v:
        raise _BadRequest(f"{key} must be a non-empty string, got {v!r}")
    return v


def _strategy_arg(broker: Core, args: dict) -> str:
    v = args.get("strategy")
    if v is None:
        return broker.cfg.placement.strategy
    if v not in STRATEGIES:
        raise _BadRequest(f"strategy must be one of {', '.join(STRATEGIES)}, got {v!r}")
    return v


def _node_arg(broker: Core, args: dict, key: str) -> str:
    name = _str_arg(args, key)
    node = broker.registry.by_name.get(name)
    if node is None:
        known = ", ".join(sorted(broker.registry.by_name)) or "none"
        raise _BadRequest(f"unknown node {name!r} (registered: {known})")
    return name


# ---------------------------------------------------------------- views of broker state
def _ordered_nodes(broker: Core) -> list:
    """Nodes in pipeline order first, then the others by name."""
    order = {n: i for i, n in enumerate(broker.placement.nodes())} if broker.placement else {}
    return sorted(broker.registry.all(), key=lambda n: (order.get(n.name, len(order)), n.name))


def nodes(broker: Core) -> list[dict]:
    m, spec = broker.metrics, broker.spec
    out = []
    for n in _ordered_nodes(broker):
        d = n.to_dict()
        held = n.state in ("loading", "ready")
        # KV heads held: all of them, or a share "A-B" (inclusive) of a stage split by heads
        kv_heads = (n.heads[1] - n.heads[0] if n.heads else spec.num_kv_heads) if held else 0
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
            "heads": None if not held else "all" if not n.heads else str(n.heads[0])
            if n.heads[1] - n.heads[0] == 1 else f"{n.heads[0]}-{n.heads[1] - 1}",
            "num_heads": kv_heads * (spec.num_heads // spec.num_kv_heads),
            "kv_heads": kv_heads,
            "tokens": s["tokens"], "compute": s["compute"], "hop": s["hop"],
            "prefill": s["prefill"],
        })
        out.append(d)
    return out


def sessions(broker: Core) -> list[dict]:
    m = broker.metrics
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


def status(broker: Core, history: Iterable[dict]) -> dict:
    p = broker.placement
    return {
        "ready": broker.ready, "waiting_for": broker.waiting_for,
        "model": str(broker.model_dir), "num_layers": broker.spec.num_layers,
        "placement": {"epoch": p.epoch, "stages": p.to_list()} if p else None,
        "nodes": nodes(broker), "sessions": sessions(broker),
        "overall": broker.metrics.overall(),
        "reallocations": reallocations(history),
    }


def reallocations(history: Iterable[dict], last: int = HISTORY_SHOWN) -> list[dict]:
    """The last records of the reallocation history (time, reason, before, after, kv_bytes,
    pause_s, ok, error)."""
    return [jsonable(r) for r in list(history)[-last:]]


def jsonable(v: Any) -> Any:
    """Plain msgpack/JSON values: dataclasses and objects with to_dict/to_list become dicts
    and lists, tuples lists, NaN/inf None; anything else unknown its str."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    for attr in ("to_dict", "to_list"):
        if callable(getattr(v, attr, None)):
            return jsonable(getattr(v, attr)())
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return jsonable(dataclasses.asdict(v))
    return str(v)


def node_gauges(broker: Core) -> list[tuple[str, str, dict, float]]:
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
            ("zpipe_node_shadow_bytes", "Host memory of the KV shadows the node holds.", lab,
             d.get("shadow_bytes", 0)),
            ("zpipe_node_output_log_bytes", "Host memory of the hidden states the node sent "
             "on, kept to rebuild the next stage's KV.", lab, d.get("output_log_bytes", 0)),
        ]
        if d.get("combine_ms_per_step") is not None:  # a member of a stage split by heads
            out.append(("zpipe_node_combine_seconds_per_step", "Time a member of a stage "
                        "split by heads spends combining partials, per step it ran.", lab,
                        d["combine_ms_per_step"] / 1000))
    return out


# ---------------------------------------------------------------- plan
def _rows(broker: Core, res: PlanResult) -> dict:
    d = res.to_dict()
    for row in d["stages"]:
        held = broker.registry.by_name.get(row["node"])
        now_held = held is not None and (held.start, held.end) == (row["start"], row["end"])
        row["measured_s"] = rebalance.measured_compute(broker, row["node"]) if now_held else None
    return d


def plan_for(broker: Core, strategy: str, *, perf_weight: float | None = None,
             exclude: Any = ()) -> PlanResult:
    """The plan ``strategy`` gives for the alive nodes now ("current": the serving placement
    predicted); see ``brokers.rebalance.plan_for_broker``."""
    return rebalance.plan_for(broker, strategy, perf_weight=perf_weight, exclude=exclude)


def plan(broker: Core, strategy: str) -> dict:
    """The placement ``strategy`` would choose now vs the one serving, with predicted ms/token
    per stage and memory needed / budget; nothing is applied. PlacementError when infeasible."""
    current, proposed = rebalance.plan_for_broker(broker, strategy)
    p, cfg = broker.placement, broker.cfg
    same = current is not None and current.stages == proposed.stages
    gain = None
    if current is not None and current.bottleneck_s > 0:
        gain = round(1.0 - proposed.bottleneck_s / current.bottleneck_s, 4)
    return {
        "strategy": strategy, "perf_weight": cfg.rebalance.perf_weight,
        "context_len": cfg.placement.context_len, "sessions": cfg.placement.sessions,
        "epoch": p.epoch if p else 0,
        "current": _rows(broker, current) if current is not None else None,
        "proposed": _rows(broker, proposed),
        "changed": not same, "gain": gain,
        "worth_it": (not same) and rebalance.worth_it(
            current.bottleneck_s if current is not None else None, proposed.bottleneck_s),
        "min_gain": rebalance.MIN_GAIN,
    }


# ---------------------------------------------------------------- profile
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
