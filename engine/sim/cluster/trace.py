"""Trace input for the cluster simulator: Mooncake JSONL turned into token-level requests.

Why token ids and not just lengths: the engine model finds prefix hits by hashing real token ids, and
the precise picker indexes the same hashes, so two requests that share Mooncake ``hash_ids`` must share
real tokens. Each hash id becomes a fixed 512-token block derived from the id alone (the same id always
gives the same tokens, whatever its position), the blocks are concatenated and cut to ``input_length``.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MOONCAKE_BLOCK = 512
DEFAULT_VOCAB = 32000

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


class BlockTokens:
    """Hash id -> its fixed block of token ids; an LRU of at most ``max_blocks`` blocks."""

    def __init__(self, block: int = MOONCAKE_BLOCK, vocab: int = DEFAULT_VOCAB, max_blocks: int = 16384,
                 salt: int = 0) -> None:
        if block <= 0 or vocab <= 1 or max_blocks <= 0:
            raise ValueError("block, vocab and max_blocks must be positive")
        self.block = block
        self.vocab = vocab
        self.max_blocks = max_blocks
        self._salt = np.uint64(salt & 0xFFFFFFFF)
        self._offsets = np.arange(block, dtype=np.uint64)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, hash_id: int) -> np.ndarray:
        cache = self._cache
        arr = cache.get(hash_id)
        if arr is not None:
            cache.move_to_end(hash_id)
            return arr
        base = (np.uint64(hash_id & 0xFFFFFFFFFFFF) << np.uint64(20)) ^ (self._salt << np.uint64(10))
        arr = (_splitmix(base + self._offsets) % np.uint64(self.vocab)).astype(np.uint32)
        arr.setflags(write=False)
        cache[hash_id] = arr
        if len(cache) > self.max_blocks:
            cache.popitem(last=False)
        return arr

    def prompt(self, hash_ids: Iterable[int], length: int, unique: int) -> np.ndarray:
        """The prompt for ``hash_ids`` cut to ``length``; tokens past the last id come from ``unique``."""
        ids = list(hash_ids)
        have = len(ids) * self.block
        if have < length:  # a trace line with fewer ids than tokens: pad with request-unique blocks
            extra = -(-(length - have) // self.block)
            ids.extend(-(unique * 1_000 + i) - 1 for i in range(extra))
        if not ids:
            raise ValueError("a request needs input_length > 0")
        need = -(-length // self.block) if length > 0 else len(ids)
        ids = ids[:need]  # blocks past the cut are never read
        cache = self._cache
        missing = [h for h in dict.fromkeys(ids) if h not in cache]
        if len(missing) > 1:  # one vectorised splitmix for every new block, then the LRU as get() keeps it
            base = np.array([h & 0xFFFFFFFFFFFF for h in missing], dtype=np.uint64) << np.uint64(20)
            base ^= self._salt << np.uint64(10)
            blocks = (_splitmix(base[:, None] + self._offsets[None, :]) % np.uint64(self.vocab)).astype(np.uint32)
            for h, row in zip(missing, blocks):
                arr = row.copy()  # its own buffer: a cached row must not keep the whole batch alive
                arr.setflags(write=False)
                cache[h] = arr
                if len(cache) > self.max_blocks:
                    cache.popitem(last=False)
        return np.concatenate([self.get(h) for h in ids])[:length]


@dataclass(slots=True)
class TraceRequest:
    """One trace line: arrival in simulated seconds, prompt length, output length, Mooncake block ids."""

    index: int
    arrival: float
    input_length: int
    output_length: int
    hash_ids: list[int]


def parse_mooncake_line(line: str, index: int) -> TraceRequest:
    try:
        obj = json.loads(line)
        ts = float(obj["timestamp"])
        n_in = int(obj["input_length"])
        n_out = int(obj["output_length"])
        ids = [int(h) for h in obj.get("hash_ids", [])]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"trace line {index + 1}: not a Mooncake record ({exc})") from None
    if n_in <= 0 or n_out <= 0 or ts < 0:
        raise ValueError(f"trace line {index + 1}: input_length and output_length must be positive, "
                         f"timestamp non-negative")
    return TraceRequest(index, ts / 1000.0, n_in, n_out, ids)


def read_mooncake(
    path: str | Path, speedup: float = 1.0, max_requests: int | None = None, duration: float | None = None,
) -> list[TraceRequest]:
    """Requests of a Mooncake JSONL file sorted by arrival; arrivals divided by ``speedup``, made relative
    to the first one, and cut after ``max_requests`` or past ``duration`` simulated seconds."""
    if speedup <= 0:
        raise ValueError("speedup must be positive")
    out: list[TraceRequest] = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if line.strip():
                out.append(parse_mooncake_line(line, i))
    return shape_trace(out, speedup, max_requests, duration)


def shape_trace(
    reqs: list[TraceRequest], speedup: float = 1.0, max_requests: int | None = None,
    duration: float | None = None,
) -> list[TraceRequest]:
    reqs = sorted(reqs, key=lambda r: (r.arrival, r.index))
    if reqs:
        t0 = reqs[0].arrival
        for r in reqs:
            r.arrival = (r.arrival - t0) / speedup
    if duration is not None:
        reqs = [r for r in reqs if r.arrival <= duration]
    if max_requests is not None:
        reqs = reqs[:max_requests]
    return reqs


def iter_prompts(reqs: list[TraceRequest], blocks: BlockTokens) -> Iterator[tuple[TraceRequest, np.ndarray]]:
    for r in reqs:
        yield r, blocks.prompt(r.hash_ids, r.input_length, r.index)


__all__ = ["BlockTokens", "MOONCAKE_BLOCK", "TraceRequest", "iter_prompts", "parse_mooncake_line",
           "read_mooncake", "shape_trace"]
