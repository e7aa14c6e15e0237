"""Token ids of a prompt that shares its start with one tokenized before, by encoding only what follows.

A multi-turn conversation sends its whole history again with every turn: a 100K-token prompt that grew by
1K tokens since the last request. An agent or a RAG service sends the same long system prompt or document
before a different question every time. Byte-level BPE tokenizers (Llama 3, Qwen, GPT-style) split the text
into pre-tokens with a regex that looks ahead only a character or two, and merge bytes only inside a
pre-token. So where an earlier text has a pre-token boundary at character ``s``, well before the point ``L``
where the two texts part (the earlier text's end, when the new one extends it), the ids of the new text are the
earlier ids up to ``s`` followed by the ids of ``text[s:]`` encoded alone: everything the split at ``s`` and
the tokens before it depend on lies in the common part.

The boundary is checked, not assumed: ``s`` is the start of a token about ``TAIL_CHECK`` characters before
``L``, and the earlier text from ``s`` re-encoded alone must give exactly the earlier ids from there: all of
them when the new text extends the earlier one, else those of the tokens that start ``TAIL_CHECK / 2`` or
more characters before ``L`` (the ones at the parting are cut by it). Anything else (no earlier text starts
with the same ``HEAD_CHARS`` characters, the check fails, a short prompt) falls back to a full encode, so the
result is always what the tokenizer would produce for the whole text (tests hold this). A text seen before is
its stored ids. A text encoded whole is stored without its tokens' character offsets (~40 % of the encode's
cost); the first later text that shares at least half of itself with it pays for them, once.

Measured (the benchmark's byte-level BPE tokenizer, 2 cores; full encode -> this): one system prompt before 40
different questions, 15K characters 6.1 -> 2.6 ms a prompt, 25K 13.5 -> 2.5 ms, 118K 81.7 -> 7.4 ms; 40
unrelated 15K-character prompts 5.6 -> 5.8 ms (the head's hash and the table).

Bounded: at most ``max_entries`` texts and ``max_tokens`` token ids are kept, least recently used first out.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import xxhash

from engine.tokens.tokenizer import HFTokenizer

HEAD_CHARS = 1024  # texts are grouped by their first characters: a prefix shares them
TAIL_CHECK = 512  # the re-encoded overlap before the earlier text's end that proves a boundary
MIN_CHARS = 4_096  # shorter prompts are cheap to encode whole
SCAN = 8  # the most recent texts of a head whose common start with a new text is measured (any extends it: all)


@dataclass(slots=True)
class _Encoded:
    text: str
    special: bool
    ids: np.ndarray  # uint32
    # int64: the character offset where each token starts. None until a later text first shares a long start with
    # this one: a text encoded whole is encoded without its offsets, which cost ~40 % more than the ids (the
    # tokenizer's Python list of offset pairs), so a text nothing extends never pays for them.
    starts: np.ndarray | None


class PrefixTokens:
    """Encode ``text`` reusing the ids of the earlier text that shares the longest start with it (module doc)."""

    def __init__(self, tokenizer: HFTokenizer, max_entries: int = 64, max_tokens: int = 8_000_000) -> None:
        self.tokenizer = tokenizer
        self.max_entries = max_entries
        self.max_tokens = max_tokens
        self._entries: OrderedDict[int, _Encoded] = OrderedDict()  # id(entry) -> entry, LRU order
        self._by_head: dict[tuple[bool, bytes], list[_Encoded]] = {}
        self._tokens = 0
        self._lock = threading.Lock()  # encodes run in worker threads: the tables change under it only
        self.reused = 0  # encodes that reused an earlier prefix
        self.full = 0  # encodes of the whole text

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def tokens_held(self) -> int:
        return self._tokens

    def encode(self, text: str, special: bool) -> np.ndarray:
        if len(text) < MIN_CHARS:
            return self.tokenizer.encode_array(text, add_special_tokens=special)
        head = (special, xxhash.xxh3_64_digest(text[:HEAD_CHARS].encode("utf-8", "surrogatepass")))
        with self._lock:
            # an entry's text and ids never change once stored; its starts only once, from None (_extend)
            candidates = list(self._by_head.get(head, ()))
        best, shared = _longest_shared(text, candidates)
        if best is not None and shared == len(text) == len(best.text):
            self.reused += 1
            with self._lock:
                if id(best) in self._entries:
                    self._entries.move_to_end(id(best))
            return best.ids
        got = self._extend(text, special, best, shared) if best is not None else None
        starts: np.ndarray | None
        if got is None:
            ids, starts = self.tokenizer.encode_array(text, add_special_tokens=special), None
            self.full += 1
        else:
            ids, starts = got
            self.reused += 1
        ids.setflags(write=False)
        with self._lock:
            self._store(head, _Encoded(text, special, ids, starts))
        return ids

    def _extend(self, text: str, special: bool, best: _Encoded, shared: int) -> tuple[np.ndarray, np.ndarray] | None:
        """``text``'s ids and starts from ``best``'s up to a checked boundary before ``shared`` (module doc)."""
        if shared < 2 * TAIL_CHECK:  # only on a collision of the head's hash: a shared head is 2 x TAIL_CHECK
            return None
        starts = best.starts
        if starts is None:  # the first text to share its start: its offsets, once, if enough is shared to pay
            if 2 * shared < len(text):
                return None
            ids, starts = self.tokenizer.encode_with_starts(best.text, add_special_tokens=special)
            if not np.array_equal(ids, best.ids):
                return None
            starts.setflags(write=False)
            best.starts = starts  # None -> the offsets, once (readers see one or the other, both valid)
        k = int(np.searchsorted(starts, shared - TAIL_CHECK))
        if k <= (1 if special else 0) or k >= best.ids.size:
            return None
        cut = int(starts[k])
        if shared == len(best.text):  # the new text extends the earlier one: its whole tail must re-encode the same
            tail = self.tokenizer.encode_array(best.text[cut:], add_special_tokens=False)
            if not np.array_equal(tail, best.ids[k:]):
                return None  # not a clean boundary (a pre-token spans it): encode the whole text
        else:  # they part at `shared`: the tokens well before it must re-encode the same
            end = int(np.searchsorted(starts, shared - TAIL_CHECK // 2))
            tail = self.tokenizer.encode_array(best.text[cut:shared], add_special_tokens=False)
            if end <= k or tail.size < end - k or not np.array_equal(tail[:end - k], best.ids[k:end]):
                return None
        new_ids, new_starts = self.tokenizer.encode_with_starts(text[cut:], add_special_tokens=False)
        return (np.concatenate((best.ids[:k], new_ids)), np.concatenate((starts[:k], new_starts + cut)))

    def _store(self, head: tuple[bool, bytes], entry: _Encoded) -> None:
        group = self._by_head.setdefault(head, [])
        group.insert(0, entry)
        self._entries[id(entry)] = entry
        self._tokens += entry.ids.size
        while len(self._entries) > self.max_entries or self._tokens > self.max_tokens:
            _, old = self._entries.popitem(last=False)
            self._tokens -= old.ids.size
            key = (old.special, xxhash.xxh3_64_digest(old.text[:HEAD_CHARS].encode("utf-8", "surrogatepass")))
            members = self._by_head.get(key)
            if members is not None:
                members.remove(old)
                if not members:
                    del self._by_head[key]


def _shared_chars(a: str, b: str) -> int:
    """Length of the longest common prefix of ``a`` and ``b`` (binary search over slice equality, compared in C)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _longest_shared(text: str, candidates: list[_Encoded]) -> tuple[_Encoded | None, int]:
    """The candidate (most recent first) sharing the longest start with ``text`` and how many characters it
    shares: the longest that ``text`` extends whole (or equals), any of them (a C comparison each); else the
    longest common start among the ``SCAN`` most recent (a binary search of slices each)."""
    best: _Encoded | None = None
    most = 0
    for e in candidates:
        if len(e.text) > most and text.startswith(e.text):
            best, most = e, len(e.text)
    if best is not None:
        return best, most
    for e in candidates[:SCAN]:
        n = _shared_chars(e.text, text)
        if n > most:
            best, most = e, n
    return best, most


__all__ = ["PrefixTokens"]
