"""The wire protocol: round trips, zero-copy decoding and rejection of bad messages."""

from __future__ import annotations

import math
import random

import msgpack
import numpy as np
import pytest
import torch
import zmq

from zpipe import protocol
from zpipe.protocol import (
    DTYPES,
    MAX_HEADER_BYTES,
    MAX_NDIM,
    SCHEMAS,
    TAG,
    ProtocolError,
    decode,
    encode,
    encode_forward,
    int_list,
)

# One valid value per field type, so every kind can be built from its schema alone.
_SAMPLE = {"int": 7, "num": 0.25, "str": "s", "bool": True, "list": [1, 2], "dict": {"k": 1}}


def _required(kind: str) -> dict:
    return {f: _SAMPLE[t] for f, t in SCHEMAS[kind].items() if not f.endswith("?")}


def _all_fields(kind: str) -> dict:
    return {f.rstrip("?"): _SAMPLE[t] for f, t in SCHEMAS[kind].items()}


def _wire(frames: list) -> list[bytes]:
    """What a receiver gets: every frame as plain bytes."""
    return [bytes(f) for f in frames]


def _raw(header: object, *tensor_frames: bytes, tag: bytes = TAG) -> list[bytes]:
    return [tag, msgpack.packb(header, use_bin_type=True), *tensor_frames]


def _free(**extra: object) -> dict:
    """A minimal valid header for hand-built messages."""
    return {"kind": "free", "sids": [], **extra}


def _sample_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)
        if t.numel() >= 4:  # values whose bits must survive too
            flat = t.view(-1)
            flat[0], flat[1], flat[2] = float("inf"), float("-inf"), -0.0
        return t
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -(1 << 62)), min(info.max, 1 << 62)
    return torch.randint(lo, hi, shape, generator=g, dtype=dtype)


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _reject(frames: list, code: str, *words: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as ei:
        decode(frames)
    assert ei.value.code == code, (ei.value.code, str(ei.value))
    for w in words:
        assert w in str(ei.value), (w, str(ei.value))
    return ei.value


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_round_trip_required_fields_of_every_kind(kind: str) -> None:
    fields = _required(kind)
    msg = decode(_wire(encode(kind, **fields)))
    assert msg.kind == kind
    assert msg.tensors == {} and msg.frames == []
    for key, value in fields.items():
        assert msg[key] == value and type(msg[key]) is type(value)
    assert msg["t"] == []


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_round_trip_optional_fields_of_every_kind(kind: str) -> None:
    fields = _all_fields(kind)
    msg = decode(_wire(encode(kind, **fields)))
    assert {k: msg[k] for k in fields} == fields
    assert msg.get("absent", "dflt") == "dflt"


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (5,), (2, 3, 4), (1,) * MAX_NDIM])
def test_tensor_round_trip_is_bit_exact(dtype_name: str, shape: tuple[int, ...]) -> None:
    dtype = DTYPES[dtype_name]
    t = _sample_tensor(dtype, shape)
    frames = encode("step", {"x": t}, epoch=1, stage=0, rows=[["s1", 0, 3, 1]])
    assert len(frames) == 3
    assert msgpack.unpackb(frames[1])["t"] == [["x", dtype_name, list(shape)]]
    msg = decode(_wire(frames))
    out = msg.tensors["x"]
    assert out.dtype == dtype
    assert tuple(out.shape) == shape
    assert _bits(out) == _bits(t)
    assert msg["rows"] == [["s1", 0, 3, 1]]


def test_several_tensors_keep_names_and_order() -> None:
    tensors = {name: _sample_tensor(DTYPES[name], (2, 3), seed=i)
               for i, name in enumerate(sorted(DTYPES))}
    msg = decode(_wire(encode("result", tensors, epoch=0, stage=2, compute_s=0.5,
                              rows=[["s", 1, 2]])))
    assert list(msg.tensors) == list(tensors)
    for name, t in tensors.items():
        assert _bits(msg.tensors[name]) == _bits(t) and msg.tensors[name].dtype == t.dtype


def test_encode_non_contiguous_tensor_sends_logical_order() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # (4, 3), not contiguous
    msg = decode(_wire(encode("free", {"x": t}, sids=[])))
    assert torch.equal(msg.tensors["x"], t)


def test_encode_rejects_unsendable_dtype_and_bad_fields() -> None:
    with pytest.raises(ProtocolError) as ei:
        encode("free", {"x": torch.zeros(2, dtype=torch.bool)}, sids=[])
    assert ei.value.code == "bad_dtype"
    with pytest.raises(ProtocolError, match="missing field"):
        encode("load", epoch=1, start=0)
    with pytest.raises(ProtocolError, match="unknown field 'bogus'"):
        encode("cancel", rid="r", bogus=1)
    with pytest.raises(ProtocolError, match="'end' must be int"):
        encode("load", epoch=1, start=0, end=True)


def test_error_helper_truncates_message() -> None:
    msg = decode(_wire(protocol.error("boom", "x" * 5000, rid="r1", step=3)))
    assert msg.kind == "error" and msg["code"] == "boom"
    assert msg["message"] == "x" * 2000 and msg["rid"] == "r1" and msg["step"] == 3


# --------------------------------------------------------------------------- zero copy


def _frame_range(frame: zmq.Frame) -> tuple[int, int]:
    arr = np.frombuffer(frame.buffer, dtype=np.uint8)
    return arr.ctypes.data, arr.ctypes.data + arr.nbytes


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_decode_zmq_frames_shares_frame_memory(dtype_name: str) -> None:
    t = _sample_tensor(DTYPES[dtype_name], (64, 33))
    frames = [zmq.Frame(bytes(f)) for f in encode("free", {"x": t, "y": t[:2]}, sids=["a"])]
    msg = decode(frames)
    assert msg["sids"] == ["a"]
    for name, frame in zip(["x", "y"], frames[2:], strict=True):
        out = msg.tensors[name]
        lo, hi = _frame_range(frame)
        assert lo <= out.data_ptr() and out.data_ptr() + out.numel() * out.element_size() <= hi
        assert out.data_ptr() == lo  # starts at the frame's first byte: nothing copied
    assert _bits(msg.tensors["x"]) == _bits(t)
    assert _bits(msg.tensors["y"]) == _bits(t[:2])
    # the received frames are kept as they came, for forwarding
    assert all(a is b for a, b in zip(msg.frames, frames[2:], strict=True))


def test_decode_zmq_frames_zero_dim_and_empty() -> None:
    frames = encode("free", {"s": torch.tensor(-2.5, dtype=torch.bfloat16),
                             "e": torch.empty(0, 4, dtype=torch.int64)}, sids=[])
    msg = decode([zmq.Frame(bytes(f)) for f in frames])
    assert msg.tensors["s"].shape == () and msg.tensors["s"].item() == -2.5
    assert msg.tensors["e"].shape == (0, 4) and msg.tensors["e"].dtype == torch.int64


def test_encode_does_not_copy_cpu_tensor() -> None:
    t = torch.arange(100, dtype=torch.int32)
    buf = encode("free", {"x": t}, sids=[])[2]
    assert np.frombuffer(buf, dtype=np.uint8).ctypes.data == t.data_ptr()


def test_encode_forward_reuses_frames() -> None:
    t = _sample_tensor(torch.bfloat16, (4, 8))
    received = decode([zmq.Frame(bytes(f)) for f in
                       encode("result", {"hidden": t}, epoch=1, stage=0, compute_s=0.1,
                              rows=[["s", 2, 4]])])
    out = encode_forward("step", received.frames, received["t"], epoch=1, stage=1,
                         rows=[["s", 2, 9, 4]])
    assert out[0] == TAG
    assert len(out) == 2 + len(received.frames)
    assert all(a is b for a, b in zip(out[2:], received.frames, strict=True))
    again = decode(out)
    assert again.kind == "step" and again["stage"] == 1 and again["rows"] == [["s", 2, 9, 4]]
    assert _bits(again.tensors["hidden"]) == _bits(t)
    assert again.tensors["hidden"].data_ptr() == received.tensors["hidden"].data_ptr()


def test_encode_forward_checks_fields() -> None:
    with pytest.raises(ProtocolError, match="missing field"):
        encode_forward("step", [], [], epoch=1)


# --------------------------------------------------------------------------- rejections


@pytest.mark.parametrize("frames", [[], [TAG]])
def test_reject_fewer_than_two_frames(frames: list) -> None:
    _reject(frames, "bad_message", "at least 2 frames", f"got {len(frames)}")


def test_reject_wrong_tag() -> None:
    junk = random.Random(3).randbytes(24)
    _reject([junk, msgpack.packb(_free())], "bad_tag", "not a zpipe message")
    _reject([b"", msgpack.packb(_free())], "bad_tag")


def test_reject_other_version() -> None:
    _reject(_raw(_free(), tag=b"ZPIPE/2"), "bad_version", "ZPIPE/2", "ZPIPE/1")


@pytest.mark.parametrize("raw", [b"\xc1", b"\x92\x01", b"\x81\xa1", b"\x81\x01\x02"])
def test_reject_header_not_msgpack(raw: bytes) -> None:
    # reserved byte, truncated array, truncated map, non-string map key
    _reject([TAG, raw], "bad_message", "not valid msgpack")


