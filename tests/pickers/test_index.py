"""BlockIndex and the block hasher: exact behaviour plus hypothesis properties against a plain model."""

from __future__ import annotations

import copy

import numpy as np
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.kvcache.hashing import ROOT_HASH, chain_hash, hash_blocks
from pickers.kvblocks.index import BlockIndex


def test_match_counts_prefix_blocks_per_pod():
    ix = BlockIndex(100, max_pods=4)
    h = hash_blocks(np.arange(64), 16)  # 4 blocks
    ix.add(0, h)  # pod 0 holds all 4
    ix.add(1, h[:2])  # pod 1 holds the first 2
    ix.add(2, h[1:])  # pod 2 lacks block 0: no prefix at all
    blocks, weighted = ix.match(h)
    assert blocks[:4].tolist() == [4, 2, 0, 0]
    assert weighted[:4].tolist() == [4.0, 2.0, 0.0, 0.0]
    assert ix.match(hash_blocks(np.arange(100, 164), 16)) is None


def test_medium_weights_use_best_medium_per_block():
    ix = BlockIndex(100, media=("GPU", "CPU"), weights=(1.0, 0.8), max_pods=2)
    h = hash_blocks(np.arange(48), 16)
    ix.add(0, h[:1], ix.medium_index("GPU"))
    ix.add(0, h[1:], ix.medium_index("cpu"))
    ix.add(0, h[1:2], ix.medium_index("GPU"))  # block 1 on both: counts as GPU
    blocks, weighted = ix.match(h)
    assert blocks[0] == 3
    assert abs(weighted[0] - (1.0 + 1.0 + 0.8)) < 1e-9
    assert ix.medium_index("NVME") == ix.medium_index("CPU")  # unknown media: lowest weight


def test_lru_eviction_keeps_recently_used():
    ix = BlockIndex(16, max_pods=1, initial_rows=4)
    old = list(range(1000, 1008))
    new = list(range(2000, 2008))
    ix.add(0, old)
    ix.add(0, new)
    ix.match([2000, 2001])  # touch
    ix.add(0, [3000])  # full: evicts 1 (16 // 16) least recently used
    assert len(ix) == 16
    assert ix.row_of(1000) is None and ix.row_of(2000) is not None and ix.row_of(3000) is not None
    ix.check_invariants()


def test_call_larger_than_cap_keeps_first_blocks():
    ix = BlockIndex(4, max_pods=1)
    ix.add(0, list(range(10, 20)))
    assert len(ix) <= 4
    assert ix.row_of(10) is not None
    ix.check_invariants()


def test_per_pod_cap_and_drop_pod():
    ix = BlockIndex(1000, max_pods=2, per_pod_cap=8)
    ix.add(0, list(range(1, 21)))
    ix.add(1, list(range(1, 5)))
    assert ix.pod_counts[0, 0] <= 8
    ix.check_invariants()
    assert ix.drop_pod(1) == 4
    assert ix.pod_counts[0, 1] == 0
    ix.check_invariants()


def test_ensure_pods_widens_masks():
    ix = BlockIndex(100, max_pods=64)
    ix.add(3, [7, 8])
    ix.ensure_pods(130)
    ix.add(129, [7])
    blocks, _ = ix.match([7, 8])
    assert blocks[3] == 2 and blocks[129] == 1
    ix.check_invariants()


# ---- hasher properties --------------------------------------------------------------------------------
tokens = st.lists(st.integers(0, 2**32 - 1), max_size=80)


@given(tokens, tokens, st.sampled_from([1, 4, 16]))
def test_hasher_blocks_equal_iff_prefixes_equal(a, b, bs):
    ha, hb = hash_blocks(a, bs), hash_blocks(b, bs)
    assert len(ha) == len(a) // bs
    for i in range(min(len(ha), len(hb))):
        same_prefix = a[: (i + 1) * bs] == b[: (i + 1) * bs]
        assert (ha[i] == hb[i]) == same_prefix


@given(tokens, st.sampled_from([2, 16]), st.integers(0, 5))
def test_hasher_chains_from_parent(a, bs, k):
    full = hash_blocks(a, bs)
    k = min(k, len(full))
    parent = full[k - 1] if k else ROOT_HASH
    assert hash_blocks(a[k * bs:], bs, parent) == full[k:]
    if full:
        assert chain_hash(ROOT_HASH, a[:bs]) == full[0]


@given(st.lists(st.integers(0, 2**32 - 1), max_size=300), st.integers(1, 40), st.integers(0, 2**64 - 1),
       st.one_of(st.none(), st.integers(0, 90)))
