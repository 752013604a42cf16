"""A static KV pool: one preallocated slot per session, so a batched decode step (and a CUDA
graph of it) can address every session's cache by slot index, with no per-session tensors."""

from __future__ import annotations

import torch
from torch import Tensor

from zpipe.kvcache import KVCache


class KVFull(Exception):
    """A session outgrew its slot (``max_len`` tokens)."""


class SlotPool:
    """Per layer, K and V of shape ``[slots + 1, n_kv_heads, max_len, head_dim]``.

    Slot ``slots`` (the last) is scratch: padding rows of a batch write there, never a session.
    """

    def __init__(self, layers: range, n_kv_heads: int, head_dim: int, slots: int, max_len: int,
                 dtype: torch.dtype, device: str | torch.device):
        if slots < 1 or max_len < 1:
            raise ValueError(f"a KV pool needs slots >= 1 and max_len >= 1, got {slots}, {max_len}")
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.slots, self.max_len = slots, max_len
        self.dtype, self.device = dtype, torch.device(device)
        self.k: dict[int, Tensor] = {}
        self.v: dict[int, Tensor] = {}
        self.free_slots = list(range(slots - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self.retarget(layers)

    @property
    def scratch(self) -> int:
        return self.slots

    def _alloc(self) -> Tensor:
        # Zeros: a padding row attends to position 0 of the scratch slot; keep it finite.
        return torch.zeros(self.slots + 1, self.n_kv_heads, self.max_len, self.head_dim,
                           dtype=self.dtype, device=self.device)

    def retarget(self, layers: range) -> None:
        """Hold exactly ``layers``: keep the storage of layers still held, add zeroed storage
        for new ones, free the rest. Sessions must then :meth:`SlotKV.rebind`."""
        keep = set(layers)
        for store in (self.k, self.v):
            for layer in [la for la in store if la not in keep]:
                del store[layer]
        for layer in layers:
            if layer not in self.k:
                self.k[layer], self.v[layer] = self._alloc(), self._alloc()

    def slot_bytes(self) -> int:
        per_layer = self.n_kv_heads * self.max_len * self.head_dim * 2
        return per_layer * len(self.k) * torch.empty(0, dtype=self.dtype).element_size()

    def nbytes(self) -> int:
        """The whole pool, every slot and the scratch one. ``list``: a node's heartbeat reads it
        while its compute thread may retarget the pool."""
        return sum(t.nbytes for store in (self.k, self.v) for t in list(store.values()))

    def take(self) -> int | None:
        return self.free_slots.pop() if self.free_slots else None

    def give(self, slot: int) -> None:
        if not 0 <= slot < self.slots or slot in self.free_slots:
            raise ValueError(f"slot {slot} is not in use")
        self.free_slots.append(slot)

    def session(self) -> SlotKV | None:
        """A cache on a free slot, or None when every slot is taken."""
        slot = self.take()
        return None if slot is None else SlotKV(self, slot)


class SlotKV(KVCache):
    """One session's KV as a slot of a :class:`SlotPool`; the :class:`KVCache` interface (so the
    eager stage math, export and import work unchanged) over views into the pool."""

    def __init__(self, pool: SlotPool, slot: int) -> None:  # no super(): the pool owns storage
        self.pool, self.slot = pool, slot
        self.n_kv_heads, self.head_dim = pool.n_kv_heads, pool.head_dim
        self.dtype, self.device = pool.dtype, pool.device
        self.chunk = pool.max_len
        self.length = 0
        self.released = False
        self.rebind()

    def rebind(self) -> None:
        """Views of this slot in every layer the pool holds (after ``retarget``)."""
        self.k = {la: t[self.slot] for la, t in self.pool.k.items()}
        self.v = {la: t[self.slot] for la, t in self.pool.v.items()}

    def _grow(self, layer: int, needed: int) -> None:
        raise KVFull(f"{needed} tokens do not fit a KV slot of {self.pool.max_len}")

    def _alloc(self, capacity: int) -> Tensor:
        raise KVFull("a KV slot cannot add layers the pool does not hold")

    def nbytes(self) -> int:
        return self.pool.slot_bytes()

    def adopt(self, other: KVCache) -> None:
        """Copy ``other``'s layers (received in a move) into this slot."""
        if self.length and other.k and other.length != self.length:
            raise ValueError(f"cannot adopt {other.length} tokens into a cache of {self.length}")
        if other.length > self.pool.max_len:
            raise KVFull(f"{other.length} tokens do not fit a KV slot of {self.pool.max_len}")
        for layer in other.k:
            if layer not in self.k:
                raise KVFull(f"layer {layer} is not in this node's KV pool")
            self.k[layer][:, :other.length].copy_(other.k[layer][:, :other.length])
            self.v[layer][:, :other.length].copy_(other.v[layer][:, :other.length])
        if other.k:
            self.length = other.length

    def spill(self) -> KVCache:
        """A plain growable cache holding this session's tokens; frees the slot."""
        out = KVCache(range(0), self.n_kv_heads, self.head_dim, self.dtype, self.device)
        out.import_({f"{kind}.{la}": store[la][:, :self.length]
                     for kind, store in (("k", self.k), ("v", self.v)) for la in store},
                    self.length)
        self.release()
        return out

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.pool.give(self.slot)
