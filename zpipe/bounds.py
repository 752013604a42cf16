"""Bounds on what a socket takes in: ZeroMQ's ``MAXMSGSIZE`` and high-water marks.

libzmq reads a frame's declared size before its bytes and drops the connection of a peer
whose frame is over ``MAXMSGSIZE``: a huge frame is never buffered. The limit is per frame,
so it is the largest legitimate tensor frame (a batch's hidden states, or one session's K or V
rows of one layer, which are never wider than the hidden size) plus slack for the header.
"""

from __future__ import annotations

import zmq

from zpipe import protocol

HEADER_SLACK = protocol.MAX_HEADER_BYTES  # the msgpack header frame is at most this
WIDEST_DTYPE = 4  # float32: the widest dtype activations and KV travel in
# Messages queued per connection each way. A peer that stops reading fills its queue and
# sends to it fail at once (the broker then drops that client's sessions): nothing waits.
HWM = 1000


def largest_frame(hidden_size: int, rows: int, tokens_per_row: int,
                  dtype_bytes: int = WIDEST_DTYPE) -> int:
    """The largest frame a step, result, KV or shadow message of such a model carries:
    ``rows`` sessions of up to ``tokens_per_row`` positions each, plus the header's slack
    (never beyond what ``protocol.decode`` takes)."""
    tensor = hidden_size * rows * tokens_per_row * dtype_bytes
    return min(tensor, protocol.MAX_TENSOR_BYTES) + HEADER_SLACK


def client_frame() -> int:
    """What a client takes from the broker: headers only."""
    return HEADER_SLACK


def limit(sock: zmq.Socket, max_frame: int) -> None:
    """Set ``sock``'s frame limit and queues (before it binds or connects)."""
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
