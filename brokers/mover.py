"""Reallocation: move layers between live nodes without losing or recomputing any KV cache.

One transition from the serving placement to a new one:

1. quiesce: sessions stop at a token boundary (no step in flight anywhere);
2. prepare: every node of the new placement loads what it will hold (sharing the layers it
   keeps), beside what it serves now;
3. KV: for each layer range that changes hands, the old holder exports every live session's
   K/V for it and the broker forwards those frames, untouched, to the new holder (if that is
   the old holder's KV shadow holder, only the rows after the shadow's last: it has the rest);
4. commit: every node switches; the epoch goes up and routing follows; sessions resume.

Any failure or timeout before the commit sends ``abort`` everywhere: the old placement, still
intact on every node, keeps serving and no session is lost.

``Mover`` is a component of the broker: it is given the core (``brokers.core.Core``), the step
scheduler (to quiesce and resume the sessions) and the reallocation history, where each move
is recorded.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from typing import Any

from brokers.core import Core
from brokers.registry import NodeInfo
from brokers.shadows import Shadows
from brokers.steps import StepScheduler
from zpipe import protocol
from zpipe.placement import Placement, PlacementError, StageAssignment
from zpipe.protocol import Message

log = logging.getLogger("zpipe.mover")

REPLY_KINDS = {"prepared", "kv_data", "kv_imported", "committed"}


class MoveError(RuntimeError):
    """A reallocation that was refused or rolled back; the message says why."""


def owners(stages: list[StageAssignment]) -> list[str]:
    """Layer → node name."""
    return [s.node for s in stages for _ in range(s.start, s.end)]


def stages_from_owners(layer_owner: list[str]) -> list[StageAssignment]:
    """Group consecutive layers by owner; a node may hold only one contiguous range."""
    out: list[StageAssignment] = []
    for layer, name in enumerate(layer_owner):
        if out and out[-1].node == name:
            out[-1] = StageAssignment(name, out[-1].start, layer + 1)
        else:
            if any(s.node == name for s in out):
                raise MoveError(f"node {name} would hold layers that are not contiguous")
            out.append(StageAssignment(name, layer, layer + 1))
    return out


class Mover:
    def __init__(self, core: Core, steps: StepScheduler, history: deque[dict],
                 shadows: Shadows) -> None:
        self.core = core
        self.steps = steps
        self.lock = asyncio.Lock()
        self.history = history  # bounded: brokers.core.HISTORY_MAX records
        self.shadows = shadows  # a destination holding the source's shadow needs less KV
        self.moving = False
        self.involved: set[str] = set()
        self._waiting: dict[tuple[str, str], asyncio.Future] = {}  # (rid, key) → reply
        self._rid = ""
        # (source, first layer) → (destination, the KV heads moved or None for all)
        self._routes: dict[tuple[str, int], tuple[str, list[int] | None]] = {}

    # ------------------------------------------------------------------ requests
    async def move_layers(self, start: int, end: int, to: str, reason: str) -> dict:
        """Give layers [start, end) to node ``to``."""
        b = self.core
        current = self._serving()
        if not 0 <= start < end <= b.spec.num_layers:
            raise MoveError(f"layers {start}-{end - 1} are outside the model's "
                            f"{b.spec.num_layers} layers")
        layer_owner = owners(current.stages)
        for layer in range(start, end):
            layer_owner[layer] = to
        return await self.transition(stages_from_owners(layer_owner), reason)

    async def move_heads(self, start: int, end: int, heads: tuple[int, int], to: str,
                         reason: str) -> dict:
        """Give KV heads ``heads`` of the stage of layers [start, end) to node ``to``: a
        member of that stage whose heads they adjoin, or a node holding nothing (a new
        member). The heads go with their KV; a stage left with one member is whole again."""
        b = self.core
        current = self._serving()
        g = b.spec.num_kv_heads
        h0, h1 = heads
        if not 0 <= h0 < h1 <= g:
            raise MoveError(f"KV heads {h0}-{h1 - 1} are outside the model's {g}")
        st = next((s for s in current.stages if (s.start, s.end) == (start, end)), None)
        if st is None:
            raise MoveError(f"layers {start}-{end - 1} are not one stage's range (heads move "
                            f"within a whole stage)")
        members = [list(m) for m in st.group] or [[st.node, 0, g]]
        src = next((m for m in members if m[1] <= h0 and h1 <= m[2]), None)
        if src is None:
            raise MoveError(f"KV heads {h0}-{h1 - 1} are not held by one node")
        if src[0] == to:
            raise MoveError(f"node {to} holds those heads already")
        if h0 != src[1] and h1 != src[2]:
            raise MoveError(f"node {src[0]} would be left with heads that are not contiguous")
        dst = next((m for m in members if m[0] == to), None)
        if dst is None:
            if to in current.nodes():
                raise MoveError(f"node {to} holds another stage")
            members.append([to, h0, h1])
        elif dst[2] == h0:
            dst[2] = h1
        elif dst[1] == h1:
            dst[1] = h0
        else:
            raise MoveError(f"node {to}'s heads {dst[1]}-{dst[2] - 1} are not next to "
                            f"{h0}-{h1 - 1}")
        if src[1] == h0:
            src[1] = h1
        else:
            src[2] = h0
        members = sorted((m for m in members if m[1] < m[2]), key=lambda m: m[1])
        group = tuple(tuple(m) for m in members) if len(members) > 1 else ()
        new = StageAssignment(members[0][0], start, end, group)
        stages = [new if s is st else s for s in current.stages]
        return await self.transition(stages, reason, head_move=(src[0], to, start, end, h0, h1))

    async def drain(self, name: str, reason: str) -> dict:
        """Everything off ``name``: its layers go to its pipeline neighbour."""
        current = self._serving()
        names = current.nodes()
        if name not in names:
            raise MoveError(f"node {name} holds no layers")
        split = next((s for s in current.stages if s.group and name in s.members()), None)
        if split is not None:  # its heads go to the member before it (the first: after it)
            i = split.members().index(name)
            _, h0, h1 = split.group[i]
            heir = split.group[i - 1 if i > 0 else 1][0]
            return await self.move_heads(split.start, split.end, (h0, h1), heir, reason)
        if len(names) == 1:
            raise MoveError(f"node {name} is the only stage; nowhere to drain it to")
        i = names.index(name)
        heir = names[i - 1] if i > 0 else names[1]
        layer_owner = [heir if n == name else n for n in owners(current.stages)]
        return await self.transition(stages_from_owners(layer_owner), reason)

    async def rebalance(self, strategy: str, reason: str, perf_weight: float | None = None) -> dict:
        """Re-plan over every alive node (late joiners included) and move to that plan."""
        if perf_weight is None:
            perf_weight = self.core.cfg.rebalance.perf_weight
        try:
            stages = self.core.plan(strategy, perf_weight=perf_weight).stages
        except PlacementError as e:
            raise MoveError(f"no {strategy} plan: {e}") from None
        return await self.transition(stages, reason)

    def _serving(self) -> Placement:
        b = self.core
        if b.placement is None or not b.ready:
            raise MoveError(f"no placement is serving ({b.waiting_for})")
        return b.placement

    # ------------------------------------------------------------------ the transition
    async def transition(self, stages: list[StageAssignment], reason: str,
                         head_move: tuple | None = None) -> dict:
        """Move to ``stages``. ``head_move`` (source, destination, start, end, first head, end
        head): the only KV that changes hands is those heads of those layers."""
        b = self.core
        async with self.lock:
            old = self._serving()
            if head_move is None and (old.split() or any(s.group for s in stages)):
                raise MoveError("layers of a placement with a stage split by heads do not move "
                                "(move heads with --heads)")
            if [s.to_dict() for s in stages] == old.to_list():
                raise MoveError("the placement already is that")
            for name in (n for s in stages for n in s.members()):
                node = b.registry.by_name.get(name)
                if node is None or node.state == "dead":
                    raise MoveError(f"node {name} is not alive")
            record: dict[str, Any] = {
                "time": time.time(), "reason": reason, "before": old.to_list(),
                "after": [s.to_dict() for s in stages], "epoch_before": old.epoch,
                "kv_bytes": 0, "kv_shadow_bytes": 0, "pause_s": 0.0, "ok": False,
                "error": None,
            }
            epoch = b.next_epoch()
            self._rid = uuid.uuid4().hex
            involved = [b.registry.by_name[n] for n in dict.fromkeys(
                old.nodes() + Placement(epoch, stages).nodes())]
            self.involved = {n.name for n in involved}
            self.moving = True
            t_pause = time.perf_counter()
            try:
                await asyncio.wait_for(self.steps.quiesce(), b.cfg.move_timeout_s)
                if b.placement is not old:  # a node of it died meanwhile: sessions recover
                    raise MoveError(f"the placement was lost meanwhile ({b.waiting_for})")
                t_quiet = time.perf_counter()
                await asyncio.wait_for(self._run(old, stages, epoch, involved, record,
                                                 head_move), b.cfg.move_timeout_s)
                b.switch_placement(Placement(epoch, stages))
                record.update(ok=True, epoch_after=epoch,
                              quiesce_s=round(t_quiet - t_pause, 6))
            except (Exception, asyncio.TimeoutError) as e:
                msg = "timed out" if isinstance(e, asyncio.TimeoutError) else str(e)
                record["error"] = msg
                await self._broadcast(involved, protocol.encode("abort", rid=self._rid,
                                                                epoch=epoch))
                log.warning("reallocation rolled back (%s): %s", reason, msg)
            finally:
                self._fail_waiters()
                self.moving = False
                record["pause_s"] = round(time.perf_counter() - t_pause, 6)
                self.history.append(record)
                await self.steps.resume()
            if not record["ok"]:
                raise MoveError(f"reallocation rolled back: {record['error']}")
            log.info("reallocation done (%s): epoch %d, %d KV bytes moved, pause %.3f s",
                     reason, epoch, record["kv_bytes"], record["pause_s"])
            return record

    async def _run(self, old: Placement, stages: list[StageAssignment], epoch: int,
                   involved: list[NodeInfo], record: dict, head_move: tuple | None) -> None:
        b = self.core
        rid = self._rid
        # 2. prepare: what each node will hold (start == end: nothing), and of a split stage
        # which heads, with which members
        t0 = time.perf_counter()
        new_range = {n: (s.start, s.end) for s in stages for n in s.members()}
        share = {m[0]: {"heads": [m[1], m[2]], "member": i,
                        "group": [b.registry.by_name[x[0]].group for x in s.group]}
                 for s in stages for i, m in enumerate(s.group)}
        waits = []
        for node in involved:
            start, end = new_range.get(node.name, (0, 0))
            waits.append(self._expect(rid, f"prepared:{node.name}"))
            await self._send(node, protocol.encode("prepare", rid=rid, epoch=epoch,
                                                   start=start, end=end,
                                                   **share.get(node.name, {})))
        await asyncio.gather(*waits)
        t1 = time.perf_counter()
        # 3. KV of every live session for each layer range (or KV heads of one) that changes
        # hands (a session still waiting for its prefill has no KV anywhere yet: it simply
        # starts on the new placement)
        sids = [sid for sid, s in b.sessions.items() if s.pos > 0]
        if head_move is None:
            transfers = [(*t, None) for t in _transfers(owners(old.stages), owners(stages))]
        else:
            src, dst, a, e, h0, h1 = head_move
            transfers = [(src, dst, a, e, [h0, h1])]
        record["transfers"] = [{"from": s, "to": d, "layers": [a, e - 1],
                                **({"heads": [h[0], h[1] - 1]} if h else {})}
                               for s, d, a, e, h in transfers]
        for src, dst, a, e, heads in transfers if sids else []:
            waits = [self._expect(rid, f"kv_imported:{dst}:{sid}") for sid in sids]
            self._routes[(src, a)] = (dst, heads)
            # A destination that holds the source's KV shadow needs only the rows after it
            # (whole layers; a head move sends all its rows).
            held = self.shadows.held(src, dst) if heads is None else {}
            await self._send(b.registry.by_name[src], protocol.encode(
                "kv_export", rid=rid, sids=sids, start=a, end=e,
                since=[held.get(sid, 0) for sid in sids],
                **({"heads": heads} if heads else {})))
            for got in await asyncio.gather(*waits):
                record["kv_bytes"] += got["nbytes"]
                record["kv_shadow_bytes"] += got.get("shadow_bytes", 0)
        # 4. commit everywhere (direct routing: each node hears its new peers first)
        t2 = time.perf_counter()
        b.announce_peers(Placement(epoch, stages))
        waits = [self._expect(rid, f"committed:{n.name}") for n in involved]
        await self._broadcast(involved, protocol.encode("commit", rid=rid, epoch=epoch))
        await asyncio.gather(*waits)
        record.update(prepare_s=round(t1 - t0, 6), kv_s=round(t2 - t1, 6),
                      commit_s=round(time.perf_counter() - t2, 6))

    # ------------------------------------------------------------------ replies
    async def on_reply(self, node: NodeInfo, msg: Message) -> None:
        """prepared / kv_data / kv_imported / committed from a node."""
        if msg["rid"] != self._rid or not self.moving:
            return  # from a move that has ended
        if msg.kind == "kv_data":
            await self._forward_kv(node, msg)
            return
        key = {"prepared": f"prepared:{node.name}", "committed": f"committed:{node.name}",
               "kv_imported": f"kv_imported:{node.name}:{msg.get('sid')}"}[msg.kind]
        fut = self._waiting.get((msg["rid"], key))
        if fut is not None and not fut.done():
            fut.set_result(msg.header)

    async def _forward_kv(self, node: NodeInfo, msg: Message) -> None:
        layers = sorted({int(m[0].split(".", 1)[1]) for m in msg["t"]})
        route = self._routes.get((node.name, layers[0])) if layers else None
        if route is None:
            self.on_error(f"node {node.name} sent KV nobody asked for")
            return
        dst, heads = route
        await self._send(self.core.registry.by_name[dst], protocol.encode_forward(
            "kv_import", msg.frames, msg["t"], rid=msg["rid"], sid=msg["sid"],
            length=msg["length"], since=msg.get("since", 0), owner=node.name,
            **({"heads": heads} if heads else {})))

    def on_error(self, message: str) -> None:
        """An error from a node during the move: fail whatever is waiting."""
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(MoveError(message))

    def node_lost(self, name: str) -> None:
        if self.moving and name in self.involved:
            self.on_error(f"node {name} died during the reallocation")

    def _expect(self, rid: str, key: str) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self._waiting[(rid, key)] = fut
        return fut

    def _fail_waiters(self) -> None:
        for fut in self._waiting.values():
            if not fut.done():
                fut.cancel()
        self._waiting.clear()
        self._routes.clear()

    async def _send(self, node: NodeInfo, frames: list) -> None:
        if node.state == "dead":  # its answer would never come
            raise MoveError(f"node {node.name} is dead")
        if not await self.core.send(node.ident, frames):
            raise MoveError(f"node {node.name} is unreachable")

    async def _broadcast(self, nodes: list[NodeInfo], frames: list) -> None:
        for node in nodes:
            await self.core.send(node.ident, frames)


def _transfers(old: list[str], new: list[str]) -> list[tuple[str, str, int, int]]:
    """(from, to, start, end) for each run of layers whose holder changes."""
    out: list[tuple[str, str, int, int]] = []
    for layer, (a, b) in enumerate(zip(old, new, strict=True)):
        if a == b:
            continue
        if out and out[-1][:2] == (a, b) and out[-1][3] == layer:
            out[-1] = (a, b, out[-1][2], layer + 1)
        else:
            out.append((a, b, layer, layer + 1))
    return out
