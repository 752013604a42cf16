"""SamplingParams validation and stateless sampling."""

from __future__ import annotations

import math

import pytest
import torch

from zpipe.sampling import SamplingParams, sample


def _logits(seed: int = 0, vocab: int = 1000) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3


BAD = [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": 100.5}, "temperature"),
    ({"temperature": "1"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.0}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_p": float("nan")}, "top_p"),
    ({"top_p": None}, "top_p"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"seed": 1.0}, "seed"),
    ({"temprature": 1.0}, "temprature"),
]


@pytest.mark.parametrize("bad, field", BAD)
def test_validation_names_field(bad, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams.from_dict(bad)


def test_from_dict_ok():
    assert SamplingParams.from_dict({}) == SamplingParams()
    p = SamplingParams.from_dict({"temperature": 1, "top_k": 5, "top_p": 0.9, "seed": 2**63 - 1})
    assert (p.temperature, p.top_k, p.top_p, p.seed) == (1, 5, 0.9, 2**63 - 1)
    with pytest.raises(ValueError):
        SamplingParams.from_dict([("temperature", 1.0)])
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-3)


def test_greedy_is_argmax():
    for s in range(5):
        logits = _logits(s)
        token, logprob = sample(logits, SamplingParams(), step=s)
        assert token == int(torch.argmax(logits))
        assert math.isclose(logprob, float(torch.log_softmax(logits, -1)[token]), rel_tol=1e-6)


def test_same_seed_step_same_token():
    logits = _logits(1) / 3  # flat enough that draws vary
    params = SamplingParams(temperature=1.0, seed=1234)
    draws = [sample(logits, params, step) for step in range(50)]
    assert draws == [sample(logits, params, step) for step in range(50)]
    assert len({t for t, _ in draws}) > 10  # steps give different draws
    other = [sample(logits, SamplingParams(temperature=1.0, seed=99), s)[0] for s in range(50)]
    assert other != [t for t, _ in draws]
    # device/dtype of the input do not matter
    assert sample(logits.to(torch.bfloat16).float(), params, 3) == sample(
        logits.to(torch.bfloat16).float().double(), params, 3)


def test_different_seeds_usually_differ():
    logits = _logits(2) / 3
    tokens = {sample(logits, SamplingParams(temperature=1.0, seed=s), 0)[0] for s in range(20)}
    assert len(tokens) > 5


def test_top_k_1_and_tiny_top_p_are_greedy():
    for s in range(10):
        logits = _logits(s)
        greedy = int(torch.argmax(logits))
        for params in (SamplingParams(temperature=1.5, top_k=1, seed=s),
                       SamplingParams(temperature=1.5, top_p=1e-9, seed=s),
                       SamplingParams(temperature=1e-30, seed=s)):
            token, logprob = sample(logits, params, step=s)
            assert token == greedy
            assert math.isfinite(logprob)
        assert sample(logits, SamplingParams(temperature=0.7, top_k=1), s)[1] == 0.0


def test_samples_within_top_k():
    logits = _logits(3)
    allowed = set(torch.topk(logits, 5).indices.tolist())
    params = SamplingParams(temperature=2.0, top_k=5, seed=7)
    seen = set()
    for step in range(200):
        token, logprob = sample(logits, params, step)
        assert token in allowed
        assert logprob <= 0
        seen.add(token)
    assert len(seen) > 1


def test_top_p_nucleus_and_logprob():
    logits = torch.tensor([3.0, 2.0, 1.0, -5.0, -6.0])
    probs = torch.softmax(logits, -1)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=0)
    seen = set()
    for step in range(100):
        token, logprob = sample(logits, params, step)
        seen.add(token)
        kept = probs[:2] if probs[0] + probs[1] >= 0.9 else probs[:3]
        assert math.isclose(logprob, math.log(probs[token] / kept.sum()), rel_tol=1e-5)
    assert seen <= {0, 1, 2} and len(seen) >= 2


@pytest.mark.parametrize("bad,field", BAD)
def test_cached_checks_like_from_dict(bad, field):
    """The memo never lets a value through that from_dict refuses, also after the valid
    value it equals (True == 1) was cached."""
    try:
        SamplingParams.cached({k: 1 for k in bad})  # the equal valid value first, if any
    except ValueError:
        pass
    with pytest.raises(ValueError, match=field):
        SamplingParams.cached(bad)


def test_cached_remembers_and_refuses_non_dicts():
    p = SamplingParams.cached({"temperature": 0.5, "seed": 3})
    assert p is SamplingParams.cached({"temperature": 0.5, "seed": 3})
    assert SamplingParams.cached({"top_k": 1}).top_k == 1
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams.cached({"top_k": True})
    with pytest.raises(ValueError):
        SamplingParams.cached([("temperature", 1.0)])
    with pytest.raises(ValueError):
        SamplingParams.cached({"temperature": [1]})  # unhashable: checked, not cached


def test_to_dict_sends_only_what_differs_from_the_defaults():
    assert SamplingParams().to_dict() == {}
    for p in (SamplingParams(temperature=0.7), SamplingParams(top_k=5, seed=9),
              SamplingParams(temperature=1.0, top_k=3, top_p=0.9, seed=1)):
        assert SamplingParams.from_dict(p.to_dict()) == p
    assert SamplingParams(temperature=0.5, seed=2).to_dict() == {"temperature": 0.5, "seed": 2}
