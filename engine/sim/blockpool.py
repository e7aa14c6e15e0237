"""A KV block pool with vLLM v1 prefix-cache semantics (vllm/v1/core/block_pool.py, kv_cache_utils.py).

Why this shape: the picker learns what a pod holds from its KV events, so the simulator must store,
hit and evict blocks the way vLLM does, and say so in the same events:

- a fixed number of blocks, each with a reference count;
- a block that becomes full is *committed*: it gets a chained hash (``chain_hash`` from a per-pod random
  root, as vLLM seeds its hash per process) and enters the hash -> block map; one ``BlockStored`` per
  commit names the new hashes, their parent and their token ids;
- a block whose reference count drops to zero goes to the tail of an LRU free queue but keeps its hash,
  so a later request can hit it and revive it;
- a new block is always taken from the head of the free queue; if that block still had a hash it is
  evicted (``BlockRemoved``). Blocks in use are never evicted;
- ``clear()`` forgets every hash (``AllBlocksCleared``).

With ``publish_events=False`` (nobody subscribes, e.g. a simulated router that ignores KV events) the pool
behaves the same but builds no events, which saves converting every committed token id to a Python int.

Everything is bounded by ``num_blocks``: the hash map holds at most one entry per block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numba import njit

from engine.kvcache.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from engine.kvcache.hashing import chain_hash, hash_blocks
from engine.kvcache.rowtable import RowTable, as_keys, delete_key, find, put

MEDIUM = "GPU"


# ---- compiled loops over the pool's arrays -----------------------------------------------------------------
# Loops that take block ids from the caller check bounds (a bad id is an IndexError, as with lists).
# The free queue is a circular doubly linked list over block ids with a sentinel node ``num_blocks`` (head =
# nxt[S], tail = prv[S]); a block is in it exactly when its reference count is 0.

@njit(cache=True, nogil=True)
def _unlink(nxt, prv, b):
    p, q = prv[b], nxt[b]
    nxt[p] = q
    prv[q] = p


@njit(cache=True, nogil=True)
def _append(nxt, prv, s, b):
    t = prv[s]
    nxt[t] = b
    prv[b] = t
    nxt[b] = s
    prv[s] = b


@njit(cache=True, nogil=True)
def _allocate(n, nxt, prv, ref, hashed, hsh, tk, tr, mask, shift, out, removed):
    """Pop ``n`` blocks off the head (the caller checked there are enough): a block that still had a hash loses
    it (and its map entry, if the map points at it) and the hash goes to ``removed``. Returns (removed, map
    entries deleted)."""
    s = nxt.size - 1
    nr = 0
    gone = 0
    for i in range(n):
        b = nxt[s]
        _unlink(nxt, prv, b)
        if hashed[b]:
            hashed[b] = 0
            h = hsh[b]
            if find(tk, tr, mask, shift, h) == b:
                gone += delete_key(tk, tr, mask, shift, h)
            removed[nr] = h
            nr += 1
        ref[b] = 1
        out[i] = b
    return nr, gone


@njit(cache=True, nogil=True, boundscheck=True)
def _touch(blocks, nxt, prv, ref):
    revived = 0
    for b in blocks:
        if ref[b] == 0:
            _unlink(nxt, prv, b)
            revived += 1
        ref[b] += 1
    return revived


@njit(cache=True, nogil=True, boundscheck=True)
def _free(blocks, nxt, prv, ref):
    """Drop a reference on each block, last first; returns (blocks that went to the free queue, the first block
    freed twice or -1)."""
    s = nxt.size - 1
    freed = 0
    for i in range(blocks.size - 1, -1, -1):
        b = blocks[i]
        ref[b] -= 1
        if ref[b] == 0:
            _append(nxt, prv, s, b)
            freed += 1
        elif ref[b] < 0:
            return freed, b
    return freed, -1


@njit(cache=True, nogil=True, boundscheck=True)
def _commit(blocks, hashes, hashed, hsh, tk, tr, mask, shift, stored):
    """Give each block without a hash its hash; a hash not yet in the map points at its block. ``stored``
    receives the index of every block that got a hash. Returns (blocks stored, map entries added)."""
    ns = 0
    added = 0
    for i in range(blocks.size):
        b = blocks[i]
        if hashed[b]:
            continue
        h = hashes[i]
        hashed[b] = 1
        hsh[b] = h
        if put(tk, tr, mask, shift, h, b) == b:
            added += 1
        stored[ns] = i
        ns += 1
    return ns, added


@njit(cache=True, nogil=True, boundscheck=True)
def _count_zero(blocks, ref):
    n = 0
    for b in blocks:
        if ref[b] == 0:
            n += 1
    return n


def _ids(block_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.asarray(block_ids, dtype=np.int64) if len(block_ids) else np.empty(0, dtype=np.int64)


@dataclass(slots=True)
class PrefixCacheCounters:
    """vLLM's prefix-cache stats, in tokens (vllm:prefix_cache_queries / _hits)."""

    queries: int = 0
    hits: int = 0
    requests: int = 0


