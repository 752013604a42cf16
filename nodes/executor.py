"""Runs steps on the stage a node holds, and keeps each session's KV cache."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

import torch

from nodes.group import Group, GroupError
from nodes.rows import Row, RowState, join_rows
from zpipe import protocol
from zpipe.config import StaticKV
from zpipe.decode import Decoder
from zpipe.kvcache import KVCache
from zpipe.protocol import Message, ProtocolError
from zpipe.sampling import SamplingParams, sample
from zpipe.shard import ModelSpec, Stage
from zpipe.slots import SlotKV, SlotPool

log = logging.getLogger("zpipe.node")

_DEFAULT_SAMPLING = SamplingParams()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class StepError(Exception):
    """A step this node refuses; ``code`` goes back to the broker in the error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class KnownCohort:
    """The step a node expects next from the rows it just ran together on pool slots: the
    same sessions, one token further. A step message with exactly these rows (one list
    comparison) runs through the decoder without per-row checks or objects; everything
    per row here is built after the answer went out, while other stages compute."""

    rows: list  # [sid, step, pos, 1] per session, as the broker sends them
    sampling: list | None  # the step message's sampling entries, as received
    params: list[SamplingParams | None]
    caches: list[SlotKV]
    answer: list = field(init=False)  # [sid, step, 1] per session, as the result says them

    def __post_init__(self) -> None:
        self.answer = [[sid, step, 1] for sid, step, _, _ in self.rows]

    def after(self) -> KnownCohort:
        """The step after this one (once it ran)."""
        return KnownCohort([[sid, step + 1, pos + 1, 1] for sid, step, pos, _ in self.rows],
                           self.sampling, self.params, self.caches)


