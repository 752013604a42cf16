"""Keys, roles and bounds without processes: what ``zpipe keys`` writes, when CURVE is on,
what each role may send, and the frame limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from brokers.broker import NODE_KINDS
from brokers.roles import refusal
from zpipe import bounds, keys, protocol
from zpipe.cli.main import main
from zpipe.config import BrokerConfig, ConfigError, NodeConfig, validate


def test_zpipe_keys_makes_private_pairs_once(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["keys", str(tmp_path), "--nodes", "a,b", "--clients", "c", "--admins", "ops"])
    assert done.value.code == 0
    assert "5 new key pairs" in capsys.readouterr().out
    secrets = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*_secret"))
    assert secrets == ["admins/ops.key_secret", "broker.key_secret", "clients/c.key_secret",
                       "nodes/a.key_secret", "nodes/b.key_secret"]
    assert all((tmp_path / p).stat().st_mode & 0o777 == 0o600 for p in secrets)
    before = (tmp_path / "nodes" / "a.key_secret").read_bytes()
    assert keys.make_keys(tmp_path, nodes=["a"]) == []  # kept, not made again
    assert (tmp_path / "nodes" / "a.key_secret").read_bytes() == before
    assert sorted(keys.allow_list(tmp_path).values()) == ["admin:ops", "client:c", "node:a",
                                                          "node:b"]


def test_a_bad_key_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="bad key name '../x'"):
        keys.make_keys(tmp_path, clients=["../x"])


def test_curve_is_on_beyond_loopback_and_needs_keys() -> None:
    assert keys.curve_wanted(None, None, ["tcp://127.0.0.1:5555"], "broker") is False
    assert keys.curve_wanted(None, "k", ["tcp://127.0.0.1:5555"], "broker") is True
    assert keys.curve_wanted(False, None, ["tcp://0.0.0.0:5555"], "broker") is False
    with pytest.raises(ConfigError, match=r"binds tcp://0.0.0.0:5555 \(not loopback\).*"
                                          r"`zpipe keys DIR"):
        keys.curve_wanted(None, None, ["tcp://0.0.0.0:5555"], "broker")
    with pytest.raises(ConfigError, match="curve: true needs 'keys: DIR'"):
        validate({"curve": True}, BrokerConfig)
    with pytest.raises(ConfigError, match="keys: unknown key|keys: String should have"):
        validate({"name": "a", "keys": ""}, NodeConfig)


def test_a_client_finds_the_broker_key_near_its_own(tmp_path: Path, monkeypatch) -> None:
    keys.make_keys(tmp_path, clients=["c"])
    pair, broker = keys.client_keys(str(tmp_path / "clients" / "c.key_secret"))
    assert broker == keys.load_public(tmp_path / "broker.key", "")
    monkeypatch.setenv("ZPIPE_KEY", str(tmp_path / "clients" / "c.key_secret"))
    assert keys.client_keys() == (pair, broker)
    (tmp_path / "broker.key").unlink()
    with pytest.raises(ConfigError, match="no broker.key beside"):
        keys.client_keys()
    with pytest.raises(ConfigError, match="holds no secret key"):
        keys.client_keys(str(tmp_path / "clients" / "c.key"))


@pytest.mark.parametrize(("user", "kind", "fields", "node", "why"), [
    ("client:c", "generate", {"rid": "r", "prompt": "x"}, None, ""),
    ("admin:o", "admin", {"rid": "r", "op": "status"}, None, ""),
    ("client:c", "admin", {"rid": "r", "op": "status"}, None, "need an admin key"),
    ("node:a", "admin", {"rid": "r", "op": "move"}, "a", "need an admin key"),
    ("client:c", "heartbeat", {}, None, "may not send node messages"),
    ("node:a", "heartbeat", {}, "a", ""),
    ("node:b", "heartbeat", {}, "a", "may not speak for node 'a'"),
    ("node:b", "register", {"name": "a"}, None, "may not speak for node 'a'"),
    ("node:a", "generate", {"rid": "r", "prompt": "x"}, "a", "may not send 'generate'"),
    ("client:c", "info", {}, None, ""),
])
def test_roles(user: str, kind: str, fields: dict, node: str | None, why: str) -> None:
    msg = protocol.Message(kind, {"kind": kind, **fields})
    got = refusal(user, msg, NODE_KINDS, node)
    assert (why in got) if why else got == ""


def test_frame_limits() -> None:
    # SmolLM2-135M (hidden 576) at 8 sessions of 2560 positions: 47 MB of float32
    assert bounds.largest_frame(576, 8, 2560) == 576 * 8 * 2560 * 4 + protocol.MAX_HEADER_BYTES
    # the defaults reach the protocol's own cap
    assert bounds.largest_frame(576, 64, 8192) == protocol.MAX_TENSOR_BYTES + \
        protocol.MAX_HEADER_BYTES


def test_a_keyed_node_keeps_its_heads_combine_on_loopback(tiny_model: Path, tmp_path: Path) -> None:
    """The combine of a stage split by heads has no CURVE: a node with keys refuses to open it
    beyond loopback (and the broker places no split stage under CURVE)."""
    from nodes.node import Node

    keys.make_keys(tmp_path, ["a"])
    cfg = NodeConfig(name="a", model=str(tiny_model), keys=str(tmp_path),
                     group_bind="tcp://0.0.0.0:0")
    with pytest.raises(ConfigError, match="group_bind tcp://0.0.0.0:0 is not loopback"):
        Node(cfg)
