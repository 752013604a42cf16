"""KV shadows: a node's new K/V rows reach the node that would take its layers; when it dies,
that node takes them from the shadow, the survivors keep their KV, and sessions replay only
the rows after the shadow's last, with the tokens of a run that lost nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import start_cluster
from test_e2e_failover import SLOW_HEARTBEAT
from test_e2e_liveness import GEN, _proc, _state, _status, _wait

EVERY = 4


@pytest.mark.parametrize(("victim", "holder", "kept", "direct"),
                         [("b", "c", "a", False), ("c", "b", "a", False), ("b", "c", "a", True)])
def test_a_killed_node_is_restored_from_its_shadow(tiny_model: Path, tmp_path: Path,
                                                    victim: str, holder: str, kept: str,
                                                    direct: bool) -> None:
    """Real processes, 3 nodes, shadows every 4 rows (activations through the broker, or node
    to node); the victim is SIGKILLed as the 25th token reaches the client. Its holder (the
    next stage's node; the last stage's: the one before) takes its layers and their KV from
    the shadow, the other survivor keeps its KV, and the session replays at most a shadow's
    batch of rows, not its 28 rows of context."""
    k = 25
    rc = start_cluster(tiny_model, tmp_path, [{"name": n, "threads": 1} for n in "abc"],
                       heartbeat=SLOW_HEARTBEAT, direct=direct,
                       recovery={"wait_s": 30, "shadow_every": EVERY})
    try:
        async def run() -> None:
            proc = _proc(rc, f"node-{victim}")
            async with rc.client() as client:
                reference = await client.generate(max_new_tokens=60, **GEN)

                def on_token(chunk) -> None:
                    if chunk.index == k - 1:
                        proc.kill()

                got = await asyncio.wait_for(
                    client.generate(max_new_tokens=60, on_token=on_token, **GEN), 60)
                assert got.token_ids == reference.token_ids
                info = await _wait(client, lambda i: i["ready"] and _state(i, victim) == "dead")
            layers = {st["node"]: (st["start"], st["end"]) for st in info["placement"]}
            assert set(layers) == {"a", "b", "c"} - {victim}
            assert layers[holder][1] - layers[holder][0] > layers[kept][1] - layers[kept][0]
            record = _status(rc)["reallocations"][-1]
            assert record["ok"] and record["sessions"] == 1
            assert record["restored"] == "shadow" and record["shadow_sessions"] == 1
            # the rows since the last shadow, and the step in flight: not the whole context
            assert 0 <= record["replay_tokens"] <= EVERY + 1 < k
            log = (rc.cluster.log_dir / f"node-{kept}.log").read_text(errors="replace")
            assert "1 sessions kept, 0 from shadows" in log  # its KV stayed, no free
            log = (rc.cluster.log_dir / f"node-{holder}.log").read_text(errors="replace")
            assert "1 sessions kept, 1 from shadows" in log

        asyncio.run(run())
    finally:
        rc.cluster.stop()


def test_the_holder_dying_later_is_restored_from_the_shadows_made_since(
        tiny_model: Path, tmp_path: Path) -> None:
    """b is SIGKILLed at the 15th token and c, which took b's layers, at the 35th: after the
    first restore every node sends its holder all its rows again, so a takes every layer and
    their KV from c's new shadow; the tokens are those of a run that lost nothing."""
    rc = start_cluster(tiny_model, tmp_path, [{"name": n, "threads": 1} for n in "abc"],
                       heartbeat=SLOW_HEARTBEAT,
                       recovery={"wait_s": 30, "shadow_every": EVERY})
    try:
        async def run() -> None:
            kills = {14: _proc(rc, "node-b"), 34: _proc(rc, "node-c")}
            async with rc.client() as client:
                reference = await client.generate(max_new_tokens=60, **GEN)

                def on_token(chunk) -> None:
                    if chunk.index in kills:
                        kills[chunk.index].kill()

                got = await asyncio.wait_for(
                    client.generate(max_new_tokens=60, on_token=on_token, **GEN), 60)
                assert got.token_ids == reference.token_ids
                info = await _wait(client, lambda i: i["ready"] and _state(i, "c") == "dead")
            assert [(st["node"], st["start"], st["end"]) for st in info["placement"]] == \
                [("a", 0, 6)]
            records = _status(rc)["reallocations"][-2:]
            assert [r["restored"] for r in records] == ["shadow", "shadow"]
            assert all(r["ok"] and 0 <= r["replay_tokens"] <= EVERY + 1 for r in records)

        asyncio.run(run())
    finally:
        rc.cluster.stop()
