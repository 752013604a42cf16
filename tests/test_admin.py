"""``zpipe admin`` against a real 3-stage cluster: real figures after real generations."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import pytest
from conftest import free_port, generating
from test_metrics import parse_prometheus

from zpipe.cli import admin as admin_cli
from zpipe.cli.admin import AdminClient, AdminError
from zpipe.cli.main import build_parser
from zpipe.metrics import breakdown
from zpipe.shard import ModelSpec

NODES = ["n0", "n1", "n2"]


def cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """Run ``zpipe admin ...`` through the parser the ``zpipe`` command uses."""
    args = build_parser().parse_args(["admin", *argv])
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def run(tiny_model: Path, clusters):
    """A 3-stage cluster that has just generated 24 tokens; yields (cluster, generation)."""
    rc = clusters.get(tiny_model, 3)

    async def gen():
        async with rc.client() as client:
            return await client.generate(prompt_ids=[1, 2, 3, 4], max_new_tokens=24,
                                         ignore_eos=True)

    g = asyncio.run(gen())
    assert len(g.token_ids) == 24
    return rc, g


def test_client_timings_add_up(run) -> None:
    _, g = run
    assert len(g.timings) == 24
    gaps = []
    for t in g.timings:
        assert [s[0] for s in t["stages"]] == NODES
        assert all(c > 0 and h >= 0 for _, c, h in t["stages"])
        gaps.append(t["step_s"] - sum(c + h for _, c, h in t["stages"]))
    # stage compute + hop time is the step, less what the broker spends between hops (how
    # little that is depends on the machine's load: not checked here)
    assert all(-1e-5 <= gap < t["step_s"] for gap, t in zip(gaps, g.timings, strict=True)), \
        gaps  # timings are rounded to 1 µs
    b = breakdown(g.timings)
    assert list(b["nodes"]) == NODES and b["step"]["count"] == 23
    assert all(b["nodes"][n]["compute"]["p50"] > 0 for n in NODES)
    assert b["overhead"]["p99"] >= 0


def test_status_has_real_figures(run, tiny_model: Path) -> None:
    rc, _ = run
    spec = ModelSpec.load(tiny_model)
    with AdminClient(rc.address) as c:
        deadline = time.monotonic() + 60
        while True:  # rss and kv come with the nodes' heartbeats (every second)
            st = c.request("status")
            if all(n["rss"] > 0 for n in st["nodes"]) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert st["ready"] and st["num_layers"] == spec.num_layers
    assert [s["node"] for s in st["placement"]["stages"]] == NODES
    assert st["placement"]["epoch"] >= 1
    layers = []
    for n, stage in zip(st["nodes"], st["placement"]["stages"], strict=True):
        assert n["name"] == stage["node"] and n["state"] == "ready"
        assert n["pid"] > 0 and n["host"] and n["device"] == "cpu"
        assert 0 <= n["heartbeat_age_s"] < 5
        assert n["rss"] > 0 and n["mem_used"] > 0 and n["mem_free"] > 0
        assert n["weight_bytes"] > 0
        assert n["layers"] == [stage["start"], stage["end"]]
        layers += range(*n["layers"])
        assert n["heads"] == "all" and n["kv_heads"] == spec.num_kv_heads
        assert n["tokens"] >= 24
        assert 0 < n["compute"]["p50"] <= n["compute"]["p99"]
        assert n["hop"]["p50"] is not None and n["prefill"]["compute"]["p50"] > 0
    assert layers == list(range(spec.num_layers))
    o = st["overall"]
    assert o["tokens_total"] >= 24 and o["tokens_per_s"] > 0
    assert o["step"]["p50"] > 0 and o["ttft"]["p50"] > 0 and o["prefill"]["p50"] > 0
    assert o["sessions_finished"].get("length", 0) >= 1
    assert 0 <= o["overhead"]["p50"] < o["step"]["p50"]  # the stages account for the step
    # the per-node decode compute + hop medians make up about the step median
    parts = sum(n["compute"]["p50"] + n["hop"]["p50"] for n in st["nodes"])
    assert parts == pytest.approx(o["step"]["p50"], rel=0.5)


def test_sessions_while_generating(run) -> None:
    rc, _ = run

    async def go() -> list:
        async with rc.client() as client:
            task = await generating(client, tokens=10, prompt_ids=[7, 8],
                                    max_new_tokens=1000, ignore_eos=True)
            with AdminClient(rc.address) as c:
                rows = (await asyncio.to_thread(c.request, "sessions"))["sessions"]
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task  # sends the cancel
            for _ in range(1000):  # the broker frees the session asynchronously
                if (await client.info())["sessions"] == 0:
                    break
                await asyncio.sleep(0.02)
            return rows

    rows = asyncio.run(go())
    assert len(rows) == 1
    s = rows[0]
    assert s["prompt_tokens"] == 2 and s["tokens"] >= 10 and s["state"] == "running"
    assert s["tokens_per_s"] > 0 and s["age_s"] > 0 and s["ttft_s"] > 0
    assert s["step_p50_s"] > 0


def test_metrics_text_has_per_node_series(run) -> None:
    rc, _ = run
    with AdminClient(rc.address) as c:
        data = c.request("metrics")
    samples = parse_prometheus(data["text"])
    assert samples["zpipe_tokens_total"][0][1] >= 24
    assert samples["zpipe_ready"] == [("", 1.0)]
    for name in NODES:
        q = dict(samples["zpipe_node_compute_seconds"])
        assert q[f'{{node="{name}",quantile="0.5"}}'] > 0
        assert q[f'{{node="{name}",quantile="0.99"}}'] > 0
        assert dict(samples["zpipe_node_hop_seconds_count"])[f'{{node="{name}"}}'] >= 23
        assert dict(samples["zpipe_node_up"])[f'{{node="{name}"}}'] == 1
        assert dict(samples["zpipe_node_weight_bytes"])[f'{{node="{name}"}}'] > 0
    assert dict(samples["zpipe_step_seconds"])['{quantile="0.5"}'] > 0
    assert data["nodes"]["n0"]["compute"]["p50"] > 0


def test_profile_covers_every_part(run, tiny_model: Path) -> None:
    rc, _ = run
    spec = ModelSpec.load(tiny_model)
    with AdminClient(rc.address, timeout=20) as c:
        d = c.request("profile", {"tokens": 8})
    names = [r["part"] for r in d["parts"]]
    assert names == (["embed"] + [f"layer.{i}" for i in range(spec.num_layers)]
                     + ["norm", "lm_head"])
    assert d["complete"] and d["tokens"] == 8
    assert all(r["prefill_s"] > 0 and r["decode_s"] > 0 for r in d["parts"])
    assert [r["node"] for r in d["parts"]][:2] == ["n0", "n0"]
    assert [r["node"] for r in d["parts"]][-1] == "n2"
    assert sum(r["decode_share"] for r in d["parts"]) == pytest.approx(1.0, abs=1e-3)
    assert [n["node"] for n in d["nodes"]] == NODES
    assert all(n["ok"] and n["weight_bytes"] > 0 and n["rss"] > 0 for n in d["nodes"])


def test_cli_commands(run, capsys: pytest.CaptureFixture) -> None:
    rc, _ = run
    addr = ["--broker", rc.address]
    code, out, _ = cli(capsys, "status", "--json", *addr)
    assert code == 0 and json.loads(out)["ready"] is True
    code, out, _ = cli(capsys, "status", *addr)
    assert code == 0 and "placement epoch" in out and "COMPUTE p50 ms" in out
    assert all(n in out for n in NODES)
    code, out, _ = cli(capsys, "nodes", "--json", *addr)
    assert [n["name"] for n in json.loads(out)["nodes"]] == NODES
    code, out, _ = cli(capsys, "sessions", *addr)
    assert code == 0 and out.strip() == "no sessions running"
    code, out, _ = cli(capsys, "metrics", *addr)
    assert code == 0 and 'zpipe_node_compute_seconds{node="n1",quantile="0.99"}' in out
    code, out, _ = cli(capsys, "metrics", "--json", *addr)
    assert json.loads(out)["overall"]["tokens_total"] >= 24
    code, out, _ = cli(capsys, "profile", "--tokens", "4", *addr)
    assert code == 0 and "lm_head" in out and "layer.0" in out and "total" in out
    code, out, _ = cli(capsys, "watch", "--count", "2", "--interval", "0.05", *addr)
    assert code == 0 and out.count(admin_cli.CLEAR) == 2 and "n2" in out


def test_bad_op_and_args(run) -> None:
    rc, _ = run
    with AdminClient(rc.address) as c:
        with pytest.raises(AdminError, match="bad_request"):
            c.request("reboot")
        with pytest.raises(AdminError, match="bad_request.*tokens"):
            c.request("profile", {"tokens": -1})


def test_broker_down(capsys: pytest.CaptureFixture) -> None:
    addr = f"tcp://127.0.0.1:{free_port()}"
    code, out, err = cli(capsys, "status", "--broker", addr, "--timeout", "0.3")
    assert code == 1 and out == ""
    assert f"no answer from broker at {addr} in 0.3 s" in err


def test_profile_reports_a_silent_node() -> None:
    """A node that does not answer in time gets a row saying so, it is not dropped."""
    from brokers import admin
    from zpipe.placement import StageAssignment

    async def go() -> dict:
        loop = asyncio.get_running_loop()
        stages = [StageAssignment("a", 0, 2), StageAssignment("b", 2, 4)]
        futs = {"a": loop.create_future(), "b": loop.create_future()}
        futs["a"].set_result({"parts": [["embed", 0.1, 0.01], ["layer.0", 0.2, 0.02],
                                        ["layer.1", 0.3, 0.03]],
                              "weight_bytes": 10, "kv_bytes": 0, "rss": 5})
        return admin.merge(stages, futs, 8, 10.0)

    d = asyncio.run(go())
    assert not d["complete"]
    assert [r["part"] for r in d["parts"]] == ["embed", "layer.0", "layer.1", "layers 2-3"]
    assert d["parts"][-1]["error"] == "no answer in 10 s" and d["parts"][-1]["node"] == "b"
    assert d["nodes"][1] == {"node": "b", "start": 2, "end": 4, "ok": False,
                             "error": "no answer in 10 s"}
    assert d["total"]["decode_s"] == pytest.approx(0.06)
    assert "no answer in 10 s" in admin_cli.format_profile(d)
