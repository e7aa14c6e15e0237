"""Chained block hashes over token ids, as vLLM's prefix cache identifies blocks.

Block i of a prompt is named by ``h_i = xxh3_64(token_ids of block i, seed=h_{i-1})`` with
``h_{-1} = ROOT_HASH``: a block's hash names its whole prefix, so two prompts share block i exactly when
they share every token up to the end of block i. Only full blocks get a hash (vLLM caches only full
blocks). The picker hashes requests with this function and hashes the ``token_ids`` of vLLM's
``BlockStored`` events with it too, so the two meet without knowing vLLM's own (seeded sha256) hashes.

``chain_hash`` (one block) is the definition: the xxhash library's XXH3-64 over the block's u32 token ids
(little-endian bytes). ``hash_blocks`` chains a whole prompt in one compiled loop (numba, cached on disk): for
blocks of 4 to 128 bytes (block sizes 1-32 tokens, vLLM's usual 16 included) it computes XXH3-64 itself, the
short-input branches of the XXH3 specification (xxhash 0.8: ``XXH3_len_4to8_64b``, ``XXH3_len_9to16_64b``,
``XXH3_len_17to128_64b`` with the default secret and the seed), ~20x cheaper per block than a library call
from Python; larger blocks (the specification's 129-240 and long-input branches) go to the library block by
block. Tests hold both to the library on random tokens, seeds and block sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xxhash
from numba import njit

ROOT_HASH = 0x6B76737769746368  # "kvswitch": the parent of a prompt's first block

_xxh3 = xxhash.xxh3_64_intdigest

# The picker hashes (and indexes) at most this many blocks of one prompt: 256K tokens at block size 16, past
# every context length served today. It bounds per-request work and memory (an 8 MB prompt is ~2M tokens);
# a prompt longer than this matches on its first MAX_ROUTED_BLOCKS blocks only.
MAX_ROUTED_BLOCKS = 16384

MAX_COMPILED_BLOCK = 32  # tokens: 128 bytes, the last size of XXH3's 17-128 byte branch

# XXH3's default secret (kSecret), the 128 bytes the short-input branches read, as little-endian u32 words.
_SECRET = np.frombuffer(bytes([
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
]), dtype="<u4").copy()


@njit(cache=True, nogil=True)
def _rd64(a, k):  # type: ignore[no-untyped-def]
    """The little-endian 64-bit word at u32 index ``k`` of ``a``."""
    return np.uint64(a[k]) | (np.uint64(a[k + 1]) << np.uint64(32))


@njit(cache=True, nogil=True)
def _fold(a, b):  # type: ignore[no-untyped-def]
    """XXH3_mul128_fold64: the 128-bit product of a and b, its halves xored (portable 32-bit split)."""
    m = np.uint64(0xFFFFFFFF)
    s = np.uint64(32)
    al, ah, bl, bh = a & m, a >> s, b & m, b >> s
    ll, hl, lh, hh = al * bl, ah * bl, al * bh, ah * bh
    cross = (ll >> s) + (hl & m) + lh
    return ((cross << s) | (ll & m)) ^ ((hl >> s) + (cross >> s) + hh)


@njit(cache=True, nogil=True)
def _mix16(a, k, sec, sk, seed):  # type: ignore[no-untyped-def]
    return _fold(_rd64(a, k) ^ (_rd64(sec, sk) + seed), _rd64(a, k + 2) ^ (_rd64(sec, sk + 2) - seed))


@njit(cache=True, nogil=True)
def _avalanche(h):  # type: ignore[no-untyped-def]
    h ^= h >> np.uint64(37)
    h *= np.uint64(0x165667919E3779F9)
    return h ^ (h >> np.uint64(32))


@njit(cache=True, nogil=True)
def _rotl(x, r):  # type: ignore[no-untyped-def]
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


@njit(cache=True, nogil=True)
def _swap32(x):  # type: ignore[no-untyped-def]
    x = x & np.uint64(0xFFFFFFFF)
    return (((x & np.uint64(0xFF)) << np.uint64(24)) | ((x & np.uint64(0xFF00)) << np.uint64(8))
            | ((x >> np.uint64(8)) & np.uint64(0xFF00)) | (x >> np.uint64(24)))


@njit(cache=True, nogil=True)
def _swap64(x):  # type: ignore[no-untyped-def]
    return (_swap32(x) << np.uint64(32)) | _swap32(x >> np.uint64(32))


@njit(cache=True, nogil=True)
def _xxh3_short(a, base, nw, sec, seed):  # type: ignore[no-untyped-def]
    """XXH3-64 with ``seed`` of the ``nw`` u32 words ``a[base:base + nw]`` (1 <= nw <= 32: 4 to 128 bytes)."""
    ln = np.uint64(4 * nw)
    if nw <= 2:  # XXH3_len_4to8_64b
        seed = seed ^ (_swap32(seed) << np.uint64(32))
        h = (np.uint64(a[base + nw - 1]) + (np.uint64(a[base]) << np.uint64(32))) ^ (
            (_rd64(sec, 2) ^ _rd64(sec, 4)) - seed)
        h ^= _rotl(h, 49) ^ _rotl(h, 24)
        h *= np.uint64(0x9FB21C651E98DF25)
        h ^= (h >> np.uint64(35)) + ln
        h *= np.uint64(0x9FB21C651E98DF25)
        return h ^ (h >> np.uint64(28))
    if nw <= 4:  # XXH3_len_9to16_64b
        lo = _rd64(a, base) ^ ((_rd64(sec, 6) ^ _rd64(sec, 8)) + seed)
        hi = _rd64(a, base + nw - 2) ^ ((_rd64(sec, 10) ^ _rd64(sec, 12)) - seed)
        return _avalanche(ln + _swap64(lo) + hi + _fold(lo, hi))
    acc = ln * np.uint64(0x9E3779B185EBCA87)  # XXH3_len_17to128_64b
    e = base + nw
    if nw > 8:
        if nw > 16:
            if nw > 24:
                acc += _mix16(a, base + 12, sec, 24, seed)
                acc += _mix16(a, e - 16, sec, 28, seed)
            acc += _mix16(a, base + 8, sec, 16, seed)
            acc += _mix16(a, e - 12, sec, 20, seed)
        acc += _mix16(a, base + 4, sec, 8, seed)
        acc += _mix16(a, e - 8, sec, 12, seed)
    acc += _mix16(a, base, sec, 0, seed)
    acc += _mix16(a, e - 4, sec, 4, seed)
    return _avalanche(acc)


@njit(cache=True, nogil=True)
def _chain_compiled(a, bs, count, parent, sec):  # type: ignore[no-untyped-def]
    out = np.empty(count, dtype=np.uint64)
    h = parent
    for i in range(count):
        h = _xxh3_short(a, i * bs, bs, sec, h)
        out[i] = h
    return out


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
    return hash_block_keys(tokens, block_size, parent, limit).tolist()


def hash_block_keys(
    tokens: Sequence[int] | np.ndarray, block_size: int, parent: int = ROOT_HASH, limit: int | None = None
) -> np.ndarray:
    """``hash_blocks`` as a uint64 array: the form the block indexes look keys up in. A router keeps a prompt's
    hashes this way (a 50K-token prompt's 3K hashes cost ~20 us as a list and ~60 us more to turn back into
    an array for every index lookup)."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    arr = _as_u32(tokens)
    n = arr.size // block_size
    if limit is not None:
        n = min(n, limit)
    if n == 0:
        return np.empty(0, dtype=np.uint64)
    if block_size <= MAX_COMPILED_BLOCK:
        out: np.ndarray = _chain_compiled(arr, block_size, n, np.uint64(parent), _SECRET)
        return out
    mv, step = memoryview(arr.tobytes()), 4 * block_size
    keys = np.empty(n, dtype=np.uint64)
    h = parent
    for i, s in enumerate(range(0, n * step, step)):  # block by block through the library (the long branches)
        h = _xxh3(mv[s : s + step], h)
        keys[i] = h
    return keys


def warm_up() -> None:
    """Load (or compile, the first time on a machine) the compiled hash loop now rather than in the first
    request (see ``pickers.kvblocks.index.warm_up``)."""
    hash_blocks(np.zeros(2 * 16, dtype=np.uint32), 16)
