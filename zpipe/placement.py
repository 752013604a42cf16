"""Placement: which node runs which contiguous layer range, in pipeline order."""

from __future__ import annotations

from dataclasses import dataclass, field

from zpipe.config import PlacementConfig


@dataclass(frozen=True)
class StageAssignment:
    node: str
    start: int
    end: int  # exclusive

    def to_dict(self) -> dict:
        return {"node": self.node, "start": self.start, "end": self.end}


@dataclass
class Placement:
    epoch: int
    stages: list[StageAssignment] = field(default_factory=list)

    def to_list(self) -> list[dict]:
        return [s.to_dict() for s in self.stages]

    def nodes(self) -> list[str]:
        return [s.node for s in self.stages]


class PlacementError(ValueError):
    pass


def uniform(nodes: list[str], num_layers: int) -> list[StageAssignment]:
    """Contiguous ranges as equal as possible; earlier stages take the remainder."""
    if not nodes:
        raise PlacementError("no nodes to place layers on")
    if len(nodes) > num_layers:
        raise PlacementError(f"{len(nodes)} nodes but only {num_layers} layers")
    base, extra = divmod(num_layers, len(nodes))
    out, start = [], 0
    for i, name in enumerate(nodes):
        n = base + (1 if i < extra else 0)
        out.append(StageAssignment(name, start, start + n))
        start += n
    return out


def choose(cfg: PlacementConfig, registered: list[str], num_layers: int) -> list[StageAssignment]:
    """The stages for ``cfg`` given the names of the nodes that are registered and alive.

    Raises PlacementError saying what is still missing when it cannot be satisfied yet.
    """
    if cfg.strategy == "custom":
        missing = [s.node for s in cfg.stages if s.node not in registered]
        if missing:
            raise PlacementError(f"waiting for node(s) {', '.join(missing)}")
        last = cfg.stages[-1].layers[1]
        if last != num_layers:
            raise PlacementError(f"custom stages cover layers 0-{last - 1} but the model has "
                                 f"{num_layers} layers")
        return [StageAssignment(s.node, *s.layers) for s in cfg.stages]
    if isinstance(cfg.nodes, list):
        missing = [n for n in cfg.nodes if n not in registered]
        if missing:
            raise PlacementError(f"waiting for node(s) {', '.join(missing)}")
        return uniform(cfg.nodes, num_layers)
    if len(registered) < cfg.nodes:
        raise PlacementError(f"waiting for nodes: {len(registered)}/{cfg.nodes} registered")
    return uniform(sorted(registered)[: cfg.nodes], num_layers)
