"""BlockPool: vLLM v1 prefix-cache semantics with exact expectations."""

from __future__ import annotations

import numpy as np
import pytest

from engine.kvcache.hashing import hash_blocks
from engine.sim.blockpool import AllBlocksCleared, BlockPool, BlockRemoved, BlockStored

BS = 4
ROOT = 12345


def pool(n: int = 8) -> BlockPool:
    return BlockPool(n, BS, ROOT)


def store(p: BlockPool, tokens: list[int]) -> list[int]:
    """Allocate and commit the full blocks of ``tokens`` as one request would; returns block ids."""
    hashes = p.hash_tokens(tokens)
    ids = p.allocate(len(hashes))
    assert ids is not None
    p.commit(ids, hashes, None, tokens)
    return ids


def test_hashes_chain_from_the_pod_root():
    p = pool()
    toks = list(range(10))
    assert p.hash_tokens(toks) == hash_blocks(toks, BS, ROOT)
    assert len(p.hash_tokens(toks)) == 2  # only full blocks
    assert BlockPool(8, BS, ROOT + 1).hash_tokens(toks) != p.hash_tokens(toks)


def test_commit_publishes_block_stored_with_tokens_and_parent():
    p = pool()
    toks = list(range(8))
    ids = store(p, toks)
    h = p.hash_tokens(toks)
    assert p.drain_events() == [BlockStored(h, None, toks, BS, None, "GPU", None)]
    # extending the prefix: the new block's parent is the last block of the prefix
    more = p.allocate(1)
    p.commit(ids + more, p.hash_tokens(toks + [8, 9, 10, 11]), None, toks + [8, 9, 10, 11])
    (ev,) = p.drain_events()
    assert ev.block_hashes == [p.hash_tokens(toks + [8, 9, 10, 11])[2]]
    assert ev.parent_block_hash == h[1]
    assert ev.token_ids == [8, 9, 10, 11]


def test_hit_on_shared_prefix_and_revival_of_freed_blocks():
    p = pool()
    a = list(range(12))
    ids = store(p, a)
    p.free(ids)
    assert p.num_free == 8 and p.usage == 0.0
    b = a[:8] + [99, 98, 97, 96]
    hits = p.find_cached(p.hash_tokens(b))
    assert hits == ids[:2]  # the shared first two blocks, not the third
    p.touch(hits)
    assert [p.ref_count(x) for x in hits] == [1, 1]
    assert p.num_free == 6 and p.usage == pytest.approx(2 / 8)
    assert hits[0] not in p.free_order()


def test_lru_eviction_order_and_block_removed():
    p = pool(4)
    first = store(p, list(range(8)))  # 2 blocks
    second = store(p, list(range(100, 108)))  # 2 blocks
    p.drain_events()
    p.free(first)  # freed tail first: first[1] then first[0]
    p.free(second)
    assert p.free_order() == [first[1], first[0], second[1], second[0]]
    got = p.allocate(1)
    assert got == [first[1]]
    h_first = p.hash_tokens(list(range(8)))
    assert p.drain_events() == [BlockRemoved([h_first[1]], "GPU")]
    assert p.cached_block(h_first[1]) is None
    assert p.cached_block(h_first[0]) == first[0]  # not evicted yet


def test_only_free_blocks_are_evicted():
    p = pool(4)
    used = store(p, list(range(8)))  # held (ref 1)
    freed = store(p, list(range(50, 58)))
    p.free(freed)
    p.drain_events()
    assert p.allocate(3) is None  # only 2 free
    got = p.allocate(2)
    assert sorted(got) == sorted(freed)
    assert all(p.ref_count(b) == 1 for b in used)
    assert p.find_cached(p.hash_tokens(list(range(8)))) == used
    evs = p.drain_events()  # one BlockRemoved per evicted block, as vLLM publishes them
    assert all(isinstance(e, BlockRemoved) and len(e.block_hashes) == 1 for e in evs)
    assert sorted(e.block_hashes[0] for e in evs) == sorted(p.hash_tokens(list(range(50, 58))))


