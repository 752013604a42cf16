"""Placement: which node runs which contiguous layer range, in pipeline order.

Two layers of API:

- ``uniform`` / ``choose``: the broker's initial placement from the registered node names
  (``choose`` plans with capabilities too when it is given them).
- ``plan``: a pure planner over numbers. Given each node's capability (``NodeCapability``:
  start-up matmul GFLOP/s, memory budget, optional measured seconds per layer, optional fixed
  KV bytes per layer) and the model's cost (``ModelCost``: bytes and FLOPs per layer, KV bytes
  per token per layer, embedding and head), it returns a ``PlanResult``: the stages, and per
  stage the predicted per-token time, the memory needed (weights + KV budget) and the budget.

Strategies:

uniform  equal layer counts (earlier stages take the remainder), as ``uniform()``.
memory   layers proportional to what each node's memory budget leaves for layers once its
         embedding / head share is paid; every stage must fit weights + a KV cache of
         ``context_len × sessions`` tokens for its layers.
compute  min-max balance of the predicted per-token stage time (greedy: each next layer goes to
         the stage whose time grows least; optimal for a separable increasing objective).
         Accounts for the last stage's ``lm_head`` work, which on small models is several layers'
         worth. With ``perf_weight`` > 0 the measured speed is blended in (see below).
         Given ``concurrency`` S (how many sessions run at once), it minimises instead the
         predicted per-token time max(Σ stages, S × slowest stage): one session waits for every
         stage in turn, many are limited by the slowest. Nodes may then be left out (a slow
         node costs one session more than it gives), see ``_fastest``. Of the plans predicted
         within 5% of the least time, the most balanced (shorter bursts of work per node).
mixed    uneven allocation by capability: weight_i = w_c·speed_i/Σ + w_m·mem_i/Σ, layers
         apportioned by weight (largest remainder).
custom   the given stages, checked for coverage and memory.

``max_layers`` (by node name) caps what a node may get whatever the strategy: performance-driven
re-plans never give a node measured slower than planned more layers than it holds.

A stage's KV budget per layer is the node's own figure when it has one (a static KV pool is
allocated whole: slots × max_len tokens per layer), else ``context_len × sessions`` tokens.

Every strategy respects memory: a node never gets more layers than fit its budget; the
surplus goes to the others (in proportion to their weights). When the model does not fit at
all, ``PlacementError`` says so with the numbers (needed vs available per node, and in total).
A node that cannot hold even one layer is left out (noted in ``PlanResult.notes``); every other
node gets at least one layer.

Per-token time of a stage (seconds):

    capability  (layers × layer_flops + head_flops [last stage]) / (gflops × 1e9)
    measured    layer_equivalents × measured_s_per_layer
    predicted   (1 - perf_weight) × capability + perf_weight × measured   (capability alone
                where the node has no measurement)

``layer_equivalents`` = layers + head_flops / layer_flops on the last stage (see
``measured_s_per_layer``: the measured stage time is divided the same way). Matmul GFLOP/s
from a benchmark and real decode times differ by a large factor (decode is memory- and
overhead-bound), so when any node has a measurement the capability times are first
*calibrated*: multiplied by the median of measured / capability over the measured nodes.
Without that, blending would mix two scales and a node with no measurement yet (one that just
joined) would look several times faster than it is. ``calibrate=False`` gives the raw formula.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from zpipe.config import MixedWeights, PlacementConfig
from zpipe.costmodel import ModelCost, NodeCapability

STRATEGIES = ("uniform", "memory", "compute", "mixed", "custom")


@dataclass(frozen=True)
class StageAssignment:
    node: str
    start: int
    end: int  # exclusive
    # A stage split by KV-head groups: ``(node, first head, end head)`` per member in member
    # order, ``node`` (the member that answers the broker) first. Empty: ``node`` holds it all.
    group: tuple[tuple[str, int, int], ...] = ()

    def members(self) -> list[str]:
        """The nodes holding this stage."""
        return [m[0] for m in self.group] if self.group else [self.node]

    def to_dict(self) -> dict:
        d = {"node": self.node, "start": self.start, "end": self.end}
        if self.group:
            d["heads"] = [list(m) for m in self.group]
        return d


@dataclass
class Placement:
    epoch: int
    stages: list[StageAssignment] = field(default_factory=list)

    def to_list(self) -> list[dict]:
        return [s.to_dict() for s in self.stages]

    def nodes(self) -> list[str]:
        """Every node of the placement, the members of a split stage in member order."""
        return [n for s in self.stages for n in s.members()]

    def split(self) -> bool:
        """Whether a stage is split across nodes by heads."""
        return any(s.group for s in self.stages)


class PlacementError(ValueError):
    pass


# --------------------------------------------------------------------------- result
@dataclass
class PlanResult:
    strategy: str
    stages: list[StageAssignment]
    predicted_s: list[float]  # per stage, per token
    memory_bytes: list[int]  # per stage: weight_bytes + kv_bytes
    budget_bytes: list[int]  # per stage: the node's memory budget
    weight_bytes: list[int] = field(default_factory=list)
    kv_bytes: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def step_s(self) -> float:
        """Predicted time of one token through every stage (one session alone)."""
        return sum(self.predicted_s)

    @property
    def bottleneck_s(self) -> float:
        """Predicted time of the slowest stage: what limits tokens/s with many sessions."""
        return max(self.predicted_s, default=0.0)

    def per_token_s(self, concurrency: float | None = None) -> float:
        """Predicted seconds per token of each of ``concurrency`` sessions running at once:
        max(Σ stages, S × slowest); None: the slowest stage alone (throughput)."""
        return per_token_s(self.predicted_s, concurrency)

    def shares(self) -> dict[str, float]:
        """Each node's predicted share of the summed stage time."""
        total = self.step_s
        n = len(self.stages)
        return {s.node: (t / total if total > 0 else 1.0 / n)
                for s, t in zip(self.stages, self.predicted_s, strict=True)}

    def layers(self) -> dict[str, tuple[int, int]]:
        return {s.node: (s.start, s.end) for s in self.stages}

    def to_dict(self) -> dict:
        rows = []
        for i, s in enumerate(self.stages):
            rows.append({**s.to_dict(), "layers": s.end - s.start,
                         "predicted_s": round(self.predicted_s[i], 9),
                         "memory_bytes": self.memory_bytes[i],
                         "weight_bytes": self.weight_bytes[i] if self.weight_bytes else None,
                         "kv_bytes": self.kv_bytes[i] if self.kv_bytes else None,
                         "budget_bytes": self.budget_bytes[i]})
        return {"strategy": self.strategy, "stages": rows, "step_s": round(self.step_s, 9),
                "bottleneck_s": round(self.bottleneck_s, 9), "notes": list(self.notes)}


