"""Placement: uniform splits and choosing stages from registered nodes."""

from __future__ import annotations

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
