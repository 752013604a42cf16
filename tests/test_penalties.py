"""Sampling penalties against plain reference implementations of their formulas, and the chat
sampling defaults."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from brokers.sessions import (
    PENALTY_CONTEXT_MAX,
    Detokenizer,
    RequestError,
    Session,
    build_session,
)
from brokers.steps import cohorts
from zpipe import protocol
from zpipe.config import Limits
from zpipe.protocol import MAX_STEP_TOKENS
from zpipe.sampling import (
    CHAT_DEFAULTS,
    SamplingParams,
    chat_sampling,
    generation_defaults,
    penalise,
    sample,
)

VOCAB = 300


def _logits(seed: int) -> torch.Tensor:
    return torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(seed)) * 4


def _tokens(seed: int, n: int) -> list[int]:
    # few distinct ids, so that tokens repeat and counts go above 1
    return torch.randint(0, 40, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def openai_reference(logits: list[float], generated: list[int], frequency: float,
                     presence: float) -> list[float]:
    """OpenAI's documented formula, one token at a time:
    mu[j] - c[j] * frequency_penalty - float(c[j] > 0) * presence_penalty."""
    out = list(logits)
    for j in range(len(out)):
        c = generated.count(j)
        out[j] = out[j] - c * frequency - float(c > 0) * presence
    return out


@pytest.mark.parametrize("frequency, presence", [(0.5, 0.0), (0.0, 1.5), (1.2, -0.7),
                                                 (-2.0, 2.0)])
def test_frequency_and_presence_match_the_formula(frequency: float, presence: float) -> None:
    for seed in range(3):
        logits, gen = _logits(seed), _tokens(seed, 25)
        p = SamplingParams(frequency_penalty=frequency, presence_penalty=presence, context=gen)
        got = penalise(logits, p, step=len(gen))
        want = torch.tensor([openai_reference(logits[0].tolist(), gen, frequency, presence)])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        # greedy with penalties picks the argmax of the penalised logits
        token, logprob = sample(logits[0], p, len(gen))
        assert token == int(want.argmax())
        assert math.isclose(logprob, float(torch.log_softmax(want, -1)[0, token]), abs_tol=1e-5)


@pytest.mark.parametrize("penalty", [0.5, 1.1, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty: float) -> None:
    for seed in range(3):
        logits = _logits(seed)
        context = _tokens(seed + 10, 30)  # prompt and generated tokens alike
        p = SamplingParams(repetition_penalty=penalty, context=context)
        got = penalise(logits, p, step=7)
        want = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([context]), logits.clone())
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_frequency_counts_only_the_generated_tokens() -> None:
    """With repetition_penalty on, the context holds the prompt too: frequency and presence
    look at its last ``step`` tokens only, repetition at all of it."""
    logits, prompt, gen = _logits(5), [1, 2, 3, 3, 4], [3, 7, 7]
    p = SamplingParams(repetition_penalty=1.5, frequency_penalty=0.4, presence_penalty=0.3,
                       context=prompt + gen)
    got = penalise(logits, p, step=len(gen))
    rep = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([prompt + gen]), logits.clone())
    want = torch.tensor([openai_reference(rep[0].tolist(), gen, 0.4, 0.3)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # at the prefill (step 0) nothing was generated yet: the context is the prompt
    first = SamplingParams(repetition_penalty=1.5, frequency_penalty=0.4, presence_penalty=0.3,
                           context=prompt)
    torch.testing.assert_close(penalise(logits, first, step=0),
                               RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([prompt]),
                                                                     logits.clone()))


def test_penalised_sampling_is_seeded_and_stateless() -> None:
    logits = _logits(7)[0] / 4
    gen = _tokens(3, 20)
    p = SamplingParams(temperature=0.8, top_p=0.95, seed=42, frequency_penalty=0.5,
                       repetition_penalty=1.2, context=gen)
    draws = [sample(logits, p, s) for s in range(20)]
    again = SamplingParams.from_dict({**p.to_dict(), "context": list(gen)})
    assert draws == [sample(logits, again, s) for s in range(20)]
    assert "context" not in p.to_dict()
    assert not p.greedy and p.penalised
    assert SamplingParams(temperature=0).greedy


def test_ids_outside_the_vocabulary_are_ignored() -> None:
    logits = _logits(1)
    p = SamplingParams(repetition_penalty=1.3, frequency_penalty=1.0, context=[5, VOCAB + 3])
    got = penalise(logits, p, step=2)
    want = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([[5]]), logits.clone())
    want[0, 5] -= 1.0
    torch.testing.assert_close(got, want)


BAD = [
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"presence_penalty": -2.01}, "presence_penalty"),
    ({"presence_penalty": "1"}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"repetition_penalty": 11}, "repetition_penalty"),
    ({"repetition_penalty": True}, "repetition_penalty"),
    ({"context": [1, -2]}, "context"),
    ({"context": [1.5, 2]}, "context"),
    ({"context": [[1], [2]]}, "context"),
    ({"context": "abc"}, "context"),
]


@pytest.mark.parametrize("bad, field", BAD)
def test_validation_names_field(bad: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams.from_dict(bad)


def test_chat_defaults_come_from_generation_config(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": 2}))
    assert generation_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.9}
    assert chat_sampling(generation_defaults(tmp_path)) == {"temperature": 0.6, "top_p": 0.9}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert generation_defaults(tmp_path) == {}  # greedy: the chat default applies
    assert chat_sampling({}) == CHAT_DEFAULTS
    assert generation_defaults(tmp_path / "missing") == {}
    SamplingParams(**CHAT_DEFAULTS)


def _session(tok, prompt: list[int], sampling: dict, tokens: int) -> Session:
    s = Session(sid=f"s{len(prompt)}-{tokens}", rid="r", client=b"c", prompt_ids=prompt,
                max_new_tokens=tokens + 1, sampling=sampling, stop_ids=frozenset(),
                detok=Detokenizer(tok, prompt), penalised=SamplingParams(**sampling).penalised)
    s.tokens = [7] * tokens
    s.step = tokens
    return s


def test_penalty_contexts_fit_a_step_header(tiny_model: Path) -> None:
    """A cohort's penalty contexts ride in its step header: cohorts are cut so that they fit,
    and a session whose context could outgrow the budget is refused at admission."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rep = {"repetition_penalty": 1.2}
    big = [_session(tok, [1] * 3000, rep, 2000) for _ in range(3)]  # 5000 ids each
    plain = [_session(tok, [1] * 3000, {}, 2000) for _ in range(3)]
    small = [_session(tok, [1] * 10, {"frequency_penalty": 0.5}, 100) for _ in range(4)]
    cut = cohorts(big + plain + small, cap=64)
    assert [len(c) for c in cut] == [1, 1, 8]
    assert sum(cut, []) == big + plain + small
    assert [len(c) for c in cohorts(plain + small, cap=3)] == [3, 3, 1]
    # the largest context of the largest vocabulary (128k ids: 5 bytes each) fits a header
    worst = _session(tok, [128_000] * 4000, rep, PENALTY_CONTEXT_MAX - 4000)
    assert worst.context_len() == PENALTY_CONTEXT_MAX
    protocol.encode("step", {"x": torch.zeros(1, dtype=torch.int64)}, epoch=1, stage=0,
                    rows=[worst.step_row()], sampling=[worst.step_sampling()])

    limits = Limits()
    msg = protocol.decode(protocol.encode("generate", rid="r", prompt_ids=[1] * 5000,
                                          max_new_tokens=4000, sampling=rep))
    with pytest.raises(RequestError, match="max_new_tokens: with penalties") as e:
        build_session(msg, b"c", tok, limits, 512, 100_000, frozenset())
    assert e.value.code == "too_large"
    msg = protocol.decode(protocol.encode("generate", rid="r", prompt_ids=[1] * 5000,
                                          max_new_tokens=4000,
                                          sampling={"frequency_penalty": 1.0}))
    assert build_session(msg, b"c", tok, limits, 512, 100_000, frozenset()).penalised
    msg = protocol.decode(protocol.encode("generate", rid="r", prompt_ids=[1, 2],
                                          sampling={"context": [1]}))
    with pytest.raises(RequestError, match="context"):
        build_session(msg, b"c", tok, limits, 512, 100_000, frozenset())


