"""Own block hash -> index row: an open-addressing table over two flat arrays, its loops compiled with numba.

Why not a dict: the prefix index looks up, inserts and deletes every block of every prompt and KV event. A
Python dict with hundreds of thousands of int keys pays several cache misses per operation (its index, the
entry, the key object it compares), ~0.3-0.4 us each at that size, plus the interpreter around every call; a
probe here reads one slot of two flat arrays, and a whole request's blocks go through one compiled call.

Layout: ``keys[cap]`` (uint64) and ``rows[cap]`` (int64, ``EMPTY`` = -1), ``cap`` a power of two, load kept at
most 1/2 by doubling. A key's home slot is its Fibonacci hash (multiply by 2^64/phi, keep the top bits), so
any keys spread (tests use small consecutive ints). Linear probing; a deletion shifts the later entries of its
probe run back (no tombstones), so a lookup ends at the first empty slot and the table never degrades.

Invariants: a key appears at most once; every live entry is reachable from its home slot without crossing an
empty slot. Callers insert only keys that are absent (``insert_new`` resolves repeats within one call itself).

The kernels are compiled on first use and cached on disk (``cache=True``, next to this file or in
``NUMBA_CACHE_DIR``): a fresh process loads them instead of compiling.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit

EMPTY = -1


@njit(cache=True, nogil=True)
def _home(key, shift):  # type: ignore[no-untyped-def]
    return np.int64((np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(shift))


@njit(cache=True, nogil=True)
def _find(tk, tr, mask, shift, key):  # type: ignore[no-untyped-def]
    j = _home(key, shift)
    while True:
        r = tr[j]
        if r == EMPTY:
            return -1
        if tk[j] == key:
            return r
        j = (j + 1) & mask


@njit(cache=True, nogil=True)
def _lookup(tk, tr, mask, shift, q, out):  # type: ignore[no-untyped-def]
    for i in range(q.size):
        out[i] = _find(tk, tr, mask, shift, q[i])


@njit(cache=True, nogil=True)
def _prefix(tk, tr, mask, shift, q, out):  # type: ignore[no-untyped-def]
    for i in range(q.size):
        r = _find(tk, tr, mask, shift, q[i])
        if r < 0:
            return i
        out[i] = r
    return q.size


@njit(cache=True, nogil=True)
def _put(tk, tr, mask, shift, key, row):  # type: ignore[no-untyped-def]
    """Insert ``key`` -> ``row`` unless present; returns the row the key maps to afterwards."""
    j = _home(key, shift)
    while True:
        r = tr[j]
        if r == EMPTY:
            tk[j] = key
            tr[j] = row
            return row
        if tk[j] == key:
            return r
        j = (j + 1) & mask


@njit(cache=True, nogil=True)
def _insert_new(tk, tr, mask, shift, q, cand, out):  # type: ignore[no-untyped-def]
    """Absent keys ``q`` (repeats allowed) get the candidate rows ``cand`` in order, a repeat the row of its
    first occurrence; ``out[i]`` = the row of ``q[i]``. Returns how many candidates were used."""
    used = 0
    for i in range(q.size):
        r = _put(tk, tr, mask, shift, q[i], cand[used])
        if r == cand[used]:
            used += 1
        out[i] = r
    return used


@njit(cache=True, nogil=True)
def _delete_key(tk, tr, mask, shift, key):  # type: ignore[no-untyped-def]
    i = _home(key, shift)
    while True:
        if tr[i] == EMPTY:
            return 0
        if tk[i] == key:
            break
        i = (i + 1) & mask
    j = i
    while True:  # shift back the rest of the run: an entry moves unless its home lies in (i, j]
        j = (j + 1) & mask
        if tr[j] == EMPTY:
            break
        h = _home(tk[j], shift)
        if i <= j:
            stays = i < h and h <= j
        else:
            stays = i < h or h <= j
        if not stays:
            tk[i] = tk[j]
            tr[i] = tr[j]
            i = j
    tr[i] = EMPTY
    return 1


@njit(cache=True, nogil=True)
def _delete(tk, tr, mask, shift, q):  # type: ignore[no-untyped-def]
    gone = 0
    for n in range(q.size):
        gone += _delete_key(tk, tr, mask, shift, q[n])
    return gone


@njit(cache=True, nogil=True)
def _assign(  # type: ignore[no-untyped-def]
        tk, tr, mask, shift, q, start, cand, out, nout, rkeys, rstamp, tick, masks, medium, word, bit, mark, gen,
        dedupe):
    """The write half of ``BlockIndex.add_rows`` for ``q[start:]``, in one pass: each key's row (an absent key
    takes the next candidate row and enters the table and ``rkeys``), appended to ``out`` (only its first
    occurrence with ``dedupe``), stamped ``tick``, with the pod's bit set on ``medium``. Stops at a key that needs
    a candidate when none is left. Returns (next key, candidates used, rows in out, bits newly set)."""
    b = np.uint64(1) << np.uint64(bit)
    used = 0
    new = 0
    i = start
    while i < q.size:
        key = q[i]
        j = _home(key, shift)
        while True:
            r = tr[j]
            if r == EMPTY:
                if used == cand.size:
                    return i, used, nout, new
                r = cand[used]
                used += 1
                tk[j] = key
                tr[j] = r
                rkeys[r] = key
                break
            if tk[j] == key:
                break
            j = (j + 1) & mask
        i += 1
        if dedupe:
            if mark[r] == gen:
                continue
            mark[r] = gen
        out[nout] = r
        nout += 1
        rstamp[r] = tick
        w = masks[r, medium, word]
        if w & b == 0:
            new += 1
            masks[r, medium, word] = w | b
    return i, used, nout, new


@njit(cache=True, nogil=True)
def _clear_rows(rows, n, masks, medium, word, bit, tk, tr, mask, shift, rkeys, rstamp, freed):  # type: ignore[no-untyped-def]
    """Clear the pod's bit on ``medium`` in the distinct ``rows[:n]``; a row left without any bit is released
    (its key leaves the table, key and stamp 0) and listed in ``freed``, in order. Returns (bits cleared, freed)."""
    b = np.uint64(1) << np.uint64(bit)
    held = 0
    nf = 0
    for t in range(n):
        r = rows[t]
        w = masks[r, medium, word]
        if w & b == 0:
            continue
        held += 1
        w = w & ~b
        masks[r, medium, word] = w
        if w != 0:
            continue
        empty = True
        for a in range(masks.shape[1]):
            for c in range(masks.shape[2]):
                if masks[r, a, c] != 0:
                    empty = False
        if empty:
            _delete_key(tk, tr, mask, shift, rkeys[r])
            rkeys[r] = 0
            rstamp[r] = 0
            freed[nf] = r
            nf += 1
    return held, nf


@njit(cache=True, nogil=True)
def _rows_of_keys(tk, tr, mask, shift, q, mark, gen, dedupe):  # type: ignore[no-untyped-def]
    """Rows of the keys of ``q`` that are present, in order (first occurrences only with ``dedupe``)."""
    out = np.empty(q.size, dtype=np.int64)
    n = 0
    for i in range(q.size):
        r = _find(tk, tr, mask, shift, q[i])
        if r < 0:
            continue
        if dedupe:
            if mark[r] == gen:
                continue
            mark[r] = gen
        out[n] = r
        n += 1
    return out[:n]


@njit(cache=True, nogil=True)
def _rows_with_bit(masks, hi, word, bit):  # type: ignore[no-untyped-def]
    """Rows below ``hi`` where the pod's bit is set on any medium, ascending."""
    b = np.uint64(1) << np.uint64(bit)
    out = np.empty(hi, dtype=np.int64)
    n = 0
    for r in range(hi):
        for a in range(masks.shape[1]):
            if masks[r, a, word] & b:
                out[n] = r
                n += 1
                break
    return out[:n]


