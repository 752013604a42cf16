"""Layers move between live nodes mid-generation; greedy tokens stay exactly the unmoved ones."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import RunningCluster, start_cluster
from transformers import AutoTokenizer

from zpipe.cli.admin import AdminClient

NEW_TOKENS = 64
PROMPTS = ["The history of the printing press begins", "Water boils at",
           "The three laws of motion are", "In 1492, Columbus", "A good breakfast includes",
           "Once upon a time, in a small village,", "To install Python packages, you can use",
           "Photosynthesis is the process by which plants"]


@pytest.fixture(scope="module")
def cluster(smollm2: Path, tmp_path_factory: pytest.TempPathFactory):
    rc = start_cluster(smollm2, tmp_path_factory.mktemp("moves"),
                       [{"name": n, "threads": 1} for n in ("a", "b", "c")])
    yield rc
    rc.cluster.stop()


@pytest.fixture(scope="module")
def prompt_ids(smollm2: Path) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(smollm2)
    return [tok(p).input_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(cluster: RunningCluster, prompt_ids: list[list[int]]) -> list[list[int]]:
    """The unmoved tokens, all prompts at once (batched rows equal alone ones on the CPU:
    test_e2e_concurrency)."""
    async def run() -> list[list[int]]:
        async with cluster.client() as client:
            gens = await asyncio.gather(*[client.generate(
                prompt_ids=p, max_new_tokens=NEW_TOKENS, ignore_eos=True) for p in prompt_ids])
        return [g.token_ids for g in gens]
    return asyncio.run(run())


def _admin(rc: RunningCluster, op: str, **args) -> dict:
    with AdminClient(rc.address, timeout=120) as admin:
        return admin.request(op, args)


def _placement(rc: RunningCluster) -> list[tuple[str, int, int]]:
    data = _admin(rc, "status")
    return [(s["node"], s["start"], s["end"]) for s in data["placement"]["stages"]]


async def _generate_with_move(rc: RunningCluster, prompts: list[list[int]], op: str,
                              args: dict, after_tokens: int = 20) -> tuple[list, dict]:
    """Run the prompts together; once the first has ``after_tokens`` tokens, reallocate."""
    started = asyncio.Event()

    def on_token(chunk) -> None:
        if chunk.index + 1 >= after_tokens:
            started.set()

    async with rc.client() as client:
        tasks = [asyncio.create_task(client.generate(
            prompt_ids=p, max_new_tokens=NEW_TOKENS, ignore_eos=True,
            on_token=on_token if i == 0 else None)) for i, p in enumerate(prompts)]
        await asyncio.wait_for(started.wait(), 120)
        record = await asyncio.to_thread(_admin, rc, op, **args)
        gens = await asyncio.gather(*tasks)
    assert all(len(g.token_ids) == NEW_TOKENS for g in gens)
    return [g.token_ids for g in gens], record


def _check_record(record: dict, before: list, after: list) -> None:
    assert record["ok"], record
    # KV over the wire, or from the destination's shadow of the source (every 8 rows)
    assert record["kv_bytes"] + record.get("kv_shadow_bytes", 0) > 0 and record["pause_s"] > 0
    assert before != after


def _start_at(rc: RunningCluster, stages: list[tuple[str, int, int]]) -> None:
    """Bring the cluster to ``stages`` (distinct nodes, in pipeline order) with no session
    running, whatever placement an earlier test left: every layer to the first node, then
    each later stage's layers onward to its node."""
    if _placement(rc) == stages:
        return
    end = stages[-1][2]
    for node, start, _ in stages:
        if [st for st in _placement(rc) if st[2] > start] != [(node, start, end)]:
            _admin(rc, "move", layers=f"{start}-{end - 1}", to=node)
    assert _placement(rc) == stages


START = [("a", 0, 10), ("b", 10, 20), ("c", 20, 30)]


def test_one_layer_move(cluster: RunningCluster, prompt_ids, reference) -> None:
    _start_at(cluster, START)
    tokens, record = asyncio.run(_generate_with_move(cluster, prompt_ids[:1], "move",
                                                     {"layers": "9-9", "to": "b"}))
    after = _placement(cluster)
    assert after == [("a", 0, 9), ("b", 9, 20), ("c", 20, 30)]
    _check_record(record, START, after)
    # b holds a's KV shadow (KV shadows are on by default): the rows it has do not travel
    assert record["kv_shadow_bytes"] > 0
    assert tokens == reference[:1]


