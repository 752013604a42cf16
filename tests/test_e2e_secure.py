"""CURVE keys, roles and bounded inputs against real processes: a broker and two nodes under
direct routing with keys on, and an open broker for the oversize frame. Each refusal is
checked where it shows: the client's error, and the broker's or node's log."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
import zmq
from conftest import RunningCluster, free_port, start_cluster

from zpipe import protocol
from zpipe.cli.admin import AdminClient, AdminError
from zpipe.client import Client, ZpipeError
from zpipe.keys import connect_as, load_pair, load_public, make_keys

KW = {"prompt_ids": [11, 12, 13, 14], "max_new_tokens": 12, "ignore_eos": True}


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("keys")
    make_keys(root, nodes=["n0", "n1", "n2"], clients=["alice"], admins=["ops"])
    return root


@pytest.fixture(scope="module")
def secure(tiny_model: Path, key_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[RunningCluster]:
    rc = start_cluster(tiny_model, tmp_path_factory.mktemp("secure"),
                       [{"name": "n0"}, {"name": "n1"}], keys=str(key_dir), direct=True,
                       key=str(key_dir / "clients" / "alice.key_secret"))
    yield rc
    rc.cluster.stop()


def _log(rc: RunningCluster, child: str) -> str:
    return (rc.cluster.log_dir / f"{child}.log").read_text(errors="replace")


def _wait_log(rc: RunningCluster, child: str, text: str, timeout: float = 60.0) -> str:
    """The child's log once it holds ``text`` (the processes write it asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = _log(rc, child)
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{child}'s log never said {text!r}:\n{_log(rc, child)[-3000:]}")


def _refused(client: Client) -> ZpipeError:
    async def run() -> ZpipeError:
        async with client:
            with pytest.raises(ZpipeError) as err:
                await client.info(timeout=60)
            return err.value

    return asyncio.run(run())


def test_keys_are_private(key_dir: Path) -> None:
    secrets = list(key_dir.rglob("*.key_secret"))
    assert len(secrets) == 6
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in secrets)


def test_a_client_key_generates(secure: RunningCluster) -> None:
    async def run() -> None:
        async with secure.client() as client:
            gen = await client.generate(**KW)
        assert len(gen.token_ids) == KW["max_new_tokens"]

    asyncio.run(run())


def test_an_unkeyed_client_gets_nothing(secure: RunningCluster) -> None:
    err = _refused(Client(secure.address))
    assert err.code == "auth_refused" and "without a key" in err.message
    _wait_log(secure, "broker", "broker: a handshake failed on")


def test_an_unknown_key_gets_nothing(secure: RunningCluster, key_dir: Path,
                                     tmp_path: Path) -> None:
    make_keys(tmp_path, clients=["mallory"])
    err = _refused(Client(secure.address, key=str(tmp_path / "clients" / "mallory.key_secret"),
                          broker_key=str(key_dir / "broker.key")))
    assert err.code == "auth_refused" and "refused this client's key" in err.message
    mallory = load_public(tmp_path / "clients" / "mallory.key", "").decode()
    _wait_log(secure, "broker", f"broker refused an unknown CURVE key {mallory}")


def test_a_client_key_is_refused_admin_operations(secure: RunningCluster, key_dir: Path
                                                  ) -> None:
    with AdminClient(secure.address, 30, str(key_dir / "clients" / "alice.key_secret")) as a:
        with pytest.raises(AdminError, match="forbidden: admin operations need an admin key"):
            a.request("status")
    with AdminClient(secure.address, 30, str(key_dir / "admins" / "ops.key_secret")) as a:
        assert {n["name"] for n in a.request("nodes")["nodes"]} == {"n0", "n1"}
    with AdminClient(secure.address, 10) as a:  # no key: no answer, and the refusal said
        with pytest.raises(AdminError, match="auth_refused: .* refused a connection without"):
            a.request("status")