@njit(cache=True, nogil=True)
def _prefix_match(tk, tr, mask, shift, q, masks, stamp, tick, rows, blocks):  # type: ignore[no-untyped-def]
    """The leading keys of ``q`` present (their rows into ``rows``, stamped ``tick`` when ``tick`` > 0) up to the
    first absent one, and per pod bit the count of leading rows that pod holds on any medium (into ``blocks``,
    zeroed by the caller): a pod's count ends at the first row it lacks. Returns the number of rows."""
    media, words = masks.shape[1], masks.shape[2]
    cum = np.empty(words, dtype=np.uint64)
    n = 0
    for i in range(q.size):
        r = _find(tk, tr, mask, shift, q[i])
        if r < 0:
            break
        rows[n] = r
        n += 1
        if tick > 0:
            stamp[r] = tick
        for w in range(words):
            held = masks[r, 0, w]
            for m in range(1, media):
                held |= masks[r, m, w]
            prev = held if i == 0 else cum[w]
            now = prev & held
            _record_lengths(prev & ~now, w, i, blocks)  # pods that held rows 0..i-1 and not row i: i rows
            cum[w] = now
    if n > 0:
        for w in range(words):  # pods holding every row found
            _record_lengths(cum[w], w, n, blocks)
    return n


@njit(cache=True, nogil=True)
def _record_lengths(bits, word, length, blocks):  # type: ignore[no-untyped-def]
    """``blocks[pod] = length`` for every pod bit set in ``bits`` (word ``word`` of the pod masks)."""
    while bits:
        low = bits & (~bits + np.uint64(1))
        bit = 0
        while (low >> np.uint64(bit)) != np.uint64(1):
            bit += 1
        blocks[word * 64 + bit] = length
        bits ^= low