class BlockPool:
    """Blocks, reference counts, the prefix-cache map and the LRU free queue of one pod.

    State lives in flat arrays walked by compiled loops (a pool of tens of thousands of blocks as Python dicts
    and an OrderedDict cost several cache misses per block touched): ``_ref`` (reference counts), ``_hsh`` and
    ``_hashed`` (a block's hash, kept while it sits in the free queue), the hash -> block map (``RowTable``,
    sized for every block at once, never grown) and the free queue (linked list ``_nxt``/``_prv``)."""

    def __init__(self, num_blocks: int, block_size: int, root_hash: int, publish_events: bool = True,
                 in_process: bool = False) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.root_hash = root_hash
        n = num_blocks
        self._ref = np.zeros(n, dtype=np.int64)
        self._hsh = np.zeros(n, dtype=np.uint64)
        self._hashed = np.zeros(n, dtype=np.uint8)
        self._cached = RowTable(2 * n)  # block hash -> block id; at most one entry per block
        self._cached.reserve(n)
        ids = np.arange(n + 1, dtype=np.int64)  # free queue 0, 1, ..., n-1 behind the sentinel n
        self._nxt = np.roll(ids, -1)
        self._prv = np.roll(ids, 1)
        self._nfree = n
        self._scratch = np.empty(n, dtype=np.int64)
        self._removed = np.empty(n, dtype=np.uint64)
        self.events: list[KVEvent] = []  # pending, drained by the engine once per step
        self.publish_events = publish_events
        # Events consumed in this process (the virtual-time simulator hands them to the picker as objects):
        # the blocks evicted by one allocation go in one BlockRemoved (the index applies a run of removals as
        # one batch either way) and BlockStored carries the token ids as the engine's own array rather than a
        # list. The wire (engine.sim.kvevents) keeps vLLM's shapes: one BlockRemoved per block, int lists.
        self.in_process = in_process
        self.counters = PrefixCacheCounters()

    # ---- hashing ---------------------------------------------------------------------------------
    def hash_tokens(self, tokens: Sequence[int] | np.ndarray, parent: int | None = None) -> list[int]:
        """Engine hashes of every full block of ``tokens`` (from the root, or after ``parent``)."""
        return hash_blocks(tokens, self.block_size, self.root_hash if parent is None else parent)

    def next_hash(self, parent: int | None, block_tokens: Sequence[int] | np.ndarray) -> int:
        return chain_hash(self.root_hash if parent is None else parent, block_tokens)

    # ---- queries ---------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return self._nfree

    @property
    def usage(self) -> float:
        """Share of blocks in use, as vllm:kv_cache_usage_perc reports it (cached free blocks count free)."""
        return 1.0 - self._nfree / self.num_blocks

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        return int(self._ref[block_id])

    def block_hash(self, block_id: int) -> int | None:
        return int(self._hsh[block_id]) if self._hashed[block_id] else None

    def cached_block(self, block_hash: int) -> int | None:
        return self._cached.get(block_hash)

    def free_order(self) -> list[int]:
        """Free block ids in eviction order (for tests and debugging)."""
        out: list[int] = []
        nxt, s = self._nxt, self.num_blocks
        b = int(nxt[s])
        while b != s:
            out.append(b)
            b = int(nxt[b])
        return out

    def find_cached(self, block_hashes: Sequence[int], max_blocks: int | None = None) -> list[int]:
        """Block ids of the longest cached prefix of ``block_hashes`` (at most ``max_blocks``)."""
        n = len(block_hashes) if max_blocks is None else min(max_blocks, len(block_hashes))
        if n <= 0:
            return []
        q = as_keys(block_hashes)
        return self._cached.prefix(q[:n]).tolist()

    def num_evictable(self, block_ids: Sequence[int]) -> int:
        """How many of ``block_ids`` sit in the free queue (touching them takes them out of it)."""
        return int(_count_zero(_ids(block_ids), self._ref)) if len(block_ids) else 0

    def can_allocate(self, num_new: int, touching: Sequence[int] = ()) -> bool:
        return num_new <= self._nfree - self.num_evictable(touching)

    # ---- mutations -------------------------------------------------------------------------------
    def touch(self, block_ids: Sequence[int]) -> None:
        """Take a reference on cached blocks (a prefix-cache hit); revive them from the free queue."""
        if len(block_ids):
            self._nfree -= int(_touch(_ids(block_ids), self._nxt, self._prv, self._ref))

    def allocate(self, n: int) -> list[int] | None:
        """``n`` fresh blocks from the head of the free queue, evicting their old hashes; None if short."""
        if n > self._nfree:
            return None
        if n <= 0:
            return []
        tk, tr, mask, shift = self._cached.arrays()
        out = self._scratch[:n]
        nr, gone = _allocate(n, self._nxt, self._prv, self._ref, self._hashed, self._hsh, tk, tr, mask, shift,
                             out, self._removed)
        self._nfree -= n
        self._cached.adjust(-int(gone))
        if nr and self.publish_events:
            removed = self._removed[:nr].tolist()
            if self.in_process:
                self.events.append(BlockRemoved(removed))
            else:  # vLLM publishes one BlockRemoved per evicted block
                self.events.extend([BlockRemoved([h]) for h in removed])
        return out.tolist()

    def commit(
        self,
        block_ids: Sequence[int],
        block_hashes: Sequence[int],
        parent_hash: int | None,
        token_ids: Sequence[int] | np.ndarray,
        lora_id: int | None = None,
        lora_name: str | None = None,
    ) -> None:
        """Mark full blocks as cached under their hashes and publish one BlockStored for them.

        ``parent_hash`` is the hash of the block before the first one (None for a prompt's first block).
        A hash already cached in another block (two requests computed the same prefix at once) is not
        registered twice; as in vLLM, the first copy stays the one a lookup finds.
        """
        k = min(len(block_ids), len(block_hashes))
        if k == 0:
            return
        if k > self.num_blocks:
            raise ValueError(f"cannot commit {k} blocks in a pool of {self.num_blocks}")
        tk, tr, mask, shift = self._cached.arrays()
        hashes = as_keys(block_hashes)
        ns, added = _commit(_ids(block_ids)[:k], hashes[:k], self._hashed, self._hsh, tk, tr, mask, shift,
                            self._scratch)
        self._cached.adjust(int(added))
        if not ns or not self.publish_events:
            return
        idx = self._scratch[:ns]
        first = int(idx[0])
        stored = hashes[idx].tolist()
        bs = self.block_size
        toks = token_ids[first * bs : (first + ns) * bs]
        parent = parent_hash if first == 0 else block_hashes[first - 1]
        if not (self.in_process and isinstance(toks, np.ndarray)):
            toks = _int_list(toks)
        self.events.append(BlockStored(stored, parent, toks, bs, lora_id=lora_id, lora_name=lora_name))

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each block. vLLM frees a request's blocks tail first, so that its
        last blocks (the least shared) are evicted first: pass them in the request's order."""
        if not len(block_ids):
            return
        freed, bad = _free(_ids(block_ids), self._nxt, self._prv, self._ref)
        self._nfree += int(freed)
        if bad >= 0:
            raise AssertionError(f"block {int(bad)} freed twice")

    def clear(self) -> None:
        """Forget every cached hash (vLLM's reset_prefix_cache, or a restart); blocks in use stay."""
        self._cached.clear()
        self._hashed[:] = 0
        if self.publish_events:
            self.events.append(AllBlocksCleared())

    def record_query(self, query_tokens: int, hit_tokens: int) -> None:
        c = self.counters
        c.requests += 1
        c.queries += query_tokens
        c.hits += hit_tokens

    def drain_events(self) -> list[KVEvent]:
        ev, self.events = self.events, []
        return ev


def _int_list(tokens: Sequence[int] | np.ndarray) -> list[int]:
    """Plain Python ints, as events carry them (ndarray.tolist() converts in C, ~10x a comprehension)."""
    if isinstance(tokens, np.ndarray):
        return tokens.tolist()
    return [int(t) for t in tokens]


def new_root_hash(seed: int | None = None) -> int:
    """A per-pod random root, as vLLM seeds its block hash per process (NONE_HASH)."""
    rng = np.random.default_rng(seed)
    return int(rng.integers(0, 2**63 - 1, dtype=np.int64))


__all__ = [
    "AllBlocksCleared", "BlockPool", "BlockRemoved", "BlockStored", "KVEvent", "MEDIUM",
    "PrefixCacheCounters", "new_root_hash",
]
