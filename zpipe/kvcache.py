"""Per-session key/value cache for the decoder layers one stage owns."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


class KVCache:
    """One session's K/V for the layers a stage owns. Preallocated, grown in chunks.

    Each layer holds two tensors ``[n_kv_heads, capacity, head_dim]``; capacity is a multiple of
    ``chunk``. ``length`` is the number of tokens cached, shared by all layers: the stage appends
    to every layer at position ``length`` and then calls :meth:`advance` once per step.
    """

    def __init__(self, layers: range, n_kv_heads: int, head_dim: int, dtype, device,
                 chunk: int = 256):
        if chunk <= 0:
            raise ValueError("chunk must be positive")
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.chunk = chunk
        self.length = 0
        self.k: dict[int, Tensor] = {}
        self.v: dict[int, Tensor] = {}
        for layer in layers:
            self.k[layer], self.v[layer] = self._alloc(chunk), self._alloc(chunk)

    # -- helpers -------------------------------------------------------------------------------
    def _alloc(self, capacity: int) -> Tensor:
        return torch.empty(self.n_kv_heads, capacity, self.head_dim, dtype=self.dtype,
                           device=self.device)

    def _grow(self, layer: int, needed: int) -> None:
        capacity = -(-needed // self.chunk) * self.chunk
        for store in (self.k, self.v):
            new = self._alloc(capacity)
            new[:, : self.length].copy_(store[layer][:, : self.length])
            store[layer] = new

    @property
    def layers(self) -> range | tuple[int, ...]:
        """Layers present: a range when contiguous, else a sorted tuple."""
        ls = sorted(self.k)
        if not ls or ls[-1] - ls[0] + 1 == len(ls):
            return range(ls[0], ls[-1] + 1) if ls else range(0)
        return tuple(ls)

    @property
    def capacity(self) -> int:
        return min((t.shape[1] for t in self.k.values()), default=0)

    def nbytes(self) -> int:
        """Bytes allocated (capacity, not just ``length``) for all layers, K and V."""
        return sum(t.numel() * t.element_size() for s in (self.k, self.v) for t in s.values())

    def used_bytes(self) -> int:
        """Bytes of the ``length`` rows held, all layers, K and V."""
        item = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * len(self.k) * self.n_kv_heads * self.length * self.head_dim * item

    # -- step API ------------------------------------------------------------------------------
    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k, v [n_kv, n_new, head_dim]`` at ``self.length``; return views of all tokens."""
        if layer not in self.k:
            raise KeyError(f"layer {layer} not in this cache (has {self.layers})")
        end = self.length + k.shape[1]
        if end > self.k[layer].shape[1]:
            self._grow(layer, end)
        kc, vc = self.k[layer], self.v[layer]
        kc[:, self.length:end].copy_(k)
        vc[:, self.length:end].copy_(v)
        return kc[:, :end], vc[:, :end]

    def advance(self, n: int) -> None:
        if n < 0:
            raise ValueError("advance by a negative count")
        self.length += n

    # -- transfer ------------------------------------------------------------------------------
    def export(self, layers: range, heads: range | None = None,
               tokens: range | None = None) -> dict[str, Tensor]:
        """Contiguous copies named ``k.{layer}``/``v.{layer}``: ``[len(heads), len(tokens), hd]``.

        ``heads`` defaults to all KV heads, ``tokens`` to ``range(0, length)``; both must be
        step-1 ranges inside the cache.
        """
        heads = range(self.n_kv_heads) if heads is None else heads
        tokens = range(self.length) if tokens is None else tokens
        for name, r, lim in (("heads", heads, self.n_kv_heads), ("tokens", tokens, self.length)):
            if r.step != 1 or r.start < 0 or r.stop > lim or r.start > r.stop:
                raise ValueError(f"{name} {r} out of bounds (0..{lim})")
        out = {}
        for layer in layers:
            if layer not in self.k:
                raise KeyError(f"layer {layer} not in this cache (has {self.layers})")
            for kind, store in (("k", self.k), ("v", self.v)):
                src = store[layer][heads.start:heads.stop, tokens.start:tokens.stop]
                out[f"{kind}.{layer}"] = src.clone() if src.is_contiguous() else src.contiguous()
        return out

    def import_(self, tensors: dict[str, Tensor], length: int, *,
                heads: range | None = None) -> None:
        """Inverse of :meth:`export`; afterwards ``self.length == length``.

        Each tensor ``[n_heads, t, head_dim]`` is written at token positions ``[length - t,
        length)`` (so a full export has ``t == length``; a suffix export ``tokens=range(a, L)``
        extends layers that already hold ``[0, a)``). ``heads`` (default: all KV heads of this
        cache) selects which of this cache's heads the tensors fill (other heads are left as they
        were). Missing layers are added.
        """
        heads = range(self.n_kv_heads) if heads is None else heads
        if heads.step != 1 or heads.start < 0 or heads.stop > self.n_kv_heads:
            raise ValueError(f"heads {heads} out of bounds (0..{self.n_kv_heads})")
        by_layer: dict[int, dict[str, Tensor]] = {}
        for name, t in tensors.items():
            kind, _, idx = name.partition(".")
            if kind not in ("k", "v") or not idx.isdigit():
                raise ValueError(f"unexpected tensor name {name!r}")
            if t.dim() != 3 or t.shape[0] != len(heads) or t.shape[2] != self.head_dim:
                raise ValueError(f"{name}: shape {tuple(t.shape)} does not match "
                                 f"[{len(heads)}, t, {self.head_dim}]")
            if t.shape[1] > length:
                raise ValueError(f"{name}: {t.shape[1]} tokens exceeds length {length}")
            by_layer.setdefault(int(idx), {})[kind] = t
        for layer, kv in by_layer.items():
            if set(kv) != {"k", "v"} or kv["k"].shape != kv["v"].shape:
                raise ValueError(f"layer {layer}: need matching k.{layer} and v.{layer}")
            t = kv["k"].shape[1]
            if t < length and (layer not in self.k or self.length < length - t):
                raise ValueError(f"layer {layer}: import of {t} tokens up to {length} leaves "
                                 f"a gap (cache holds {self.length if layer in self.k else 0})")
        untouched = [la for la in self.k if la not in by_layer]
        if untouched and length != self.length:
            raise ValueError(f"length {length} != cached length {self.length} of layers "
                             f"{untouched} not being imported")
        capacity = -(-max(length, 1) // self.chunk) * self.chunk
        for layer, kv in by_layer.items():
            if layer not in self.k:
                self.k[layer] = self._alloc(capacity).zero_()
                self.v[layer] = self._alloc(capacity).zero_()
            elif self.k[layer].shape[1] < length:
                self._grow(layer, length)
            start = length - kv["k"].shape[1]
            for kind, store in (("k", self.k), ("v", self.v)):
                store[layer][heads.start:heads.stop, start:length].copy_(kv[kind])
        self.length = length

    def drop_layers(self, layers: Iterable[int]) -> None:
        for layer in layers:
            self.k.pop(layer, None)
            self.v.pop(layer, None)

    def adopt(self, other: KVCache) -> None:
        """Take over ``other``'s layers (no copy), e.g. the layers a move brought to this node."""
        if self.k and other.k and other.length != self.length:
            raise ValueError(f"cannot adopt {other.length} tokens into a cache of {self.length}")
        self.k.update(other.k)
        self.v.update(other.v)
        if other.k:
            self.length = other.length