@njit(cache=True, nogil=True)
def _distinct(rows, mark, gen):  # type: ignore[no-untyped-def]
    """``rows`` without repeats, first occurrences in order (``mark``: scratch per row, ``gen`` unused in it)."""
    out = np.empty(rows.size, dtype=np.int64)
    n = 0
    for r in rows:
        if mark[r] != gen:
            mark[r] = gen
            out[n] = r
            n += 1
    return out[:n]


class RowTable:
    """uint64 key -> row (>= 0); see the module docstring."""

    def __init__(self, capacity: int = 1 << 15) -> None:
        bits = max(4, int(capacity - 1).bit_length())
        self._alloc_arrays(bits)
        self._size = 0

    def _alloc_arrays(self, bits: int) -> None:
        self._bits = bits
        self._mask = (1 << bits) - 1
        self._shift = 64 - bits  # a plain int: numba types it on its fast path (a numpy scalar takes the slow one)
        self._keys = np.zeros(1 << bits, dtype=np.uint64)
        self._rows = np.full(1 << bits, EMPTY, dtype=np.int64)

    def __len__(self) -> int:
        return self._size

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._rows.nbytes

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """The row of each key, -1 where absent."""
        out = np.empty(keys.size, dtype=np.int64)
        _lookup(self._keys, self._rows, self._mask, self._shift, keys, out)
        return out

    def prefix(self, keys: np.ndarray) -> np.ndarray:
        """Rows of the leading ``keys`` present, up to the first absent one."""
        out = np.empty(keys.size, dtype=np.int64)
        n = _prefix(self._keys, self._rows, self._mask, self._shift, keys, out)
        return out[:n]

    def prefix_match(self, keys: np.ndarray, masks: np.ndarray, stamp: np.ndarray, tick: int
                     ) -> tuple[np.ndarray, np.ndarray]:
        """``prefix`` and, in the same compiled walk, per pod bit of ``masks`` (rows x media x words) how many
        leading rows that pod holds on any medium; stamps the rows found with ``tick`` (0: no stamp). Returns
        (rows, blocks per pod bit)."""
        rows = np.empty(keys.size, dtype=np.int64)
        blocks = np.zeros(masks.shape[2] * 64, dtype=np.int64)
        n = _prefix_match(self._keys, self._rows, self._mask, self._shift, keys, masks, stamp, np.uint64(tick),
                          rows, blocks)
        return rows[:n], blocks

    def get(self, key: int) -> int | None:
        r = int(_find(self._keys, self._rows, self._mask, self._shift, np.uint64(key)))
        return None if r < 0 else r

    def insert_new(self, keys: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, int]:
        """Absent ``keys`` (repeats allowed) take ``candidates`` (at least as many as keys) in order, a repeat the
        row of its first occurrence. Returns (row of each key, candidates used)."""
        self._reserve(keys.size)
        out = np.empty(keys.size, dtype=np.int64)
        used = int(_insert_new(self._keys, self._rows, self._mask, self._shift, keys, candidates, out))
        self._size += used
        return out, used

    def delete(self, keys: np.ndarray) -> int:
        gone = int(_delete(self._keys, self._rows, self._mask, self._shift, keys))
        self._size -= gone
        return gone

    def arrays(self) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(keys, rows, mask, shift) for compiled callers (``find``/``put``/``delete_key``), which must not insert
        past the reserved room and report their net insertions through ``adjust``."""
        return self._keys, self._rows, self._mask, self._shift

    def adjust(self, delta: int) -> None:
        self._size += delta

    def assign(self, q: np.ndarray, start: int, cand: np.ndarray, out: np.ndarray, nout: int, rkeys: np.ndarray,
               rstamp: np.ndarray, tick: int, masks: np.ndarray, medium: int, word: int, bit: int,
               mark: np.ndarray, gen: int, dedupe: bool) -> tuple[int, int, int, int]:
        """``_assign`` (the write half of ``BlockIndex.add_rows``); call ``reserve`` for the keys first."""
        i, used, nout, new = _assign(self._keys, self._rows, self._mask, self._shift, q, start, cand, out, nout,
                                     rkeys, rstamp, tick, masks, medium, word, bit, mark, gen, dedupe)
        self._size += used
        return int(i), int(used), int(nout), int(new)

    def clear_rows(self, rows: np.ndarray, masks: np.ndarray, medium: int, word: int, bit: int,
                   rkeys: np.ndarray, rstamp: np.ndarray) -> tuple[int, np.ndarray]:
        """``_clear_rows`` over the distinct ``rows``: (bits cleared, rows released, in order)."""
        freed = np.empty(rows.size, dtype=np.int64)
        held, nf = _clear_rows(rows, rows.size, masks, medium, word, bit, self._keys, self._rows, self._mask,
                               self._shift, rkeys, rstamp, freed)
        self._size -= nf
        return int(held), freed[:nf]

    def rows_of(self, q: np.ndarray, mark: np.ndarray, gen: int, dedupe: bool) -> np.ndarray:
        """Rows of the present keys of ``q``, in order (first occurrences only with ``dedupe``)."""
        return _rows_of_keys(self._keys, self._rows, self._mask, self._shift, q, mark, gen, dedupe)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, rows) of every entry, in slot order."""
        live = self._rows != EMPTY
        return self._keys[live], self._rows[live]

    def clear(self) -> None:
        self._rows[:] = EMPTY
        self._size = 0

    def reserve(self, more: int) -> None:
        """Room for ``more`` new keys at a load of at most 1/2."""
        self._reserve(more)

    def _reserve(self, more: int) -> None:
        need = self._size + more
        if 2 * need <= self._mask + 1:
            return
        bits = self._bits
        while 2 * need > 1 << bits:
            bits += 1
        keys, rows = self.items()
        self._alloc_arrays(bits)
        out = np.empty(keys.size, dtype=np.int64)
        _insert_new(self._keys, self._rows, self._mask, self._shift, keys, rows, out)


