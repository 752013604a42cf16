"""A real node process refuses broken move messages and broken steps from its peer socket,
each with an error naming the problem. The test speaks the broker's side of the protocol by
hand on a ROUTER socket, and another node's side on a PUSH socket to the node's peer address."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
import zmq
from conftest import free_port

from zpipe import protocol

EPOCH = 1
LAYERS = (0, 3)  # of the tiny model's 6: the node is the first stage


class FakeBroker:
    """The broker's end of one node's connection."""

    def __init__(self, sock: zmq.Socket, proc: subprocess.Popen, log: Path) -> None:
        self.sock, self.proc, self.log = sock, proc, log
        self.ident = b""
        self.peer = ""

    def recv(self, timeout_s: float = 60.0) -> protocol.Message:
        """The node's next message other than a heartbeat."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000)):
                raise AssertionError(f"the node said nothing in {timeout_s} s:\n"
                                     + self.log.read_text()[-3000:])
            ident, *frames = self.sock.recv_multipart()
            msg = protocol.decode(frames)
            if msg.kind != "heartbeat":
                self.ident = ident
                return msg

    def send(self, frames: list) -> None:
        self.sock.send_multipart([self.ident, *frames])

    def ask(self, kind: str, tensors: dict | None = None, **fields) -> protocol.Message:
        self.send(protocol.encode(kind, tensors, **fields))
        return self.recv()

    def refused(self, kind: str, tensors: dict | None = None, **fields) -> protocol.Message:
        reply = self.ask(kind, tensors, **fields)
        assert reply.kind == "error", reply.header
        return reply

    def step(self, sid: str, pos: int, ids: list[int], **fields) -> protocol.Message:
        return self.ask("step", {"x": torch.tensor(ids)}, epoch=EPOCH, stage=0,
                        rows=[[sid, 0, pos, len(ids)]], **fields)


