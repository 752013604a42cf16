"""The broker: one ROUTER socket for nodes and clients. It keeps the nodes, the sessions and the
placement, and hands every message to the part that deals with it.

Every token step of every session goes broker → stage 0 → broker → stage 1 → ... → broker:
the broker forwards each stage's activation frames to the next stage without copying them,
and the last stage returns a sampled token id.

Read top to bottom: ``handle`` dispatches each message; then what the broker does for nodes
(register, loaded, errors), for clients (generate, cancel, info), when sessions end, with the
placement, and for liveness (heartbeats, step timeouts). The rest is done by components, each
given the broker as a ``brokers.core.Core`` (the list is there): ``steps`` (the token steps,
brokers/steps.py), ``recovery`` (a lost node, brokers/recovery.py), ``mover`` (layer moves,
brokers/mover.py) and ``admin`` (brokers/admin.py).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import defaultdict, deque
from collections.abc import Coroutine
from typing import Any

import zmq
from transformers import AutoTokenizer

from brokers import rebalance, roles
from brokers.admin import Admin
from brokers.core import new_history
from brokers.mover import REPLY_KINDS, Mover
from brokers.rebalance import AutoRebalancer, Rebalancer
from brokers.recovery import Recovery, Seen, late
from brokers.registry import NodeInfo, Registry
from brokers.sessions import RequestError, Session, build_session
from brokers.shadows import Shadows
from brokers.steps import StepScheduler
from zpipe import aio, keys, protocol
from zpipe.config import BrokerConfig
from zpipe.identity import differences, model_identity
from zpipe.metrics import Metrics
from zpipe.models import resolve_model
from zpipe.placement import Placement, PlacementError, PlanResult
from zpipe.protocol import Message, ProtocolError
from zpipe.sampling import generation_defaults
from zpipe.shard import ModelSpec

log = logging.getLogger("zpipe.broker")

NODE_KINDS = {"register", "loaded", "result", "heartbeat", "profile_reply",
              "shadow"} | REPLY_KINDS


class Broker:
    """The broker core (``brokers.core.Core``) and its components."""

    def __init__(self, cfg: BrokerConfig) -> None:
        self.cfg = cfg
        self.model_dir = resolve_model(cfg.model)
        self.spec = ModelSpec.load(self.model_dir)
        self.identity = model_identity(self.spec)  # a joining node's must be the same
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.generation = generation_defaults(self.model_dir)  # for chats that name no sampling
        self.eos_ids = frozenset(self.spec.eos_token_ids)
        self.max_positions = int(getattr(self.spec.config, "max_position_embeddings", 1 << 20))
        self.registry = Registry()
        self.placement: Placement | None = None  # the placement being loaded or serving
        self.ready = False
        self.waiting_for = ""
        self.epoch = 0
        self.sessions: dict[str, Session] = {}
        self.by_rid: dict[tuple[bytes, str], str] = {}  # (client, request id) -> sid
        self.metrics = Metrics()
        # decode compute seconds per token per node since the placement last changed
        window = max(512, cfg.rebalance.min_tokens)
        self.measured: dict[str, deque] = defaultdict(lambda: deque(maxlen=window))
        self.rebalancer = Rebalancer(cfg.rebalance)
        history = new_history()  # moves and recoveries, for admin status
        self.steps = StepScheduler(self)
        shadows = Shadows(self)  # KV shadows: who holds whose, and how far
        self.recovery = Recovery(self, self.steps, history, shadows)
        self.mover = Mover(self, self.steps, history, shadows)
        self.admin = Admin(self, self.mover)
        self.sock: aio.Socket | None = None
        self.losses: set[asyncio.Task] = set()  # background work of losses (``_background``)
        self.auth: keys.Authenticator | None = None  # CURVE on: who holds which key
        self.gone_clients: set[bytes] = set()  # clients whose sessions are being dropped

    # ------------------------------------------------------------------ loop
    async def run(self, started: asyncio.Event | None = None) -> None:
        if self.cfg.cpu is not None:
            aio.pin(zmq.Context.instance(), self.cfg.cpu)
            log.info("broker: event loop and ZeroMQ I/O pinned to CPU %d", self.cfg.cpu)
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable sends raise, not vanish
        limit = roles.max_frame(self.cfg, self.spec, self.max_positions)
        self.auth = roles.guard(self.cfg, ctx, sock, limit)
        tasks = [keys.watch_handshakes(sock, "broker", on_disconnect=self._disconnected)]
        self.sock = aio.Socket(sock, busy_poll_s=self.cfg.busy_poll_ms / 1000)
        try:
            sock.bind(self.cfg.bind)
            log.info("broker takes frames of up to %.1f MB", limit / 1e6)
            await self.place()  # sets what it waits for
            log.info("broker on %s serving %s (%d layers); %s", self.cfg.bind, self.model_dir,
                     self.spec.num_layers, self.waiting_for)
            if started:
                started.set()
            # The tokenizer and torch are big, long-lived object graphs: keep the collector's
            # full passes from walking them again and again on the hot path.
            gc.freeze()
            tasks += [asyncio.create_task(self._watch_timeouts()),
                      asyncio.create_task(self._heartbeats()),
                      asyncio.create_task(AutoRebalancer(self, self.mover, self.rebalancer).run())]
            while True:
                await self.handle(await self.sock.recv())
        finally:
            for t in tasks:
                t.cancel()
            if self.auth is not None:
                self.auth.stop()
            self.sock.close()

    async def send(self, ident: bytes, frames: list) -> bool:
        """Send to a node or a client; False if it cannot be reached. A node whose connection
        is gone is dead from now on (``node_unreachable``)."""
        try:
            self.sock.send([ident, *frames])
            return True
        except zmq.ZMQError as e:  # peer gone (ROUTER_MANDATORY) or queue full
            node = self.registry.by_ident.get(ident)
            if node is None:  # a client gone, or too slow to read: its sessions end
                self._client_gone(ident, e)
                return False
            log.warning("cannot send to %r: %s", ident, e)
            if e.errno == zmq.EHOSTUNREACH:
                self.node_unreachable(node)
            return False

    def _client_gone(self, client: bytes, e: zmq.ZMQError) -> None:
        """A send to ``client`` failed: it disconnected or its queue is full (it does not
        read). Its sessions end now instead of running on for nobody."""
        if client in self.gone_clients:
            return
        sessions = [s for s in self.sessions.values() if s.client == client]
        if not sessions:  # a reply to a peer gone: nothing of its to end
            log.debug("cannot send to %r: %s", client, e)
            return
        log.warning("cannot send to client %r (%s): ending its %d sessions", client, e,
                    len(sessions))
        self.gone_clients.add(client)

        async def end() -> None:
            try:
                for s in sessions:
                    await self._release(s, "client_gone")
            finally:
                self.gone_clients.discard(client)

        self._background(end())

    async def handle(self, frames: list) -> None:
        """One message as the ROUTER socket gives it: [sender identity, *message frames]."""
        ident = frames[0].bytes
        try:
            msg = protocol.decode(frames[1:])
        except ProtocolError as e:
            log.warning("bad message from %r: %s", ident, e)
            rid = protocol.peek_rid(frames[1:]) if len(frames) > 2 else None
            await self.send(ident, protocol.error(e.code, str(e), **({"rid": rid} if rid else {})))
            return
        if self.auth is not None:  # CURVE: the connection's key says who is speaking
            known = self.registry.by_ident.get(ident)
            why = roles.refusal(keys.user_id(frames[1]), msg, NODE_KINDS,
                                known.name if known is not None else None)
            if why:
                log.warning("refused a %r message from %r: %s", msg.kind, ident, why)
                await self.send(ident, protocol.error("forbidden", why, **_rid(msg)))
                return
        node = self.registry.get(ident)
        try:
            if msg.kind in NODE_KINDS:
                if msg.kind == "register":
                    await self._on_register(ident, msg)
                elif node is None or node.state == "dead":
                    # Also what a node hears after a broker restart, or after it was declared
                    # dead while frozen: it registers again.
                    raise RequestError(f"{msg.kind} from a peer that is not a registered node; "
                                       "register first", "unknown_peer")
                elif msg.kind == "result":
                    await self.steps.on_result(node, msg)
                elif msg.kind == "heartbeat":
                    node.stats.update(msg.header)
                elif msg.kind == "shadow":
                    await self.recovery.shadows.on_shadow(node, msg)
                elif msg.kind in REPLY_KINDS:
                    await self.mover.on_reply(node, msg)
                elif msg.kind == "loaded":
                    await self._on_loaded(node, msg)
                else:
                    await self.admin.on_profile_reply(node, msg)
            elif msg.kind == "ping":
                await self.send(ident, protocol.encode("pong", **_rid(msg)))
            elif msg.kind == "admin":
                await self.admin.handle(ident, msg)
            elif msg.kind == "error" and node is not None:
                await self._on_node_error(node, msg)
            elif msg.kind == "generate":
                await self._on_generate(ident, msg)
            elif msg.kind == "cancel":
                await self._on_cancel(ident, msg)
            elif msg.kind == "info":
                await self.send(ident, protocol.encode("info_reply", **self.info(msg.get("rid"))))
            else:
                raise RequestError(f"a {msg.kind!r} message is not something the broker takes",
                                   "unexpected_kind")
        except RequestError as e:
            await self.send(ident, protocol.error(e.code, str(e), **_rid(msg)))

    # ------------------------------------------------------------- nodes
    async def _on_register(self, ident: bytes, msg: Message) -> None:
        if msg["num_layers"] != self.spec.num_layers:
            await self.send(ident, protocol.error(
                "rejected", f"node {msg['name']!r} serves a model with {msg['num_layers']} "
                f"layers; this broker's model has {self.spec.num_layers}"))
            return
        differ = differences(self.identity, msg["identity"])
        if differ:
            await self.send(ident, protocol.error(
                "rejected", f"node {msg['name']!r} serves another model than this broker's "
                f"({self.model_dir.name}): {'; '.join(differ)}"))
            return
        old = self.registry.add(ident, msg)
        hb = self.cfg.heartbeat
        await self.send(ident, protocol.encode("welcome", heartbeat_s=hb.interval_s,
                                               liveness=hb.liveness))
        log.info("node %s registered (pid %d, %s %s, %.1f GFLOP/s)", msg["name"], msg["pid"],
                 msg["device"], msg["dtype"], msg["gflops"])
        if old is not None and self.placement and old.name in self.placement.nodes():
            # The same name again: that process restarted and its KV caches are gone.
            await self.recovery.lose_placement(f"node {old.name} restarted", "node_lost",
                                               dead=old.name, seen=Seen.of(old, "restart"))
        await self.place()

    async def _on_loaded(self, node: NodeInfo, msg: Message) -> None:
        if self.placement is None or msg["epoch"] != self.placement.epoch:
            return  # an answer to a placement that has since been replaced
        node.state, node.epoch, node.weight_bytes = "ready", msg["epoch"], msg["weight_bytes"]
        if self.recovery.restoring == msg["epoch"]:
            self.recovery.on_loaded(msg)
        log.info("node %s loaded layers %d-%d in %.2f s", node.name, msg["start"],
                 msg["end"] - 1, msg["load_s"])
        if all(self.registry.by_name[n].state == "ready" for n in self.placement.nodes()):
            self.ready = True
            self.waiting_for = ""
            log.info("ready: %d stages, epoch %d", len(self.placement.stages), self.epoch)
            await self.recovery.recovered()

    async def _on_node_error(self, node: NodeInfo, msg: Message) -> None:
        sid = msg.get("sid")
        session = self.sessions.get(sid) if sid else None
        if self.mover.moving and msg.get("rid"):
            self.mover.on_error(msg["message"])
            return
        if session is not None and late(msg, session, self.placement):
            log.info("node %s: %s about an earlier step of session %s, ignored: %s", node.name,
                     msg["code"], session.sid[:8], msg["message"])
            return
        if session is not None and msg["code"] == "peer_unreachable":
            # Under direct routing the node could not pass the step on: the next one is gone.
            after = self._stage_after(node.name)
            if after is not None:
                self.node_unreachable(after, f"node {node.name} could not pass it a step",
                                      "peer")
                return
        if session is None:
            log.error("node %s: %s: %s", node.name, msg["code"], msg["message"])
            if node.state == "loading" and self.placement is not None \
                    and self.recovery.restoring == self.placement.epoch:
                # A node that cannot restore its sessions' KV: replay them from their prompts.
                await self.recovery.lose_placement(
                    f"node {node.name} could not restore: {msg['message']}", "node_lost",
                    seen=Seen(by="restore_failed", silent_s=0.0))
                await self._place_again()
                return
            if node.state == "loading":  # say why instead of waiting forever
                node.state = "failed"
                self.waiting_for = f"node {node.name} failed to load: {msg['message']}"
            return
        await self.fail(session, msg["code"], msg["message"])

    def _stage_after(self, name: str) -> NodeInfo | None:
        """The node of the placement's stage after node ``name``'s (None: no such stage)."""
        names = self.placement.nodes() if self.placement is not None else []
        i = names.index(name) + 1 if name in names else len(names)
        return self.registry.by_name.get(names[i]) if i < len(names) else None

    # ------------------------------------------------------------- clients
    async def _on_generate(self, client: bytes, msg: Message) -> None:
        if not self.ready:
            raise RequestError(f"no placement: {self.waiting_for}", "no_placement")
        if (client, msg["rid"]) in self.by_rid:
            raise RequestError(f"request id {msg['rid']!r} is already running", "duplicate_rid")
        lim = self.cfg.limits
        if len(self.sessions) >= lim.max_sessions:
            raise RequestError(f"{len(self.sessions)} sessions running, the limit is "
                               f"{lim.max_sessions}", "busy")
        own = [s for s in self.sessions.values() if s.client == client]
        if len(own) >= lim.max_client_sessions:
            raise RequestError(f"this client has {len(own)} sessions running, the limit per "
                               f"client is {lim.max_client_sessions}", "client_busy")
        queued = sum(not s.tokens for s in own)
        if queued >= lim.max_client_queued:
            raise RequestError(f"this client has {queued} sessions waiting for their first "
                               f"token, the limit per client is {lim.max_client_queued}",
                               "client_busy")
        s = build_session(msg, client, self.tokenizer, self.cfg.limits, self.spec.vocab_size,
                          self.max_positions, self.eos_ids)
        self.sessions[s.sid] = s
        self.by_rid[(client, s.rid)] = s.sid
        self.metrics.session_started(s.sid, s.rid, len(s.prompt_ids))
        await self.send(client, protocol.encode("accepted", rid=s.rid, sid=s.sid,
                                                prompt_ids=s.prompt_ids))
        self.steps.admit(s)

    async def _on_cancel(self, client: bytes, msg: Message) -> None:
        sid = self.by_rid.get((client, msg["rid"]))
        if sid is None:
            raise RequestError(f"no running request {msg['rid']!r}", "unknown_request")
        await self.finish(self.sessions[sid], "cancelled")

    def info(self, rid: str | None = None) -> dict:
        out = {
            "ready": self.ready, "model": str(self.model_dir), "num_layers": self.spec.num_layers,
            "epoch": self.placement.epoch if self.placement else 0,
            "nodes": [n.to_dict() for n in self.registry.all()],
            "placement": self.placement.to_list() if self.placement else [],
            "sessions": len(self.sessions), "waiting_for": self.waiting_for,
            "generation": self.generation,
        }
        if rid is not None:
            out["rid"] = rid
        return out

    # ------------------------------------------------------------- sessions end
    async def finish(self, s: Session, reason: str) -> None:
        """End a session normally (stop, length, cancelled): ``done`` to its client."""
        await self._release(s, reason)
        text = self.tokenizer.decode(s.tokens, skip_special_tokens=True)
        await self.send(s.client, protocol.encode(
            "done", rid=s.rid, finish_reason=reason, n_tokens=len(s.tokens), text=text))

    async def fail(self, s: Session, code: str, message: str) -> None:
        """End a session with an error to its client (nothing if it has ended already)."""
        if s.sid not in self.sessions:
            return
        log.warning("session %s failed: %s: %s", s.sid[:8], code, message)
        await self._release(s, code)
        await self.send(s.client, protocol.error(code, message, rid=s.rid))

    async def fail_all(self, message: str, code: str) -> None:
        self.steps.drop_held()
        for s in list(self.sessions.values()):
            await self.fail(s, code, message)

    async def _release(self, s: Session, reason: str) -> None:
        self.sessions.pop(s.sid, None)
        if s.cohort is not None:  # its cohort's answers are checked row by row from now on
            s.cohort.intact = False
        self.metrics.session_ended(s.sid, reason)
        self.by_rid.pop((s.client, s.rid), None)
        self.recovery.shadows.forget(s.sid)
        if self.placement is not None:  # its KV at the nodes
            frames = protocol.encode("free", sids=[s.sid])
            for name in self.placement.nodes():
                node = self.registry.by_name.get(name)
                if node is not None:
                    await self.send(node.ident, frames)
        await self.steps.released(s)

    # ------------------------------------------------------------- the placement
    async def place(self) -> None:
        """Choose and load a placement if there is none and the nodes allow one."""
        if self.placement is not None:
            return
        try:
            caps = cost = None
            if self.cfg.placement.strategy not in ("uniform", "custom") and self.registry.all():
                cost = rebalance.model_cost(self)  # capability-driven strategies need figures
                caps = rebalance.capabilities(self, cost)
            stages = self.recovery.choose(caps, cost)
            if self.auth is not None and any(st.group for st in stages):
                # The members' combine sockets (nodes/group.py) have no CURVE yet: a split
                # stage would send activations between hosts in the clear.
                raise PlacementError("a stage split by heads cannot run with CURVE keys yet "
                                     "(its members' combine is not encrypted): give each "
                                     "node whole layers, or run this cluster open")
        except PlacementError as e:
            self.waiting_for = str(e) + self.recovery.note()
            log.info("no placement yet: %s", e)
            return
        self.restore_placement(stages)
        every = self.cfg.recovery.shadow_every
        for st in stages:
            group = [self.registry.by_name[m[0]].group for m in st.group]
            for i, member in enumerate(st.group or [(st.node,)]):
                node = self.registry.by_name[member[0]]
                split = {"heads": list(member[1:]), "group": group, "member": i} \
                    if st.group else {}
                await self.send(node.ident, protocol.encode(
                    "load", epoch=self.epoch, start=st.start, end=st.end, **split,
                    **({"shadow_every": every} if every else {})))
        log.info("placement epoch %d: %s", self.epoch, ", ".join(
            f"{s.node}[{s.start}-{s.end - 1}]" if not s.group else "+".join(
                f"{m[0]}[{s.start}-{s.end - 1} heads {m[1]}-{m[2] - 1}]" for m in s.group)
            for s in stages))

    def restore_placement(self, stages: list) -> Placement:
        """A placement of ``stages`` at a new epoch, its nodes loading (``place`` or a
        recovery's restore sends them what to load)."""
        self.placement = Placement(self.next_epoch(), stages)
        self.waiting_for = "nodes loading their layers"
        for st in stages:
            for i, name in enumerate(st.members()):
                node = self.registry.by_name[name]
                node.state, node.start, node.end = "loading", st.start, st.end
                node.heads = st.group[i][1:] if st.group else None
        self.announce_peers(self.placement)
        return self.placement

    def announce_peers(self, placement: Placement) -> None:
        """Direct routing: tell each node of ``placement`` its stage, the node before it and
        the route, before it loads, restores or commits the placement (so before any step of
        its epoch): a node takes steps from that node only and sends only to the route."""
        route = self.steps.route_of(placement)
        if route is None:
            return
        names = placement.nodes()
        for i, name in enumerate(names):
            frames = protocol.encode("peers", epoch=placement.epoch, stage=i,
                                     prev=names[i - 1] if i else "", route=route,
                                     names=names[1:])
            try:
                self.sock.send([self.registry.by_name[name].ident, *frames])
            except zmq.ZMQError as e:  # its loss shows when its load or commit is sent
                log.warning("cannot tell node %s its peers: %s", name, e)

    def drop_placement(self, reason: str) -> Placement | None:
        """Forget the placement (a node of it was lost): not ready; returns the one dropped."""
        old, self.placement = self.placement, None
        self.ready = False
        self.waiting_for = reason
        return old

    def next_epoch(self) -> int:
        self.epoch += 1
        return self.epoch

    def switch_placement(self, placement: Placement) -> None:
        """After a committed move: route by the new placement."""
        self.placement = placement
        held = {name: st for st in placement.stages for name in st.members()}
        for node in self.registry.all():
            st = held.get(node.name)
            if st is not None:
                node.state, node.start, node.end, node.epoch = "ready", st.start, st.end, \
                    placement.epoch
                node.heads = next((tuple(m[1:]) for m in st.group if m[0] == node.name), None)
            elif node.state != "dead":
                node.state, node.start, node.end = "registered", 0, 0
        self.measured.clear()
        self.rebalancer.note_change(time.monotonic())

    def plan(self, strategy: str, perf_weight: float = 0.0) -> PlanResult:
        """What ``strategy`` would place on the alive nodes now (see zpipe.placement.plan)."""
        return rebalance.plan_for(self, strategy, perf_weight=perf_weight)

    # ------------------------------------------------------------- liveness
    async def _heartbeats(self) -> None:
        """Send heartbeats to the nodes and declare dead those silent for interval × liveness."""
        hb = self.cfg.heartbeat
        frames = protocol.encode("heartbeat")
        while True:
            await asyncio.sleep(hb.interval_s)
            now = time.monotonic()
            for node in self.registry.all():
                if node.state == "dead":
                    continue
                silent = now - node.last_seen
                if silent > hb.interval_s * hb.liveness:
                    await self.declare_dead(node, silent)
                else:
                    await self.send(node.ident, frames)

    async def declare_dead(self, node: NodeInfo, silent: float) -> None:
        """``node`` was silent for ``silent`` seconds: its layers are placed again."""
        node.state = "dead"
        await self._lost(node, f"no heartbeat for {silent:.1f} s", Seen.of(node, "heartbeat"))

    def node_unreachable(self, node: NodeInfo, how: str = "a send to it failed",
                         seen_by: str = "failed_send") -> None:
        """A send to ``node`` found its connection gone (its process died): it is dead now,
        without waiting for its heartbeats to stop. Steps sent to it meanwhile are lost with
        it; the recovery, run as soon as the caller yields, replays them."""
        if node.state == "dead":
            return
        node.state = "dead"
        # A task: the caller may be midway through a step's sessions, which the recovery resets.
        self._background(self._lost(node, how, Seen.of(node, seen_by)))

    async def _lost(self, node: NodeInfo, how: str, seen: Seen) -> None:
        """``node`` (marked dead) was lost: a move it takes part in rolls back; if it served the
        placement, the sessions wait and the model is placed again (``recovery``)."""
        if self.registry.by_name.get(node.name) is not node:
            return  # it registered again meanwhile, which already placed its layers again
        self.mover.node_lost(node.name)
        log.warning("node %s is dead: %s", node.name, how)
        if self.placement and node.name in self.placement.nodes():
            await self.recovery.lose_placement(f"node {node.name} is dead ({how})", "node_dead",
                                               dead=node.name, seen=seen)
            await self._place_again()

    def _disconnected(self) -> None:
        """A connection to the broker closed (the socket monitor says so within milliseconds
        of a process's death: the kernel closes its sockets). The event names no peer, so
        every node is probed: a send to the one whose connection is gone cannot be routed
        (ROUTER_MANDATORY), which declares it dead."""
        self._background(self._probe_nodes())

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a task the broker keeps (in ``losses``) until it is done: the loop
        holds tasks only weakly, and tests wait for ``losses`` to empty."""
        task = asyncio.get_running_loop().create_task(coro)
        self.losses.add(task)
        task.add_done_callback(self.losses.discard)

    async def _probe_nodes(self) -> None:
        frames = protocol.encode("heartbeat")
        for delay in (0.0, 0.05, 0.25):  # libzmq drops a gone peer's route asynchronously
            await asyncio.sleep(delay)
            for node in self.registry.all():
                if node.state != "dead":
                    self._probe(node, frames)

    def _probe(self, node: NodeInfo, frames: list) -> None:
        try:
            self.sock.send([node.ident, *frames])
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                self.node_unreachable(node, "its connection closed", "disconnect")

    async def _place_again(self) -> None:
        """After a loss that dropped the placement (not restored from shadows): every node
        alive is free to take layers, and the model is placed again."""
        if self.placement is None:
            for other in self.registry.all():
                if other.state != "dead":
                    other.state = "registered"
            await self.place()

    async def _watch_timeouts(self) -> None:
        """Fail a step that waits too long for a node; end a recovery that waits too long."""
        limit = self.cfg.step_timeout_s
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            await self.recovery.give_up_if_late()
            now = time.perf_counter()
            for s in list(self.sessions.values()):
                if s.in_flight and now - s.hop_t0 > limit and self.placement:
                    node = self.placement.stages[s.stage].node
                    await self.fail(s, "timeout", f"step {s.step} got no answer from "
                                    f"node {node} in {limit:.1f} s")


def _rid(msg: Message) -> dict:
    rid = msg.get("rid")
    return {"rid": rid} if isinstance(rid, str) else {}


def run_broker(cfg: BrokerConfig) -> None:
    """Entry point of ``zpipe broker``: serves until killed."""
    aio.run(Broker(cfg).run())