# --------------------------------------------------------------------------- timing model
def per_token_s(stage_s: Sequence[float], concurrency: float | None) -> float:
    """Seconds per token with ``concurrency`` sessions: one waits for every stage in turn; many
    keep every stage busy and each gets the slowest stage's rate shared S ways. None: the
    slowest stage (what limits tokens/s)."""
    if not stage_s:
        return 0.0
    if concurrency is None:
        return max(stage_s)
    return max(sum(stage_s), max(concurrency, 1.0) * max(stage_s))


def calibration(caps: Sequence[NodeCapability], cost: ModelCost) -> float:
    """Median of measured / capability seconds per layer over nodes with both; 1 if none."""
    ratios = []
    for c in caps:
        if c.measured_s_per_layer and c.measured_s_per_layer > 0 and c.gflops > 0:
            ratios.append(c.measured_s_per_layer / (cost.layer_flops_per_token / (c.gflops * 1e9)))
    return statistics.median(ratios) if ratios else 1.0


def _s_per_layer(caps: Sequence[NodeCapability], cost: ModelCost, perf_weight: float,
                 calibrate: bool | float) -> list[float]:
    """Predicted seconds per layer-equivalent per node: calibrated capability, blended.

    ``calibrate``: True → ``calibration(caps)``, False → 1, a float → that factor (to predict
    two placements on the same scale)."""
    if not 0.0 <= perf_weight <= 1.0:
        raise PlacementError(f"perf_weight must be in 0..1, got {perf_weight}")
    if isinstance(calibrate, bool):
        k = calibration(caps, cost) if calibrate else 1.0
    else:
        k = float(calibrate)
    out = []
    for c in caps:
        if not (c.gflops > 0 and math.isfinite(c.gflops)):
            raise PlacementError(f"node {c.name}: gflops must be > 0, got {c.gflops}")
        t = k * cost.layer_flops_per_token / (c.gflops * 1e9)
        m = c.measured_s_per_layer
        if m is not None and m > 0 and math.isfinite(m):
            t = (1.0 - perf_weight) * t + perf_weight * m
        out.append(t)
    return out


