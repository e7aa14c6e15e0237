"""The precise index fed with vLLM KV events (direct feeding; the ZMQ path is in test_zmq.py)."""

from __future__ import annotations

import numpy as np
import pytest

from pickers.kvblocks.events import EventError, decode_payload, encode_batch
from pickers.kvblocks.hashing import hash_blocks

from .helpers import BS, cleared, endpoints, removed, request, scheduler, stored

TOK = np.arange(1, 4 * BS + 1)  # 4 blocks


@pytest.mark.parametrize("positional", [False, True])
def test_stored_chain_removed_cleared(positional):
    s, clock = scheduler(eps=endpoints(2, kv=True))
    kv = s.datalayer.kv_index
    a = "10.0.0.1:8000"
    own = hash_blocks(TOK, BS)
    kv.apply_events(a, [stored([101, 102], TOK[: 2 * BS], positional=positional)], now=clock.now())
    # the next two blocks chain from engine hash 102
    kv.apply_events(a, [stored([103, 104], TOK[2 * BS:], parent=102, positional=positional)], now=clock.now())
    assert kv.index.match(own)[0][0] == 4
    assert kv.engine_map_size(0) == 4
    kv.apply_events(a, [removed([104], positional=positional)], now=clock.now())
    assert kv.index.match(own)[0][0] == 3
    assert own[3] not in kv.index._slot_of
    kv.apply_events(a, [cleared(positional)], now=clock.now())
    assert len(kv.index) == 0 and kv.engine_map_size(0) == 0
    kv.check_invariants()


def test_cpu_medium_weighted_and_orphan_skipped():
    s, clock = scheduler(eps=endpoints(1, kv=True))
    kv = s.datalayer.kv_index
    a = "10.0.0.1:8000"
    kv.apply_events(a, [stored([1, 2], TOK[: 2 * BS], medium="CPU")])
    blocks, weighted = kv.index.match(hash_blocks(TOK, BS))
    assert blocks[0] == 2 and abs(weighted[0] - 1.6) < 1e-9
    kv.apply_events(a, [stored([9], TOK[3 * BS:], parent=777)])  # unknown parent: cannot be hashed
    assert kv.stats["orphans"] == 1 and len(kv.index) == 2


def test_sequence_gap_drops_pod_and_marks_degraded():
    s, clock = scheduler(eps=endpoints(2, kv=True), raw={"prefix": {"precise": {"degraded_after_s": 5}}})
    kv = s.datalayer.kv_index
    a, b = "10.0.0.1:8000", "10.0.0.2:8000"
    kv.apply_events(a, [stored([1, 2], TOK[: 2 * BS])], now=clock.now(), seq=1)
    kv.apply_events(b, [stored([1, 2], TOK[: 2 * BS])], now=clock.now(), seq=1)
    kv.apply_events(a, [stored([3], TOK[2 * BS: 3 * BS], parent=2)], now=clock.now(), seq=2)
    assert kv.index.match(hash_blocks(TOK, BS))[0][:2].tolist() == [3, 2]
    kv.apply_events(a, [stored([5], TOK[: BS])], now=clock.now(), seq=7)  # gap 2 -> 7
    assert kv.stats["gaps"] == 1
    assert kv.index.match(hash_blocks(TOK, BS))[0][:2].tolist() == [1, 2]  # a re-learns from scratch
    s.decide(request("r", TOK))
    deg = lambda addr: s.test_registry.get_sample_value("kvswitch_prefix_index_degraded", {"endpoint": addr})
    assert deg(a) == 1.0 and deg(b) in (None, 0.0)
    clock.advance(6)
    s.decide(request("r2", TOK))
    assert deg(a) == 0.0


def test_silent_pod_degrades_and_falls_back_to_approximate():
    s, clock = scheduler(eps=endpoints(2, kv=True), raw={"profile": "precise",
                                                          "prefix": {"precise": {"degraded_after_s": 2}}})
    deg = lambda addr: s.test_registry.get_sample_value("kvswitch_prefix_index_degraded", {"endpoint": addr})
    d = s.decide(request("r1", TOK))
    first = d.primary
    clock.advance(3)  # routed traffic, no events for 3 s
    d2 = s.decide(request("r2", TOK))
    assert deg(first) == 1.0
    # degraded pod is scored from the approximate index, which learned r1: full prefix hit
    assert d2.explanation[first]["prefix"] == pytest.approx(1.0)
    s.datalayer.kv_index.apply_events(first, [stored([1], TOK[:BS])], now=clock.now())
    s.decide(request("r3", TOK))
    assert deg(first) == 0.0


def test_payload_decoding_both_batch_forms_and_errors():
    ev = stored([1], TOK[:BS])
    b = decode_payload(encode_batch([ev, ["BlockRemoved", [1], "GPU"], {"type": "Unknown"}], ts=3.5, dp_rank=0))
    assert [type(e).__name__ for e in b.events] == ["BlockStored", "BlockRemoved"] and b.unknown == 1
    assert b.ts == 3.5 and b.dp_rank == 0
    import msgspec

    b2 = decode_payload(msgspec.msgpack.encode({"ts": 1.0, "events": [ev]}))
    assert len(b2.events) == 1
    with pytest.raises(EventError):
        decode_payload(b"\xc1")
    with pytest.raises(EventError):
        decode_payload(msgspec.msgpack.encode([1.0, [42]]))


def test_bytes_hashes_are_identities():
    s, clock = scheduler(eps=endpoints(1, kv=True))
    kv = s.datalayer.kv_index
    a = "10.0.0.1:8000"
    kv.apply_events(a, [stored([b"\x01" * 32, b"\x02" * 32], TOK[: 2 * BS])])
    kv.apply_events(a, [stored([b"\x03" * 32], TOK[2 * BS: 3 * BS], parent=b"\x02" * 32)])
    assert kv.index.match(hash_blocks(TOK, BS))[0][0] == 3
    kv.apply_events(a, [removed([b"\x03" * 32])])
    assert kv.index.match(hash_blocks(TOK, BS))[0][0] == 2


def test_full_prefix_hits_without_events_do_not_degrade():
    """A pod that only serves prompts it already holds stores nothing new and sends no event: not a loss."""
    s, clock = scheduler(eps=endpoints(1, kv=True), raw={"profile": "precise",
                                                          "prefix": {"precise": {"degraded_after_s": 2}}})
    a = "10.0.0.1:8000"
    deg = lambda: s.test_registry.get_sample_value("kvswitch_prefix_index_degraded", {"endpoint": a})
    kv = s.datalayer.kv_index
    kv.apply_events(a, [stored([1, 2, 3, 4], TOK)], now=clock.now())
    for i in range(5):
        clock.advance(1.5)
        s.decide(request(f"hit{i}", TOK))  # every full block already held: nothing to announce
    assert not kv.degraded_mask(clock.now())[0] and deg() in (None, 0.0)
    # a prompt with a new full block must produce an event; silence after it is evidence of loss
    s.decide(request("new", np.arange(1, 6 * BS + 1)))
    clock.advance(3)
    s.decide(request("after", TOK))
    assert deg() == 1.0 and "uncached full blocks" in kv.reasons[0]
