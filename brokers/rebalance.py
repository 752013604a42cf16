"""Performance-driven reallocation, and the planner's inputs from the broker.

``AutoRebalancer.run`` (one task of the broker, when ``rebalance.enabled``), every
``check_interval_s``:

1. **Measure.** A node's seconds per layer = its median decode compute per token on the placement
   serving (``broker.measured``) / the layer-equivalents it holds (the head counted). Once a node
   has ``min_tokens`` tokens measured, that figure is a fact the planner uses from then on, also
   when the node holds nothing (scaled by the load's drift since, see ``per_layer``); the
   start-up matmul GFLOP/s is only the prior for nodes never measured (calibrated to the
   measured scale, see ``zpipe.placement``).
2. **Re-plan** (``Rebalancer.due``: ``min_tokens`` tokens on every stage and ``cooldown_s`` after
   the last change or declined plan, or at once when an idle node joined). The plan minimises the
   predicted time per token for the measured concurrency S (the mean number of sessions running
   at the checks): max(Σ stages, S × slowest stage). A node *slowed* (its measured share of the
   step time above the share the placement was planned with) may not get more layers than it
   holds.
3. **Move** only when the plan is predicted at least ``min_gain`` faster per token than the
   placement serving (both on the same figures). Petals re-plans when throughput falls below 0.75
   of the best reachable (a 25% gain); ``min_gain`` 0.15 moves sooner: here a move costs a pause
   of a fraction of a second, and step 4 takes back a bad one.
4. **Check the prediction.** Once ``min_tokens`` tokens were measured on the new placement, its
   measured time per token (same S) is compared with the one measured before the move, scaled
   by the load's change meanwhile (``load_change``); a move that made it slower (for one
   session the sum of the stages, for many the slowest stage) is undone: the previous
   placement comes back (a reallocation of its own in the mover's history, reason
   "undo: ...") and that plan is not proposed again while the same nodes are alive.

``AutoRebalancer(core, mover, rebalancer)`` reads of the core (``brokers.core.Core``) ``cfg``,
``spec``, ``ready``, ``placement``, ``registry``, ``measured`` and ``sessions`` (only its
length); it moves through ``mover.transition(stages, reason)`` while ``mover.moving`` is
false; the broker notifies the ``Rebalancer`` of placement changes (``note_change``).

Memory budget of a node (``capabilities``): the free memory it last reported plus what it holds
that a new placement frees or reuses (weights, KV caches, its static KV pool, CUDA allocator
cache), both from the same heartbeat (a register's figures until then). Nodes on one host with
the same device (CPU nodes; nodes sharing a GPU) report one shared pool: it is counted once and
split evenly between them. A node with a static KV pool needs its pool's bytes per layer held,
whatever the sessions (``zpipe.costmodel.pool_bytes_per_layer``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zpipe.config import Rebalance
from zpipe.costmodel import ModelCost, NodeCapability, measured_s_per_layer, pool_bytes_per_layer
from zpipe.placement import (
    PlacementError,
    PlanResult,
    StageAssignment,
    calibration,
    custom_stages,
    evaluate,
    per_token_s,
    plan,
)

if TYPE_CHECKING:
    from brokers.core import Core
    from brokers.mover import Mover

log = logging.getLogger("zpipe.rebalance")

MIN_GAIN = Rebalance().min_gain  # the admin ``plan`` op's default bar
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SLOWED_MARGIN = 0.05  # measured share above the planned share by more: the node is slowed


def worth_it(current_s: float | None, new_s: float, min_gain: float = MIN_GAIN) -> bool:
    """True when ``new_s`` ≤ (1 - min_gain) × ``current_s`` (no current: True)."""
    if current_s is None or not math.isfinite(current_s) or current_s <= 0:
        return True
    return new_s <= (1.0 - min_gain) * current_s


class Rebalancer:
    """When a re-plan is due: the cooldown after changes and declined plans, the token minimum."""

    def __init__(self, cfg: Rebalance) -> None:
        self.cfg = cfg
        self.last_change: float | None = None
        self.last_declined: float | None = None
        self.last_reason: str | None = None

    def due(self, tokens_since_change: int, now: float, joined: Iterable[str] = ()) -> str | None:
        """A reason string when a re-plan is due, else None. ``joined``: alive nodes that hold
        no layers (a re-plan is due for them once the cooldown has passed)."""
        cfg = self.cfg
        if not cfg.enabled:
            return None
        for t in (self.last_change, self.last_declined):
            if t is not None and now < t + cfg.cooldown_s:
                return None
        joined = sorted(joined)
        if joined:
            reason = f"node(s) {', '.join(joined)} hold no layers"
        elif tokens_since_change >= cfg.min_tokens:
            reason = f"{tokens_since_change} tokens measured"
        else:
            return None
        self.last_reason = reason
        return reason

    def note_change(self, now: float) -> None:
        """A placement change happened at ``now``: start the cooldown."""
        self.last_change = now

    def note_declined(self, now: float) -> None:
        """A re-plan was computed but not applied (not worth it): also wait a cooldown."""
        self.last_declined = now

    def worth_it(self, current_s: float | None, new_s: float) -> bool:
        return worth_it(current_s, new_s, self.cfg.min_gain)


@dataclass
class Fact:
    """A node's measured seconds per layer."""

    registered_at: float  # of the node it was measured on (a restarted node starts afresh)
    s: float
    epoch: int  # the placement it was measured on
    earlier: float | None = None  # its figure on the placement before that one