def _evaluate(strategy: str, stages: list[StageAssignment], caps: Sequence[NodeCapability],
              cost: ModelCost, context_len: int, sessions: int, perf_weight: float,
              calibrate: bool | float, notes: list[str]) -> PlanResult:
    by_name = {c.name: c for c in caps}
    per = dict(zip([c.name for c in caps],
                   _s_per_layer(caps, cost, perf_weight, calibrate), strict=True))
    pred, mem, budget, wb, kvb = [], [], [], [], []
    for s in stages:
        n = s.end - s.start
        first, last = s.start == 0, s.end == cost.num_layers
        pred.append(cost.layer_equivalents(n, last) * per[s.node])
        w = n * cost.layer_weight_bytes + cost.fixed_bytes(first, last)
        kv = cost.kv_budget_bytes(n, context_len, sessions, by_name[s.node].kv_bytes_per_layer)
        wb.append(w)
        kvb.append(kv)
        mem.append(w + kv)
        budget.append(int(by_name[s.node].mem_free_bytes))
    return PlanResult(strategy, stages, pred, mem, budget, wb, kvb, notes)


def evaluate(stages: Sequence[StageAssignment], caps: Sequence[NodeCapability], cost: ModelCost,
             *, context_len: int, sessions: int, perf_weight: float = 0.0,
             calibrate: bool | float = True, strategy: str = "current") -> PlanResult:
    """Predicted times and memory of a given list of stages (e.g. the placement serving now).

    Every stage's node must be in ``caps``; other capabilities still calibrate the timing.
    """
    names = {c.name for c in caps}
    missing = [s.node for s in stages if s.node not in names]
    if missing:
        raise PlacementError(f"no capability figures for node(s) {', '.join(missing)}")
    return _evaluate(strategy, list(stages), caps, cost, context_len, sessions, perf_weight,
                     calibrate, [])


# --------------------------------------------------------------------------- apportioning
def apportion(weights: Sequence[float], total: int, lo: Sequence[int],
              hi: Sequence[int]) -> list[int]:
    """Integers n_i with Σ = total, lo_i ≤ n_i ≤ hi_i, proportional to weights where the bounds
    allow (bounded proportional shares, then largest remainder; ties go to earlier entries)."""
    k = len(weights)
    if sum(lo) > total or sum(hi) < total:
        raise PlacementError(f"cannot apportion {total} within bounds {list(lo)}..{list(hi)}")
    ideal = [0.0] * k
    fixed: dict[int, float] = {}
    while True:
        free = [i for i in range(k) if i not in fixed]
        left = total - sum(fixed.values())
        wsum = sum(max(weights[i], 0.0) for i in free)
        for i in free:
            ideal[i] = left * (max(weights[i], 0.0) / wsum if wsum > 0 else 1.0 / len(free))
        low = [i for i in free if ideal[i] < lo[i]]
        high = [i for i in free if ideal[i] > hi[i]]
        if not low and not high:
            break
        # Fix the violators of one side at their bound and share the rest again; which side
        # first does not matter for feasibility, low first keeps the ≥1-layer promise exact.
        for i in low or high:
            fixed[i] = float(lo[i] if low else hi[i])
    for i, v in fixed.items():
        ideal[i] = v
    counts = [min(hi[i], max(lo[i], math.floor(ideal[i] + 1e-9))) for i in range(k)]
    rest = total - sum(counts)
    order = sorted(range(k), key=lambda i: (-(ideal[i] - math.floor(ideal[i] + 1e-9)), i))
    while rest > 0:
        moved = False
        for i in order:
            if rest and counts[i] < hi[i]:
                counts[i] += 1
                rest -= 1
                moved = True
        if not moved:  # pragma: no cover - excluded by the bounds check above
            raise PlacementError("apportioning failed")
    return counts


