"""The zpipe wire protocol: every message kind, its fields, and tensor frames.

A message is a ZeroMQ multipart::

    [TAG, msgpack header, tensor frame 0, tensor frame 1, ...]

The header is a dict with ``kind``, the fields of that kind and ``t``: one ``[name, dtype,
shape]`` entry per tensor frame, in frame order. Tensors travel as their raw bytes (bf16 as
well), sent with ``copy=False`` and read back with ``torch.frombuffer``: no pickle, no
per-element work. Everything received is untrusted and checked here before anyone uses it.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

TAG = b"ZPIPE/1"

MAX_HEADER_BYTES = 64 * 1024
MAX_TENSORS = 256
MAX_NDIM = 8
MAX_TENSOR_BYTES = 1 << 30
MAX_MESSAGE_BYTES = 2 << 30
MAX_LIST_ITEMS = 1 << 17  # prompt ids, session lists
MAX_STR = 1 << 20
MAX_ROWS = 4096  # sessions in one step message
MAX_STEP_TOKENS = 8192  # input tokens of one step message, all its rows together
MAX_SID = 128

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_ITEMSIZE = {d: d.itemsize for d in DTYPES.values()}
# torch.frombuffer warns that received frames are read-only; receivers never write to them.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

# Field types: a field name ending in "?" is optional. "num" accepts int or float.
_INT, _NUM, _STR, _BOOL, _LIST, _DICT = "int", "num", "str", "bool", "list", "dict"

SCHEMAS: dict[str, dict[str, str]] = {
    # --- node -> broker
    "register": {
        "name": _STR, "pid": _INT, "host": _STR, "device": _STR, "dtype": _STR,
        "model": _STR, "num_layers": _INT, "mem_total": _INT, "mem_free": _INT, "gflops": _NUM,
        "identity": _DICT,  # zpipe.identity.model_identity: the broker refuses another model
        "peer?": _STR,  # where other nodes send it activations directly (NodeConfig.peer_bind)
        "max_batch?": _INT,  # the most rows it runs as one batch: the broker's cohort cap
        # Memory now: free (excludes what this node holds), held (what a new placement frees
        # or reuses: weights, KV, allocator cache), resident. Heartbeats carry the same.
        "mem_held?": _INT, "rss?": _INT,
        # Its static KV pool, if it has one: slots of kv_max_len tokens, for every layer held
        # (plus one scratch slot), allocated whatever the sessions: the planner budgets for it.
        "kv_slots?": _INT, "kv_max_len?": _INT,
        # Where the other members of a stage split by heads send it partials (group_bind).
        "group?": _STR,
    },
    "loaded": {"epoch": _INT, "start": _INT, "end": _INT, "weight_bytes": _INT, "load_s": _NUM,
               # a restore's rebuild: the sessions it had no inputs for (freed), rows rebuilt
               "missing?": _LIST, "rebuilt_rows?": _INT, "rebuild_s?": _NUM,
               "restored_bytes?": _INT},  # KV a restore took from shadows or rebuilt
    # A stage's answer to a step, for the rows it ran: "rows" [sid, step, n] in the step's
    # order; inner stages send tensor "hidden" (the rows' states concatenated, n each), the last
    # stage "tokens" [token_id, logprob] per row. Refused rows come back as "error" messages.
    # "times" [node, compute_s] of the earlier stages when the step came directly from them.
    "result": {"epoch": _INT, "stage": _INT, "compute_s": _NUM, "rows": _LIST, "tokens?": _LIST,
               "times?": _LIST},
    # --- broker -> node
    # "shadow_every": send the broker KV shadows every that many new rows (0 or absent: none)
    # A stage split by KV-head groups: "heads" [a, b) this node holds, "group" every member's
    # group address in member order, "member" this node's index in it (0 answers the broker).
    "load": {"epoch": _INT, "start": _INT, "end": _INT, "shadow_every?": _INT,
             "heads?": _LIST, "group?": _LIST, "member?": _INT},
    # One token step of one or more sessions (a batch travels whole from stage to stage):
    # "rows" [sid, step, pos, n] per session; tensor "x" holds the rows' inputs concatenated,
    # n each: token ids (stage 0) or hidden states. "sampling" (one dict per row) goes to the
    # last stage only. With direct routing, "route" holds the peer addresses of stages 1..last
    # (stage k sends its output to route[k]; the last stage answers the broker), "sampling"
    # travels from stage 0 to the last, and "times" gathers [node, compute_s] per stage passed.
    "step": {"epoch": _INT, "stage": _INT, "rows": _LIST, "sampling?": _LIST, "route?": _LIST,
             "times?": _LIST},
    "free": {"sids": _LIST},
    # Direct routing, before a node loads, restores or commits a placement: its "stage", the
    # node of the stage before it ("prev", "" for stage 0) and the placement's "route" (as in
    # "step") with the "names" of its nodes. The node takes steps of that epoch only from
    # "prev" (by its CURVE key when keys are on) and sends only to the route.
    "peers": {"epoch": _INT, "stage": _INT, "prev": _STR, "route": _LIST, "names": _LIST},
    # --- client -> broker (exactly one of prompt / messages / prompt_ids)
    "generate": {
        "rid": _STR, "prompt?": _STR, "messages?": _LIST, "prompt_ids?": _LIST,
        "max_new_tokens?": _INT, "sampling?": _DICT, "stop_token_ids?": _LIST,
        "ignore_eos?": _BOOL,
    },
    "cancel": {"rid": _STR},
    "info": {"rid?": _STR},
    # --- broker -> client
    "accepted": {"rid": _STR, "sid": _STR, "prompt_ids": _LIST},
    # This step's tokens of one client's sessions, one message per client per step: "items"
    # are maps with the fields of TOKEN_ITEM (checked by the client with token_items).
    "tokens": {"items": _LIST},
    "done": {"rid": _STR, "finish_reason": _STR, "n_tokens": _INT, "text": _STR},
    "info_reply": {
        "rid?": _STR, "ready": _BOOL, "model": _STR, "num_layers": _INT, "epoch": _INT,
        "nodes": _LIST, "placement": _LIST, "sessions": _INT, "waiting_for": _STR,
        "generation?": _DICT,  # the model's generation_config sampling, for chats
    },
    # --- liveness: nodes and broker send heartbeats both ways; clients ping, the broker pongs
    "welcome": {"heartbeat_s": _NUM, "liveness": _INT},
    "heartbeat": {"rss?": _INT, "mem_free?": _INT, "mem_held?": _INT, "kv_bytes?": _INT,
                  "sessions?": _INT, "steps?": _INT, "known_steps?": _INT,
                  "shadow_bytes?": _INT,  # host memory of the KV shadows it holds
                  "output_log_bytes?": _INT,  # and of the hidden states it sent on
                  # a member of a stage split by heads: seconds spent combining partials, and
                  # the step batches they served (both since it started)
                  "combine_s?": _NUM, "combine_steps?": _INT},
    "ping": {"rid?": _STR},
    "pong": {"rid?": _STR},
    # --- admin: a client asks the broker (op: status, nodes, sessions, metrics, profile)
    "admin": {"rid": _STR, "op": _STR, "args?": _DICT},
    "admin_reply": {"rid": _STR, "op": _STR, "data": _DICT},
    # the broker asks a node for a per-part timing profile of its stage
    "profile": {"rid": _STR, "tokens?": _INT},
    "profile_reply": {"rid": _STR, "parts": _LIST, "weight_bytes": _INT, "kv_bytes": _INT,
                      "rss": _INT},
    # --- reallocation (brokers/mover.py): prepare -> KV export/import -> commit, or abort.
    # A node given start == end holds nothing after the commit.
    "prepare": {"rid": _STR, "epoch": _INT, "start": _INT, "end": _INT,
                "heads?": _LIST, "group?": _LIST, "member?": _INT},  # as in "load"
    "prepared": {"rid": _STR, "epoch": _INT, "weight_bytes": _INT, "load_s": _NUM},
    # "heads" [a, b): only those KV heads (model-wide numbering) of a stage split by heads.
    # "since": per sid, the rows the destination already holds in its KV shadow of the
    # sender: only the rows after them are sent.
    "kv_export": {"rid": _STR, "sids": _LIST, "start": _INT, "end": _INT, "heads?": _LIST,
                  "since?": _LIST},
    # one per session: tensors "k.{layer}", "v.{layer}" [kv_heads, length - since, head_dim]
    "kv_data": {"rid": _STR, "sid": _STR, "length": _INT, "since?": _INT},
    # rows [0, since) come from the receiver's shadow of "owner"
    "kv_import": {"rid": _STR, "sid": _STR, "length": _INT, "heads?": _LIST, "since?": _INT,
                  "owner?": _STR},
    "kv_imported": {"rid": _STR, "sid": _STR, "nbytes": _INT, "shadow_bytes?": _INT},
    "commit": {"rid": _STR, "epoch": _INT},
    "committed": {"rid": _STR, "epoch": _INT},
    "abort": {"rid": _STR, "epoch": _INT},
    "set_slow": {"factor": _NUM},
    # --- KV shadows and the restore after a death (brokers/shadows.py, nodes/shadow.py).
    # A node's new K/V rows [start, length) of session "sid" for every layer it holds (tensors
    # "k.{layer}", "v.{layer}" [kv_heads, length - start, head_dim]), to the broker, which
    # passes them on to the node's shadow holder with "owner" (the sender's name) added.
    "shadow": {"epoch": _INT, "sid": _STR, "start": _INT, "length": _INT, "owner?": _STR},
    # After a node of the placement died: hold layers [start, end) at "epoch", keep the KV of
    # the sessions in "sessions" ([sid, length] each: rows past length are computed again),
    # free every other session's; layers new to the node come from the shadows of "owner",
    # or with "rebuild" [a, b] are computed from those layers' inputs: the hidden states the
    # node sent on (its output log) or, for layer 0, tensor "ids" (int64, every session's
    # first length tokens in "sessions" order); "prompts" the sessions' prompt lengths.
    # Answered by "loaded".
    "restore": {"epoch": _INT, "start": _INT, "end": _INT, "sessions": _LIST,
                "shadow_every": _INT, "owner?": _STR, "rebuild?": _LIST, "prompts?": _LIST,
                "heads?": _LIST, "group?": _LIST, "member?": _INT},  # as in "load"
    # --- any direction
    "error": {"code": _STR, "message": _STR, "rid?": _STR, "sid?": _STR, "step?": _INT,
              "epoch?": _INT},
}


class ProtocolError(ValueError):
    """A message that breaks the protocol. ``code`` is machine-readable, str() says what."""

    def __init__(self, message: str, code: str = "bad_message") -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Message:
    kind: str
    header: dict[str, Any]
    # The received tensor frames, in order, so a broker can forward them without a copy.
    frames: list[Any] = field(default_factory=list)
    # (name, dtype, shape) per frame, checked against the frame's length by ``decode``.
    specs: list[tuple[str, torch.dtype, list[int]]] = field(default_factory=list)
    _tensors: dict[str, torch.Tensor] | None = None

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The frames as tensors (views of the received bytes), made on first use: a broker
        that only forwards frames never pays for them."""
        if self._tensors is None:
            self._tensors = {name: _as_tensor(frame, dtype, shape)
                             for (name, dtype, shape), frame in zip(self.specs, self.frames,
                                                                    strict=True)}
        return self._tensors

    def get(self, key: str, default: Any = None) -> Any:
        return self.header.get(key, default)

    def __getitem__(self, key: str) -> Any:
        return self.header[key]


