"""Which pods hold which KV blocks: a bounded index from our own block hash to a per-medium pod bitmask.

Layout (chosen for the decision hot path and for bytes per block):

- ``_slot_of``: a Python dict own-hash -> row. One ``dict.get`` per prompt block is the fastest lookup
  Python offers (~40 ns) and the walk stops at the first block no pod holds.
- numpy rows: ``_keys[row]`` (the hash, for eviction), ``_masks[row, medium, word]`` (bit ``p`` of word
  ``p // 64`` set when pod slot ``p`` holds the block on that medium) and ``_stamp[row]`` (last use, for LRU).

A prompt's per-pod hit is then a few vector operations: gather the masks of the matched rows, OR over media,
cumulative AND down the prompt (a pod's prefix ends at its first missing block), unpack the bits and count.

Bounds: at most ``max_blocks`` rows; when full, the least recently used 1/16 are evicted in one batch
(``argpartition`` over the stamps), so eviction costs O(rows) once per ``max_blocks/16`` inserts. An optional
per-pod cap (the approximate index: a pod cannot hold more than its KV capacity) evicts that pod's oldest
blocks the same way. Rows whose masks become empty are freed at once.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import cast

import numpy as np

assert sys.byteorder == "little", "bit unpacking below assumes a little-endian host"

_EVICT_FRACTION = 16
_CHUNK = 32  # blocks per entry of the chunk-row cache (16: ~5% slower decisions, 64: ~2% faster, coarser)
_CHUNK_CACHE = 8192  # entries (~1 KB each: 8 MiB, 256K blocks of hot prefixes); cleared when full
_FREE = 0  # stamp of a free row; live rows have stamps >= 1


def _prefix_lengths(cum: np.ndarray) -> np.ndarray:
    """Per pod bit: how many leading rows of the monotone (bits only clear) ``cum`` have it set.

    Only rows where some pod drops out are unpacked, so this costs a few vector operations however long
    the prompt is.
    """
    n, words = cum.shape
    dropped = cum[:-1] & ~cum[1:]  # bits that clear between row i and i+1: those pods matched i+1 rows
    at = np.flatnonzero(dropped.any(axis=1))
    out = np.unpackbits(cum[-1].view(np.uint8), bitorder="little").astype(np.int64) * n
    if at.size:
        bits = np.unpackbits(dropped[at].view(np.uint8), axis=1, bitorder="little")  # (k, pods)
        out = np.maximum(out, (bits * (at + 1)[:, None]).max(axis=0))
    # pods absent from the very first block match 0 rows: already 0
    return out


class BlockIndex:
    """Own block hash -> {medium: set of pod slots}, bounded, LRU-evicted, with per-pod counts."""

    def __init__(
        self,
        max_blocks: int,
        media: Sequence[str] = ("GPU",),
        weights: Sequence[float] | None = None,
        max_pods: int = 64,
        per_pod_cap: int | None = None,
        initial_rows: int = 1 << 14,
        hidden_media: int = 0,
    ) -> None:
        """``hidden_media``: the last that many media are the owner's own columns (the precise index's pending
        blocks): ``medium_index`` never maps a name, unknown or None, to them."""
        if max_blocks < 1:
            raise ValueError("max_blocks must be >= 1")
        self.max_blocks = int(max_blocks)
        self.media = list(media)
        self.weights = np.asarray(weights if weights is not None else [1.0] * len(self.media), dtype=np.float64)
        named = len(self.media) - hidden_media
        if named < 1:
            raise ValueError("at least one medium must be addressable by name")
        self._medium_ix = {m: i for i, m in enumerate(self.media[:named])}
        self.per_pod_cap = per_pod_cap
        self._words = max(1, -(-max_pods // 64))
        rows = min(self.max_blocks, initial_rows)
        self._slot_of: dict[int, int] = {}
        self._keys = np.zeros(rows, dtype=np.uint64)
        self._masks = np.zeros((rows, len(self.media), self._words), dtype=np.uint64)
        self._stamp = np.zeros(rows, dtype=np.uint64)
        self._next_row = 0  # rows below this have been used at least once
        self._free_rows: list[int] = []
        # Chunk-row cache: last hash of _CHUNK consecutive prompt blocks -> (their hashes, their rows as an array).
        # A hit skips _CHUNK dict lookups; rows are re-checked against _keys in one vector compare, so an entry
        # made stale by eviction or removal is never trusted (see _present_rows).
        self._chunks: dict[int, tuple[list[int], np.ndarray, np.ndarray, int]] = {}
        self._releases = 0  # bumped whenever rows are freed: entries younger than the last bump need no check
        self._tick = 1
        self.pod_counts = np.zeros((len(self.media), self._words * 64), dtype=np.int64)
        self.evictions = 0
        # Descending weight order, for weighting a pod's hit by the best medium holding each block.
        self._order = [int(i) for i in np.argsort(-self.weights, kind="stable")]
        self._fallback = [i for i in self._order if i < named][-1]  # lowest-weight named medium

    # ---- shape --------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._slot_of)

    @property
    def pod_slots(self) -> int:
        return self._words * 64

    def medium_index(self, medium: str | None) -> int:
        """The column of ``medium``; unknown media count as the lowest-weight one (never dropped)."""
        if medium is None:
            return 0
        ix = self._medium_ix.get(str(medium).upper())
        return ix if ix is not None else self._fallback

    def ensure_pods(self, n: int) -> None:
        """Widen the masks so that pod slots ``0..n-1`` fit."""
        words = -(-n // 64)
        if words <= self._words:
            return
        masks = np.zeros((self._masks.shape[0], len(self.media), words), dtype=np.uint64)
        masks[:, :, : self._words] = self._masks
        self._masks = masks
        counts = np.zeros((len(self.media), words * 64), dtype=np.int64)
        counts[:, : self.pod_counts.shape[1]] = self.pod_counts
        self.pod_counts = counts
        self._words = words

    def nbytes(self) -> int:
        """Approximate memory: numpy arrays plus the dict and its int objects (measured constants)."""
        arrays = self._keys.nbytes + self._masks.nbytes + self._stamp.nbytes
        # dict: ~1.5 slots of 8-byte index + 24-byte entry per key at typical fill; key int 40 B, row int 32 B.
        return arrays + int(len(self._slot_of) * (1.5 * 8 + 24 + 40 + 32)) + sys.getsizeof(self._free_rows)

    # ---- writes -------------------------------------------------------------------------------------
    def add(self, pod: int, hashes: Iterable[int], medium: int = 0, unique: bool = False) -> int:
        """Record that ``pod`` holds ``hashes`` on ``medium``; returns how many were new for that pod.
        ``unique=True`` skips the duplicate check (chained hashes of one prompt never repeat)."""
        return self.add_rows(pod, hashes, medium, unique)[0]

    def add_rows(self, pod: int, hashes: Iterable[int], medium: int = 0, unique: bool = False
                 ) -> tuple[int, np.ndarray]:
        """``add``, also returning the rows of the hashes: with ``unique``, row i holds ``hashes[i]`` (fewer
        rows than hashes only when the index is full), for a later ``remove_rows``."""
        self._tick += 1
        if unique and isinstance(hashes, list) and len(hashes) >= _CHUNK:
            head = self._present_rows(hashes)
            rest = self._rows_for(hashes[head.size:], True, head.tolist()) if head.size < len(hashes) else []
            r = np.concatenate([head, np.asarray(rest, dtype=np.intp)]) if rest else head
            if r.size == 0:
                return 0, r
        else:
            rows = self._rows_for(hashes, unique)
            if not rows:
                return 0, np.empty(0, dtype=np.intp)
            r = np.fromiter(rows, dtype=np.intp, count=len(rows))
        word, bit = divmod(pod, 64)
        b = np.uint64(1 << bit)
        col = self._masks[r, medium, word]
        new = int(np.count_nonzero((col & b) == 0))
        self._masks[r, medium, word] = col | b
        self._stamp[r] = self._tick
        self.pod_counts[medium, pod] += new
        if self.per_pod_cap is not None and self.pod_counts[:, pod].sum() > self.per_pod_cap:
            self.evict_pod(pod, int(self.pod_counts[:, pod].sum()) - self.per_pod_cap + self.per_pod_cap // 8)
        return new, r

    def remove(self, pod: int, hashes: Iterable[int], medium: int = 0, unique: bool = False) -> int:
        """Forget that ``pod`` holds ``hashes`` on ``medium``; returns how many it held. ``unique=True``: the
        hashes never repeat (skips building a set of their rows)."""
        get = self._slot_of.get
        if unique:
            got = list(map(get, hashes))
            if None in got:
                got = [s for s in got if s is not None]
            if not got:
                return 0
            r = np.array(got, dtype=np.intp)
        else:
            rows = {s for h in hashes if (s := get(h)) is not None}
            if not rows:
                return 0
            r = np.fromiter(rows, dtype=np.intp, count=len(rows))
        return self._clear_bit(pod, r, medium)

    def remove_rows(self, pod: int, hashes: Sequence[int], rows: np.ndarray, keys: np.ndarray, medium: int = 0
                    ) -> int:
        """``remove(pod, hashes, medium, unique=True)`` for hashes whose rows ``add_rows`` returned (``keys``:
        the rows' keys then, ``_keys[rows]``): rows still holding their key are cleared directly, the rest
        (freed or reused since, or never added) are looked up by hash. Returns how many ``pod`` held."""
        n = rows.size
        live = (self._keys[rows] == keys) & (self._stamp[rows] != _FREE) if n else np.zeros(0, dtype=bool)
        held = self._clear_bit(pod, rows[live], medium) if n else 0
        if n and not live.all():
            held += self.remove(pod, [hashes[i] for i in np.flatnonzero(~live).tolist()], medium, unique=True)
        if len(hashes) > n:
            held += self.remove(pod, hashes[n:], medium, unique=True)
        return held

    def _clear_bit(self, pod: int, r: np.ndarray, medium: int) -> int:
        """Clear ``pod``'s bit on ``medium`` in distinct rows ``r``; free rows left empty."""
        if r.size == 0:
            return 0
        word, bit = divmod(pod, 64)
        b = np.uint64(1 << bit)
        col = self._masks[r, medium, word]
        held = (col & b) != 0
        n = int(np.count_nonzero(held))
        self._masks[r, medium, word] = col & ~b
        self.pod_counts[medium, pod] -= n
        self._free_if_empty(r[held])
        return n

    def drop_pod(self, pod: int) -> int:
        """Forget everything ``pod`` holds (sequence gap, restart, removal); returns blocks dropped."""
        word, bit = divmod(pod, 64)
        if word >= self._words:
            return 0
        b = np.uint64(1 << bit)
        hi = self._next_row
        col = self._masks[:hi, :, word]
        held = ((col & b) != 0).any(axis=1)
        rows = np.nonzero(held)[0]
        n = int(self.pod_counts[:, pod].sum())
        if rows.size:
            self._masks[rows, :, word] &= ~b
            self._free_if_empty(rows)
        self.pod_counts[:, pod] = 0
        return n

    def clear(self) -> None:
        self._slot_of.clear()
        self._chunks.clear()
        self._masks[:] = 0
        self._stamp[:] = _FREE
        self._keys[:] = 0
        self._next_row = 0
        self._free_rows.clear()
        self.pod_counts[:] = 0

    # ---- reads --------------------------------------------------------------------------------------
    def match(self, hashes: Sequence[int], touch: bool = True) -> tuple[np.ndarray, np.ndarray] | None:
        """Per pod slot: (prefix blocks held on any medium, the same weighted by the best medium per block).

        ``None`` when no pod holds even the first block. The walk stops at the first block nobody holds.
        """
        r = self._present_rows(hashes)
        if r.size == 0:
            return None
        m = self._masks[r]  # (n, media, words)
        if touch:
            self._tick += 1
            self._stamp[r] = self._tick
        anym = m[:, 0, :] if m.shape[1] == 1 else np.bitwise_or.reduce(m, axis=1)
        cum = np.bitwise_and.accumulate(anym, axis=0)  # (n, words): pods still matching after block i
        blocks = _prefix_lengths(cum)
        if m.shape[1] == 1 or not self.pod_counts[1:].any():
            return blocks, blocks * self.weights[0]
        weighted = np.zeros(blocks.shape, dtype=np.float64)
        seen = np.zeros_like(cum)
        for mi in self._order:
            here = cum & m[:, mi, :] & ~seen
            seen |= here
            weighted += self.weights[mi] * np.unpackbits(here.view(np.uint8), axis=1, bitorder="little").sum(
                axis=0, dtype=np.int64)
        return blocks, weighted

    def keys_of(self, rows: np.ndarray) -> np.ndarray:
        """The keys of ``rows`` now (a copy), to check later that the rows still hold them."""
        return self._keys[rows]

    def pods_holding(self, h: int) -> dict[str, list[int]]:
        """For tests and debugging: medium -> pod slots holding block ``h``."""
        row = self._slot_of.get(h)
        if row is None:
            return {}
        out: dict[str, list[int]] = {}
        for mi, name in enumerate(self.media):
            bits = np.unpackbits(self._masks[row, mi].view(np.uint8), bitorder="little")
            pods = [int(p) for p in np.nonzero(bits)[0]]
            if pods:
                out[name] = pods
        return out

    def contents(self) -> dict[int, dict[str, tuple[int, ...]]]:
        """The whole index as plain data (tests, replica comparison). O(blocks): not for the hot path."""
        return {h: {m: tuple(p) for m, p in self.pods_holding(h).items()} for h in self._slot_of}

    def check_invariants(self) -> None:
        """Raise AssertionError when the structure is inconsistent (used by property tests)."""
        assert len(self._slot_of) <= self.max_blocks, "over the block cap"
        live = np.zeros(self._next_row, dtype=bool)
        for h, row in self._slot_of.items():
            assert int(self._keys[row]) == h, "row key differs from dict key"
            assert self._stamp[row] != _FREE, "dict points at a free row"
            live[row] = True
        assert int(np.count_nonzero(self._stamp[: self._next_row] != _FREE)) == len(self._slot_of)
        rows = np.nonzero(live)[0]
        bits = np.unpackbits(self._masks[rows].view(np.uint8), axis=2, bitorder="little")  # (n, media, pods)
        assert rows.size == 0 or bits.reshape(rows.size, -1).any(axis=1).all(), "a live row holds no pod"
        counts = bits.sum(axis=0, dtype=np.int64)
        assert np.array_equal(counts, self.pod_counts), "per-pod counts differ from the masks"
        assert not self._masks[~np.isin(np.arange(self._masks.shape[0]), rows)].any(), "free row has bits"
        if self.per_pod_cap is not None:
            assert int(self.pod_counts.sum(axis=0).max(initial=0)) <= self.per_pod_cap, "pod over its cap"

    # ---- internals ----------------------------------------------------------------------------------
    def _present_rows(self, hashes: Sequence[int]) -> np.ndarray:
        """Rows of the leading ``hashes`` the index holds, up to the first it does not (the exact walk),
        served _CHUNK blocks at a time from the chunk-row cache where its entries are still valid."""
        n = len(hashes)
        chunks = self._chunks
        parts: list[np.ndarray] = []
        kparts: list[np.ndarray] = []
        i = 0
        gen = self._releases
        check = False
        while i + _CHUNK <= n:
            e = chunks.get(hashes[i + _CHUNK - 1])
            if e is None or e[0] != hashes[i:i + _CHUNK]:
                break
            parts.append(e[1])
            kparts.append(e[2])
            check = check or e[3] != gen
            i += _CHUNK
        if parts:
            keys: np.ndarray | None
            if len(parts) == 1:
                head, keys = parts[0], kparts[0]
            else:
                head = np.concatenate(parts)
                keys = np.concatenate(kparts) if check else None
            # rows are only ever freed by _release: entries made since its last call are valid as they are
            ok = (self._keys[head] == keys) & (self._stamp[head] != _FREE) if check else None
            if ok is not None and not ok.all():  # a row was freed or reused since: walk again from that chunk
                i = int(np.argmin(ok)) // _CHUNK * _CHUNK
                chunks.pop(hashes[i + _CHUNK - 1], None)
                head = head[:i]
        else:
            head = np.empty(0, dtype=np.intp)
        get = self._slot_of.get
        tail: list[int] = []
        while i < n:
            row = get(hashes[i])
            if row is None:
                break
            tail.append(row)
            i += 1
            if i % _CHUNK == 0:  # i started at a chunk boundary, so tail[-_CHUNK:] are this chunk's rows
                if len(chunks) >= _CHUNK_CACHE:
                    chunks.clear()
                hs = hashes[i - _CHUNK:i]
                chunks[hashes[i - 1]] = (list(hs), np.asarray(tail[-_CHUNK:], dtype=np.intp),
                                         np.asarray(hs, dtype=np.uint64), gen)
        if not tail:
            return head
        t = np.asarray(tail, dtype=np.intp)
        return np.concatenate([head, t]) if head.size else t

    def _rows_for(self, hashes: Iterable[int], unique: bool = False, pending: list[int] | None = None
                  ) -> list[int]:
        """Rows for ``hashes`` (allocating), all stamped with the current tick. Stops early when the
        index is full of this very call's rows (a call larger than the cap keeps its first blocks).
        ``pending``: rows this call already holds (protected from eviction, not returned)."""
        slot_of = self._slot_of
        if not isinstance(hashes, list):
            hashes = list(hashes)
        got = list(map(slot_of.get, hashes))
        out: list[int]
        if None not in got:
            out = cast(list[int], got)
        elif self._alloc_many([h for h, r in zip(hashes, got) if r is None]):
            out = cast(list[int], list(map(slot_of.get, hashes)))  # the same rows, in the same order
        else:  # the cap is in reach: allocate one by one, evicting (and protecting this call's rows)
            out = []
            for h in hashes:
                row = slot_of.get(h)
                if row is None:
                    row = self._alloc(h, out if pending is None else pending + out)
                    if row < 0:
                        break
                out.append(row)
        if not unique and len(out) > 1 and len(set(out)) != len(out):
            out = list(dict.fromkeys(out))
        return out

    def _alloc_many(self, missing: list[int]) -> bool:
        """Rows for new hashes ``missing`` (in order, repeats allowed) exactly as ``_alloc`` would give them one
        by one, in a few vector operations; False (nothing done) when that would need an eviction."""
        new = list(dict.fromkeys(missing))
        k = len(new)
        if len(self._slot_of) + k > self.max_blocks:
            return False
        free = self._free_rows
        take = min(k, len(free))
        rows = free[len(free) - take:][::-1]  # _alloc pops from the end
        del free[len(free) - take:]
        fresh = k - take
        if fresh:
            while self._next_row + fresh > self._keys.shape[0]:
                self._grow()
            rows.extend(range(self._next_row, self._next_row + fresh))
            self._next_row += fresh
        self._slot_of.update(zip(new, rows))
        r = np.asarray(rows, dtype=np.intp)
        self._keys[r] = np.asarray(new, dtype=np.uint64)
        self._stamp[r] = self._tick
        return True

    def _alloc(self, h: int, pending: list[int]) -> int:
        if len(self._slot_of) >= self.max_blocks:
            if pending:  # protect this call's rows: eviction must not free a row we are about to use
                self._stamp[pending] = self._tick
            self._evict_lru(max(1, self.max_blocks // _EVICT_FRACTION), protect=self._tick)
            if len(self._slot_of) >= self.max_blocks:
                return -1
        if self._free_rows:
            row = self._free_rows.pop()
        else:
            if self._next_row >= self._keys.shape[0]:
                self._grow()
            row = self._next_row
            self._next_row += 1
        self._slot_of[h] = row
        self._keys[row] = h
        self._stamp[row] = self._tick
        return row

    def _grow(self) -> None:
        old = self._keys.shape[0]
        new = min(self.max_blocks, max(old * 2, 1024))
        if new <= old:
            raise RuntimeError("index rows exhausted")  # cannot happen: free rows exist when at the cap
        for name in ("_keys", "_stamp"):
            arr = getattr(self, name)
            grown = np.zeros(new, dtype=arr.dtype)
            grown[:old] = arr
            setattr(self, name, grown)
        masks = np.zeros((new,) + self._masks.shape[1:], dtype=np.uint64)
        masks[:old] = self._masks
        self._masks = masks

    def _evict_rows(self, rows: np.ndarray) -> None:
        if rows.size == 0:
            return
        bits = np.unpackbits(self._masks[rows].view(np.uint8), axis=2, bitorder="little")
        self.pod_counts -= bits.sum(axis=0, dtype=np.int64)
        self._masks[rows] = 0
        self._release(rows)
        self.evictions += int(rows.size)

    def _evict_lru(self, n: int, protect: int | None = None) -> None:
        hi = self._next_row
        stamps = self._stamp[:hi]
        live = np.nonzero((stamps != _FREE) & (stamps != (protect or _FREE)))[0]
        if live.size == 0:
            return
        n = min(n, live.size)
        oldest = live[np.argpartition(stamps[live], n - 1)[:n]] if n < live.size else live
        self._evict_rows(oldest)

    def evict_pod(self, pod: int, n: int) -> None:
        word, bit = divmod(pod, 64)
        b = np.uint64(1 << bit)
        hi = self._next_row
        rows = np.nonzero(((self._masks[:hi, :, word] & b) != 0).any(axis=1))[0]
        if rows.size == 0:
            return
        n = min(n, rows.size)
        oldest = rows[np.argpartition(self._stamp[rows], n - 1)[:n]] if n < rows.size else rows
        held = (self._masks[oldest, :, word] & b) != 0  # (n, media)
        self.pod_counts[:, pod] -= held.sum(axis=0, dtype=np.int64)
        self._masks[oldest, :, word] &= ~b
        self._free_if_empty(oldest)
        self.evictions += int(n)

    def _free_if_empty(self, rows: np.ndarray) -> None:
        if rows.size == 0:
            return
        empty = rows[~self._masks[rows].reshape(rows.size, -1).any(axis=1)]
        self._release(empty)

    def _release(self, rows: np.ndarray) -> None:
        if rows.size == 0:
            return
        self._releases += 1
        slot_of = self._slot_of
        for h in self._keys[rows].tolist():
            del slot_of[h]
        self._stamp[rows] = _FREE
        self._keys[rows] = 0
        self._free_rows.extend(rows.tolist())
