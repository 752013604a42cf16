"""Recovery from a lost node: sessions wait, the model is placed again (or restored from KV
shadows), and they replay what was lost.

``Recovery`` is a component of the broker: it is given the core (``brokers.core.Core``), the
step scheduler, whose sessions it parks and resumes, and the reallocation history, where each
recovery is recorded. A node of the placement that dies or restarts takes the KV of its layers
with it; the sessions wait at their last token. With KV shadows (brokers/shadows.py) and the
dead node's holder alive, the holder takes its layers and their KV from the shadow, the other
nodes keep theirs, and each session replays only its tokens after the shadow's last row
(``Session.replay_from``). Otherwise every node frees its KV, the model is placed again, and
the sessions' steps feed the prompt and then their known tokens one by one
(``Session.replay``) before they go on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass

import torch

from brokers.core import Core
from brokers.registry import NodeInfo
from brokers.sessions import Session
from brokers.shadows import RestorePlan, Shadows, rebuild_plan, replay_steps
from brokers.steps import StepScheduler
from zpipe import protocol
from zpipe.placement import Placement, PlacementError, StageAssignment, choose
from zpipe.protocol import Message

log = logging.getLogger("zpipe.broker")


@dataclass(frozen=True)
class Seen:
    """How a node's loss was seen: ``by`` one of ``disconnect`` (its connection closed),
    ``failed_send`` (a message to it could not be routed), ``peer`` (the stage before it could
    not pass it a step), ``heartbeat`` (silent too long), ``restart`` (it registered again) or
    ``restore_failed``; ``silent_s``: how long it had been silent by then, an upper bound on
    the time the death took to be noticed."""

    by: str
    silent_s: float

    @classmethod
    def of(cls, node: NodeInfo, by: str) -> Seen:
        return cls(by, round(time.monotonic() - node.last_seen, 6))


@dataclass
class Recovering:
    """Sessions that lost their KV with a node, waiting for a placement."""

    reason: str
    code: str  # their error if no placement comes within ``recovery.timeout_s``
    t0: float  # time.monotonic() of the loss
    record: dict  # for the reallocation history (admin status)


class Recovery:
    def __init__(self, core: Core, steps: StepScheduler, history: deque[dict],
                 shadows: Shadows) -> None:
        self.core = core
        self.steps = steps
        self.history = history
        self.shadows = shadows  # KV shadows: who holds whose, and how far
        # After a node of the placement died, until the sessions it left can go on.
        self.recovering: Recovering | None = None
        # ``recovery.wait_s`` after a node of the placement was lost, until a placement is ready
        # again: the nodes alive may do if the configured placement cannot be met (``choose``).
        self.survivors_ok = False
        self.placer: asyncio.Task | None = None  # sets it after the wait, and places
        self.restoring: int | None = None  # the epoch of a restore under way (``restore``)

    async def lose_placement(self, reason: str, code: str, dead: str | None = None,
                             seen: Seen | None = None) -> None:
        """The placement lost a node (``dead``, if known), and with it the KV of its layers.
        With recovery on, the sessions wait at their last token and go on once a placement is
        ready again: restored from KV shadows where the dead node's holder is alive
        (``restore``), else placed again with every session replaying its tokens from its
        prompt (``Session.replay``). Recovery off, or once ``recovery.timeout_s`` passed, they
        end with ``code``."""
        core = self.core
        plan = (self.shadows.restore_plan(dead) or rebuild_plan(core, dead)
                if core.cfg.recovery.enabled else None)
        old = core.drop_placement(reason)
        if plan is None and old is not None and core.sessions:
            # the survivors' KV is of no use now: free it
            frames = protocol.encode("free", sids=list(core.sessions))
            for name in old.nodes():
                node = core.registry.by_name.get(name)
                if node is not None and node.state != "dead":
                    await core.send(node.ident, frames)
        if not core.cfg.recovery.enabled:
            await core.fail_all(reason, code)
            return
        self.survivors_ok = False
        if self.placer is not None:
            self.placer.cancel()
            self.placer = None
        if plan is None:
            self.placer = asyncio.get_running_loop().create_task(
                self._place_over_survivors(core.cfg.recovery.wait_s))
        parked = self.steps.restart_all(plan.positions if plan else None)
        if parked:
            # what this attempt restores (a second loss before the first was mended: the last)
            how = {"restored": "replay" if plan is None else
                   "rebuild" if plan.rebuild else "shadow",
                   "shadow_sessions": len(plan.positions) if plan and not plan.rebuild else 0,
                   "rebuild_sessions": len(plan.positions) if plan and plan.rebuild else 0,
                   "replay_tokens": sum(replay_steps(s) for s in parked)}
            if self.recovering is None:
                self.recovering = Recovering(reason, code, time.monotonic(), {
                    "time": time.time(), "reason": f"recovery: {reason}",
                    "before": old.to_list() if old else [],
                    "epoch_before": old.epoch if old else 0, "sessions": len(parked), **how,
                    "seen_by": seen.by if seen else "", "silent_s": seen.silent_s if seen else None,
                    "kv_bytes": 0, "pause_s": 0.0, "ok": False, "error": None})
            else:
                self.recovering.record.update(how)
        if plan is not None:
            await self.restore(plan)
        if not parked:
            return
        core.waiting_for = f"{reason}; {waiting(len(parked))}"
        log.warning("%s (a new placement within %g s)", core.waiting_for,
                    core.cfg.recovery.timeout_s)

    async def restore(self, plan: RestorePlan) -> None:
        """The dead node's layers to ``plan.holder``, the other stages as they were: each
        node keeps the KV of the sessions restored (up to their row) and frees the rest's;
        the holder takes the KV of the layers new to it from their shadows, or rebuilds it
        (``plan.rebuild``). They answer ``loaded`` (``on_loaded``)."""
        core = self.core
        placement = core.restore_placement(plan.stages)
        self.restoring = placement.epoch
        sessions = [[sid, at] for sid, at in plan.positions.items()]
        every = core.cfg.recovery.shadow_every
        log.warning("restoring from %s: node %s's layers to node %s; %d of %d sessions keep "
                    "their KV", "its neighbour's inputs" if plan.rebuild else "KV shadows",
                    plan.dead, plan.holder, len(sessions), len(core.sessions))
        for st in placement.stages:
            group = [core.registry.by_name[m[0]].group for m in st.group]
            for i, name in enumerate(st.members()):
                node = core.registry.by_name[name]
                tensors, extra = {}, {}
                if name == plan.holder and plan.rebuild:
                    tensors, extra = self._rebuild_fields(plan)
                elif name == plan.holder:
                    extra = {"owner": plan.dead}
                if st.group:
                    extra.update(heads=list(st.group[i][1:]), group=group, member=i)
                await core.send(node.ident, protocol.encode(
                    "restore", tensors or None, epoch=placement.epoch, start=st.start,
                    end=st.end, sessions=sessions, shadow_every=every, **extra))

    def _rebuild_fields(self, plan: RestorePlan) -> tuple[dict, dict]:
        """The holder's part of a rebuild: the layers, the prompts' lengths and, for layer 0,
        the tokens (the stage before those layers is the broker itself)."""
        sessions = [self.core.sessions[sid] for sid in plan.positions]
        fields = {"rebuild": list(plan.rebuild), "prompts": [len(s.prompt_ids) for s in sessions]}
        if plan.rebuild[0] > 0:
            return {}, fields
        ids = [(s.prompt_ids + s.tokens)[:plan.positions[s.sid]] for s in sessions]
        return {"ids": torch.tensor([t for one in ids for t in one], dtype=torch.int64)}, fields

    def on_loaded(self, msg: Message) -> None:
        """A node's answer to its restore: what it restored goes in the record; the sessions
        it could not rebuild replay from their prompts (their step at row 0 starts every
        node's KV of them again)."""
        missing = msg.get("missing") or []
        replayed = [s for s in self.steps.parked if s.sid in missing]
        for s in replayed:
            s.replay()
        if self.recovering is None:
            return
        rec = self.recovering.record
        rec["kv_bytes"] += msg.get("restored_bytes", 0)
        if "rebuilt_rows" in msg.header:
            rec["rebuilt_rows"] = msg["rebuilt_rows"]
            rec["rebuild_s"] = msg.get("rebuild_s", 0.0)
        if replayed:
            rec["rebuild_sessions"] -= len(replayed)
            rec["replay_tokens"] = sum(replay_steps(s) for s in self.steps.parked)
            if not rec["rebuild_sessions"]:  # the layers moved, but every session replays
                rec["restored"] = "replay"

    def note(self) -> str:
        """What the sessions are waiting for, to add to ``waiting_for`` ("" if none wait)."""
        return f"; {waiting(len(self.steps.parked))}" if self.recovering else ""

    async def _place_over_survivors(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self.survivors_ok = True
        await self.core.place()

    def choose(self, caps, cost) -> list[StageAssignment]:
        """The configured placement; if that cannot be met ``recovery.wait_s`` after a node of
        the placement was lost, the configured strategy (uniform for custom stages) over every
        node still alive, configured ones first and in their order."""
        core = self.core
        cfg, alive = core.cfg.placement, core.registry.names()
        try:
            return choose(cfg, alive, core.spec.num_layers, caps=caps, cost=cost,
                          kv_heads=core.spec.num_kv_heads)
        except PlacementError as e:
            if not self.survivors_ok or not alive:
                raise
            listed = ([st.node for st in cfg.stages] if cfg.strategy == "custom"
                      else cfg.nodes if isinstance(cfg.nodes, list) else [])
            names = [n for n in listed if n in alive] + sorted(set(alive) - set(listed))
            survivors = cfg.model_copy(update={
                "strategy": "uniform" if cfg.strategy == "custom" else cfg.strategy,
                "nodes": names, "stages": []})
            stages = choose(survivors, alive, core.spec.num_layers, caps=caps, cost=cost)
            log.warning("%s; placing over the nodes alive instead: %s", e, ", ".join(names))
            return stages

    async def recovered(self) -> None:
        """A placement is ready: the waiting sessions go on (once no move holds them)."""
        self.survivors_ok = False
        self.restoring = None
        if self.placer is not None:  # the configured placement came back in time
            self.placer.cancel()
            self.placer = None
        if self.recovering:
            done, self.recovering = self.recovering, None
            # pause_s: until the new placement was loaded; the replay comes after
            placement = self.core.placement
            done.record.update(after=placement.to_list(), epoch_after=placement.epoch,
                               ok=True, pause_s=round(time.monotonic() - done.t0, 6))
            self.history.append(done.record)
            self.core.metrics.record_recovery(done.record)
            if not self.steps.paused:
                await self.steps.resume()

    async def give_up_if_late(self) -> None:
        """End the waiting sessions once ``recovery.timeout_s`` passed without a placement."""
        lost = self.recovering
        limit = self.core.cfg.recovery.timeout_s
        if lost is None or time.monotonic() - lost.t0 <= limit:
            return
        self.recovering = None
        error = (f"{lost.reason}; no placement within {limit:g} s: "
                 f"{self.core.waiting_for.split('; ')[0]}")
        lost.record.update(error=error, pause_s=round(time.monotonic() - lost.t0, 6))
        self.history.append(lost.record)
        self.core.metrics.record_recovery(lost.record)
        for s in self.steps.unpark():
            await self.core.fail(s, lost.code, error)


def late(msg: Message, s: Session, placement: Placement | None) -> bool:
    """A node's error about a step that is no longer the session's: one of an earlier
    placement (a step that was still passing from node to node when a node died, say), or
    while the session has no step in flight (it waits to replay)."""
    epoch, step = msg.get("epoch"), msg.get("step")
    return (not s.in_flight or (type(step) is int and step != s.step)
            or (type(epoch) is int and (placement is None or epoch != placement.epoch)))


def waiting(n: int) -> str:
    return "1 session waits to go on" if n == 1 else f"{n} sessions wait to go on"
