"""Hostile or broken peers get an error naming the problem; everyone else keeps being served."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import msgpack
import pytest
import torch
import zmq
import zmq.asyncio
from conftest import generating

from zpipe import protocol
from zpipe.client import ZpipeError
from zpipe.identity import model_identity
from zpipe.models import synth
from zpipe.shard import ModelSpec


def _header(**fields) -> bytes:
    return msgpack.packb({"t": [], **fields})


def _cases() -> list[tuple[str, list[bytes], str, str]]:
    """(what, frames, expected error code, a piece of the expected error message that shows
    it is that problem which was found)."""
    rng = random.Random(7)
    junk = bytes(rng.getrandbits(8) for _ in range(64))
    gen = {"kind": "generate", "rid": "r1"}
    step = {"kind": "step", "rows": [["s", 0, 0, 4]], "epoch": 1, "stage": 0}
    return [
        ("random bytes", [junk], "bad_message", "frame"),
        ("random frames", [junk, os.urandom(32), os.urandom(8)], "bad_tag",
         "not a zpipe message"),
        ("wrong version", [b"ZPIPE/9", _header(**gen, prompt="hi")], "bad_version", "ZPIPE/9"),
        ("header not msgpack", [protocol.TAG, b"\xc1\xc1\xc1"], "bad_message", "msgpack"),
        ("header not a map", [protocol.TAG, msgpack.packb([1, 2, 3])], "bad_message", "map"),
        ("unknown kind", [protocol.TAG, _header(kind="explode")], "unknown_kind", "explode"),
        ("missing field", [protocol.TAG, _header(kind="cancel")], "bad_message", "rid"),
        ("wrong field type", [protocol.TAG, _header(kind="cancel", rid=5)], "bad_message",
         "rid"),
        ("lying byte length", [protocol.TAG, msgpack.packb({
            **step, "t": [["x", "int64", [4]]]}), b"\x00" * 31], "bad_length", "31"),
        ("absurd tensor shape", [protocol.TAG, msgpack.packb({
            **step, "t": [["x", "float32", [1 << 30, 8]]]}), b""], "too_large", "bytes"),
        ("absurd header", [protocol.TAG, _header(**gen, prompt="x" * 100_000)], "too_large",
         "header of"),
        # within the header limit, beyond the broker's max_prompt_tokens (8192)
        ("absurd prompt", [protocol.TAG, _header(**gen, prompt_ids=[1] * 10_000)], "too_large",
         "10000 items exceed the limit of 8192"),
        ("prompt beyond the model's positions", [protocol.TAG, _header(
            **gen, prompt_ids=[1] * 2000, max_new_tokens=100)], "too_large", "positions"),
        ("absurd max_new_tokens", [protocol.TAG, _header(**gen, prompt_ids=[1],
                                                          max_new_tokens=10**12)],
         "bad_request", "max_new_tokens"),
        ("token id out of vocab", [protocol.TAG, _header(**gen, prompt_ids=[1, 10**9])],
         "bad_value", "prompt_ids"),
        ("negative temperature", [protocol.TAG, _header(
            **gen, prompt_ids=[1], sampling={"temperature": -1.0})], "bad_sampling",
         "temperature"),
        ("NaN temperature", [protocol.TAG, _header(
            **gen, prompt_ids=[1], sampling={"temperature": float("nan")})], "bad_sampling",
         "temperature"),
        ("top_p zero", [protocol.TAG, _header(**gen, prompt_ids=[1], sampling={"top_p": 0.0})],
         "bad_sampling", "top_p"),
        ("top_k not an int", [protocol.TAG, _header(**gen, prompt_ids=[1],
                                                     sampling={"top_k": "x"})], "bad_sampling",
         "top_k"),
        ("unknown sampling key", [protocol.TAG, _header(**gen, prompt_ids=[1],
                                                         sampling={"beam": 4})], "bad_sampling",
         "beam"),
        ("two prompts", [protocol.TAG, _header(**gen, prompt="a", prompt_ids=[1])],
         "bad_request", "exactly one of"),
        ("bad chat messages", [protocol.TAG, _header(**gen, messages=[{"role": 1}])],
         "bad_request", "role"),
        ("unknown request id", [protocol.TAG, _header(kind="cancel", rid="nope")],
         "unknown_request", "nope"),
        ("a result from a peer that is no node", [protocol.TAG, _header(
            kind="result", rows=[["deadbeef", 0, 1]], epoch=1, stage=0, compute_s=0.1)],
         "unknown_peer", "not a registered node"),
        ("a step sent to the broker", protocol.encode(
            "step", {"x": torch.tensor([1])}, rows=[["s", 0, 0, 1]], epoch=1, stage=0),
         "unexpected_kind", "'step'"),
        ("a free sent to the broker", [protocol.TAG, _header(kind="free", sids=["x"])],
         "unexpected_kind", "'free'"),
    ]


CASES = _cases()


@pytest.fixture(scope="module")
def tiny_cluster(tiny_model: Path, clusters):
    return clusters.get(tiny_model, 3)


async def _ask(sock: zmq.asyncio.Socket, frames: list[bytes]) -> protocol.Message:
    await sock.send_multipart(frames)
    if not await sock.poll(5000):
        raise AssertionError("no error reply within 5 s")
    return protocol.decode(await sock.recv_multipart())


@pytest.mark.parametrize("what,frames,code,says", CASES, ids=[c[0] for c in CASES])
def test_bad_message_gets_named_error(tiny_cluster, what: str, frames: list, code: str,
                                      says: str) -> None:
    async def run() -> protocol.Message:
        sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(tiny_cluster.address)
        try:
            return await _ask(sock, frames)
        finally:
            sock.close(0)

    reply = asyncio.run(run())
    assert reply.kind == "error", what
    assert reply["code"] == code, f"{what}: {reply['code']}: {reply['message']}"
    assert says in reply["message"], f"{what}: {reply['message']}"


def test_wrong_model_node_is_rejected(tiny_cluster, tmp_path: Path) -> None:
    """A node of another checkpoint with the same layers and shapes (the tiny model with other
    weights) registers as a real node would: rejected, the message naming what differs."""
    other = synth("tiny", tmp_path / "other", seed=2, progress=lambda m: None)
    identity = model_identity(ModelSpec.load(other))
    assert identity["num_layers"] == 6

    async def run() -> protocol.Message:
        sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(tiny_cluster.address)
        try:
            return await _ask(sock, protocol.encode(
                "register", name="rogue", pid=1, host="h", device="cpu", dtype="float32",
                model=str(other), num_layers=6, identity=identity, mem_total=1, mem_free=1,
                gflops=1.0))
        finally:
            sock.close(0)

    reply = asyncio.run(run())
    assert reply["code"] == "rejected", reply["message"]
    assert "serves another model" in reply["message"]
    assert f"weights {identity['weights']}" in reply["message"]
    assert "hidden_size" not in reply["message"]  # the shapes are the same


async def _generate_around(rc, kw: dict, abuse) -> tuple:
    """A generation, the same one again while ``abuse()`` runs, and once more after:
    (reference, during, after, what ``abuse`` returned)."""
    async with rc.client() as client:
        reference = await client.generate(**kw)
        good = await generating(client, **kw)  # running before the abuse starts
        fired = await abuse()
        return reference, await good, await client.generate(**kw), fired


def test_cluster_keeps_serving_during_abuse(tiny_cluster) -> None:
    """A long generation runs while every bad message above is fired; its tokens don't change."""
    kw = {"prompt_ids": [11, 12, 13, 14], "max_new_tokens": 150, "ignore_eos": True}

    async def abuse() -> list[str]:
        sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(tiny_cluster.address)
        codes = []
        try:
            for _ in range(3):
                for _, frames, _, _ in CASES:
                    codes.append((await _ask(sock, frames))["code"])
        finally:
            sock.close(0)
        return codes

    async def bad_sampling() -> ZpipeError:
        async with tiny_cluster.client() as client:
            with pytest.raises(ZpipeError) as bad:
                await client.generate(prompt_ids=[1], temperature=-2.0)
        return bad.value

    reference, result, after, codes = asyncio.run(_generate_around(tiny_cluster, kw, abuse))
    bad = asyncio.run(bad_sampling())
    assert codes == [c[2] for c in CASES] * 3
    assert result.token_ids == reference.token_ids
    assert after.token_ids == reference.token_ids
    assert bad.code == "bad_sampling" and "temperature" in bad.message


