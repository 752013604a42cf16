"""Penalties through real clusters: the tokens are those of transformers (repetition_penalty)
and of the OpenAI formula applied to transformers' logits (frequency and presence), alone and
batched, broker-routed and direct; replays after a failure penalise as the first run did, and
a node killed mid-generation (rebuilt, or restored from a shadow) changes no penalised token."""

from __future__ import annotations

import asyncio
from functools import cache
from pathlib import Path

import pytest
import torch
from conftest import start_cluster
from test_e2e_failover import SLOW_HEARTBEAT
from test_e2e_liveness import _status
from test_penalties import openai_reference
from transformers import AutoTokenizer, LlamaForCausalLM

from brokers.sessions import Detokenizer, Session
from zpipe.sampling import SamplingParams

PROMPTS = ["The history of the printing press begins", "Water boils at"]
NEW = 24


@cache
def _hf(model_dir: str) -> tuple:
    return (LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(model_dir))


def reference(model_dir: str, prompt: str, repetition: float, frequency: float,
              presence: float) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy new ids): transformers' generate with its repetition penalty, and
    OpenAI's formula on the logits it gives, one token at a time."""
    model, tok = _hf(model_dir)
    ids = tok(prompt, return_tensors="pt").input_ids
    if frequency == 0 and presence == 0:
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW, repetition_penalty=repetition)
        return ids[0].tolist(), out[0, ids.shape[1]:].tolist()
    assert repetition == 1
    seq, new = ids[0].tolist(), []
    with torch.inference_mode():
        for _ in range(NEW):
            logits = model(torch.tensor([seq])).logits[0, -1].tolist()
            scores = openai_reference(logits, new, frequency, presence)
            token = max(range(len(scores)), key=scores.__getitem__)
            new.append(token)
            seq.append(token)
    return ids[0].tolist(), new


CASES = [(1.3, 0.0, 0.0), (1.0, 0.8, 0.5)]


@pytest.mark.parametrize("direct", [False, True])
def test_penalised_tokens_match_the_references(tiny_model: Path, clusters, direct: bool) -> None:
    rc = clusters.get(tiny_model, 3, direct=direct)
    for repetition, frequency, presence in CASES:
        refs = [reference(str(tiny_model), p, repetition, frequency, presence) for p in PROMPTS]
        options = {"repetition_penalty": repetition, "frequency_penalty": frequency,
                   "presence_penalty": presence, "max_new_tokens": NEW, "ignore_eos": True}

        async def run(refs: list = refs, options: dict = options) -> tuple[list, list]:
            async with rc.client() as client:
                one = [await client.generate(prompt_ids=ids, **options) for ids, _ in refs]
                many = await asyncio.gather(*[client.generate(prompt_ids=ids, **options)
                                              for ids, _ in refs])
            return one, many

        one, many = asyncio.run(run())
        for (_, want), a, b in zip(refs, one, many, strict=True):
            assert a.token_ids == want, (repetition, frequency, presence)
            assert b.token_ids == want, (repetition, frequency, presence)
        # the penalties changed something: greedy alone loops on the tiny model
        greedy = reference(str(tiny_model), PROMPTS[0], 1.0, 0.0, 0.0)[1]
        assert refs[0][1] != greedy


def test_replayed_steps_carry_the_first_runs_context(tiny_model: Path) -> None:
    """After a node is lost the broker replays a session's known tokens step by step: each
    replayed step's sampling names exactly the tokens its first run did."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    for sampling in ({"frequency_penalty": 0.5}, {"repetition_penalty": 1.2}):
        s = Session(sid="s", rid="r", client=b"c", prompt_ids=[5, 6, 7], max_new_tokens=10,
                    sampling=sampling, stop_ids=frozenset(), detok=Detokenizer(tok, [5, 6, 7]),
                    penalised=SamplingParams(**sampling).penalised)
        first = []
        for token in [9, 9, 4, 9]:
            first.append(s.step_sampling())
            s.tokens.append(token)
            s.step += 1
        s.replay()
        again = []
        while s.replaying():
            again.append(s.step_sampling())
            s.step += 1
        assert again == first
        context = first[2]["context"]
        assert context == ([5, 6, 7, 9, 9] if "repetition_penalty" in sampling else [9, 9])
        s.replay_from(len(s.prompt_ids) + 1)  # a restore from KV shadows
        assert s.step_sampling() == first[s.step]


@pytest.mark.parametrize("shadow_every", [0, 4], ids=["rebuilt", "shadow"])
def test_a_node_killed_mid_generation_leaves_penalised_tokens_unchanged(
        tiny_model: Path, tmp_path: Path, shadow_every: int) -> None:
    """Real processes, 3 nodes: node b is SIGKILLed while a penalised session generates; its
    layers come back (rebuilt by a, or from c's shadow), and the tokens are transformers'
    with the penalties, as without the kill."""
    repetition, frequency, presence = 1.0, 0.8, 0.5
    ids, want = reference(str(tiny_model), PROMPTS[0], repetition, frequency, presence)
    rc = start_cluster(tiny_model, tmp_path, [{"name": n, "threads": 1} for n in "abc"],
                       heartbeat=SLOW_HEARTBEAT,
                       recovery={"wait_s": 30, "shadow_every": shadow_every})
    try:
        victim = dict(rc.cluster.procs)["node-b"]

        def on_token(chunk) -> None:
            if chunk.index == NEW // 2:
                victim.kill()

        async def run() -> list[int]:
            async with rc.client() as client:
                got = await asyncio.wait_for(client.generate(
                    prompt_ids=ids, frequency_penalty=frequency, presence_penalty=presence,
                    max_new_tokens=NEW, ignore_eos=True, on_token=on_token), 90)
            return got.token_ids

        assert asyncio.run(run()) == want
        record = _status(rc)["reallocations"][-1]
        assert record["ok"] and record["restored"] == ("shadow" if shadow_every else "rebuild")
    finally:
        rc.cluster.stop()
