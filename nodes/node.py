"""The stage node process: a DEALER that registers, loads what the broker assigns, runs steps."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import torch
import zmq

from nodes import profile
from nodes.executor import DTYPES, Executor, Rebuild, StepError
from nodes.group import Group
from nodes.outlog import OutputLog
from nodes.peers import Peers
from nodes.rows import join_rows
from nodes.shadow import ShadowStore
from zpipe import aio, bounds, keys, protocol, sysinfo
from zpipe.config import ConfigError, NodeConfig
from zpipe.identity import model_identity
from zpipe.models import resolve_model
from zpipe.protocol import Message, ProtocolError
from zpipe.slots import SlotKV

log = logging.getLogger("zpipe.node")

MAX_BACKOFF_S = 8.0
# Decode batches that took less than this last time run on the event loop's thread: a thread
# hand-off each way costs ~0.1 ms, and a pause this short delays no heartbeat.
INLINE_S = 0.005
# Handled in arrival order on the compute thread's queue, so nothing overtakes a step.
QUEUED = {"step", "load", "free", "profile", "prepare", "kv_export", "kv_import", "commit",
          "abort", "set_slow", "restore"}


class Node:
    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.model_dir = resolve_model(cfg.model)
        self.executor = Executor(self.model_dir, cfg.dtype, cfg.device,
                                 static_kv=cfg.static_kv, max_batch=cfg.max_batch)
        self.identity = model_identity(self.executor.spec)  # the broker compares it with its own
        # One compute thread: steps run in order, while the event loop stays free for I/O.
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=f"zpipe-{cfg.name}")
        self.queue: asyncio.Queue[Message] = asyncio.Queue()
        self.ctx = zmq.Context.instance()
        self.sock: aio.Socket | None = None
        # Until the broker's welcome says otherwise.
        self.heartbeat_s = 1.0
        self.liveness = 3
        self.gflops = 0.0
        self._held: Message | None = None
        self.decode_s = float("inf")  # the last decode batch's compute: short ones run inline
        self.heard = False  # the broker answered this connection
        self.welcomed = False  # the broker took our last register
        self.last_recv = 0.0
        spec = self.executor.spec
        # The largest frame a step, KV import or shadow brings: max_batch sessions of the
        # model's whole context (zpipe/bounds.py).
        self.max_frame = bounds.largest_frame(
            spec.hidden_size, cfg.max_batch,
            int(getattr(spec.config, "max_position_embeddings", 1 << 20)))
        self.keys = keys.node_keys(cfg.name, cfg.keys, cfg.curve,
                                   [cfg.peer_bind] if cfg.peer_bind else [])
        if self.keys is not None and not keys.is_loopback(cfg.group_bind):
            raise ConfigError(f"node {cfg.name}: group_bind {cfg.group_bind} is not loopback, "
                              "and the combine of a stage split by heads has no CURVE yet")
        self.watch: asyncio.Task | None = None  # failed handshakes with the broker, logged
        self.peers = Peers(self.ctx, self.queue, self.max_frame, self.keys)  # direct routing
        # The combine of a stage split by heads: used on the compute thread only.
        self.executor.group = Group(self.ctx, cfg.group_bind)
        self.shadows = ShadowStore()  # other nodes' KV rows, should they die
        self.restoring: dict[int, dict] = {}  # epoch -> the shadows its restore takes
        # The hidden states sent on: the KV of the next stage's layers, should it die unshadowed.
        self.outlog = OutputLog(int(cfg.output_log_mb * 2**20))

    async def send(self, frames: list) -> None:
        try:
            self.sock.send(frames)
        except zmq.ZMQError as e:  # the queue to the broker is full: it is not reading
            log.warning("cannot send to the broker: %s", e)

    async def run(self) -> None:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        self.gflops = await loop.run_in_executor(
            self.pool, sysinfo.matmul_gflops, cfg.device, DTYPES[cfg.dtype])
        if cfg.cpu is not None:  # after the compute thread and torch's threads exist: unpinned
            aio.pin(self.ctx, cfg.cpu)
            log.info("node %s: event loop and ZeroMQ I/O pinned to CPU %d", cfg.name, cfg.cpu)
        gc.freeze()  # torch and transformers' long-lived objects: out of the collector's way
        worker = asyncio.create_task(self._work())
        peers = None
        if cfg.peer_bind:
            self.peers.bind(cfg.peer_bind, cfg.busy_poll_ms / 1000)
            log.info("node %s takes steps from other nodes at %s", cfg.name, self.peers.addr)
            peers = asyncio.create_task(self.peers.serve())
        backoff = self.heartbeat_s
        try:
            while True:
                await self._connect()
                if await self._serve():  # True once the broker had answered this connection
                    backoff = self.heartbeat_s
                log.warning("lost the broker at %s; reconnecting in %.1f s", cfg.broker, backoff)
                self._close()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
        finally:
            worker.cancel()
            if peers is not None:
                peers.cancel()
            self.peers.close()
            self.executor.group.close()
            if self.sock is not None:
                self._close()
            self.pool.shutdown(wait=False, cancel_futures=True)

    async def _connect(self) -> None:
        """A fresh socket (a fresh identity: the broker may have restarted) and a registration."""
        cfg = self.cfg
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, f"{cfg.name}.{uuid.uuid4().hex[:8]}".encode())
        bounds.limit(sock, self.max_frame)
        if self.keys is not None:
            keys.connect_as(sock, self.keys.pair, self.keys.broker)
        self.watch = keys.watch_handshakes(sock, f"node {cfg.name} to the broker")
        sock.connect(cfg.broker)
        self.sock = aio.Socket(sock, busy_poll_s=cfg.busy_poll_ms / 1000)
        await self._register()

    def _close(self) -> None:
        if self.watch is not None:
            self.watch.cancel()
        self.sock.close()

    def held_bytes(self) -> int:
        """Memory a new placement frees or reuses: the weights held, every KV cache (the static
        pool whole) and, on CUDA, what the allocator keeps for reuse. Read beside the free
        memory (``memory``), which excludes all of it: the planner adds the two."""
        ex = self.executor
        stage, pool = ex.stage, ex.pool  # the compute thread may replace them meanwhile
        held = stage.weight_bytes() if stage is not None else 0
        if pool is not None:
            held += pool.nbytes()
        held += sum(c.nbytes() for c in list(ex.caches.values()) if not isinstance(c, SlotKV))
        return held + sysinfo.cached_bytes(self.cfg.device)

    def memory(self) -> dict:
        """The memory figures of a register or heartbeat message (one snapshot)."""
        total, free = sysinfo.memory(self.cfg.device)
        return {"mem_total": total, "mem_free": free, "mem_held": self.held_bytes(),
                "rss": sysinfo.rss_bytes()}

    async def _register(self) -> None:
        self.welcomed = False
        cfg = self.cfg
        kv = cfg.static_kv
        pool = {"kv_slots": kv.slots, "kv_max_len": kv.max_len} if kv.on(cfg.device) else {}
        await self.send(protocol.encode(
            "register", name=cfg.name, pid=os.getpid(), host=socket.gethostname(),
            device=cfg.device, dtype=cfg.dtype, model=str(self.model_dir),
            num_layers=self.executor.spec.num_layers, identity=self.identity, **self.memory(),
            gflops=round(self.gflops, 2), max_batch=cfg.max_batch, **pool,
            group=self.executor.group.addr,
            **({"peer": self.peers.addr} if self.peers.addr else {})))
        log.info("node %s registering with %s (%s, %s, %.1f GFLOP/s)", cfg.name, cfg.broker,
                 cfg.device, cfg.dtype, self.gflops)

    async def _serve(self) -> bool:
        """Serve one connection until the broker is silent for heartbeat × liveness."""
        self.heard = False
        self.last_recv = time.monotonic()
        next_beat = 0.0
        while True:
            now = time.monotonic()
            if now >= next_beat:
                mem = self.memory()
                await self.send(protocol.encode(
                    "heartbeat", rss=mem["rss"], mem_free=mem["mem_free"],
                    mem_held=mem["mem_held"], kv_bytes=self.executor.kv_bytes(),
                    shadow_bytes=self.shadows.nbytes(), output_log_bytes=self.outlog.nbytes(),
                    sessions=len(self.executor.caches), steps=self.executor.steps,
                    known_steps=self.executor.known_steps,
                    **self._combine_stats()))
                next_beat = now + self.heartbeat_s
            frames = await self.sock.recv(max(0.001, next_beat - now))
            if frames is None:
                if time.monotonic() - self.last_recv > self.heartbeat_s * self.liveness:
                    return self.heard
                continue
            await self.dispatch(frames)

    async def _pump(self) -> None:
        """Take in every message already on the socket. The receive loop does this too, but
        not while a step runs on the loop thread: then the steps that arrived meanwhile still
        join the next batch."""
        while (frames := self.sock.recv_nowait()) is not None:
            await self.dispatch(frames)
        self.peers.pump()

    async def dispatch(self, frames: list) -> None:
        """One message from the broker, as received: handled now, or queued for the compute
        thread (``QUEUED``); a malformed one is dropped."""
        self.last_recv = time.monotonic()
        self.heard = True
        try:
            msg = protocol.decode(frames)
        except ProtocolError as e:
            log.warning("dropped a bad message from the broker: %s", e)
            return
        if msg.kind == "shadow":  # on arrival, beside the steps: it never delays one
            owner = msg.get("owner")
            if not isinstance(owner, str) or not self.shadows.add(
                    owner, msg["sid"], msg["start"], msg["length"], msg.tensors):
                log.warning("dropped a KV shadow of %s for session %s that did not follow on",
                            owner, msg["sid"])
            return
        if msg.kind in ("restore", "load"):
            # a new placement: a combine still waiting on a member (a dead one) gives up now
            self.executor.group.interrupt()
        if msg.kind == "free":
            sids = [s for s in msg["sids"] if isinstance(s, str)]
            self.shadows.free(sids)
            self.outlog.free(sids)
        elif msg.kind == "restore":
            # The shadows it needs, as they stand now: later ones belong to the new placement.
            try:
                lengths = protocol.restore_lengths(msg["sessions"])
            except ProtocolError:
                lengths = {}  # refused when its turn comes
            self.restoring = {msg["epoch"]: self.shadows.take(msg.get("owner", ""), lengths)}
        if msg.kind in QUEUED:
            self.queue.put_nowait(msg)  # in arrival order: a free never overtakes a step
        elif msg.kind == "peers":  # on arrival: before the load or commit it comes with
            self.peers.announce(msg, self.executor.epoch)
        elif msg.kind == "welcome":
            self.heartbeat_s, self.liveness = float(msg["heartbeat_s"]), msg["liveness"]
            self.welcomed = True
        elif msg.kind == "heartbeat":
            pass
        elif msg.kind == "error":
            log.error("broker says: %s: %s", msg["code"], msg["message"])
            if msg["code"] == "rejected" and not self.welcomed:
                raise SystemExit(2)  # our model or config is not the broker's: say so, stop
            if msg["code"] == "unknown_peer":
                # The broker restarted or declared us dead: our sessions are gone.
                self.executor.free(list(self.executor.caches))
                await self._register()
        else:
            log.warning("ignored a %r message", msg.kind)

    async def _next_batch(self) -> list[Message]:
        """The next message, or the step messages waiting in a row: one batch."""
        if self.sock is not None:
            await self._pump()
        first = self._held or await self.queue.get()
        self._held = None
        if first.kind != "step" or self._split():
            # every member of a split stage runs the broker's messages as they came: the same
            # batches, so their combines meet
            return [first]
        batch, sids, rows, tokens = [first], _sids(first), *_size(first)
        while not self.queue.empty():
            msg = self.queue.get_nowait()
            more, its = (_size(msg), _sids(msg)) if msg.kind == "step" else ((0, 0), set())
            if (msg.kind != "step" or _route(msg) != _route(first)
                    or rows + more[0] > self.cfg.max_batch
                    or tokens + more[1] > self.cfg.max_batch_tokens or sids & its):
                self._held = msg  # keeps its place: frees and loads never overtake steps
                break
            batch.append(msg)
            sids |= its
            rows, tokens = rows + more[0], tokens + more[1]
        return batch

    async def _work(self) -> None:
        while True:
            await self.run_batch(await self._next_batch())

    async def run_batch(self, batch: list[Message]) -> None:
        """Run one batch of queued messages (``_next_batch``): a refusal is answered, and any
        other failure too, so that one bad batch never takes the node down."""
        msg = batch[0]
        try:
            if msg.kind == "step":
                await self._steps(batch)
                if self.executor.shadow_every:
                    await self._send_shadows()
            elif msg.kind == "restore":
                await self._restore(msg)
            elif msg.kind == "load":
                await self._load(msg)
            elif msg.kind == "free":
                self.executor.free([s for s in msg["sids"] if isinstance(s, str)])
            elif msg.kind == "profile":
                data = await self._in_pool(profile.run, self.executor, msg.get("tokens", 16))
                await self.send(protocol.encode("profile_reply", rid=msg["rid"], **data))
            else:
                await self._reallocate(msg)
        except StepError as e:
            await self._refuse(msg, e)
        except Exception as e:
            log.exception("%s failed", msg.kind)
            for m in batch:
                await self._refuse(m, StepError("internal", repr(e)))

    async def _steps(self, batch: list[Message]) -> None:
        """Run step messages as one batch and answer with ONE result for all their rows (an
        error per refused row): sessions batched here stay together at the next stages. A
        message bigger than ``max_batch`` / ``max_batch_tokens`` (a cohort formed at a node
        with larger limits) runs as several batches, still answered by one result. Under
        direct routing the rows go on to the next node instead, one message per route.
        The cohort this node expects next (``Executor.step_known``) skips all of that."""
        if len(batch) == 1 and (known := self.executor.step_known(batch[0])) is not None:
            cohort, out = known
            self.decode_s = self.executor.last_compute_s
            self._log_output([(r[0], r[2], r[3]) for r in batch[0]["rows"]], out)
            if "route" in batch[0].header and not self.executor.stage.last:
                # direct routing: the message's rows and sampling go on as they came
                await self._pass_on(batch, batch[0]["rows"], batch[0].get("sampling"), out)
            else:
                await self._result(batch, cohort.answer, out)
            self.executor.expect_after(cohort)
            return
        rows, msgs, owner = [], [], []
        for m in batch:
            try:
                got = self.executor.rows_of(m)
            except StepError as e:
                await self._refuse(m, e)
                continue
            rows += got
            owner += [len(msgs)] * len(got)
            msgs.append(m)
        if not rows:
            return
        args = (rows, self.cfg.max_batch, self.cfg.max_batch_tokens)
        decode = all(r.n == 1 for r in rows)
        if decode and not self._split() and (self.executor.decoder is not None
                                             or self.decode_s < INLINE_S):
            # A short decode batch (a graph replay on a GPU, a small stage on a CPU) runs
            # here: the two thread hand-offs would cost more than the loop's pause.
            outs = self.executor.run_rows(*args)
        else:
            outs = await self._in_pool(self.executor.run_rows, *args)
        if decode:
            self.decode_s = self.executor.last_compute_s
        done = []
        for row, out, k in zip(rows, outs, owner, strict=True):
            if isinstance(out, StepError):
                await self.send(protocol.error(out.code, f"{self.cfg.name}: {out}",
                                               sid=row.sid, step=row.step, **_epoch(msgs[k])))
            else:
                done.append((row, out, k))
        if self.executor.member > 0:
            return  # another member of a split stage: the first one answers for the stage
        if "route" not in msgs[0].header:  # the star: one answer for the whole batch
            if done:
                await self._answer(msgs, [(r, o) for r, o, _ in done])
        else:
            # Direct routing: rows go on together per route (a batch of several messages
            # stays one cohort); a message with a malformed route goes alone.
            groups: dict = {}
            for r, o, k in done:
                groups.setdefault(_route_key(msgs[k]), []).append((r, o, k))
            for part in groups.values():
                await self._answer([msgs[k] for k in sorted({k for *_, k in part})],
                                   [(r, o) for r, o, _ in part])
        if len(msgs) == 1 and len(done) == len(rows):
            self.executor.expect(msgs[0], rows)

    def _combine_stats(self) -> dict:
        g = self.executor.group
        return {"combine_s": round(g.combine_s, 6), "combine_steps": g.steps} if g.steps else {}

    def _split(self) -> bool:
        """Whether this node holds a share of a stage split by heads (its compute waits on the
        other members: on the compute thread, never the event loop)."""
        stage = self.executor.stage
        return stage is not None and stage.heads is not None

    async def _send_shadows(self) -> None:
        """The KV rows due to this node's shadow holder (``Executor.shadow_due``), after the
        step's answer went out; the broker passes them on."""
        epoch = self.executor.epoch
        for sid, start, length, tensors in self.executor.shadow_due():
            await self.send(protocol.encode("shadow", tensors, epoch=epoch, sid=sid,
                                            start=start, length=length))

    async def _restore(self, msg: Message) -> None:
        """After a node of the placement died: keep the listed sessions' KV up to their
        length, take the dead owner's layers from its shadows if they are ours now."""
        start, end, epoch = msg["start"], msg["end"], msg["epoch"]
        shadows = self.restoring.pop(epoch, {})
        self.restoring.clear()
        try:
            lengths = protocol.restore_lengths(msg["sessions"])
        except ProtocolError as e:
            raise StepError(e.code, str(e)) from None
        if not 0 <= msg["shadow_every"] <= 1 << 20:
            raise StepError("bad_value", f"shadow_every {msg['shadow_every']} out of range")
        t0 = time.perf_counter()
        split = _split_args(msg)
        rebuild = self._rebuild_of(msg, lengths) if "rebuild" in msg.header else None
        restored = sum(c.used_bytes() for c in shadows.values())
        nbytes = await self._in_pool(lambda: self.executor.restore(
            start, end, epoch, lengths, shadows, rebuild=rebuild, **split))
        self.executor.shadow_every = msg["shadow_every"]
        dt = time.perf_counter() - t0
        settle_gc()
        extra = {"restored_bytes": restored}
        if rebuild is not None:
            if rebuild.end == end:  # the rebuilt layers end this stage: their output is ours
                self.outlog.replace(None if self.executor.stage.last else end, rebuild.outputs)
            extra = {"missing": rebuild.missing, "rebuilt_rows": rebuild.rows,
                     "rebuild_s": round(rebuild.seconds, 6), "restored_bytes": rebuild.nbytes}
            log.info("rebuilt the KV of layers %d-%d: %d sessions, %d rows, in %.2f s; %d "
                     "sessions without inputs", rebuild.start, rebuild.end - 1,
                     len(rebuild.inputs), rebuild.rows, rebuild.seconds, len(rebuild.missing))
        log.info("restored layers %d-%d (epoch %d): %d sessions kept, %d from shadows, "
                 "in %.2f s", start, end - 1, epoch, len(lengths), len(shadows), dt)
        await self.send(protocol.encode("loaded", epoch=epoch, start=start, end=end,
                                        weight_bytes=nbytes, load_s=dt, **extra))

    def _rebuild_of(self, msg: Message, lengths: dict[str, int]) -> Rebuild:
        """A restore's rebuild: the inputs of the layers to rebuild, from the message (token
        ids, for layer 0) or from what this node sent on (the sessions it holds them all of)."""
        spec = self.executor.spec
        try:
            a, b, prompts, ids = protocol.rebuild_request(msg, lengths, spec.num_layers,
                                                          spec.vocab_size)
        except ProtocolError as e:
            raise StepError(e.code, str(e)) from None
        if ids is None:
            ids = {sid: x for sid, n in lengths.items()
                   if (x := self.outlog.take(a, sid, n)) is not None}
        return Rebuild(a, b, ids, prompts)

    async def _answer(self, msgs: list[Message], done: list) -> None:
        """Send the rows' outputs on: tokens or hidden states to the broker, or (direct
        routing) hidden states to the next stage's node."""
        rows = [[r.sid, r.step, r.n] for r, _ in done]
        if self.executor.stage.last:
            await self._result(msgs, rows, [[t, lp] for _, (t, lp) in done])
            return
        hidden = join_rows([h for _, h in done])
        self._log_output([(r.sid, r.pos, r.n) for r, _ in done], hidden)
        if "route" in msgs[0].header:
            await self._forward(msgs, done, hidden)
        else:
            await self._result(msgs, rows, hidden)

    def _log_output(self, rows: list[tuple[str, int, int]], hidden) -> None:
        """Keep what this stage sends on (``OutputLog``); not of a last or split stage."""
        stage = self.executor.stage
        if not stage.last and stage.heads is None:
            self.outlog.record(stage.end, rows, hidden)

    async def _result(self, msgs: list[Message], rows: list, out) -> None:
        """The result for ``rows`` to the broker: the last stage's ``[token, logprob]`` per
        row, or an inner stage's hidden block."""
        # rows_of checked every message against the node's one epoch and stage
        first = msgs[0]
        fields = {"epoch": first["epoch"], "stage": first["stage"],
                  "compute_s": self.executor.last_compute_s, "rows": rows}
        if "times" in first.header:  # direct routing: the earlier stages' times, for the broker
            fields["times"] = _times(msgs)
        if self.executor.stage.last:
            await self.send(protocol.encode("result", tokens=out, **fields))
        else:
            await self.send(protocol.encode("result", {"hidden": out}, **fields))

    async def _forward(self, msgs: list[Message], done: list, hidden: torch.Tensor) -> None:
        """Direct routing: the rows' hidden states go straight to the next stage's node (the
        messages share one route), with their sampling and this stage's compute time; the
        broker hears from the last stage."""
        rows = [r for r, _ in done]
        sampling = {}
        for m in msgs:  # rows_of checked each message's rows
            given = m.get("sampling")
            if isinstance(given, list) and len(given) == len(m["rows"]):
                sampling.update(zip((r[0] for r in m["rows"]), given, strict=True))
        await self._pass_on(msgs, [[r.sid, r.step, r.pos, r.n] for r in rows],
                            [sampling.get(r.sid, {}) for r in rows], hidden)

    async def _pass_on(self, msgs: list[Message], rows: list, sampling: list | None,
                       hidden: torch.Tensor) -> None:
        """The step of ``rows`` ([sid, step, pos, n], as received) to the next stage's node."""
        first = msgs[0]
        try:
            addr = protocol.next_hop(first["route"], first["stage"])
            self.peers.check_route(first["epoch"], first["stage"], addr)
            frames = protocol.encode(
                "step", {"x": hidden}, epoch=first["epoch"], stage=first["stage"] + 1,
                rows=rows, route=first["route"],
                times=[*_times(msgs), [self.cfg.name, round(self.executor.last_compute_s, 6)]],
                **({"sampling": sampling} if sampling is not None else {}))
            self.peers.send(first["epoch"], first["stage"], addr, frames)
        except (ProtocolError, zmq.ZMQError) as e:  # the broker ends exactly these sessions
            code = e.code if isinstance(e, ProtocolError) else "peer_unreachable"
            for r in rows:
                await self.send(protocol.error(code, f"{self.cfg.name}: cannot pass the step "
                                               f"on: {e}", sid=r[0], step=r[1], **_epoch(first)))

    async def _refuse(self, msg: Message, err: StepError) -> None:
        """Error replies for a message this node will not run: one per row when it has rows,
        so the broker can end exactly those sessions."""
        text = f"{self.cfg.name}: {err}"
        rows = msg.get("rows") if msg.kind == "step" else None
        try:
            parsed = protocol.step_rows(rows) if isinstance(rows, list) else []
        except ProtocolError:
            parsed = []
        for sid, step, _, _ in parsed:
            await self.send(protocol.error(err.code, text, sid=sid, step=step, **_epoch(msg)))
        if not parsed:
            ids = {"rid": msg["rid"]} if "rid" in msg.header else {}
            await self.send(protocol.error(err.code, text, **ids))

    async def _in_pool(self, fn, *args):
        """``fn(*args)`` on the compute thread. Meanwhile the sockets do not busy-poll: a
        spinning event loop holds the GIL that the compute thread needs for every torch call
        (on the 2-core machine, torch work in a pool thread ran 2-3.5x slower beside a loop
        turning ``asyncio.sleep(0)``); the loop sleeps in its poller instead."""
        socks = [s for s in (self.sock, self.peers.sock) if s is not None]
        for s in socks:
            s.busy_poll_s = 0.0
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        finally:
            for s in socks:
                s.busy_poll_s = self.cfg.busy_poll_ms / 1000

    async def _reallocate(self, msg: Message) -> None:
        """The node's side of a move (brokers/mover.py): prepare, KV out/in, commit/abort."""
        ex = self.executor
        if msg.kind == "prepare":
            t0 = time.perf_counter()
            split = _split_args(msg)
            nbytes = await self._in_pool(lambda: ex.prepare(msg["start"], msg["end"],
                                                            msg["epoch"], **split))
            log.info("prepared layers %d-%d for epoch %d (%.1f MB)", msg["start"],
                     msg["end"] - 1, msg["epoch"], nbytes / 1e6)
            await self.send(protocol.encode("prepared", rid=msg["rid"], epoch=msg["epoch"],
                                            weight_bytes=nbytes,
                                            load_s=time.perf_counter() - t0))
        elif msg.kind == "kv_export":
            sids, since = msg["sids"], msg.get("since") or [0] * len(msg["sids"])
            if len(since) != len(sids) or not all(type(n) is int for n in since):
                raise StepError("bad_message", "since must be one row count per session")
            for sid, rows in zip(sids, since, strict=True):
                if not isinstance(sid, str):
                    raise StepError("bad_message", "sids must be strings")
                length, tensors = ex.export_kv(sid, msg["start"], msg["end"], rows,
                                               _heads(msg.get("heads")))
                await self.send(protocol.encode("kv_data", tensors, rid=msg["rid"], sid=sid,
                                                length=length, since=rows))
        elif msg.kind == "kv_import":
            tensors, since = msg.tensors, msg.get("since", 0)
            sent = sum(t.numel() * t.element_size() for t in tensors.values())
            if since:  # the rows before ``since`` are in our shadow of the sender
                try:
                    tensors = self.shadows.prefixed(msg.get("owner", ""), msg["sid"], since,
                                                    tensors)
                except ValueError as e:
                    raise StepError("bad_kv", str(e)) from None
            nbytes = await self._in_pool(ex.import_kv, msg["sid"], msg["length"], tensors,
                                         _heads(msg.get("heads")))
            await self.send(protocol.encode("kv_imported", rid=msg["rid"], sid=msg["sid"],
                                            nbytes=sent, shadow_bytes=nbytes - sent))
        elif msg.kind == "commit":
            await self._in_pool(ex.commit, msg["epoch"])
            settle_gc()  # the new stage's decoder: before steps resume
            held = f"layers {ex.stage.start}-{ex.stage.end - 1}" if ex.stage else "nothing"
            log.info("epoch %d committed: holding %s", msg["epoch"], held)
            await self.send(protocol.encode("committed", rid=msg["rid"], epoch=msg["epoch"]))
        elif msg.kind == "abort":
            ex.abort(msg["epoch"])
            log.info("reallocation to epoch %d aborted", msg["epoch"])
        elif msg.kind == "set_slow":
            factor = float(msg["factor"])
            if not 0 < factor <= 1000:
                raise StepError("bad_value", f"slow factor must be in (0, 1000], got {factor}")
            ex.slow_factor = factor
            log.info("compute slow-down factor set to %.2f", factor)

    async def _load(self, msg: Message) -> None:
        start, end, epoch = msg["start"], msg["end"], msg["epoch"]
        log.info("loading layers %d-%d (epoch %d) from %s", start, end - 1, epoch, self.model_dir)
        t0 = time.perf_counter()
        split = _split_args(msg)
        if split:
            log.info("holding KV heads %d-%d as member %d of %d", *split["heads"],
                     split["member"], len(split["group"]))
        nbytes = await self._in_pool(lambda: self.executor.load(start, end, epoch, **split))
        self.executor.shadow_every = max(0, msg.get("shadow_every", 0))
        dt = time.perf_counter() - t0
        settle_gc()  # before the broker hears "loaded" and sends steps
        log.info("loaded layers %d-%d: %.1f MB in %.2f s", start, end - 1, nbytes / 1e6, dt)
        await self.send(protocol.encode("loaded", epoch=epoch, start=start, end=end,
                                        weight_bytes=nbytes, load_s=dt))