def _ranges(names: Sequence[str], counts: Sequence[int]) -> list[StageAssignment]:
    out, start = [], 0
    for name, n in zip(names, counts, strict=True):
        out.append(StageAssignment(name, start, start + n))
        start += n
    return out


NEAR = 0.05  # plans predicted within 5% of the best are as good: shared cores measure no finer


def _near_best(options: list[tuple[float, float, int, list]]) -> tuple[float, float, int, list]:
    """Of (predicted per-token time, slowest stage, -nodes, ...) options, the most balanced
    (lowest slowest stage, then more nodes) of those within ``NEAR`` of the best time."""
    best = min(o[0] for o in options)
    return min((o for o in options if o[0] <= best * (1 + NEAR)), key=lambda o: (o[1], o[2]))


def _least_time(per_layer: Sequence[float], head_s: Sequence[float], total: int,
                hi: Sequence[int], concurrency: float) -> tuple[float, float, list[int]] | None:
    """(predicted per-token time, slowest stage, counts ≥ 1) near the least ``per_token_s``
    (``_near_best``), or None when the caps ``hi`` cannot hold ``total``. For each bound B on
    the slowest stage (every value a stage can take), each node may hold up to (B - head) / per
    layers; the sum is least when the fastest nodes fill first. The optimum's slowest stage is
    one of the B tried."""
    k = len(per_layer)
    if k > total or sum(hi) < total or min(hi) < 1:
        return None
    order = sorted(range(k), key=lambda i: (per_layer[i], i))
    bounds = sorted({n * per_layer[i] + head_s[i] for i in range(k) for n in range(1, hi[i] + 1)})
    options: list[tuple[float, float, int, list]] = []
    for b in bounds:
        cap = [min(hi[i], int((b - head_s[i]) / per_layer[i] + 1e-9)) for i in range(k)]
        if min(cap) < 1 or sum(cap) < total:
            continue
        counts, rest = [1] * k, total - k
        for i in order:
            add = min(rest, cap[i] - 1)
            counts[i] += add
            rest -= add
        times = [counts[i] * per_layer[i] + head_s[i] for i in range(k)]
        options.append((per_token_s(times, concurrency), max(times), 0, counts))
    if not options:
        return None
    t, slowest, _, counts = _near_best(options)
    return t, slowest, counts


EXACT_SUBSETS = 6  # up to this many nodes every subset is tried, beyond only the m fastest


