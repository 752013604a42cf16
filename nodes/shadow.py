"""KV shadows a node holds in host memory for another node's layers.

An owner node sends the new K/V rows of its layers, a few tokens at a time, through the broker
(``shadow`` messages); the node that would take its layers if it died (brokers/shadows.py says
which) keeps them here, per owner and session. When the owner dies, ``take`` hands the rows to
the restore (``Executor.restore``), which makes them live caches instead of recomputing them.
"""

from __future__ import annotations

import torch

from zpipe.kvcache import KVCache


class ShadowStore:
    """Per (owner node, session): a host-memory ``KVCache`` of the owner's layers, grown by
    suffixes in order. A suffix that does not start where the shadow ends drops it (the owner
    starts again from row 0 after any change of its stage)."""

    def __init__(self) -> None:
        self.caches: dict[tuple[str, str], KVCache] = {}

    def add(self, owner: str, sid: str, start: int, length: int,
            tensors: dict[str, torch.Tensor]) -> bool:
        """Rows ``[start, length)`` of ``owner``'s layers for session ``sid`` (tensors ``k.L``,
        ``v.L`` as ``KVCache.export`` makes them). False (and the shadow dropped) if they do
        not follow on what is held or are malformed."""
        key = (owner, sid)
        cache = self.caches.get(key)
        if start == 0:
            cache = None
        elif cache is None or cache.length != start:
            self.caches.pop(key, None)
            return False
        first = next(iter(tensors.values()), None)
        if (first is None or first.dim() != 3 or not first.is_floating_point()
                or not 0 <= start < length or first.shape[1] != length - start):
            self.caches.pop(key, None)
            return False
        if cache is None:
            cache = KVCache(range(0), first.shape[0], first.shape[2], first.dtype, "cpu")
        try:
            cache.import_(tensors, length)
        except (ValueError, RuntimeError):  # shapes or dtypes that do not fit the shadow
            self.caches.pop(key, None)
            return False
        if start > 0 and set(cache.k) != {int(n.split(".", 1)[1]) for n in tensors}:
            self.caches.pop(key, None)  # other layers than before: not one owner's stage
            return False
        self.caches[key] = cache
        return True

    def take(self, owner: str, lengths: dict[str, int]) -> dict[str, KVCache]:
        """``owner``'s shadows of the sessions in ``lengths``, each cut to its length (those
        shorter are left out), then forget every shadow: a restore starts them all again."""
        out = {}
        for sid, length in lengths.items():
            cache = self.caches.get((owner, sid))
            if cache is not None and cache.length >= length:
                cache.length = length
                out[sid] = cache
        self.caches.clear()
        return out

    def prefixed(self, owner: str, sid: str, since: int,
                 suffix: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A move's KV for session ``sid``: rows ``[0, since)`` of the layers in ``suffix``
        from ``owner``'s shadow, then ``suffix``'s rows (``k.L``/``v.L`` as ``KVCache.export``
        makes them). ValueError if the shadow does not hold those rows."""
        cache = self.caches.get((owner, sid))
        if cache is None or cache.length < since:
            raise ValueError(f"no shadow of node {owner}'s first {since} rows of session {sid}")
        layers = sorted({int(name.split(".", 1)[1]) for name in suffix if "." in name})
        try:
            prefix = cache.export(layers, tokens=range(since))
        except KeyError as e:
            raise ValueError(f"the shadow of node {owner} lacks a layer: {e}") from None
        if prefix.keys() != suffix.keys():
            raise ValueError(f"the shadow of node {owner} does not match the KV names sent")
        return {name: torch.cat([prefix[name], t.to(prefix[name].dtype)], dim=1)
                for name, t in suffix.items()}

    def free(self, sids: list[str]) -> None:
        """The sessions ended: their shadows go, whoever owns them."""
        gone = set(sids)
        for key in [k for k in self.caches if k[1] in gone]:
            del self.caches[key]

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.caches.values())
