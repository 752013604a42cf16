"""A failed send to a node is proof that it died: the broker declares it dead at once and the
sessions recover (they wait, the model is placed again, they replay) with the same tokens."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zmq
from conftest import free_port, start_cluster
from test_broker_cohorts import _close, _frames, _hidden_result, _next, _pump, _serving_stages
from test_e2e_liveness import GEN, _proc, _state, _status, _wait

from zpipe import protocol
from zpipe.cli.up import Cluster
from zpipe.client import Client
from zpipe.config import ClusterConfig, dump, validate

# Heartbeats too slow to find the dead node within a test: only a failed send can.
SLOW_HEARTBEAT = {"interval_s": 1.0, "liveness": 60}


def _gone(sock: zmq.Socket, monitor: zmq.Socket) -> None:
    """Close a node's socket and return once the broker's socket has seen it disconnect."""
    sock.close(0)
    assert monitor.poll(5000), "the broker's socket never saw the node go"
    monitor.recv_multipart()


def test_a_step_that_cannot_be_sent_to_a_dead_node_is_replayed(tiny_model: Path) -> None:
    """Node b's connection is gone when stage 0's answer is to be forwarded to it: b is dead
    at once, a takes every layer and rebuilds b's KV from what it sent on, and the session
    replays only its step in flight and goes on."""
    async def run() -> None:
        broker, (a, b), client = await _serving_stages(
            tiny_model, {"a": (0, 3), "b": (3, 6)}, recovery={"wait_s": 0.1})
        monitor = broker.sock.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            await broker.handle(_frames(protocol.encode(
                "generate", rid="r1", prompt_ids=[5, 6, 7], max_new_tokens=3)))
            await asyncio.sleep(0)
            (s,) = broker.sessions.values()
            hidden = torch.zeros(3, broker.spec.hidden_size)
            for stage_1_answer in (42, None):
                step = await _next(a, "step")
                a.send_multipart(_hidden_result(step, hidden[:step["rows"][0][3]]))
                if stage_1_answer is None:
                    break
                await _pump(broker, lambda: s.stage == 1)
                step = await _next(b, "step")
                b.send_multipart(protocol.encode(
                    "result", epoch=step["epoch"], stage=1, compute_s=0.001,
                    rows=[[s.sid, 0, 3]], tokens=[[stage_1_answer, -0.1]]))
                await _pump(broker, lambda: s.tokens == [42] and s.in_flight)
                _gone(b, monitor)  # b dies while step 1 is at a
            await _pump(broker, lambda: broker.steps.parked == [s])  # waits, not ended
            assert broker.registry.by_name["b"].state == "dead" and not s.in_flight
            restore = await _next(a, "restore")  # b's layers to a, rebuilt there
            assert (restore["start"], restore["end"], restore["rebuild"]) == (0, 6, [3, 6])
            assert restore["sessions"] == [[s.sid, 3]] and restore["prompts"] == [3]
            a.send_multipart(protocol.encode(
                "loaded", epoch=restore["epoch"], start=0, end=6, weight_bytes=1, load_s=0.1,
                missing=[], rebuilt_rows=3, rebuild_s=0.01, restored_bytes=100))
            await _pump(broker, lambda: broker.ready)
            sent = []
            for token in (43, 44):  # from the step in flight on (the KV before it kept)
                step = await _next(a, "step")
                sent.append(step.tensors["x"].tolist())
                a.send_multipart(protocol.encode(
                    "result", epoch=step["epoch"], stage=0, compute_s=0.001,
                    rows=[[sid, st, n] for sid, st, _, n in step["rows"]],
                    tokens=[[token, -0.1]]))
                await _pump(broker, lambda: s.step >= len(sent) + 1
                            or s.sid not in broker.sessions)
            assert sent == [[42], [43]]
            items = []
            while len(items) < 3:
                items += (await _next(client, "tokens"))["items"]
            assert [i["token_id"] for i in items] == [42, 43, 44]
            assert (await _next(client, "done"))["finish_reason"] == "length"
            (record,) = broker.mover.history
            assert record["ok"] and record["reason"] == \
                "recovery: node b is dead (a send to it failed)"
            assert (record["restored"], record["rebuild_sessions"], record["rebuilt_rows"],
                    record["kv_bytes"], record["replay_tokens"]) == ("rebuild", 1, 3, 100, 0)
        finally:
            broker.sock.sock.disable_monitor()
            monitor.close(0)
            _close(broker, a, client)

    asyncio.run(run())


@pytest.mark.parametrize("k", [1, 7, 40])
def test_a_killed_node_is_found_by_a_failed_send_and_no_token_changes(
        tiny_model: Path, tmp_path: Path, k: int) -> None:
    """Real processes, 3 nodes; node b is SIGKILLed as the session's k-th token reaches the
    client (its next step then goes to a, then to b). Heartbeats would take a minute to miss
    b: the broker's failed send finds it, a and c take its layers, and the session ends with
    exactly the tokens of a run that lost nothing."""
    rc = start_cluster(tiny_model, tmp_path, [{"name": n, "threads": 1} for n in "abc"],
                       heartbeat=SLOW_HEARTBEAT, recovery={"wait_s": 0.2})
    try:
        async def run() -> None:
            victim = _proc(rc, "node-b")
            async with rc.client() as client:
                reference = await client.generate(max_new_tokens=60, **GEN)

                def on_token(chunk) -> None:
                    if chunk.index == k - 1:
                        victim.kill()

                got = await asyncio.wait_for(
                    client.generate(max_new_tokens=60, on_token=on_token, **GEN), 60)
                assert got.token_ids == reference.token_ids
                info = await _wait(client, lambda i: i["ready"] and _state(i, "b") == "dead")
                assert [st["node"] for st in info["placement"]] == ["a", "c"]
            record = _status(rc)["reallocations"][-1]
            assert record["ok"] and record["sessions"] == 1
            # Whichever comes first: the broker's monitor seeing b's connection close, or a
            # send to b that cannot be routed.
            assert (record["seen_by"], record["reason"]) in {
                ("disconnect", "recovery: node b is dead (its connection closed)"),
                ("failed_send", "recovery: node b is dead (a send to it failed)")}
            assert 0 <= record["silent_s"] < 30

        asyncio.run(run())
    finally:
        rc.cluster.stop()


def test_an_idle_node_killed_is_seen_by_its_connection_closing(tiny_model: Path,
                                                               tmp_path: Path) -> None:
    """No session runs and heartbeats are a minute apart: nothing is sent to node b, yet its
    death is seen as soon as its connection closes, and the others serve the model."""
    rc = start_cluster(tiny_model, tmp_path, [{"name": n, "threads": 1} for n in "abc"],
                       heartbeat={"interval_s": 60.0, "liveness": 60},
                       recovery={"wait_s": 0.2})
    try:
        async def run() -> None:
            async with rc.client() as client:
                reference = await client.generate(max_new_tokens=20, **GEN)
                _proc(rc, "node-b").kill()
                info = await _wait(client, lambda i: i["ready"] and _state(i, "b") == "dead",
                                   timeout=30)
                assert [st["node"] for st in info["placement"]] == ["a", "c"]
                again = await client.generate(max_new_tokens=20, **GEN)
                assert again.token_ids == reference.token_ids
            said = (tmp_path / "broker.log").read_text()
            assert "node b is dead: its connection closed" in said

        asyncio.run(run())
    finally:
        rc.cluster.stop()


def test_a_node_that_cannot_pass_a_step_on_makes_the_next_one_dead(tiny_model: Path) -> None:
    """Under direct routing node a says it cannot reach the next stage's node: b is declared
    dead and the session waits for a placement instead of ending."""
    async def run() -> None:
        broker, (a, b), client = await _serving_stages(
            tiny_model, {"a": (0, 3), "b": (3, 6)}, recovery={"wait_s": 30})
        try:
            await broker.handle(_frames(protocol.encode(
                "generate", rid="r1", prompt_ids=[5, 6, 7], max_new_tokens=3)))
            await asyncio.sleep(0)
            (s,) = broker.sessions.values()
            step = await _next(a, "step")
            a.send_multipart(protocol.error("peer_unreachable", "a: cannot pass the step on",
                                            sid=s.sid, step=0, epoch=step["epoch"]))
            await _pump(broker, lambda: broker.steps.parked == [s])
            assert broker.registry.by_name["b"].state == "dead"
            assert broker.registry.by_name["a"].state != "dead" and s.sid in broker.sessions
            assert broker.recovery.recovering.reason == \
                "node b is dead (node a could not pass it a step)"
        finally:
            _close(broker, a, b, client)

    asyncio.run(run())


def test_zpipe_up_starts_a_killed_node_again_and_serves_on(tiny_model: Path,
                                                            tmp_path: Path) -> None:
    """Under ``zpipe up`` node b is SIGKILLed mid-session: the session ends with the tokens of
    a run that lost nothing, ``up`` starts b again (it registers anew) and keeps serving, and
    SIGTERM stops it all."""
    address = f"tcp://127.0.0.1:{free_port()}"
    path = tmp_path / "cluster.yaml"
    dump(validate({"model": str(tiny_model), "broker": {"bind": address,
                                                        "recovery": {"wait_s": 0.2}},
                   "nodes": [{"name": n, "threads": 1} for n in "abc"]}, ClusterConfig), path)
    with open(tmp_path / "up.err", "wb") as err:
        up = subprocess.Popen([sys.executable, "-m", "zpipe.cli.main", "up", str(path), "--logs",
                               str(tmp_path / "logs")], stdout=subprocess.DEVNULL, stderr=err,
                              start_new_session=True)
    pids: list[int] = []
    try:
        async def run() -> None:
            async with Client(address) as client:
                info = await _wait(client, lambda i: i["ready"], timeout=120)
                pids.extend(n["pid"] for n in info["nodes"])
                b = next(n["pid"] for n in info["nodes"] if n["name"] == "b")
                reference = await client.generate(max_new_tokens=40, **GEN)

                def on_token(chunk) -> None:
                    if chunk.index == 4:
                        os.kill(b, signal.SIGKILL)

                got = await asyncio.wait_for(
                    client.generate(max_new_tokens=40, on_token=on_token, **GEN), 60)
                assert got.token_ids == reference.token_ids
                info = await _wait(client, lambda i: any(
                    n["name"] == "b" and n["pid"] != b and n["state"] != "dead"
                    for n in i["nodes"]), timeout=120)
                pids.extend(n["pid"] for n in info["nodes"])
                assert info["ready"] and up.poll() is None
                again = await client.generate(max_new_tokens=40, **GEN)
                assert again.token_ids == reference.token_ids

        asyncio.run(run())
        up.send_signal(signal.SIGTERM)
        assert up.wait(30) == 0
        said = (tmp_path / "up.err").read_text()
        assert "node-b (exit -9) stopped; started it again" in said
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)  # it stops its children
            try:
                up.wait(30)
            except subprocess.TimeoutExpired:
                up.kill()
                for pid in pids:  # the nodes it could not stop
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass


def test_zpipe_up_restarts_a_child_at_most_so_often(tiny_model: Path, tmp_path: Path) -> None:
    """A child that exits is started again, with the same command and config, but no more than
    ``restarts_per_minute`` times in any minute."""
    cfg = validate({"model": str(tiny_model), "broker": {"bind": f"tcp://127.0.0.1:{free_port()}"},
                    "nodes": [{"name": "x", "threads": 1}]}, ClusterConfig)
    cluster = Cluster(cfg, tmp_path, restarts_per_minute=2)
    cluster.start()
    try:
        def kill_x() -> int:
            proc = dict(cluster.procs)["node-x"]
            proc.kill()
            proc.wait()
            return proc.pid

        assert cluster.restart_exited(0.0) == ([], [])
        pids = [kill_x()]
        assert cluster.restart_exited(0.0) == (["node-x (exit -9)"], [])
        pids.append(kill_x())
        assert cluster.restart_exited(30.0) == (["node-x (exit -9)"], [])
        pids.append(kill_x())
        assert cluster.restart_exited(59.0) == ([], ["node-x (exit -9)"])  # 2 within a minute
        assert cluster.restart_exited(61.0) == (["node-x (exit -9)"], [])  # the first is past
        assert dict(cluster.procs)["node-x"].pid not in pids
        assert dict(cluster.procs)["broker"].poll() is None
        # While starting, a child that exits on its own (an error, not a signal) is left exited.
        pids.append(kill_x())
        failed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
        failed.wait()
        cluster.procs = [(n, failed if n == "node-x" else p) for n, p in cluster.procs]
        assert cluster.restart_exited(200.0, killed_only=True) == ([], ["node-x (exit 3)"])
    finally:
        cluster.stop()