def _fastest(caps: Sequence[NodeCapability], cost: ModelCost, context_len: int, sessions: int,
             per: Sequence[float], caps_hi: Mapping[str, int], concurrency: float,
             notes: list[str]) -> tuple[list[NodeCapability], list[int]]:
    """The nodes to keep (pipeline order) and their counts, minimising ``per_token_s``, each
    subset planned by ``_least_time``; a node left out holds nothing. Every subset up to
    ``EXACT_SUBSETS`` nodes (which one is last decides who runs the head), else the m fastest
    for m = k .. 1. Of the plans near the best (``_near_best``): the most balanced, then the
    one with more nodes."""
    speed = {c.name: t for c, t in zip(caps, per, strict=True)}
    k = len(caps)
    if k <= EXACT_SUBSETS:
        subsets = [[c for i, c in enumerate(caps) if mask >> i & 1]
                   for mask in range((1 << k) - 1, 0, -1)]
        subsets.sort(key=len, reverse=True)
    else:
        ranked = sorted(caps, key=lambda c: speed[c.name])
        subsets = [[c for c in caps if c in ranked[:m]] for m in range(k, 0, -1)]
    options: list[tuple[float, float, int, list]] = []
    for sub in subsets:
        m = len(sub)
        hi = [min(h, caps_hi.get(c.name, h), cost.num_layers)
              for c, h in zip(sub, _capacity(sub, cost, context_len, sessions), strict=True)]
        p = [speed[c.name] for c in sub]
        head = [0.0] * m
        head[-1] = cost.layer_equivalents(0, True) * p[-1]
        got = _least_time(p, head, cost.num_layers, hi, concurrency)
        if got is not None:
            options.append((got[0], got[1], -m, [sub, got[2]]))
    if not options:
        raise PlacementError(_infeasible(caps, cost, context_len, sessions,
                                         _capacity(caps, cost, context_len, sessions), notes))
    kept, counts = _near_best(options)[3]
    left = [c.name for c in caps if c not in kept]
    if left:
        notes.append(f"node(s) {', '.join(left)} left out: the {len(kept)} other node(s) "
                     f"alone give {concurrency:g} session(s) a shorter time per token")
    return kept, counts


def _min_max(per_layer: Sequence[float], head_s: Sequence[float], total: int, lo: Sequence[int],
             hi: Sequence[int]) -> list[int]:
    """Counts minimising max_i(count_i × per_layer_i + head_s_i): from lo, each next layer to
    the stage whose time after taking it is least (ties: earlier stage)."""
    counts = list(lo)
    for _ in range(total - sum(counts)):
        best, best_t = -1, math.inf
        for i in range(len(counts)):
            if counts[i] < hi[i]:
                t = (counts[i] + 1) * per_layer[i] + head_s[i]
                if t < best_t - 1e-15:
                    best, best_t = i, t
        if best < 0:  # pragma: no cover - excluded by the capacity check
            raise PlacementError("no node can take another layer")
        counts[best] += 1
    return counts


# --------------------------------------------------------------------------- memory limits
def _fmt_b(b: float) -> str:
    return f"{b / 2**20:,.1f} MiB"


