"""The planner's inputs: memory in heartbeats, one pool per host and device, the static KV pool in
the budget, no weight on a figure nodes never send, and a torch.compile fallback that works."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from brokers import rebalance
from brokers.registry import Registry
from nodes.node import Node
from zpipe import protocol
from zpipe.config import BrokerConfig, ConfigError, MixedWeights, NodeConfig, Rebalance, validate
from zpipe.costmodel import ModelCost, NodeCapability, pool_bytes_per_layer
from zpipe.decode import _silu_mul, compiled_or_eager
from zpipe.placement import plan
from zpipe.shard import ModelSpec
from zpipe.slots import SlotPool

GIB = 1 << 30


def _register(reg: Registry, name: str, host: str = "h", device: str = "cpu",
              free: int = 8 * GIB, **extra: int) -> None:
    msg = protocol.decode(protocol.encode(
        "register", name=name, pid=1, host=host, device=device, dtype="float32", model="m",
        num_layers=30, identity={}, mem_total=16 * GIB, mem_free=free, gflops=10.0, **extra))
    reg.add(name.encode(), msg)


def _heartbeat(reg: Registry, name: str, **fields: int) -> None:
    msg = protocol.decode(protocol.encode("heartbeat", **fields))  # the schema checks the fields
    reg.by_name[name].stats.update(msg.header)


# --------------------------------------------------------------------------- 1. heartbeats
def test_budget_is_free_plus_held_from_the_latest_heartbeat() -> None:
    reg = Registry()
    _register(reg, "a", free=8 * GIB)
    assert rebalance.budgets(reg.all()) == {"a": 8 * GIB}  # the register's figures
    # After loading 2 GiB of weights the node reports 6 GiB free and 2 GiB held: the budget is
    # still 8 GiB, not 8 + 2 (the register's free figure beside the weights loaded since).
    _heartbeat(reg, "a", mem_free=6 * GIB, mem_held=2 * GIB, rss=3 * GIB)
    assert reg.by_name["a"].memory() == (6 * GIB, 2 * GIB)
    assert rebalance.budgets(reg.all()) == {"a": 8 * GIB}
    # other processes took 5 GiB meanwhile: the budget shrinks with them
    _heartbeat(reg, "a", mem_free=1 * GIB, mem_held=2 * GIB)
    assert rebalance.budgets(reg.all()) == {"a": 3 * GIB}
    d = reg.by_name["a"].to_dict()
    assert (d["mem_free"], d["mem_held"], d["rss"]) == (1 * GIB, 2 * GIB, 3 * GIB)


def test_a_node_reports_what_it_holds(tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real node's register and heartbeat figures: held = the weights it loaded (CPU)."""
    node = Node(NodeConfig(name="n", model=str(tiny_model), threads=1))
    try:
        before = node.memory()
        assert before["mem_held"] == 0 and before["mem_free"] > 0 and before["rss"] > 0
        weights = node.executor.load(0, 2, epoch=1)
        mem = node.memory()
        assert mem["mem_held"] == weights > 0
        protocol.encode("heartbeat", rss=mem["rss"], mem_free=mem["mem_free"],
                        mem_held=mem["mem_held"])
        sent: list = []

        async def send(frames: list) -> None:
            sent.append(protocol.decode(frames))
        monkeypatch.setattr(node, "send", send)
        import asyncio
        asyncio.run(node._register())
        reg = sent[0]
        assert reg.kind == "register" and reg["mem_held"] == weights
        assert "kv_slots" not in reg.header  # no static pool on the CPU by default
    finally:
        node.pool.shutdown(wait=False)


# --------------------------------------------------------------------------- 2. one host
def test_nodes_sharing_a_host_share_its_free_memory() -> None:
    reg = Registry()
    for name in "ab":  # two CPU nodes on host h: each reports the whole host
        _register(reg, name, host="h", free=8 * GIB)
    _register(reg, "c", host="other", free=8 * GIB)
    _register(reg, "g", host="h", device="cuda:0", free=40 * GIB)
    _heartbeat(reg, "a", mem_free=6 * GIB, mem_held=1 * GIB)
    _heartbeat(reg, "b", mem_free=7 * GIB, mem_held=0)
    got = rebalance.budgets(reg.all())
    # one pool of 6 GiB (the least report: a's load shows in it) split in two, + what each holds
    assert got == {"a": 3 * GIB + 1 * GIB, "b": 3 * GIB, "c": 8 * GIB, "g": 40 * GIB}
    assert got["a"] + got["b"] == 6 * GIB + 1 * GIB  # never more than the host has


