"""Step scheduling, the broker's hot path: sending sessions' token steps from stage to stage.

A step message carries several sessions ("rows"): the sessions a node answered together go on
together, so a batch (a cohort) stays whole from stage to stage and round to round.

``StepScheduler`` is a component of the broker (``brokers.core.Core``: the placement, registry,
sessions and metrics it reads; ``send``, ``finish`` and ``fail``). It also holds sessions at a
token boundary: while layers move (``quiesce`` / ``resume``) or no placement is ready (they are
``parked``), and on one shared GPU until the cohorts in flight can join them (``held``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from itertools import repeat

import torch

from brokers.core import Core
from brokers.registry import NodeInfo
from brokers.sessions import PENALTY_CONTEXT_MAX, Session
from zpipe import protocol
from zpipe.placement import Placement
from zpipe.protocol import MAX_STEP_TOKENS, Message, ProtocolError

log = logging.getLogger("zpipe.broker")


class Cohort:
    """Sessions whose step travels as one message from stage to stage (a batch, see
    ``StepScheduler.start``). While none of them has ended and the cohort has moved only as a whole
    (``intact``), a stage's answer for exactly its rows is recognised with one list comparison,
    and its rows, sampling and stage times are built once per step, not once per stage and
    session."""

    __slots__ = ("sessions", "rows", "answer_rows", "sampling", "n_tokens", "stage_times",
                 "stage", "intact")

    def __init__(self, sessions: list[Session]) -> None:
        self.sessions = sessions
        self.rows = [s.step_row() for s in sessions]
        self.answer_rows = [[sid, step, n] for sid, step, _, n in self.rows]  # as nodes say
        self.sampling = [s.step_sampling() for s in sessions]
        self.n_tokens = sum(r[3] for r in self.rows)
        # [node, compute_s, hop_s] per stage passed: one list for the whole cohort
        self.stage_times: list = []
        self.stage = 0  # the stage whose answer is awaited; -1 once the step is done
        self.intact = True


def cohorts(sessions: list[Session], cap: int) -> list[list[Session]]:
    """``sessions`` in order, cut into cohorts of at most ``cap`` whose penalty contexts
    together stay within ``PENALTY_CONTEXT_MAX`` ids (they travel in the step's header) and
    whose inputs (prompts, for prefills) within the ``MAX_STEP_TOKENS`` a node takes."""
    out: list[list[Session]] = []
    cur: list[Session] = []
    ids = tokens = 0
    for s in sessions:
        n = s.context_len() if s.penalised else 0
        t = s.step_input_len()
        if cur and (len(cur) == cap or ids + n > PENALTY_CONTEXT_MAX
                    or tokens + t > MAX_STEP_TOKENS):
            out.append(cur)
            cur, ids, tokens = [], 0, 0
        cur.append(s)
        ids += n
        tokens += t
    if cur:
        out.append(cur)
    return out


class StepScheduler:
    """The broker's token steps: started (``admit``, ``start``), passed from stage to stage
    and turned into tokens (``on_result``), held at token boundaries (``quiesce``)."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.paused = False  # a move holds every session at its next token boundary
        # Sessions waiting at a token boundary: for a move to end, or for a placement to be
        # ready again after a node died (``brokers.recovery``).
        self.parked: list[Session] = []
        # Sessions whose next step waits for the cohorts in flight to join it (one shared GPU,
        # ``_go_on``).
        self.held: list[Session] = []
        # Prefills of requests that arrived in one burst, sent together as one cohort once the
        # burst is handled (``admit``).
        self.prefills: list[Session] = []
        # Holds the pending flush task: the event loop keeps only a weak reference to a task.
        self.flusher: asyncio.Task | None = None
        # Set while paused whenever steps end: ``quiesce`` looks again then.
        self.steps_ended = asyncio.Event()

    # ------------------------------------------------------------------ starting steps
    def admit(self, s: Session) -> None:
        """A new session: its prefill starts with the others of its burst."""
        if not self.prefills:
            # Runs once the loop is idle: after every message already received, so requests
            # that came together start together (one cohort from the first step on).
            self.flusher = asyncio.get_running_loop().create_task(self._flush_prefills())
        self.prefills.append(s)

    async def _flush_prefills(self) -> None:
        batch, self.prefills = self.prefills, []
        alive = [s for s in batch if s.sid in self.core.sessions]  # not cancelled meanwhile
        if alive:
            await self.start(alive)

    async def start(self, sessions: list[Session]) -> None:
        """Send the sessions' next step to stage 0: one message per cohort of at most the
        placement's smallest ``max_batch``. A node would run a bigger cohort as several
        batches one after another; as separate cohorts they keep different stages busy at
        once (pipeline parallelism)."""
        if self.paused or not self.core.ready:  # a move, or a new placement after a node died:
            self.parked.extend(sessions)    # wait at this token boundary
            return
        for cohort in cohorts(sessions, self.cohort_cap() or len(sessions)):
            await self._start_cohort(cohort)

    async def _go_on(self, sessions: list[Session]) -> None:
        """Start the next step of ``sessions`` (their step just ended), or hold them until the
        steps in flight end too, where every stage shares one GPU: there the cohorts take
        turns and each reads every weight, so one cohort of 32 went ~1.5x faster than the same
        sessions split in two (a burst that reached the broker in two parts). New sessions run
        their prefill at once and join the running cohort at its next step."""
        held = self.held
        if self.one_gpu():
            flying = sum(s.in_flight for s in self.core.sessions.values())
            if flying and flying + len(held) + len(sessions) <= (self.cohort_cap() or 1 << 30):
                held.extend(sessions)
                return
        self.held = []
        go = [s for s in held if s.sid in self.core.sessions] + sessions
        if go:
            await self.start(go)

    def one_gpu(self) -> bool:
        """Every stage of the placement on one GPU (one host, one CUDA device)."""
        nodes = [self.core.registry.by_name.get(n) for n in self.core.placement.nodes()]
        return (all(n is not None and n.device.startswith("cuda") for n in nodes)
                and len({(n.host, n.device) for n in nodes}) == 1)

    def cohort_cap(self) -> int:
        """The smallest ``max_batch`` of the broker's limits and of what the placement's nodes
        registered: the broker's bounds its messages' size (zpipe/bounds.py)."""
        names = self.core.placement.nodes() if self.core.placement is not None else []
        caps = [n.max_batch for n in map(self.core.registry.by_name.get, names)
                if n is not None and n.max_batch > 0]
        return min([*caps, self.core.cfg.limits.max_batch])

    async def _start_cohort(self, sessions: list[Session]) -> None:
        # One tensor for the cohort, built from plain ints: a tensor per session costs ~5 us.
        ids = torch.tensor(sessions[0].step_input() if len(sessions) == 1 else
                           [t for s in sessions for t in s.step_input()], dtype=torch.int64)
        self.core.metrics.record_cohort(len(sessions))
        cohort = Cohort(sessions)
        now = time.perf_counter()
        for s in sessions:
            s.in_flight = True
            s.cohort = cohort
            s.stage_times = cohort.stage_times
            s.step_t0 = now
        route = self._direct_route()
        fields = self._step_fields(0, cohort.rows, cohort.sampling, direct=route is not None)
        if route is not None:
            fields["route"], fields["times"] = route, []
        await self._send_stage(sessions, 0, protocol.encode("step", {"x": ids}, **fields),
                               answer=len(self.core.placement.stages) - 1 if route else 0,
                               cohort=cohort)

    def _direct_route(self) -> list[str] | None:
        return self.route_of(self.core.placement)

    def route_of(self, placement: Placement) -> list[str] | None:
        """The peer addresses of stages 1..last when steps go node to node (``direct``)."""
        stages = placement.stages
        if not self.core.cfg.direct or len(stages) < 2 or placement.split():
            return None  # a stage split by heads takes each step from the broker
        route = [self.core.registry.by_name[st.node].peer for st in stages[1:]]
        return route if all(route) else None

    def _step_fields(self, stage: int, rows: list, sampling: list, direct: bool = False) -> dict:
        """A step message's fields; the sampling entries go to the last stage (all stages
        pass them on under direct routing)."""
        fields = {"epoch": self.core.placement.epoch, "stage": stage, "rows": rows}
        if direct or stage == len(self.core.placement.stages) - 1:
            fields["sampling"] = sampling
        return fields

    async def _send_stage(self, sessions: list[Session], stage: int, frames: list,
                          answer: int | None = None, cohort: Cohort | None = None) -> None:
        """Send a step to ``stage``; the sessions then wait for stage ``answer`` (the last one
        under direct routing, else ``stage`` itself). ``cohort``: they are that whole cohort."""
        st = self.core.placement.stages[stage]
        now = time.perf_counter()
        answer = stage if answer is None else answer
        for s in sessions:
            s.stage, s.hop_t0 = answer, now
        if cohort is not None:
            cohort.stage = answer
        # Every member of a split stage gets the step (the same frames, in the same order as
        # every other step: members run the same batches); the first member answers.
        for name in st.members():
            node = self.core.registry.by_name[name]
            if not await self.core.send(node.ident, frames) and node.state != "dead":
                # Its queue is full. Were it gone, it would be dead now: the recovery replays
                # the sessions' steps once the model is placed again.
                for s in sessions:
                    await self.core.fail(s, "node_lost", f"node {node.name} takes no more steps")
                return

    async def on_result(self, node: NodeInfo, msg: Message) -> None:
        stage, placement = msg["stage"], self.core.placement
        if (placement is None or msg["epoch"] != placement.epoch
                or not 0 <= stage < len(placement.stages)
                or placement.stages[stage].node != node.name):
            return  # a late answer from a placement that has since changed
        cohort = self._answering_cohort(msg["rows"], stage)
        if cohort is not None:  # exactly the rows sent, all live: no check per row
            rows = cohort.answer_rows
            live = list(enumerate(cohort.sessions))
        else:
            try:
                rows = protocol.result_rows(msg["rows"])
            except ProtocolError as e:
                log.warning("node %s sent a bad result: %s", node.name, e)
                return
            live = self._live_rows(rows, stage)
            if not live:
                return
        now = time.perf_counter()
        compute = float(msg["compute_s"])
        earlier: list[tuple[str, float]] = []
        if "times" in msg.header:  # direct routing: the stages before this one, as they said
            try:
                earlier = protocol.stage_times(msg["times"], stage)
            except ProtocolError as e:
                log.warning("node %s sent bad stage times: %s", node.name, e)
        known = {st.node for st in placement.stages}
        upstream = sum(c for _, c in earlier)
        decoding = sum(s.step > 0 for _, s in live)  # one compute figure per decode token
        if decoding:
            for name, c in (*earlier, (node.name, compute)):
                if name in known:
                    self.core.measured[name].extend(repeat(c, decoding))
        # Sessions sent together share one hop_t0 and one stage_times list: one entry each.
        # The time no stage computed counts as this stage's hop.
        done: set[int] = set()
        for _, s in live:
            if id(s.stage_times) not in done:
                done.add(id(s.stage_times))
                s.stage_times.extend([[name, round(c, 6), 0.0] for name, c in earlier] + [
                    [node.name, round(compute, 6),
                     round(now - s.hop_t0 - upstream - compute, 6)]])
        if stage < len(placement.stages) - 1:
            await self._forward(node, msg, rows, live, cohort)
        else:
            if cohort is not None:
                cohort.stage = -1
            await self._tokens(node, msg, live, now)

    @staticmethod
    def _replayed(s: Session) -> None:
        """A session is back where it was when its KV was lost."""
        if s.replay_diff:  # bf16 batches round differently: the known tokens stood
            log.warning("session %s resumed at token %d (%d tokens replayed in all); %d of "
                        "them came out differently this time (kept as sent)", s.sid[:8],
                        len(s.tokens), s.replayed, s.replay_diff)
        else:
            log.info("session %s resumed at token %d (%d tokens replayed in all)", s.sid[:8],
                     len(s.tokens), s.replayed)

    def _answering_cohort(self, rows: object, stage: int) -> Cohort | None:
        """The intact cohort awaited at ``stage`` whose rows ``rows`` (untrusted) are, exactly."""
        if not (type(rows) is list and rows and type(rows[0]) is list and rows[0]
                and type(rows[0][0]) is str):
            return None
        s = self.core.sessions.get(rows[0][0])
        cohort = s.cohort if s is not None else None
        if cohort is None or not cohort.intact or cohort.stage != stage \
                or rows != cohort.answer_rows:
            return None
        return cohort

    def _live_rows(self, rows: list, stage: int) -> list[tuple[int, Session]]:
        """The rows (checked) whose sessions await this answer; the cohorts of all the rows'
        sessions travel apart from now on (intact no more)."""
        live: list[tuple[int, Session]] = []
        for i, (sid, step, n) in enumerate(rows):
            s = self.core.sessions.get(sid)
            # Rows of finished, cancelled or re-routed steps are late answers: dropped.
            if s is not None and s.step == step and s.stage == stage and s.in_flight \
                    and n == s.step_input_len():
                live.append((i, s))
                if s.cohort is not None:
                    s.cohort.intact = False
        return live

    async def _forward(self, node: NodeInfo, msg: Message, rows: list, live: list,
                       cohort: Cohort | None) -> None:
        """Send an inner stage's hidden states on to the next stage: the received frames
        untouched when every row is still live, else only the live rows' states."""
        sessions = [s for _, s in live] if cohort is None else cohort.sessions
        meta = msg["t"]
        n_tokens = cohort.n_tokens if cohort is not None else sum(n for _, _, n in rows)
        if (len(meta) != 1 or meta[0][0] != "hidden" or len(meta[0][2]) != 2
                or meta[0][2][0] != n_tokens):
            for s in list(sessions):
                await self.core.fail(s, "bad_result",
                                         f"node {node.name} sent no matching hidden state")
            return
        stage = sessions[0].stage + 1
        if cohort is not None:
            fields = self._step_fields(stage, cohort.rows, cohort.sampling)
        else:  # sessions that no longer travel as their cohort
            fields = self._step_fields(stage, [s.step_row() for s in sessions],
                                       [s.step_sampling() for s in sessions])
        if len(live) == len(rows):
            frames = protocol.encode_forward("step", msg.frames, [["x", *meta[0][1:]]], **fields)
        else:
            parts = msg.tensors["hidden"].split([n for _, _, n in rows])
            frames = protocol.encode("step", {"x": torch.cat([parts[i] for i, _ in live])},
                                     **fields)
        await self._send_stage(sessions, stage, frames, cohort=cohort)

    async def _tokens(self, node: NodeInfo, msg: Message, live: list, now: float) -> None:
        """The last stage's tokens: start the next step of every session that goes on (together,
        and first, so the nodes compute while the broker talks to the clients), then hand the
        tokens out."""
        tokens = msg.get("tokens")
        emitted, nxt = [], []
        for i, s in live:
            entry = tokens[i] if isinstance(tokens, list) and i < len(tokens) else None
            # A logprob the client's check refuses (NaN, inf) would lose every token of its
            # message: such an entry fails its session here instead.
            if not (isinstance(entry, list) and len(entry) == 2 and type(entry[0]) is int
                    and 0 <= entry[0] < self.core.spec.vocab_size
                    and type(entry[1]) in (int, float) and math.isfinite(entry[1])):
                await self.core.fail(s, "bad_result", f"node {node.name} sent no valid token")
                continue
            token = entry[0]
            s.in_flight = False
            s.pos += s.step_input_len()
            if s.replaying():  # its KV rebuilt one token further; the client has the token
                s.replay_diff += token != s.tokens[s.step]
                s.step += 1
                if not s.replaying():
                    self._replayed(s)
                nxt.append(s)
                continue
            s.tokens.append(token)
            end = ("stop" if token in s.stop_ids
                   else "length" if len(s.tokens) >= s.max_new_tokens else None)
            emitted.append((s, len(s.tokens) - 1, token, float(entry[1]), now - s.step_t0,
                            s.stage_times, end))
            if end is None:
                s.step += 1
                nxt.append(s)
        self._ended()
        if nxt or self.held:
            await self._go_on(nxt)
        # One message per client for all its sessions' tokens: a send costs more than its bytes.
        by_client: dict[bytes, list[dict]] = {}
        # Rows of one cohort share their step time and stage entries: recorded once for all.
        cohorts: dict[tuple, tuple[dict, list[str]]] = {}
        for s, index, token, logprob, step_s, stage_times, _ in emitted:
            first = s.first_token_s is None
            if first:
                s.first_token_s = now - s.created
            key = (step_s, first, id(stage_times))
            group = cohorts.get(key)
            if group is None:
                group = cohorts[key] = ({"step_s": round(step_s, 6), "stages": stage_times}, [])
            group[1].append(s.sid)
            by_client.setdefault(s.client, []).append({
                "rid": s.rid, "index": index, "token_id": token, "logprob": logprob,
                "text": s.detok.add(token), "timing": group[0]})
        for (step_s, first, _), (timing, sids) in cohorts.items():
            self.core.metrics.record_tokens(sids, step_s, timing["stages"], first)
        for client, items in by_client.items():
            await self.core.send(client, protocol.encode("tokens", items=items))
        for s, *_, end in emitted:
            if end is not None:
                await self.core.finish(s, end)

    # ------------------------------------------------------------------ token boundaries
    def in_flight(self) -> bool:
        return any(s.in_flight for s in self.core.sessions.values())

    async def quiesce(self) -> None:
        """Hold every session at its next token boundary; returns when no step is in flight
        (``_ended`` wakes it whenever steps end: their answers, a session's end, a loss)."""
        self.paused = True
        while self.in_flight():
            self.steps_ended.clear()
            await self.steps_ended.wait()

    async def resume(self) -> None:
        """After a move: the parked sessions go on (once a placement is ready, if a node died
        meanwhile)."""
        self.paused = False
        if not self.core.ready:
            return
        parked, self.parked = self.parked, []
        alive = [s for s in parked if s.sid in self.core.sessions]
        if alive:
            await self.start(alive)

    def _ended(self) -> None:
        if self.paused:
            self.steps_ended.set()

    async def released(self, s: Session) -> None:
        """``s`` has ended (the core dropped it from the sessions)."""
        # held sessions may have waited for this one's step
        if self.held and s.in_flight and self.core.placement is not None:
            await self._go_on([])
        self._ended()

    def restart_all(self, positions: dict[str, int] | None = None) -> list[Session]:
        """The KV of every session was lost: each waits to replay from its prompt
        (``Session.replay``), or from the row ``positions`` gives it (``Session.replay_from``:
        the KV before it was kept), until ``resume``. Returns them."""
        self.held, self.prefills = [], []
        self.parked = list(self.core.sessions.values())
        for s in self.parked:
            at = positions.get(s.sid) if positions else None
            if at is None:
                s.replay()
            else:
                s.replay_from(at)
        self._ended()
        return self.parked

    def unpark(self) -> list[Session]:
        """Take every parked session (recovery gave up on them)."""
        parked, self.parked = self.parked, []
        return parked

    def drop_held(self) -> None:
        """Every session is about to end: none of the held ones may start a step meanwhile."""
        self.held = []
