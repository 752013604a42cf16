"""Stateless token sampling: the same (logits, params, step) always gives the same token."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

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


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 -> greedy
    top_k: int = 0  # 0 -> off
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        t, k, p, s = self.temperature, self.top_k, self.top_p, self.seed
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
                if getattr(self, f.name) != f.default}

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
    def greedy(self) -> bool:
        return self.temperature == 0


def _step_seed(seed: int, step: int) -> int:
    """SplitMix64 of (seed, step): decorrelated per-step seeds, identical on every node."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & _MAX_SEED


def sample(logits: Tensor, params: SamplingParams, step: int) -> tuple[int, float]:
    """(token id, logprob under the distribution actually sampled from).

    Greedy (temperature 0) returns the argmax and its logprob under the unmodified model
    distribution (softmax of the logits). Otherwise temperature, top-k and top-p are applied in
    that order (as transformers' generate does) and one token is drawn with ``torch.multinomial``
    from a CPU generator seeded from ``(seed, step)``; the logprob is under the warped
    distribution. Work is done in float32 on CPU so every node samples identically.
    """
    raw = logits.detach().reshape(1, -1).to("cpu", torch.float32)
    if not params.greedy:
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
