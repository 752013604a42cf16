"""Placement: uniform splits and choosing stages from registered nodes."""

from __future__ import annotations

import dataclasses
import itertools
from itertools import pairwise

import pytest

from zpipe.config import PlacementConfig
from zpipe.placement import Placement, PlacementError, StageAssignment, choose, uniform


def _spans(stages: list[StageAssignment]) -> list[tuple[str, int, int]]:
    return [(s.node, s.start, s.end) for s in stages]


def _custom(*stages: tuple[str, str]) -> PlacementConfig:
    return PlacementConfig.model_validate({
        "strategy": "custom", "stages": [{"node": n, "layers": r} for n, r in stages]})


def test_uniform_even() -> None:
    assert _spans(uniform(["a", "b", "c"], 30)) == [("a", 0, 10), ("b", 10, 20), ("c", 20, 30)]


def test_uniform_remainder_goes_to_earlier_stages() -> None:
    assert [s.end - s.start for s in uniform(["a", "b", "c"], 7)] == [3, 2, 2]
    assert [s.end - s.start for s in uniform(["a", "b", "c", "d"], 30)] == [8, 8, 7, 7]


def test_uniform_single_node_and_one_layer_each() -> None:
    assert _spans(uniform(["only"], 5)) == [("only", 0, 5)]
    assert _spans(uniform(["a", "b", "c"], 3)) == [("a", 0, 1), ("b", 1, 2), ("c", 2, 3)]


@pytest.mark.parametrize("n_nodes", range(1, 9))
@pytest.mark.parametrize("num_layers", [8, 9, 13, 30, 31])
def test_uniform_contiguous_covering_balanced(n_nodes: int, num_layers: int) -> None:
    names = [f"n{i}" for i in range(n_nodes)]
    stages = uniform(names, num_layers)
    assert [s.node for s in stages] == names
    assert stages[0].start == 0 and stages[-1].end == num_layers
    assert all(a.end == b.start for a, b in pairwise(stages))
    sizes = [s.end - s.start for s in stages]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)


def test_uniform_errors() -> None:
    with pytest.raises(PlacementError, match="4 nodes but only 3 layers"):
        uniform(["a", "b", "c", "d"], 3)
    with pytest.raises(PlacementError, match="no nodes"):
        uniform([], 30)


def test_placement_helpers() -> None:
    p = Placement(epoch=2, stages=uniform(["a", "b"], 4))
    assert p.nodes() == ["a", "b"]
    assert p.to_list() == [{"node": "a", "start": 0, "end": 2}, {"node": "b", "start": 2, "end": 4}]


# --------------------------------------------------------------------------- choose


def test_choose_custom() -> None:
    cfg = _custom(("a", "0-9"), ("b", "10-29"))
    stages = choose(cfg, ["b", "a", "extra"], 30)
    assert _spans(stages) == [("a", 0, 10), ("b", 10, 30)]


def test_choose_custom_waits_for_missing_nodes() -> None:
    cfg = _custom(("a", "0-9"), ("b", "10-19"), ("c", "20-29"))
    with pytest.raises(PlacementError) as ei:
        choose(cfg, ["b"], 30)
    assert str(ei.value) == "waiting for node(s) a, c"
    with pytest.raises(PlacementError, match="waiting for node"):
        choose(cfg, [], 30)


@pytest.mark.parametrize("num_layers", [29, 32])
def test_choose_custom_coverage_mismatch(num_layers: int) -> None:
    cfg = _custom(("a", "0-9"), ("b", "10-29"))
    with pytest.raises(PlacementError) as ei:
        choose(cfg, ["a", "b"], num_layers)
    assert "cover layers 0-29" in str(ei.value) and f"has {num_layers} layers" in str(ei.value)


def test_choose_uniform_names_in_config_order() -> None:
    cfg = PlacementConfig(strategy="uniform", nodes=["c", "a", "b"])
    stages = choose(cfg, ["a", "b", "c", "z"], 30)
    assert _spans(stages) == [("c", 0, 10), ("a", 10, 20), ("b", 20, 30)]


