"""Sessions: turning a client's generate request into a validated session, and its state."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from tokenizers.decoders import DecodeStream

from zpipe.config import Limits
from zpipe.protocol import Message, ProtocolError, int_list
from zpipe.sampling import SamplingParams

MAX_MESSAGES = 512
# Token ids of penalty contexts (``Session.step_sampling``) one step message may carry: they
# ride in its header (msgpack, at most 5 bytes an id; headers are capped at 64 KiB). A session
# with penalties takes at most this many tokens of context; cohorts are cut to fit it.
PENALTY_CONTEXT_MAX = 8192
# Prompt tokens of context a detokenizer keeps, so the first word keeps its leading space.
DETOK_CONTEXT = 4

log = logging.getLogger("zpipe.broker")


class RequestError(ValueError):
    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


class Detokenizer:
    """Text deltas as tokens arrive, never splitting a multi-byte character.

    A fast tokenizer streams through its Rust ``DecodeStream`` (one call per token, ~8× less
    broker time than decoding twice); others decode the window before and after the token
    (vLLM's offsets)."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-DETOK_CONTEXT:])
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.stream = (DecodeStream(ids=list(self.ids), skip_special_tokens=True)
                       if self.backend is not None else None)
        self.prefix = 0
        self.read = len(self.ids)

    def add(self, token: int) -> str:
        self.ids.append(token)
        if self.stream is not None:
            try:
                return self.stream.step(self.backend, token) or ""
            except Exception as e:  # a decoder the stream cannot follow: never fail the step
                log.warning("streaming detokenizer failed (%s); decoding windows instead", e)
                self.stream = None
                self.read = len(self.ids) - 1
                self.prefix = max(0, self.read - DETOK_CONTEXT)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""


@dataclass
class Session:
    sid: str
    rid: str
    client: bytes
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: dict
    stop_ids: frozenset[int]
    detok: Detokenizer
    tokens: list[int] = field(default_factory=list)
    step: int = 0           # step number of the step in flight (0 = prefill)
    pos: int = 0            # tokens already in the nodes' KV caches
    stage: int = 0          # stage the in-flight step is at
    created: float = field(default_factory=time.perf_counter)
    step_t0: float = 0.0    # when the in-flight step was sent to stage 0
    hop_t0: float = 0.0     # when it was sent to its current stage
    stage_times: list = field(default_factory=list)  # [node, compute_s, hop_s] per stage
    first_token_s: float | None = None
    in_flight: bool = False  # a step of this session is at some node right now
    cohort: Any = None  # the brokers.steps.Cohort its last step was started in
    replayed: int = 0  # tokens replayed after recoveries (``replay``)
    replay_diff: int = 0  # of those, the ones whose step picked another token this time
    penalised: bool = False  # its sampling has penalties: each step carries its context

    def context_len(self) -> int:
        """The length of the penalty context its in-flight step carries (0: none)."""
        if not self.penalised:
            return 0
        return self.step + (len(self.prompt_ids)
                            if self.sampling.get("repetition_penalty", 1) != 1 else 0)

    def step_sampling(self) -> dict:
        """The sampling entry of its in-flight step: with penalties, the tokens they look at
        (the step's own: replays and recoveries penalise exactly as the first time did)."""
        s = self.sampling
        if not self.penalised:
            return s
        gen = self.tokens[:self.step]
        return {**s, "context": (self.prompt_ids + gen
                                 if s.get("repetition_penalty", 1) != 1 else gen)}

    def step_input(self) -> list[int]:
        """The token ids the in-flight step feeds stage 0: the prompt, then each token in
        turn (the last one, except while replaying)."""
        return self.prompt_ids if self.step == 0 else self.tokens[self.step - 1:self.step]

    def replaying(self) -> bool:
        """The in-flight step's token is known already: it rebuilds KV lost with a node."""
        return self.step < len(self.tokens)

    def replay(self) -> None:
        """Start again from the prompt, its tokens kept: the nodes' KV for it was lost. Its
        steps feed the known tokens one by one (the same shapes as the first time, so the same
        KV) until it is back where it was."""
        self.replayed += len(self.tokens)
        self.step = self.pos = self.stage = 0
        self.in_flight = False
        self.cohort = None
        self.stage_times = []

    def replay_from(self, pos: int) -> None:
        """Go back to row ``pos`` (past the prompt): the nodes keep the KV before it (a
        restore from KV shadows), its steps feed the known tokens from there on."""
        self.step = pos - len(self.prompt_ids) + 1
        self.pos = pos
        self.replayed += len(self.tokens) - self.step
        self.stage = 0
        self.in_flight = False
        self.cohort = None
        self.stage_times = []

    def step_input_len(self) -> int:
        return len(self.prompt_ids) if self.step == 0 else 1

    def step_row(self) -> list:
        """This session's row of its step message: ``[sid, step, pos, n]``."""
        return [self.sid, self.step, self.pos, self.step_input_len()]


def build_session(msg: Message, client: bytes, tokenizer: Any, limits: Limits, vocab: int,
                  max_positions: int, eos_ids: frozenset[int]) -> Session:
    """Validate a ``generate`` request (untrusted) and tokenize its prompt."""
    given = [k for k in ("prompt", "messages", "prompt_ids") if k in msg.header]
    if len(given) != 1:
        raise RequestError("give exactly one of 'prompt', 'messages', 'prompt_ids'")
    if "prompt" in msg.header:
        ids = tokenizer(msg["prompt"]).input_ids
    elif "messages" in msg.header:
        ids = _chat_ids(tokenizer, msg["messages"])
    else:
        try:
            ids = int_list(msg["prompt_ids"], "prompt_ids", 0, vocab, limits.max_prompt_tokens)
        except ProtocolError as e:
            raise RequestError(str(e), e.code) from None
    if not ids:
        raise RequestError("the prompt is empty")
    if len(ids) > limits.max_prompt_tokens:
        raise RequestError(f"prompt of {len(ids)} tokens exceeds the limit of "
                           f"{limits.max_prompt_tokens}", "too_large")
    max_new = msg.get("max_new_tokens", limits.default_max_new_tokens)
    if not 1 <= max_new <= limits.max_new_tokens:
        raise RequestError(f"max_new_tokens must be in 1..{limits.max_new_tokens}, got {max_new}")
    if len(ids) + max_new > max_positions:
        raise RequestError(f"prompt ({len(ids)}) + max_new_tokens ({max_new}) exceeds the "
                           f"model's {max_positions} positions", "too_large")
    try:
        given = msg.get("sampling") or {}
        if isinstance(given, dict) and "context" in given:
            raise ValueError("context: set by the broker, not by a request")
        sampling = SamplingParams.from_dict(given)
    except ValueError as e:
        raise RequestError(f"sampling: {e}", "bad_sampling") from None
    context = (len(ids) if sampling.repetition_penalty != 1 else 0) + max_new
    if sampling.penalised and context > PENALTY_CONTEXT_MAX:
        what = f"the prompt ({len(ids)}) + max_new_tokens" if context > max_new else "max_new_tokens"
        raise RequestError(f"max_new_tokens: with penalties, {what} ({max_new}) must be at "
                           f"most {PENALTY_CONTEXT_MAX} tokens", "too_large")
    try:
        stop = int_list(msg.get("stop_token_ids", []), "stop_token_ids", 0, vocab, 64)
    except ProtocolError as e:
        raise RequestError(str(e), e.code) from None
    stop_ids = frozenset(stop) | (frozenset() if msg.get("ignore_eos", False) else eos_ids)
    return Session(sid=uuid.uuid4().hex, rid=msg["rid"], client=client, prompt_ids=ids,
                   max_new_tokens=max_new, sampling=sampling.to_dict(), stop_ids=stop_ids,
                   penalised=sampling.penalised,
                   detok=Detokenizer(tokenizer, ids))


def _chat_ids(tokenizer: Any, messages: list) -> list[int]:
    if not messages or len(messages) > MAX_MESSAGES:
        raise RequestError(f"messages must hold 1..{MAX_MESSAGES} items")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and set(m) == {"role", "content"}
                and all(isinstance(v, str) for v in m.values())):
            raise RequestError(f"messages[{i}] must be {{'role': str, 'content': str}}")
    if not tokenizer.chat_template:
        raise RequestError("this model has no chat template; send a plain prompt")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids
