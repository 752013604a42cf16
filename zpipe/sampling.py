"""Stateless token sampling: the same (logits, params, step) always gives the same token.

Penalties need the tokens a session has seen: the broker, which holds every session's tokens,
sends them with each step as the params' ``context`` (prompt + tokens generated so far where
``repetition_penalty`` is on, else the generated tokens only), so a step samples the same way
on whichever node runs it, after moves and failovers too.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

_MASK64 = (1 << 64) - 1
_MAX_SEED = (1 << 63) - 1


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_PARSED: dict[tuple, SamplingParams] = {}
_NO_CONTEXT = torch.zeros(0, dtype=torch.int64)
# The sampling a chat uses when the request names no temperature and the model's
# generation_config does not sample: mild randomness and a light repetition penalty, which
# keep small instruct models out of the loops greedy decoding falls into.
CHAT_DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1}


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 -> greedy
    top_k: int = 0  # 0 -> off
    top_p: float = 1.0
    seed: int = 0
    # OpenAI's: subtracted from a token's logit, per occurrence / once if it occurred, over
    # the tokens generated so far
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # transformers' (CTRL's): a logit of a token in the prompt or generated so far is divided
    # by it (multiplied where negative)
    repetition_penalty: float = 1.0
    # Token ids the penalties look at (sent by the broker with each step, see the module doc);
    # an int64 tensor once checked.
    context: Tensor | list | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        t, k, p, s = self.temperature, self.top_k, self.top_p, self.seed
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if not _is_num(v) or not -2 <= v <= 2:
                raise ValueError(f"{name}: must be a number in [-2, 2], got {v!r}")
        r = self.repetition_penalty
        if not _is_num(r) or not 0 < r <= 10:
            raise ValueError(f"repetition_penalty: must be a number in (0, 10], got {r!r}")
        object.__setattr__(self, "context", _context(self.context))
        if not _is_num(t) or not math.isfinite(t) or not 0 <= t <= 100:
            raise ValueError(f"temperature: must be a finite number in [0, 100], got {t!r}")
        if not _is_int(k) or k < 0:
            raise ValueError(f"top_k: must be an integer >= 0, got {k!r}")
        if not _is_num(p) or not 0 < p <= 1:  # NaN fails the comparison
            raise ValueError(f"top_p: must be a number in (0, 1], got {p!r}")
        if not _is_int(s) or not 0 <= s <= _MAX_SEED:
            raise ValueError(f"seed: must be an integer in [0, 2**63 - 1], got {s!r}")

    @classmethod
    def from_dict(cls, d: dict) -> SamplingParams:
        if not isinstance(d, dict):
            raise ValueError(f"sampling params: expected an object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(key) for key in d if key not in known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown sampling parameter")
        return cls(**d)

    def to_dict(self) -> dict:
        """The fields that differ from the defaults (greedy: ``{}``): what every step
        message carries for the session, so the common case costs nothing to send or check."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "context" and getattr(self, f.name) != f.default}

    @classmethod
    def cached(cls, d: dict) -> SamplingParams:
        """``from_dict``, remembered: a session sends the same params with every step, and
        checking them each time cost ~10 µs per row. The key holds each value's type, so a
        value that would fail the checks (``True`` for ``1``) never matches a valid entry."""
        try:
            key = tuple((k, type(v), v) for k, v in d.items())
            hit = _PARSED.get(key)
        except (AttributeError, TypeError):  # not a dict, or unhashable values: just check
            return cls.from_dict(d)
        if hit is None:
            hit = cls.from_dict(d)
            if len(_PARSED) >= 4096:
                _PARSED.clear()
            _PARSED[key] = hit
        return hit

    @property
    def penalised(self) -> bool:
        return (self.frequency_penalty != 0 or self.presence_penalty != 0
                or self.repetition_penalty != 1)

    @property
    def greedy(self) -> bool:
        """The argmax of the model's logits (a penalty changes the logits first)."""
        return self.temperature == 0 and not self.penalised


def _context(ctx: object) -> Tensor:
    """The ``context`` field checked: a list of token ids >= 0 (checked in numpy, not per
    element in Python: it grows with the session)."""
    if ctx is None:
        return _NO_CONTEXT
    if isinstance(ctx, Tensor):
        return ctx
    if not isinstance(ctx, (list, tuple)):
        raise ValueError(f"context: must be a list of token ids, got {type(ctx).__name__}")
    if not ctx:
        return _NO_CONTEXT
    a = np.asarray(ctx)
    if a.ndim != 1 or a.dtype.kind not in "iu" or int(a.min()) < 0 or int(a.max()) >= 1 << 40:
        raise ValueError("context: must be a list of token ids >= 0")
    return torch.from_numpy(a.astype(np.int64, copy=False))


def generation_defaults(model_dir: object) -> dict:
    """The sampling a model's ``generation_config.json`` asks for (temperature, top_k, top_p,
    repetition_penalty, where it sets them and samples), as SamplingParams fields; ``{}``
    when it does not sample or has none."""
    from transformers import GenerationConfig

    try:
        given = GenerationConfig.from_pretrained(model_dir).to_diff_dict()
    except (OSError, ValueError):
        return {}
    if not given.get("do_sample"):
        return {}
    out = {k: given[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty")
           if _is_num(given.get(k))}
    out.setdefault("temperature", 1.0)  # transformers' own default when sampling
    try:
        SamplingParams(**out)
    except ValueError:
        return {}
    return out


def chat_sampling(model_defaults: dict | None) -> dict:
    """The sampling of a chat turn that names no temperature: the model's generation_config
    defaults (``generation_defaults``), else ``CHAT_DEFAULTS``."""
    return dict(model_defaults) if model_defaults else dict(CHAT_DEFAULTS)


def _step_seed(seed: int, step: int) -> int:
    """SplitMix64 of (seed, step): decorrelated per-step seeds, identical on every node."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & _MAX_SEED


def sample(logits: Tensor, params: SamplingParams, step: int) -> tuple[int, float]:
    """(token id, logprob under the distribution actually sampled from).

    Penalties come first (repetition, then frequency and presence: ``penalise``); ``step``
    is also the number of tokens generated before this one. Temperature 0 returns the argmax
    and its logprob under the (penalised) model distribution. Otherwise temperature, top-k and
    top-p are applied in that order (as transformers' generate does) and one token is drawn
    with ``torch.multinomial`` from a CPU generator seeded from ``(seed, step)``; the logprob
    is under the warped distribution. Work is done in float32 on CPU so every node samples
    identically.
    """
    raw = logits.detach().reshape(1, -1).to("cpu", torch.float32)
    if params.penalised:
        raw = penalise(raw, params, step)
    if params.temperature > 0:
        scores = TemperatureLogitsWarper(float(params.temperature))(None, raw)
        if params.top_k > 0:
            scores = TopKLogitsWarper(params.top_k)(None, scores)
        if params.top_p < 1.0:
            scores = TopPLogitsWarper(float(params.top_p))(None, scores)
        logprobs = torch.log_softmax(scores, dim=-1)
        probs = logprobs.exp()
        if torch.isfinite(probs).all():
            gen = torch.Generator(device="cpu").manual_seed(_step_seed(params.seed, step))
            token = int(torch.multinomial(probs, 1, generator=gen))
            return token, float(logprobs[0, token])
        # Tiny temperatures overflow the softmax; the limit of that distribution is greedy.
    token = int(torch.argmax(raw, dim=-1))
    return token, float(torch.log_softmax(raw, dim=-1)[0, token])


def penalise(scores: Tensor, params: SamplingParams, step: int) -> Tensor:
    """``scores`` [1, vocab] with the penalties applied (a new tensor).

    repetition_penalty (transformers' RepetitionPenaltyLogitsProcessor) over every token of the
    context; frequency and presence (OpenAI's: ``logit - count * frequency - (count > 0) *
    presence``) over its last ``step`` tokens, the ones generated so far. Ids outside the
    vocabulary are ignored."""
    vocab = scores.shape[-1]
    ctx = params.context
    gen = ctx[max(0, ctx.shape[0] - step):]
    scores = scores.clone()
    if params.repetition_penalty != 1:
        ids = ctx[ctx < vocab][None]
        picked = scores.gather(1, ids)
        r = float(params.repetition_penalty)
        scores.scatter_(1, ids, torch.where(picked < 0, picked * r, picked / r))
    if params.frequency_penalty != 0 or params.presence_penalty != 0:
        counts = torch.bincount(gen[gen < vocab], minlength=vocab).to(torch.float32)[None]
        scores -= counts * float(params.frequency_penalty) + (counts > 0).to(
            torch.float32) * float(params.presence_penalty)
    return scores
