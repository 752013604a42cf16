"""Head splits in the YAML and in the placement: parsed, checked, joined into split stages."""

from __future__ import annotations

import pytest

from zpipe.config import ClusterConfig, ConfigError, PlacementConfig, validate
from zpipe.heads import split_heads
from zpipe.placement import Placement, PlacementError, StageAssignment, choose, custom_stages


def _cluster(nodes: list[dict]) -> ClusterConfig:
    return validate({"nodes": nodes}, ClusterConfig)


MIXED = [{"name": "a", "layers": "0-14"}, {"name": "b", "layers": "15-29", "heads": "0-1"},
         {"name": "c", "layers": "15-29", "heads": 2}]


def test_mixed_pipeline_from_yaml() -> None:
    cfg = _cluster(MIXED)
    assert [n.heads for n in cfg.nodes] == [None, (0, 2), (2, 3)]
    pc = cfg.broker_config().placement
    assert pc.strategy == "custom"
    stages = choose(pc, ["a", "b", "c"], 30, kv_heads=3)
    assert stages == [StageAssignment("a", 0, 15),
                      StageAssignment("b", 15, 30, (("b", 0, 2), ("c", 2, 3)))]
    p = Placement(1, stages)
    assert p.nodes() == ["a", "b", "c"] and p.split()
    assert p.to_list()[1]["heads"] == [["b", 0, 2], ["c", 2, 3]]
    assert not Placement(1, [StageAssignment("a", 0, 30)]).split()


def test_two_split_stages_in_a_row() -> None:
    pc = _cluster([{"name": "a", "layers": "0-2", "heads": "0"},
                   {"name": "b", "layers": "0-2", "heads": "1"},
                   {"name": "c", "layers": "3-5", "heads": "0"},
                   {"name": "d", "layers": "3-5", "heads": "1"}]).broker_config().placement
    stages = custom_stages(pc, kv_heads=2)
    assert [s.members() for s in stages] == [["a", "b"], ["c", "d"]]


@pytest.mark.parametrize("nodes, why", [
    ([{"name": "a", "layers": "0-5", "heads": "1-2"}], "start at 0"),
    ([{"name": "a", "layers": "0-5", "heads": "0"}, {"name": "b", "layers": "0-5",
                                                       "heads": "2"}], "go on from 1"),
    ([{"name": "a", "heads": "0"}], "'heads' needs 'layers'"),
    ([{"name": "a", "layers": "0-2", "heads": "0"}, {"name": "b", "layers": "0-3",
                                                       "heads": "1"}], "contiguously"),
])
def test_bad_head_splits_refused(nodes: list[dict], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        _cluster(nodes)


def test_split_must_cover_every_kv_head() -> None:
    pc = validate({"strategy": "custom", "stages": [
        {"node": "a", "layers": "0-5", "heads": "0"},
        {"node": "b", "layers": "0-5", "heads": "1"}]}, PlacementConfig)
    assert choose(pc, ["a", "b"], 6, kv_heads=2)[0].group == (("a", 0, 1), ("b", 1, 2))
    with pytest.raises(PlacementError, match="of the model's 3 KV heads"):
        choose(pc, ["a", "b"], 6, kv_heads=3)
    alone = validate({"strategy": "custom", "stages": [
        {"node": "a", "layers": "0-5", "heads": "0"}]}, PlacementConfig)
    with pytest.raises(PlacementError, match="nobody else"):
        choose(alone, ["a"], 6, kv_heads=1)


def test_split_heads() -> None:
    assert split_heads(3, 2) == [(0, 2), (2, 3)]
    assert split_heads(3, 3) == [(0, 1), (1, 2), (2, 3)]
    assert split_heads(8, 3) == [(0, 3), (3, 6), (6, 8)]
    with pytest.raises(ValueError):
        split_heads(3, 4)


def test_shadow_holders_of_split_stages() -> None:
    """A member's shadows go to its neighbour member (which takes its heads if it dies); a
    whole stage's to the next stage's node, unless that stage is split."""
    from brokers.shadows import _without, holder_in

    split = StageAssignment("b", 15, 30, (("b", 0, 2), ("c", 2, 3)))
    p = Placement(1, [StageAssignment("a", 0, 15), split])
    assert [holder_in(p, n) for n in "abc"] == [None, "c", "b"]
    three = StageAssignment("x", 0, 30, (("x", 0, 1), ("y", 1, 2), ("z", 2, 3)))
    p3 = Placement(1, [three])
    assert [holder_in(p3, n) for n in "xyz"] == ["y", "z", "y"]
    assert _without(split, "b", "c") == StageAssignment("c", 15, 30)
    assert _without(three, "y", "z") == StageAssignment("x", 0, 30, (("x", 0, 1), ("z", 1, 3)))
    assert _without(three, "x", "y") == StageAssignment("y", 0, 30, (("y", 0, 2), ("z", 2, 3)))
