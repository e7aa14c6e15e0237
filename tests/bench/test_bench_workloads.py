"""Workload generators: sharing structure, reproducibility, scaling."""

from __future__ import annotations

import json

import numpy as np
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


def test_day_shape_swings_five_to_one_and_has_a_burst():
    shape = w.day_rate_shape(3600.0, peak_to_trough=5.0, burst_at=0.75, burst_s=120.0, burst_factor=2.0)
    # the burst doubles the rate at 3/4 of the day (where the cosine is at its mean): 2 / (1/3)
    assert shape.max() / shape.min() == pytest.approx(6.0, rel=0.02)
    plain = w.day_rate_shape(3600.0, burst_factor=1.0)
    assert plain.max() / plain.min() == pytest.approx(5.0, rel=0.01)
    assert int(plain.argmax()) in range(1795, 1805) and int(plain.argmin()) in (0, 3599)
    with pytest.raises(ValueError):
        w.day_rate_shape(3600.0, peak_to_trough=0.5)


def test_day_workload_follows_the_shape_with_the_exact_count():
    wl = w.day(num_requests=6000, duration_s=3600.0, seed=1)
    ts = np.array([r.timestamp for r in wl.records]) / 1000.0
    assert len(ts) == 6000 and (np.diff(ts) >= 0).all() and ts[0] == 0 and ts[-1] <= 3600
    per10 = np.histogram(ts, bins=36, range=(0, 3600))[0]
    assert 3.5 < per10[17] / per10[0] < 7.0  # noon vs midnight, 5x on average
    burst = ((ts >= 2700) & (ts < 2820)).sum() / 120.0
    after = ((ts >= 2820) & (ts < 2940)).sum() / 120.0
    assert burst > 1.6 * after
    again = w.day(num_requests=6000, duration_s=3600.0, seed=1)
    assert [r.to_json() for r in again.records] == [r.to_json() for r in wl.records]
    assert [r.timestamp for r in w.day(num_requests=6000, seed=2).records] != [r.timestamp for r in wl.records]


def test_day_workload_from_a_trace_cycles_it_with_fresh_ids_per_pass(tmp_path):
    src = tmp_path / "t.jsonl"
    rows = [{"timestamp": 100 * i, "input_length": 600 + i, "output_length": 5 + i,
             "hash_ids": [0, 1] if i % 2 else [0, 2]} for i in range(4)]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    wl = w.make("day", path=src, num_requests=10, duration_s=60.0, seed=0)
    assert [r.input_length for r in wl.records] == [600, 601, 602, 603] * 2 + [600, 601]
    assert wl.records[0].hash_ids == [0, 2] and wl.records[4].hash_ids == [3, 5]  # pass 2: ids + (max + 1)
    assert wl.records[8].hash_ids == [6, 8]
    rated = w.make("day", rate=2.0, path=src, duration_s=60.0)
    assert len(rated.records) == 120


def test_day_workload_synthetic_mix_of_chat_and_long_prompts():
    wl = w.day(num_requests=3000, long_share=0.3, seed=4)
    ins = np.array([r.input_length for r in wl.records])
    long_share = float((ins > 6000).mean())
    assert 0.2 < long_share < 0.4
    from collections import Counter

    first = Counter(tuple(r.hash_ids[:2]) for r in wl.records)
    shared = sum(n for _, n in first.most_common(32))
    assert shared >= 0.65 * len(wl.records)  # chat turns start with one of 32 shared system prompts
    with pytest.raises(ValueError):
        w.day(long_share=1.5)


def test_written_multi_turn_trace_gives_each_hash_id_one_block_size(tmp_path):
    """aiperf refuses a trace that uses one hash id at two sizes (every real-time multi-turn run failed so):
    a chat turn ends in a partial block the next turn has in full. Written, the partial use gets an id of its
    own, and each turn still starts with every full block of the previous turn of its conversation."""
    from e2e.bench.vcurve import WORKLOADS

    wl = WORKLOADS["multi-turn"].make(0, 56)

    def sized(recs):
        seen: dict[int, set[int]] = {}
        for r in recs:
            n = len(r["hash_ids"])
            for i, h in enumerate(r["hash_ids"]):
                size = BLOCK_TOKENS if i < n - 1 else r["input_length"] - (n - 1) * BLOCK_TOKENS
                seen.setdefault(h, set()).add(min(size, BLOCK_TOKENS))
        return seen

    raw = [{"input_length": r.input_length, "hash_ids": r.hash_ids} for r in wl.records]
    assert any(len(s) > 1 for s in sized(raw).values())  # the generator's ids do mix sizes
    written = [json.loads(line) for line in wl.write(tmp_path / "t.jsonl").read_text().splitlines()]
    assert all(len(s) == 1 for s in sized(written).values())
    assert [x["input_length"] for x in written] == [r.input_length for r in wl.records]
    by_conv: dict[str, list[dict]] = {}
    for rec, x in zip(wl.records, written):
        by_conv.setdefault(rec.session_id, []).append(x)
    for turns in by_conv.values():
        for prev, nxt in zip(turns, turns[1:]):
            full = prev["input_length"] // BLOCK_TOKENS
            assert nxt["hash_ids"][:full] == prev["hash_ids"][:full]