class Executor:
    def __init__(self, model_dir: Path, dtype: str, device: str, max_step_tokens: int = protocol.MAX_STEP_TOKENS,
                 static_kv: StaticKV | None = None, max_batch: int = 64):
        self.model_dir = model_dir
        # With a static KV pool, sessions live in slots and decode steps run batched through
        # a Decoder (CUDA graphs on GPUs); sessions without a slot take the eager path.
        self.static_kv = static_kv if static_kv is not None and static_kv.on(device) else None
        self.max_batch = max_batch
        self.pool: SlotPool | None = None
        self.decoder: Decoder | None = None
        self.spec = ModelSpec.load(model_dir)
        self.dtype = DTYPES[dtype]
        self.device = device
        self.max_step_tokens = max_step_tokens
        self.stage: Stage | None = None
        self.epoch = -1
        self.caches: dict[str, KVCache] = {}
        # A reallocation in progress: (epoch, stage or None) and the KV received for it.
        self.pending: tuple[int, Stage | None] | None = None
        self.pending_caches: dict[str, KVCache] = {}
        self.pending_heads: tuple[int, int] | None = None  # the KV heads received, if split
        self.pending_group: tuple[list[str], int] | None = None  # a split stage's members
        self.slow_factor = 1.0  # > 1 slows compute on purpose (tests, demos)
        self.last_compute_s = 0.0
        # The cohort expected next (``step_known``); anything else that touches the caches
        # forgets it. Step batches run, and of those the known cohorts':
        self.known: KnownCohort | None = None
        self.steps = self.known_steps = 0
        # KV shadows: every ``shadow_every`` new rows of a session (0: never) go to the broker,
        # which passes them to this node's shadow holder; ``shadowed`` rows were sent already.
        self.shadow_every = 0
        self.shadowed: dict[str, int] = {}
        # A stage split by KV-head groups combines its partials through ``group`` (the node
        # gives it); ``member`` 0 answers the broker, the others only compute.
        self.group: Group | None = None
        self.member = 0

    def load(self, start: int, end: int, epoch: int, heads: tuple[int, int] | None = None,
             group: list[str] | None = None, member: int = 0,
             timeout_s: float = 30.0) -> int:
        """Load layers [start, end) (of a stage split by heads: KV heads ``heads`` as member
        ``member`` of the members whose group addresses are ``group``); returns the weight
        bytes now held."""
        if not 0 <= start < end <= self.spec.num_layers:
            raise StepError("bad_range", f"layers {start}-{end - 1} are outside the model's "
                                         f"{self.spec.num_layers} layers")
        if heads is not None:
            if not (group and 0 <= member < len(group) and self.group is not None):
                raise StepError("bad_range", "a share of a split stage needs its group")
            if not 0 <= heads[0] < heads[1] <= self.spec.num_kv_heads:
                raise StepError("bad_range", f"KV heads {heads[0]}-{heads[1] - 1} are outside "
                                             f"the model's {self.spec.num_kv_heads}")
        self.known = None
        self.shadowed.clear()
        st = self.stage
        if st is None or (st.start, st.end, st.heads) != (start, end, _all_is_none(
                heads, self.spec.num_kv_heads)):
            self.stage = self.decoder = self.pool = None  # free the old before the new
            self.caches.clear()
            self.stage = Stage(self.model_dir, start, end, dtype=self.dtype, device=self.device,
                               heads=heads)
            self._warm(self.stage)
            if self.stage.heads is None:  # a split stage runs eagerly (no pool, no graphs)
                self._static(self.stage)
            if self.decoder is not None:
                self.decoder.warm()
        if self.group is not None:
            self.group.leave()
        self.member = 0
        if self.stage.heads is not None:
            self.group.join(epoch, member, group, timeout_s)
            self.stage.combine = self.group.combine
            self.member = member
        self.epoch = epoch
        return self.stage.weight_bytes()

    def _warm(self, stage: Stage) -> None:
        """GPU stages: meet every matmul shape of a batch now, not during the first prefills."""
        if stage.pad_rows:
            took = stage.warm_matmuls(self.max_step_tokens, self.max_batch)
            log.info("warmed layers %d-%d's matmul shapes in %.2f s", stage.start,
                     stage.end - 1, took)

    def _static(self, stage: Stage | None) -> None:
        """Set up (or, after a move, re-aim) the KV pool and the decoder for ``stage``."""
        cfg = self.static_kv
        self.decoder = None
        if cfg is None or stage is None:
            self.pool = None
            return
        spec, layers = stage.spec, range(stage.start, stage.end)
        if self.pool is None:
            self.pool = SlotPool(layers, spec.num_kv_heads, spec.head_dim, cfg.slots,
                                 cfg.max_len, stage.dtype, stage.device)
        else:
            self.pool.retarget(layers)
        self.decoder = Decoder(stage, self.pool, self.max_batch, graphs=cfg.cuda_graphs,
                               compile=cfg.compile, triton_attention=cfg.triton_attention)

    # ------------------------------------------------------------ reallocation
    def prepare(self, start: int, end: int, epoch: int, heads: tuple[int, int] | None = None,
                group: list[str] | None = None, member: int = 0) -> int:
        """Load the stage this node will hold after ``epoch`` commits, beside the current one
        (of a stage split by heads: KV heads ``heads`` as member ``member`` of ``group``).

        Layers it already holds (with the same heads) are shared, not read again.
        ``start == end``: nothing.
        """
        self.pending_caches = {}
        self.pending_heads = None
        if start == end:
            self.pending = (epoch, None)
            return 0
        if not 0 <= start < end <= self.spec.num_layers:
            raise StepError("bad_range", f"layers {start}-{end - 1} are outside the model")
        if heads is not None and not (group and 0 <= member < len(group)
                                      and 0 <= heads[0] < heads[1] <= self.spec.num_kv_heads):
            raise StepError("bad_range", f"bad share of a split stage: heads {heads}")
        stage = Stage(self.model_dir, start, end, dtype=self.dtype, device=self.device,
                      reuse=self.stage, heads=heads)
        self._warm(stage)  # shapes met before are cached process-wide: only new ones cost
        self.pending = (epoch, stage)
        self.pending_group = (list(group), member) if stage.heads is not None else None
        return stage.weight_bytes()

    def export_kv(self, sid: str, start: int, end: int,
                  since: int = 0,
                  heads: tuple[int, int] | None = None) -> tuple[int, dict[str, torch.Tensor]]:
        """Session ``sid``'s K/V of layers ``[start, end)``, rows ``since`` on (those before
        are in the destination's shadow): of KV heads ``heads`` (model-wide numbering) only,
        or of every head this node holds. Returns (the cache's length, the tensors)."""
        cache = self.caches.get(sid)
        if cache is None:
            raise StepError("unknown_session", f"no KV cache for session {sid} on this node")
        if not 0 <= since <= cache.length:
            raise StepError("bad_range", f"session {sid}: rows from {since} of {cache.length}")
        try:
            local = None
            if heads is not None:
                lo, hi = _held(self.stage, self.spec.num_kv_heads)
                if not lo <= heads[0] < heads[1] <= hi:
                    raise ValueError(f"KV heads {heads[0]}-{heads[1] - 1} are not held here "
                                     f"({lo}-{hi - 1})")
                local = range(heads[0] - lo, heads[1] - lo)
            return cache.length, cache.export(range(start, end), local,
                                              tokens=range(since, cache.length))
        except (KeyError, ValueError) as e:
            raise StepError("bad_range", f"session {sid}: {e}") from None

    def import_kv(self, sid: str, length: int, tensors: dict[str, torch.Tensor],
                  heads: tuple[int, int] | None = None) -> int:
        """Stage received KV layers (of KV heads ``heads`` only, model-wide numbering) for the
        pending placement; returns the bytes taken."""
        if self.pending is None or self.pending[1] is None:
            raise StepError("not_prepared", "KV arrived for a placement this node did not prepare")
        stage = self.pending[1]
        if heads is not None:
            lo, hi = _held(stage, self.spec.num_kv_heads)
            if not lo <= heads[0] < heads[1] <= hi or (
                    self.pending_heads not in (None, heads)):
                raise StepError("bad_range", f"KV heads {heads} outside the prepared {lo}-{hi}")
            self.pending_heads = heads
        n_heads = self.spec.num_kv_heads if heads is None else heads[1] - heads[0]
        cache = self.pending_caches.get(sid)
        if cache is None:
            cache = self.pending_caches[sid] = KVCache(
                range(0), n_heads, self.spec.head_dim, stage.dtype, stage.device)
        layers = {int(name.split(".", 1)[1]) for name in tensors if "." in name}
        if not layers <= set(range(stage.start, stage.end)):
            raise StepError("bad_range", f"KV for layers {sorted(layers)} outside the prepared "
                                         f"{stage.start}-{stage.end - 1}")
        try:
            cache.import_({k: t.to(stage.device, stage.dtype) for k, t in tensors.items()},
                          length)
        except ValueError as e:
            raise StepError("bad_kv", f"session {sid}: {e}") from None
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def commit(self, epoch: int) -> None:
        """Switch to the prepared stage: keep the KV of layers still held, adopt received KV."""
        if self.pending is None or self.pending[0] != epoch:
            raise StepError("not_prepared", f"nothing prepared for epoch {epoch}")
        _, stage = self.pending
        self.known = None
        self.shadowed.clear()  # other layers now: the holder gets them all again
        if stage is None:
            self.free(list(self.caches))
            self._static(None)
        elif self.stage is not None and stage.heads != self.stage.heads \
                or self.pending_heads is not None:
            self._commit_heads(stage)
        else:
            keep = set(range(stage.start, stage.end))
            for sid in self.caches.keys() | self.pending_caches.keys():  # check before changing
                have = set(self.caches[sid].k) if sid in self.caches else set()
                got = set(self.pending_caches[sid].k) if sid in self.pending_caches else set()
                if (have & keep) | got != keep:
                    raise StepError("bad_kv", f"session {sid} lacks KV for layers "
                                              f"{sorted(keep - (have | got))}")
            self._static(stage if stage.heads is None else None)
            for cache in self.caches.values():
                _keep_layers(cache, keep)
            for sid, got in self.pending_caches.items():
                if sid not in self.caches:  # a session new to this node
                    slot = self.pool.session() if self.pool and got.length <= self.pool.max_len \
                        else None
                    self.caches[sid] = got if slot is None else slot
                if self.caches[sid] is not got:
                    self.caches[sid].adopt(got)
        self._join(stage, epoch)
        self.stage, self.epoch = stage, epoch
        self.pending, self.pending_caches, self.pending_heads = None, {}, None

    def _commit_heads(self, stage: Stage) -> None:
        """Commit a stage whose KV heads differ from the held one's (same layers, or a node
        new to the stage): each session's cache is rebuilt with the new heads, from the heads
        it keeps and those received."""
        g = self.spec.num_kv_heads
        new = _held(stage, g)
        old = _held(self.stage, g) if self.stage is not None else (0, 0)
        got = self.pending_heads or (0, 0)
        if self.stage is not None and self.caches and \
                (self.stage.start, self.stage.end) != (stage.start, stage.end):
            raise StepError("bad_kv", "a change of heads keeps the layers")
        keep = (max(old[0], new[0]), min(old[1], new[1]))
        if not self.caches and not self.pending_caches:  # no sessions: nothing to rebuild
            self._static(None)
            return
        covered = sorted([r for r in (keep, got) if r[0] < r[1]])
        if not covered or covered[0][0] != new[0] or covered[-1][1] != new[1] or any(
                a[1] != b[0] for a, b in zip(covered, covered[1:], strict=False)):
            raise StepError("bad_kv", f"KV heads {new[0]}-{new[1] - 1} are not all here")
        sids = self.caches.keys() if keep[0] < keep[1] else self.pending_caches.keys()
        for sid in sids | self.pending_caches.keys():  # check before changing
            if keep[0] < keep[1] and sid not in self.caches or \
                    got[0] < got[1] and sid not in self.pending_caches:
                raise StepError("bad_kv", f"session {sid} lacks KV for KV heads of "
                                          f"layers {stage.start}-{stage.end - 1}")
        caches = {}
        for sid in sids:
            parts = []
            if keep[0] < keep[1]:
                parts.append((self.caches[sid], keep, old[0]))
            if got[0] < got[1]:
                parts.append((self.pending_caches[sid], got, got[0]))
            caches[sid] = _merged(stage, new, sid, parts)
        self.free(list(self.caches))
        self._static(None)
        self.caches = caches

    def _join(self, stage: Stage | None, epoch: int) -> None:
        """After a commit: the combine of a split stage with its members, or none."""
        self.member = 0
        if self.group is None:
            return
        self.group.leave()
        if stage is not None and stage.heads is not None:
            group, member = self.pending_group
            self.group.join(epoch, member, group, 30.0)
            stage.combine = self.group.combine
            self.member = member

    def abort(self, epoch: int) -> None:
        if self.pending is not None and self.pending[0] == epoch:
            self.pending, self.pending_caches, self.pending_heads = None, {}, None

    def free(self, sids: list[str]) -> None:
        self.known = None
        for sid in sids:
            self.shadowed.pop(sid, None)
            cache = self.caches.pop(sid, None)
            if isinstance(cache, SlotKV):
                cache.release()

    # ------------------------------------------------------------ KV shadows
    def shadow_due(self) -> list[tuple[str, int, int, dict[str, torch.Tensor]]]:
        """``(sid, start, length, tensors)`` for each session with ``shadow_every`` or more
        rows not yet shadowed: rows ``[start, length)`` of every layer held, now counted as
        sent."""
        every, stage = self.shadow_every, self.stage
        if not every or stage is None:
            return []
        out = []
        layers = range(stage.start, stage.end)
        for sid, cache in self.caches.items():
            start = self.shadowed.get(sid, 0)
            if cache.length - start >= every:
                out.append((sid, start, cache.length,
                            cache.export(layers, tokens=range(start, cache.length))))
                self.shadowed[sid] = cache.length
        return out

    def restore(self, start: int, end: int, epoch: int, lengths: dict[str, int],
                shadows: dict[str, KVCache], heads: tuple[int, int] | None = None,
                group: list[str] | None = None, member: int = 0,
                rebuild: Rebuild | None = None) -> int:
        """After a node of the placement died: hold layers ``[start, end)`` at ``epoch``,
        keeping the KV of the sessions in ``lengths`` cut to their length (the rows after it
        are computed again) and freeing every other session's. Layers new to this node take
        their KV from ``shadows`` (the dead owner's, cut to the same lengths), or with
        ``rebuild`` compute it from the inputs those layers had (``Rebuild``: the sessions it
        has no input for are freed too, and listed in its ``missing``). Of a stage split
        by heads: KV heads ``heads`` as member ``member`` of ``group``; heads new to this node
        (a dead member's) take their KV from ``shadows`` the same way. Returns the weight bytes
        now held."""
        if rebuild is not None:
            rebuild.missing = sorted(set(lengths) - set(rebuild.inputs))
            lengths = {sid: n for sid, n in lengths.items() if sid in rebuild.inputs}
        have = self.stage
        want = _all_is_none(heads, self.spec.num_kv_heads)
        if have is not None and (have.start, have.end) == (start, end) and have.heads != want:
            return self._restore_heads(epoch, lengths, shadows, want, group, member)
        self.pending_group = (list(group), member) if want is not None else None
        if not 0 <= start < end <= self.spec.num_layers:
            raise StepError("bad_range", f"layers {start}-{end - 1} are outside the model")
        self.known = None
        self.shadowed.clear()
        self.free([sid for sid in self.caches if sid not in lengths])
        have = self.stage
        held = set(range(have.start, have.end)) if have is not None else set()
        new = set(range(start, end)) - held
        if rebuild is not None and (not new or new != set(range(rebuild.start, rebuild.end))):
            raise StepError("bad_range", f"layers {rebuild.start}-{rebuild.end - 1} to rebuild "
                                         f"are not the ones new here ({sorted(new)})")
        for sid, length in lengths.items():  # check everything before changing anything
            cache = self.caches.get(sid)
            if cache is None or cache.length < length:
                raise StepError("bad_kv", f"session {sid}: {length} rows to keep, "
                                          f"{cache.length if cache else 0} cached")
            if rebuild is not None:
                if rebuild.inputs[sid].shape[0] != length:
                    raise StepError("bad_kv", f"session {sid}: {length} rows to keep, "
                                              f"{rebuild.inputs[sid].shape[0]} to rebuild from")
                continue
            got = shadows.get(sid)
            if new and (got is None or set(got.k) != new or got.length != length):
                raise StepError("bad_kv", f"session {sid}: no shadow of layers {sorted(new)} "
                                          f"up to row {length}")
        for sid, length in lengths.items():
            self.caches[sid].length = length
        if have is not None and (have.start, have.end) == (start, end):
            self._join(have, epoch)  # a split stage's members combine at the new epoch
            self.epoch = epoch
            return have.weight_bytes()
        stage = Stage(self.model_dir, start, end, dtype=self.dtype, device=self.device,
                      reuse=have)
        if rebuild is not None:
            shadows = self._rebuild(stage, rebuild)
        self._warm(stage)
        self._static(stage)
        keep = set(range(start, end))
        for sid in lengths:
            cache = self.caches[sid]
            _keep_layers(cache, keep)
            got = shadows[sid]
            if got.device != stage.device or got.dtype != stage.dtype:
                moved = KVCache(range(0), got.n_kv_heads, got.head_dim, stage.dtype,
                                stage.device)
                moved.import_({k: t.to(stage.device, stage.dtype)
                               for k, t in got.export(got.layers).items()}, got.length)
                got = moved
            cache.adopt(got)
        self.stage, self.epoch = stage, epoch
        return stage.weight_bytes()

    @torch.inference_mode()
    def _rebuild(self, stage: Stage, rb: Rebuild) -> dict[str, KVCache]:
        """The KV of layers ``[rb.start, rb.end)`` (held by ``stage``) for each session of
        ``rb``: those layers run over the session's inputs, every session's chunk of a round
        in one batch. A session's prompt goes as it went the first time (one prefill, cut at
        ``max_step_tokens``), so its rows are as they were; the tokens after it go as longer
        chunks than their one-token steps did, so their rows match those to within rounding.
        ``rb.outputs`` gets the hidden states after the layers (none from the last stage)."""
        t0 = time.perf_counter()
        part = Stage(self.model_dir, rb.start, rb.end, dtype=stage.dtype,
                     device=str(stage.device), reuse=stage)
        caches = {sid: part.new_cache() for sid in rb.inputs}
        chunks = {sid: _chunks(x.shape[0], rb.prompts.get(sid, 0), self.max_step_tokens)
                  for sid, x in rb.inputs.items()}
        outs: dict[str, list[torch.Tensor]] = {sid: [] for sid in rb.inputs}
        for r in range(max((len(c) for c in chunks.values()), default=0)):
            rnd = [(sid, c[r]) for sid, c in chunks.items() if r < len(c)]
            # a round's chunks in batches of max_step_tokens at most
            for i, j in _batches([b - a for _, (a, b) in rnd], len(rnd), self.max_step_tokens):
                got = part.forward_batch([(caches[sid], rb.inputs[sid][a:b], a)
                                          for sid, (a, b) in rnd[i:j]])
                if not part.last:
                    for (sid, _), h in zip(rnd[i:j], got, strict=True):
                        outs[sid].append(h)
        if not part.last:
            rb.outputs = {sid: torch.cat(h) if len(h) > 1 else h[0] for sid, h in outs.items()
                          if h}
        rb.rows = sum(x.shape[0] for x in rb.inputs.values())
        rb.nbytes = sum(c.used_bytes() for c in caches.values())
        rb.seconds = time.perf_counter() - t0
        return caches

    def _restore_heads(self, epoch: int, lengths: dict[str, int], shadows: dict[str, KVCache],
                       heads: tuple[int, int] | None, group: list[str] | None,
                       member: int) -> int:
        """``restore`` of a member of a split stage that takes a dead member's KV heads (its
        neighbours): its own heads' KV is kept, the dead one's comes from the shadows."""
        have, g = self.stage, self.spec.num_kv_heads
        old, new = _held(have, g), heads or (0, g)
        if not (new[0] <= old[0] and old[1] <= new[1]) or (new[0] < old[0]) == (old[1] < new[1]):
            raise StepError("bad_range", f"KV heads {new} do not extend {old} on one side")
        got = (new[0], old[0]) if new[0] < old[0] else (old[1], new[1])
        layers = set(range(have.start, have.end))
        for sid, length in lengths.items():  # check everything before changing anything
            cache, shadow = self.caches.get(sid), shadows.get(sid)
            if cache is None or cache.length < length:
                raise StepError("bad_kv", f"session {sid}: {length} rows to keep, "
                                          f"{cache.length if cache else 0} cached")
            if (shadow is None or shadow.n_kv_heads != got[1] - got[0]
                    or set(shadow.k) != layers or shadow.length != length):
                raise StepError("bad_kv", f"session {sid}: no shadow of KV heads "
                                          f"{got[0]}-{got[1] - 1} up to row {length}")
        self.known = None
        self.shadowed.clear()
        self.free([sid for sid in self.caches if sid not in lengths])
        for sid, length in lengths.items():
            self.caches[sid].length = length
        stage = Stage(self.model_dir, have.start, have.end, dtype=self.dtype,
                      device=self.device, heads=heads)
        self._warm(stage)
        caches = {sid: _merged(stage, new, sid, [(self.caches[sid], old, old[0]),
                                                 (shadows[sid], got, got[0])])
                  for sid in lengths}
        self.free(list(self.caches))
        self._static(None)
        self.caches = caches
        self.pending_group = (list(group), member) if stage.heads is not None else None
        self._join(stage, epoch)
        self.stage, self.epoch = stage, epoch
        return stage.weight_bytes()

    def kv_bytes(self) -> int:
        return sum(c.nbytes() for c in self.caches.values())

    def rows_of(self, msg: Message) -> list[Row]:
        """A step message's rows, checked against the message; a StepError refuses them all."""
        stage = self.stage
        if stage is None:
            raise StepError("not_loaded", "this node holds no layers yet")
        if msg["epoch"] != self.epoch:
            raise StepError("stale_epoch", f"step for epoch {msg['epoch']}, node is at {self.epoch}")
        try:
            rows = protocol.step_rows(msg["rows"])
        except ProtocolError as e:
            raise StepError(e.code, str(e)) from None
        x = msg.tensors.get("x")
        if x is None or len(msg.tensors) != 1:
            raise StepError("bad_message", "a step carries exactly one tensor, 'x'")
        lens = [n for _, _, _, n in rows]
        self._check_input(stage, x, sum(lens))
        sampling = msg.get("sampling")
        params: list[SamplingParams | None] = [None] * len(rows)
        if stage.last:
            if sampling is not None and len(sampling) != len(rows):
                raise StepError("bad_message", f"{len(sampling)} sampling entries for "
                                               f"{len(rows)} rows")
            if sampling is None or sampling.count({}) == len(sampling):
                params = [_DEFAULT_SAMPLING] * len(rows)  # all default (greedy): one check
            else:
                try:
                    params = [SamplingParams.cached(d) for d in sampling]
                except (ValueError, TypeError, AttributeError) as e:
                    raise StepError("bad_sampling", str(e)) from None
        out, off = [], 0
        for (sid, step, pos, n), p in zip(rows, params, strict=True):
            out.append(Row(sid, step, pos, n, x, off, p))
            off += n
        return out

    def run_rows(self, rows: list[Row], max_rows: int, max_tokens: int) -> list:
        """Run rows as batches of at most ``max_rows`` rows and ``max_tokens`` tokens (a longer
        prefill runs alone), in order; one output per row, see ``step_batch``.
        ``last_compute_s`` becomes the sum over the batches."""
        outs: list = []
        total = 0.0
        for a, b in _batches([r.n for r in rows], max_rows, max_tokens):
            outs += self.step_batch(rows[a:b])
            total += self.last_compute_s
        self.last_compute_s = total
        return outs

    def step_batch(self, rows: list[Row]) -> list[torch.Tensor | RowState | tuple | StepError]:
        """Run rows (of one or more step messages) as one batch. Per row: its output (a hidden
        state tensor or ``RowState``, joined by ``join_rows``; on the last stage ``(token,
        logprob)``) or its refusal."""
        self.known = None  # these rows' caches move on: expect again after this batch
        self.steps += 1
        results: list = [None] * len(rows)
        ready: list[tuple[int, Row, KVCache]] = []
        for i, row in enumerate(rows):
            try:
                ready.append((i, row, self._cache_for(row)))
            except StepError as e:
                results[i] = e
        self.last_compute_s = 0.0
        if not ready:
            return results
        stage = self.stage
        t0 = time.perf_counter()
        # Rows on pool slots go through the decoder together (decode steps; prompts too where
        # it prefills); the rest run eagerly.
        fast: list = []
        prompts: list = []
        slow: list = []
        for k in ready:
            if self.decoder is None or not isinstance(k[2], SlotKV):
                slow.append(k)
            elif k[1].n == 1:
                fast.append(k)
            else:
                (prompts if self.decoder.prefills else slow).append(k)
        if prompts and sum(r.n for _, r, _ in prompts) > self.decoder.max_batch:
            # More prompt tokens than one replay takes: replays of a batch bucket each (with a
            # wait for the output in between) took 27 ms a node for 32 prompts of 32 tokens
            # on an H100, one eager pass over all 1,024 tokens 12-15 ms.
            slow += prompts
            prompts = []
        done: dict[int, object] = {}
        for part, run in ((fast, self._decode), (prompts, self._prefill), (slow, self._eager)):
            if part:
                done.update(zip([i for i, _, _ in part], run(part), strict=True))
        if slow and not stage.last and stage.device.type == "cuda":
            # compute_s covers the GPU's work. Decode rows came back to the host in one
            # blocking copy already; a device-wide sync after it cost ~40 µs a step (traced).
            torch.cuda.synchronize(stage.device)
        self._computed(t0)
        for i, out in done.items():
            results[i] = out
        return results

    def _computed(self, t0: float) -> None:
        """``last_compute_s``: the time since ``t0``, stretched by ``slow_factor``."""
        compute = time.perf_counter() - t0
        if self.slow_factor > 1:
            time.sleep(compute * (self.slow_factor - 1))
            compute *= self.slow_factor
        self.last_compute_s = compute

    def _eager(self, ready: list[tuple[int, Row, KVCache]]) -> list:
        """``Stage.forward_batch`` for the rows; on the last stage their ``(token, logprob)``."""
        stage = self.stage
        if stage.heads is not None:
            self.group.begin(ready[0][1].sid, ready[0][1].step)
        try:
            outs = stage.forward_batch([(c, r.x, r.pos) for _, r, c in ready],
                                       greedy=[r.params.greedy for _, r, _ in ready]
                                       if stage.last else None)
        except GroupError as e:
            raise StepError(e.code, str(e)) from None
        if stage.last:
            return _sample_all(outs, [(r.params, r.step) for _, r, _ in ready])
        return outs

    def _decode(self, ready: list[tuple[int, Row, SlotKV]]) -> list:
        """One decode token for each row through the decoder: hidden rows, or on the last
        stage ``(token, logprob)`` (greedy from the argmax, else sampled from the logits)."""
        out = self._decode_block(join_rows([r for _, r, _ in ready]), [c for _, _, c in ready])
        if not self.stage.last:
            return [RowState(out, j) for j in range(len(ready))]
        return _picked(out, [(r.params, r.step) for _, r, _ in ready])

    def _decode_block(self, x: torch.Tensor, caches: list[SlotKV]):
        """The decoder's step for rows ``x`` on ``caches``' slots: an inner stage's hidden
        rows on the host, or the last stage's ``(logits, picks)``."""
        out = self.decoder.run(x, [c.slot for c in caches], [c.length for c in caches])
        for c in caches:
            c.advance(1)
        if not self.stage.last:
            # To the host in one copy (the graph's output buffer is overwritten by the next
            # replay); the rows are rows of it.
            return out.to("cpu")
        return out

    def _prefill(self, ready: list[tuple[int, Row, SlotKV]]) -> list:
        """Rows of several tokens (prompts) on pool slots, at most the decoder's largest batch
        bucket of tokens in all, as one decoder step: a prompt's tokens are decoder rows of its
        slot at consecutive positions, every row's K/V written before any row attends
        (``Decoder.step(prefill=True)``). One graph replay where an eager prefill launches
        every kernel of every layer from Python (a 32-token prompt: 6.7 ms to the first token
        with 2 nodes on an H100, 20-28 ms eager)."""
        slots: list[int] = []
        pos: list[int] = []
        for _, r, c in ready:
            slots += [c.slot] * r.n
            pos += range(c.length, c.length + r.n)
        out = self.decoder.run(join_rows([r for _, r, _ in ready]), slots, pos, prefill=True)
        for _, r, c in ready:
            c.advance(r.n)
        # the decoder row of each prompt's last token: its pick is the row's next token
        lasts = [e - 1 for e in accumulate(r.n for _, r, _ in ready)]
        if not self.stage.last:
            out = out.to("cpu")  # one copy; the graph's buffer is overwritten by the next replay
            return [RowState(out, e + 1 - r.n, r.n)
                    for e, (_, r, _) in zip(lasts, ready, strict=True)]
        logits, picks = out
        idx = torch.tensor(lasts, device=picks.device)
        return _picked((logits.index_select(0, idx), picks.index_select(0, idx)),
                       [(r.params, r.step) for _, r, _ in ready])

    # ------------------------------------------------------------ known cohorts
    def expect(self, msg: Message, rows: list[Row]) -> None:
        """After ``rows`` (all of step message ``msg``) ran and were answered: expect their
        next step as a known cohort when it can run on the decoder as it stands."""
        pool = self.pool
        if self.decoder is None or pool is None or not rows or len(rows) > self.max_batch:
            return
        caches = [self.caches.get(r.sid) for r in rows]
        if not all(isinstance(c, SlotKV) and c.length < pool.max_len for c in caches):
            return
        self.known = KnownCohort(
            [[r.sid, r.step + 1, c.length, 1] for r, c in zip(rows, caches, strict=True)],
            msg.get("sampling"), [r.params for r in rows], caches)

    def step_known(self, msg: Message) -> tuple[KnownCohort, object] | None:
        """Run ``msg`` if it is the known cohort's next step, exactly: ``(that cohort, hidden
        block or [[token, logprob], ...] in its rows' order)``; None (nothing done) for any
        other message, which then takes the per-row path and its checks."""
        k = self.known
        if (k is None or msg["rows"] != k.rows or msg["epoch"] != self.epoch
                or msg.get("sampling") != k.sampling or len(msg.frames) != 1):
            return None
        x = msg.tensors.get("x")
        if x is None:
            return None
        try:
            self._check_input(self.stage, x, len(k.rows))
        except StepError:
            return None
        self.known = None
        t0 = time.perf_counter()
        out = self._decode_block(x, k.caches)
        if self.stage.last:
            out = _picked(out, [(p, r[1]) for p, r in zip(k.params, k.rows, strict=True)])
        self._computed(t0)
        self.steps += 1
        self.known_steps += 1
        return k, out

    def expect_after(self, k: KnownCohort) -> None:
        """After ``step_known`` ran ``k`` and its answer went out: expect the step after it,
        unless something touched the caches since or a slot is full."""
        if self.pool is not None and max(c.length for c in k.caches) < self.pool.max_len \
                and all(self.caches.get(r[0]) is c for r, c in zip(k.rows, k.caches,
                                                                    strict=True)):
            self.known = k.after()

    def _cache_for(self, row: Row) -> KVCache:
        """A row's KV cache, checked against its position (a prefill starts a fresh one: a
        pool slot when one is free and the prompt fits it)."""
        n = row.n
        if row.pos == 0:
            self.free([row.sid])
            cache = None
            if self.pool is not None and n <= self.pool.max_len:
                cache = self.pool.session()
            cache = self.caches[row.sid] = cache or self.stage.new_cache()
            return cache
        cache = self.caches.get(row.sid)
        if cache is None:
            raise StepError("unknown_session", f"no KV cache for session {row.sid} on this node")
        if row.pos != cache.length:
            raise StepError("bad_position", f"session {row.sid}: step at position {row.pos} but "
                                            f"{cache.length} tokens are cached")
        if isinstance(cache, SlotKV) and row.pos + n > self.pool.max_len:
            cache = self.caches[row.sid] = cache.spill()  # outgrew its slot: eager from now
        return cache

    def _check_input(self, stage: Stage, x: torch.Tensor, total: int) -> None:
        n = x.shape[0] if x.dim() >= 1 else 0
        if not 1 <= n <= self.max_step_tokens:
            raise StepError("bad_shape", f"a step carries 1..{self.max_step_tokens} tokens, got {n}")
        if n != total:
            raise StepError("bad_shape", f"the rows announce {total} tokens, 'x' holds {n}")
        if stage.first:
            if x.dtype != torch.int64 or x.dim() != 1:
                raise StepError("bad_shape", f"stage 0 takes int64 token ids [n], got "
                                             f"{x.dtype} {list(x.shape)}")
            lo, hi = int(x.min()), int(x.max())
            if lo < 0 or hi >= self.spec.vocab_size:
                raise StepError("bad_value", f"token ids must be in [0, {self.spec.vocab_size})")
        elif x.dim() != 2 or x.shape[1] != self.spec.hidden_size or not x.is_floating_point():
            raise StepError("bad_shape", f"stage takes float hidden states [n, "
                                         f"{self.spec.hidden_size}], got {x.dtype} {list(x.shape)}")