def test_choose_uniform_names_waits() -> None:
    cfg = PlacementConfig(strategy="uniform", nodes=["c", "a", "b"])
    with pytest.raises(PlacementError) as ei:
        choose(cfg, ["a", "z"], 30)
    assert str(ei.value) == "waiting for node(s) c, b"


def test_choose_uniform_names_too_many_nodes() -> None:
    cfg = PlacementConfig(strategy="uniform", nodes=["a", "b", "c"])
    with pytest.raises(PlacementError, match="3 nodes but only 2 layers"):
        choose(cfg, ["a", "b", "c"], 2)


def test_choose_uniform_count_orders_by_name() -> None:
    cfg = PlacementConfig(strategy="uniform", nodes=3)
    stages = choose(cfg, ["n2", "n0", "n3", "n1"], 7)
    assert _spans(stages) == [("n0", 0, 3), ("n1", 3, 5), ("n2", 5, 7)]


@pytest.mark.parametrize("registered", [[], ["x"], ["x", "y"]])
def test_choose_uniform_count_waits(registered: list[str]) -> None:
    cfg = PlacementConfig(strategy="uniform", nodes=3)
    with pytest.raises(PlacementError) as ei:
        choose(cfg, registered, 30)
    assert f"{len(registered)}/3 registered" in str(ei.value)


def test_choose_default_config_takes_one_node() -> None:
    stages = choose(PlacementConfig(), ["b", "a"], 30)
    assert _spans(stages) == [("a", 0, 30)]


# --------------------------------------------------------------------------- plan: the numbers

import math  # noqa: E402
import random  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from zpipe.config import MixedWeights  # noqa: E402
from zpipe.costmodel import ModelCost, NodeCapability, measured_s_per_layer  # noqa: E402
from zpipe.placement import (  # noqa: E402
    NEAR,
    apportion,
    calibration,
    evaluate,
    mixed_weights,
    plan,
)

MB = 1_000_000
# 30 layers of 10 MB and 2 GFLOP per token; KV 1 kB per token per layer; 50 MB embed and head.
COST = ModelCost(num_layers=30, layer_weight_bytes=10 * MB, layer_flops_per_token=2e9,
                 kv_bytes_per_token_per_layer=1000, embed_bytes=50 * MB, head_bytes=50 * MB,
                 head_flops_per_token=0.0)
BIG = 10**12  # a memory budget that never binds


def _caps(gflops: list[float], mem: list[int] | None = None, **kw: list) -> list[NodeCapability]:
    mem = mem or [BIG] * len(gflops)
    extra = [{k: v[i] for k, v in kw.items()} for i in range(len(gflops))]
    return [NodeCapability(f"n{i}", g, m, **e)
            for i, (g, m, e) in enumerate(zip(gflops, mem, extra, strict=True))]


def _counts(res) -> list[int]:
    return [s.end - s.start for s in res.stages]


def _check_valid(res, cost: ModelCost) -> None:
    assert res.stages[0].start == 0 and res.stages[-1].end == cost.num_layers
    assert all(a.end == b.start for a, b in pairwise(res.stages))
    assert min(_counts(res)) >= 1
    assert all(m <= b for m, b in zip(res.memory_bytes, res.budget_bytes, strict=True))
    assert len(res.predicted_s) == len(res.memory_bytes) == len(res.stages)


def _tiny_spec(tied: bool = False) -> SimpleNamespace:
    return SimpleNamespace(num_layers=6, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                           vocab_size=512, tie_word_embeddings=tied,
                           config=SimpleNamespace(intermediate_size=128))


