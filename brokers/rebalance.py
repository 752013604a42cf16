"""Performance-driven reallocation (seed 000): when to re-plan, and the planner's inputs.

``Rebalancer.check`` says when a re-plan is due. Each stage's *measured share* is its decode
compute p50 over the sum of all stages' p50; its *planned share* is its predicted per-token time
over the sum of the predicted times (``PlanResult.shares()``). A re-plan is due when

- some stage's |measured share - planned share| > ``threshold`` (absolute, default 0.15: with
  three equal stages, one node 1.7× slower than planned trips it, 1.3× does not),
- at least ``min_tokens`` tokens were measured since the last placement change, and
- ``now`` ≥ the last change (or declined re-plan) + ``cooldown_s``.

Hysteresis, so that the placement does not oscillate between two plans of about equal merit:

1. the cooldown after every change, and after every re-plan that was declined;
2. ``worth_it(current, new)``: a new plan is applied only if its predicted bottleneck time
   (slowest stage: what limits tokens/s) is at least ``MIN_GAIN`` (5%) below the current
   placement's, both predicted with the same blended timing model;
3. the measured figures are medians over a window of tokens, so one slow token does not count.

The broker drives it: every ``check_interval_s`` it calls ``check(...)``; on a reason it re-plans
(``plan_for_broker(..., perf_weight=cfg.perf_weight)``), and applies the plan through the mover
when ``worth_it``; then ``note_change(now)`` (or ``note_declined(now)``).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Iterable, Mapping
from typing import Any

from zpipe.config import Rebalance
from zpipe.costmodel import ModelCost, NodeCapability, measured_s_per_layer
from zpipe.placement import (
    PlacementError,
    PlanResult,
    StageAssignment,
    calibration,
    evaluate,
    plan,
)

log = logging.getLogger("zpipe.rebalance")

MIN_GAIN = 0.05  # a new plan must be predicted at least this much faster than the current one
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def worth_it(current_pred_s: float | None, new_pred_s: float, min_gain: float = MIN_GAIN) -> bool:
    """True when ``new_pred_s`` ≤ (1 - min_gain) × ``current_pred_s`` (no current: True)."""
    if current_pred_s is None or not math.isfinite(current_pred_s) or current_pred_s <= 0:
        return True
    return new_pred_s <= (1.0 - min_gain) * current_pred_s


def _shares(planned: Any) -> dict[str, float]:
    raw = planned.shares() if hasattr(planned, "shares") else dict(planned)
    total = sum(raw.values())
    if total <= 0:
        return {}
    return {k: v / total for k, v in raw.items()}


class Rebalancer:
    def __init__(self, cfg: Rebalance) -> None:
        self.cfg = cfg
        self.last_change: float | None = None
        self.last_declined: float | None = None
        self.last_reason: str | None = None

    def check(self, planned: PlanResult | Mapping[str, float], measured: Mapping[str, float | None],
              tokens_since_change: int, now: float, joined: Iterable[str] = ()) -> str | None:
        """A reason string when a re-plan is due, else None.

        ``planned``: a PlanResult, or per-node planned shares or predicted seconds (normalised
        here). ``measured``: per node, decode compute p50 seconds per token (None: not yet).
        ``joined``: alive nodes that hold no layers; they make a re-plan due once the cooldown
        has passed (no token minimum: they have nothing to measure).
        """
        cfg = self.cfg
        if not cfg.enabled:
            return None
        for t in (self.last_change, self.last_declined):
            if t is not None and now < t + cfg.cooldown_s:
                return None
        joined = sorted(joined)
        if joined:
            return self._reason(f"node(s) {', '.join(joined)} joined and hold no layers")
        if tokens_since_change < cfg.min_tokens:
            return None
        plan_sh = _shares(planned)
        if len(plan_sh) < 2:
            return None  # one stage: nothing to shift
        meas = {n: measured.get(n) for n in plan_sh}
        if any(v is None or not math.isfinite(v) or v <= 0 for v in meas.values()):
            return None
        total = sum(meas.values())
        worst, worst_d = "", 0.0
        for n, p in plan_sh.items():
            d = meas[n] / total - p
            if abs(d) > abs(worst_d):
                worst, worst_d = n, d
        if abs(worst_d) <= cfg.threshold:
            return None
        m = meas[worst] / total
        return self._reason(
            f"node {worst} takes {m:.0%} of the step time, planned {plan_sh[worst]:.0%} "
            f"(|{m - plan_sh[worst]:+.2f}| > threshold {cfg.threshold:g}, "
            f"after {tokens_since_change} tokens)")

    def _reason(self, reason: str) -> str:
        self.last_reason = reason
        return reason

    def note_change(self, now: float) -> None:
        """A placement change happened at ``now``: start the cooldown."""
        self.last_change = now

    def note_declined(self, now: float) -> None:
        """A re-plan was computed but not applied (not worth it): also wait a cooldown."""
        self.last_declined = now

    def worth_it(self, current: PlanResult | float | None, new: PlanResult | float) -> bool:
        """``worth_it`` on bottleneck times (PlanResults or seconds)."""
        cur = current.bottleneck_s if isinstance(current, PlanResult) else current
        return worth_it(cur, new.bottleneck_s if isinstance(new, PlanResult) else new)


# ---------------------------------------------------------------- the planner's inputs
def dtype_bytes(broker: Any) -> int:
    """Bytes per element of the nodes' registration dtype (the widest, if they differ)."""
    sizes = [DTYPE_BYTES.get(n.dtype, 4) for n in broker.registry.all() if n.state != "dead"]
    return max(sizes, default=4)


