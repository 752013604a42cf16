"""Stages split across node processes by KV-head groups give transformers' greedy tokens.

Real broker and node processes: the members of a split stage each get every step from the
broker and add their partials over their own sockets; the first member answers.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import start_cluster
from test_e2e_exact import PROMPTS, reference
from test_e2e_failover import SLOW_HEARTBEAT
from test_e2e_liveness import _proc, _state, _status, _wait

from zpipe.cli.admin import AdminClient, AdminError, format_plan, format_status
from zpipe.config import ClusterConfig, load

NEW_TOKENS = 64


async def _generate_ids(rc, prompt_ids: list[int], n: int = NEW_TOKENS) -> list[int]:
    async with rc.client() as client:
        gen = await client.generate(prompt_ids=prompt_ids, max_new_tokens=n, ignore_eos=True)
    return gen.token_ids


@pytest.fixture(scope="module")
def heads_cluster(smollm2: Path, tmp_path_factory):
    """configs/heads.yaml's layout: a plain stage, then one split over two nodes by heads."""
    cfg = load(Path(__file__).parent.parent / "configs" / "heads.yaml", ClusterConfig)
    nodes = [n.model_dump(exclude_none=True, mode="json") for n in cfg.nodes]
    for n in nodes:
        n["layers"] = f"{n['layers'][0]}-{n['layers'][1] - 1}"
        if "heads" in n:
            n["heads"] = f"{n['heads'][0]}-{n['heads'][1] - 1}"
    rc = start_cluster(smollm2, tmp_path_factory.mktemp("heads2"), nodes)
    yield rc
    rc.cluster.stop()


def test_smollm2_split_two_ways_after_a_plain_stage(smollm2: Path, heads_cluster) -> None:
    rc = heads_cluster
    assert rc.info["placement"] == [
        {"node": "a", "start": 0, "end": 15},
        {"node": "b", "start": 15, "end": 30, "heads": [["b", 0, 2], ["c", 2, 3]]}]
    for prompt in PROMPTS[:2]:
        prompt_ids, want = reference(str(smollm2), prompt)
        got = asyncio.run(_generate_ids(rc, prompt_ids))
        assert got[:len(want)] == want, prompt


def test_admin_shows_head_groups(heads_cluster) -> None:
    with AdminClient(heads_cluster.address, timeout=30) as admin:
        status = admin.request("status")
        nodes = {n["name"]: n for n in admin.request("nodes")["nodes"]}
        plan = admin.request("plan", {"strategy": "custom"})
    assert [(n, nodes[n]["layers"], nodes[n]["heads"], nodes[n]["kv_heads"],
             nodes[n]["num_heads"]) for n in "abc"] == [
        ("a", [0, 15], "all", 3, 9), ("b", [15, 30], "0-1", 2, 6), ("c", [15, 30], "2", 1, 3)]
    assert "a[0-14] b[15-29 h0-1]+c[15-29 h2]" in format_status(status)
    assert plan["proposed"]["stages"][1]["heads"] == [["b", 0, 2], ["c", 2, 3]]
    assert "b+c" in format_plan(plan)


async def _generate_with_moves(rc, prompt_ids: list[list[int]], moves: list[dict],
                               every: int = 12) -> tuple[list[list[int]], list[dict]]:
    """Generate for the prompts together; each ``every`` tokens of the first, one head move."""
    reached = [asyncio.Event() for _ in moves]

    def on_token(chunk) -> None:
        for i, ev in enumerate(reached):
            if chunk.index + 1 >= every * (i + 1):
                ev.set()

    def move(args: dict) -> dict:
        with AdminClient(rc.address, timeout=120) as admin:
            return admin.request("move", args)

    async with rc.client() as client:
        tasks = [asyncio.create_task(client.generate(
            prompt_ids=p, max_new_tokens=NEW_TOKENS, ignore_eos=True,
            on_token=on_token if i == 0 else None)) for i, p in enumerate(prompt_ids)]
        records = []
        for ev, args in zip(reached, moves, strict=True):
            await asyncio.wait_for(ev.wait(), 300)
            records.append(await asyncio.to_thread(move, args))
        gens = await asyncio.gather(*tasks)
    return [g.token_ids for g in gens], records