def test_hasher_gives_the_library_chain(a, bs, parent, limit):
    """hash_blocks computes XXH3 itself for blocks of 1-32 tokens and calls the library past that: both give
    exactly what chaining the library's xxh3_64 (chain_hash) block by block gives, for any seed."""
    ref, h = [], parent
    for i in range(len(a) // bs if limit is None else min(len(a) // bs, limit)):
        h = xxhash.xxh3_64_intdigest(np.asarray(a[i * bs:(i + 1) * bs], dtype=np.uint32).tobytes(), seed=h)
        assert h == chain_hash(ref[-1] if ref else parent, a[i * bs:(i + 1) * bs])
        ref.append(h)
    assert hash_blocks(a, bs, parent, limit) == ref
    assert hash_blocks(np.asarray(a, dtype=np.uint32), bs, parent, limit) == ref


def test_hasher_matches_the_library_on_each_branch():
    """Block sizes on each XXH3 branch the compiled hash implements (4-8, 9-16, 17-128 bytes) and past it."""
    toks = (np.arange(1, 129, dtype=np.uint64) * 2654435761 % 2**32).astype(np.uint32)
    for bs in (1, 2, 3, 4, 5, 8, 16, 24, 32, 33, 64):
        got = hash_blocks(toks, bs, ROOT_HASH, limit=2)
        assert got[0] == xxhash.xxh3_64_intdigest(toks[:bs].tobytes(), seed=ROOT_HASH)
        assert got[1] == xxhash.xxh3_64_intdigest(toks[bs:2 * bs].tobytes(), seed=got[0])


# ---- index properties ------------------------------------------------------------------------------------
ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "remove", "drop", "match"]),
        st.integers(0, 69),  # pod (crosses a 64-bit word)
        st.lists(st.integers(1, 40), max_size=12),  # block hashes
        st.integers(0, 1),  # medium
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_index_matches_model_without_eviction(operations):
    ix = BlockIndex(10_000, media=("GPU", "CPU"), weights=(1.0, 0.8), max_pods=70, initial_rows=2)
    model: dict[tuple[int, int], set[int]] = {}  # (pod, medium) -> hashes
    for op, pod, hashes, medium in operations:
        if op == "add":
            ix.add(pod, hashes, medium)
            model.setdefault((pod, medium), set()).update(hashes)
        elif op == "remove":
            ix.remove(pod, hashes, medium)
            model.setdefault((pod, medium), set()).difference_update(hashes)
        elif op == "drop":
            ix.drop_pod(pod)
            for m in (0, 1):
                model.pop((pod, m), None)
        else:
            res = ix.match(hashes, touch=False)
            expect = np.zeros(ix.pod_slots, dtype=np.int64)
            for p in range(70):
                n = 0
                for h in hashes:
                    if h in model.get((p, 0), ()) or h in model.get((p, 1), ()):
                        n += 1
                    else:
                        break
                expect[p] = n
            got = res[0] if res is not None else np.zeros(ix.pod_slots, dtype=np.int64)
            # match stops at the first block nobody holds, as the model does per pod
            assert got.tolist() == expect.tolist()
        ix.check_invariants()
    want = {}
    for (pod, medium), hs in model.items():
        for h in hs:
            want.setdefault(h, {}).setdefault(ix.media[medium], []).append(pod)
    got = {h: {m: sorted(p) for m, p in v.items()} for h, v in ix.contents().items()}
    assert got == {h: {m: sorted(p) for m, p in v.items()} for h, v in want.items()}
    for (pod, medium), hs in model.items():
        assert ix.pod_counts[medium, pod] == len(hs)


@settings(max_examples=150, deadline=None)
@given(ops, st.integers(1, 20), st.one_of(st.none(), st.integers(1, 10)))
def test_index_stays_within_caps_and_consistent(operations, cap, per_pod):
    ix = BlockIndex(cap, max_pods=70, per_pod_cap=per_pod, initial_rows=2)
    stored: dict[int, set[int]] = {}
    for op, pod, hashes, _ in operations:
        if op == "add":
            ix.add(pod, hashes)
            stored.setdefault(pod, set()).update(hashes)
        elif op == "remove":
            ix.remove(pod, hashes)
            stored.setdefault(pod, set()).difference_update(hashes)
        elif op == "drop":
            ix.drop_pod(pod)
            stored.pop(pod, None)
        else:
            ix.match(hashes)
        ix.check_invariants()
        assert len(ix) <= cap
        # never invents: everything indexed for a pod was stored by it and not removed since
        for h, media in ix.contents().items():
            for p in media.get("GPU", ()):
                assert h in stored.get(p, ())


