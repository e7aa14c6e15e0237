"""Reusing the token ids of an earlier prompt's start gives exactly what the tokenizer gives for the whole text.

With a real byte-level BPE tokenizer (trained at test time, as the tiny vLLM model's), conversations that grow
turn by turn, one long system prompt or document before different questions, and joins chosen to be hard:
whitespace runs, contractions, punctuation, digits and non-ASCII text at the seam and where two texts part.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from e2e.bench.tokenizer import ensure_tokenizer
from engine.tokens.tokenizer import HFTokenizer
from pickers.prefixtokens import HEAD_CHARS, MIN_CHARS, PrefixTokens


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> HFTokenizer:
    return HFTokenizer(ensure_tokenizer(tmp_path_factory.mktemp("tok")))


def _text(rng: random.Random, chars: int) -> str:
    words = ["the", "cache", "pod's", "route", "GPU", "naïve", "données", "1234", "x=y;", "\n\n", "  ", "don't",
             "'s", "?!", "日本語", "emoji🙂", "tab\t", "end."]
    out: list[str] = []
    n = 0
    while n < chars:
        w = rng.choice(words)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)


def test_growing_conversations_reuse_the_prefix_and_match_a_full_encode(tokenizer):
    rng = random.Random(5)
    pt = PrefixTokens(tokenizer)
    convs = [f"system {c}: " + _text(rng, MIN_CHARS + 2000) for c in range(3)]
    for _ in range(6):
        for c in range(3):
            convs[c] += rng.choice(["", " ", "\n", "  "]) + _text(rng, rng.randint(1, 3000))
            for special in (True, False):
                got = pt.encode(convs[c], special)
                want = tokenizer.encode_array(convs[c], add_special_tokens=special)
                assert np.array_equal(got, want)
    assert pt.reused >= 24 and pt.full == 6  # every turn after the first reused its conversation's prefix


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seam=st.text(min_size=0, max_size=40), tail=st.text(min_size=1, max_size=400), seed=st.integers(0, 10**6))
def test_any_appended_text_gives_the_full_encode(tokenizer, seam, tail, seed):
    rng = random.Random(seed)
    pt = PrefixTokens(tokenizer)
    base = _text(rng, MIN_CHARS + 600) + seam
    assert np.array_equal(pt.encode(base, True), tokenizer.encode_array(base))
    grown = base + tail
    assert np.array_equal(pt.encode(grown, True), tokenizer.encode_array(grown))


def test_texts_that_part_after_a_long_shared_start_reuse_it_and_match_a_full_encode(tokenizer):
    """A long system prompt or document before different questions: the second and later texts encode only what
    follows a checked boundary before the parting; a text seen before is its stored ids; one that parts right
    after the head the texts are grouped by, and one the earlier text extends, too."""
    rng = random.Random(9)
    pt = PrefixTokens(tokenizer)
    head = _text(rng, MIN_CHARS + 500)
    texts = [head + f" question {i}: " + _text(rng, 800) for i in range(4)]
    for t in texts:
        assert np.array_equal(pt.encode(t, True), tokenizer.encode_array(t))
    assert pt.full == 1 and pt.reused == 3
    again = pt.encode(texts[1], True)
    assert np.array_equal(again, tokenizer.encode_array(texts[1])) and pt.reused == 4 and len(pt) == 4
    early = head[:HEAD_CHARS + 10] + "Z" + _text(rng, MIN_CHARS)  # same head, parts 1,034 characters in
    cut = texts[2][:len(head) + 300]  # a text the earlier one extends: it parts at its own end
    for t in (early, cut):
        assert np.array_equal(pt.encode(t, True), tokenizer.encode_array(t))
    assert pt.full == 1 and pt.reused == 6


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seam=st.text(min_size=0, max_size=40), a=st.text(min_size=0, max_size=300),
       b=st.text(min_size=0, max_size=300), seed=st.integers(0, 10**6))
def test_any_two_texts_after_a_shared_start_give_their_full_encodes(tokenizer, seam, a, b, seed):
    rng = random.Random(seed)
    pt = PrefixTokens(tokenizer)
    base = _text(rng, MIN_CHARS + 600) + seam
    for text in (base + a, base + b):
        for special in (True, False):
            assert np.array_equal(pt.encode(text, special), tokenizer.encode_array(text, add_special_tokens=special))


def test_texts_nothing_extends_never_pay_for_token_offsets(tokenizer):
    """Offsets (the costly part of an encode with starts) are computed for a stored text only once a later one
    shares at least half of itself with it; unrelated texts with a common head never compute them."""
    calls: list[int] = []

    class Counting(HFTokenizer):
        def encode_with_starts(self, text, add_special_tokens=True):
            calls.append(len(text))
            return super().encode_with_starts(text, add_special_tokens)

    counting = Counting.__new__(Counting)
    counting.__dict__.update(tokenizer.__dict__)
    rng = random.Random(4)
    pt = PrefixTokens(counting)
    head = "You are a helpful assistant. " * 40  # 1,160 characters: every text has this head
    for i in range(5):
        text = head + f" document {i}: " + _text(rng, MIN_CHARS)
        assert np.array_equal(pt.encode(text, True), tokenizer.encode_array(text))
    assert calls == [] and pt.full == 5
    grown = text + " and a question about it?"
    assert np.array_equal(pt.encode(grown, True), tokenizer.encode_array(grown))
    assert len(calls) == 2 and calls[0] == len(text) and pt.reused == 1  # its offsets once, then the new tail
    again = grown + " another."
    assert np.array_equal(pt.encode(again, True), tokenizer.encode_array(again)) and len(calls) == 3


def test_bounded_by_entries_and_tokens(tokenizer):
    rng = random.Random(2)
    pt = PrefixTokens(tokenizer, max_entries=3, max_tokens=10**9)
    for i in range(7):
        pt.encode(f"doc {i} " + _text(rng, MIN_CHARS + 100), True)
    assert len(pt) == 3
    small = PrefixTokens(tokenizer, max_entries=100, max_tokens=1)
    small.encode(_text(rng, MIN_CHARS + 100), True)
    assert len(small) == 0 and small.tokens_held == 0
