"""Reallocations that fail part-way roll back; performance-driven moves fix a slow node."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RunningCluster, generating, start_cluster

from zpipe.cli.admin import AdminClient, AdminError

GEN = {"prompt_ids": [3, 1, 4, 1, 5, 9, 2, 6], "ignore_eos": True}


def _admin(rc: RunningCluster, op: str, **args) -> dict:
    with AdminClient(rc.address, timeout=60) as admin:
        return admin.request(op, args)


def _spawn_spare(rc: RunningCluster, name: str) -> subprocess.Popen:
    cfg = rc.cluster.log_dir / f"node-{name}.yaml"
    cfg.write_text((rc.cluster.log_dir / "node-a.yaml").read_text().replace("name: a",
                                                                         f"name: {name}"))
    log = open(rc.cluster.log_dir / f"node-{name}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "zpipe.cli.main", "node", "-c", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    rc.cluster.procs.append((f"node-{name}", proc))
    return proc


async def _wait_node(rc: RunningCluster, name: str) -> None:
    async with rc.client() as client:
        for _ in range(600):
            info = await client.info()
            if any(n["name"] == name and n["state"] != "dead" for n in info["nodes"]):
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"node {name} never registered")


@pytest.mark.parametrize("how", ["dies", "times_out"])
def test_failed_move_rolls_back_and_sessions_continue(tiny_model: Path, tmp_path: Path,
                                                      how: str) -> None:
    """The destination freezes during the move: declared dead (or the move times out).

    The spare is frozen just before the move is asked for; it is declared dead 3 s later
    ("dies": the move, which waits for it with a 30 s limit, ends then) or never (the move's
    2 s limit ends it). 3 s leaves the admin request room to arrive first on a loaded machine;
    a shorter window let the spare be dead before the move began ("not alive")."""
    heartbeat = ({"interval_s": 0.5, "liveness": 6} if how == "dies"
                 else {"interval_s": 1.0, "liveness": 30})
    rc = start_cluster(tiny_model, tmp_path, [{"name": n, "threads": 1} for n in "ab"],
                       heartbeat=heartbeat, move_timeout_s=30.0 if how == "dies" else 2.0)
    try:
        spare = _spawn_spare(rc, "spare")
        asyncio.run(_wait_node(rc, "spare"))
        before = _admin(rc, "status")["placement"]

        async def run() -> tuple:
            async with rc.client() as client:
                reference = await client.generate(max_new_tokens=300, **GEN)
                running = await generating(client, max_new_tokens=300, **GEN)
                spare.send_signal(signal.SIGSTOP)
                with pytest.raises(AdminError) as err:
                    await asyncio.to_thread(_admin, rc, "move", layers="2-3", to="spare")
                return reference, await running, err.value

        reference, result, err = asyncio.run(run())
        assert "rolled back" in str(err)
        assert ("died" in str(err)) if how == "dies" else ("timed out" in str(err))
        assert result.token_ids == reference.token_ids  # no session lost, nothing changed
        status = _admin(rc, "status")
        assert status["placement"]["stages"] == before["stages"]
        last = status["reallocations"][-1]
        assert not last["ok"] and last["error"]
    finally:
        spare.send_signal(signal.SIGCONT)
        rc.cluster.stop()


def test_performance_driven_move_away_from_a_slow_node(tiny_model: Path, tmp_path: Path) -> None:
    rc = start_cluster(tiny_model, tmp_path, [{"name": n, "threads": 1} for n in "abc"],
                       rebalance={"enabled": True, "strategy": "compute", "min_tokens": 16,
                                  "cooldown_s": 1.0, "check_interval_s": 0.5})
    try:
        _admin(rc, "slow", node="b", factor=6.0)

        def moves() -> list:
            return [r for r in _admin(rc, "status")["reallocations"]
                    if r["reason"].startswith("performance")]

        async def run() -> tuple:
            async with rc.client() as client:
                reference = await client.generate(max_new_tokens=20, **GEN)
                # At most 600 tokens; once the move is done, 20 more show the session going on.
                ids, moved_at = [], None
                async for chunk in client.stream(max_new_tokens=600, **GEN):
                    ids.append(chunk.token_id)
                    if moved_at is None and len(ids) % 25 == 0 and await asyncio.to_thread(moves):
                        moved_at = len(ids)
                    if moved_at is not None and len(ids) >= moved_at + 20:
                        break
            return reference, ids, moved_at

        reference, ids, moved_at = asyncio.run(run())
        status = _admin(rc, "status")
        done = [r for r in status["reallocations"] if r["reason"].startswith("performance")]
        assert moved_at is not None and done and done[0]["ok"], status["reallocations"]
        held = {s["node"]: s["end"] - s["start"] for s in status["placement"]["stages"]}
        assert held.get("b", 0) < 2  # the slow node was left with less than its third
        assert ids[:20] == reference.token_ids and len(ids) >= moved_at + 20
    finally:
        rc.cluster.stop()