def test_reject_header_with_trailing_bytes() -> None:
    _reject([TAG, msgpack.packb(_free()) + b"\x00"], "bad_message", "not valid msgpack")


@pytest.mark.parametrize("header", [[1, 2], "free", 5, None, b"kind"])
def test_reject_header_not_a_map(header: object) -> None:
    _reject(_raw(header), "bad_message", "header must be a map")


def test_reject_header_over_limit() -> None:
    big = _raw({"kind": "cancel", "rid": "r" * MAX_HEADER_BYTES})
    assert len(big[1]) > MAX_HEADER_BYTES
    _reject(big, "too_large", "header of", str(MAX_HEADER_BYTES))
    # just under the limit is fine
    ok = _raw({"kind": "cancel", "rid": "r" * (MAX_HEADER_BYTES - 100)})
    assert decode(ok)["rid"].startswith("rrr")


@pytest.mark.parametrize("kind", ["nope", "", 3, None, "Free"])
def test_reject_unknown_kind(kind: object) -> None:
    _reject(_raw({"kind": kind, "sids": []}), "unknown_kind", "unknown message kind", repr(kind))


def test_reject_missing_kind() -> None:
    _reject(_raw({"sids": []}), "unknown_kind", "unknown message kind")


@pytest.mark.parametrize("kind", sorted(k for k in SCHEMAS if _required(k)))
def test_reject_missing_field(kind: str) -> None:
    fields = _required(kind)
    drop = sorted(fields)[0]
    del fields[drop]
    _reject(_raw({"kind": kind, **fields}), "bad_message", "missing field", drop)


def test_reject_unknown_field() -> None:
    _reject(_raw(_free(extra=1)), "bad_message", "unknown field", "'extra'")
    _reject(_raw({"kind": "info", "rid": "r", "sid": "s"}), "bad_message", "unknown field 'sid'")


@pytest.mark.parametrize("kind, field, value, want", [
    ("load", "epoch", True, "int"),            # bool is not an int
    ("load", "start", "3", "int"),             # str is not an int
    ("load", "end", 3.0, "int"),               # float is not an int
    ("loaded", "load_s", float("nan"), "num"),
    ("loaded", "load_s", float("inf"), "num"),
    ("loaded", "load_s", float("-inf"), "num"),
    ("loaded", "load_s", False, "num"),
    ("loaded", "load_s", "1.0", "num"),
    ("cancel", "rid", 5, "str"),
    ("cancel", "rid", b"bytes", "str"),
    ("generate", "ignore_eos", 1, "bool"),
    ("free", "sids", {"a": 1}, "list"),
    ("step", "sampling", {"a": 1}, "list"),
    ("step", "rows", "s", "list"),
    ("tokens", "items", {}, "list"),
])
def test_reject_wrong_field_type(kind: str, field: str, value: object, want: str) -> None:
    fields = _required(kind)
    fields[field] = value
    _reject(_raw({"kind": kind, **fields}), "bad_message", f"'{field}' must be {want}")


def test_num_accepts_int_and_finite_float() -> None:
    for v in (0, -3, 1e300, -0.0):
        assert decode(_raw({"kind": "loaded", **_required("loaded"), "load_s": v}))["load_s"] == v


def test_reject_t_not_a_list() -> None:
    _reject(_raw(_free(t={"x": 1})), "bad_message", "'t' must be a list")


@pytest.mark.parametrize("n_meta, n_frames", [(1, 0), (0, 1), (2, 1), (1, 2)])
def test_reject_tensor_count_mismatch(n_meta: int, n_frames: int) -> None:
    meta = [[f"x{i}", "uint8", [1]] for i in range(n_meta)]
    frames = [b"\x00"] * n_frames
    _reject(_raw(_free(t=meta), *frames), "bad_message",
            f"describes {n_meta} tensors but {n_frames} frames")


def test_reject_too_many_tensors() -> None:
    n = protocol.MAX_TENSORS + 1
    meta = [[f"x{i}", "uint8", [0]] for i in range(n)]
    _reject(_raw(_free(t=meta), *([b""] * n)), "too_large", str(protocol.MAX_TENSORS))


@pytest.mark.parametrize("entry", [["x", "float32"], "x", ["x", "float32", [1], 0], None])
def test_reject_malformed_tensor_entry(entry: object) -> None:
    _reject(_raw(_free(t=[entry]), b"\x00" * 4), "bad_message", "[name, dtype, shape]")


