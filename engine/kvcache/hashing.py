"""Chained block hashes over token ids, as vLLM's prefix cache identifies blocks.

Block i of a prompt is named by ``h_i = xxh3_64(token_ids of block i, seed=h_{i-1})`` with
``h_{-1} = ROOT_HASH``: a block's hash names its whole prefix, so two prompts share block i exactly when
they share every token up to the end of block i. Only full blocks get a hash (vLLM caches only full
blocks). The picker hashes requests with this function and hashes the ``token_ids`` of vLLM's
``BlockStored`` events with it too, so the two meet without knowing vLLM's own (seeded sha256) hashes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xxhash

ROOT_HASH = 0x6B76737769746368  # "kvswitch": the parent of a prompt's first block

_xxh3 = xxhash.xxh3_64_intdigest
_xxh3_128 = xxhash.xxh3_128_intdigest

# Memo of whole chunks of blocks: xxh3_128(chunk bytes, seed=parent ^ block_size) -> the chunk's chained
# block hashes. Prompts share long prefixes (system prompts, conversation history, few-shot examples), and
# one 128-bit hash of 16 blocks costs about what two per-block calls cost, so a shared prefix is hashed
# several times faster with the same results (the key names parent, block size and content; a wrong hit
# needs a 128-bit collision). Bounded: at most MEMO_CHUNKS chunks (~0.8 KB each); when full it is cleared
# at once (cheaper per miss than keeping an LRU order; hot prefixes come back after one miss).
# Unique traffic gains nothing and pays ~1.7 us per chunk (key hash, insert, retention), so while the hit
# rate of the last MEMO_WINDOW chunk lookups is below MEMO_MIN_HIT_RATE only 1 prompt in MEMO_PROBE_EVERY
# goes through the memo (to notice when sharing returns); the rest are hashed block by block. The state is
# per process; results never depend on it (only speed), so unsynchronised updates are harmless.
MEMO_BLOCKS = 16
MEMO_CHUNKS = 8192
MEMO_WINDOW = 512
MEMO_MIN_HIT_RATE = 0.4
MEMO_PROBE_EVERY = 16
_memo: dict[int, list[int]] = {}
_memo_state = {"lookups": 0, "hits": 0, "on": True, "skipped": 0}


def _as_u32(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.dtype != np.uint32:
        arr = arr.astype(np.uint32)
    return np.ascontiguousarray(arr)


def chain_hash(parent: int, block_tokens: Sequence[int] | np.ndarray) -> int:
    """The hash of one full block whose prefix hashes to ``parent``."""
    return _xxh3(_as_u32(block_tokens).tobytes(), seed=parent)


def hash_blocks(
    tokens: Sequence[int] | np.ndarray, block_size: int, parent: int = ROOT_HASH, limit: int | None = None
) -> list[int]:
    """Hashes of every full block of ``tokens`` (at most ``limit``), chained from ``parent``."""
    mv, step, n = _full_blocks(tokens, block_size, limit)
    if n < MEMO_BLOCKS:
        return _chain(mv, step, 0, n, parent)
    st = _memo_state
    if not st["on"]:
        st["skipped"] += 1
        if st["skipped"] < MEMO_PROBE_EVERY:
            return _chain(mv, step, 0, n, parent)
        st["skipped"] = 0
    out: list[int] = []
    h = parent
    chunk = MEMO_BLOCKS * step
    memo = _memo
    full = n - n % MEMO_BLOCKS
    hits = 0
    for start in range(0, full * step, chunk):
        key = _xxh3_128(mv[start : start + chunk], h ^ block_size)
        got = memo.get(key)
        if got is not None:
            hits += 1
        else:
            got = _chain(mv, step, start // step, MEMO_BLOCKS, h)
            if len(memo) >= MEMO_CHUNKS:
                memo.clear()
            memo[key] = got  # never mutated: callers get copies through extend
        out += got
        h = got[-1]
    if full < n:
        out += _chain(mv, step, full, n - full, h)
    _memo_account(full // MEMO_BLOCKS, hits)
    return out


def _memo_account(lookups: int, hits: int) -> None:
    """Count chunk lookups; at the end of each window decide whether the memo pays for itself."""
    st = _memo_state
    st["lookups"] += lookups
    st["hits"] += hits
    if st["lookups"] >= MEMO_WINDOW:
        st["on"] = st["hits"] >= MEMO_MIN_HIT_RATE * st["lookups"]
        st["lookups"] = st["hits"] = 0


def hash_blocks_unshared(
    tokens: Sequence[int] | np.ndarray, block_size: int, parent: int = ROOT_HASH, limit: int | None = None
) -> list[int]:
    """``hash_blocks`` without the chunk memo, for inputs that will not recur in the same alignment (the
    blocks of KV events): they would only evict prompt chunks and drag the memo's hit rate down."""
    mv, step, n = _full_blocks(tokens, block_size, limit)
    return _chain(mv, step, 0, n, parent)


def _full_blocks(tokens: Sequence[int] | np.ndarray, block_size: int, limit: int | None) -> tuple[memoryview, int, int]:
    """The tokens as bytes, the bytes per block and how many full blocks to hash (at most ``limit``)."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    buf = _as_u32(tokens).tobytes()
    step = 4 * block_size
    n = len(buf) // step
    if limit is not None:
        n = min(n, limit)
    return memoryview(buf), step, n


def _chain(mv: memoryview, step: int, first: int, count: int, parent: int) -> list[int]:
    """Chained hashes of ``count`` blocks starting at block ``first`` (the reference definition)."""
    out = [0] * count
    h = parent
    base = first * step
    for i in range(count):
        h = _xxh3(mv[base + i * step : base + (i + 1) * step], h)
        out[i] = h
    return out
