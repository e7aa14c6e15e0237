"""Chained block hashes over token ids, as vLLM's prefix cache identifies blocks.

Block i of a prompt is named by ``h_i = xxh3_64(token_ids of block i, seed=h_{i-1})`` with
``h_{-1} = ROOT_HASH``: a block's hash names its whole prefix, so two prompts share block i exactly when
they share every token up to the end of block i. Only full blocks get a hash (vLLM caches only full
blocks). The picker hashes requests with this function and hashes the ``token_ids`` of vLLM's
``BlockStored`` events with it too, so the two meet without knowing vLLM's own (seeded sha256) hashes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import xxhash

ROOT_HASH = 0x6B76737769746368  # "kvswitch": the parent of a prompt's first block

_xxh3 = xxhash.xxh3_64_intdigest


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
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    buf = _as_u32(tokens).tobytes()
    step = 4 * block_size
    n = len(buf) // step
    if limit is not None:
        n = min(n, limit)
    out = [0] * n
    h = parent
    mv = memoryview(buf)
    for i in range(n):
        h = _xxh3(mv[i * step : (i + 1) * step], seed=h)
        out[i] = h
    return out
