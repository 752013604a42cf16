"""YAML config schemas: shipped files, layer ranges, error messages and dump/load."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from zpipe.config import (
    BrokerConfig,
    ClusterConfig,
    ConfigError,
    NodeConfig,
    PlacementConfig,
    dump,
    load,
    parse_layers,
    validate,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _write(tmp_path: Path, data: object, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _error(tmp_path: Path, data: object, model: type) -> str:
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as ei:
        load(path, model)
    msg = str(ei.value)
    assert msg.startswith(f"{path}: "), msg
    return msg


# --------------------------------------------------------------------------- shipped files


def test_broker_yaml() -> None:
    cfg = load(CONFIGS / "broker.yaml", BrokerConfig)
    assert cfg.bind == "tcp://127.0.0.1:5555" and cfg.model == "smollm2"
    assert cfg.placement.strategy == "uniform" and cfg.placement.nodes == 1
    assert cfg.placement.expected_nodes() == 1
    assert cfg.limits.max_sessions == 256 and cfg.limits.default_max_new_tokens == 128
    assert cfg.step_timeout_s == 120.0


def test_node_yaml() -> None:
    cfg = load(CONFIGS / "node.yaml", NodeConfig)
    assert (cfg.name, cfg.broker, cfg.model, cfg.device, cfg.dtype, cfg.threads) == (
        "a", "tcp://127.0.0.1:5555", "smollm2", "cpu", "float32", None)


def test_local_yaml_uniform_placement() -> None:
    cfg = load(CONFIGS / "local.yaml", ClusterConfig)
    assert [n.name for n in cfg.nodes] == ["a", "b", "c"]
    assert all(n.layers is None for n in cfg.nodes)
    broker = cfg.broker_config()
    assert isinstance(broker, BrokerConfig)
    assert broker.placement.strategy == "uniform"
    assert broker.placement.nodes == ["a", "b", "c"]
    assert broker.placement.expected_nodes() == 3
    assert broker.bind == cfg.broker.bind and broker.model == "smollm2"
    nodes = cfg.node_configs()
    assert [n.name for n in nodes] == ["a", "b", "c"]
    assert all(n.broker == "tcp://127.0.0.1:5555" and n.model == "smollm2" for n in nodes)
    assert all(n.device == "cpu" and n.dtype == "float32" for n in nodes)


def test_local_2_yaml_layers_are_half_open() -> None:
    cfg = load(CONFIGS / "local-2.yaml", ClusterConfig)
    assert [(n.name, n.layers) for n in cfg.nodes] == [("a", (0, 15)), ("b", (15, 30))]
    assert [n.name for n in cfg.node_configs()] == ["a", "b"]


def test_local_2_yaml_broker_config_custom_stages() -> None:
    broker = load(CONFIGS / "local-2.yaml", ClusterConfig).broker_config()
    assert broker.placement.strategy == "custom"
    assert [(s.node, s.layers) for s in broker.placement.stages] == [("a", (0, 15)),
                                                                     ("b", (15, 30))]


def test_node_configs_replace_wildcard_bind() -> None:
    cfg = validate({"broker": {"bind": "tcp://*:6000"}, "model": "m",
                    "nodes": [{"name": "x", "dtype": "bfloat16", "threads": 2,
                               "device": "cuda:1"}]}, ClusterConfig)
    (node,) = cfg.node_configs()
    assert node.broker == "tcp://127.0.0.1:6000"
    assert (node.model, node.dtype, node.threads, node.device) == ("m", "bfloat16", 2, "cuda:1")
    assert cfg.broker_config().bind == "tcp://*:6000"


# --------------------------------------------------------------------------- parse_layers


@pytest.mark.parametrize("value, want", [
    ("0-9", (0, 10)), ("3", (3, 4)), (3, (3, 4)), (0, (0, 1)), (" 2 - 5 ", (2, 6)),
    ("7-7", (7, 8)), ("10-29", (10, 30)),
])
def test_parse_layers(value: object, want: tuple[int, int]) -> None:
    assert parse_layers(value) == want


@pytest.mark.parametrize("value, words", [
    ("9-3", "ends before it starts"), ("a-b", "'a-b'"), (True, "layers must look like"),
    (False, "layers must look like"), ("-1", "'-1'"), ("1-", "'1-'"), ("", "''"),
    (3.0, "3.0"), (None, "None"), ("0-9-12", "'0-9-12'"), ("0..9", "'0..9'"),
])
def test_parse_layers_rejects(value: object, words: str) -> None:
    with pytest.raises(ValueError) as ei:
        parse_layers(value)
    assert words in str(ei.value)


# --------------------------------------------------------------------------- errors


def test_error_names_file_and_list_path(tmp_path: Path) -> None:
    msg = _error(tmp_path, {"nodes": [{"name": "a"}, {"name": "b", "dtype": "fp64"}]},
                 ClusterConfig)
    assert "nodes[1].dtype" in msg and "float32" in msg
    assert "nodes[0]" not in msg


def test_error_unknown_key(tmp_path: Path) -> None:
    msg = _error(tmp_path, {"name": "a", "colour": "red"}, NodeConfig)
    assert msg.endswith("colour: unknown key")
    msg = _error(tmp_path, {"nodes": [{"name": "a", "gpu": 1}]}, ClusterConfig)
    assert "nodes[0].gpu: unknown key" in msg
    msg = _error(tmp_path, {"placement": {"strategy": "uniform", "bogus": 1}}, BrokerConfig)
    assert "placement.bogus: unknown key" in msg
    msg = _error(tmp_path, {"limits": {"max_sessions": 1, "max_session": 2}}, BrokerConfig)
    assert "limits.max_session: unknown key" in msg


def test_error_lists_every_problem(tmp_path: Path) -> None:
    msg = _error(tmp_path, {"name": "a", "device": "gpu0", "dtype": "int8"}, NodeConfig)
    lines = msg.splitlines()
    assert len(lines) == 2 and all(line.startswith(str(tmp_path)) for line in lines)
    assert any("device:" in line and "gpu0" in line for line in lines)
    assert any("dtype:" in line for line in lines)


@pytest.mark.parametrize("device", ["gpu0", "cuda:", "cuda:x", "CPU", "mps", ""])
def test_error_bad_device(tmp_path: Path, device: str) -> None:
    msg = _error(tmp_path, {"name": "a", "device": device}, NodeConfig)
    assert "device: expected 'cpu' or 'cuda:N'" in msg and repr(device) in msg


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "cuda:12"])
def test_good_device(device: str) -> None:
    assert validate({"name": "a", "device": device}, NodeConfig).device == device


@pytest.mark.parametrize("address", ["http://x:1", "tcp://127.0.0.1", "tcp://h:port",
                                     "127.0.0.1:5555", "tcp://a b:1", "ipc://", ""])
def test_error_bad_address(tmp_path: Path, address: str) -> None:
    msg = _error(tmp_path, {"name": "a", "broker": address}, NodeConfig)
    assert "broker: expected a ZeroMQ address" in msg and repr(address) in msg
    msg = _error(tmp_path, {"bind": address}, BrokerConfig)
    assert "bind: expected a ZeroMQ address" in msg
    msg = _error(tmp_path, {"broker": {"bind": address}, "nodes": [{"name": "a"}]},
                 ClusterConfig)
    assert "broker.bind: expected a ZeroMQ address" in msg


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:5555", "tcp://*:1", "ipc:///tmp/z.sock",
                                     "inproc://zp"])
def test_good_address(address: str) -> None:
    assert validate({"bind": address}, BrokerConfig).bind == address


def test_error_bad_node_name(tmp_path: Path) -> None:
    msg = _error(tmp_path, {"name": "a/b"}, NodeConfig)
    assert "name:" in msg
    msg = _error(tmp_path, {"nodes": [{"name": "ok"}, {"name": "x" * 65}]}, ClusterConfig)
    assert "nodes[1].name" in msg


def test_error_custom_stages_not_contiguous(tmp_path: Path) -> None:
    stages = [{"node": "a", "layers": "0-9"}, {"node": "b", "layers": "11-29"}]
    msg = _error(tmp_path, {"placement": {"strategy": "custom", "stages": stages}}, BrokerConfig)
    assert "placement:" in msg and "contiguously" in msg and "'b' starts at 11, expected 10" in msg
    stages = [{"node": "a", "layers": "1-9"}]
    msg = _error(tmp_path, {"placement": {"strategy": "custom", "stages": stages}}, BrokerConfig)
    assert "'a' starts at 1, expected 0" in msg


def test_error_custom_stages_duplicate_node(tmp_path: Path) -> None:
    stages = [{"node": "a", "layers": "0-9"}, {"node": "a", "layers": "10-29"}]
    msg = _error(tmp_path, {"placement": {"strategy": "custom", "stages": stages}}, BrokerConfig)
    assert "placement:" in msg and "one stage only" in msg


def test_error_custom_without_stages(tmp_path: Path) -> None:
    msg = _error(tmp_path, {"placement": {"strategy": "custom"}}, BrokerConfig)
    assert "needs 'stages'" in msg


def test_error_custom_stage_bad_layers(tmp_path: Path) -> None:
    stages = [{"node": "a", "layers": "9-0"}]
    msg = _error(tmp_path, {"placement": {"strategy": "custom", "stages": stages}}, BrokerConfig)
    assert "placement.stages[0].layers" in msg and "ends before it starts" in msg


def test_error_uniform_nodes(tmp_path: Path) -> None:
    msg = _error(tmp_path, {"placement": {"nodes": ["a", "b", "a"]}}, BrokerConfig)
    assert "duplicate node names" in msg
    msg = _error(tmp_path, {"placement": {"nodes": 0}}, BrokerConfig)
    assert "placement.nodes" in msg and "greater than or equal to 1" in msg


def test_custom_stages_ok() -> None:
    cfg = validate({"placement": {"strategy": "custom", "stages": [
        {"node": "a", "layers": "0-9"}, {"node": "b", "layers": 10},
        {"node": "c", "layers": "11-29"}]}}, BrokerConfig)
    assert [(s.node, s.layers) for s in cfg.placement.stages] == [
        ("a", (0, 10)), ("b", (10, 11)), ("c", (11, 30))]
    assert cfg.placement.expected_nodes() == 3


def test_error_layers_for_some_nodes_only(tmp_path: Path) -> None:
    msg = _error(tmp_path, {"nodes": [{"name": "a", "layers": "0-9"}, {"name": "b"}]},
                 ClusterConfig)
    assert "every node or for none" in msg


def test_error_cluster_bad_layers_and_duplicates(tmp_path: Path) -> None:
    msg = _error(tmp_path, {"nodes": [{"name": "a", "layers": "a-b"}]}, ClusterConfig)
    assert "nodes[0].layers" in msg and "'a-b'" in msg
    msg = _error(tmp_path, {"nodes": [{"name": "a"}, {"name": "a"}]}, ClusterConfig)
    assert "duplicate node names" in msg
    msg = _error(tmp_path, {"nodes": []}, ClusterConfig)
    assert "nodes:" in msg
    msg = _error(tmp_path, {"model": "m"}, ClusterConfig)
    assert "nodes: Field required" in msg


def test_error_cluster_layers_not_contiguous(tmp_path: Path) -> None:
    msg = _error(tmp_path, {"nodes": [{"name": "a", "layers": "0-3"},
                                      {"name": "b", "layers": "5-6"}]}, ClusterConfig)
    assert "contiguous" in msg


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just a string\n", "42\n"])
def test_error_not_a_mapping(tmp_path: Path, text: str) -> None:
    msg = _error(tmp_path, text, NodeConfig)
    assert "expected a mapping at the top level" in msg


def test_validate_not_a_mapping_names_source() -> None:
    with pytest.raises(ConfigError, match=r"^src: expected a mapping"):
        validate(["a"], NodeConfig, "src")


def test_error_invalid_yaml(tmp_path: Path) -> None:
    msg = _error(tmp_path, "name: [a\nbroker: x\n", NodeConfig)
    assert "not valid YAML" in msg


def test_error_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as ei:
        load(path, NodeConfig)
    assert str(ei.value).startswith(f"{path}: cannot read")


def test_empty_file_is_empty_mapping(tmp_path: Path) -> None:
    assert load(_write(tmp_path, ""), BrokerConfig) == BrokerConfig()
    msg = _error(tmp_path, "", NodeConfig)
    assert "name: Field required" in msg


# --------------------------------------------------------------------------- dump / load


@pytest.mark.parametrize("name, model", [("broker.yaml", BrokerConfig), ("node.yaml", NodeConfig),
                                         ("local.yaml", ClusterConfig),
                                         ("local-2.yaml", ClusterConfig),
                                         ("gpu-2.yaml", ClusterConfig)])
def test_dump_load_round_trip_shipped(tmp_path: Path, name: str, model: type) -> None:
    cfg = load(CONFIGS / name, model)
    out = tmp_path / name
    dump(cfg, out)
    assert load(out, model) == cfg


def test_dump_writes_layers_inclusive(tmp_path: Path) -> None:
    cfg = load(CONFIGS / "local-2.yaml", ClusterConfig)
    out = tmp_path / "c.yaml"
    dump(cfg, out)
    data = yaml.safe_load(out.read_text())
    assert [n["layers"] for n in data["nodes"]] == ["0-14", "15-29"]
    assert load(out, ClusterConfig).nodes[1].layers == (15, 30)


def test_dump_load_round_trip_custom_stages(tmp_path: Path) -> None:
    cfg = validate({"bind": "ipc:///tmp/b", "step_timeout_s": 2.5, "placement": {
        "strategy": "custom", "stages": [{"node": "x", "layers": "0-0"},
                                         {"node": "y", "layers": "1-31"}]}}, BrokerConfig)
    out = tmp_path / "b.yaml"
    dump(cfg, out)
    data = yaml.safe_load(out.read_text())
    assert [s["layers"] for s in data["placement"]["stages"]] == ["0-0", "1-31"]
    again = load(out, BrokerConfig)
    assert again == cfg
    assert isinstance(again.placement, PlacementConfig)
    assert [s.layers for s in again.placement.stages] == [(0, 1), (1, 32)]


def test_dump_load_round_trip_uniform_names(tmp_path: Path) -> None:
    cfg = validate({"placement": {"nodes": ["b", "a"]}, "limits": {"max_sessions": 3}},
                   BrokerConfig)
    out = tmp_path / "b.yaml"
    dump(cfg, out)
    again = load(out, BrokerConfig)
    assert again == cfg and again.placement.nodes == ["b", "a"]


def test_static_kv_and_busy_poll_reach_the_nodes(monkeypatch) -> None:
    cfg = load(CONFIGS / "gpu-2.yaml", ClusterConfig)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))  # a GPU host
    assert (cfg.broker_config().busy_poll_ms, cfg.broker_config().cpu) == (5, 2)
    assert [n.cpu for n in cfg.node_configs()] == [4, 6]
    for node in cfg.node_configs():
        assert node.static_kv.on(node.device) and node.busy_poll_ms == 5
        assert (node.static_kv.slots, node.static_kv.max_len, node.max_batch) == (64, 2048, 16)
    assert not NodeConfig(name="c").static_kv.on("cpu")  # the CPU keeps its bit-exact path
    assert NodeConfig(name="g", device="cuda:1").static_kv.on("cuda:1")
    with pytest.raises(ConfigError, match="static_kv.slots"):
        validate({"name": "x", "static_kv": {"slots": 0}}, NodeConfig)
    with pytest.raises(ConfigError, match="busy_poll_ms"):
        validate({"name": "x", "busy_poll_ms": -1}, NodeConfig)


def test_cpu_pinning_reaches_the_broker_and_nodes() -> None:
    cfg = validate({"broker": {"cpu": 2}, "nodes": [{"name": "a", "cpu": 4}, {"name": "b"}]},
                   ClusterConfig)
    assert cfg.broker_config().cpu == 2
    assert [n.cpu for n in cfg.node_configs()] == [4, None]
    with pytest.raises(ConfigError, match="cpu"):
        validate({"name": "x", "cpu": -1}, NodeConfig)
    with pytest.raises(ConfigError, match="cpu"):
        validate({"cpu": "all"}, BrokerConfig)


def test_pin_cpus_gives_each_process_a_cpu_of_its_own(monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    three = [{"name": "a"}, {"name": "b"}, {"name": "c"}]
    cfg = validate({"pin_cpus": True, "nodes": three}, ClusterConfig)
    assert cfg.broker_config().cpu == 2
    assert [n.cpu for n in cfg.node_configs()] == [4, 6, 8]
    # a process's own cpu wins, and the others take the CPUs left
    cfg = validate({"pin_cpus": True, "broker": {"cpu": 4}, "nodes": [
        {"name": "a"}, {"name": "b", "cpu": 15}, {"name": "c"}]}, ClusterConfig)
    assert (cfg.broker_config().cpu, [n.cpu for n in cfg.node_configs()]) == (4, [2, 15, 6])
    assert [n.cpu for n in validate({"nodes": three}, ClusterConfig).node_configs()] == [None] * 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    cfg = validate({"pin_cpus": True, "nodes": three}, ClusterConfig)  # checked at start
    with pytest.raises(ConfigError, match=r"pin_cpus: 4 processes need a CPU of their own, but "
                                          r"this machine has 2 to give"):
        cfg.node_configs()


def test_up_says_when_pin_cpus_cannot_be_met(tmp_path: Path, tiny_model: Path, monkeypatch,
                                             capsys) -> None:
    from zpipe.cli.main import main
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": str(tiny_model), "pin_cpus": True,
                                    "nodes": [{"name": "a"}]}))
    with pytest.raises(SystemExit) as e:  # before any process starts
        main(["up", str(path), "--logs", str(tmp_path / "logs")])
    assert e.value.code == 2
    assert (f"{path}: pin_cpus: 2 processes need a CPU of their own, but this machine has 0 "
            "to give" in capsys.readouterr().err)
    assert not (tmp_path / "logs").exists()