def test_can_allocate_counts_revived_blocks():
    p = pool(4)
    ids = store(p, list(range(8)))
    p.free(ids)
    assert p.can_allocate(4)
    assert not p.can_allocate(3, touching=ids)  # touching takes 2 of the 4 free blocks
    assert p.can_allocate(2, touching=ids)


def test_clear_forgets_hashes_and_publishes_all_blocks_cleared():
    p = pool()
    ids = store(p, list(range(8)))
    p.free(ids)
    p.drain_events()
    p.clear()
    assert p.drain_events() == [AllBlocksCleared()]
    assert p.find_cached(p.hash_tokens(list(range(8)))) == []
    assert p.allocate(8) is not None
    assert p.drain_events() == []  # nothing left to remove


def test_double_free_is_caught():
    p = pool()
    ids = p.allocate(1)
    p.free(ids)
    with pytest.raises(AssertionError):
        p.free(ids)


def test_numpy_tokens_give_the_same_hashes():
    p = pool()
    toks = list(range(16))
    assert p.hash_tokens(np.asarray(toks, dtype=np.uint32)) == p.hash_tokens(toks)


def _wire_shapes(events: list) -> list:
    """In-process events in vLLM's shapes: one BlockRemoved per block, token ids as a list."""
    out: list = []
    for e in events:
        if isinstance(e, BlockRemoved):
            out.extend(BlockRemoved([h], e.medium) for h in e.block_hashes)
        elif isinstance(e, BlockStored):
            out.append(BlockStored(e.block_hashes, e.parent_block_hash, np.asarray(e.token_ids).tolist(),
                                   e.block_size, e.lora_id, e.medium, e.lora_name))
        else:
            out.append(e)
    return out


def test_in_process_events_are_the_wire_events_in_compact_shapes():
    """The virtual-time pool batches the evictions of one allocation into one BlockRemoved and keeps token ids
    as arrays; expanded, its events are exactly the vLLM-shaped ones, and the pools evolve identically."""
    rng = np.random.default_rng(5)
    wire, compact = BlockPool(24, BS, ROOT), BlockPool(24, BS, ROOT, in_process=True)
    held: list[list[int]] = []
    for step in range(300):
        if held and (rng.random() < 0.45 or wire.num_free < 6):
            ids = held.pop(int(rng.integers(len(held))))
            wire.free(ids)
            compact.free(ids)
        else:  # a request: a shared or fresh prefix, hits touched, the rest allocated and committed
            base = int(rng.integers(0, 6)) * 1000 if rng.random() < 0.6 else 10_000 + step * 100
            toks = np.arange(base, base + BS * int(rng.integers(1, 6)), dtype=np.uint32)
            hashes = wire.hash_tokens(toks)
            hits = wire.find_cached(hashes)
            assert compact.find_cached(hashes) == hits
            if not wire.can_allocate(len(hashes) - len(hits), hits):
                continue
            for p in (wire, compact):
                p.touch(hits)
            new = wire.allocate(len(hashes) - len(hits))
            assert compact.allocate(len(hashes) - len(hits)) == new
            ids = hits + (new or [])
            for p in (wire, compact):
                p.commit(ids[len(hits):], hashes[len(hits):], hashes[len(hits) - 1] if hits else None,
                         toks[len(hits) * BS:])
            held.append(ids)
        assert wire.free_order() == compact.free_order() and wire.num_cached == compact.num_cached
        w, c = wire.drain_events(), compact.drain_events()
        assert all(len(e.block_hashes) == 1 for e in w if isinstance(e, BlockRemoved))
        assert _wire_shapes(c) == w
    assert wire.counters == compact.counters