def test_model_cost_from_spec_llama_arithmetic() -> None:
    c = ModelCost.from_spec(_tiny_spec(), dtype_bytes=2)
    params = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64  # q, k+v, o, mlp, norms
    assert c.layer_weight_bytes == 2 * params
    assert c.layer_flops_per_token == 2 * params
    assert c.kv_bytes_per_token_per_layer == 2 * 2 * 16 * 2
    assert c.embed_bytes == 512 * 64 * 2 and c.head_bytes == (512 * 64 + 64) * 2
    assert c.head_flops_per_token == 2 * 512 * 64
    assert c.fixed_bytes(True, False) == c.embed_bytes
    assert c.fixed_bytes(False, True) == c.head_bytes
    assert c.fixed_bytes(True, True) == c.embed_bytes + c.head_bytes
    tied = ModelCost.from_spec(_tiny_spec(tied=True), dtype_bytes=2)
    assert tied.fixed_bytes(True, True) == tied.head_bytes  # one copy when one stage holds both
    assert tied.fixed_bytes(True, False) == tied.embed_bytes  # a copy on each of two stages


def test_model_cost_matches_the_real_files(tiny_model) -> None:
    from safetensors import safe_open

    from zpipe.shard import ModelSpec, _weight_files

    spec = ModelSpec.load(tiny_model)
    c = ModelCost.from_spec(spec, dtype_bytes=4)
    sizes: dict[str, int] = {}
    for name, path in _weight_files(tiny_model).items():
        with safe_open(path, framework="pt") as f:
            sl = f.get_slice(name)
            sizes[name] = math.prod(sl.get_shape()) * 4
    assert c.layer_weight_bytes == sum(v for k, v in sizes.items()
                                       if k.startswith("model.layers.0."))
    assert c.embed_bytes == sizes["model.embed_tokens.weight"]
    assert c.head_bytes == sizes["model.norm.weight"] + sizes.get(
        "lm_head.weight", sizes["model.embed_tokens.weight"])


def test_plan_uniform_matches_uniform() -> None:
    for n in range(1, 6):
        res = plan("uniform", _caps([1.0] * n), COST, context_len=1, sessions=1)
        assert res.stages == uniform([f"n{i}" for i in range(n)], 30)


def test_compute_gives_a_3x_faster_node_3x_the_layers() -> None:
    res = plan("compute", _caps([10, 30, 10]), COST, context_len=1, sessions=1)
    assert _counts(res) == [6, 18, 6]
    # 6 layers × 2 GFLOP / 10 GFLOP/s = 1.2 s; 18 × 2 / 30 = 1.2 s
    assert res.predicted_s == pytest.approx([1.2, 1.2, 1.2])
    assert res.step_s == pytest.approx(3.6) and res.bottleneck_s == pytest.approx(1.2)
    assert res.shares() == pytest.approx({"n0": 1 / 3, "n1": 1 / 3, "n2": 1 / 3})
    _check_valid(res, COST)


def test_compute_counts_the_head_on_the_last_stage() -> None:
    cost = dataclasses.replace(COST, head_flops_per_token=8e9)  # the head: 4 layers' worth
    res = plan("compute", _caps([10, 10, 10]), cost, context_len=1, sessions=1)
    assert _counts(res) == [12, 11, 7]  # 2.4, 2.2, (7 + 4) × 0.2 = 2.2 s
    assert res.predicted_s == pytest.approx([2.4, 2.2, 2.2])
    assert res.predicted_s[2] == pytest.approx((7 * 2e9 + 8e9) / 10e9)


def test_compute_every_node_gets_a_layer() -> None:
    res = plan("compute", _caps([1000, 1, 1]), COST, context_len=1, sessions=1)
    assert _counts(res) == [28, 1, 1]


