"""Without a KV shadow: a dead node's layers go to a neighbour, which rebuilds their KV from
what it sent on (the first stage's: from the tokens) in one batched pass, while the other
nodes keep theirs; the session replays only its step in flight, with the tokens of a run
that lost nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import start_cluster
from test_e2e_failover import SLOW_HEARTBEAT
from test_e2e_liveness import GEN, _proc, _state, _status, _wait

K = 25  # the victim dies as this token reaches the client


def _run(rc, victim: str, sessions: int = 1) -> tuple[dict, dict]:
    async def run() -> tuple[dict, dict]:
        proc = _proc(rc, f"node-{victim}")
        async with rc.client() as client:
            prompts = [dict(GEN, prompt_ids=[*GEN["prompt_ids"], i]) for i in range(sessions)]
            reference = [await client.generate(max_new_tokens=60, **p) for p in prompts]

            def on_token(chunk) -> None:
                if chunk.index == K - 1:
                    proc.kill()

            got = await asyncio.wait_for(asyncio.gather(
                client.generate(max_new_tokens=60, on_token=on_token, **prompts[0]),
                *[client.generate(max_new_tokens=60, **p) for p in prompts[1:]]), 90)
            assert [g.token_ids for g in got] == [r.token_ids for r in reference]
            info = await _wait(client, lambda i: i["ready"] and _state(i, victim) == "dead")
        return info, _status(rc)["reallocations"][-1]

    return asyncio.run(run())


def _log(rc, name: str) -> str:
    return (rc.cluster.log_dir / f"node-{name}.log").read_text(errors="replace")


@pytest.mark.parametrize(("victim", "holder", "kept", "direct"),
                         [("b", "a", "c", False), ("a", "b", "c", False),
                          ("c", "b", "a", True)])
def test_a_killed_node_is_rebuilt_by_its_neighbour(tiny_model: Path, tmp_path: Path,
                                                  victim: str, holder: str, kept: str,
                                                  direct: bool) -> None:
    """Real processes, 3 nodes, no shadows; the victim is SIGKILLed mid-generation. The node
    before it (the first's: the one after) takes its layers and rebuilds their KV; the other
    survivor keeps its own; the session replays at most its step in flight."""
    rc = start_cluster(tiny_model, tmp_path, [{"name": n, "threads": 1} for n in "abc"],
                       heartbeat=SLOW_HEARTBEAT, direct=direct,
                       recovery={"wait_s": 30, "shadow_every": 0})
    try:
        info, record = _run(rc, victim)
        layers = {st["node"]: (st["start"], st["end"]) for st in info["placement"]}
        assert set(layers) == {"a", "b", "c"} - {victim}
        assert layers[holder][1] - layers[holder][0] > layers[kept][1] - layers[kept][0]
        assert record["ok"] and record["sessions"] == 1
        assert record["restored"] == "rebuild" and record["rebuild_sessions"] == 1
        assert record["rebuilt_rows"] >= K and record["kv_bytes"] > 0
        assert 0 <= record["replay_tokens"] <= 1 < K
        assert "1 sessions kept, 0 from shadows" in _log(rc, kept)
        assert "rebuilt the KV of layers" in _log(rc, holder)
    finally:
        rc.cluster.stop()


def test_a_session_the_neighbour_has_no_inputs_for_replays_from_its_prompt(
        tiny_model: Path, tmp_path: Path) -> None:
    """Node a keeps no output log: b's death is rebuilt for no session, and the session
    replays from its prompt instead, with the same tokens."""
    rc = start_cluster(tiny_model, tmp_path,
                       [{"name": "a", "threads": 1, "output_log_mb": 0},
                        *({"name": n, "threads": 1} for n in "bc")],
                       heartbeat=SLOW_HEARTBEAT, recovery={"wait_s": 30, "shadow_every": 0})
    try:
        _, record = _run(rc, "b")
        assert record["ok"] and record["restored"] == "replay"
        assert record["rebuild_sessions"] == 0 and record["replay_tokens"] >= K
    finally:
        rc.cluster.stop()