def _dealer(address: str, key_dir: Path, secret: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    connect_as(sock, load_pair(key_dir / secret, ""), load_public(key_dir / "broker.key", ""))
    sock.connect(address)
    return sock


def _answer(sock: zmq.Socket) -> protocol.Message:
    assert sock.poll(60_000), "no answer from the broker"
    return protocol.decode(sock.recv_multipart())


def test_no_node_takes_a_live_nodes_name(secure: RunningCluster, key_dir: Path,
                                         tiny_model: Path) -> None:
    """Node n2's key registers as n0, and a client key sends node messages: both refused;
    n0 keeps serving."""
    before = {n["name"]: n["pid"] for n in secure.info["nodes"]}
    fake = {"name": "n0", "pid": 1, "host": "x", "device": "cpu", "dtype": "float32",
            "model": str(tiny_model), "num_layers": 6, "mem_total": 1 << 30,
            "mem_free": 1 << 30, "gflops": 1.0, "identity": {}}
    n2 = _dealer(secure.address, key_dir, "nodes/n2.key_secret")
    alice = _dealer(secure.address, key_dir, "clients/alice.key_secret")
    try:
        n2.send_multipart(protocol.encode("register", **fake))
        err = _answer(n2)
        assert (err.kind, err["code"]) == ("error", "forbidden")
        assert "the key of node 'n2' may not speak for node 'n0'" in err["message"]
        alice.send_multipart(protocol.encode("heartbeat"))
        err = _answer(alice)
        assert (err.kind, err["code"]) == ("error", "forbidden")
        assert "a client key (alice) may not send node messages" in err["message"]
    finally:
        n2.close(0)
        alice.close(0)

    async def run() -> dict:
        async with secure.client() as client:
            gen = await client.generate(**KW)
            assert len(gen.token_ids) == KW["max_new_tokens"]
            return await client.info()

    info = asyncio.run(run())
    assert {n["name"]: n["pid"] for n in info["nodes"]} == before
    assert all(n["state"] == "ready" for n in info["nodes"])


def test_a_peer_step_from_a_stranger_is_dropped(secure: RunningCluster, key_dir: Path) -> None:
    """n1 takes steps from n0 only: a step from node n2's key is dropped, a client's key does
    not get through the handshake; the generations around them stay token-exact."""
    peer = next(n["peer"] for n in secure.info["nodes"] if n["name"] == "n1")
    n1 = load_public(key_dir / "nodes" / "n1.key", "")

    async def run() -> tuple[list[int], list[int]]:
        async with secure.client() as client:
            reference = (await client.generate(**KW)).token_ids
            info = await client.info()
            socks = []
            for secret in ("nodes/n2.key_secret", "clients/alice.key_secret"):
                sock = zmq.Context.instance().socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 0)
                connect_as(sock, load_pair(key_dir / secret, ""), n1)
                sock.connect(peer)
                sock.send_multipart(protocol.encode(
                    "step", {"x": torch.zeros(1, 64)}, epoch=info["epoch"], stage=1,
                    rows=[["nobody", 3, 5, 1]], sampling=[{}], route=[peer], times=[]),
                    flags=zmq.NOBLOCK)
                socks.append(sock)
            after = (await client.generate(**KW)).token_ids
            for sock in socks:
                sock.close(0)
            return reference, after

    reference, after = asyncio.run(run())
    assert after == reference
    _wait_log(secure, "node-n1", "from 'node:n2': it takes steps from node n0 only")
    _wait_log(secure, "node-n1", "peer socket refused an unknown CURVE key")
    assert "unknown_session" not in _log(secure, "node-n1")  # the step never ran


def test_a_move_under_keys_keeps_the_tokens(secure: RunningCluster, key_dir: Path) -> None:
    """An admin moves a layer while a generation runs: the nodes hear their new peers, pass
    steps to each other under CURVE at the new epoch, and the tokens are those of a run
    without the move."""
    kw = {**KW, "max_new_tokens": 40}
    ops = str(key_dir / "admins" / "ops.key_secret")

    def move() -> dict:
        stages = {s["node"]: s for s in secure.info["placement"]}
        to, layer = ("n1", stages["n0"]["end"] - 1) if stages["n0"]["end"] > 1 else ("n0", 1)
        with AdminClient(secure.address, 120, ops) as admin:
            return admin.request("move", {"layers": f"{layer}-{layer}", "to": to})

    async def run() -> tuple[list[int], list[int], dict]:
        async with secure.client() as client:
            reference = (await client.generate(**kw)).token_ids
            started = asyncio.Event()
            task = asyncio.create_task(client.generate(
                on_token=lambda c: c.index >= 5 and started.set(), **kw))
            await asyncio.wait_for(started.wait(), 120)
            record = await asyncio.to_thread(move)
            return reference, (await task).token_ids, record

    reference, moved, record = asyncio.run(run())
    assert record["ok"], record
    assert moved == reference


# ------------------------------------------------------------------ an oversize frame

def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _zmtp_null_dealer(port: int) -> socket.socket:
    """A raw TCP connection that has done ZMTP 3.0's NULL handshake as a DEALER."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + bytes(32))
    greeting = b""
    while len(greeting) < 64:
        greeting += s.recv(64 - len(greeting))
    assert greeting[0] == 0xFF and greeting[12:16] == b"NULL", greeting
    body = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
    s.sendall(bytes([0x04, len(body)]) + body)
    return s


def test_an_oversize_frame_is_cut_off_unbuffered(tiny_model: Path, tmp_path: Path) -> None:
    """A frame declaring 1 GiB: libzmq drops the connection on reading its size; the broker
    neither buffers it nor stalls (it answers a ping after)."""
    address = f"tcp://127.0.0.1:{free_port()}"
    cfg = tmp_path / "broker.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(tiny_model), "bind": address}))
    log = tmp_path / "broker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "zpipe.cli.main", "broker", "-c",
                                 str(cfg)], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "broker on" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert "broker takes frames of up to 33.6 MB" in log.read_text()
        rss_before = _rss(proc.pid)
        s = _zmtp_null_dealer(int(address.rsplit(":", 1)[1]))
        sent = 0
        chunk = bytes(1 << 20)
        try:
            s.sendall(b"\x02" + struct.pack(">Q", 1 << 30))  # one frame of 1 GiB, long form
            while sent < 256 << 20:
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:  # reset by the broker
            pass
        finally:
            s.close()
        rss_after = _rss(proc.pid)
        print(f"oversize frame: {sent >> 20} MiB taken before the cut; broker RSS "
              f"{rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB")
        assert sent < 64 << 20
        assert rss_after - rss_before < 16 << 20

        async def ping() -> dict:
            async with Client(address) as client:
                return await client.info(timeout=30)

        assert asyncio.run(ping())["ready"] is False  # no nodes: it answers, that is all
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