def test_peer_socket_abuse_hurts_nobody(tiny_model: Path, clusters) -> None:
    """Under direct routing a node also listens to other nodes: junk, non-step messages,
    steps with a broken route or for sessions it does not hold are dropped or refused there,
    and a generation running meanwhile keeps its tokens (each refusal: test_node_refusals)."""
    rc = clusters.get(tiny_model, 3, direct=True)
    peer = next(n["peer"] for n in rc.info["nodes"] if n["name"] == "n1")
    hidden = torch.zeros(1, 64)
    step = {"epoch": rc.info["epoch"], "stage": 1, "rows": [["nobody", 3, 5, 1]],
            "sampling": [{}]}
    abuse = [
        [os.urandom(40)],
        [protocol.TAG, _header(kind="explode")],
        protocol.encode("free", sids=["x"]),  # a broker's message, not a peer's
        protocol.encode("step", {"x": hidden}, **step, route=["not an address", 5], times=[]),
        protocol.encode("step", {"x": hidden}, **step, route=["tcp://127.0.0.1:1"] * 2,
                        times=[]),
        protocol.encode("step", {"x": torch.zeros(1, 7)}, **step, route=[peer, peer], times=[]),
    ]
    kw = {"prompt_ids": [11, 12, 13, 14], "max_new_tokens": 60, "ignore_eos": True}

    async def fire() -> None:
        sock = zmq.asyncio.Context.instance().socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(peer)
        try:
            for _ in range(2):
                for frames in abuse:
                    await sock.send_multipart(frames)
                    await asyncio.sleep(0.01)
        finally:
            sock.close(0)

    reference, during, after, _ = asyncio.run(_generate_around(rc, kw, fire))
    assert during.token_ids == reference.token_ids == after.token_ids
    assert len(reference.token_ids) == 60