def test_head_moves_mid_generation(smollm2: Path, heads_cluster) -> None:
    """KV head 2 goes from c to b (the stage is whole on b), then heads 1-2 from b to c (split
    again, the other way): two sessions running throughout keep transformers' tokens. Then c
    is drained: its heads go back to b."""
    rc = heads_cluster
    prompts = [reference(str(smollm2), p) for p in PROMPTS[:2]]
    moves = [{"layers": "15-29", "heads": "2", "to": "b"},
             {"layers": "15-29", "heads": "1-2", "to": "c"}]
    got, records = asyncio.run(_generate_with_moves(rc, [p for p, _ in prompts], moves))
    for (_, want), ids in zip(prompts, got, strict=True):
        assert ids[:len(want)] == want
    assert [r["after"][1] for r in records] == [
        {"node": "b", "start": 15, "end": 30},
        {"node": "b", "start": 15, "end": 30, "heads": [["b", 0, 1], ["c", 1, 3]]}]
    for r, heads in zip(records, ([2, 2], [1, 2]), strict=True):
        assert r["ok"] and r["kv_bytes"] > 0
        assert r["transfers"][0]["heads"] == heads and r["transfers"][0]["layers"] == [15, 29]
    with AdminClient(rc.address, timeout=60) as admin:
        nodes = {n["name"]: n for n in admin.request("nodes")["nodes"]}
        with pytest.raises(AdminError, match="another stage"):
            admin.request("move", {"layers": "15-29", "heads": "0", "to": "a"})
    assert (nodes["b"]["heads"], nodes["c"]["heads"]) == ("0", "1-2")
    # a drain of a member gives its heads to the member before it
    with AdminClient(rc.address, timeout=120) as admin:
        record = admin.request("drain", {"node": "c"})
    assert record["after"][1] == {"node": "b", "start": 15, "end": 30}
    prompt_ids, want = prompts[0]
    assert asyncio.run(_generate_ids(rc, prompt_ids))[:len(want)] == want


@pytest.mark.parametrize(("victim", "holder"), [("b", "c"), ("c", "b")])
def test_a_killed_member_is_restored_from_its_shadow(smollm2: Path, tmp_path: Path,
                                                     victim: str, holder: str) -> None:
    """configs/heads.yaml's layout with KV shadows every 4 rows: a member of the split stage
    (b, which answers for it, or c) is SIGKILLed as the 25th token reaches the client. The
    other member takes its KV heads and their KV from the shadow (the stage is whole on it),
    keeping its own heads' KV; node a keeps all of its KV; the session replays only the rows
    since the last shadow and ends with transformers' tokens."""
    k = 25
    nodes = [{"name": "a", "layers": "0-14", "threads": 1},
             {"name": "b", "layers": "15-29", "heads": "0-1", "threads": 1},
             {"name": "c", "layers": "15-29", "heads": "2", "threads": 1}]
    rc = start_cluster(smollm2, tmp_path, nodes, heartbeat=SLOW_HEARTBEAT,
                       recovery={"wait_s": 30, "shadow_every": 4})
    prompt_ids, want = reference(str(smollm2), PROMPTS[0])
    try:
        async def run() -> dict:
            proc = _proc(rc, f"node-{victim}")

            def on_token(chunk) -> None:
                if chunk.index == k - 1:
                    proc.kill()

            async with rc.client() as client:
                got = await asyncio.wait_for(client.generate(
                    prompt_ids=prompt_ids, max_new_tokens=NEW_TOKENS, ignore_eos=True,
                    on_token=on_token), 300)
                assert got.token_ids[:len(want)] == want
                return await _wait(client, lambda i: i["ready"] and _state(i, victim) == "dead")

        info = asyncio.run(run())
        assert info["placement"] == [{"node": "a", "start": 0, "end": 15},
                                     {"node": holder, "start": 15, "end": 30}]
        record = _status(rc)["reallocations"][-1]
        assert record["ok"] and record["restored"] == "shadow"
        assert record["shadow_sessions"] == 1 and 0 <= record["replay_tokens"] <= 5 < k
        log = (rc.cluster.log_dir / "node-a.log").read_text(errors="replace")
        assert "1 sessions kept, 0 from shadows" in log  # a's KV stayed
        log = (rc.cluster.log_dir / f"node-{holder}.log").read_text(errors="replace")
        assert "1 sessions kept, 1 from shadows" in log
    finally:
        rc.cluster.stop()


def test_smollm2_split_three_ways(smollm2: Path, tmp_path: Path) -> None:
    """One stage of every layer (embedding and lm_head too) over three nodes, a KV head each."""
    nodes = [{"name": f"h{i}", "layers": "0-29", "heads": str(i)} for i in range(3)]
    rc = start_cluster(smollm2, tmp_path, nodes)
    try:
        prompt_ids, want = reference(str(smollm2), PROMPTS[2])
        got = asyncio.run(_generate_ids(rc, prompt_ids))
        assert got[:len(want)] == want
    finally:
        rc.cluster.stop()


def test_tiny_split_first_stage(tiny_model: Path, tmp_path: Path) -> None:
    """The tiny model's two KV heads split over two nodes in the first stage, a plain one
    after; several sessions at once run as batches at every member."""
    nodes = [{"name": "p", "layers": "0-2", "heads": "0"},
             {"name": "q", "layers": "0-2", "heads": "1"}, {"name": "r", "layers": "3-5"}]
    rc = start_cluster(tiny_model, tmp_path, nodes)
    prompts = [[1, 15, 300, 42, 9], [7], [3, 1, 4, 1, 5, 9, 2, 6]]

    async def all_at_once() -> list[list[int]]:
        return list(await asyncio.gather(*(_generate_ids(rc, p, 32) for p in prompts)))

    try:
        got = asyncio.run(all_at_once())
    finally:
        rc.cluster.stop()
    for p, ids in zip(prompts, got, strict=True):
        assert ids == _tiny_reference(tiny_model, p, 32), p


def _tiny_reference(model: Path, prompt: list[int], n: int) -> list[int]:
    import torch
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()
