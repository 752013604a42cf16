"""The broker core as its components see it: the ``Core`` interface and the reallocation history.

The broker (``brokers/broker.py``) owns the socket, the nodes, the sessions and the placement,
and hands each message to the part that deals with it. The parts are components, each given a
``Core`` (never the ``Broker`` class, so no component imports ``brokers.broker``):

- ``brokers/steps.py``     StepScheduler: sessions' token steps from stage to stage (hot path)
- ``brokers/recovery.py``  Recovery: a node of the placement lost; sessions wait and replay
- ``brokers/mover.py``     Mover: layers and their KV moved between live nodes
- ``brokers/admin.py``     Admin: the ``admin`` requests (status, plan, move, profile, ...)
- ``brokers/rebalance.py`` when performance asks for a re-plan; the planner's inputs
- ``brokers/registry.py``  the nodes; ``brokers/sessions.py`` the sessions
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from brokers.registry import Registry
    from brokers.sessions import Session
    from zpipe.config import BrokerConfig
    from zpipe.metrics import Metrics
    from zpipe.placement import Placement, PlanResult
    from zpipe.shard import ModelSpec

# Reallocations and recoveries kept for ``admin status`` (which shows the last 20), oldest
# dropped first.
HISTORY_MAX = 100


def new_history() -> deque[dict]:
    """The reallocation history: one record per move or recovery, newest last."""
    return deque(maxlen=HISTORY_MAX)


class Core(Protocol):
    """What the broker's components may read and do. Attributes are read; the ones a component
    sets are said so."""

    cfg: BrokerConfig
    spec: ModelSpec
    model_dir: Path
    registry: Registry
    sessions: dict[str, Session]  # sid -> the sessions running
    metrics: Metrics
    measured: dict[str, deque]  # node -> decode compute s/token since the placement changed
    placement: Placement | None  # the placement being loaded or serving
    ready: bool  # the placement is loaded: steps may go
    waiting_for: str  # why not ready (recovery adds how many sessions wait)

    async def send(self, ident: bytes, frames: list) -> bool:
        """Send to a node or a client; False if it cannot be reached. A node whose connection
        is gone is marked dead at once, and its loss recovered as soon as the caller yields."""

    async def finish(self, s: Session, reason: str) -> None:
        """End a session normally (stop, length, cancelled): ``done`` to its client."""

    async def fail(self, s: Session, code: str, message: str) -> None:
        """End a session with an error to its client (nothing if it has ended already)."""

    async def fail_all(self, message: str, code: str) -> None:
        """End every session with that error."""

    async def place(self) -> None:
        """Choose and load a placement if there is none and the nodes allow one."""

    def drop_placement(self, reason: str) -> Placement | None:
        """Forget the placement (a node of it was lost): not ready; returns the one dropped."""

    def restore_placement(self, stages: list) -> Placement:
        """A placement of ``stages`` at a new epoch, its nodes loading: a recovery's restore,
        whose ``restore`` messages the caller sends (the nodes answer ``loaded``)."""

    def next_epoch(self) -> int:
        """A new placement epoch (a move's)."""

    def announce_peers(self, placement: Placement) -> None:
        """Direct routing: each node of ``placement`` hears its stage, its peers and route."""

    def switch_placement(self, placement: Placement) -> None:
        """Route by ``placement`` from now on (a committed move)."""

    def plan(self, strategy: str, perf_weight: float = 0.0) -> PlanResult:
        """What ``strategy`` would place on the alive nodes now."""
