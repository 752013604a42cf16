"""The async Python client.

    async with Client() as client:
        out = await client.generate("Tell me a joke", chat=True, max_new_tokens=64)
        async for chunk in client.stream("Once upon a time"):
            print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from zpipe import bounds, keys, protocol
from zpipe.config import DEFAULT_BROKER
from zpipe.protocol import ProtocolError

log = logging.getLogger("zpipe.client")


def default_address() -> str:
    return os.environ.get("ZPIPE_BROKER") or DEFAULT_BROKER


class ZpipeError(RuntimeError):
    """An error from the broker or a node (``code`` says which kind), or a timeout."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class TokenChunk:
    index: int
    token_id: int
    text: str
    logprob: float
    # step_s: the whole token step as the broker saw it; stages: [node, compute_s, hop_s]
    timing: dict
    latency_s: float  # since the previous token (or since the request, for the first)


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    timings: list[dict] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    ttft_s: float = 0.0
    total_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        decode = self.total_s - self.ttft_s
        return (len(self.token_ids) - 1) / decode if len(self.token_ids) > 1 and decode > 0 else 0.0


class Client:
    def __init__(self, address: str | None = None, *, timeout: float = 600.0,
                 heartbeat_s: float = 1.0, liveness: int = 5, key: str | None = None,
                 broker_key: str | None = None) -> None:
        """``timeout``: longest wait for a request's next event while the broker is alive.
        The broker is declared gone when silent for ``heartbeat_s`` × ``liveness`` (it is
        pinged every ``heartbeat_s`` while a request waits). ``key``: a CURVE secret key file
        (default ``$ZPIPE_KEY``; ``broker_key`` see ``zpipe.keys.client_keys``)."""
        self.address = address or default_address()
        self._keys = keys.client_keys(key, broker_key)
        self._refused = ""  # why the broker refused the handshake, once it did
        self._refusal: asyncio.Event | None = None  # set with _refused: wakes a blocked send
        self._watch: asyncio.Task | None = None
        self.timeout = timeout
        self.heartbeat_s = heartbeat_s
        self.liveness = liveness
        self._last_recv = time.monotonic()
        self._ctx = zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task | None = None
        self._pending: dict[str, asyncio.Queue] = {}

    async def __aenter__(self) -> Client:
        self._refusal = asyncio.Event()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        bounds.limit(self._sock, bounds.client_frame())
        if self._keys is not None:
            keys.connect_as(self._sock, *self._keys)
        self._watch = keys.watch_handshakes(self._sock, f"client of {self.address}",
                                            self._on_refused)
        self._sock.connect(self.address)
        self._reader = asyncio.create_task(self._read())
        return self

    def _on_refused(self, kind: str, detail: str) -> None:
        """The broker refused the handshake: every request waiting ends with ``auth_refused``."""
        self._refused = (f"the broker at {self.address} refused this client's key ({detail})"
                         if self._keys is not None else
                         f"the broker at {self.address} refused a connection without a key "
                         f"({detail}): give one (--key FILE or $ZPIPE_KEY)")
        err = protocol.Message("error", {"kind": "error", "code": "auth_refused",
                                         "message": self._refused})
        for queue in self._pending.values():
            queue.put_nowait(err)
        if self._refusal is not None:
            self._refusal.set()

    async def __aexit__(self, *exc: object) -> None:
        if self._watch:
            self._watch.cancel()
        if self._reader:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._sock:
            self._sock.close(0)

    async def _read(self) -> None:
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            self._last_recv = time.monotonic()
            try:
                msg = protocol.decode(frames)
            except ProtocolError as e:
                log.warning("dropped a bad message from the broker: %s", e)
                continue
            if msg.kind == "tokens":  # one message per step for all of this client's sessions
                try:
                    items = protocol.token_items(msg)
                except ProtocolError as e:
                    log.warning("dropped a bad message from the broker: %s", e)
                    continue
                for item in items:
                    queue = self._pending.get(item["rid"])
                    if queue is not None:
                        queue.put_nowait(item)
                continue
            queue = self._pending.get(msg.get("rid"))
            if queue is not None:
                queue.put_nowait(msg)
            elif msg.kind == "error":
                log.warning("broker error: %s: %s", msg["code"], msg["message"])

    async def _request(self, kind: str, timeout: float, rid: str | None = None,
                       **fields: Any) -> tuple[str, asyncio.Queue]:
        if self._refused:
            raise ZpipeError("auth_refused", self._refused)
        rid = rid or uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        self._pending[rid] = queue
        if not await self._send(protocol.encode(kind, rid=rid, **fields), timeout):
            raise ZpipeError("timeout", f"could not send to the broker at {self.address} in "
                                        f"{timeout:.0f} s (no connection)")
        return rid, queue

    async def _send(self, frames: list, timeout: float) -> bool:
        """Send ``frames``; False when they could not go within ``timeout``. A DEALER's send
        waits while it has no connection (one whose handshake failed is torn down), so it is
        bounded, and a refused handshake ends it at once with ``auth_refused``."""
        send = asyncio.ensure_future(self._sock.send_multipart(frames))
        refused = asyncio.ensure_future(self._refusal.wait())
        try:
            await asyncio.wait({send, refused}, timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            refused.cancel()
            if not send.done():
                send.cancel()
        if send.done() and not send.cancelled():
            send.result()
            return True
        if self._refused:
            raise ZpipeError("auth_refused", self._refused)
        return False

    async def _next(self, queue: asyncio.Queue, timeout: float) -> protocol.Message:
        """The request's next message; pings the broker while waiting, to notice it is gone."""
        entered = time.monotonic()
        deadline = entered + timeout
        gone_after = self.heartbeat_s * self.liveness
        while True:
            wait = min(self.heartbeat_s, deadline - time.monotonic())
            if wait <= 0:
                raise ZpipeError("timeout", f"no answer from the broker at {self.address} "
                                            f"in {timeout:.0f} s")
            # Not asyncio.wait_for: before Python 3.12 it returns the item instead of raising
            # when the caller is cancelled just as an item arrives, and a cancelled generate
            # then never tells the broker (the session ran on).
            getter = asyncio.ensure_future(queue.get())
            try:
                await asyncio.wait({getter}, timeout=wait)
            finally:
                if not getter.done():
                    getter.cancel()
            if getter.done() and not getter.cancelled():
                msg = getter.result()
                break
            silent = time.monotonic() - max(self._last_recv, entered)
            if silent > gone_after:
                raise ZpipeError("broker_gone", f"the broker at {self.address} has not "
                                 f"answered for {silent:.1f} s")
            # A ping that cannot go (no connection) is skipped: the silence above decides.
            await self._send(protocol.encode("ping"), self.heartbeat_s)
        if msg.kind == "error":
            raise ZpipeError(msg["code"], msg["message"])
        return msg

    async def info(self, timeout: float = 5.0) -> dict:
        rid, queue = await self._request("info", timeout)
        try:
            return (await self._next(queue, timeout)).header
        finally:
            self._pending.pop(rid, None)

    async def admin(self, op: str, args: dict | None = None, timeout: float = 5.0) -> dict:
        """An admin request's answer (``zpipe admin``'s ops: status, sessions, metrics...)."""
        rid, queue = await self._request("admin", timeout, op=op, **({"args": args} if args else {}))
        try:
            return (await self._next(queue, timeout))["data"]
        finally:
            self._pending.pop(rid, None)

    async def wait_ready(self, timeout: float = 600.0, progress: Any = None) -> dict:
        """Wait until the broker has a loaded placement; ``progress(str)`` hears what it waits for."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                info = await self.info(timeout=2.0)
                if info["ready"]:
                    return info
                status = info["waiting_for"]
            except ZpipeError as e:
                status = f"broker not answering ({e.code})"
            if progress and status != last:
                progress(status)
                last = status
            if time.monotonic() > deadline:
                raise ZpipeError("timeout", f"cluster not ready after {timeout:.0f} s: {status}")
            await asyncio.sleep(0.2)

    async def stream(self, prompt: str | list[dict] | None = None, *, chat: bool = False,
                     **kwargs: Any) -> AsyncIterator[TokenChunk]:
        """Yield tokens as the last stage samples them (see ``generate`` for the arguments)."""
        async for event in self._generate(prompt, chat=chat, **kwargs):
            if isinstance(event, TokenChunk):
                yield event

    def events(self, prompt: str | list[dict] | None = None, *, chat: bool = False,
               **kwargs: Any) -> AsyncIterator[Any]:
        """A generation's events (see ``generate`` for the arguments): the ``accepted``
        message (``prompt_ids``), each TokenChunk, then the ``done`` message (``text``,
        ``finish_reason``). Closing the iterator early cancels the session at the broker."""
        return self._generate(prompt, chat=chat, **kwargs)

    async def generate(self, prompt: str | list[dict] | None = None, *, chat: bool = False,
                       on_token: Callable[[TokenChunk], None] | None = None,
                       **kwargs: Any) -> Generation:
        """Generate and return the whole result.

        ``prompt`` is a string, or a list of chat messages ({"role", "content"}) that go through
        the model's chat template; ``chat=True`` wraps a string as one user message. Or pass
        ``prompt_ids=[...]``. Options: max_new_tokens, temperature, top_k, top_p, seed,
        frequency_penalty, presence_penalty, repetition_penalty, stop_token_ids, ignore_eos
        (defaults: greedy, no penalties). ``on_token`` is called with each token as it arrives.
        """
        result = Generation("", [], [], "")
        t0 = time.perf_counter()
        async for event in self._generate(prompt, chat=chat, **kwargs):
            if isinstance(event, TokenChunk):
                result.token_ids.append(event.token_id)
                result.timings.append(event.timing)
                result.latencies_s.append(event.latency_s)
                if event.index == 0:
                    result.ttft_s = time.perf_counter() - t0
                if on_token is not None:
                    on_token(event)
            elif event.kind == "accepted":
                result.prompt_token_ids = event["prompt_ids"]
            else:
                result.text, result.finish_reason = event["text"], event["finish_reason"]
        result.total_s = time.perf_counter() - t0
        return result

    async def _generate(self, prompt: str | list[dict] | None, *, chat: bool,
                        prompt_ids: list[int] | None = None, max_new_tokens: int | None = None,
                        temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                        seed: int = 0, frequency_penalty: float = 0.0,
                        presence_penalty: float = 0.0, repetition_penalty: float = 1.0,
                        stop_token_ids: list[int] | None = None,
                        ignore_eos: bool = False) -> AsyncIterator[Any]:
        sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
        for key, value, off in (("frequency_penalty", frequency_penalty, 0.0),
                                ("presence_penalty", presence_penalty, 0.0),
                                ("repetition_penalty", repetition_penalty, 1.0)):
            if value != off:  # sent only when set: older brokers take the request as before
                sampling[key] = value
        fields: dict[str, Any] = {"sampling": sampling, "ignore_eos": ignore_eos}
        if prompt_ids is not None:
            fields["prompt_ids"] = list(prompt_ids)
        elif isinstance(prompt, list):
            fields["messages"] = prompt
        elif isinstance(prompt, str):
            if chat:
                fields["messages"] = [{"role": "user", "content": prompt}]
            else:
                fields["prompt"] = prompt
        else:
            raise ValueError("give a prompt string, chat messages, or prompt_ids")
        if max_new_tokens is not None:
            fields["max_new_tokens"] = max_new_tokens
        if stop_token_ids:
            fields["stop_token_ids"] = list(stop_token_ids)
        rid = uuid.uuid4().hex
        finished = False
        last = time.perf_counter()
        try:
            # Inside the try: a cancellation that lands while the request is being sent must
            # still tell the broker (a cancel for a request it never saw is answered and dropped).
            _, queue = await self._request("generate", self.timeout, rid=rid, **fields)
            while True:
                msg = await self._next(queue, self.timeout)
                if msg.kind == "token":
                    now = time.perf_counter()
                    yield TokenChunk(msg["index"], msg["token_id"], msg["text"], msg["logprob"],
                                     msg["timing"], now - last)
                    last = now
                elif msg.kind == "accepted":
                    yield msg
                elif msg.kind == "done":
                    finished = True
                    yield msg
                    return
        except ZpipeError:
            finished = True  # the broker already ended the session
            raise
        finally:
            self._pending.pop(rid, None)
            if not finished and self._sock is not None and not self._sock.closed:
                # Cancelled or abandoned: tell the broker so it frees the session's KV.
                with contextlib.suppress(zmq.ZMQError):
                    self._sock.send_multipart(protocol.encode("cancel", rid=rid))
