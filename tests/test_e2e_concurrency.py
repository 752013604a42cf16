"""Many sessions at once on a 3-stage cluster each give the tokens they give alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

from conftest import free_port, generating, start_cluster
from transformers import AutoTokenizer

from zpipe.cli.admin import AdminClient
from zpipe.cli.up import Cluster
from zpipe.client import Client, ZpipeError
from zpipe.config import ClusterConfig, validate

PROMPTS = [
    "The quick brown fox",
    "In 1492, Columbus",
    "Water boils at",
    "A good breakfast includes",
    "The main ingredients of bread are",
    "Once upon a time, in a small village,",
    "The three laws of motion are",
    "To install Python packages, you can use",
]


def test_eight_sessions_at_once_match_alone(smollm2: Path, clusters) -> None:
    rc = clusters.get(smollm2, 3)
    tok = AutoTokenizer.from_pretrained(smollm2)
    ids = [tok(p).input_ids for p in PROMPTS]

    async def run() -> tuple[list, list]:
        async with rc.client() as client:
            alone = [(await client.generate(prompt_ids=p, max_new_tokens=16)).token_ids
                     for p in ids]
            together = await asyncio.gather(*[
                client.generate(prompt_ids=p, max_new_tokens=16) for p in ids])
        return alone, [g.token_ids for g in together]

    alone, together = asyncio.run(run())
    assert all(len(a) > 0 for a in alone)
    assert together == alone


def test_cancel_frees_the_session_and_others_continue(tiny_model: Path, clusters) -> None:
    rc = clusters.get(tiny_model, 3)

    async def run() -> tuple:
        async with rc.client() as client:
            reference = await client.generate(prompt_ids=[5, 6, 7], max_new_tokens=40,
                                              ignore_eos=True)
            long = await generating(client, prompt_ids=[1, 2, 3], max_new_tokens=2000,
                                    ignore_eos=True)
            other = await generating(client, prompt_ids=[5, 6, 7], max_new_tokens=40,
                                     ignore_eos=True)
            long.cancel()
            again = await other
            for _ in range(600):  # the broker frees the cancelled session asynchronously
                info = await client.info()
                if info["sessions"] == 0:
                    break
                await asyncio.sleep(0.05)
            return reference, again, info, long

    reference, again, info, long = asyncio.run(run())
    assert long.cancelled()
    assert again.token_ids == reference.token_ids
    assert info["sessions"] == 0


def test_stop_conditions(tiny_model: Path, clusters) -> None:
    rc = clusters.get(tiny_model, 3)

    async def run() -> tuple:
        async with rc.client() as client:
            full = await client.generate(prompt_ids=[9, 10, 11], max_new_tokens=12,
                                         ignore_eos=True)
            stop_at = full.token_ids[5]
            stopped = await client.generate(prompt_ids=[9, 10, 11], max_new_tokens=12,
                                            ignore_eos=True, stop_token_ids=[stop_at])
            return full, stopped

    full, stopped = asyncio.run(run())
    assert full.finish_reason == "length" and len(full.token_ids) == 12
    cut = full.token_ids.index(full.token_ids[5]) + 1
    assert stopped.token_ids == full.token_ids[:cut]
    assert stopped.finish_reason == "stop"


def test_sampling_is_seeded(tiny_model: Path, clusters) -> None:
    rc = clusters.get(tiny_model, 3)
    kw = {"prompt_ids": [3, 4, 5], "max_new_tokens": 24, "ignore_eos": True,
          "temperature": 1.5, "top_k": 50, "top_p": 0.95}

    async def run() -> list:
        async with rc.client() as client:
            return [(await client.generate(seed=s, **kw)).token_ids for s in (1, 1, 2)]

    a, b, c = asyncio.run(run())
    assert a == b
    assert a != c


def test_no_placement_error_names_what_is_missing(tiny_model: Path, tmp_path: Path) -> None:
    """A broker whose nodes have not joined refuses requests with a clear error, no hang."""
    address = f"tcp://127.0.0.1:{free_port()}"
    cfg = validate({"model": str(tiny_model), "broker": {"bind": address},
                    "nodes": [{"name": "x"}]}, ClusterConfig)
    cluster = Cluster(cfg, tmp_path)
    cluster._spawn("broker", "broker", cfg.broker_config())  # the broker only, no node
    try:
        async def run() -> ZpipeError:
            async with Client(address, timeout=10) as client:
                for _ in range(100):
                    try:
                        await client.info(timeout=1.0)
                        break
                    except ZpipeError:
                        await asyncio.sleep(0.1)
                try:
                    await client.generate("hi", max_new_tokens=4)
                except ZpipeError as e:
                    return e
            raise AssertionError("generate succeeded without nodes")

        err = asyncio.run(run())
        assert err.code == "no_placement"
        assert "x" in err.message
    finally:
        cluster.stop()


def test_cohorts_split_at_the_nodes_max_batch_keep_every_token(tiny_model: Path,
                                                               tmp_path: Path) -> None:
    """3 nodes with ``max_batch`` 2 and a burst of 5 sessions: no step message carries more
    than 2 sessions (the stages work on several cohorts at once), and every session gives the
    tokens it gives alone."""
    rc = start_cluster(tiny_model, tmp_path, [{"name": f"m{i}", "max_batch": 2}
                                              for i in range(3)])
    prompts = [[5 + i, 6, 7 + i] for i in range(5)]
    try:
        async def run() -> tuple[list, list]:
            async with rc.client() as client:
                alone = [(await client.generate(prompt_ids=p, max_new_tokens=12,
                                                ignore_eos=True)).token_ids for p in prompts]
                together = await asyncio.gather(*[
                    client.generate(prompt_ids=p, max_new_tokens=12, ignore_eos=True)
                    for p in prompts])
            return alone, [g.token_ids for g in together]

        alone, together = asyncio.run(run())
        with AdminClient(rc.address, timeout=30) as admin:
            overall = admin.request("metrics", {})["overall"]
        assert together == alone
        assert overall["max_rows_per_step"] == 2
        assert overall["rows_per_step"] <= 2
    finally:
        rc.cluster.stop()
