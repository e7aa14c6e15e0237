"""RowTable (the compiled hash -> row table of the prefix index and the block pool) against a plain dict."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.kvcache.rowtable import RowTable, as_keys, distinct_rows, rows_with_bit

# Keys from a small set, some of them equal modulo the table size: long probe runs, wrap-around at the end of
# the slots and deletions in the middle of runs (the backward shift) all happen.
keys = st.sampled_from([k * 2**k % 2**64 for k in range(40)] + list(range(16)) + [2**64 - 1, 2**63])
ops = st.lists(st.tuples(st.sampled_from(["insert", "delete", "lookup", "prefix"]), st.lists(keys, max_size=12)),
               max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops, st.integers(4, 64))
def test_table_behaves_as_a_dict(operations, capacity):
    t, ref, next_row = RowTable(capacity), {}, 0
    for op, ks in operations:
        q = np.asarray(ks, dtype=np.uint64)
        if op == "insert":  # absent keys, repeats allowed: a repeat gets its first occurrence's row
            absent = [k for k in ks if k not in ref]
            cand = np.arange(next_row, next_row + len(absent), dtype=np.int64)
            rows, used = t.insert_new(np.asarray(absent, dtype=np.uint64), cand)
            for k in absent:
                if k not in ref:
                    ref[k] = next_row
                    next_row += 1
            assert used == len(set(absent)) and rows.tolist() == [ref[k] for k in absent]
        elif op == "delete":
            assert t.delete(q) == len({k for k in ks if k in ref})
            for k in ks:
                ref.pop(k, None)
        elif op == "lookup":
            assert t.lookup(q).tolist() == [ref.get(k, -1) for k in ks]
        else:
            want = []
            for k in ks:
                if k not in ref:
                    break
                want.append(ref[k])
            assert t.prefix(q).tolist() == want
        assert len(t) == len(ref)
        got_keys, got_rows = t.items()
        assert dict(zip(got_keys.tolist(), got_rows.tolist())) == ref
        assert all(t.get(k) == r for k, r in ref.items())


def test_table_grows_and_keeps_every_entry():
    t = RowTable(16)
    ks = np.arange(10_000, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    rows, used = t.insert_new(ks, np.arange(10_000, dtype=np.int64))
    assert used == 10_000 and rows.tolist() == list(range(10_000))
    assert t.lookup(ks).tolist() == list(range(10_000))
    assert t.delete(ks[::2]) == 5_000
    assert t.lookup(ks).tolist() == [-1 if i % 2 == 0 else i for i in range(10_000)]


def test_helpers():
    mark = np.zeros(10, dtype=np.int64)
    assert distinct_rows(np.array([3, 1, 3, 2, 1]), mark, 1).tolist() == [3, 1, 2]
    assert distinct_rows(np.array([3, 3]), mark, 2).tolist() == [3]
    masks = np.zeros((6, 2, 1), dtype=np.uint64)
    masks[1, 0, 0] = 1 << 5
    masks[4, 1, 0] = (1 << 5) | 1
    assert rows_with_bit(masks, 6, 0, 5).tolist() == [1, 4] and rows_with_bit(masks, 4, 0, 5).tolist() == [1]
    h = [1, 2, 3]
    a = as_keys(h)
    assert as_keys(h) is a  # the last list is remembered ...
    h.append(4)
    assert as_keys(h).tolist() == [1, 2, 3, 4]  # ... until it changes
