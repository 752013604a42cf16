"""Performance-driven reallocation (Rebalancer), the planner's broker inputs, and the admin ops
plan / move / rebalance / drain / slow (unit level on a stand-in broker, then a real cluster)."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from collections import defaultdict, deque
from pathlib import Path
from types import SimpleNamespace

import pytest

from brokers import admin, rebalance
from brokers.mover import MoveError
from brokers.rebalance import AutoRebalancer, Rebalancer, worth_it
from brokers.registry import Registry
from zpipe import protocol
from zpipe.cli import admin as admin_cli
from zpipe.config import BrokerConfig, Rebalance
from zpipe.metrics import Metrics
from zpipe.placement import Placement, StageAssignment, uniform

# --------------------------------------------------------------------------- Rebalancer


def _rb(**kw) -> Rebalancer:
    return Rebalancer(Rebalance(enabled=True, **{"min_tokens": 10, "cooldown_s": 30.0, **kw}))


def test_due_after_min_tokens_and_the_cooldowns() -> None:
    r = _rb(min_tokens=64, cooldown_s=30.0)
    assert r.due(63, now=1000.0) is None
    assert r.due(64, now=1000.0) == "64 tokens measured" == r.last_reason
    r.note_change(1000.0)
    assert r.due(100, now=1029.9) is None and r.due(100, now=1030.0) is not None
    r.note_declined(1040.0)
    assert r.due(100, now=1060.0) is None and r.due(100, now=1070.0) is not None


def test_off_switch_and_idle_nodes() -> None:
    assert Rebalancer(Rebalance(enabled=False)).due(10**6, now=1e9) is None
    r = _rb()
    assert r.due(0, now=1000.0, joined=["d"]) == "node(s) d hold no layers"
    r.note_change(1000.0)
    assert r.due(0, now=1001.0, joined=["d"]) is None  # the cooldown still applies


def test_worth_it_needs_min_gain() -> None:
    assert worth_it(1.0, 0.85) and not worth_it(1.0, 0.851) and not worth_it(1.0, 1.2)
    assert worth_it(None, 5.0) and worth_it(0.0, 1.0)
    assert _rb(min_gain=0.05).worth_it(1.0, 0.95) and not _rb().worth_it(1.0, 0.95)


# --------------------------------------------------------------------------- a stand-in broker
SPEC = SimpleNamespace(num_layers=6, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                       vocab_size=512, tie_word_embeddings=False,
                       config=SimpleNamespace(intermediate_size=128))


class FakeMover:
    def __init__(self, broker: FakeBroker | None = None) -> None:
        self.broker = broker
        self.calls: list[tuple] = []
        self.history: list[dict] = []
        self.fail: str | None = None
        self.moving = False

    async def transition(self, stages: list[StageAssignment], reason: str) -> dict:
        rec = await self._record("transition", list(stages), reason)
        self.broker.switch(list(stages))
        return rec

    async def _record(self, *call) -> dict:
        self.calls.append(call)
        if self.fail:
            raise MoveError(self.fail)
        rec = {"time": 1_700_000_000.0, "reason": call[-1], "before": [{"node": "a", "start": 0,
               "end": 6}], "after": [{"node": "b", "start": 0, "end": 6}], "kv_bytes": 4096,
               "pause_s": 0.0123, "ok": True, "error": None}
        self.history.append(rec)
        return rec

    async def move_layers(self, start: int, end: int, to: str, reason: str) -> dict:
        return await self._record("move", start, end, to, reason)

    async def rebalance(self, strategy: str, reason: str) -> dict:
        return await self._record("rebalance", strategy, reason)

    async def drain(self, node: str, reason: str) -> dict:
        return await self._record("drain", node, reason)





class FakeBroker:
    def __init__(self, gflops: dict[str, float], mem: int = 10**10, **cfg) -> None:
        self.cfg = BrokerConfig.model_validate({"model": "x", **cfg})
        self.spec = SPEC
        self.registry = Registry()
        for name, g in gflops.items():
            self.registry.add(name.encode(), {"name": name, "pid": 1, "host": "h",
                                              "device": "cpu", "dtype": "float32",
                                              "mem_total": mem, "mem_free": mem, "gflops": g})
        self.metrics = Metrics()
        self.measured: dict[str, deque] = defaultdict(deque)
        self.placement: Placement | None = None
        self.ready = False
        self.waiting_for = "nodes"
        self.model_dir = Path("/models/x")
        self.sessions: dict = {}
        self.mover = FakeMover(self)
        self.rebalancer = Rebalancer(self.cfg.rebalance)
        self.sent: list[tuple[bytes, protocol.Message]] = []
        self.slowed: list[tuple[str, float]] = []

    def place(self, stages: list[StageAssignment]) -> None:
        self.placement = Placement(1, stages)
        self.ready = True
        for st in stages:
            n = self.registry.by_name[st.node]
            n.state, n.start, n.end, n.weight_bytes = "ready", st.start, st.end, 1000

    def switch(self, stages: list[StageAssignment]) -> None:
        """What the broker does after a committed move."""
        self.placement = Placement(self.placement.epoch + 1, stages)
        held = {st.node: st for st in stages}
        for n in self.registry.all():
            st = held.get(n.name)
            n.state, n.start, n.end = ("ready", st.start, st.end) if st else ("registered", 0, 0)
        self.measured.clear()
        self.rebalancer.note_change(0.0)

    async def send(self, ident: bytes, frames: list) -> bool:
        msg = protocol.decode(frames)
        if msg.kind == "set_slow":
            self.slowed.append((ident.decode(), msg["factor"]))
        else:
            self.sent.append((ident, msg))
        return True


def _ask(b: FakeBroker, op: str, args: dict | None = None) -> protocol.Message:
    """Send an admin request through the wire codec and wait for the reply to it."""
    async def go() -> protocol.Message:
        fields = {"rid": "r1", "op": op, **({"args": args} if args else {})}
        adm = admin.Admin(b, b.mover)
        await adm.handle(b"cli", protocol.decode(protocol.encode("admin", **fields)))
        await adm.idle()
        return b.sent.pop()[1]
    return asyncio.run(go())


def test_capabilities_from_the_registry_and_measurements() -> None:
    b = FakeBroker({"a": 10.0, "b": 30.0, "c": 10.0})
    b.place(uniform(["a", "b", "c"], 6))
    for n in "abc":  # the nodes are on different hosts here: no shared pool
        b.registry.by_name[n].host = n
    b.registry.by_name["a"].stats.update({"kv_bytes": 500, "mem_free": 2000, "mem_held": 1500})
    b.measured["a"].extend([0.003, 0.002, 0.004])  # median 3 ms for 2 layers
    cost = rebalance.model_cost(b)
    caps = rebalance.capabilities(b, cost)
    assert list(caps) == ["a", "b", "c"]
    assert caps["a"].gflops == 10.0 and caps["a"].mem_free_bytes == 2000 + 1000 + 500
    assert caps["a"].measured_s_per_layer == pytest.approx(0.0015)
    assert caps["b"].measured_s_per_layer is None
    # the last stage's time is divided by its layers + the head's layer-equivalents
    b.measured["c"].append(0.01)
    c = rebalance.capabilities(b, cost)["c"]
    assert c.measured_s_per_layer == pytest.approx(0.01 / cost.layer_equivalents(2, True))
    b.registry.by_name["b"].state = "dead"
    assert "b" not in rebalance.capabilities(b, cost)
    assert rebalance.dtype_bytes(b) == 4


def test_plan_op_current_vs_proposed() -> None:
    b = FakeBroker({"a": 10.0, "b": 30.0, "c": 10.0})
    b.place(uniform(["a", "b", "c"], 6))
    msg = _ask(b, "plan", {"strategy": "compute"})
    assert msg.kind == "admin_reply", msg.header
    d = msg["data"]
    assert d["strategy"] == "compute" and d["epoch"] == 1
    assert [(s["node"], s["layers"]) for s in d["current"]["stages"]] == [
        ("a", 2), ("b", 2), ("c", 2)]
    prop = d["proposed"]["stages"]
    assert [s["node"] for s in prop] == ["a", "b", "c"]
    assert sum(s["layers"] for s in prop) == 6 and prop[1]["layers"] > prop[0]["layers"]
    for s in prop:
        assert s["predicted_s"] > 0 and 0 < s["memory_bytes"] <= s["budget_bytes"]
        assert s["memory_bytes"] == s["weight_bytes"] + s["kv_bytes"]
    assert d["changed"] and d["gain"] > 0.05 and d["worth_it"]
    text = admin_cli.format_plan(d)
    assert "proposed (compute)" in text and "PRED ms/tok" in text and "worth a move" in text
    # default strategy: the broker's; uniform on a uniform placement changes nothing
    d = _ask(b, "plan")["data"]
    assert d["strategy"] == "uniform" and not d["changed"] and not d["worth_it"]
    assert "is the current one" in admin_cli.format_plan(d)


def test_plan_op_includes_a_late_joiner_and_refuses_infeasible() -> None:
    b = FakeBroker({"a": 10.0, "b": 10.0})
    b.place(uniform(["a", "b"], 6))
    b.registry.add(b"d", {"name": "d", "pid": 2, "host": "h", "device": "cpu",
                          "dtype": "float32", "mem_total": 10**10, "mem_free": 10**10,
                          "gflops": 10.0})
    d = _ask(b, "plan", {"strategy": "compute"})["data"]
    assert [s["node"] for s in d["proposed"]["stages"]] == ["a", "b", "d"]
    small = FakeBroker({"a": 10.0}, mem=300_000, placement={"context_len": 4096, "sessions": 8})
    msg = _ask(small, "plan", {"strategy": "memory"})
    assert msg.kind == "error" and msg["code"] == "infeasible"
    assert "does not fit" in msg["message"] and "4096 tokens × 8 sessions" in msg["message"]
    assert "a: budget 0.3 MiB" in msg["message"]
    msg = _ask(b, "plan", {"strategy": "fastest"})
    assert msg["code"] == "bad_request" and "strategy must be one of" in msg["message"]


def test_plan_for_current_and_custom() -> None:
    b = FakeBroker({"a": 10.0, "b": 10.0})
    b.place([StageAssignment("a", 0, 1), StageAssignment("b", 1, 6)])
    cur = admin.plan_for(b, "current")
    assert cur.stages == b.placement.stages and cur.predicted_s[1] > cur.predicted_s[0]
    assert admin.plan_for(b, "custom").stages == b.placement.stages  # no configured stages
    assert [s.node for s in admin.plan_for(b, "uniform", exclude=["a"]).stages] == ["b"]


def test_move_rebalance_drain_slow_ops_call_the_mover() -> None:
    b = FakeBroker({"a": 10.0, "b": 10.0})
    b.place(uniform(["a", "b"], 6))
    msg = _ask(b, "move", {"layers": "2-3", "to": "a"})
    assert msg.kind == "admin_reply" and msg["data"]["ok"] and msg["data"]["kv_bytes"] == 4096
    assert b.mover.calls[-1] == ("move", 2, 4, "a", "admin move")
    _ask(b, "rebalance", {"strategy": "compute"})
    assert b.mover.calls[-1] == ("rebalance", "compute", "admin rebalance")
    _ask(b, "rebalance")
    assert b.mover.calls[-1] == ("rebalance", "uniform", "admin rebalance")
    _ask(b, "drain", {"node": "b"})
    assert b.mover.calls[-1] == ("drain", "b", "admin drain")
    msg = _ask(b, "slow", {"node": "b", "factor": 3})
    assert msg["data"] == {"node": "b", "factor": 3.0} and b.slowed == [("b", 3.0)]
    # the history shows in status, newest last, at most 20
    for _ in range(25):
        _ask(b, "drain", {"node": "b"})
    st = _ask(b, "status")["data"]
    assert len(st["reallocations"]) == 20 and st["reallocations"][-1]["reason"] == "admin drain"
    text = admin_cli.format_status(st)
    assert "REASON" in text and "a[0-5]" in text and "b[0-5]" in text and "12.30" in text


def test_move_failure_and_bad_args(monkeypatch: pytest.MonkeyPatch) -> None:
    b = FakeBroker({"a": 10.0, "b": 10.0})
    b.place(uniform(["a", "b"], 6))
    b.mover.fail = "node b did not confirm the KV transfer in 60 s; rolled back"
    msg = _ask(b, "move", {"layers": "0-1", "to": "b"})
    assert msg.kind == "error" and msg["code"] == "move_failed"
    assert "rolled back" in msg["message"]
    bad = [("move", {"layers": "4-9", "to": "a"}, "out of range: the model has 6 layers"),
           ("move", {"layers": "x", "to": "a"}, "layers must look like"),
           ("move", {"layers": "1-2", "to": "zz"}, "unknown node 'zz'"),
           ("move", {"layers": "1-2"}, "to must be a non-empty string"),
           ("move", {"layers": "1-2", "to": "a", "x": 1}, "takes args layers, to"),
           ("drain", {"node": "q"}, "unknown node"),
           ("slow", {"node": "a", "factor": 0}, "factor must be a number > 0"),
           ("slow", {"node": "a", "factor": float("nan")}, "factor must be"),
           ("slow", {"node": "a", "factor": "2"}, "factor must be"),
           ("rebalance", {"strategy": "best"}, "strategy must be one of"),
           ("status", {"x": 1}, "takes no args")]
    for op, args, text in bad:
        msg = _ask(b, op, args)
        assert msg.kind == "error" and msg["code"] == "bad_request", (op, args)
        assert text in msg["message"], (op, msg["message"])


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="zpipe")
    admin_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["admin", *argv])


def test_cli_validates_args(capsys: pytest.CaptureFixture) -> None:
    a = _parse("move", "--layers", "3-5", "--to", "n1")
    assert (a.layers, a.to) == ("3-5", "n1")
    assert _parse("slow", "n0", "--factor", "2.5").factor == 2.5
    assert _parse("plan", "--strategy", "mixed", "--json").strategy == "mixed"
    assert _parse("drain", "n2").node == "n2"
    assert _parse("rebalance").strategy is None
    for argv, text in [(["move", "--layers", "5-3", "--to", "n1"], "ends before it starts"),
                       (["move", "--layers", "a-b", "--to", "n1"], "layers must look like"),
                       (["move", "--layers", "1-2"], "required: --to"),
                       (["slow", "n0", "--factor", "0"], "must be > 0"),
                       (["slow", "n0", "--factor", "nan"], "must be > 0"),
                       (["slow", "n0"], "required: --factor"),
                       (["plan", "--strategy", "fast"], "invalid choice"),
                       (["drain", "bad name"], "not a node name")]:
        with pytest.raises(SystemExit):
            _parse(*argv)
        assert text in capsys.readouterr().err, argv


def test_format_record() -> None:
    rec = {"time": 1.0, "reason": "admin move", "before": [{"node": "a", "start": 0, "end": 6}],
           "after": [{"node": "a", "start": 0, "end": 3}, {"node": "b", "start": 3, "end": 6}],
           "kv_bytes": 2_000_000, "pause_s": 0.05, "ok": True, "error": None}
    text = admin_cli.format_record(rec)
    assert "admin move: ok" in text and "a[0-2] b[3-5]" in text
    assert "KV moved 2.0 MB, pause 50.00 ms" in text
    assert admin_cli.format_record({"node": "a", "factor": 2.0}) == json.dumps(
        {"node": "a", "factor": 2.0})
    assert "failed: boom" in admin_cli.format_reallocations([{**rec, "ok": False,
                                                              "error": "boom"}])


# --------------------------------------------------------------------------- a real cluster
def _cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    args = _parse(*argv)
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def moving_cluster(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    from conftest import start_cluster

    rc = start_cluster(tiny_model, tmp_path_factory.mktemp("rebalance"),
                       [{"name": n, "threads": 1} for n in ("n0", "n1", "n2")])
    yield rc
    rc.cluster.stop()


def _generate(rc, n: int = 24) -> list[int]:
    async def go() -> list[int]:
        async with rc.client() as client:
            return (await client.generate(prompt_ids=[1, 2, 3, 4], max_new_tokens=n,
                                          ignore_eos=True)).token_ids
    return asyncio.run(go())


def test_admin_cli_on_a_real_cluster(moving_cluster, capsys: pytest.CaptureFixture) -> None:
    rc = moving_cluster
    addr = ["--broker", rc.address]
    ref = _generate(rc)
    code, out, err = _cli(capsys, "plan", "--strategy", "compute", *addr)
    assert code == 0 and "proposed (compute)" in out and "n2" in out, err
    code, out, _ = _cli(capsys, "plan", "--json", *addr)
    d = json.loads(out)
    assert d["current"]["stages"][0]["measured_s"] > 0  # it generated: n0 was measured
    code, out, err = _cli(capsys, "move", "--layers", "2-2", "--to", "n0", *addr)
    assert code == 0 and "admin move: ok" in out and "n0[0-2]" in out, err
    assert _generate(rc) == ref
    code, out, err = _cli(capsys, "slow", "n1", "--factor", "3", *addr)
    assert code == 0, err
    code, out, err = _cli(capsys, "drain", "n1", *addr)
    assert code == 0 and "admin drain: ok" in out, err
    assert _generate(rc) == ref
    code, out, _ = _cli(capsys, "status", "--json", *addr)
    st = json.loads(out)
    assert [s["node"] for s in st["placement"]["stages"]] == ["n0", "n2"]
    reasons = [r["reason"] for r in st["reallocations"]]
    assert reasons[-2:] == ["admin move", "admin drain"]
    assert all(r["ok"] and r["kv_bytes"] >= 0 and r["pause_s"] >= 0
               for r in st["reallocations"][-2:])
    code, out, err = _cli(capsys, "rebalance", "--strategy", "uniform", *addr)
    assert code == 0 and "admin rebalance: ok" in out, err  # n1 (drained) gets layers back
    code, out, _ = _cli(capsys, "status", *addr)
    assert "admin rebalance" in out and "n1[" in out
    assert _generate(rc) == ref
    code, out, err = _cli(capsys, "move", "--layers", "0-5", "--to", "nobody", *addr)
    assert code == 1 and "unknown node 'nobody'" in err


# --------------------------------------------------------------------------- AutoRebalancer
SPEC30 = SimpleNamespace(**{**vars(SPEC), "num_layers": 30})


def _auto(gflops: dict[str, float], stages: list[StageAssignment],
          sessions: int = 1) -> tuple[FakeBroker, AutoRebalancer]:
    b = FakeBroker(gflops, rebalance={"enabled": True, "min_tokens": 8, "cooldown_s": 0})
    b.spec = SPEC30
    b.place(stages)
    b.sessions = {f"s{i}": None for i in range(sessions)}
    return b, AutoRebalancer(b, b.mover, b.rebalancer)


def _measure(b: FakeBroker, per_layer: dict[str, float], tokens: int = 8) -> None:
    """Decode compute per token as the nodes would report it: per layer × what they hold."""
    cost = rebalance.model_cost(b)
    for st in b.placement.stages:
        t = per_layer[st.node] * cost.layer_equivalents(st.end - st.start, st.end == 30)
        b.measured[st.node].extend([t] * tokens)


def _layers(b: FakeBroker) -> dict[str, int]:
    return {st.node: st.end - st.start for st in b.placement.stages}


SLOW_B = {"a": 0.001, "b": 0.003, "c": 0.001}


def test_plans_from_measured_times_and_keeps_a_move_that_measured_faster() -> None:
    # The start-up prior says b is the fastest node; its measured steps say 3x slower.
    b, auto = _auto({"a": 10.0, "b": 40.0, "c": 10.0}, uniform(["a", "b", "c"], 30))
    _measure(b, SLOW_B, tokens=7)
    assert asyncio.run(auto.check(1.0)) is None  # min_tokens not reached
    _measure(b, SLOW_B, tokens=1)
    record = asyncio.run(auto.check(2.0))
    assert record is not None and record["reason"].startswith("performance: ")
    assert "b 3.0 ms" in record["reason"] and "capped: b" in record["reason"]
    assert _layers(b).get("b", 0) < 10 and sum(_layers(b).values()) == 30
    # the new placement measures as predicted: kept; b, left with nothing, is not re-added
    _measure(b, SLOW_B)
    assert asyncio.run(auto.check(3.0)) is None and auto.pending is None
    _measure(b, SLOW_B)
    assert asyncio.run(auto.check(4.0)) is None
    assert len(b.mover.calls) == 1


def test_undoes_a_move_that_made_things_slower_and_does_not_repeat_it() -> None:
    b, auto = _auto({"a": 10.0, "b": 10.0, "c": 10.0}, uniform(["a", "b", "c"], 30))
    before = list(b.placement.stages)
    _measure(b, SLOW_B)
    assert asyncio.run(auto.check(1.0)) is not None
    moved = list(b.placement.stages)
    assert _layers(b) == {"a": 15, "c": 15}
    # the prediction was wrong: a, given 15 layers, runs each 3x slower (c as before)
    _measure(b, {**SLOW_B, "a": 0.003})
    record = asyncio.run(auto.check(2.0))
    assert record is not None and record["reason"].startswith("undo: ")
    assert "per token measured over 8 tokens after the move" in record["reason"]
    assert "x 1.00 load change" in record["reason"]
    assert b.placement.stages == before
    # measured as before on the old placement: the same plan again, refused this time
    _measure(b, SLOW_B)
    assert asyncio.run(auto.check(3.0)) is None
    assert [c[0] for c in b.mover.calls] == ["transition", "transition"]
    assert b.mover.calls[0][1] == moved and b.mover.calls[1][1] == before


def test_never_gives_a_slowed_node_more_layers() -> None:
    """The prior made b 10x faster than a and c; it measures as fast as a: slower than the plan
    assumed. c is 4x slower: layers must move. A plan on the measurements alone gives b more
    than its 10 layers; the move gives them to a."""
    b, auto = _auto({"a": 10.0, "b": 100.0, "c": 10.0}, uniform(["a", "b", "c"], 30),
                    sessions=16)
    per_layer = {"a": 0.001, "b": 0.001, "c": 0.004}
    _measure(b, per_layer)
    uncapped = rebalance.plan_for_broker(b, "compute", perf_weight=1.0, concurrency=16)[1]
    assert uncapped.layers()["b"][1] - uncapped.layers()["b"][0] > 10
    asyncio.run(auto.check(1.0))
    assert len(b.mover.calls) == 1 and "capped: b" in b.mover.calls[0][-1]
    assert _layers(b)["b"] <= 10
    # b is then slower again than that plan assumed: it does not grow on later re-plans either
    held = _layers(b)["b"]
    for t in range(4):
        _measure(b, {**per_layer, "b": 0.0015})
        asyncio.run(auto.check(2.0 + t))
        assert _layers(b).get("b", 0) <= held


def test_figures_of_idle_nodes_follow_the_load() -> None:
    """An admin move put every layer on c; then the machine got 40% busier: c measures 1.4 ms
    per layer where it measured 1 ms. a, idle since, measured 1 ms back then: scaled by c's
    drift it is 1.4 ms, so no move chases its stale figure."""
    b, auto = _auto({"a": 10.0, "b": 10.0, "c": 10.0}, uniform(["a", "b", "c"], 30))
    auto.cfg.min_gain = 0.99  # measure only
    _measure(b, SLOW_B)
    assert asyncio.run(auto.check(1.0)) is None
    b.switch([StageAssignment("c", 0, 30)])
    busier = {n: 1.4 * t for n, t in SLOW_B.items()}
    _measure(b, busier)
    auto.cfg.min_gain = 0.15
    assert asyncio.run(auto.check(2.0)) is None
    assert auto.per_layer() == pytest.approx(busier)
    assert not b.mover.calls


def test_a_busier_machine_does_not_undo_a_move() -> None:
    """After the move every node is 1.8x slower per layer (the machine got busier): the time per
    token is worse than before the move, but not the placement: kept."""
    b, auto = _auto({"a": 10.0, "b": 10.0, "c": 10.0}, uniform(["a", "b", "c"], 30))
    _measure(b, SLOW_B)
    asyncio.run(auto.check(1.0))
    before_s = 0.010 + 0.030 + 0.001 * rebalance.model_cost(b).layer_equivalents(10, True)
    _measure(b, {n: 1.8 * t for n, t in SLOW_B.items()})
    after_s = sum(statistics.median(v) for v in b.measured.values())
    assert after_s > before_s
    assert asyncio.run(auto.check(2.0)) is None and auto.pending is None
    assert auto.load_change(rebalance.Pending(b.placement.epoch, [], 0, 0, 1)) == 1.0  # no nodes
    assert len(b.mover.calls) == 1