def test_ten_layer_move_reorders_nothing_is_lost(cluster: RunningCluster, prompt_ids,
                                                 reference) -> None:
    before = [("a", 0, 9), ("b", 9, 20), ("c", 20, 30)]
    _start_at(cluster, before)
    tokens, record = asyncio.run(_generate_with_move(
        cluster, prompt_ids[1:2], "move", {"layers": "20-29", "to": "b"}))
    after = _placement(cluster)
    assert after == [("a", 0, 9), ("b", 9, 30)]
    _check_record(record, before, after)
    assert tokens == reference[1:2]


def test_rebalance_brings_back_the_idle_node(cluster: RunningCluster, prompt_ids,
                                            reference) -> None:
    """Node c holds nothing; a rebalance gives it layers again."""
    before = [("a", 0, 9), ("b", 9, 30)]
    _start_at(cluster, before)
    tokens, record = asyncio.run(_generate_with_move(
        cluster, prompt_ids[2:3], "rebalance", {"strategy": "uniform"}))
    after = _placement(cluster)
    assert sorted(n for n, _, _ in after) == ["a", "b", "c"]
    _check_record(record, before, after)
    assert tokens == reference[2:3]


def test_drain(cluster: RunningCluster, prompt_ids, reference) -> None:
    _start_at(cluster, START)
    tokens, record = asyncio.run(_generate_with_move(cluster, prompt_ids[3:4], "drain",
                                                     {"node": "b"}))
    after = _placement(cluster)
    assert after == [("a", 0, 20), ("c", 20, 30)]  # b's layers to its neighbour before it
    _check_record(record, START, after)
    assert tokens == reference[3:4]
    # The drained node comes back at the head of the pipeline: the stage order changes.
    tokens, record = asyncio.run(_generate_with_move(cluster, prompt_ids[4:5], "move",
                                                     {"layers": "0-2", "to": "b"}))
    reordered = _placement(cluster)
    assert reordered == [("b", 0, 3), ("a", 3, 20), ("c", 20, 30)]
    _check_record(record, after, reordered)
    assert tokens == reference[4:5]


def test_move_while_eight_sessions_run(cluster: RunningCluster, prompt_ids, reference) -> None:
    _start_at(cluster, START)
    tokens, record = asyncio.run(_generate_with_move(
        cluster, prompt_ids, "move", {"layers": "10-14", "to": "a"}, after_tokens=10))
    after = _placement(cluster)
    assert after == [("a", 0, 15), ("b", 15, 20), ("c", 20, 30)]
    _check_record(record, START, after)
    assert tokens == reference


def test_move_under_direct_routing(tiny_model: Path, tmp_path: Path) -> None:
    """With activations going node to node, a move mid-generation still keeps every token,
    and the steps after it follow the new placement's route."""
    rc = start_cluster(tiny_model, tmp_path, [{"name": n} for n in ("a", "b", "c")],
                       direct=True)
    try:
        _move_under_direct_routing(rc)
    finally:
        rc.cluster.stop()


def _move_under_direct_routing(rc: RunningCluster) -> None:
    prompts = [[11, 12, 13, 14], [5, 6, 7, 8, 9]]

    async def alone() -> list[list[int]]:
        async with rc.client() as client:
            return [(await client.generate(prompt_ids=p, max_new_tokens=NEW_TOKENS,
                                           ignore_eos=True)).token_ids for p in prompts]

    async def timings() -> list:
        async with rc.client() as client:
            gen = await client.generate(prompt_ids=prompts[0], max_new_tokens=4)
        return gen.timings[-1]["stages"]

    reference = asyncio.run(alone())
    before = _placement(rc)
    assert before == [("a", 0, 2), ("b", 2, 4), ("c", 4, 6)]
    layer = before[1][1]
    tokens, record = asyncio.run(_generate_with_move(
        rc, prompts, "move", {"layers": f"{layer}-{layer}", "to": before[0][0]},
        after_tokens=10))
    after = _placement(rc)
    _check_record(record, before, after)
    assert after[0] == (before[0][0], 0, layer + 1)
    assert tokens == reference
    stages = asyncio.run(timings())
    assert [s[0] for s in stages] == [s[0] for s in after]
    assert [s[2] for s in stages[:-1]] == [0.0] * (len(stages) - 1)