def _capacity(caps: Sequence[NodeCapability], cost: ModelCost, context_len: int,
              sessions: int) -> list[int]:
    """Most layers each node can hold, given its place (first holds embed, last the head)."""
    out = []
    k = len(caps)
    for i, c in enumerate(caps):
        per = cost.layer_bytes(context_len, sessions, c.kv_bytes_per_layer)
        room = c.mem_free_bytes - cost.fixed_bytes(i == 0, i == k - 1)
        out.append(max(0, int(room // per)) if per > 0 else cost.num_layers)
    return out


def _fit_nodes(caps: list[NodeCapability], cost: ModelCost, context_len: int, sessions: int,
               notes: list[str]) -> tuple[list[NodeCapability], list[int]]:
    """Leave out nodes that cannot hold one layer; refuse when the rest cannot hold the model."""
    kept = list(caps)
    while True:
        cap = _capacity(kept, cost, context_len, sessions)
        drop = [i for i, m in enumerate(cap) if m < 1]
        if not drop or len(kept) == 1:
            break
        # drop one at a time: which node is first / last (and so holds embed / head) may change
        i = drop[0]
        c = kept[i]
        need = (cost.layer_bytes(context_len, sessions, c.kv_bytes_per_layer)
                + cost.fixed_bytes(i == 0, i == len(kept) - 1))
        notes.append(f"node {c.name} left out: one layer needs {_fmt_b(need)}, its budget is "
                     f"{_fmt_b(c.mem_free_bytes)}")
        kept.pop(i)
    if sum(cap) < cost.num_layers or any(m < 1 for m in cap):
        raise PlacementError(_infeasible(kept, cost, context_len, sessions, cap, notes))
    return kept, cap


def _infeasible(caps: Sequence[NodeCapability], cost: ModelCost, context_len: int,
                sessions: int, cap: Sequence[int], notes: Sequence[str]) -> str:
    per = cost.layer_bytes(context_len, sessions)
    kv = cost.kv_budget_bytes(1, context_len, sessions)
    need = (cost.num_layers * per + cost.embed_bytes
            + (cost.head_bytes - (cost.embed_bytes if cost.tied and len(caps) == 1 else 0)))
    have = sum(c.mem_free_bytes for c in caps)
    lines = [f"the model does not fit: it needs {_fmt_b(need)} ({cost.num_layers} layers × "
             f"{_fmt_b(per)} [{_fmt_b(cost.layer_weight_bytes)} weights + {_fmt_b(kv)} KV for "
             f"{context_len} tokens × {sessions} sessions] + embedding "
             f"{_fmt_b(cost.embed_bytes)} + head {_fmt_b(cost.head_bytes)}); the nodes have "
             f"{_fmt_b(have)}, room for {sum(cap)} of {cost.num_layers} layers"]
    k = len(caps)
    for i, (c, m) in enumerate(zip(caps, cap, strict=True)):
        fixed = cost.fixed_bytes(i == 0, i == k - 1)
        what = " + ".join(w for w, on in (("embedding", i == 0), ("head", i == k - 1)) if on)
        held = f", {what} {_fmt_b(fixed)}" if what else ""
        pool = " (weights + its static KV pool)" if c.kv_bytes_per_layer is not None else ""
        lines.append(f"  {c.name}: budget {_fmt_b(c.mem_free_bytes)}{held}, room for {m} "
                     f"layer(s) of {_fmt_b(cost.layer_bytes(context_len, sessions, c.kv_bytes_per_layer))}{pool}")
    lines += [f"  {n}" for n in notes]
    return "\n".join(lines)


# --------------------------------------------------------------------------- planner
def mixed_weights(caps: Sequence[NodeCapability], speed: Sequence[float],
                  w: MixedWeights) -> list[float]:
    """Per-node weight w_c·speed/Σ + w_m·mem/Σ; a term whose figures sum to 0 is dropped and
    its weight given to the other (both zero: equal weights)."""
    terms: list[tuple[float, list[float]]] = [
        (w.compute, list(speed)), (w.memory, [float(c.mem_free_bytes) for c in caps])]
    terms = [(wt, xs) for wt, xs in terms if wt > 0 and sum(xs) > 0]
    wsum = sum(wt for wt, _ in terms)
    if wsum <= 0:
        return [1.0 / len(caps)] * len(caps)
    return [sum(wt / wsum * xs[i] / sum(xs) for wt, xs in terms) for i in range(len(caps))]


def plan(strategy: str, caps: Sequence[NodeCapability], cost: ModelCost, *, context_len: int,
         sessions: int, weights: MixedWeights | None = None,
         custom: Sequence[StageAssignment] | None = None, perf_weight: float = 0.0,
         calibrate: bool | float = True, max_layers: Mapping[str, int] | None = None,
         concurrency: float | None = None) -> PlanResult:
    """The placement ``strategy`` gives for ``caps`` (in pipeline order); see the module doc."""
    if strategy not in STRATEGIES:
        raise PlacementError(f"unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}")
    weights = weights or MixedWeights()
    caps = list(caps)
    names = [c.name for c in caps]
    if len(set(names)) != len(names):
        raise PlacementError(f"duplicate node names: {names}")
    notes: list[str] = []
    if strategy == "custom":
        return _plan_custom(caps, cost, custom, context_len, sessions, perf_weight, calibrate)
    if not caps:
        raise PlacementError("no nodes to place layers on")
    for c in caps:
        if c.mem_free_bytes < 0:
            raise PlacementError(f"node {c.name}: negative memory budget {c.mem_free_bytes}")
    caps_hi = dict(max_layers or {})
    if strategy == "compute" and concurrency is not None:
        # On the calibration of every node given, so that the prediction compares with others.
        k_cal = calibration(caps, cost) if calibrate is True else calibrate
        per_all = _s_per_layer(caps, cost, perf_weight, k_cal)
        kept, counts = _fastest(caps, cost, context_len, sessions, per_all, caps_hi,
                                concurrency, notes)
        return _evaluate(strategy, _ranges([c.name for c in kept], counts), caps, cost,
                         context_len, sessions, perf_weight, k_cal, notes)
    kept, cap = _fit_nodes(caps, cost, context_len, sessions, notes)
    n_layers = cost.num_layers
    if len(kept) > n_layers:
        raise PlacementError(f"{len(kept)} nodes but only {n_layers} layers")
    k = len(kept)
    lo = [1] * k
    hi = [min(m, n_layers, caps_hi.get(c.name, n_layers)) for m, c in zip(cap, kept, strict=True)]
    if sum(hi) < n_layers:
        raise PlacementError(f"the layer caps {caps_hi} leave room for {sum(hi)} of {n_layers} "
                             f"layers")
    per = _s_per_layer(kept, cost, perf_weight, calibrate)
    if strategy == "uniform":
        w = [1.0] * k
    elif strategy == "memory":
        w = [max(0.0, float(c.mem_free_bytes - cost.fixed_bytes(i == 0, i == k - 1)))
             for i, c in enumerate(kept)]
    elif strategy == "mixed":
        w = mixed_weights(kept, [1.0 / t for t in per], weights)
    else:  # compute
        head = [0.0] * k
        head[-1] = cost.layer_equivalents(0, True) * per[-1]
        counts = _min_max(per, head, n_layers, lo, hi)
        return _evaluate(strategy, _ranges([c.name for c in kept], counts), kept, cost,
                         context_len, sessions, perf_weight, calibrate, notes)
    counts = apportion(w, n_layers, lo, hi)
    if strategy == "uniform" and counts != sorted(counts, reverse=True):
        notes.append("uniform split shifted to fit memory budgets")
    return _evaluate(strategy, _ranges([c.name for c in kept], counts), kept, cost, context_len,
                     sessions, perf_weight, calibrate, notes)


def _plan_custom(caps: list[NodeCapability], cost: ModelCost,
                 custom: Sequence[StageAssignment] | None, context_len: int, sessions: int,
                 perf_weight: float, calibrate: bool | float) -> PlanResult:
    if not custom:
        raise PlacementError("strategy 'custom' needs the stages")
    stages = list(custom)
    expect = 0
    for s in stages:
        if s.start != expect or s.end <= s.start:
            raise PlacementError(f"custom stages must cover layers contiguously from 0; node "
                                 f"{s.node!r} has {s.start}-{s.end - 1}, expected to start at "
                                 f"{expect}")
        expect = s.end
    if expect != cost.num_layers:
        raise PlacementError(f"custom stages cover layers 0-{expect - 1} but the model has "
                             f"{cost.num_layers} layers")
    res = evaluate(stages, caps, cost, context_len=context_len, sessions=sessions,
                   perf_weight=perf_weight, calibrate=calibrate, strategy="custom")
    over = [(s, m, b) for s, m, b in zip(res.stages, res.memory_bytes, res.budget_bytes,
                                         strict=True) if m > b]
    if over:
        raise PlacementError("custom stages do not fit: " + "; ".join(
            f"{s.node} layers {s.start}-{s.end - 1} need {_fmt_b(m)} (weights + KV for "
            f"{context_len} tokens × {sessions} sessions), budget {_fmt_b(b)}"
            for s, m, b in over))
    return res


# --------------------------------------------------------------------------- broker entry
def uniform(nodes: list[str], num_layers: int) -> list[StageAssignment]:
    """Contiguous ranges as equal as possible; earlier stages take the remainder."""
    if not nodes:
        raise PlacementError("no nodes to place layers on")
    if len(nodes) > num_layers:
        raise PlacementError(f"{len(nodes)} nodes but only {num_layers} layers")
    base, extra = divmod(num_layers, len(nodes))
    out, start = [], 0
    for i, name in enumerate(nodes):
        n = base + (1 if i < extra else 0)
        out.append(StageAssignment(name, start, start + n))
        start += n
    return out


def custom_stages(cfg: PlacementConfig, kv_heads: int | None = None) -> list[StageAssignment]:
    """The configured stages, the nodes given ``heads`` of one layer range joined as one split
    stage (the config checked their order); with ``kv_heads``, each split must cover them all."""
    out: list[StageAssignment] = []
    for s in cfg.stages:
        prev = out[-1] if out else None
        if s.heads is not None and prev is not None and prev.group \
                and (prev.start, prev.end) == s.layers and prev.group[-1][2] == s.heads[0]:
            out[-1] = StageAssignment(prev.node, prev.start, prev.end,
                                      (*prev.group, (s.node, *s.heads)))
        else:
            group = ((s.node, *s.heads),) if s.heads is not None else ()
            out.append(StageAssignment(s.node, *s.layers, group))
    for st in out:
        if st.group and kv_heads is not None and st.group[-1][2] != kv_heads:
            raise PlacementError(f"layers {st.start}-{st.end - 1}: heads split among "
                                 f"{', '.join(st.members())} cover 0-{st.group[-1][2] - 1} "
                                 f"of the model's {kv_heads} KV heads")
        if st.group and len(st.group) == 1:
            raise PlacementError(f"layers {st.start}-{st.end - 1}: node {st.node} holds heads "
                                 f"of a stage nobody else shares")
    return out


def choose(cfg: PlacementConfig, registered: list[str], num_layers: int, *,
           caps: Mapping[str, NodeCapability] | None = None, cost: ModelCost | None = None,
           perf_weight: float = 0.0, kv_heads: int | None = None) -> list[StageAssignment]:
    """The stages for ``cfg`` given the names of the nodes that are registered and alive.

    With ``caps`` (by node name) and ``cost``, the memory / compute / mixed strategies plan with
    them (and custom stages are checked against memory); without, they fall back to uniform.
    Raises PlacementError saying what is still missing when it cannot be satisfied yet, or why
    the model does not fit.
    """
    if cfg.strategy == "custom":
        missing = [s.node for s in cfg.stages if s.node not in registered]
        if missing:
            raise PlacementError(f"waiting for node(s) {', '.join(missing)}")
        last = cfg.stages[-1].layers[1]
        if last != num_layers:
            raise PlacementError(f"custom stages cover layers 0-{last - 1} but the model has "
                                 f"{num_layers} layers")
        stages = custom_stages(cfg, kv_heads)
        if caps is not None and cost is not None:
            missing = [s.node for s in stages if s.node not in caps]
            if missing:
                raise PlacementError(f"no capability figures for node(s) {', '.join(missing)}")
            plan("custom", [caps[s.node] for s in stages], cost, context_len=cfg.context_len,
                 sessions=cfg.sessions, custom=stages, perf_weight=perf_weight)
        return stages
    if isinstance(cfg.nodes, list):
        missing = [n for n in cfg.nodes if n not in registered]
        if missing:
            raise PlacementError(f"waiting for node(s) {', '.join(missing)}")
        names = list(cfg.nodes)
    else:
        if len(registered) < cfg.nodes:
            raise PlacementError(f"waiting for nodes: {len(registered)}/{cfg.nodes} registered")
        names = sorted(registered)[: cfg.nodes]
    if caps is None or cost is None:
        return uniform(names, num_layers)
    missing = [n for n in names if n not in caps]
    if missing:
        raise PlacementError(f"no capability figures for node(s) {', '.join(missing)}")
    return plan(cfg.strategy, [caps[n] for n in names], cost, context_len=cfg.context_len,
                sessions=cfg.sessions, weights=cfg.weights, perf_weight=perf_weight).stages