@pytest.fixture(scope="module")
def node_process(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[FakeBroker]:
    """A node holding layers 0-2 of the tiny model, direct routing's peer socket bound."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    address = f"tcp://127.0.0.1:{free_port()}"
    sock.bind(address)
    tmp = tmp_path_factory.mktemp("node")
    cfg = tmp / "node.yaml"
    cfg.write_text(yaml.safe_dump({"name": "n", "broker": address, "model": str(tiny_model),
                                   "threads": 1, "peer_bind": "tcp://127.0.0.1:0"}))
    log = tmp / "node.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "zpipe.cli.main", "node", "-c", str(cfg)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    broker = FakeBroker(sock, proc, log)
    try:
        hello = broker.recv()
        assert hello.kind == "register", hello.header
        broker.peer = hello["peer"]
        # Its peers under direct routing: steps of EPOCH come to it as stage 1 from node x,
        # and go on to itself as stage 2 (the stage number is the route's index only).
        broker.send(protocol.encode("peers", epoch=EPOCH, stage=1, prev="x",
                                    route=[broker.peer, broker.peer], names=["n", "n"]))
        loaded = broker.ask("load", epoch=EPOCH, start=LAYERS[0], end=LAYERS[1])
        assert loaded.kind == "loaded", loaded.header
        yield broker
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        sock.close(0)


@pytest.fixture
def node(node_process: FakeBroker) -> FakeBroker:
    """The node as every test here starts: no move prepared (the tests prepare epoch 2 only,
    and never commit one), and session ``s`` with 4 tokens in its KV cache."""
    node_process.send(protocol.encode("abort", rid="reset", epoch=2))  # not answered
    assert node_process.step("s", 0, [5, 6, 7, 8]).kind == "result"  # a prefill starts afresh
    return node_process


# ------------------------------------------------------------------ moves


def test_prepare_outside_the_model_is_bad_range(node: FakeBroker) -> None:
    err = node.refused("prepare", rid="r", epoch=2, start=4, end=99)
    assert (err["code"], err["rid"]) == ("bad_range", "r")
    assert "outside the model" in err["message"]


def test_kv_export_of_layers_not_held_is_bad_range(node: FakeBroker) -> None:
    err = node.refused("kv_export", rid="r", sids=["s"], start=3, end=5)
    assert (err["code"], err["rid"]) == ("bad_range", "r")
    assert "layer 3 not in this cache" in err["message"]


def test_kv_export_of_an_unknown_session(node: FakeBroker) -> None:
    err = node.refused("kv_export", rid="r", sids=["nobody"], start=0, end=3)
    assert err["code"] == "unknown_session" and "nobody" in err["message"]


def test_kv_import_without_prepare_is_not_prepared(node: FakeBroker) -> None:
    kv = {"k.3": torch.zeros(2, 4, 16), "v.3": torch.zeros(2, 4, 16)}
    err = node.refused("kv_import", kv, rid="r", sid="s", length=4)
    assert (err["code"], err["rid"]) == ("not_prepared", "r")


def test_kv_import_outside_the_prepared_layers_is_bad_range(node: FakeBroker) -> None:
    assert node.ask("prepare", rid="p", epoch=2, start=0, end=4).kind == "prepared"
    kv = {"k.5": torch.zeros(2, 4, 16), "v.5": torch.zeros(2, 4, 16)}
    err = node.refused("kv_import", kv, rid="r", sid="s", length=4)
    assert err["code"] == "bad_range" and "outside the prepared 0-3" in err["message"]


def test_kv_import_of_the_wrong_shape_is_bad_kv(node: FakeBroker) -> None:
    assert node.ask("prepare", rid="p", epoch=2, start=0, end=4).kind == "prepared"
    kv = {"k.3": torch.zeros(2, 4, 7), "v.3": torch.zeros(2, 4, 7)}  # head_dim is 16
    err = node.refused("kv_import", kv, rid="r", sid="s", length=4)
    assert err["code"] == "bad_kv" and "does not match" in err["message"]


def test_commit_lacking_a_session_s_kv_is_bad_kv(node: FakeBroker) -> None:
    """Layer 3 is new to the node and no KV came for it: session s could not go on."""
    assert node.ask("prepare", rid="p", epoch=2, start=0, end=4).kind == "prepared"
    err = node.refused("commit", rid="c", epoch=2)
    assert err["code"] == "bad_kv" and "session s lacks KV for layers [3]" in err["message"]


def test_commit_of_an_epoch_not_prepared_is_not_prepared(node: FakeBroker) -> None:
    err = node.refused("commit", rid="c", epoch=7)
    assert (err["code"], err["rid"]) == ("not_prepared", "c")
    assert "nothing prepared for epoch 7" in err["message"]


def test_commit_after_abort_is_not_prepared(node: FakeBroker) -> None:
    """An aborted move is gone: its commit is refused, and the node serves as before."""
    assert node.ask("prepare", rid="p", epoch=2, start=0, end=2).kind == "prepared"
    node.send(protocol.encode("abort", rid="a", epoch=2))  # no answer to an abort
    assert node.refused("commit", rid="c", epoch=2)["code"] == "not_prepared"
    assert node.step("s", 4, [9]).kind == "result"


# ------------------------------------------------------------------ the peer socket


@pytest.fixture
def peer(node: FakeBroker) -> Iterator[zmq.Socket]:
    """Another node's PUSH socket to the node's peer address."""
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(node.peer)
    yield sock
    sock.close(0)


def _peer_step(sid: str, pos: int, x: torch.Tensor, route: object, epoch: int = EPOCH) -> list:
    return protocol.encode("step", {"x": x}, epoch=epoch, stage=1, rows=[[sid, 1, pos, len(x)]],
                           route=route, times=[])


def test_peer_junk_and_non_steps_are_dropped(node: FakeBroker, peer: zmq.Socket) -> None:
    """Junk and a message that is not a step (a ``free`` of session s) are dropped without a
    word; a step sent after them on the same socket is the first thing the broker hears of,
    and session s is still there for it."""
    peer.send_multipart([os.urandom(40)])
    peer.send_multipart([protocol.TAG, b"\xc1"])
    peer.send_multipart(protocol.encode("free", sids=["s"]))
    peer.send_multipart(_peer_step("s", 4, torch.tensor([9]), [node.peer, "not an address"]))
    err = node.recv()
    assert err.kind == "error" and (err["code"], err["sid"]) == ("bad_route", "s")
    assert "route[1] is not a peer address" in err["message"]


def test_peer_step_to_a_route_not_announced(node: FakeBroker, peer: zmq.Socket) -> None:
    """The step names an address the broker never announced: the node sends nothing there."""
    peer.send_multipart(_peer_step("s", 4, torch.tensor([9]), [node.peer, "tcp://10.9.9.9:9"]))
    err = node.recv()
    assert err.kind == "error" and (err["code"], err["sid"]) == ("bad_route", "s")
    assert "'tcp://10.9.9.9:9' is not where the broker said stage 1 + 1" in err["message"]


def test_peer_step_for_an_unknown_session(node: FakeBroker, peer: zmq.Socket) -> None:
    peer.send_multipart(_peer_step("nobody", 3, torch.tensor([9]), [node.peer, node.peer]))
    err = node.recv()
    assert (err.kind, err["code"], err["sid"]) == ("error", "unknown_session", "nobody")


def test_peer_step_of_the_wrong_shape(node: FakeBroker, peer: zmq.Socket) -> None:
    """Hidden states sent to the first stage, which takes token ids."""
    peer.send_multipart(_peer_step("s", 4, torch.zeros(1, 64), [node.peer, node.peer]))
    err = node.recv()
    assert (err.kind, err["code"], err["sid"]) == ("error", "bad_shape", "s")
    assert "stage 0 takes int64 token ids" in err["message"]


def test_peer_steps_not_announced_are_dropped(node: FakeBroker, peer: zmq.Socket) -> None:
    """Of an epoch the broker did not announce, or for another stage than the node's: dropped
    without a word (the broker hears of the step after them only)."""
    peer.send_multipart(_peer_step("s", 4, torch.tensor([9]), [node.peer, node.peer], epoch=9))
    other = _peer_step("s", 4, torch.tensor([9]), [node.peer, node.peer])
    header = protocol.decode(other).header
    peer.send_multipart(protocol.encode("step", {"x": torch.tensor([9])}, **{
        **{k: v for k, v in header.items() if k not in ("kind", "t")}, "stage": 0}))
    peer.send_multipart(_peer_step("nobody", 3, torch.tensor([9]), [node.peer, node.peer]))
    err = node.recv()
    assert (err.kind, err["code"], err["sid"]) == ("error", "unknown_session", "nobody")


def test_peer_step_with_a_route_too_short(node: FakeBroker, peer: zmq.Socket) -> None:
    """The route names no node for the next stage: the step cannot go on."""
    peer.send_multipart(_peer_step("s", 4, torch.tensor([9]), [node.peer]))
    err = node.recv()
    assert (err.kind, err["code"], err["sid"]) == ("error", "bad_route", "s")
    assert "route of 1 hops has none for stage 1" in err["message"]
