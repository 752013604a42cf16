"""The broker's registry of stage nodes: who they are, what they hold, how to reach them."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from zpipe.protocol import MAX_ROWS, Message, is_peer_address

log = logging.getLogger("zpipe.broker")


@dataclass
class NodeInfo:
    ident: bytes
    name: str
    pid: int
    host: str
    device: str
    dtype: str
    mem_total: int
    mem_free: int
    gflops: float
    peer: str = ""  # where other nodes send it steps under direct routing ("": nowhere)
    group: str = ""  # where members of a stage split by heads send it partials ("": nowhere)
    heads: tuple[int, int] | None = None  # the KV heads it holds of a split stage
    max_batch: int = 0  # the most rows it runs as one batch (0: it did not say)
    mem_held: int = 0  # at register: memory a new placement would free or reuse
    kv_slots: int = 0  # its static KV pool (0: none): slots of kv_max_len tokens per layer
    kv_max_len: int = 0
    state: str = "registered"  # registered → loading → ready; dead when silent too long
    start: int = 0
    end: int = 0
    epoch: int = -1
    weight_bytes: int = 0
    registered_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    stats: dict = field(default_factory=dict)  # the latest heartbeat's figures

    def memory(self) -> tuple[int, int]:
        """(free, held) bytes from the latest report: the last heartbeat's, else the register's.

        Free excludes what the node holds; held is what a new placement frees or reuses (its
        weights, KV, allocator cache). Both come from one snapshot, so their sum is the node's
        memory budget without counting held weights twice (a free figure from before a load
        beside the weights loaded since would)."""
        st = self.stats
        if "mem_free" in st and "mem_held" in st:
            return int(st["mem_free"]), int(st["mem_held"])
        return self.mem_free, self.mem_held

    def to_dict(self) -> dict:
        free, held = self.memory()
        return {
            "name": self.name, "pid": self.pid, "host": self.host, "device": self.device,
            "dtype": self.dtype, "state": self.state, "mem_total": self.mem_total,
            "mem_free": free, "mem_held": held, "gflops": self.gflops,
            "kv_pool": [self.kv_slots, self.kv_max_len] if self.kv_slots else None,
            "layers": [self.start, self.end] if self.state != "registered" else None,
            "weight_bytes": self.weight_bytes,
            "heartbeat_age_s": round(time.monotonic() - self.last_seen, 3),
            "rss": self.stats.get("rss", 0), "kv_bytes": self.stats.get("kv_bytes", 0),
            "shadow_bytes": self.stats.get("shadow_bytes", 0),
            "output_log_bytes": self.stats.get("output_log_bytes", 0),
            "heads": list(self.heads) if self.heads and self.state != "registered" else None,
            "sessions": self.stats.get("sessions", 0), "peer": self.peer,
            "steps": self.stats.get("steps", 0), "known_steps": self.stats.get("known_steps", 0),
            # a member of a stage split by heads: time in the per-layer combines per step
            "combine_ms_per_step": round(1000 * self.stats.get("combine_s", 0.0)
                                         / self.stats["combine_steps"], 3)
            if self.stats.get("combine_steps") else None,  # both optional: one may come alone
            "max_batch": self.max_batch,
        }


class Registry:
    def __init__(self) -> None:
        self.by_name: dict[str, NodeInfo] = {}
        self.by_ident: dict[bytes, NodeInfo] = {}

    def add(self, ident: bytes, msg: Message) -> NodeInfo | None:
        """Register a node; returns the entry it replaced (a restarted node keeps its name)."""
        old = self.by_name.pop(msg["name"], None)
        if old is not None:
            self.by_ident.pop(old.ident, None)
        peer = msg.get("peer", "")
        if peer and not is_peer_address(peer):  # such a node is reached through the broker
            log.warning("node %s registered a malformed peer address %.80r: ignored",
                        msg["name"], peer)
            peer = ""
        group = msg.get("group", "")
        if group and not is_peer_address(group):
            log.warning("node %s registered a malformed group address %.80r: ignored",
                        msg["name"], group)
            group = ""
        max_batch = msg.get("max_batch", 0)
        if not 0 <= max_batch <= MAX_ROWS:
            log.warning("node %s registered max_batch %d: ignored", msg["name"], max_batch)
            max_batch = 0
        slots, max_len = msg.get("kv_slots", 0), msg.get("kv_max_len", 0)
        if slots < 0 or max_len < 0 or (slots > 0) != (max_len > 0):
            log.warning("node %s registered a KV pool of %d x %d: ignored", msg["name"], slots,
                        max_len)
            slots = max_len = 0
        info = NodeInfo(ident=ident, name=msg["name"], pid=msg["pid"], host=msg["host"],
                        device=msg["device"], dtype=msg["dtype"], mem_total=msg["mem_total"],
                        mem_free=msg["mem_free"], gflops=float(msg["gflops"]),
                        peer=peer, group=group, max_batch=max_batch, mem_held=max(0, msg.get("mem_held", 0)),
                        kv_slots=slots, kv_max_len=max_len)
        self.by_name[info.name] = info
        self.by_ident[ident] = info
        return old

    def get(self, ident: bytes) -> NodeInfo | None:
        node = self.by_ident.get(ident)
        if node is not None:
            node.last_seen = time.monotonic()
        return node

    def names(self) -> list[str]:
        """Nodes that are alive."""
        return [n.name for n in self.by_name.values() if n.state != "dead"]

    def all(self) -> list[NodeInfo]:
        return list(self.by_name.values())