def _walk_reference(ix: BlockIndex, hashes: list[int]) -> list[int]:
    """Per pod: leading blocks held (any medium), by a plain walk over the contents."""
    held = ix.contents()
    out = [0] * ix.pod_slots
    alive = set(range(ix.pod_slots))
    for i, h in enumerate(hashes):
        pods = {p for ps in held.get(h, {}).values() for p in ps}
        alive &= pods
        if not alive:
            break
        for p in alive:
            out[p] = i + 1
    return out


prompts = st.lists(st.integers(1, 3), min_size=1, max_size=4)  # chunk labels: shared prefixes repeat


@settings(max_examples=120, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["learn", "remove", "drop", "match"]), st.integers(0, 3), prompts,
                          st.integers(0, 127)), max_size=40), st.integers(64, 400))
def test_chunk_row_cache_never_changes_match(operations, cap):
    """Long prompts (32-block chunks) through learn/match with removals and LRU eviction in between: the
    chunk-row cache must give the exact walk's answer every time."""
    ix = BlockIndex(cap, max_pods=4)

    def hashes_of(labels):
        return hash_blocks(np.repeat(np.asarray(labels, dtype=np.uint32), 32 * 16), 16)  # 32 blocks per label

    for op, pod, labels, k in operations:
        hs = hashes_of(labels)
        if op == "learn":
            ix.add(pod, hs, unique=True)
        elif op == "remove":
            ix.remove(pod, hs[k % len(hs):k % len(hs) + 1])
        elif op == "drop":
            ix.drop_pod(pod)
        got = ix.match(hs, touch=False)
        want = _walk_reference(ix, hs)
        assert (got[0].tolist() if got is not None else [0] * ix.pod_slots) == want
        ix.check_invariants()


def test_chunk_row_cache_entry_made_stale_by_row_reuse_is_not_trusted():
    ix = BlockIndex(1000, max_pods=4)
    a = hash_blocks(np.arange(64 * 16), 16)  # 64 blocks: two cached chunks after a walk
    b = hash_blocks(np.arange(10**6, 10**6 + 16), 16)  # one unrelated block
    ix.add(0, a, unique=True)
    ix.add(1, a[:40], unique=True)
    assert ix.match(a)[0][:2].tolist() == [64, 40]  # walks and caches the chunks
    ix.remove(0, [a[10]])
    ix.remove(1, [a[10]])  # row of a[10] is free now
    ix.add(1, b)  # ... and reused for b, held by pod 1
    assert ix.match(a)[0][:2].tolist() == [10, 10]
    ix.add(0, [a[10]])
    assert ix.match(a)[0][:2].tolist() == [64, 10]
    ix.check_invariants()


@settings(max_examples=100, deadline=None)
@given(ops, st.integers(1, 30))
def test_bulk_row_allocation_equals_one_by_one(operations, cap):
    """Same rows for the same hashes (so LRU ties among equal stamps evict the same blocks)."""
    bulk, single = BlockIndex(cap, max_pods=70), BlockIndex(cap, max_pods=70)
    single._fits = lambda q: False  # the reference: one by one, as _alloc gives rows
    for op, pod, hashes, _medium in operations:
        for ix in (bulk, single):
            if op == "add":
                ix.add(pod, hashes)
            elif op == "remove":
                ix.remove(pod, hashes)
            elif op == "drop":
                ix.drop_pod(pod)
        assert bulk.rows_by_key() == single.rows_by_key() and bulk.contents() == single.contents()
        assert np.array_equal(bulk._stamp, single._stamp)


def test_remove_rows_clears_what_remove_by_hash_clears():
    """Pending blocks are cleared through the rows ``add_rows`` returned; rows freed or reused since (and
    hashes re-added elsewhere) fall back to the hash lookup, so the index ends as ``remove`` leaves it."""
    a = BlockIndex(1000, media=("GPU", "P"), max_pods=4)
    hs = list(range(100, 160))
    _, rows = a.add_rows(1, hs, 1, unique=True)
    keys = a.keys_of(rows)
    a.add(2, hs[:10], 0)  # another pod holds the first blocks: those rows stay
    a.remove(1, hs[40:50], 1, unique=True)  # rows freed ...
    a.add(3, list(range(900, 905)), 0)  # ... and reused by other hashes
    a.add(1, hs[45:48], 1, unique=True)  # some hashes pended again, now in other rows
    b = copy.deepcopy(a)
    assert a.remove_rows(1, hs, rows, keys, 1) == b.remove(1, hs, 1)
    assert a.contents() == b.contents() and np.array_equal(a.pod_counts, b.pod_counts)
    a.check_invariants()
    assert a.pods_holding(hs[0]) == {"GPU": [2]} and a.pods_holding(hs[46]) == {}