@pytest.mark.parametrize("dtype", ["float64", "bool", "torch.float32", "", 7, None, ["float32"]])
def test_reject_bad_dtype(dtype: object) -> None:
    _reject(_raw(_free(t=[["x", dtype, [1]]]), b"\x00" * 8), "bad_dtype",
            "unsupported dtype", repr(dtype))


@pytest.mark.parametrize("shape", [
    [-1], [2, -3], [1.0], ["2"], [True], [None], [[2]], 4, "4", None,
    [1] * (MAX_NDIM + 1), [1 << 40],
])
def test_reject_bad_shape(shape: object) -> None:
    _reject(_raw(_free(t=[["x", "uint8", shape]]), b"\x00"), "bad_message", "bad shape")


@pytest.mark.parametrize("name", ["", 3, None, b"x"])
def test_reject_bad_tensor_name(name: object) -> None:
    _reject(_raw(_free(t=[[name, "uint8", [1]]]), b"\x00"), "bad_message", "name")


def test_reject_duplicate_tensor_names() -> None:
    meta = [["x", "uint8", [1]], ["y", "uint8", [1]], ["x", "uint8", [1]]]
    err = _reject(_raw(_free(t=meta), b"\x01", b"\x02", b"\x03"), "bad_message", "unique")
    assert "tensor 2" in str(err)


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("delta", [-1, 1, -5, 5])
def test_reject_lying_frame_length(dtype_name: str, delta: int) -> None:
    itemsize = DTYPES[dtype_name].itemsize
    want = 3 * 4 * itemsize
    got = want + delta * (1 if abs(delta) == 1 else itemsize)
    _reject(_raw(_free(t=[["x", dtype_name, [3, 4]]]), b"\x00" * got), "bad_length",
            f"frame has {got} bytes", f"needs {want}")


def test_reject_lying_frame_length_zmq_frame_and_empty_shape() -> None:
    frames = [zmq.Frame(f) for f in _raw(_free(t=[["x", "float32", [0, 5]]]), b"\x00" * 4)]
    _reject(frames, "bad_length", "frame has 4 bytes", "needs 0")
    _reject(_raw(_free(t=[["x", "int64", []]]), b"\x00" * 4), "bad_length", "needs 8")


def test_reject_tensor_over_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(protocol, "MAX_TENSOR_BYTES", 1024)
    ok = decode(_raw(_free(t=[["x", "float32", [256]]]), b"\x00" * 1024))
    assert ok.tensors["x"].numel() == 256
    _reject(_raw(_free(t=[["x", "float32", [257]]]), b"\x00" * 1028), "too_large",
            "'x'", "1028 bytes exceed 1024")
    # the limit holds before the frame length is even looked at: a lie cannot get past it
    _reject(_raw(_free(t=[["x", "float32", [1 << 30]]]), b""), "too_large", "exceed 1024")


def test_reject_message_over_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(protocol, "MAX_MESSAGE_BYTES", 1000)
    meta = [["a", "uint8", [600]], ["b", "uint8", [600]]]
    _reject(_raw(_free(t=meta), b"\x00" * 600, b"\x00" * 600), "too_large", "exceeds 1000")


def test_reject_empty_tensor_with_overflowing_strides() -> None:
    _reject(_raw(_free(t=[["x", "float32", [0, 1 << 39, 1 << 39]]]), b""), "bad_message")


# --------------------------------------------------------------------------- int_list


def test_int_list_accepts_in_range() -> None:
    v = [0, 5, 99]
    assert int_list(v, "prompt_ids", 0, 100, 3) is v
    assert int_list([], "prompt_ids", 0, 100, 0) == []


@pytest.mark.parametrize("value, code", [
    ([100], "bad_value"), ([-1], "bad_value"), ([1, 2.0], "bad_value"), ([True], "bad_value"),
    (["1"], "bad_value"), ([None], "bad_value"), ([1, 2, 3, 4], "too_large"),
])
def test_int_list_rejects(value: list, code: str) -> None:
    with pytest.raises(ProtocolError) as ei:
        int_list(value, "stop_token_ids", 0, 100, 3)
    assert ei.value.code == code
    assert "stop_token_ids" in str(ei.value)
    if code == "bad_value":
        assert "[0, 100)" in str(ei.value)


# --------------------------------------------------------------------------- fuzz