@dataclass
class Pending:
    """A performance-driven move whose prediction is still to be checked."""

    epoch: int  # the placement it made
    before: list[StageAssignment]
    before_s: float  # measured per token before it, at concurrency ``concurrency``
    predicted_s: float
    concurrency: float


def _medians(broker: Any, names: Iterable[str]) -> dict[str, tuple[float, int]]:
    """Per node: (median decode compute per token, tokens measured) on the placement serving."""
    out = {}
    for n in names:
        values = broker.measured.get(n)  # .get: ``measured`` may be a defaultdict
        out[n] = (statistics.median(values), len(values)) if values else (math.nan, 0)
    return out


def _fmt_ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms"


class AutoRebalancer:
    """The broker's performance-driven reallocation loop (see the module doc)."""

    def __init__(self, core: Core, mover: Mover, rebalancer: Rebalancer | None = None) -> None:
        self.core = core
        self.mover = mover
        self.cfg: Rebalance = core.cfg.rebalance
        self.rebalancer = rebalancer or Rebalancer(self.cfg)
        self.facts: dict[str, Fact] = {}
        self.epoch = -1
        self.concurrency: list[int] = []  # sessions running at each check on this placement
        self.pending: Pending | None = None
        self.planned: tuple[int, dict[str, float]] = (-1, {})  # epoch, shares of the plan moved to
        self.rejected: set[tuple[StageAssignment, ...]] = set()  # undone plans
        self.alive: frozenset[str] = frozenset()  # the nodes the rejected plans were made for

    async def run(self) -> None:
        while self.cfg.enabled:
            await asyncio.sleep(self.cfg.check_interval_s)
            try:
                await self.check(time.monotonic())
            except (PlacementError, RuntimeError) as e:  # MoveError is a RuntimeError
                log.warning("performance-driven reallocation skipped: %s", e)
                self.rebalancer.note_change(time.monotonic())
            except Exception:  # a bug: say so, and keep the loop (a dead task says nothing)
                log.exception("performance-driven reallocation failed")
                self.rebalancer.note_change(time.monotonic())

    async def check(self, now: float) -> dict | None:
        """One round; returns the mover's record when it moved layers (or undid a move)."""
        b = self.core
        if not b.ready or self.mover.moving or b.placement is None:
            return None
        placement = b.placement
        if placement.epoch != self.epoch:
            self.epoch, self.concurrency = placement.epoch, []
        if len(b.sessions):
            self.concurrency.append(len(b.sessions))
        alive = frozenset(b.registry.names())
        if alive != self.alive:
            self.alive, self.rejected = alive, set()
        measured = _medians(b, placement.nodes())
        tokens = min(t for _, t in measured.values())
        if tokens == 0:
            return None
        self._learn(measured)
        if self.pending is not None and self.pending.epoch != placement.epoch:
            self.pending = None  # another change came first (an admin move, a recovery)
        if self.pending is not None:
            return await self._verify(measured, tokens) if tokens >= self.cfg.min_tokens else None
        known = self.per_layer()
        idle = [n for n in alive if n not in placement.nodes() and n not in known]
        reason = self.rebalancer.due(tokens, now, joined=idle)
        if reason is None:
            return None
        return await self._replan(measured, reason, now)

    def _learn(self, measured: Mapping[str, tuple[float, int]]) -> None:
        """Measured seconds per layer of the nodes with ``min_tokens`` tokens: facts from now on."""
        b = self.core
        cost = model_cost(b)
        epoch = b.placement.epoch
        for st in b.placement.stages:
            p50, n = measured[st.node]
            node = b.registry.by_name.get(st.node)
            if node is None or n < self.cfg.min_tokens or not p50 > 0:
                continue
            old = self.facts.get(st.node)
            if old is not None and old.registered_at != node.registered_at:
                old = None
            earlier = None if old is None else old.s if old.epoch != epoch else old.earlier
            self.facts[st.node] = Fact(node.registered_at,
                                       measured_s_per_layer(p50, st.start, st.end, cost), epoch,
                                       earlier)

    def per_layer(self) -> dict[str, float]:
        """Seconds per layer of the alive nodes measured so far (as registered now).

        Figures from an earlier placement are scaled by the load's drift since: on shared
        cores every node's time moves with the machine's load, and a stale figure beside fresh
        ones would make an idle node look faster or slower than it is. The drift is the median
        over the nodes measured now of their figure now / on the placement before.
        """
        epoch = self.core.placement.epoch if self.core.placement else -1
        live = {}
        for name, f in self.facts.items():
            node = self.core.registry.by_name.get(name)
            if node is not None and node.state != "dead" and node.registered_at == f.registered_at:
                live[name] = f
        ratios = [f.s / f.earlier for f in live.values() if f.epoch == epoch and f.earlier]
        drift = statistics.median(ratios) if ratios else 1.0
        return {n: f.s if f.epoch == epoch else f.s * drift for n, f in live.items()}

    def slowed(self, expected: Mapping[str, float],
               measured: Mapping[str, tuple[float, int]]) -> list[str]:
        """Nodes whose measured share of the step time exceeds their planned share."""
        total = sum(p for p, _ in measured.values())
        return [n for n, (p, _) in measured.items()
                if total > 0 and p / total > expected.get(n, 0.0) + SLOWED_MARGIN]

    async def _replan(self, measured: Mapping[str, tuple[float, int]], reason: str,
                      now: float) -> dict | None:
        b, cfg = self.core, self.cfg
        stages = list(b.placement.stages)
        s = statistics.mean(self.concurrency) if self.concurrency else 1.0
        facts = self.per_layer()
        # The shares the placement serving was planned with: the plan this loop moved to, else
        # (the broker's own placement) its prediction on the prior alone.
        if self.planned[0] == b.placement.epoch:
            expected = self.planned[1]
        else:
            prior, _ = plan_for_broker(b, "current", perf_weight=0.0, measured={})
            expected = prior.shares() if prior is not None else {}
        cap = {st.node: st.end - st.start for st in stages
               if st.node in self.slowed(expected, measured)}
        current, proposal = plan_for_broker(
            b, cfg.strategy, perf_weight=cfg.perf_weight, measured=facts, max_layers=cap,
            concurrency=s if cfg.strategy == "compute" else None)
        cur_s = current.per_token_s(s) if current is not None else None
        new_s = proposal.per_token_s(s)
        if (proposal.stages == stages or tuple(proposal.stages) in self.rejected
                or not self.rebalancer.worth_it(cur_s, new_s)):
            self.rebalancer.note_declined(now)  # hysteresis: wait a cooldown again
            return None
        before_s = per_token_s([measured[st.node][0] for st in stages], s)
        per = ", ".join(f"{n} {_fmt_ms(v)}" for n, v in sorted(facts.items()))
        why = (f"performance: {reason}; predicted {_fmt_ms(new_s)} per token vs "
               f"{_fmt_ms(cur_s or math.nan)} now at {s:.3g} session(s) (per layer: {per}"
               f"{'; capped: ' + ', '.join(sorted(cap)) if cap else ''})")
        record = await self.mover.transition(proposal.stages, why)
        self.pending = Pending(b.placement.epoch, stages, before_s, new_s, s)
        self.planned = (b.placement.epoch, proposal.shares())
        return record

    async def _verify(self, measured: Mapping[str, tuple[float, int]], tokens: int) -> dict | None:
        """The pending move's prediction against what was measured; undo a move for the worse."""
        b, p = self.core, self.pending
        self.pending = None
        after_s = per_token_s([measured[st.node][0] for st in b.placement.stages], p.concurrency)
        load = self.load_change(p)
        if after_s <= p.before_s * load:
            log.info("reallocation confirmed: %s per token measured over %d tokens, %s before "
                     "x %.2f load change (predicted %s)", _fmt_ms(after_s), tokens,
                     _fmt_ms(p.before_s), load, _fmt_ms(p.predicted_s))
            return None
        self.rejected.add(tuple(b.placement.stages))
        return await self.mover.transition(
            p.before, f"undo: {_fmt_ms(after_s)} per token measured over {tokens} tokens after "
            f"the move, {_fmt_ms(p.before_s)} before it x {load:.2f} load change (predicted "
            f"{_fmt_ms(p.predicted_s)})")

    def load_change(self, p: Pending) -> float:
        """How much the machine's load alone changed the nodes' speed since before the move.

        On shared cores the time per layer of every node moves with the load; a wrong prediction
        shows in some nodes only. The least change of seconds per layer over the nodes measured
        both before and after the move is what all of them share: the load's. With fewer than
        two such nodes the load cannot be told from the move: 1.
        """
        before = {st.node for st in p.before}
        ratios = [f.s / f.earlier for n, f in self.facts.items()
                  if n in before and f.epoch == p.epoch and f.earlier]
        return min(ratios) if len(ratios) >= 2 else 1.0


