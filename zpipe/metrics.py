"""Per-token latency metrics: the broker's rolling windows, and a breakdown for clients.

The broker calls ``Metrics.record_token`` once per token with the step's wall time and, per
stage in pipeline order, ``[node, compute_s, hop_s]``: compute measured on the node, hop the
rest of the time the broker waited for that stage (transfer both ways and queueing). Recording
is O(1): appends to bounded deques and a few counters. Percentiles are computed when asked.

Decode tokens and prefills (a session's first token) go to separate windows: a prefill
computes the whole prompt and would otherwise dominate the per-token p99.
All times are seconds; an empty window's statistics are ``None``.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat

from zpipe.stats import summary

WINDOW = 1000          # tokens in each rolling window
RATE_WINDOW_S = 10.0   # tokens/s is measured over this many seconds
KEEP_FINISHED = 100    # finished sessions remembered for session_summary
QUANTILES = (0.5, 0.9, 0.99)


def stats(values: Sequence[float]) -> dict:
    """count, mean, p50, p90, p99 (seconds, rounded to ns); None instead of NaN."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else
                (v if k == "count" else round(v, 9)))
            for k, v in summary(list(values)).items()}


class _Series:
    """A rolling window of seconds plus lifetime count and sum (for Prometheus summaries)."""

    __slots__ = ("window", "count", "sum")

    def __init__(self, size: int = WINDOW) -> None:
        self.window: deque[float] = deque(maxlen=size)
        self.count = 0
        self.sum = 0.0

    def add(self, v: float, times: int = 1) -> None:
        if times == 1:
            self.window.append(v)
        else:
            self.window.extend(repeat(v, times))
        self.count += times
        self.sum += v * times


class _NodeStats:
    __slots__ = ("compute", "hop", "prefill_compute", "prefill_hop", "tokens")

    def __init__(self, size: int) -> None:
        self.compute, self.hop = _Series(size), _Series(size)
        self.prefill_compute, self.prefill_hop = _Series(size), _Series(size)
        self.tokens = 0


class _SessionStats:
    __slots__ = ("rid", "prompt_tokens", "started", "first_at", "last_at", "ttft_s", "tokens",
                 "steps", "ended", "reason")

    def __init__(self, rid: str, prompt_tokens: int, now: float) -> None:
        self.rid, self.prompt_tokens, self.started = rid, prompt_tokens, now
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.ttft_s: float | None = None
        self.tokens = 0
        self.steps: deque[float] = deque(maxlen=WINDOW)  # decode step times
        self.ended: float | None = None
        self.reason = ""