def model_cost(broker: Any) -> ModelCost:
    return ModelCost.from_spec(broker.spec, dtype_bytes(broker))


def planable(node: Any) -> bool:
    return node.state not in ("dead", "failed")


def capabilities(broker: Any, cost: ModelCost | None = None) -> dict[str, NodeCapability]:
    """Per alive node: GFLOP/s, memory budget and, where measured, seconds per layer.

    The budget is the free memory the node last reported plus what it holds now (its weights
    and KV would be freed or reused by a new placement). Measured: the median decode compute
    time per token since the placement last changed (``broker.measured``; a broker without it:
    the metrics window's p50), divided by the layer-equivalents of the range the node holds.
    """
    cost = cost or model_cost(broker)
    out = {}
    for n in broker.registry.all():
        if not planable(n):
            continue
        held = n.state in ("loading", "ready") and n.end > n.start
        free = int(n.stats.get("mem_free", n.mem_free) or 0)
        kv = int(n.stats.get("kv_bytes", 0) or 0)
        budget = free + (int(n.weight_bytes or 0) + kv if held else 0)
        measured = None
        p50 = measured_compute(broker, n.name) if held else None
        if p50:
            measured = measured_s_per_layer(p50, n.start, n.end, cost)
        bw = n.stats.get("bandwidth_bytes_s", getattr(n, "bandwidth_bytes_s", None))
        out[n.name] = NodeCapability(n.name, float(n.gflops), budget,
                                     float(bw) if bw else None, measured)
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
                    perf_weight: float | None = None) -> tuple[PlanResult | None, PlanResult]:
    """(the serving placement evaluated, the plan ``strategy`` gives for the alive nodes).

    Nodes in ``exclude`` are left out of the plan. ``custom``: the broker config's stages when
    it has them, else the serving placement. ``current``: the serving placement itself.
    Both results are predicted on one scale (same calibration), so that they compare.
    ``perf_weight`` defaults to the broker's ``rebalance.perf_weight``. Raises PlacementError
    (with the numbers) when nothing fits.
    """
    cfg = broker.cfg
    pw = cfg.rebalance.perf_weight if perf_weight is None else perf_weight
    cost = model_cost(broker)
    caps = capabilities(broker, cost)
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
            custom = [StageAssignment(s.node, *s.layers) for s in pc.stages]
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
                    calibrate=k)
    return current, proposed


def plan_for(broker: Any, strategy: str, *, perf_weight: float | None = None,
             exclude: Iterable[str] = ()) -> PlanResult:
    """The plan ``strategy`` gives now (see ``plan_for_broker``); what the mover applies."""
    return plan_for_broker(broker, strategy, exclude=exclude, perf_weight=perf_weight)[1]