def _heads(value: object) -> tuple[int, int] | None:
    """A message's KV-head range ``[a, b)``, checked for form (the executor checks bounds)."""
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 2
            and all(isinstance(h, int) and not isinstance(h, bool) for h in value)
            and value[0] < value[1]):
        raise StepError("bad_message", f"heads must be [a, b) with a < b, got {value!r:.80}")
    return value[0], value[1]


def _split_args(msg: Message) -> dict:
    """A load's or prepare's share of a stage split by heads: executor keyword arguments
    (``heads``, ``group``, ``member``), or none for a whole stage."""
    heads, group, member = _heads(msg.get("heads")), msg.get("group"), msg.get("member", 0)
    if heads is None and group is None:
        return {}
    if not (heads is not None and isinstance(group, list) and len(group) <= 64
            and all(protocol.is_peer_address(a) for a in group) and isinstance(member, int)):
        raise StepError("bad_message", "a split stage needs heads [a, b), group addresses and "
                                       "member")
    return {"heads": heads, "group": group, "member": member}


def settle_gc() -> None:
    """Collect what is new since the last freeze, then put the survivors out of the
    collector's reach. Loading a GPU stage makes ~300k long-lived Python objects
    (``torch.compile``'s graphs and guards); left tracked, every later full collection walks
    them all, stalling the step under way (166-192 ms for 312k such objects on a 2-core CPU;
    20-280 ms per collection in GPU nodes while they load). A replaced stage and its decoder
    hold no reference cycles: refcounting frees them although they were frozen."""
    gc.collect()
    gc.freeze()