# ---------------------------------------------------------------- the planner's inputs
def dtype_bytes(broker: Any) -> int:
    """Bytes per element of the nodes' registration dtype (the widest, if they differ)."""
    sizes = [DTYPE_BYTES.get(n.dtype, 4) for n in broker.registry.all() if n.state != "dead"]
    return max(sizes, default=4)


def model_cost(broker: Any) -> ModelCost:
    return ModelCost.from_spec(broker.spec, dtype_bytes(broker))


def planable(node: Any) -> bool:
    return node.state not in ("dead", "failed")


def budgets(nodes: Iterable[Any]) -> dict[str, int]:
    """Memory budget per node: its share of the free memory of its pool + what it holds.

    A node's free figure excludes what it holds (weights, KV, allocator cache: ``mem_held``,
    from the same report), and a new placement frees or reuses that: the budget is the sum.
    Nodes on one host with the same device draw on one pool and each report all of it: the
    pool is counted once (the least of their reports: the latest allocations show in it) and
    split evenly between them.
    """
    pools: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for n in nodes:
        pools[(n.host, n.device)].append(n)
    out = {}
    for members in pools.values():
        free = min(max(0, m.memory()[0]) for m in members)
        for m in members:
            out[m.name] = free // len(members) + max(0, m.memory()[1])
    return out