class _ReferencePool:
    """The pool's semantics in plain Python (an OrderedDict free queue, a dict map), as it was written before the
    compiled arrays: the randomized test below holds the pool to it operation by operation."""

    def __init__(self, n: int) -> None:
        from collections import OrderedDict

        self.ref = [0] * n
        self.hash: list[int | None] = [None] * n
        self.cached: dict[int, int] = {}
        self.free_q: OrderedDict[int, None] = OrderedDict((i, None) for i in range(n))
        self.removed: list[int] = []
        self.stored: list[list[int]] = []

    def find_cached(self, hashes: list[int], m: int) -> list[int]:
        out = []
        for h in hashes[:m]:
            b = self.cached.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def touch(self, ids: list[int]) -> None:
        for b in ids:
            if self.ref[b] == 0:
                del self.free_q[b]
            self.ref[b] += 1

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self.free_q):
            return None
        out = []
        for _ in range(n):
            b, _ = self.free_q.popitem(last=False)
            h = self.hash[b]
            if h is not None:
                self.hash[b] = None
                if self.cached.get(h) == b:
                    del self.cached[h]
                self.removed.append(h)
            self.ref[b] = 1
            out.append(b)
        return out

    def commit(self, ids: list[int], hashes: list[int]) -> None:
        stored = []
        for b, h in zip(ids, hashes):
            if self.hash[b] is not None:
                continue
            self.hash[b] = h
            self.cached.setdefault(h, b)
            stored.append(h)
        if stored:
            self.stored.append(stored)

    def free(self, ids: list[int]) -> None:
        for b in reversed(ids):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free_q[b] = None

    def clear(self) -> None:
        self.cached.clear()
        self.hash = [None] * len(self.hash)


def test_pool_equals_the_reference_on_random_operations():
    """Allocate, touch, commit (including hashes another block already holds, and blocks already hashed), free
    and clear at random: the same block ids, hits, free order, cached map, evictions and stored hashes."""
    rng = np.random.default_rng(11)
    for trial in range(20):
        n = int(rng.integers(4, 40))
        p, ref = BlockPool(n, BS, ROOT, in_process=True), _ReferencePool(n)
        held: list[list[int]] = []
        for _step in range(250):
            r = rng.random()
            if r < 0.02:
                p.clear()
                ref.clear()
            elif held and (r < 0.4 or p.num_free < 3):
                ids = held.pop(int(rng.integers(len(held))))
                p.free(ids)
                ref.free(ids)
            else:  # hashes from a small space, so prefixes and collisions with blocks in use recur
                k = int(rng.integers(1, 8))
                hashes = [int(x) * 2**60 + i for i, x in enumerate(rng.integers(0, 12, size=k))]
                m = int(rng.integers(0, k + 1))
                hits = p.find_cached(hashes, m)
                assert hits == ref.find_cached(hashes, m)
                need = k - len(hits)
                if not p.can_allocate(need, hits):
                    assert need > len(ref.free_q) - sum(1 for b in hits if ref.ref[b] == 0)
                    continue
                p.touch(hits)
                ref.touch(hits)
                new = p.allocate(need)
                assert new == ref.allocate(need)
                ids = hits + (new or [])
                start = int(rng.integers(0, k + 1))  # sometimes re-commit blocks that already have a hash
                p.commit(ids[start:], hashes[start:], None, np.arange(BS * k, dtype=np.uint32)[start * BS:])
                ref.commit(ids[start:], hashes[start:])
                held.append(ids)
            assert p.free_order() == list(ref.free_q)
            assert [p.ref_count(b) for b in range(n)] == ref.ref
            assert [p.block_hash(b) for b in range(n)] == ref.hash
            assert p.num_cached == len(ref.cached)
            assert all(p.cached_block(h) == b for h, b in ref.cached.items())
        events = p.drain_events()
        assert [h for e in events if isinstance(e, BlockRemoved) for h in e.block_hashes] == ref.removed
        assert [e.block_hashes for e in events if isinstance(e, BlockStored)] == ref.stored, trial


def test_bad_block_ids_are_errors():
    p = pool()
    with pytest.raises(IndexError):
        p.free([10**6])
    with pytest.raises(IndexError):
        p.touch([10**6])
