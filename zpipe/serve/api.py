"""OpenAI's request and response shapes: a chat or completion request checked and turned into
the Python client's arguments, its answer and stream chunks, and its errors."""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from zpipe.sampling import SamplingParams, chat_sampling

MAX_STOP = 4  # OpenAI takes up to 4 stop sequences
ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or {400: "invalid_request_error", 401: "authentication_error",
                              404: "not_found_error", 429: "rate_limit_error",
                              503: "service_unavailable"}.get(
                                  status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


# The broker's error codes (zpipe.client.ZpipeError.code) as HTTP statuses.
BROKER_STATUS = {"bad_request": 400, "bad_sampling": 400, "bad_value": 400, "too_large": 400,
                 "busy": 429, "no_placement": 503, "node_lost": 503, "timeout": 503, "broker_gone": 503}


def from_broker(code: str, message: str) -> APIError:
    """A broker error as an API error; a bad request names the field it is about."""
    status = BROKER_STATUS.get(code, 500)
    param = None
    if status == 400:
        head = message.removeprefix("sampling: ").split(":", 1)[0].split(" ", 1)[0]
        param = {"max_new_tokens": "max_tokens", "prompt": "prompt", "messages": "messages",
                 "prompt_ids": "prompt"}.get(head, head if head.isidentifier() else None)
        if code == "too_large" and param is None:
            param = "max_tokens" if "max_new_tokens" in message else "prompt"
    return APIError(status, message, param=param, code=code)


@dataclass
class Request:
    """A checked request: what to send (``prompt`` for the client, ``options`` its keyword
    arguments) and how to answer (``stream``, ``stop``, ``include_usage``)."""

    chat: bool
    model: str
    prompt: Any  # a string, or chat messages
    options: dict
    stream: bool = False
    stop: list[str] = field(default_factory=list)
    include_usage: bool = False


def _num(body: dict, key: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(key, f"must be a number, got {v!r}")
    if (v <= lo if lo_open else v < lo) or v > hi:
        raise bad(key, f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v!r}")
    return v


def _int(body: dict, key: str, lo: int, hi: int) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise bad(key, f"must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _content(i: int, content: Any) -> str:
    """A message's content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content", "only text parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"messages[{i}].content", "must be a string or a list of text parts")


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", "must be an object")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        # the chat templates of small models know system, user and assistant
        role = "system" if role == "developer" else role
        out.append({"role": role, "content": _content(i, m.get("content") or "")})
    return out


def _prompt(body: dict) -> tuple[str | None, list[int] | None]:
    """A completion's prompt: one string, or one list of token ids."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        if not p:
            raise bad("prompt", "must not be empty")
        return p, None
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                         for t in p):
        return None, p
    raise bad("prompt", "must be a string or a list of token ids (one prompt per request)")


def parse(body: Any, chat: bool, model: str, generation: dict | None) -> Request:
    """Check an OpenAI request body; ``generation``: the model's chat sampling defaults (the
    broker's info), used where the request names no temperature."""
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    name = body.get("model", model)
    if not isinstance(name, str):
        raise bad("model", "must be a string")
    _int(body, "n", 1, 1)  # one choice per request
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream", "must be true or false")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise bad("stream_options", "must be an object")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(
            isinstance(s, str) and s for s in stop):
        raise bad("stop", f"must be a string or a list of at most {MAX_STOP} non-empty strings")

    options: dict[str, Any] = {}
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, key, 1, 1 << 31)
    if max_tokens is not None:
        options["max_new_tokens"] = max_tokens
    given = {
        "temperature": _num(body, "temperature", 0, 2),
        "top_p": _num(body, "top_p", 0, 1, lo_open=True),
        "top_k": _int(body, "top_k", 0, 1 << 31),  # not OpenAI's; vLLM's and llama.cpp's
        "frequency_penalty": _num(body, "frequency_penalty", -2, 2),
        "presence_penalty": _num(body, "presence_penalty", -2, 2),
        "repetition_penalty": _num(body, "repetition_penalty", 0, 10, lo_open=True),
        "seed": _int(body, "seed", 0, (1 << 63) - 1),
    }
    sampling = chat_sampling(generation) if given["temperature"] is None else {}
    sampling.update({k: v for k, v in given.items() if v is not None})
    try:
        SamplingParams(**sampling)
    except ValueError as e:
        raise bad(str(e).split(":", 1)[0], str(e).split(":", 1)[-1].strip()) from None
    options.update(sampling)
    if chat:
        prompt: Any = _messages(body)
    else:
        text, ids = _prompt(body)
        prompt = text
        if ids is not None:
            options["prompt_ids"] = ids
    return Request(chat=chat, model=name, prompt=prompt, options=options, stream=stream,
                   stop=stop, include_usage=bool(so.get("include_usage")))


class StopMatcher:
    """Cuts streamed text at the first stop sequence; holds back a tail that may be the start
    of one, so no part of a stop sequence is ever sent."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.text = ""  # everything received
        self.sent = 0  # of which this much was handed out
        self.stopped = False

    def feed(self, delta: str) -> str:
        """The text that can go out now (after a stop: the text before it, then nothing)."""
        if self.stopped:
            return ""
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        self.text += delta
        if not self.stops:
            out, self.sent = self.text[self.sent:], len(self.text)
            return out
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[:min(hits)]
            out, self.sent = self.text[self.sent:], len(self.text)
            return out
        keep = 0  # the longest tail that begins a stop sequence
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), keep, -1):
                if self.text.endswith(s[:k]):
                    keep = k
                    break
        end = len(self.text) - keep
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def flush(self) -> str:
        """The held-back tail, once the generation ended without a stop sequence."""
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(broker_reason: str) -> str:
    return "length" if broker_reason == "length" else "stop"


def response(req: Request, rid: str, text: str, reason: str, prompt_tokens: int,
             completion_tokens: int) -> dict:
    """A whole (non-streamed) answer."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
    if req.chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": rid, "object": "chat.completion" if req.chat else "text_completion",
            "created": int(time.time()), "model": req.model, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(req: Request, rid: str, created: int, text: str | None, reason: str | None = None,
          role: bool = False) -> dict:
    """One streamed chunk: a text delta, or the last one with its finish reason."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
    if req.chat:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    out = {"id": rid, "object": "chat.completion.chunk" if req.chat else "text_completion",
           "created": created, "model": req.model, "choices": [choice]}
    if req.include_usage:
        out["usage"] = None
    return out


def usage_chunk(req: Request, rid: str, created: int, prompt_tokens: int,
                completion_tokens: int) -> dict:
    """The chunk after the last one when ``stream_options.include_usage`` asked for it."""
    return {"id": rid, "object": "chat.completion.chunk" if req.chat else "text_completion",
            "created": created, "model": req.model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}