def kv_per_layer(node: Any, spec: Any) -> int | None:
    """Bytes per layer of the node's static KV pool (None: it has none)."""
    if not getattr(node, "kv_slots", 0):
        return None
    return pool_bytes_per_layer(node.kv_slots, node.kv_max_len, spec.num_kv_heads,
                                spec.head_dim, DTYPE_BYTES.get(node.dtype, 4))


def capabilities(broker: Any, cost: ModelCost | None = None,
                 measured: Mapping[str, float] | None = None) -> dict[str, NodeCapability]:
    """Per alive node: GFLOP/s (the prior), memory budget (``budgets``), its static KV pool per
    layer and, where measured, seconds per layer.

    Measured: ``measured`` (seconds per layer by node) where given; else for the nodes holding
    layers the median decode compute per token since the placement last changed
    (``broker.measured``; a broker without it: the metrics window's p50), divided by the
    layer-equivalents of the range held.
    """
    cost = cost or model_cost(broker)
    alive = [n for n in broker.registry.all() if planable(n)]
    budget = budgets(alive)
    out = {}
    for n in alive:
        per_layer = None
        if measured is not None and n.name in measured:
            per_layer = measured[n.name]
        elif n.state in ("loading", "ready") and n.end > n.start:
            p50 = measured_compute(broker, n.name)
            if p50:
                per_layer = measured_s_per_layer(p50, n.start, n.end, cost)
        out[n.name] = NodeCapability(n.name, float(n.gflops), budget[n.name], per_layer,
                                     kv_per_layer(n, broker.spec))
    return out