def rows_with_bit(masks: np.ndarray, hi: int, word: int, bit: int) -> np.ndarray:
    """Rows below ``hi`` where bit ``bit`` of word ``word`` is set on any medium, ascending."""
    return _rows_with_bit(masks, hi, word, bit)


def distinct_rows(rows: np.ndarray, mark: np.ndarray, gen: int) -> np.ndarray:
    """``rows`` without repeats (first occurrences, in order); ``mark`` is a scratch array over rows whose entries
    never equal ``gen`` before the call (callers use a fresh generation each time)."""
    return _distinct(rows, mark, np.int64(gen))


_last: tuple[object, np.ndarray] = (None, np.empty(0, dtype=np.uint64))  # the last list converted, its array


def as_keys(hashes: Sequence[int] | np.ndarray) -> np.ndarray:
    """Block hashes as a uint64 array. A request's hash list goes to both indexes several times (lookups,
    learning, pending blocks): the last list converted is remembered by identity (one tuple, replaced whole, so
    threads never see a list paired with another list's array), checked against its length and end elements
    (hash lists are never changed in place once made)."""
    global _last
    if isinstance(hashes, np.ndarray):
        return hashes if hashes.dtype == np.uint64 else hashes.astype(np.uint64)
    last, arr = _last
    n = len(hashes)
    if hashes is last and n == arr.size and n and hashes[0] == int(arr[0]) and hashes[-1] == int(arr[-1]):
        return arr
    arr = np.array(hashes, dtype=np.uint64) if n else np.empty(0, dtype=np.uint64)
    if isinstance(hashes, list):
        _last = (hashes, arr)
    return arr


find = _find  # compiled helpers over ``RowTable.arrays()``, for other kernels
put = _put
delete_key = _delete_key

__all__ = ["EMPTY", "RowTable", "as_keys", "delete_key", "distinct_rows", "find", "put", "rows_with_bit"]
