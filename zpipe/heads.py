"""Stages split across nodes by KV-head groups: how heads are divided among a stage's members.

A KV-head group is one KV head and the query heads that share it (GQA), so a member's K/V is
whole heads and never needs splitting. ``zpipe.shard.head_slices`` says which weights a member
holds; the members' partial outputs are combined per layer (``zpipe.shard.sum_partials``).
"""

from __future__ import annotations


def split_heads(kv_heads: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous KV-head ranges ``[a, b)`` as equal as possible, earlier ones
    taking the remainder."""
    if not 1 <= parts <= kv_heads:
        raise ValueError(f"cannot split {kv_heads} KV heads {parts} ways")
    base, extra = divmod(kv_heads, parts)
    out, a = [], 0
    for i in range(parts):
        b = a + base + (1 if i < extra else 0)
        out.append((a, b))
        a = b
    return out
