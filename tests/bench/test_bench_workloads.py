"""Workload generators: sharing structure, reproducibility, scaling."""

from __future__ import annotations

import json

import pytest

from e2e.bench import workloads as w
from e2e.bench.workloads import BLOCK_TOKENS


def test_shared_prefix_groups_share_exactly_their_prefix_blocks():
    wl = w.shared_prefix(num_requests=60, groups=3, prefix_tokens=2048, question_tokens=300, output_tokens=32,
                         rate=5.0, seed=1)
    shared = 2048 // BLOCK_TOKENS
    prefixes = {tuple(r.hash_ids[:shared]) for r in wl.records}
    assert len(prefixes) == 3
    tails = [h for r in wl.records for h in r.hash_ids[shared:]]
    assert len(tails) == len(set(tails)), "question blocks must be unique to their request"
    assert not set(tails) & {h for p in prefixes for h in p}
    for r in wl.records:
        assert r.input_length == 2348 and r.output_length == 32
        assert len(r.hash_ids) == -(-r.input_length // BLOCK_TOKENS)


def test_seed_reproduces_and_differs():
    a = w.shared_prefix(num_requests=30, seed=7)
    b = w.shared_prefix(num_requests=30, seed=7)
    c = w.shared_prefix(num_requests=30, seed=8)
    assert [r.to_json() for r in a.records] == [r.to_json() for r in b.records]
    assert [r.to_json() for r in a.records] != [r.to_json() for r in c.records]
    assert w.no_sharing(seed=3).records == w.no_sharing(seed=3).records
    assert w.multi_turn(seed=3).records == w.multi_turn(seed=3).records


def test_poisson_rate_is_close_to_requested():
    wl = w.no_sharing(num_requests=2000, rate=20.0, seed=0)
    assert wl.records[0].timestamp == 0
    ts = [r.timestamp for r in wl.records]
    assert ts == sorted(ts)
    assert 18.0 < (len(ts) - 1) / (ts[-1] / 1000) < 22.0
    with pytest.raises(ValueError):
        w.no_sharing(rate=0)


def test_no_sharing_has_no_repeated_block_and_bounded_lengths():
    wl = w.no_sharing(num_requests=300, max_input=2000, max_output=300, seed=2)
    ids = [h for r in wl.records for h in r.hash_ids]
    assert len(ids) == len(set(ids))
    assert wl.stats()["reusable_block_share"] == 0.0
    assert all(4 <= r.input_length <= 2000 and 1 <= r.output_length <= 300 for r in wl.records)
    assert len({r.input_length for r in wl.records}) > 50  # a distribution, not a constant


def test_multi_turn_each_turn_extends_the_previous_one():
    wl = w.multi_turn(conversations=5, turns=4, system_tokens=1024, seed=4)
    assert len(wl.records) == 20
    by_conv: dict[str, list] = {}
    for r in sorted(wl.records, key=lambda r: r.timestamp):
        by_conv.setdefault(r.session_id, []).append(r)
    system = wl.records[0].hash_ids[:2]
    for turns in by_conv.values():
        assert len(turns) == 4
        for prev, cur in zip(turns, turns[1:]):
            assert cur.hash_ids[: len(prev.hash_ids)] == prev.hash_ids
            assert len(cur.hash_ids) > len(prev.hash_ids)
            # the previous prompt's blocks are all full in the next prompt
            assert cur.input_length >= len(prev.hash_ids) * BLOCK_TOKENS
            assert cur.timestamp > prev.timestamp
        assert turns[0].hash_ids[:2] == system
    firsts = [t[0].hash_ids[2:] for t in by_conv.values()]
    assert len({tuple(f) for f in firsts}) == 5  # conversations differ after the system prompt


def test_mooncake_window_scaled_and_truncated(tmp_path):
    src = tmp_path / "t.jsonl"
    rows = [{"timestamp": 1000 + 500 * i, "input_length": 600 * (i + 1), "output_length": 50 * (i + 1),
             "hash_ids": list(range(10 * i, 10 * i + -(-600 * (i + 1) // 512)))} for i in range(6)]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    wl = w.mooncake(path=src, num_requests=4, start_ms=1500, speedup=2.0, max_input_tokens=1024,
                    max_output_tokens=120)
    assert [r.timestamp for r in wl.records] == [0, 250, 500, 750]
    assert all(r.input_length <= 1024 and len(r.hash_ids) == 2 for r in wl.records)
    assert wl.records[0].hash_ids == rows[1]["hash_ids"][:2]
    assert [r.output_length for r in wl.records] == [100, 120, 120, 120]
    faster = w.make("mooncake", rate=8.0, path=src, num_requests=None, max_input_tokens=None)
    assert faster.duration_s == pytest.approx(5 / 8.0, abs=0.01)


def test_real_mooncake_trace_loads():
    if not w.DEFAULT_MOONCAKE_TRACE.exists():
        pytest.skip("shared trace not present")
    wl = w.mooncake(num_requests=100, max_input_tokens=8192)
    assert len(wl.records) == 100
    assert wl.stats()["reusable_block_share"] > 0.0


def test_written_trace_is_mooncake_jsonl_without_session(tmp_path):
    wl = w.multi_turn(conversations=2, turns=2, seed=0)
    lines = wl.write(tmp_path / "x.jsonl").read_text().splitlines()
    assert len(lines) == 4
    for line in lines:
        assert set(json.loads(line)) == {"timestamp", "input_length", "output_length", "hash_ids"}


def test_make_rejects_unknown():
    with pytest.raises(ValueError, match="unknown workload"):
        w.make("nope")
    with pytest.raises(TypeError):
        w.make("no-sharing", bogus=1)
