"""The combine of a stage split across nodes by KV-head groups, over the members' own sockets.

Every member runs the same steps on its heads; after each layer's attention and after its MLP
it sends its partial output ``[tokens, hidden]`` to every other member (PUSH to their PULL) and
adds all the partials in member order (``zpipe.shard.sum_partials``), so every member's residual
stream has the same bits and only the first member answers the broker. An all-to-all exchange
costs one hop per combine; a combine at one member (or at the broker) would cost two.

Runs on the node's compute thread only (the sockets are created at start and used from there).
Each partial is tagged ``[epoch, sid, step, seq]``: the batch's first row and the combine's
number within the batch, so members never add partials of different steps; a member that is
ahead keeps the partials that arrive early.
"""

from __future__ import annotations

import threading
import time

import msgpack
import torch
import zmq
from torch import Tensor

from zpipe.shard import sum_partials

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_STASH = 4096  # partials kept that arrived before this member asked for them


class GroupError(Exception):
    """A combine that cannot complete: ``code`` goes back to the broker for the batch."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Group:
    """This node's end of its split stage's combine."""

    def __init__(self, ctx: zmq.Context, bind: str) -> None:
        self.ctx = ctx
        self.inbox = ctx.socket(zmq.PULL)
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.inbox.setsockopt(zmq.MAXMSGSIZE, 1 << 30)
        self.inbox.bind(bind)
        self.addr = self.inbox.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.out: list[zmq.Socket] = []
        self.index, self.size, self.epoch = 0, 1, -1
        self.timeout_s = 30.0
        self.key: tuple = ()
        self.seq = 0
        self.stash: dict[tuple, dict[int, Tensor]] = {}
        self.combine_s = 0.0  # time spent in combines (sending, waiting, adding)
        self.combines = 0
        self.steps = 0  # step batches run as a member
        self.interrupted = threading.Event()  # set from the event loop: stop waiting

    def join(self, epoch: int, index: int, addrs: list[str], timeout_s: float) -> None:
        """Become member ``index`` of the members at ``addrs`` (in member order) for
        ``epoch``."""
        self.leave()
        self.interrupted.clear()
        self.index, self.size, self.epoch, self.timeout_s = index, len(addrs), epoch, timeout_s
        for i, addr in enumerate(addrs):
            if i != index:
                s = self.ctx.socket(zmq.PUSH)
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.SNDHWM, 0)  # never drop a partial: a step waits on it
                s.connect(addr)
                self.out.append(s)

    def leave(self) -> None:
        for s in self.out:
            s.close()
        self.out, self.size, self.stash = [], 1, {}

    def close(self) -> None:
        self.leave()
        self.inbox.close()

    def interrupt(self) -> None:
        """A new placement is coming (a member may be dead): a combine waiting now fails at
        once, and so does every one until the next ``join``."""
        self.interrupted.set()

    def begin(self, sid: str, step: int) -> None:
        """A batch starts whose first row is ``sid``'s ``step``."""
        self.key, self.seq = (self.epoch, sid, step), 0
        self.steps += 1

    def combine(self, part: Tensor) -> Tensor:
        """The sum of every member's ``part`` for this point of the batch."""
        t0 = time.perf_counter()
        key = (*self.key, self.seq)
        self.seq += 1
        part = part.contiguous()
        cpu = part.to("cpu") if part.device.type != "cpu" else part
        header = msgpack.packb([*key, self.index, list(cpu.shape), str(cpu.dtype)[6:]])
        data = cpu.view(torch.uint8).numpy()  # raw bytes, bf16 too; zmq keeps it alive
        for s in self.out:
            s.send_multipart([header, data], copy=False)
        parts = self.stash.pop(key, {})
        parts[self.index] = cpu
        deadline = t0 + self.timeout_s
        while len(parts) < self.size:
            left = deadline - time.perf_counter()
            if self.interrupted.is_set():
                self.stash.clear()
                raise GroupError("group_timeout", "a new placement came while this member "
                                 "waited for the others' partials")
            if left <= 0:
                self.stash.clear()  # the others went elsewhere: nothing kept matches later
                raise GroupError("group_timeout", f"no partial from {self.size - len(parts)} "
                                 f"member(s) of the split stage in {self.timeout_s:.0f} s")
            if not self.inbox.poll(min(left, 0.05) * 1000):
                continue
            got = self._receive(cpu)
            if got is None:
                continue
            gkey, idx, t = got
            if gkey == key:
                if t.shape != cpu.shape:
                    self.stash.clear()
                    raise GroupError("group_mismatch", f"member {idx} sent {list(t.shape)} "
                                     f"where this member has {list(cpu.shape)}: the members "
                                     f"ran different batches")
                parts[idx] = t
            elif gkey[0] == self.epoch and len(self.stash) < _STASH:
                self.stash.setdefault(gkey, {})[idx] = t
        total = sum_partials([parts[i] for i in range(self.size)])
        if total.device != part.device:
            total = total.to(part.device)
        self.combine_s += time.perf_counter() - t0
        self.combines += 1
        return total

    def _receive(self, like: Tensor) -> tuple[tuple, int, Tensor] | None:
        """One partial from the inbox, checked: ``(key, member, tensor)``; None (dropped) for
        anything malformed or not ``[tokens, hidden]`` rows in ``like``'s dtype."""
        frames = self.inbox.recv_multipart(copy=False)
        if len(frames) != 2:
            return None
        try:
            head = msgpack.unpackb(frames[0].bytes, max_str_len=256, max_array_len=16)
            epoch, sid, step, seq, idx, shape, dtype = head
        except (ValueError, TypeError, msgpack.UnpackException):
            return None
        if (not isinstance(sid, str) or not all(isinstance(v, int) for v in (epoch, step, seq))
                or not isinstance(idx, int) or not 0 <= idx < self.size or idx == self.index
                or not isinstance(shape, list) or len(shape) != 2 or shape[1] != like.shape[1]
                or not isinstance(shape[0], int) or not 0 < shape[0] <= 1 << 20
                or _DTYPES.get(dtype) != like.dtype
                or len(frames[1].buffer) != shape[0] * shape[1] * like.element_size()):
            return None
        t = torch.frombuffer(frames[1].buffer, dtype=like.dtype).view(shape)
        return (epoch, sid, step, seq), idx, t
