"""What a node sent on: each session's output hidden states, per position, in host memory.

When the node of the next stage dies without a KV shadow, this node takes its layers and
rebuilds their KV from these rows (``Executor.restore`` with ``inputs``): the lost layers
run once over the session's history, batched across sessions, instead of every stage
replaying it step by step. The rows are the output of one layer boundary (the node's
stage end); a change of it starts the log again. A budget bounds the memory: a session
whose rows do not fit is left out until it starts again.
"""

from __future__ import annotations

import torch

GROW_ROWS = 256  # a session's buffer grows by at least this many rows (copies stay rare)


class OutputLog:
    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.end: int | None = None  # the layer boundary the rows are the output of
        self.bufs: dict[str, torch.Tensor] = {}  # sid -> [capacity, hidden] on the host
        self.lengths: dict[str, int] = {}  # sid -> rows held, from position 0
        self.left_out: set[str] = set()  # over budget, or a gap: until position 0 again
        self.used = 0  # bytes of every buffer

    def record(self, end: int, rows: list[tuple[str, int, int]], hidden: torch.Tensor) -> None:
        """The output of layer boundary ``end`` for ``rows`` ``(sid, pos, n)``, in order in
        ``hidden`` ``[sum n, hidden]``."""
        if not self.budget:
            return
        if end != self.end:
            self.clear()
            self.end = end
        hidden = hidden.detach().to("cpu")  # a no-op on a CPU node
        off = 0
        for sid, pos, n in rows:
            self._put(sid, pos, hidden.narrow(0, off, n))
            off += n

    def _put(self, sid: str, pos: int, x: torch.Tensor) -> None:
        if pos == 0:
            self.left_out.discard(sid)
        elif sid in self.left_out:
            return
        held = self.lengths.get(sid, 0)
        if pos > held:  # rows before it never came here (a session that moved in)
            self._leave_out(sid)
            return
        need = pos + x.shape[0]
        buf = self.bufs.get(sid)
        if buf is not None and (buf.dtype, buf.shape[1:]) != (x.dtype, x.shape[1:]):
            if pos > 0:  # rows of another shape: not one history
                self._leave_out(sid)
                return
            self.free([sid])
            buf = None
        if buf is None or buf.shape[0] < need:
            old = buf.shape[0] if buf is not None else 0
            cap = max(need, old + max(GROW_ROWS, old // 2))
            grown = torch.empty((cap, *x.shape[1:]), dtype=x.dtype)
            extra = grown.nbytes - (buf.nbytes if buf is not None else 0)
            if self.used + extra > self.budget:
                self._leave_out(sid)
                return
            if buf is not None and pos > 0:
                grown[:pos].copy_(buf[:pos])
            self.bufs[sid] = buf = grown
            self.used += extra
        buf[pos:need].copy_(x)
        self.lengths[sid] = need

    def _leave_out(self, sid: str) -> None:
        self.free([sid])
        self.left_out.add(sid)

    def take(self, end: int, sid: str, length: int) -> torch.Tensor | None:
        """Session ``sid``'s first ``length`` output rows of boundary ``end`` (a view), or
        None if the log does not hold them all."""
        if end != self.end or self.lengths.get(sid, 0) < length:
            return None
        return self.bufs[sid][:length]

    def replace(self, end: int | None, rows: dict[str, torch.Tensor]) -> None:
        """Start again as the output of boundary ``end`` (None: the node is the last stage,
        which sends tokens, not rows): ``rows`` (sid -> [length, hidden]) as the log."""
        self.clear()
        self.end = end
        if end is None or not self.budget:
            return
        for sid, x in rows.items():
            self._put(sid, 0, x)

    def free(self, sids: list[str]) -> None:
        for sid in sids:
            buf = self.bufs.pop(sid, None)
            if buf is not None:
                self.used -= buf.nbytes
            self.lengths.pop(sid, None)
            self.left_out.discard(sid)

    def clear(self) -> None:
        self.bufs, self.lengths, self.left_out, self.used = {}, {}, set(), 0

    def nbytes(self) -> int:
        return self.used