def _size(msg: Message) -> tuple[int, int]:
    """(rows, tokens) of a step message, as announced (checked later by the executor)."""
    rows = msg.get("rows")
    x = msg.tensors.get("x")
    n_rows = len(rows) if isinstance(rows, list) else 1
    return n_rows, int(x.shape[0]) if x is not None and x.dim() >= 1 else 1


def _epoch(msg: Message) -> dict:
    """The step's epoch for an error about it (the broker drops those of earlier placements)."""
    epoch = msg.get("epoch")
    return {"epoch": epoch} if type(epoch) is int else {}


def _route(msg: Message) -> tuple:
    return msg.get("epoch"), msg.get("stage"), "route" in msg.header


def _route_key(msg: Message) -> object:
    route = msg.get("route")
    if isinstance(route, list) and all(isinstance(a, str) for a in route):
        return tuple(route)
    return id(msg)


def _times(msgs: list[Message]) -> list:
    """The earlier stages' [node, compute_s] of merged cohorts: the first message's (the
    broker checks them; merged cohorts report the first one's earlier stages)."""
    times = msgs[0].get("times")
    return times if isinstance(times, list) and len(times) <= protocol.MAX_STAGES else []


def _sids(msg: Message) -> set:
    rows = msg.get("rows")
    if not isinstance(rows, list):
        return set()
    return {r[0] for r in rows if isinstance(r, list) and r and isinstance(r[0], str)}


def run_node(cfg: NodeConfig) -> None:
    """Entry point of ``zpipe node``: runs until killed."""
    aio.run(Node(cfg).run())