def _batches(sizes: list[int], max_items: int, max_total: int) -> list[tuple[int, int]]:
    """Index ranges ``[i, j)`` of consecutive items, each of at most ``max_items`` items whose
    sizes add up to at most ``max_total`` (an item larger than that goes alone), in order."""
    out, start, total = [], 0, 0
    for i, n in enumerate(sizes):
        if i > start and (i - start >= max_items or total + n > max_total):
            out.append((start, i))
            start, total = i, 0
        total += n
    if start < len(sizes):
        out.append((start, len(sizes)))
    return out


def _chunks(length: int, prompt: int, most: int) -> list[tuple[int, int]]:
    """Rows ``[0, length)`` as the rebuild runs them: the prompt's (as its prefill went),
    then the rest, each cut at ``most`` tokens."""
    bounds, a = [], 0
    for end in (min(prompt, length), length):
        while a < end:
            bounds.append((a, min(a + most, end)))
            a = bounds[-1][1]
    return bounds


@dataclass
class Rebuild:
    """A restore's rebuild of the layers ``[start, end)`` new to this node (a dead node's)
    without a shadow: per session its inputs to those layers, rows ``[0, length)`` (hidden
    states the stage before sent on, or on the first stage token ids), and its prompt's
    length. The restore fills in the rest."""

    start: int
    end: int
    inputs: dict[str, torch.Tensor]
    prompts: dict[str, int]
    missing: list[str] = field(default_factory=list)  # sessions with no inputs: freed
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # hidden after ``end``
    rows: int = 0
    nbytes: int = 0  # of the KV rebuilt
    seconds: float = 0.0


