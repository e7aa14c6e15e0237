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

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.kvcache.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from engine.kvcache.hashing import chain_hash, hash_blocks

MEDIUM = "GPU"




@dataclass(slots=True)
class PrefixCacheCounters:
    """vLLM's prefix-cache stats, in tokens (vllm:prefix_cache_queries / _hits)."""

    queries: int = 0
    hits: int = 0
    requests: int = 0


class BlockPool:
    """Blocks, reference counts, the prefix-cache map and the LRU free queue of one pod."""

    def __init__(self, num_blocks: int, block_size: int, root_hash: int, publish_events: bool = True,
                 in_process: bool = False) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.root_hash = root_hash
        self._ref = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}  # block hash -> block id
        # Free blocks, head first = evicted first. Values unused; OrderedDict gives O(1) removal.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
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
        return len(self._free)

    @property
    def usage(self) -> float:
        """Share of blocks in use, as vllm:kv_cache_usage_perc reports it (cached free blocks count free)."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def block_hash(self, block_id: int) -> int | None:
        return self._hash[block_id]

    def cached_block(self, block_hash: int) -> int | None:
        return self._cached.get(block_hash)

    def free_order(self) -> list[int]:
        """Free block ids in eviction order (for tests and debugging)."""
        return list(self._free)

    def find_cached(self, block_hashes: Sequence[int], max_blocks: int | None = None) -> list[int]:
        """Block ids of the longest cached prefix of ``block_hashes`` (at most ``max_blocks``)."""
        out: list[int] = []
        cached = self._cached
        n = len(block_hashes) if max_blocks is None else min(max_blocks, len(block_hashes))
        for i in range(n):
            bid = cached.get(block_hashes[i])
            if bid is None:
                break
            out.append(bid)
        return out

    def num_evictable(self, block_ids: Sequence[int]) -> int:
        """How many of ``block_ids`` sit in the free queue (touching them takes them out of it)."""
        return sum(1 for b in block_ids if self._ref[b] == 0)

    def can_allocate(self, num_new: int, touching: Sequence[int] = ()) -> bool:
        return num_new <= len(self._free) - self.num_evictable(touching)

    # ---- mutations -------------------------------------------------------------------------------
    def touch(self, block_ids: Sequence[int]) -> None:
        """Take a reference on cached blocks (a prefix-cache hit); revive them from the free queue."""
        ref, free = self._ref, self._free
        for b in block_ids:
            if ref[b] == 0:
                del free[b]
            ref[b] += 1

    def allocate(self, n: int) -> list[int] | None:
        """``n`` fresh blocks from the head of the free queue, evicting their old hashes; None if short."""
        if n > len(self._free):
            return None
        out: list[int] = []
        removed: list[int] = []
        free, ref, hashes, cached = self._free, self._ref, self._hash, self._cached
        for _ in range(n):
            b, _ = free.popitem(last=False)
            h = hashes[b]
            if h is not None:
                hashes[b] = None
                if cached.get(h) == b:
                    del cached[h]
                removed.append(h)
            ref[b] = 1
            out.append(b)
        if removed and self.publish_events:
            if self.in_process:
                self.events.append(BlockRemoved(removed))
            else:  # vLLM publishes one BlockRemoved per evicted block
                self.events.extend([BlockRemoved([h]) for h in removed])
        return out

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
        stored: list[int] = []
        first = -1
        hashes, cached = self._hash, self._cached
        for i, (b, h) in enumerate(zip(block_ids, block_hashes)):
            if hashes[b] is not None:
                continue
            hashes[b] = h
            if h not in cached:
                cached[h] = b
            if first < 0:
                first = i
            stored.append(h)
        if not stored or not self.publish_events:
            return
        bs = self.block_size
        toks = token_ids[first * bs : (first + len(stored)) * bs]
        parent = parent_hash if first == 0 else block_hashes[first - 1]
        if not (self.in_process and isinstance(toks, np.ndarray)):
            toks = _int_list(toks)
        self.events.append(BlockStored(stored, parent, toks, bs, lora_id=lora_id, lora_name=lora_name))

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each block. vLLM frees a request's blocks tail first, so that its
        last blocks (the least shared) are evicted first: pass them in the request's order."""
        ref, free = self._ref, self._free
        for b in reversed(block_ids):
            ref[b] -= 1
            if ref[b] == 0:
                free[b] = None
            elif ref[b] < 0:
                raise AssertionError(f"block {b} freed twice")

    def clear(self) -> None:
        """Forget every cached hash (vLLM's reset_prefix_cache, or a restart); blocks in use stay."""
        self._cached.clear()
        for i in range(self.num_blocks):
            self._hash[i] = None
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
