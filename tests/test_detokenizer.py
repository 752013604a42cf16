"""The broker's streaming detokenizer: the deltas it hands clients add up to the text."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from brokers.sessions import Detokenizer

TEXT = "Hello, wörld! Ünïcode ✓ 日本語のテキスト 🙂 and code: def f(x): return x**2\n\n"


@pytest.fixture(scope="module")
def tok(smollm2):
    return AutoTokenizer.from_pretrained(smollm2)


def _cases(tok) -> list[list[int]]:
    rng = random.Random(0)
    ids = tok.encode(TEXT * 2)
    return [ids, [rng.randrange(len(tok) + 50) for _ in range(300)],  # some ids past the vocab
            tok.encode("<|im_start|>user\nhi<|im_end|>\n") + ids[:40]]


def _stream(d: Detokenizer, ids: list[int]) -> str:
    return "".join(d.add(t) for t in ids)


def test_streaming_matches_the_window_decoder(tok) -> None:
    """The Rust DecodeStream path gives exactly the deltas of the decode-twice fallback
    (multi-byte characters split across tokens, special tokens, unknown ids)."""
    for ids in _cases(tok):
        for cut in (1, 4, 9):
            fast = Detokenizer(tok, ids[:cut])
            slow = Detokenizer(tok, ids[:cut])
            slow.stream = None  # the fallback, as for a tokenizer without a Rust backend
            assert fast.stream is not None
            pieces = [(fast.add(t), slow.add(t)) for t in ids[cut:]]
            assert [a for a, _ in pieces] == [b for _, b in pieces]


def test_deltas_add_up_to_the_decoded_text(tok) -> None:
    ids = tok.encode(TEXT)
    prompt, gen = ids[:3], ids[3:]
    full = tok.decode(ids, skip_special_tokens=True)
    text = _stream(Detokenizer(tok, prompt), gen)
    assert full.endswith(text)
    assert text == full[len(tok.decode(prompt)):]


class _Breaks:
    """A stream that fails on its third token, as a decoder DecodeStream cannot follow would."""

    def __init__(self, stream) -> None:
        self.stream, self.calls = stream, 0

    def step(self, backend, token: int):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("cannot follow this decoder")
        return self.stream.step(backend, token)


def test_a_failing_stream_falls_back_without_losing_text(tok) -> None:
    ids = tok.encode("The quick brown fox jumps over the lazy dog, twice over.")
    prompt, gen = ids[:2], ids[2:]
    d = Detokenizer(tok, prompt)
    d.stream = _Breaks(d.stream)
    text = _stream(d, gen)
    assert d.stream is None  # switched to the window decoder for good
    assert text == _stream(Detokenizer(tok, prompt), gen)