def _tensor_buffer(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (one copy if it is on a GPU or not contiguous)."""
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype not in DTYPE_NAMES:
        raise ProtocolError(f"dtype {t.dtype} cannot travel", "bad_dtype")
    # A uint8 numpy view keeps the tensor alive for as long as zmq holds the frame.
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def encode(kind: str, tensors: dict[str, torch.Tensor] | None = None, **fields: Any) -> list:
    """Frames for one message. Fields are checked against the schema so bugs show at the sender."""
    header = {"kind": kind, **fields}
    frames: list[Any] = []
    meta = []
    for name, t in (tensors or {}).items():
        meta.append([name, DTYPE_NAMES.get(t.dtype, str(t.dtype)), list(t.shape)])
        frames.append(_tensor_buffer(t))
    header["t"] = meta
    _check_fields(kind, header)
    packed = msgpack.packb(header, use_bin_type=True)
    if len(packed) > MAX_HEADER_BYTES:  # refused here, where the caller can be told why
        raise ProtocolError(f"{kind}: header of {len(packed)} bytes exceeds {MAX_HEADER_BYTES}",
                            "too_large")
    return [TAG, packed, *frames]


def encode_forward(kind: str, frames: list, meta: list, **fields: Any) -> list:
    """A message that reuses already-received tensor frames (zero-copy forwarding)."""
    header = {"kind": kind, **fields, "t": meta}
    _check_fields(kind, header)
    return [TAG, msgpack.packb(header, use_bin_type=True), *frames]


def peek_rid(frames: list) -> str | None:
    """The request id of a message that failed validation, if one can be read, so the error
    reply reaches the request that caused it."""
    try:
        header = msgpack.unpackb(_frame_bytes(frames[1]), raw=False)
        rid = header.get("rid") if isinstance(header, dict) else None
        return rid if isinstance(rid, str) and len(rid) <= 256 else None
    except Exception:  # anything unreadable has no rid
        return None


def _frame_bytes(f: Any) -> memoryview:
    return f.buffer if hasattr(f, "buffer") else memoryview(f)


def decode(frames: list) -> Message:
    """Validate and decode a received multipart (without the ROUTER identity frame)."""
    if len(frames) < 2:
        raise ProtocolError(f"expected at least 2 frames (tag, header), got {len(frames)}")
    tag = bytes(_frame_bytes(frames[0]))
    if tag != TAG:
        if tag.startswith(b"ZPIPE/"):
            raise ProtocolError(
                f"protocol version {tag.decode(errors='replace')!r} not supported "
                f"(this peer speaks {TAG.decode()})", "bad_version")
        raise ProtocolError(f"not a zpipe message: first frame {tag[:16]!r}", "bad_tag")
    raw = _frame_bytes(frames[1])
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}", "too_large")
    try:
        header = msgpack.unpackb(
            raw, raw=False, strict_map_key=True, max_str_len=MAX_STR, max_bin_len=MAX_STR,
            max_array_len=MAX_LIST_ITEMS, max_map_len=4096)
    except Exception as e:  # msgpack raises several unrelated types
        raise ProtocolError(f"header is not valid msgpack: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a map")
    kind = header.get("kind")
    if not isinstance(kind, str) or kind not in SCHEMAS:
        raise ProtocolError(f"unknown message kind {kind!r}", "unknown_kind")
    _check_fields(kind, header)
    tensor_frames = list(frames[2:])
    return Message(kind, header, tensor_frames, _check_tensors(header["t"], tensor_frames))


def _as_tensor(frame: Any, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    buf = _frame_bytes(frame)
    if buf.nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    # Received frames are read-only; receivers never write into them (the warning about
    # that is silenced once, at import).
    return torch.frombuffer(buf, dtype=dtype).view(shape)


def _check_tensors(meta: Any, frames: list) -> list[tuple[str, torch.dtype, list[int]]]:
    if len(meta) != len(frames):
        raise ProtocolError(f"header describes {len(meta)} tensors but {len(frames)} frames came")
    if len(frames) > MAX_TENSORS:
        raise ProtocolError(f"{len(frames)} tensor frames exceed {MAX_TENSORS}", "too_large")
    specs: list[tuple[str, torch.dtype, list[int]]] = []
    names: set[str] = set()
    total = 0
    for i, (entry, frame) in enumerate(zip(meta, frames, strict=True)):
        if not (isinstance(entry, list) and len(entry) == 3):
            raise ProtocolError(f"tensor {i}: entry must be [name, dtype, shape]")
        name, dtype_name, shape = entry
        if not isinstance(name, str) or not name or name in names:
            raise ProtocolError(f"tensor {i}: name must be a unique non-empty string")
        names.add(name)
        dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise ProtocolError(f"tensor {name!r}: unsupported dtype {dtype_name!r}", "bad_dtype")
        if not (isinstance(shape, list) and len(shape) <= MAX_NDIM
                and all(type(d) is int and 0 <= d < (1 << 31) for d in shape)
                and math.prod(d for d in shape if d) < (1 << 40)):
            raise ProtocolError(f"tensor {name!r}: bad shape {shape!r}")
        want = math.prod(shape) * _ITEMSIZE[dtype]
        if want > MAX_TENSOR_BYTES:
            raise ProtocolError(f"tensor {name!r}: {want} bytes exceed {MAX_TENSOR_BYTES}",
                                "too_large")
        got = _frame_bytes(frame).nbytes
        if got != want:
            raise ProtocolError(
                f"tensor {name!r}: frame has {got} bytes, shape {shape} x {dtype_name} "
                f"needs {want}", "bad_length")
        total += want
        if total > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"message exceeds {MAX_MESSAGE_BYTES} bytes", "too_large")
        specs.append((name, dtype, shape))
    return specs


_TYPES = {
    _INT: lambda v: type(v) is int,
    _NUM: lambda v: (type(v) is int or type(v) is float) and math.isfinite(v),
    _STR: lambda v: isinstance(v, str),
    _BOOL: lambda v: isinstance(v, bool),
    _LIST: lambda v: isinstance(v, list),
    _DICT: lambda v: isinstance(v, dict),
}
# One item of a "tokens" message, checked like a message header of kind "token".
TOKEN_ITEM = {"rid": _STR, "index": _INT, "token_id": _INT, "logprob": _NUM, "text": _STR,
              "timing": _DICT}
_REQUIRED = {k: {f for f in s if not f.endswith("?")}
             for k, s in (*SCHEMAS.items(), ("token", TOKEN_ITEM))}
_ALL = {k: {f.rstrip("?"): t for f, t in s.items()}
        for k, s in (*SCHEMAS.items(), ("token", TOKEN_ITEM))}


def _check_fields(kind: str, header: dict) -> None:
    fields = _ALL[kind]
    missing = _REQUIRED[kind] - header.keys()
    if missing:
        raise ProtocolError(f"{kind}: missing field(s) {sorted(missing)}")
    for key, value in header.items():
        if key in ("kind", "t"):
            continue
        want = fields.get(key)
        if want is None:
            raise ProtocolError(f"{kind}: unknown field {key!r}")
        if not _TYPES[want](value):
            raise ProtocolError(f"{kind}: field {key!r} must be {want}, got {type(value).__name__}")
    if not isinstance(header.get("t", []), list):
        raise ProtocolError(f"{kind}: field 't' must be a list")
    header.setdefault("t", [])


def token_items(msg: Message) -> list[Message]:
    """A "tokens" message's items, each checked and made a message of kind "token"."""
    items = msg["items"]
    if len(items) > MAX_ROWS:
        raise ProtocolError(f"tokens: at most {MAX_ROWS} items, got {len(items)}", "too_large")
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise ProtocolError("tokens: every item must be a map")
        _check_fields("token", item)
        out.append(Message("token", item))
    return out


def error(code: str, message: str, **fields: Any) -> list:
    """Frames of an error reply."""
    return encode("error", code=code, message=message[:2000], **fields)


def step_rows(rows: list) -> list[tuple[str, int, int, int]]:
    """Check a step's rows (untrusted): ``[sid, step, pos, n]`` each, sids unique, n >= 1."""
    out = _rows(rows, "step", 4)
    for sid, step, pos, n in out:
        if step < 0 or pos < 0 or n < 1:
            raise ProtocolError(f"step row {sid!r}: step and pos must be >= 0 and n >= 1",
                                "bad_value")
    return out


def restore_lengths(sessions: list) -> dict[str, int]:
    """Check a restore's sessions (untrusted): ``[sid, length]`` each, sids unique, length >= 0.
    Returns ``{sid: length}``."""
    if len(sessions) > MAX_ROWS:
        raise ProtocolError(f"restore: at most {MAX_ROWS} sessions, got {len(sessions)}",
                            "bad_value")
    out: dict[str, int] = {}
    for row in sessions:
        if not (type(row) is list and len(row) == 2 and type(row[0]) is str
                and 0 < len(row[0]) <= MAX_SID and type(row[1]) is int and row[1] >= 0):
            raise ProtocolError(f"restore: a session must be [sid, length >= 0], got {row!r:.80}")
        if row[0] in out:
            raise ProtocolError(f"restore: session {row[0]!r} twice")
        out[row[0]] = row[1]
    return out


def rebuild_request(msg: Message, lengths: dict[str, int], num_layers: int, vocab: int
                    ) -> tuple[int, int, dict[str, int], dict[str, Any] | None]:
    """Check a restore's rebuild (untrusted; ``lengths`` from ``restore_lengths``): returns
    the layers ``(a, b)``, each session's prompt length, and for a rebuild from layer 0 each
    session's token ids (a view of tensor "ids")."""
    span, prompts = msg["rebuild"], msg.get("prompts")
    if not (len(span) == 2 and all(type(v) is int for v in span)
            and 0 <= span[0] < span[1] <= num_layers):
        raise ProtocolError(f"restore: rebuild must be [a, b] within {num_layers} layers, "
                            f"got {span!r:.80}", "bad_value")
    if not (type(prompts) is list and len(prompts) == len(lengths)
            and all(type(p) is int and p >= 0 for p in prompts)):
        raise ProtocolError("restore: prompts must be one length >= 0 per session",
                            "bad_value")
    ids = None
    if span[0] == 0:
        t = msg.tensors.get("ids")
        total = sum(lengths.values())
        if t is None or t.dtype != torch.int64 or t.dim() != 1 or t.shape[0] != total:
            raise ProtocolError(f"restore: a rebuild from layer 0 needs tensor 'ids', int64 "
                                f"[{total}]", "bad_value")
        if total and not (0 <= int(t.min()) and int(t.max()) < vocab):
            raise ProtocolError("restore: token ids outside the vocabulary", "bad_value")
        ids = dict(zip(lengths, t.split(list(lengths.values())), strict=True))
    return span[0], span[1], dict(zip(lengths, prompts, strict=True)), ids


def result_rows(rows: list) -> list[tuple[str, int, int]]:
    """Check a result's rows (untrusted): ``[sid, step, n]`` each, sids unique, n >= 1."""
    out = _rows(rows, "result", 3)
    for sid, step, n in out:
        if step < 0 or n < 1:
            raise ProtocolError(f"result row {sid!r}: step must be >= 0 and n >= 1", "bad_value")
    return out


def _rows(rows: list, kind: str, width: int) -> list[tuple]:
    """Rows of ``width`` 3 or 4: a sid then ints (msgpack gives exact lists, strs and ints).
    Checked field by field, not with a generator: this runs for every row of every step."""
    if not 1 <= len(rows) <= MAX_ROWS:
        raise ProtocolError(f"{kind}: 1..{MAX_ROWS} rows, got {len(rows)}", "bad_value")
    out, seen = [], set()
    for row in rows:
        if not (type(row) is list and len(row) == width and type(row[0]) is str
                and 0 < len(row[0]) <= MAX_SID and type(row[1]) is int and type(row[2]) is int
                and (width == 3 or type(row[3]) is int)):
            raise ProtocolError(f"{kind}: a row must be [sid, {width - 1} ints], got {row!r:.80}")
        if row[0] in seen:
            raise ProtocolError(f"{kind}: session {row[0]!r} appears twice", "bad_value")
        seen.add(row[0])
        out.append(tuple(row))
    return out


MAX_STAGES = 256
_PEER = re.compile(r"^(tcp://[^:\s/]+:\d{1,5}|ipc://[^\s]{1,200})$")


def is_peer_address(value: Any) -> bool:
    """A node's peer address as registered and routed: tcp://host:port or ipc://path."""
    return isinstance(value, str) and len(value) <= 256 and _PEER.match(value) is not None


def next_hop(route: Any, stage: int) -> str:
    """Where stage ``stage`` sends its output under direct routing (an untrusted route)."""
    if not (isinstance(route, list) and 0 <= stage < len(route) <= MAX_STAGES):
        raise ProtocolError(f"route of {_len(route)} hops has none for stage {stage}",
                            "bad_route")
    if not is_peer_address(route[stage]):
        raise ProtocolError(f"route[{stage}] is not a peer address: {route[stage]!r:.80}",
                            "bad_route")
    return route[stage]


def stage_times(times: Any, n: int) -> list[tuple[str, float]]:
    """The ``[node, compute_s]`` entries of ``n`` stages passed (untrusted)."""
    if not (isinstance(times, list) and len(times) == n):
        raise ProtocolError(f"times must list {n} stages, got {_len(times)}")
    for t in times:
        if not (isinstance(t, list) and len(t) == 2 and isinstance(t[0], str)
                and type(t[1]) in (int, float) and math.isfinite(t[1]) and t[1] >= 0):
            raise ProtocolError(f"a times entry must be [node, seconds >= 0], got {t!r:.80}")
    return [(name, float(c)) for name, c in times]


def _len(value: Any) -> int | str:
    return len(value) if isinstance(value, list) else type(value).__name__


def int_list(value: list, what: str, lo: int, hi: int, max_len: int) -> list[int]:
    """Check a list of ints from an untrusted header (prompt ids, stop ids)."""
    if len(value) > max_len:
        raise ProtocolError(f"{what}: {len(value)} items exceed the limit of {max_len}", "too_large")
    for v in value:
        if type(v) is not int or not lo <= v < hi:
            raise ProtocolError(f"{what}: {v!r} is not an integer in [{lo}, {hi})", "bad_value")
    return value