def measured_compute(broker: Any, name: str) -> float | None:
    """Median decode compute seconds per token of ``name`` in the current placement."""
    since_change = getattr(broker, "measured", None)
    if since_change is not None:
        values = since_change.get(name) if hasattr(since_change, "get") else None
        return statistics.median(values) if values else None
    metrics = getattr(broker, "metrics", None)
    return metrics.node_summary(name)["compute"]["p50"] if metrics is not None else None


def node_order(broker: Any, names: Iterable[str]) -> list[str]:
    """Pipeline order: the current placement's order first, then the others by name."""
    names = set(names)
    order = [s.node for s in broker.placement.stages] if broker.placement else []
    return [n for n in order if n in names] + sorted(names - set(order))


def current_stages(broker: Any) -> list[StageAssignment]:
    return list(broker.placement.stages) if broker.placement else []


def plan_for_broker(broker: Any, strategy: str, *, exclude: Iterable[str] = (),
                    perf_weight: float | None = None, measured: Mapping[str, float] | None = None,
                    max_layers: Mapping[str, int] | None = None,
                    concurrency: float | None = None) -> tuple[PlanResult | None, PlanResult]:
    """(the serving placement evaluated, the plan ``strategy`` gives for the alive nodes).

    Nodes in ``exclude`` are left out of the plan. ``custom``: the broker config's stages when
    it has them, else the serving placement. ``current``: the serving placement itself.
    Both results are predicted on one scale (same calibration), so that they compare.
    ``perf_weight`` defaults to the broker's ``rebalance.perf_weight``. ``measured``: seconds per
    layer by node, instead of the placement's own measurements (``{}``: none, the prior alone);
    ``max_layers`` and ``concurrency``: see ``zpipe.placement.plan``. Raises PlacementError
    (with the numbers) when nothing fits.
    """
    cfg = broker.cfg
    pw = cfg.rebalance.perf_weight if perf_weight is None else perf_weight
    cost = model_cost(broker)
    caps = capabilities(broker, cost, measured)
    pc = cfg.placement
    k = calibration(list(caps.values()), cost)  # one scale for current and proposed
    current = None
    cur = current_stages(broker)
    if cur and all(s.node in caps for s in cur):
        current = evaluate(cur, list(caps.values()), cost, context_len=pc.context_len,
                           sessions=pc.sessions, perf_weight=pw, calibrate=k)
    excluded = set(exclude)
    custom = None
    if strategy in ("custom", "current"):
        if strategy == "custom" and pc.strategy == "custom" and pc.stages:
            custom = custom_stages(pc)
        elif cur:
            custom = cur
        else:
            raise PlacementError("no placement is serving and no custom stages are configured")
        names = [s.node for s in custom]
        gone = [n for n in names if n not in caps or n in excluded]
        if gone:
            raise PlacementError(f"stages name node(s) not available: {', '.join(gone)}")
        strategy = "custom"
    else:
        names = node_order(broker, [n for n in caps if n not in excluded])
    proposed = plan(strategy, [caps[n] for n in names], cost, context_len=pc.context_len,
                    sessions=pc.sessions, weights=pc.weights, custom=custom, perf_weight=pw,
                    calibrate=k, max_layers=max_layers, concurrency=concurrency)
    return current, proposed


def plan_for(broker: Any, strategy: str, *, perf_weight: float | None = None,
             exclude: Iterable[str] = ()) -> PlanResult:
    """The plan ``strategy`` gives now (see ``plan_for_broker``); what the mover applies."""
    return plan_for_broker(broker, strategy, exclude=exclude, perf_weight=perf_weight)[1]