def test_cli_sampling_defaults() -> None:
    """``zpipe generate`` stays greedy; ``zpipe chat`` without --temperature takes the chat
    defaults, each flag given overriding its own."""
    from zpipe.cli.generate import _options
    from zpipe.cli.main import build_parser

    gen = build_parser().parse_args(["generate", "hi"])
    assert _options(gen) == {"max_new_tokens": 128, "seed": 0}  # the client's: greedy
    chat = build_parser().parse_args(["chat", "--top-p", "0.5"])
    assert _options(chat, chat_sampling({})) == {
        "max_new_tokens": 128, "seed": 0, **CHAT_DEFAULTS, "top_p": 0.5}
    chat = build_parser().parse_args(["chat", "--temperature", "0"])
    assert _options(chat, chat_sampling({})) == {"max_new_tokens": 128, "seed": 0,
                                                 "temperature": 0.0}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["chat", "--repetition-penalty", "0"])


def test_prefill_cohorts_stay_within_the_tokens_a_step_takes(tiny_model: Path) -> None:
    """Prefills of long prompts that arrive together go in cohorts whose prompts fit one step
    message (``MAX_STEP_TOKENS``); decode steps of those sessions go on as one cohort."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    long = [_session(tok, [1] * 3000, {}, 0) for _ in range(5)]
    cut = cohorts(long, cap=64)
    assert [len(c) for c in cut] == [2, 2, 1]
    assert all(sum(s.step_input_len() for s in c) <= MAX_STEP_TOKENS for c in cut)
    for s in long:
        s.tokens, s.step = [7], 1
    assert [len(c) for c in cohorts(long, cap=64)] == [5]