def test_compute_respects_memory_shifting_layers_away() -> None:
    # n1 is 3x faster but its budget holds only 10 layers (10 MB + 2048 × 8 × 1 kB KV each)
    per = COST.layer_bytes(2048, 8)
    assert per == 10 * MB + 2048 * 8 * 1000
    caps = _caps([10, 30, 10], [BIG, 10 * per + per // 2, BIG])
    res = plan("compute", caps, COST, context_len=2048, sessions=8)
    assert _counts(res) == [10, 10, 10]
    _check_valid(res, COST)
    assert res.memory_bytes[1] == 10 * per and res.kv_bytes[1] == 10 * 2048 * 8 * 1000


def test_memory_strategy_proportional_to_room_for_layers() -> None:
    per = COST.layer_bytes(1024, 4)
    # room for layers: 10, 20, 30 layers' worth (first pays the embed, last the head)
    mem = [50 * MB + 10 * per, 20 * per, 50 * MB + 30 * per]
    res = plan("memory", _caps([1, 1, 1], mem), COST, context_len=1024, sessions=4)
    assert _counts(res) == [5, 10, 15]
    _check_valid(res, COST)
    assert res.memory_bytes[0] == 5 * per + 50 * MB and res.budget_bytes == mem


def test_memory_strategy_tight_budgets_fill_up() -> None:
    per = COST.layer_bytes(1024, 4)
    mem = [50 * MB + 4 * per, 16 * per + 1, 50 * MB + 10 * per]  # room for exactly 30
    res = plan("memory", _caps([1, 1, 1], mem), COST, context_len=1024, sessions=4)
    assert _counts(res) == [4, 16, 10]
    _check_valid(res, COST)


def test_infeasible_is_refused_with_the_numbers() -> None:
    per = COST.layer_bytes(2048, 8)  # 10 MB + 16.384 MB = 26.384 MB
    mem = [50 * MB + 9 * per, 9 * per, 50 * MB + 9 * per]  # room for 27 of 30 layers
    for strategy in ("uniform", "memory", "compute", "mixed"):
        with pytest.raises(PlacementError) as ei:
            plan(strategy, _caps([1, 1, 1], mem), COST, context_len=2048, sessions=8)
        msg = str(ei.value)
        assert "does not fit" in msg and "room for 27 of 30 layers" in msg
        assert "2048 tokens × 8 sessions" in msg
        assert f"{per / 2**20:,.1f} MiB" in msg  # what one layer needs
        need = 30 * per + 100 * MB
        assert f"it needs {need / 2**20:,.1f} MiB" in msg
        assert f"the nodes have {sum(mem) / 2**20:,.1f} MiB" in msg
        for i, m in enumerate(mem):
            assert f"n{i}: budget {m / 2**20:,.1f} MiB" in msg and "room for 9 layer(s)" in msg


def test_a_node_too_small_for_one_layer_is_left_out() -> None:
    res = plan("compute", _caps([10, 10, 10], [BIG, 1 * MB, BIG]), COST, context_len=1,
               sessions=1)
    assert [s.node for s in res.stages] == ["n0", "n2"] and _counts(res) == [15, 15]
    assert any("n1 left out" in n for n in res.notes)


def test_mixed_weights() -> None:
    caps = _caps([100, 300], [400, 100])
    got = mixed_weights(caps, [100, 300], MixedWeights(compute=0.5, memory=0.3))
    assert got == pytest.approx([0.625 * 0.25 + 0.375 * 0.8, 0.625 * 0.75 + 0.375 * 0.2])
    assert mixed_weights(caps, [100, 300], MixedWeights(compute=0, memory=0)) == [0.5, 0.5]


def test_mixed_apportions_by_weight() -> None:
    # compute 1:3, memory 3:1 → weights 0.5·(.25,.75) + 0.5·(.75,.25) = (.5, .5)
    caps = _caps([10, 30], [3 * 10**11, 10**11])
    res = plan("mixed", caps, COST, context_len=1, sessions=1,
               weights=MixedWeights(compute=0.5, memory=0.5))
    assert _counts(res) == [15, 15]
    res = plan("mixed", caps, COST, context_len=1, sessions=1,
               weights=MixedWeights(compute=1.0, memory=0.0))
    assert _counts(res) == [8, 22]  # 7.5 / 22.5: the tie goes to the earlier stage


def test_custom_passthrough_and_checks() -> None:
    custom = [StageAssignment("n1", 0, 4), StageAssignment("n0", 4, 30)]
    res = plan("custom", _caps([10, 30]), COST, context_len=1, sessions=1, custom=custom)
    assert res.stages == custom and res.strategy == "custom"
    assert res.predicted_s == pytest.approx([4 * 2 / 30, 26 * 2 / 10])
    with pytest.raises(PlacementError, match="cover layers 0-3 but the model has 30"):
        plan("custom", _caps([1, 1]), COST, context_len=1, sessions=1, custom=custom[:1])
    with pytest.raises(PlacementError, match="needs the stages"):
        plan("custom", _caps([1]), COST, context_len=1, sessions=1)
    with pytest.raises(PlacementError, match=r"n0 layers 4-29 need .* budget 100\.0 MiB"):
        plan("custom", _caps([1, 1], [100 * 2**20, BIG]), COST, context_len=1, sessions=1,
             custom=custom)


def test_predicted_time_blends_measured_speed() -> None:
    # capability: 2 GFLOP / 10 GFLOP/s = 0.2 s per layer; measured 1.0 s per layer on n0
    caps = _caps([10, 10], measured_s_per_layer=[1.0, None])
    res = plan("uniform", caps, COST, context_len=1, sessions=1, perf_weight=0.3,
               calibrate=False)
    assert res.predicted_s == pytest.approx([15 * (0.7 * 0.2 + 0.3 * 1.0), 15 * 0.2])
    res = plan("uniform", caps, COST, context_len=1, sessions=1, perf_weight=0.0,
               calibrate=False)
    assert res.predicted_s == pytest.approx([3.0, 3.0])
    res = plan("uniform", caps, COST, context_len=1, sessions=1, perf_weight=1.0,
               calibrate=False)
    assert res.predicted_s == pytest.approx([15.0, 3.0])


def test_calibration_puts_capability_on_the_measured_scale() -> None:
    # capability says 0.2 s per layer everywhere; n0, n1 measure 1.0, n2 (slowed) 3.0, n3 new
    caps = _caps([10, 10, 10, 10], measured_s_per_layer=[1.0, 1.0, 3.0, None])
    assert calibration(caps, COST) == pytest.approx(5.0)  # median of 5, 5, 15
    res = evaluate(uniform([c.name for c in caps], 28), caps,
                   dataclasses.replace(COST, num_layers=28), context_len=1, sessions=1,
                   perf_weight=0.3)
    assert res.predicted_s == pytest.approx([7 * 1.0, 7 * 1.0, 7 * (0.7 + 0.9), 7 * 1.0])
    # compute with measured speed blended: the slow node gets fewer layers, the new one its share
    res = plan("compute", caps, COST, context_len=1, sessions=1, perf_weight=0.3)
    counts = _counts(res)
    assert counts[2] < counts[0] and counts[3] >= counts[0] - 1
    assert max(res.predicted_s) - min(res.predicted_s) <= 1.6 + 1e-9  # within a layer's time


def test_measured_s_per_layer_counts_the_head() -> None:
    cost = dataclasses.replace(COST, head_flops_per_token=4e9)  # 2 layers' worth
    assert measured_s_per_layer(1.2, 0, 6, cost) == pytest.approx(0.2)
    assert measured_s_per_layer(1.6, 24, 30, cost) == pytest.approx(0.2)  # 6 + 2 layer-eq


def test_plan_rejects_bad_input() -> None:
    with pytest.raises(PlacementError, match="unknown strategy"):
        plan("fastest", _caps([1]), COST, context_len=1, sessions=1)
    with pytest.raises(PlacementError, match="no nodes"):
        plan("compute", [], COST, context_len=1, sessions=1)
    with pytest.raises(PlacementError, match="gflops must be > 0"):
        plan("compute", _caps([0.0]), COST, context_len=1, sessions=1)
    with pytest.raises(PlacementError, match="duplicate"):
        plan("compute", _caps([1])*2, COST, context_len=1, sessions=1)
    with pytest.raises(PlacementError, match="31 nodes but only 30 layers"):
        plan("compute", _caps([1] * 31), COST, context_len=1, sessions=1)


def test_apportion_bounds_and_rounding() -> None:
    assert apportion([1, 1, 1, 1], 30, [1] * 4, [30] * 4) == [8, 8, 7, 7]
    assert apportion([100, 1, 1], 30, [1] * 3, [30] * 3) == [28, 1, 1]
    assert apportion([1, 1, 1], 30, [1] * 3, [5, 30, 30]) == [5, 13, 12]
    assert apportion([0, 0], 3, [1, 1], [3, 3]) == [2, 1]
    with pytest.raises(PlacementError):
        apportion([1, 1], 30, [1, 1], [10, 10])


@pytest.mark.parametrize("seed", range(40))
def test_every_strategy_valid_on_random_nodes(seed: int) -> None:
    rng = random.Random(seed)
    k = rng.randint(1, 6)
    n_layers = rng.randint(k, 40)
    cost = dataclasses.replace(COST, num_layers=n_layers,
                               head_flops_per_token=rng.choice([0.0, 4e9, 20e9]))
    per = cost.layer_bytes(64, 2)
    caps = [NodeCapability(f"x{i}", rng.uniform(1, 100),
                           100 * MB + rng.randint(1, 2 * n_layers // k + 1) * per,
                           rng.choice([None, rng.uniform(0.01, 1)]),
                           rng.choice([None, per // 2])) for i in range(k)]
    for strategy in ("uniform", "memory", "compute", "mixed"):
        try:
            res = plan(strategy, caps, cost, context_len=64, sessions=2,
                       perf_weight=rng.random())
        except PlacementError as e:
            assert "does not fit" in str(e)
            continue
        _check_valid(res, cost)
        assert [s.node for s in res.stages] == [c.name for c in caps][:len(res.stages)] or \
            res.notes


# --------------------------------------------------------------------------- choose + caps
def test_choose_with_caps_plans_and_without_falls_back_to_uniform() -> None:
    cfg = PlacementConfig(strategy="compute", nodes=["b", "a", "c"], context_len=16, sessions=1)
    caps = {c.name: c for c in [NodeCapability("a", 30, BIG), NodeCapability("b", 10, BIG),
                                NodeCapability("c", 10, BIG)]}
    assert _spans(choose(cfg, ["a", "b", "c"], 30)) == _spans(uniform(["b", "a", "c"], 30))
    stages = choose(cfg, ["a", "b", "c"], 30, caps=caps, cost=COST)
    assert _spans(stages) == [("b", 0, 6), ("a", 6, 24), ("c", 24, 30)]
    cfg = PlacementConfig(strategy="memory", nodes=2, context_len=16, sessions=1)
    stages = choose(cfg, ["c", "b", "a"], 30, caps=caps, cost=COST)
    assert [s.node for s in stages] == ["a", "b"]
    tight = {**caps, "a": NodeCapability("a", 30, 1000)}
    with pytest.raises(PlacementError, match="does not fit"):
        choose(PlacementConfig(strategy="mixed", nodes=["a"]), ["a"], 30, caps=tight, cost=COST)
    custom = _custom(("a", "0-9"), ("b", "10-29"))
    assert _spans(choose(custom, ["a", "b"], 30, caps=caps, cost=COST))[0] == ("a", 0, 10)
    with pytest.raises(PlacementError, match="do not fit"):
        choose(custom, ["a", "b"], 30, caps=tight, cost=COST)


# --------------------------------------------------------------------------- perf re-plans
# 30 layers; the head is 8 layers' work (a small model's lm_head); 1 s per layer at 10 GFLOP/s
HEADY = dataclasses.replace(COST, layer_flops_per_token=10e9, head_flops_per_token=80e9)


def test_one_session_leaves_a_slow_node_out_many_balance_the_slowest_stage() -> None:
    """b is 3x slower per layer (measured). One session waits for every stage in turn: the
    fastest plan leaves b out. Many sessions are limited by the slowest stage: b keeps a share."""
    caps = _caps([10, 10, 10], measured_s_per_layer=[1.0, 3.0, 1.0])
    one = plan("compute", caps, HEADY, context_len=1, sessions=1, perf_weight=1.0,
               concurrency=1)
    assert [s.node for s in one.stages] == ["n0", "n2"] and any("n1" in n for n in one.notes)
    assert one.step_s == pytest.approx(30 + 8)  # every layer at 1 s, the head's 8
    assert _counts(one) == [19, 11]  # of the equal sums, the lowest slowest stage
    uniform3 = evaluate(uniform(["n0", "n1", "n2"], 30), caps, HEADY, context_len=1, sessions=1,
                        perf_weight=1.0)
    assert uniform3.per_token_s(1) == pytest.approx(10 + 30 + 18)
    # n2 measured 1% faster than n0: within what a measurement tells apart, so the plan stays
    # balanced over both instead of giving n2 all 30 layers
    near = _caps([10, 10, 10], measured_s_per_layer=[1.0, 3.0, 0.99])
    res = plan("compute", near, HEADY, context_len=1, sessions=1, perf_weight=1.0,
               concurrency=1)
    assert [s.node for s in res.stages] == ["n0", "n2"] and min(_counts(res)) >= 10
    many = plan("compute", caps, HEADY, context_len=1, sessions=1, perf_weight=1.0,
                concurrency=16)
    assert [s.node for s in many.stages] == ["n0", "n1", "n2"]
    minmax = plan("compute", caps, HEADY, context_len=1, sessions=1, perf_weight=1.0)
    assert many.bottleneck_s == pytest.approx(minmax.bottleneck_s)
    assert many.per_token_s(16) == pytest.approx(16 * many.bottleneck_s)


@pytest.mark.parametrize("seed", range(30))
def test_least_time_is_near_optimal_on_small_cases(seed: int) -> None:
    """Against every split of a few layers over the nodes in order (each node 0 or more): within
    NEAR (5%) of the least time, where it may choose a more balanced plan."""
    rng = random.Random(seed)
    k, n = rng.randint(1, 3), rng.randint(3, 7)
    cost = dataclasses.replace(HEADY, num_layers=n, head_flops_per_token=rng.choice([0, 20e9]))
    caps = _caps([10] * k, measured_s_per_layer=[rng.uniform(0.5, 4) for _ in range(k)])
    s = rng.choice([1, 2, 5])
    got = plan("compute", caps, cost, context_len=1, sessions=1, perf_weight=1.0, concurrency=s)
    _check_valid(got, cost)
    best = math.inf
    for split in itertools.product(range(n + 1), repeat=k):
        if sum(split) != n:
            continue
        keep = [(c, m) for c, m in zip(caps, split, strict=True) if m]
        stages, start = [], 0
        for c, m in keep:
            stages.append(StageAssignment(c.name, start, start + m))
            start += m
        res = evaluate(stages, caps, cost, context_len=1, sessions=1, perf_weight=1.0)
        best = min(best, res.per_token_s(s))
    assert best <= got.per_token_s(s) * (1 + 1e-9) <= best * (1 + NEAR) + 1e-9


def test_max_layers_caps_a_node_whatever_the_strategy() -> None:
    caps = _caps([10, 30, 10])  # the prior says n1 is 3x faster
    free = plan("compute", caps, COST, context_len=1, sessions=1)
    assert _counts(free)[1] > 10
    for strategy in ("compute", "mixed", "memory", "uniform"):
        res = plan(strategy, caps, COST, context_len=1, sessions=1, max_layers={"n1": 4})
        assert _counts(res)[1] <= 4 and sum(_counts(res)) == 30
    res = plan("compute", caps, COST, context_len=1, sessions=1, max_layers={"n1": 4},
               concurrency=1)
    assert dict(zip([s.node for s in res.stages], _counts(res), strict=True)).get("n1", 0) <= 4
    with pytest.raises(PlacementError, match="leave room for 2 of 30"):
        plan("uniform", caps, COST, context_len=1, sessions=1,
             max_layers={"n0": 1, "n1": 0, "n2": 1})
