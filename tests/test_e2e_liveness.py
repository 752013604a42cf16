"""Heartbeats with real processes: frozen and killed nodes, spare nodes, broker restarts."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import RunningCluster, generating, start_cluster

from zpipe.cli.admin import AdminClient, AdminError
from zpipe.client import Client, ZpipeError

INTERVAL, LIVENESS = 0.2, 3
DEAD_AFTER = INTERVAL * LIVENESS
MARGIN = 3.0  # scheduling slack on a loaded 2-core machine
GEN = {"prompt_ids": [4, 5, 6, 7], "ignore_eos": True}


def _start(model: Path, log_dir: Path, names: list[str], **broker: object) -> RunningCluster:
    return start_cluster(model, log_dir, [{"name": n, "threads": 1} for n in names],
                         heartbeat={"interval_s": INTERVAL, "liveness": LIVENESS}, **broker)


def _proc(rc: RunningCluster, name: str) -> subprocess.Popen:
    return dict(rc.cluster.procs)[name]


def _respawn(rc: RunningCluster, name: str, command: str) -> None:
    """Start a child again from the config file ``zpipe up`` wrote for it."""
    log = open(rc.cluster.log_dir / f"{name}.restarted.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "zpipe.cli.main", command, "-c",
         str(rc.cluster.log_dir / f"{name}.yaml")], stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    rc.cluster.procs = [(n, p) for n, p in rc.cluster.procs if n != name] + [(name, proc)]


async def _wait(client: Client, pred, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            info = await client.info(timeout=1.0)
            if pred(info):
                return info
        except ZpipeError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not met in {timeout} s")


def _status(rc: RunningCluster) -> dict:
    with AdminClient(rc.address, timeout=10) as admin:
        return admin.request("status", {})


def _state(info: dict, name: str) -> str:
    return next(n["state"] for n in info["nodes"] if n["name"] == name)


async def _interrupt_and_recover(rc: RunningCluster) -> None:
    """Recovery off: the running session ends with node_dead, the broker waits for the node."""
    victim = _proc(rc, "node-b")
    async with rc.client() as client:
        reference = await client.generate(max_new_tokens=30, **GEN)
        long = await generating(client, max_new_tokens=1500, **GEN)
        t0 = time.monotonic()
        victim.kill()
        with pytest.raises(ZpipeError) as err:
            await long
        took = time.monotonic() - t0
        assert err.value.code == "node_dead" and "node b" in err.value.message
        assert took < DEAD_AFTER + INTERVAL + MARGIN, f"noticed after {took:.2f} s"
        info = await client.info()
        assert _state(info, "b") == "dead" and not info["ready"]
        with pytest.raises(ZpipeError) as refused:
            await client.generate(max_new_tokens=4, **GEN)
        assert refused.value.code == "no_placement" and "b" in refused.value.message
        _respawn(rc, "node-b", "node")
        await _wait(client, lambda i: i["ready"])
        again = await client.generate(max_new_tokens=30, **GEN)
        assert again.token_ids == reference.token_ids


async def _lose_b_and_go_on(rc: RunningCluster, freeze: bool) -> None:
    """Recovery on (the default): the session waits, the survivors take b's layers, it replays
    its tokens and ends with exactly the tokens of a run that lost no node."""
    victim = _proc(rc, "node-b")
    async with rc.client() as client:
        reference = await client.generate(max_new_tokens=250, **GEN)
        long = await generating(client, max_new_tokens=250, **GEN)
        assert not long.done()
        t0 = time.monotonic()
        victim.send_signal(signal.SIGSTOP if freeze else signal.SIGKILL)
        await _wait(client, lambda i: _state(i, "b") == "dead", timeout=10)
        assert time.monotonic() - t0 < DEAD_AFTER + INTERVAL + MARGIN
        got = await asyncio.wait_for(long, 60)
        assert got.token_ids == reference.token_ids
        info = await client.info()
        assert info["ready"] and [st["node"] for st in info["placement"]] == ["a", "c"]
        record = _status(rc)["reallocations"][-1]
        assert record["ok"] and record["reason"].startswith("recovery: node b is dead")
        # b's layers come back from its shadow or its neighbour's inputs, never a full replay
        assert record["sessions"] == 1 and record["restored"] in ("shadow", "rebuild")
        if freeze:
            victim.send_signal(signal.SIGCONT)  # it hears it was declared dead and re-registers
        else:
            _respawn(rc, "node-b", "node")
        await _wait(client, lambda i: _state(i, "b") == "registered")  # a spare now
        again = await client.generate(max_new_tokens=30, **GEN)
        assert again.token_ids == reference.token_ids[:30]


@pytest.mark.parametrize("freeze", [True, False], ids=["frozen", "killed"])
def test_a_dead_node_s_sessions_go_on(tiny_model: Path, tmp_path: Path, freeze: bool) -> None:
    rc = _start(tiny_model, tmp_path, ["a", "b", "c"])
    try:
        asyncio.run(_lose_b_and_go_on(rc, freeze))
    finally:
        if freeze:
            os.kill(_proc(rc, "node-b").pid, signal.SIGCONT)
        rc.cluster.stop()


def test_an_idle_pipeline_that_loses_a_node_serves_on(tiny_model: Path, tmp_path: Path) -> None:
    """No session runs: the nodes alive still take the dead node's layers, so new requests
    are served instead of refused until it comes back."""
    rc = _start(tiny_model, tmp_path, ["a", "b", "c"])
    try:
        async def run() -> None:
            async with rc.client() as client:
                reference = await client.generate(max_new_tokens=20, **GEN)
                _proc(rc, "node-c").kill()
                await _wait(client, lambda i: _state(i, "c") == "dead" and i["ready"])
                info = await client.info()
                assert [st["node"] for st in info["placement"]] == ["a", "b"]
                assert (await client.generate(max_new_tokens=20, **GEN)).token_ids == \
                    reference.token_ids

        asyncio.run(run())
    finally:
        rc.cluster.stop()


def test_a_node_that_dies_during_a_move_rolls_it_back_and_sessions_go_on(
        tiny_model: Path, tmp_path: Path) -> None:
    """Node b freezes as its layers are being moved to c: the move rolls back, b is declared
    dead, a and c take its layers and the running session replays and ends exactly."""
    rc = _start(tiny_model, tmp_path, ["a", "b", "c"])
    try:
        def move() -> dict:
            with AdminClient(rc.address, timeout=60) as admin:
                return admin.request("move", {"layers": "2-3", "to": "c"})

        async def run() -> None:
            async with rc.client() as client:
                reference = await client.generate(max_new_tokens=250, **GEN)
                long = await generating(client, max_new_tokens=250, **GEN)
                _proc(rc, "node-b").send_signal(signal.SIGSTOP)
                t0 = time.monotonic()
                with pytest.raises(AdminError) as err:
                    await asyncio.to_thread(move)
                assert "rolled back" in str(err.value)
                assert time.monotonic() - t0 < DEAD_AFTER + INTERVAL + MARGIN
                assert (await asyncio.wait_for(long, 60)).token_ids == reference.token_ids
                info = await client.info()
                assert [st["node"] for st in info["placement"]] == ["a", "c"]
                reasons = [r["reason"] for r in _status(rc)["reallocations"]]
                assert reasons[-2].startswith("admin") and reasons[-1].startswith("recovery")

        asyncio.run(run())
    finally:
        os.kill(_proc(rc, "node-b").pid, signal.SIGCONT)
        rc.cluster.stop()


def test_without_recovery_a_killed_node_ends_its_sessions(tiny_model: Path,
                                                          tmp_path: Path) -> None:
    rc = _start(tiny_model, tmp_path, ["a", "b", "c"], recovery={"enabled": False})
    try:
        asyncio.run(_interrupt_and_recover(rc))
    finally:
        rc.cluster.stop()


def test_the_only_node_restarted_resumes_its_sessions(tiny_model: Path, tmp_path: Path) -> None:
    """No node is left to take over: the sessions wait for the node to come back, then replay."""
    rc = _start(tiny_model, tmp_path, ["a"])
    try:
        async def run() -> None:
            async with rc.client() as client:
                reference = await client.generate(max_new_tokens=600, **GEN)
                sessions = [await generating(client, max_new_tokens=600, **GEN) for _ in range(2)]
                _proc(rc, "node-a").kill()
                info = await _wait(client, lambda i: _state(i, "a") == "dead", timeout=10)
                assert "2 sessions wait to go on" in info["waiting_for"]
                _respawn(rc, "node-a", "node")
                for task in sessions:
                    assert (await asyncio.wait_for(task, 60)).token_ids == reference.token_ids

        asyncio.run(run())
    finally:
        rc.cluster.stop()


def test_sessions_end_when_no_placement_comes_in_time(tiny_model: Path, tmp_path: Path) -> None:
    rc = _start(tiny_model, tmp_path, ["a"], recovery={"timeout_s": 2.0})
    try:
        async def run() -> None:
            async with rc.client() as client:
                long = await generating(client, max_new_tokens=1500, **GEN)
                _proc(rc, "node-a").kill()
                t0 = time.monotonic()
                with pytest.raises(ZpipeError) as err:
                    await asyncio.wait_for(long, 30)
                assert err.value.code == "node_dead"
                assert err.value.message.startswith("node a is dead (")  # a failed send, or silence
                assert "no placement within 2 s: waiting for node(s) a" in err.value.message
                assert 2.0 <= time.monotonic() - t0 < 2.0 + DEAD_AFTER + 1.0 + MARGIN
                record = _status(rc)["reallocations"][-1]
                assert not record["ok"] and record["error"] == err.value.message

        asyncio.run(run())
    finally:
        rc.cluster.stop()


def test_spare_node_death_does_not_touch_sessions(tiny_model: Path, tmp_path: Path) -> None:
    """A registered node outside the placement dies mid-generation: nobody notices but admin."""
    rc = _start(tiny_model, tmp_path, ["a", "b", "c"])
    try:
        spare_cfg = tmp_path / "node-spare.yaml"
        spare_cfg.write_text((tmp_path / "node-c.yaml").read_text().replace("name: c",
                                                                           "name: spare"))
        _respawn(rc, "node-spare", "node")

        async def run() -> None:
            async with rc.client() as client:
                await _wait(client, lambda i: any(n["name"] == "spare" for n in i["nodes"]))
                reference = await client.generate(max_new_tokens=150, **GEN)
                running = await generating(client, max_new_tokens=150, **GEN)
                _proc(rc, "node-spare").kill()
                info = await _wait(client, lambda i: _state(i, "spare") == "dead")
                assert info["ready"]
                assert (await running).token_ids == reference.token_ids

        asyncio.run(run())
    finally:
        rc.cluster.stop()


def test_broker_restart_nodes_register_again(tiny_model: Path, tmp_path: Path) -> None:
    rc = _start(tiny_model, tmp_path, ["a", "b"])
    try:
        async def run() -> None:
            async with Client(rc.address, heartbeat_s=INTERVAL, liveness=LIVENESS) as client:
                reference = await client.generate(max_new_tokens=20, **GEN)
                long = await generating(client, max_new_tokens=1500, **GEN)
                broker = _proc(rc, "broker")
                broker.send_signal(signal.SIGSTOP)  # a hung broker: the client must not hang
                t0 = time.monotonic()
                with pytest.raises(ZpipeError) as err:
                    await long
                assert err.value.code == "broker_gone"
                assert time.monotonic() - t0 < DEAD_AFTER + INTERVAL + MARGIN
                broker.kill()
                broker.wait()
                _respawn(rc, "broker", "broker")
                await _wait(client, lambda i: i["ready"])
                again = await client.generate(max_new_tokens=20, **GEN)
                assert again.token_ids == reference.token_ids

        asyncio.run(run())
    finally:
        rc.cluster.stop()


def test_smollm2_sessions_lose_a_node_and_keep_their_tokens(smollm2: Path, tmp_path: Path) -> None:
    """The real model, 4 sessions at once, activations node to node (``direct``): node b is
    killed mid-generation; a and c take its layers, the sessions replay and every one ends
    with exactly the tokens of the run that lost nothing."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2)
    prompts = [tok(p).input_ids for p in ("Water boils at", "The three laws of motion are",
                                          "In 1492, Columbus", "A good breakfast includes")]
    rc = _start(smollm2, tmp_path, ["a", "b", "c"], direct=True)
    try:
        async def run() -> None:
            async with rc.client() as client:
                def gens(on_token=None) -> list:
                    return [asyncio.create_task(client.generate(
                        prompt_ids=p, max_new_tokens=48, ignore_eos=True,
                        on_token=on_token if i == 0 else None)) for i, p in enumerate(prompts)]
                reference = [g.token_ids for g in await asyncio.gather(*gens())]
                halfway = asyncio.Event()
                tasks = gens(lambda chunk: chunk.index >= 16 and halfway.set())
                await asyncio.wait_for(halfway.wait(), 120)
                _proc(rc, "node-b").kill()
                got = await asyncio.wait_for(asyncio.gather(*tasks), 300)
                assert [g.token_ids for g in got] == reference
                info = await client.info()
                assert [st["node"] for st in info["placement"]] == ["a", "c"]

        asyncio.run(run())
    finally:
        rc.cluster.stop()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_sessions_lose_a_node_and_go_on(tiny_model: Path, tmp_path: Path) -> None:
    """GPU nodes (static KV pool slots, CUDA graphs): node b dies mid-generation, the sessions
    replay on a and c and finish. Batched bf16/fp32 GPU decode rounds by batch shape, so a
    replayed token may come out differently; the tokens the client has stand either way."""
    rc = start_cluster(tiny_model, tmp_path, [
        {"name": n, "device": "cuda:0", "dtype": "bfloat16"} for n in ("a", "b", "c")],
        heartbeat={"interval_s": INTERVAL, "liveness": LIVENESS})
    try:
        async def run() -> None:
            async with rc.client() as client:
                halfway = asyncio.Event()
                tasks = [asyncio.create_task(client.generate(
                    prompt_ids=[4 + i, 5, 6], max_new_tokens=300, ignore_eos=True,
                    on_token=(lambda c: c.index >= 100 and halfway.set()) if i == 0 else None))
                    for i in range(4)]
                await asyncio.wait_for(halfway.wait(), 120)
                _proc(rc, "node-b").kill()
                got = await asyncio.wait_for(asyncio.gather(*tasks), 300)
                assert all(len(g.token_ids) == 300 for g in got)
                record = _status(rc)["reallocations"][-1]
                assert record["ok"] and record["sessions"] == 4
                assert [st["node"] for st in (await client.info())["placement"]] == ["a", "c"]

        asyncio.run(run())
    finally:
        rc.cluster.stop()
