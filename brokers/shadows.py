"""KV shadows, the broker's side: who holds whose, how far each is, and the restore they allow.

With ``recovery.shadow_every`` = N > 0, each node of the placement sends the broker its new
K/V rows every N rows of a session (``shadow`` messages, nodes/executor.py ``shadow_due``);
the broker passes them, without copying, to the node's holder: the node of the next stage
(the last stage's: the node of the stage before). That is the node that takes the layers of
the owner if it dies, so the stages stay contiguous: the dead node's range joins its holder's
(``restore_plan``). The holder keeps them in host memory (nodes/shadow.py). The broker counts,
per owner and session, the rows passed on in this placement: a session can go on from the
shadow's last row instead of from its prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from brokers.core import Core
from brokers.registry import NodeInfo
from brokers.sessions import Session
from zpipe import protocol
from zpipe.placement import Placement, StageAssignment
from zpipe.protocol import Message


@dataclass
class RestorePlan:
    """A death the survivors can mend: the dead node's layers go to ``holder``, with their
    KV from its shadows or, with ``rebuild`` (those layers), rebuilt by the holder."""

    dead: str
    holder: str
    stages: list[StageAssignment]
    positions: dict[str, int]  # sid -> the row the session goes on from (all KV kept before it)
    rebuild: tuple[int, int] | None = None


def rebuild_plan(core: Core, dead: str | None) -> RestorePlan | None:
    """How the placement goes on without node ``dead`` when no shadow serves: its layers to
    the node of the stage before it (the first stage's: the one after), which rebuilds their
    KV from what it sent on (nodes/outlog.py) or, for the first stage, from the tokens; every
    other node keeps its KV. Sessions past their prompt go on from their last row (those the
    holder turns out to have no inputs for, from their prompt). None: a stage is split by
    heads, no neighbour is alive, or no session would keep any KV."""
    placement = core.placement
    if placement is None or dead is None or len(placement.stages) < 2 or any(
            st.group for st in placement.stages):
        return None
    names = [st.node for st in placement.stages]
    if dead not in names:
        return None
    i = names.index(dead)
    holder = names[i - 1] if i > 0 else names[1]
    node = core.registry.by_name.get(holder)
    if node is None or node.state == "dead":
        return None
    lost = placement.stages[i]
    stages = _joined(placement, lost, holder)
    positions = {sid: s.pos for sid, s in core.sessions.items()
                 if s.pos >= len(s.prompt_ids) and s.tokens}
    if not positions:
        return None
    return RestorePlan(dead, holder, stages, positions, (lost.start, lost.end))


def holder_in(placement: Placement, name: str) -> str | None:
    """The node holding ``name``'s shadows in ``placement``: of a member of a stage split by
    heads, the next member (the last's: the one before), which takes its heads if it dies; of
    a whole stage, ``holder_of`` over the stages, unless that one is split (no holder: a split
    stage does not take layers)."""
    for st in placement.stages:
        if name in st.members() and st.group:
            m = st.members()
            i = m.index(name)
            return m[i + 1] if i + 1 < len(m) else m[i - 1]
    holder = holder_of([st.node for st in placement.stages], name)
    split = {st.node for st in placement.stages if st.group}
    return None if holder in split else holder


def holder_of(names: list[str], name: str) -> str | None:
    """The node holding ``name``'s shadows in a placement of nodes ``names`` (stage order)."""
    if name not in names or len(names) < 2:
        return None
    i = names.index(name)
    return names[i + 1] if i + 1 < len(names) else names[i - 1]


class Shadows:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.epoch = -1  # the placement the counts are of
        self.rows: dict[str, dict[str, int]] = {}  # owner -> sid -> rows passed to its holder

    def _current(self, placement: Placement) -> dict[str, dict[str, int]]:
        if self.epoch != placement.epoch:  # another placement: other layers, other holders
            self.epoch, self.rows = placement.epoch, {}
        return self.rows

    async def on_shadow(self, node: NodeInfo, msg: Message) -> None:
        """A node's ``shadow`` rows: on to its holder, counted (stale or unknown: dropped)."""
        core, placement = self.core, self.core.placement
        sid, start, length = msg["sid"], msg["start"], msg["length"]
        if (placement is None or msg["epoch"] != placement.epoch or sid not in core.sessions
                or not 0 <= start < length):
            return
        rows = self._current(placement).setdefault(node.name, {})
        if start != rows.get(sid, 0) and start != 0:
            rows.pop(sid, None)  # a gap: this session's shadow is of no use until it restarts
            return
        holder = core.registry.by_name.get(holder_in(placement, node.name) or "")
        if holder is None or holder.state == "dead":
            return
        if await core.send(holder.ident, protocol.encode_forward(
                "shadow", msg.frames, msg["t"], epoch=msg["epoch"], sid=sid, start=start,
                length=length, owner=node.name)):
            rows[sid] = length

    def held(self, owner: str, holder: str) -> dict[str, int]:
        """sid -> the rows of ``owner``'s layers that ``holder`` has in its shadow, in the
        current placement ({} if ``holder`` is not ``owner``'s holder)."""
        placement = self.core.placement
        if placement is None or holder_in(placement, owner) != holder:
            return {}
        return dict(self._current(placement).get(owner, {}))

    def forget(self, sid: str) -> None:
        """The session ended (its holders free its shadows on the ``free`` it causes)."""
        for rows in self.rows.values():
            rows.pop(sid, None)

    def restore_plan(self, dead: str | None) -> RestorePlan | None:
        """How the placement goes on without node ``dead``: its layers to its holder (alive),
        every session whose shadow reaches past its prompt kept up to the shadow's last row
        (or its own last, if earlier). None: shadows are off, the holder is gone, or no
        session would keep any KV (the configured placement may then come back, as without
        shadows)."""
        core, placement = self.core, self.core.placement
        if not core.cfg.recovery.shadow_every or placement is None or dead is None:
            return None
        holder = holder_in(placement, dead)
        node = core.registry.by_name.get(holder or "")
        if node is None or node.state == "dead":
            return None
        lost = next(st for st in placement.stages if dead in st.members())
        if lost.group:  # a member of a split stage: its heads join its holder's
            stages = [st if st is not lost else _without(st, dead, holder)
                      for st in placement.stages]
        else:
            stages = _joined(placement, lost, holder)
        shadowed = self._current(placement).get(dead, {})
        positions = {}
        for sid, s in core.sessions.items():
            at = min(shadowed.get(sid, 0), s.pos)
            if at >= len(s.prompt_ids) and s.tokens:
                positions[sid] = at
        if not positions:  # no session keeps any KV: place again as configured instead
            return None
        return RestorePlan(dead, holder, stages, positions)


def _joined(placement: Placement, lost: StageAssignment, holder: str) -> list[StageAssignment]:
    """The stages of ``placement`` without whole stage ``lost``, whose layers join those of
    ``holder``'s (a neighbour: the stages stay contiguous)."""
    return [st if st.node != holder else StageAssignment(
        holder, min(st.start, lost.start), max(st.end, lost.end))
        for st in placement.stages if st is not lost]


def _without(st: StageAssignment, dead: str, holder: str) -> StageAssignment:
    """Split stage ``st`` with ``dead``'s heads given to ``holder`` (its neighbour member);
    whole again if one member is left."""
    lost = next(m for m in st.group if m[0] == dead)
    members = [(n, min(a, lost[1]), max(b, lost[2])) if n == holder else (n, a, b)
               for n, a, b in st.group if n != dead]
    if len(members) == 1:
        return StageAssignment(holder, st.start, st.end)
    return StageAssignment(members[0][0], st.start, st.end, tuple(members))


def replay_steps(s: Session) -> int:
    """The steps a waiting session runs again before it is back where it was."""
    return len(s.tokens) - s.step