# --------------------------------------------------------------------------- 3. static KV pool
def test_the_static_kv_pool_is_in_the_budget(tiny_model) -> None:
    spec = ModelSpec.load(tiny_model)
    reg = Registry()
    _register(reg, "g", device="cuda:0", free=4 * GIB, kv_slots=64, kv_max_len=2048)
    _register(reg, "x", free=4 * GIB, kv_slots=0, kv_max_len=0)
    broker = SimpleNamespace(registry=reg, spec=spec, measured={})
    per_layer = rebalance.kv_per_layer(reg.by_name["g"], spec)
    assert rebalance.kv_per_layer(reg.by_name["x"], spec) is None
    # what the pool really allocates per layer (65 slots: one is scratch)
    pool = SlotPool(range(2), spec.num_kv_heads, spec.head_dim, 4, 32, torch.float32, "cpu")
    real = sum(t.nbytes for t in [*pool.k.values(), *pool.v.values()]) // 2
    assert real == pool_bytes_per_layer(4, 32, spec.num_kv_heads, spec.head_dim, 4)
    assert per_layer == pool_bytes_per_layer(64, 2048, spec.num_kv_heads, spec.head_dim, 4)
    caps = rebalance.capabilities(broker, ModelCost.from_spec(spec, 4))
    assert caps["g"].kv_bytes_per_layer == per_layer and caps["x"].kv_bytes_per_layer is None

    # The planner budgets the pool, not 8 sessions × 2048 tokens: a node whose budget holds 3
    # layers with their pool gets 3 layers, however small the configured KV budget.
    cost = ModelCost(num_layers=8, layer_weight_bytes=100, layer_flops_per_token=1e6,
                     kv_bytes_per_token_per_layer=1, embed_bytes=0, head_bytes=0,
                     head_flops_per_token=0.0)
    pooled = NodeCapability("g", 10.0, 3 * (100 + 10_000), kv_bytes_per_layer=10_000)
    other = NodeCapability("x", 10.0, 10**9)
    res = plan("uniform", [pooled, other], cost, context_len=16, sessions=1)
    assert [s.end - s.start for s in res.stages] == [3, 5]
    assert res.kv_bytes[0] == 3 * 10_000 and res.memory_bytes[0] <= res.budget_bytes[0]


# --------------------------------------------------------------------------- 4. no bandwidth
def test_no_weight_on_a_figure_no_node_sends() -> None:
    with pytest.raises(ValueError, match="no node measures link bandwidth"):
        MixedWeights(bandwidth=0.2)
    with pytest.raises(ConfigError, match="placement.weights: 'bandwidth' is no longer"):
        validate({"placement": {"weights": {"compute": 1, "bandwidth": 0.2}}}, BrokerConfig)
    with pytest.raises(ConfigError, match="'threshold' is no longer a setting.*min_gain"):
        validate({"rebalance": {"threshold": 0.15}}, BrokerConfig)
    assert Rebalance().min_gain == 0.15 and Rebalance().perf_weight == 1.0
    assert not hasattr(NodeCapability("a", 1.0, 1), "bandwidth_bytes_s")
    # the mixed weights are what they say: 0.6 compute + 0.4 memory
    cost = ModelCost(num_layers=10, layer_weight_bytes=1, layer_flops_per_token=1e6,
                     kv_bytes_per_token_per_layer=0, embed_bytes=0, head_bytes=0,
                     head_flops_per_token=0.0)
    caps = [NodeCapability("a", 40.0, 10**6), NodeCapability("b", 10.0, 10**6)]
    res = plan("mixed", caps, cost, context_len=1, sessions=1, calibrate=False)
    assert [s.end - s.start for s in res.stages] == [7, 3]  # a: .6 × .8 + .4 × .5 = .68 of 10


# --------------------------------------------------------------------------- 5. compile
def test_compile_fallback_runs_uncompiled_when_compiling_fails(
        caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def broken(gm, example_inputs):  # a compiler backend that cannot compile anything
        calls.append(1)
        raise RuntimeError("no compiler here")

    x = torch.randn(2, 8)
    torch._dynamo.reset()
    # torch.compile itself accepts it: the failure comes at the first call
    lazy = torch.compile(_silu_mul, dynamic=True, backend=broken)
    assert not calls
    with caplog.at_level(logging.WARNING, logger="zpipe.decode"):
        f = compiled_or_eager(_silu_mul, x, backend=broken)
    assert calls and f is _silu_mul
    assert "torch.compile of _silu_mul failed" in caplog.text and "no compiler here" in caplog.text
    assert torch.equal(f(x), _silu_mul(x))
    del lazy
    torch._dynamo.reset()
    # a backend that works: the compiled function is kept, and computes the same
    g = compiled_or_eager(_silu_mul, x, backend="eager")
    assert g is not _silu_mul and torch.allclose(g(x), _silu_mul(x))
    torch._dynamo.reset()