def _merged(stage: Stage, new: tuple[int, int], sid: str,
            parts: list[tuple[KVCache, tuple[int, int], int]]) -> KVCache:
    """A session's cache of ``stage``'s layers with KV heads ``new`` (model-wide numbering),
    from ``parts``: (a cache, the heads ``[a, b)`` taken from it, the first head it holds)."""
    layers = range(stage.start, stage.end)
    cache = KVCache(layers, new[1] - new[0], stage.spec.head_dim, stage.dtype, stage.device)
    length = parts[0][0].length
    for src, (a, b), base in parts:
        if src.length != length:
            raise StepError("bad_kv", f"session {sid}: KV of {src.length} and {length} rows")
        kv = src.export(layers, range(a - base, b - base))
        cache.import_({k: t.to(stage.device, stage.dtype) for k, t in kv.items()}, length,
                      heads=range(a - new[0], b - new[0]))
    return cache


def _held(stage: Stage | None, kv_heads: int) -> tuple[int, int]:
    """The KV heads ``[a, b)`` a stage holds (model-wide numbering)."""
    return (0, kv_heads) if stage is None or stage.heads is None else stage.heads


def _all_is_none(heads: tuple[int, int] | None, kv_heads: int) -> tuple[int, int] | None:
    """``heads`` as a Stage keeps them: None for all of them."""
    return None if heads is None or tuple(heads) == (0, kv_heads) else tuple(heads)


