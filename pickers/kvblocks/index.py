"""Which pods hold which KV blocks: a bounded index from our own block hash to a per-medium pod bitmask.

Layout (chosen for the decision hot path and for bytes per block):

- ``_table``: own hash -> row, an open-addressing table over flat arrays with compiled loops
  (``rowtable.RowTable``): a request's or a KV event's blocks are looked up, inserted or deleted in one call,
  and a prompt's walk stops at the first block no pod holds.
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

import numpy as np

from engine.kvcache.rowtable import RowTable, as_keys, distinct_rows, rows_with_bit

assert sys.byteorder == "little", "bit unpacking below assumes a little-endian host"

_EVICT_FRACTION = 16
_FREE = 0  # stamp of a free row; live rows have stamps >= 1


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
        warm_up()
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
        self._table = RowTable()
        self._keys = np.zeros(rows, dtype=np.uint64)
        self._masks = np.zeros((rows, len(self.media), self._words), dtype=np.uint64)
        self._stamp = np.zeros(rows, dtype=np.uint64)
        self._next_row = 0  # rows below this have been used at least once
        self._free_rows: list[int] = []
        self._mark = np.zeros(rows, dtype=np.int64)  # scratch for distinct_rows, one generation per call
        self._mark_gen = 0
        self._tick = 1
        self.pod_counts = np.zeros((len(self.media), self._words * 64), dtype=np.int64)
        self.evictions = 0
        # Descending weight order, for weighting a pod's hit by the best medium holding each block.
        self._order = [int(i) for i in np.argsort(-self.weights, kind="stable")]
        self._fallback = [i for i in self._order if i < named][-1]  # lowest-weight named medium

    # ---- shape --------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._table)

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
        """Approximate memory: the numpy arrays, the hash table and the free-row list."""
        arrays = self._keys.nbytes + self._masks.nbytes + self._stamp.nbytes + self._mark.nbytes
        return arrays + self._table.nbytes + sys.getsizeof(self._free_rows) + 8 * len(self._free_rows)

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
        q = as_keys(hashes if isinstance(hashes, (list, np.ndarray)) else list(hashes))
        if q.size == 0:
            return 0, np.empty(0, dtype=np.int64)
        if self._fits(q):
            new, r = self._assign(pod, q, medium, unique)
        else:  # the cap is in reach: allocate one by one, evicting (and protecting this call's rows)
            r = self._rows_one_by_one(q, unique)
            if r.size == 0:
                return 0, r
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
        q = as_keys(hashes if isinstance(hashes, (list, np.ndarray)) else list(hashes))
        if q.size == 0:
            return 0
        if not unique:
            self._mark_gen += 1
        r = self._table.rows_of(q, self._mark, self._mark_gen, not unique)  # in order, first occurrences
        return self._clear_bit(pod, r, medium)

    def remove_rows(self, pod: int, hashes: Sequence[int] | np.ndarray, rows: np.ndarray, keys: np.ndarray,
                    medium: int = 0) -> int:
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
        n, freed = self._table.clear_rows(r, self._masks, medium, word, bit, self._keys, self._stamp)
        self.pod_counts[medium, pod] -= n
        if freed.size:
            self._free_rows.extend(freed.tolist())
        return n

    def drop_pod(self, pod: int) -> int:
        """Forget everything ``pod`` holds (sequence gap, restart, removal); returns blocks dropped."""
        word, bit = divmod(pod, 64)
        if word >= self._words:
            return 0
        b = np.uint64(1 << bit)
        rows = rows_with_bit(self._masks, self._next_row, word, bit)
        n = int(self.pod_counts[:, pod].sum())
        if rows.size:
            self._masks[rows, :, word] &= ~b
            self._free_if_empty(rows)
        self.pod_counts[:, pod] = 0
        return n

    def clear(self) -> None:
        self._table.clear()
        self._masks[:] = 0
        self._stamp[:] = _FREE
        self._keys[:] = 0
        self._next_row = 0
        self._free_rows.clear()
        self.pod_counts[:] = 0

    # ---- reads --------------------------------------------------------------------------------------
    def match(self, hashes: Sequence[int] | np.ndarray, touch: bool = True) -> tuple[np.ndarray, np.ndarray] | None:
        """Per pod slot: (prefix blocks held on any medium, the same weighted by the best medium per block).

        ``None`` when no pod holds even the first block. The walk stops at the first block nobody holds.
        """
        tick = self._tick + 1 if touch else 0
        # one compiled walk: the rows, their stamps and each pod's prefix length (a few microseconds, where the
        # same in numpy operations cost ~70 us of a decision on a serving picker with cold caches)
        r, blocks = self._table.prefix_match(as_keys(hashes), self._masks, self._stamp, tick)
        if r.size == 0:
            return None
        if touch:
            self._tick = tick
        if self._masks.shape[1] == 1 or not self.pod_counts[1:].any():
            return blocks, blocks * self.weights[0]
        m = self._masks[r]  # (n, media, words)
        cum = np.bitwise_and.accumulate(np.bitwise_or.reduce(m, axis=1), axis=0)  # pods still matching at row i
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
        row = self._table.get(h)
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
        return {h: {m: tuple(p) for m, p in self.pods_holding(h).items()} for h in self.rows_by_key()}

    def row_of(self, h: int) -> int | None:
        """The row holding block ``h``, or None (tests and debugging)."""
        return self._table.get(h)

    def rows_by_key(self) -> dict[int, int]:
        """Every block hash and its row (tests and debugging). O(blocks)."""
        keys, rows = self._table.items()
        return dict(zip(keys.tolist(), rows.tolist()))

    def check_invariants(self) -> None:
        """Raise AssertionError when the structure is inconsistent (used by property tests)."""
        table = self._table
        assert len(table) <= self.max_blocks, "over the block cap"
        keys, trows = table.items()
        assert keys.size == len(table), "table size differs from its entries"
        assert np.array_equal(table.lookup(keys), trows), "an entry is not reachable from its home slot"
        assert np.unique(keys).size == keys.size and np.unique(trows).size == trows.size, "a key or row twice"
        live = np.zeros(self._next_row, dtype=bool)
        assert trows.size == 0 or int(trows.max()) < self._next_row, "table points past the used rows"
        assert np.array_equal(self._keys[trows], keys), "row key differs from the table's key"
        assert (self._stamp[trows] != _FREE).all(), "table points at a free row"
        live[trows] = True
        assert int(np.count_nonzero(self._stamp[: self._next_row] != _FREE)) == len(table)
        rows = np.nonzero(live)[0]
        bits = np.unpackbits(self._masks[rows].view(np.uint8), axis=2, bitorder="little")  # (n, media, pods)
        assert rows.size == 0 or bits.reshape(rows.size, -1).any(axis=1).all(), "a live row holds no pod"
        counts = bits.sum(axis=0, dtype=np.int64)
        assert np.array_equal(counts, self.pod_counts), "per-pod counts differ from the masks"
        assert not self._masks[~np.isin(np.arange(self._masks.shape[0]), rows)].any(), "free row has bits"
        if self.per_pod_cap is not None:
            assert int(self.pod_counts.sum(axis=0).max(initial=0)) <= self.per_pod_cap, "pod over its cap"

    # ---- internals ----------------------------------------------------------------------------------
    def _distinct(self, rows: np.ndarray) -> np.ndarray:
        self._mark_gen += 1
        return distinct_rows(rows, self._mark, self._mark_gen)

    def _fits(self, q: np.ndarray) -> bool:
        """Whether the hashes of ``q`` the index lacks fit under the cap without an eviction."""
        n = len(self._table)
        if n + q.size <= self.max_blocks:
            return True
        return n + int(np.unique(q[self._table.lookup(q) < 0]).size) <= self.max_blocks

    def _assign(self, pod: int, q: np.ndarray, medium: int, unique: bool) -> tuple[int, np.ndarray]:
        """Rows for ``q`` (absent keys take rows exactly as ``_alloc`` would one by one: free rows last freed
        first, then fresh ones), stamped, with ``pod``'s bit set on ``medium``, in compiled passes; the caller
        has checked that the new keys fit the cap. Returns (bits newly set, rows)."""
        m = int(q.size)
        self._table.reserve(m)
        word, bit = divmod(pod, 64)
        if not unique:
            self._mark_gen += 1
        out = np.empty(m, dtype=np.int64)
        i = nout = new = 0
        while True:
            free = self._free_rows
            take = min(m - i, len(free))
            room = min(self._keys.shape[0], self.max_blocks) - self._next_row
            fresh = max(0, min(m - i - take, room))
            cand = np.empty(take + fresh, dtype=np.int64)
            if take:
                cand[:take] = free[len(free) - take:][::-1]  # _alloc pops from the end
            cand[take:] = np.arange(self._next_row, self._next_row + fresh)
            i, used, nout, k = self._table.assign(q, i, cand, out, nout, self._keys, self._stamp, self._tick,
                                                  self._masks, medium, word, bit, self._mark, self._mark_gen,
                                                  not unique)
            new += k
            from_free = min(used, take)
            if from_free:
                del free[len(free) - from_free:]
            self._next_row += used - from_free
            if i == m:
                return new, out[:nout]
            self._grow()  # out of candidate rows: the arrays were full (the cap check says rows remain)

    def _rows_one_by_one(self, q: np.ndarray, unique: bool) -> np.ndarray:
        out: list[int] = []
        for h in q.tolist():
            row = self._table.get(h)
            if row is None:
                row = self._alloc(h, out)
                if row < 0:
                    break
            out.append(row)
        r = np.asarray(out, dtype=np.int64)
        return r if unique or r.size < 2 else self._distinct(r)

    def _alloc(self, h: int, pending: list[int]) -> int:
        if len(self._table) >= self.max_blocks:
            if pending:  # protect this call's rows: eviction must not free a row we are about to use
                self._stamp[pending] = self._tick
            self._evict_lru(max(1, self.max_blocks // _EVICT_FRACTION), protect=self._tick)
            if len(self._table) >= self.max_blocks:
                return -1
        if self._free_rows:
            row = self._free_rows.pop()
        else:
            if self._next_row >= self._keys.shape[0]:
                self._grow()
            row = self._next_row
            self._next_row += 1
        self._table.insert_new(np.array([h], dtype=np.uint64), np.array([row], dtype=np.int64))
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
        mark = np.zeros(new, dtype=np.int64)
        mark[:old] = self._mark
        self._mark = mark

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
        rows = rows_with_bit(self._masks, hi, word, bit)
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
        masks = self._masks
        if masks.shape[1] * masks.shape[2] == 1:
            empty = rows[masks[rows, 0, 0] == 0]
        else:
            empty = rows[~masks[rows].reshape(rows.size, -1).any(axis=1)]
        self._release(empty)

    def _release(self, rows: np.ndarray) -> None:
        if rows.size == 0:
            return
        self._table.delete(self._keys[rows])
        self._stamp[rows] = _FREE
        self._keys[rows] = 0
        self._free_rows.extend(rows.tolist())


_warmed = False


def warm_up() -> None:
    """Load (or, the first time on a machine, compile) the index's compiled loops now, with the types the hot
    path uses, instead of inside the first request: that costs ~0.2 s from numba's disk cache and ~3 s when the
    cache is cold. Once per process; every BlockIndex calls it."""
    global _warmed
    if _warmed:
        return
    _warmed = True
    ix = BlockIndex(64, media=("GPU", "CPU"), max_pods=2, initial_rows=8)
    hs = list(range(1, 21))
    ix.add(0, hs, unique=True)
    _, rows = ix.add_rows(1, hs[:10], 1)
    ix.match(hs)
    ix.remove_rows(1, hs[:10], rows, ix.keys_of(rows), 1)
    ix.remove(0, hs[:5])
    ix.remove(0, hs[5:], unique=True)
    ix.add(1, hs, 0)
    ix.evict_pod(1, 2)
    ix.drop_pod(1)
    ix.clear()