def _mutations(rng: random.Random) -> list[bytes]:
    """A random multipart: junk, a mutated valid message, or a random header."""
    choice = rng.randrange(4)
    if choice == 0:
        return [rng.randbytes(rng.randrange(0, 40)) for _ in range(rng.randrange(0, 5))]
    if choice == 1:
        kind = rng.choice(sorted(SCHEMAS))
        dn = rng.choice(sorted(DTYPES))
        t = _sample_tensor(DTYPES[dn], (rng.randrange(0, 3), 2), seed=rng.randrange(100))
        frames = _wire(encode(kind, {"x": t}, **_required(kind)))
        i = rng.randrange(len(frames))
        buf = bytearray(frames[i])
        for _ in range(rng.randrange(1, 4)):
            op = rng.randrange(3)
            if op == 0 and buf:
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            elif op == 1 and buf:
                del buf[rng.randrange(len(buf)):]
            else:
                buf[rng.randrange(len(buf) + 1):0] = rng.randbytes(rng.randrange(1, 8))
        frames[i] = bytes(buf)
        if rng.random() < 0.2:
            frames.append(rng.randbytes(rng.randrange(0, 16)))
        return frames
    atoms = [0, -1, 1 << 40, 2.5, float("nan"), "", "x", "float32", "bfloat16", True, None,
             b"\x00", [], {}, [1, 2], ["x", "uint8", [2]], ["x", "float32", [0, 3]]]
    header = {rng.choice(["kind", "t", "sids", "rid", "sid", "step", "epoch", "x"]):
              rng.choice(atoms) for _ in range(rng.randrange(0, 5))}
    if rng.random() < 0.7:
        header["kind"] = rng.choice([*SCHEMAS, "zz"])
    if rng.random() < 0.5:
        header["t"] = [rng.choice(atoms) for _ in range(rng.randrange(0, 3))]
    return [TAG, msgpack.packb(header, use_bin_type=True),
            *[rng.randbytes(rng.randrange(0, 9)) for _ in range(rng.randrange(0, 3))]]


def test_fuzz_only_protocol_errors() -> None:
    rng = random.Random(20240601)
    decoded = rejected = 0
    for _ in range(2000):
        frames = _mutations(rng)
        try:
            msg = decode(frames)
        except ProtocolError as e:
            assert e.code in {"bad_message", "bad_tag", "bad_version", "too_large",
                              "unknown_kind", "bad_dtype", "bad_length"}
            assert str(e)
            rejected += 1
        else:
            assert msg.kind in SCHEMAS
            for t in msg.tensors.values():
                assert math.prod(t.shape) * t.element_size() <= protocol.MAX_TENSOR_BYTES
            decoded += 1
    assert rejected > 1000  # the fuzz mostly hits the checks ...
    assert decoded > 0  # ... but also builds some messages that pass them



def test_token_items_checked_each() -> None:
    item = {"rid": "r", "index": 0, "token_id": 5, "logprob": -0.1, "text": "a",
            "timing": {"step_s": 0.01}}
    msg = decode([bytes(f) for f in protocol.encode("tokens", items=[item, {**item, "rid": "q"}])])
    got = protocol.token_items(msg)
    assert [(m.kind, m["rid"], m["token_id"]) for m in got] == [("token", "r", 5), ("token", "q", 5)]
    for bad, words in (({**item, "logprob": None}, "'logprob' must be num"),
                       ({k: v for k, v in item.items() if k != "text"}, "missing"),
                       ({**item, "extra": 1}, "unknown field"), ("x", "must be a map")):
        msg = decode([bytes(f) for f in protocol.encode("tokens", items=[item, bad])])
        with pytest.raises(ProtocolError, match=words):
            protocol.token_items(msg)


def test_direct_routing_fields_are_checked() -> None:
    route = ["tcp://10.0.0.2:7001", "ipc:///tmp/n2.sock"]
    assert protocol.next_hop(route, 0) == "tcp://10.0.0.2:7001"
    assert protocol.next_hop(route, 1) == "ipc:///tmp/n2.sock"
    for bad, stage in ((route, 2), (route, -1), ("tcp://h:1", 0), (["tcp://h"], 0),
                       (["http://h:80"], 0), ([5], 0), (["tcp://h:1 x"], 0)):
        with pytest.raises(ProtocolError) as e:
            protocol.next_hop(bad, stage)
        assert e.value.code == "bad_route"
    assert protocol.stage_times([["a", 0.5], ["b", 1]], 2) == [("a", 0.5), ("b", 1.0)]
    for bad in ([["a", 0.5]], [["a", -1.0], ["b", 1]], [["a", float("nan")], ["b", 1]],
                [["a"], ["b", 1]], "x", [[1, 0.5], ["b", 1]], [["a", True], ["b", 1]]):
        with pytest.raises(ProtocolError):
            protocol.stage_times(bad, 2)
    assert protocol.is_peer_address("tcp://node-3.lan:5601")
    assert not protocol.is_peer_address("tcp://node-3.lan")