def _keep_layers(cache: KVCache, keep: set[int]) -> None:
    """After the node's layers changed: a cache holds exactly the layers in ``keep`` that it
    had (a pool slot becomes views of the pool's layers now)."""
    if isinstance(cache, SlotKV):
        cache.rebind()
    else:
        cache.drop_layers([la for la in cache.k if la not in keep])


def _picked(out: tuple, how: list[tuple[SamplingParams, int]]) -> list[tuple]:
    """The decoder's last-stage output as (token, logprob) per row: its greedy picks, or a
    sample from the row's logits."""
    logits, picks = out
    res = [(int(t), lp) for t, lp in picks.tolist()]
    for j, (p, step) in enumerate(how):
        if not p.greedy:
            res[j] = sample(logits[j], p, step)
    return res


def _sample_all(logits: list[torch.Tensor], how: list[tuple[SamplingParams, int]]) -> list:
    """(token, logprob) per session. Greedy rows are decided together on the logits' device
    (one transfer of ids, not of vocab-sized rows); sampled rows go through ``sample``."""
    greedy = [i for i, (p, _) in enumerate(how) if p.greedy]
    out: list = [None] * len(logits)
    if greedy:
        rows = torch.stack([logits[i] for i in greedy]).float()
        ids = rows.argmax(dim=-1)
        lp = torch.log_softmax(rows, dim=-1).gather(1, ids[:, None])[:, 0]
        for i, t, v in zip(greedy, ids.tolist(), lp.tolist(), strict=True):
            out[i] = (t, v)
    for i, (p, step) in enumerate(how):
        if out[i] is None:
            out[i] = sample(logits[i], p, step)
    return out