class Metrics:
    def __init__(self, window: int = WINDOW, rate_window_s: float = RATE_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window, self.rate_window_s, self.clock = window, rate_window_s, clock
        self.step, self.prefill = _Series(window), _Series(window)
        self.overhead = _Series(window)  # step_s minus the sum of the stages' compute + hop
        self.ttft = _Series(window)
        self.nodes: dict[str, _NodeStats] = {}
        self.sessions: dict[str, _SessionStats] = {}
        self.finished: OrderedDict[str, _SessionStats] = OrderedDict()
        self.token_times: deque[float] = deque(maxlen=1 << 16)  # for tokens/s
        self.tokens_total = 0
        self.steps_started = 0  # step messages sent to stage 0: one per cohort per token
        self.step_rows = 0      # the sessions those messages carried
        self.max_step_rows = 0  # the biggest cohort so far
        self.sessions_started = 0
        self.sessions_finished: Counter[str] = Counter()
        self.recoveries: Counter[tuple[str, str, str]] = Counter()  # (seen_by, restored, result)
        self.recovery_silent = _Series(KEEP_FINISHED)  # silence before a death was seen
        self.recovery_pause = _Series(KEEP_FINISHED)  # loss until a placement was ready again

    # ------------------------------------------------------------ recording (hot path)
    def record_recovery(self, record: dict) -> None:
        """A recovery from a lost node ended (``record`` as the reallocation history keeps it:
        ``seen_by``, ``silent_s``, ``restored``, ``pause_s``, ``ok``)."""
        key = (record.get("seen_by") or "unknown", record.get("restored") or "none",
               "ok" if record.get("ok") else "failed")
        self.recoveries[key] += 1
        if record.get("silent_s") is not None:
            self.recovery_silent.add(record["silent_s"])
        self.recovery_pause.add(record["pause_s"])

    def session_started(self, sid: str, rid: str, prompt_tokens: int) -> None:
        self.sessions[sid] = _SessionStats(rid, prompt_tokens, self.clock())
        self.sessions_started += 1

    def session_ended(self, sid: str, reason: str) -> None:
        s = self.sessions.pop(sid, None)
        self.sessions_finished[reason] += 1
        if s is None:
            return
        s.ended, s.reason = self.clock(), reason
        self.finished[sid] = s
        if len(self.finished) > KEEP_FINISHED:
            self.finished.popitem(last=False)

    def record_cohort(self, rows: int) -> None:
        """A step of ``rows`` sessions together was sent to stage 0."""
        self.steps_started += 1
        self.step_rows += rows
        if rows > self.max_step_rows:
            self.max_step_rows = rows

    def record_token(self, sid: str, step_s: float, stages: list[list], first: bool) -> None:
        self.record_tokens([sid], step_s, stages, first)

    def record_tokens(self, sids: list[str], step_s: float, stages: list[list],
                      first: bool) -> None:
        """One token for each of ``sids``, whose step took the same time through the same
        stages (a cohort): the shared figures are recorded once, ``len(sids)`` times over."""
        k = len(sids)
        now = self.clock()
        self.tokens_total += k
        self.token_times.extend(repeat(now, k))
        (self.prefill if first else self.step).add(step_s, k)
        staged = 0.0
        for name, compute, hop in stages:
            node = self.nodes.get(name)
            if node is None:
                node = self.nodes[name] = _NodeStats(self.window)
            node.tokens += k
            (node.prefill_compute if first else node.compute).add(compute, k)
            (node.prefill_hop if first else node.hop).add(hop, k)
            staged += compute + hop
        self.overhead.add(step_s - staged, k)
        for sid in sids:
            s = self.sessions.get(sid)
            if s is None:  # a session the broker did not announce: count it all the same
                s = self.sessions[sid] = _SessionStats("", 0, now - step_s)
            s.tokens += 1
            s.last_at = now
            if first or s.first_at is None:
                s.first_at = now
                s.ttft_s = now - s.started
                self.ttft.add(s.ttft_s)
            if not first:
                s.steps.append(step_s)

    # ------------------------------------------------------------ reading
    def tokens_per_s(self) -> float:
        """Tokens emitted over the last ``rate_window_s`` seconds, per second."""
        since = self.clock() - self.rate_window_s
        times = self.token_times
        while times and times[0] < since:
            times.popleft()
        return round(len(times) / self.rate_window_s, 3)

    def node_summary(self, name: str) -> dict:
        node = self.nodes.get(name)
        if node is None:
            node = _NodeStats(1)
        return {"tokens": node.tokens,
                "compute": stats(node.compute.window), "hop": stats(node.hop.window),
                "prefill": {"compute": stats(node.prefill_compute.window),
                            "hop": stats(node.prefill_hop.window)}}

    def session_summary(self, sid: str) -> dict | None:
        s = self.sessions.get(sid) or self.finished.get(sid)
        if s is None:
            return None
        end = s.ended if s.ended is not None else self.clock()
        decode = (s.last_at - s.first_at) if s.first_at is not None and s.last_at else 0.0
        st = stats(s.steps)
        return {"sid": sid, "rid": s.rid, "prompt_tokens": s.prompt_tokens, "tokens": s.tokens,
                "tokens_per_s": round((s.tokens - 1) / decode, 3) if decode > 0 else None,
                "ttft_s": None if s.ttft_s is None else round(s.ttft_s, 6),
                "step_p50_s": st["p50"], "step_p99_s": st["p99"],
                "age_s": round(end - s.started, 3),
                "state": "running" if s.ended is None else s.reason}

    def overall(self) -> dict:
        return {"tokens_total": self.tokens_total, "tokens_per_s": self.tokens_per_s(),
                "step": stats(self.step.window), "prefill": stats(self.prefill.window),
                "overhead": stats(self.overhead.window), "ttft": stats(self.ttft.window),
                "steps_started": self.steps_started,
                "rows_per_step": round(self.step_rows / max(1, self.steps_started), 3),
                "max_rows_per_step": self.max_step_rows,
                "sessions_started": self.sessions_started,
                "sessions_running": len(self.sessions),
                "sessions_finished": dict(self.sessions_finished)}

    def node_names(self) -> list[str]:
        return list(self.nodes)

    # ------------------------------------------------------------ Prometheus
    def prometheus(self, extra_gauges: Iterable[tuple[str, str, dict, float]] = ()) -> str:
        """Text exposition format 0.0.4. ``extra_gauges``: (name, help, labels, value) rows."""
        out = Exposition()
        out.add("zpipe_tokens_total", "counter", "Tokens generated.", {}, self.tokens_total)
        out.add("zpipe_tokens_per_second", "gauge",
                f"Tokens per second over the last {self.rate_window_s:g} s.", {},
                self.tokens_per_s())
        out.add("zpipe_steps_started_total", "counter",
                "Step messages sent to stage 0 (one per cohort per token).", {},
                self.steps_started)
        out.add("zpipe_step_rows_total", "counter",
                "Sessions those step messages carried (rows / steps = the mean cohort).", {},
                self.step_rows)
        out.add("zpipe_step_rows_max", "gauge", "The biggest cohort so far (rows of one step "
                "message to stage 0).", {}, self.max_step_rows)
        out.add("zpipe_sessions_started_total", "counter", "Sessions started.", {},
                self.sessions_started)
        h = "Sessions finished, by reason."
        for reason, n in sorted(self.sessions_finished.items()):
            out.add("zpipe_sessions_finished_total", "counter", h, {"reason": reason}, n)
        out.add("zpipe_sessions_running", "gauge", "Sessions running.", {}, len(self.sessions))
        w = f"over the last {self.window} tokens"
        out.summary("zpipe_step_seconds", f"Decode step time, broker to broker, {w}.", {},
                    self.step)
        out.summary("zpipe_prefill_seconds", f"Prefill step time {w}.", {}, self.prefill)
        out.summary("zpipe_step_overhead_seconds",
                    f"Step time not inside a stage's compute or hop {w}.", {}, self.overhead)
        out.summary("zpipe_ttft_seconds", "Time to first token, broker side.", {}, self.ttft)
        for name, n in self.nodes.items():
            lab = {"node": name}
            out.add("zpipe_node_tokens_total", "counter", "Token steps a node computed.", lab,
                    n.tokens)
            out.summary("zpipe_node_compute_seconds",
                        f"Decode compute time per token on a node, {w}.", lab, n.compute)
            out.summary("zpipe_node_hop_seconds",
                        f"Decode transfer and queue time per token for a node, {w}.", lab, n.hop)
            out.summary("zpipe_node_prefill_compute_seconds", f"Prefill compute time, {w}.",
                        lab, n.prefill_compute)
        h = "Recoveries from a lost node, by how the loss was seen and how KV was restored."
        for (seen, restored, result), n in sorted(self.recoveries.items()):
            out.add("zpipe_recoveries_total", "counter", h,
                    {"seen_by": seen, "restored": restored, "result": result}, n)
        out.summary("zpipe_recovery_silent_seconds", "How long a lost node had been silent "
                    "when its loss was seen (an upper bound on detection time).", {},
                    self.recovery_silent)
        out.summary("zpipe_recovery_pause_seconds", "From a node's loss until a placement was "
                    "ready again (sessions then replay what the restore did not bring back).",
                    {}, self.recovery_pause)
        for name, help_, labels, value in extra_gauges:
            out.add(name, "gauge", help_, labels, value)
        return out.text()


_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


class Exposition:
    """Collects samples grouped by metric name; writes HELP/TYPE once per metric."""

    def __init__(self) -> None:
        self.metrics: dict[str, tuple[str, str, list[str]]] = {}

    def add(self, name: str, kind: str, help_: str, labels: dict, value: float,
            suffix: str = "") -> None:
        if not _NAME.match(name):
            raise ValueError(f"bad metric name {name!r}")
        entry = self.metrics.setdefault(name, (kind, help_, []))
        entry[2].append(f"{name}{suffix}{_labels(labels)} {_value(value)}")

    def summary(self, name: str, help_: str, labels: dict, series: _Series) -> None:
        xs = sorted(series.window)
        for q in QUANTILES:
            v = _quantile(xs, q)
            self.add(name, "summary", help_, {**labels, "quantile": f"{q:g}"}, v)
        self.add(name, "summary", help_, labels, series.sum, "_sum")
        self.add(name, "summary", help_, labels, series.count, "_count")

    def text(self) -> str:
        lines = []
        for name, (kind, help_, samples) in self.metrics.items():
            lines.append(f"# HELP {name} {help_.replace(chr(92), chr(92) * 2)}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(samples)
        return "\n".join(lines) + "\n"


def _quantile(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    esc = (str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
           for v in labels.values())
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(labels, esc, strict=True)) + "}"


def _value(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "NaN"
    if isinstance(v, float) and math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if isinstance(v, int) or float(v).is_integer() and abs(v) < 1 << 53:
        return str(int(v))
    return repr(float(v))


def breakdown(timings: list[dict]) -> dict:
    """Summarize a client's per-token timings (``Generation.timings``).

    Each timing is ``{"step_s", "stages": [[node, compute_s, hop_s], ...]}``; the first is the
    prefill and is reported apart. Returns per-node compute/hop stats, step stats and the
    overhead (step_s minus the stages' compute + hop) of the decode tokens.
    """
    out: dict = {"tokens": len(timings), "prefill": None}
    if timings:
        first = timings[0]
        out["prefill"] = {"step_s": first["step_s"],
                          "stages": [list(s) for s in first["stages"]]}
    decode = timings[1:]
    nodes: dict[str, tuple[list, list]] = {}
    overhead = []
    for t in decode:
        staged = 0.0
        for name, compute, hop in t["stages"]:
            c, h = nodes.setdefault(name, ([], []))
            c.append(compute)
            h.append(hop)
            staged += compute + hop
        overhead.append(t["step_s"] - staged)
    out["step"] = stats([t["step_s"] for t in decode])
    out["overhead"] = stats(overhead)
    out["nodes"] = {name: {"compute": stats(c), "hop": stats(h)}
                    for name, (c, h) in nodes.items()}
    return out
