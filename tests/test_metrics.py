"""Unit tests of zpipe.metrics: windows, percentiles, rates, sessions, Prometheus text."""

from __future__ import annotations

import re

import pytest

from zpipe.metrics import Metrics, breakdown


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


SAMPLE = re.compile(
    r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? '
    r'(-?[0-9.e+-]+|NaN|[+-]Inf)$')


def parse_prometheus(text: str) -> dict[str, list[tuple[str, float]]]:
    """Check the exposition format strictly; returns metric name -> [(labels, value)]."""
    assert text.endswith("\n")
    helps, types, samples = set(), {}, {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helps.add(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("counter", "gauge", "summary", "histogram", "untyped")
            types[name] = kind
        else:
            m = SAMPLE.match(line)
            assert m, f"bad sample line {line!r}"
            name = m.group(1)
            base = re.sub(r"_(sum|count)$", "", name)
            family = name if name in types else base
            assert family in types and family in helps, f"{name}: no HELP/TYPE"
            samples.setdefault(name, []).append((m.group(2) or "", float(m.group(4))))
    return samples


def test_percentiles_over_the_window() -> None:
    m = Metrics(window=100)
    for i in range(1, 101):  # 1..100 ms, decode
        m.record_token("s", i / 1000, [["a", i / 2000, i / 4000]], first=False)
    o = m.overall()
    assert o["step"]["count"] == 100
    assert o["step"]["p50"] == pytest.approx(0.0505)
    assert o["step"]["p90"] == pytest.approx(0.0901)
    assert o["step"]["p99"] == pytest.approx(0.09901)
    assert o["step"]["mean"] == pytest.approx(0.0505)
    n = m.node_summary("a")
    assert n["tokens"] == 100
    assert n["compute"]["p50"] == pytest.approx(0.02525)
    assert n["hop"]["p99"] == pytest.approx(0.0247525)
    # the rest of each step (a quarter) is overhead outside the stages
    assert o["overhead"]["p50"] == pytest.approx(0.0505 / 4, abs=1e-6)


def test_window_is_bounded_and_rolls() -> None:
    m = Metrics(window=10)
    for i in range(1000):
        m.record_token("s", float(i), [["a", float(i), 0.0]], first=False)
    assert len(m.step.window) == 10 and len(m.nodes["a"].compute.window) == 10
    assert m.overall()["step"]["p50"] == pytest.approx(994.5)  # only 990..999 remain
    assert m.step.count == 1000 and m.tokens_total == 1000


def test_prefill_is_kept_apart_from_decode() -> None:
    m = Metrics()
    m.record_token("s", 0.5, [["a", 0.4, 0.05]], first=True)
    m.record_token("s", 0.01, [["a", 0.008, 0.001]], first=False)
    assert m.overall()["prefill"]["p50"] == 0.5
    assert m.overall()["step"]["p50"] == 0.01
    n = m.node_summary("a")
    assert n["compute"]["count"] == 1 and n["compute"]["p50"] == 0.008
    assert n["prefill"]["compute"]["p50"] == 0.4
    assert n["tokens"] == 2


def test_empty_figures_are_none_not_nan() -> None:
    m = Metrics()
    assert m.overall()["step"]["p50"] is None
    assert m.node_summary("nobody")["compute"]["p99"] is None
    assert m.session_summary("nope") is None


def test_tokens_per_second_over_the_last_seconds() -> None:
    clock = Clock()
    m = Metrics(rate_window_s=10.0, clock=clock)
    for _ in range(50):
        m.record_token("s", 0.01, [], first=False)
        clock.t += 0.1  # 10 tokens/s for 5 s
    assert m.tokens_per_s() == pytest.approx(5.0)  # 50 tokens in the last 10 s
    clock.t += 6.95  # the first 20 tokens are older than 10 s now
    assert m.tokens_per_s() == pytest.approx(3.0)
    clock.t += 100
    assert m.tokens_per_s() == 0.0
    assert m.overall()["tokens_total"] == 50


def test_sessions_ttft_rate_and_endings() -> None:
    clock = Clock()
    m = Metrics(clock=clock)
    m.session_started("s1", "r1", prompt_tokens=7)
    clock.t += 0.25
    m.record_token("s1", 0.2, [["a", 0.1, 0.1]], first=True)
    for _ in range(10):
        clock.t += 0.05
        m.record_token("s1", 0.05, [["a", 0.04, 0.01]], first=False)
    s = m.session_summary("s1")
    assert s["tokens"] == 11 and s["prompt_tokens"] == 7 and s["rid"] == "r1"
    assert s["ttft_s"] == pytest.approx(0.25)
    assert s["tokens_per_s"] == pytest.approx(20.0)
    assert s["step_p50_s"] == pytest.approx(0.05)
    assert s["state"] == "running" and s["age_s"] == pytest.approx(0.75)
    m.session_started("s2", "r2", 3)
    m.session_ended("s1", "length")
    m.session_ended("s2", "cancelled")
    clock.t += 5
    s = m.session_summary("s1")
    assert s["state"] == "length" and s["age_s"] == pytest.approx(0.75)  # frozen at the end
    o = m.overall()
    assert o["sessions_started"] == 2 and o["sessions_running"] == 0
    assert o["sessions_finished"] == {"length": 1, "cancelled": 1}
    assert o["ttft"]["p50"] == pytest.approx(0.25)


def test_finished_sessions_memory_is_bounded() -> None:
    m = Metrics()
    for i in range(500):
        m.session_started(str(i), "r", 1)
        m.record_token(str(i), 0.1, [], first=True)
        m.session_ended(str(i), "stop")
    assert len(m.finished) <= 100 and not m.sessions
    assert m.session_summary("499")["tokens"] == 1
    assert m.session_summary("0") is None


def test_prometheus_text_parses() -> None:
    m = Metrics()
    m.session_started("s", "r", 4)
    m.record_token("s", 0.3, [["n0", 0.1, 0.01], ['we"ird\\', 0.15, 0.02]], first=True)
    for _ in range(5):
        m.record_token("s", 0.03, [["n0", 0.01, 0.001], ['we"ird\\', 0.015, 0.002]], first=False)
    m.session_ended("s", "length")
    text = m.prometheus([("zpipe_node_up", "1 when up.", {"node": "n0"}, 1),
                         ("zpipe_node_rss_bytes", "RSS.", {"node": "n0"}, 123456789)])
    samples = parse_prometheus(text)
    assert samples["zpipe_tokens_total"] == [("", 6.0)]
    assert samples["zpipe_sessions_finished_total"] == [('{reason="length"}', 1.0)]
    q = dict(samples["zpipe_node_compute_seconds"])
    assert q['{node="n0",quantile="0.5"}'] == pytest.approx(0.01)
    assert '{node="we\\"ird\\\\",quantile="0.99"}' in q
    assert dict(samples["zpipe_node_compute_seconds_count"])['{node="n0"}'] == 5
    assert samples["zpipe_step_seconds_count"] == [("", 5.0)]
    assert samples["zpipe_prefill_seconds_count"] == [("", 1.0)]
    assert samples["zpipe_node_rss_bytes"] == [('{node="n0"}', 123456789.0)]
    assert text.count("# TYPE zpipe_node_compute_seconds summary") == 1
    # an empty window still renders (NaN quantiles)
    parse_prometheus(Metrics().prometheus())


def test_breakdown_of_client_timings() -> None:
    timings = [{"step_s": 0.5, "stages": [["a", 0.3, 0.1], ["b", 0.05, 0.04]]}]
    for i in range(1, 11):
        timings.append({"step_s": 0.01 * i + 0.001,
                        "stages": [["a", 0.006 * i, 0.001 * i], ["b", 0.002 * i, 0.001 * i]]})
    b = breakdown(timings)
    assert b["tokens"] == 11
    assert b["prefill"] == {"step_s": 0.5, "stages": [["a", 0.3, 0.1], ["b", 0.05, 0.04]]}
    assert b["step"]["count"] == 10 and b["step"]["p50"] == pytest.approx(0.056)
    assert list(b["nodes"]) == ["a", "b"]
    assert b["nodes"]["a"]["compute"]["p50"] == pytest.approx(0.033)
    assert b["nodes"]["b"]["hop"]["mean"] == pytest.approx(0.0055)
    assert b["nodes"]["a"]["compute"]["p99"] == pytest.approx(0.05946)
    assert b["overhead"]["p50"] == pytest.approx(0.001)
    empty = breakdown([])
    assert empty["tokens"] == 0 and empty["prefill"] is None and empty["nodes"] == {}


def test_a_cohort_recorded_at_once_equals_its_rows_one_by_one() -> None:
    """The broker records a cohort's tokens with one ``record_tokens`` call: every figure is
    what recording each row alone gives."""
    clock = Clock()
    alone, together = Metrics(clock=clock), Metrics(clock=clock)
    sids = ["s1", "s2", "s3"]
    for m in (alone, together):
        for sid in sids:
            m.session_started(sid, "r" + sid, 4)
    clock.t += 0.5
    stages = [["a", 0.2, 0.05], ["b", 0.15, 0.04]]
    for sid in sids:
        alone.record_token(sid, 0.5, stages, first=True)
    together.record_tokens(sids, 0.5, stages, first=True)
    for step in range(1, 4):
        clock.t += 0.01
        step_stages = [["a", 0.004 * step, 0.001], ["b", 0.003, 0.002]]
        for sid in sids:
            alone.record_token(sid, 0.01 * step, step_stages, first=False)
        together.record_tokens(sids, 0.01 * step, step_stages, first=False)
    assert together.overall() == alone.overall()
    assert together.overall()["tokens_total"] == 12
    for name in ("a", "b"):
        assert together.node_summary(name) == alone.node_summary(name)
    for sid in sids:
        assert together.session_summary(sid) == alone.session_summary(sid)
    # Lifetime sums: v * k where one by one added v k times (the last bits may differ).
    got, want = parse_prometheus(together.prometheus()), parse_prometheus(alone.prometheus())
    assert got.keys() == want.keys()
    for name, samples in want.items():
        assert [lab for lab, _ in got[name]] == [lab for lab, _ in samples]
        assert [v for _, v in got[name]] == pytest.approx([v for _, v in samples], rel=1e-12, nan_ok=True)


def test_recoveries_by_how_seen_and_restored() -> None:
    """Each recovery counts under how the loss was seen, how KV came back and its result;
    silence before detection and the pause are summaries."""
    m = Metrics()
    m.record_recovery({"seen_by": "disconnect", "silent_s": 0.2, "restored": "shadow",
                       "pause_s": 0.05, "ok": True})
    m.record_recovery({"seen_by": "disconnect", "silent_s": 0.4, "restored": "shadow",
                       "pause_s": 0.07, "ok": True})
    m.record_recovery({"seen_by": "heartbeat", "silent_s": 3.1, "restored": "replay",
                       "pause_s": 30.0, "ok": False})
    samples = parse_prometheus(m.prometheus())
    assert dict(samples["zpipe_recoveries_total"]) == {
        '{seen_by="disconnect",restored="shadow",result="ok"}': 2.0,
        '{seen_by="heartbeat",restored="replay",result="failed"}': 1.0}
    assert samples["zpipe_recovery_silent_seconds_count"] == [("", 3.0)]
    assert samples["zpipe_recovery_pause_seconds_sum"] == [("", pytest.approx(30.12))]
