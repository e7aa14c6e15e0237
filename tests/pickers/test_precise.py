"""The precise index fed with vLLM KV events (direct feeding; the ZMQ path is in test_zmq.py)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.kvcache.hashing import hash_blocks
from pickers.kvblocks.events import EventError, decode_payload, encode_batch

from .helpers import BS, cleared, endpoints, removed, request, scheduler, stored

TOK = np.arange(1, 4 * BS + 1)  # 4 blocks


@pytest.mark.parametrize("positional", [False, True])
def test_stored_chain_removed_cleared(positional):
    s, clock = scheduler(eps=endpoints(2, kv=True))
    kv = s.dl.kv_index
    a = "10.0.0.1:8000"
    own = hash_blocks(TOK, BS)
    kv.apply_events(a, [stored([101, 102], TOK[: 2 * BS], positional=positional)], now=clock.now())
    # the next two blocks chain from engine hash 102
    kv.apply_events(a, [stored([103, 104], TOK[2 * BS:], parent=102, positional=positional)], now=clock.now())
    assert kv.index.match(own)[0][0] == 4
    assert kv.engine_map_size(0) == 4
    kv.apply_events(a, [removed([104], positional=positional)], now=clock.now())
    assert kv.index.match(own)[0][0] == 3
    assert kv.index.row_of(own[3]) is None
    kv.apply_events(a, [cleared(positional)], now=clock.now())
    assert len(kv.index) == 0 and kv.engine_map_size(0) == 0
    kv.check_invariants()


def test_cpu_medium_weighted_and_orphan_skipped():
    s, clock = scheduler(eps=endpoints(1, kv=True))
    kv = s.dl.kv_index
    a = "10.0.0.1:8000"
    kv.apply_events(a, [stored([1, 2], TOK[: 2 * BS], medium="CPU")])
    blocks, weighted = kv.index.match(hash_blocks(TOK, BS))
    assert blocks[0] == 2 and abs(weighted[0] - 1.6) < 1e-9
    kv.apply_events(a, [stored([9], TOK[3 * BS:], parent=777)])  # unknown parent: cannot be hashed
    assert kv.stats["orphans"] == 1 and len(kv.index) == 2


def test_sequence_gap_drops_pod_and_marks_degraded():
    s, clock = scheduler(eps=endpoints(2, kv=True), raw={"prefix": {"precise": {"degraded_after_s": 5}}})
    kv = s.dl.kv_index
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
    s.on_first_token(d, clock.now())
    clock.advance(3)  # r1's blocks are committed at its first token, no events for 3 s
    d2 = s.decide(request("r2", TOK))
    assert deg(first) == 1.0
    # degraded pod is scored from the approximate index, which learned r1: full prefix hit
    assert d2.explanation[first]["prefix"] == pytest.approx(1.0)
    s.dl.kv_index.apply_events(first, [stored([1], TOK[:BS])], now=clock.now())
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
    kv = s.dl.kv_index
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
    kv = s.dl.kv_index
    kv.apply_events(a, [stored([1, 2, 3, 4], TOK)], now=clock.now())
    for i in range(5):
        clock.advance(1.5)
        s.decide(request(f"hit{i}", TOK))  # every full block already held: nothing to announce
    assert not kv.degraded_mask(clock.now())[0] and deg() in (None, 0.0)
    # a prompt with a new full block must produce an event; silence after it is evidence of loss
    d = s.decide(request("new", np.arange(1, 6 * BS + 1)))
    s.on_first_token(d, clock.now())
    clock.advance(3)
    s.decide(request("after", TOK))
    assert deg() == 1.0 and "uncached full blocks" in kv.reasons[0]


# ---- pending (speculative) blocks -------------------------------------------------------------------------
LONG = np.arange(1, 64 * BS + 1)  # 64 blocks nobody holds yet


def _precise(n=3, **precise):
    return scheduler(eps=endpoints(n, kv=True), raw={"profile": "precise", "prefix": {"precise": precise}})


def test_second_request_before_any_event_follows_the_first_to_its_pod():
    s, clock = _precise()
    d1 = s.decide(request("r1", LONG))
    clock.advance(0.05)  # r1's prefill still runs: no BlockStored yet
    d2 = s.decide(request("r2", np.concatenate([LONG, np.arange(9000, 9000 + 2 * BS)])))
    assert d2.primary == d1.primary
    assert d2.explanation[d1.primary]["prefix"] > 0.9  # no event yet: the pod holds r1's blocks as pending
    kv = s.dl.kv_index
    assert kv.pending_count() == 64 + 66
    kv.check_invariants()


def test_pending_blocks_go_at_first_token_failure_or_ttl():
    s, clock = _precise(pending_ttl_s=2)
    kv = s.dl.kv_index
    own = hash_blocks(LONG, BS)
    d1 = s.decide(request("r1", LONG))
    a = s.dl.endpoints.slot(d1.primary)
    assert kv.index.match(own)[0][a] == 64
    s.on_first_token(d1, clock.now())
    assert kv.index.match(own) is None and kv.pending_count() == 0
    d2 = s.decide(request("r2", LONG))
    s.on_failed(d2, "boom", clock.now())
    assert kv.index.match(own) is None
    s.decide(request("r3", LONG))
    clock.advance(2.5)
    s.decide(request("other", np.arange(50_000, 50_000 + 4 * BS)))  # refresh expires r3's blocks
    assert kv.index.match(own) is None
    # the events' own blocks are untouched by clearing pending ones
    kv.apply_events(d1.primary, [stored([1, 2], LONG[: 2 * BS])], now=clock.now())
    d4 = s.decide(request("r4", LONG))
    s.on_first_token(d4, clock.now())
    assert kv.index.match(own)[0][a] == 2
    assert all("(pending)" not in m for m in kv.contents_by_address().values())
    kv.check_invariants()


def test_pending_blocks_are_capped_oldest_first():
    s, clock = _precise(pending_max_blocks=100)
    kv = s.dl.kv_index
    d1 = s.decide(request("r1", LONG))
    other = np.arange(70_000, 70_000 + 64 * BS)
    s.decide(request("r2", other))
    assert kv.pending_count() == 64  # r1's 64 went to make room
    assert kv.index.match(hash_blocks(LONG, BS)) is None
    assert kv.index.match(hash_blocks(other, BS)) is not None
    s.on_finished(d1, None, clock.now())  # already gone: harmless
    kv.check_invariants()


def test_unknown_media_never_land_in_the_pending_column():
    s, clock = _precise(medium_weights={"GPU": 1.0})
    kv = s.dl.kv_index
    kv.apply_events("10.0.0.1:8000", [stored([1], LONG[:BS], medium="DISK"), stored([2], LONG[BS:2 * BS], parent=1,
                                                                                     medium=None)])
    assert kv.index.pods_holding(hash_blocks(LONG, BS)[0]) == {"GPU": [0]}
    assert kv.index.pods_holding(hash_blocks(LONG, BS)[1]) == {"GPU": [0]}


def test_pd_decision_pends_on_the_prefill_pod_too():
    from pickers.types import Endpoint

    eps = [Endpoint(f"10.0.1.{i + 1}:8000", role="prefill", kv_events=f"tcp://127.0.0.1:{20 + i}") for i in range(2)]
    eps += [Endpoint(f"10.0.2.{i + 1}:8000", role="decode", kv_events=f"tcp://127.0.0.1:{30 + i}") for i in range(2)]
    handler = {"type": "prefill-decode", "decider": "threshold"}  # a leg for 4096 uncached tokens, none once cached
    s, clock = scheduler(eps=eps, raw={"profile": "precise", "handler": handler})
    toks = np.arange(1, 4096 + 1)
    d = s.decide(request("r1", toks))
    assert d.prefill is not None
    kv = s.dl.kv_index
    blocks = kv.index.match(hash_blocks(toks, BS))[0]
    ep = s.dl.endpoints
    assert blocks[ep.slot(d.prefill)] == 256 and blocks[ep.slot(d.primary)] == 256
    clock.advance(0.05)
    d2 = s.decide(request("r2", toks))  # its prefix is (speculatively) on r1's decode pod: no leg
    assert d2.primary == d.primary and d2.prefill is None


# ---- degradation judged from the first token ----------------------------------------------------------------
def _deg(s, addr):
    return s.test_registry.get_sample_value("kvswitch_prefix_index_degraded", {"endpoint": addr}) or 0.0


def test_long_prefill_is_not_silence_the_clock_starts_at_first_token():
    s, clock = _precise(degraded_after_s=10)
    d = s.decide(request("long", LONG))
    a = d.primary
    clock.advance(15)  # a 100K-token prefill takes longer than degraded_after_s: no event, no first token yet
    s.decide(request("x", np.arange(80_000, 80_000 + 2 * BS)))
    assert _deg(s, a) == 0.0
    s.on_first_token(d, clock.now())  # the blocks are committed now, and still no event came
    clock.advance(5)
    s.decide(request("y", np.arange(90_000, 90_000 + 2 * BS)))
    assert _deg(s, a) == 0.0
    clock.advance(6)
    s.decide(request("z", np.arange(95_000, 95_000 + 2 * BS)))
    assert _deg(s, a) == 1.0 and "uncached full blocks" in s.dl.kv_index.reasons[s.dl.endpoints.slot(a)]


def test_events_during_the_prefill_satisfy_it_and_finish_starts_the_clock_without_first_token():
    s, clock = _precise(degraded_after_s=10)
    d = s.decide(request("r1", LONG))
    a = d.primary
    clock.advance(8)
    s.dl.kv_index.apply_events(a, [stored([1, 2], LONG[: 2 * BS])], now=clock.now())  # chunked prefill
    clock.advance(4)
    s.on_first_token(d, clock.now())
    clock.advance(30)
    s.decide(request("later", np.arange(80_000, 80_000 + 2 * BS)))
    assert _deg(s, a) == 0.0  # the pod announced blocks after r1 was routed: alive
    # no first token reported (a non-streamed response): the end starts the clock
    other = np.arange(200_000, 200_000 + 8 * BS)
    d2 = s.decide(request("r2", other, max_tokens=4))
    b = d2.primary
    clock.advance(5)
    s.on_finished(d2, None, clock.now())
    clock.advance(7)  # 12 s after routing, 7 s after the end
    s.decide(request("after", np.arange(80_000, 80_000 + 2 * BS)))
    assert _deg(s, b) == 0.0
    clock.advance(4)
    s.decide(request("after2", np.arange(80_000, 80_000 + 2 * BS)))
    assert _deg(s, b) == 1.0


def test_failed_request_is_no_evidence_and_gaps_still_degrade_at_once():
    s, clock = _precise(degraded_after_s=10)
    d = s.decide(request("r1", LONG))
    a = d.primary
    s.on_failed(d, "upstream reset", clock.now())
    clock.advance(30)
    s.decide(request("x", np.arange(80_000, 80_000 + 2 * BS)))
    assert _deg(s, a) == 0.0
    kv = s.dl.kv_index
    kv.apply_events(a, [stored([1], LONG[:BS])], now=clock.now(), seq=1)
    kv.apply_events(a, [stored([2], LONG[BS:2 * BS], parent=1)], now=clock.now(), seq=5)
    s.decide(request("y", np.arange(90_000, 90_000 + 2 * BS)))
    assert _deg(s, a) == 1.0


# ---- cost: who reads KV events, batched removals, records handed over directly ----------------------------
@pytest.mark.parametrize("raw,uses", [
    ({"profile": "load-only"}, False), ({"profile": "approximate"}, False), ({"profile": "round-robin"}, False),
    ({"profile": "precise"}, True), ({"profile": "default"}, True),
    ({"profile": "load-only", "handler": {"type": "prefill-decode"}}, True),  # the P/D decider reads it
    ({"profile": "load-only", "handler": {"type": "prefill-decode", "mode": "approximate"}}, False),
])
def test_kv_events_are_used_only_when_a_plugin_reads_the_precise_index(raw, uses):
    s, clock = scheduler(raw=raw, eps=endpoints(2, kv=True))
    assert s.uses_kv_events is uses
    assert s.dl.precise_enabled is uses
    s.decide(request("r", LONG))
    assert (s.dl.kv_index.pending_count() > 0) is uses  # no precise upkeep for a profile that never reads it


def test_consecutive_removals_of_one_medium_are_one_batched_remove(monkeypatch):
    s, clock = scheduler(eps=endpoints(1, kv=True))
    kv = s.dl.kv_index
    a = "10.0.0.1:8000"
    own = hash_blocks(LONG, BS)
    kv.apply_events(a, [stored(list(range(1, 9)), LONG[: 8 * BS])])
    calls = []
    real = kv.index.remove
    monkeypatch.setattr(kv.index, "remove",
                        lambda pod, hs, medium=0, **kw: calls.append(list(hs)) or real(pod, hs, medium, **kw))
    kv.apply_events(a, [removed([8]), removed([7]), removed([6]), removed([999])])  # as vLLM: one per block
    assert calls == [[own[7], own[6], own[5]]] and kv.index.match(own)[0][0] == 5
    # order kept around other events: removed then stored again within one batch, and per medium
    calls.clear()
    kv.apply_events(a, [removed([5]), stored([5], LONG[4 * BS: 5 * BS], parent=4), removed([4], medium="CPU"),
                        removed([3])])
    assert calls == [[own[4]], [own[3]], [own[2]]]
    assert kv.index.match(own)[0][0] == 2  # block 2 went (GPU)
    assert kv.index.pods_holding(own[2]) == {}
    assert kv.index.pods_holding(own[4]) == {"GPU": [0]}  # removed, then stored again
    assert kv.index.pods_holding(own[3]) == {"GPU": [0]}  # the CPU removal found nothing on CPU
    kv.check_invariants()


def test_blocks_stored_after_a_clear_in_the_same_batch_are_kept():
    s, clock = scheduler(eps=endpoints(1, kv=True))
    kv = s.dl.kv_index
    a = "10.0.0.1:8000"
    kv.apply_events(a, [stored([1, 2], LONG[: 2 * BS]), cleared(), stored([11, 12], LONG[: 2 * BS]),
                        stored([13], LONG[2 * BS: 3 * BS], parent=12)])
    assert kv.index.match(hash_blocks(LONG, BS))[0][0] == 3 and kv.engine_map_size(0) == 3


def test_access_log_mode_ends_a_prefill_at_its_pods_kv_event_not_at_its_predicted_first_token():
    """No first token while a request runs (extproc access-log): the pod's BlockStored of the prompt's last full
    block ends its queued prefill in the picker's accounting; a late event is waited for past the predicted
    first token (a short prediction released the queue early and piled prompts on the pod), and a lost one
    releases it at 4x the prediction (pickers/kvblocks/prefill_watch.py). Opt-in:
    ``scheduler.prefill_end_from_kv_events``."""
    off, _ = scheduler(eps=endpoints(1, kv=True))
    off.predicted_first_token = True
    off.dl.kv_index.apply_events("10.0.0.1:8000", [stored([900], np.arange(10_000, 10_000 + BS))])
    off.decide(request("r0", TOK))
    assert len(off.dl.kv_index.prefill_watch) == 0  # the default: the predicted first token alone
    s, clock = scheduler({"prefill_end_from_kv_events": True}, eps=endpoints(1, kv=True))
    s.predicted_first_token = True
    kv, inflight = s.dl.kv_index, s.dl.inflight
    a = "10.0.0.1:8000"
    other = np.arange(10_000, 10_000 + BS)
    kv.apply_events(a, [stored([900], other)], now=clock.now())  # the pod publishes events

    def prefilling(key: str) -> bool:
        return not inflight._recs[key].started

    d = s.decide(request("r1", TOK))
    ttft = d.state.expected.ttft_s
    assert prefilling("r1") and inflight.prefill_tokens[0] == len(TOK) and len(kv.prefill_watch) == 1
    clock.advance(2 * ttft)  # past the prediction, no event yet: still prefilling
    s.decide(request("probe1", other))
    assert prefilling("r1")
    clock.advance(0.01)
    kv.apply_events(a, [stored([1, 2, 3, 4], TOK)], now=clock.now())  # its blocks: the prefill ended
    s.decide(request("probe2", other))
    assert not prefilling("r1") and inflight._recs["r1"].started_at == clock.now()
    assert len(kv.prefill_watch) == 0
    # a request whose event never comes: released at 4x its predicted first token
    d3 = s.decide(request("r3", np.arange(50_000, 50_000 + 4 * BS)))
    t3 = d3.state.expected.ttft_s
    clock.advance(3.9 * t3)
    s.decide(request("probe3", other))
    assert prefilling("r3")
    clock.advance(0.2 * t3)
    s.decide(request("probe4", other))
    assert not prefilling("r3")
    s.on_finished(d3, None, clock.now())
    assert len(kv.prefill_watch) == 0 and "r3" not in inflight._recs
    # what an operator sees: r1 by its event, the probes (their block already stored: nothing new to announce)
    # by prediction, r3 watched without an event
    ends = {src: s.test_registry.get_sample_value("kvswitch_prefill_ends_total", {"source": src})
            for src in ("kv_event", "prediction", "no_event")}
    assert ends == {"kv_event": 1.0, "prediction": 4.0, "no_event": 1.0}


def test_prefill_watch_is_bounded_fires_once_and_keeps_the_first_of_two_prompts_ending_in_one_block():
    from pickers.kvblocks.prefill_watch import PrefillWatch

    w = PrefillWatch(max_watched=2)
    assert w.watch("a", 0, 11) and w.watch("b", 0, 12)
    assert not w.watch("c", 0, 11)  # "a" ends in that block on that pod: "c" falls back to its prediction
    assert w.watch("d", 1, 11) and len(w) == 2  # the oldest ("a") dropped for it
    w.stored(0, [11, 12], now=5.0)
    w.stored(0, [12], now=6.0)
    assert w.take() == [("b", 5.0)] and w.take() == []
    w.unwatch("d")
    w.stored(1, [11], now=7.0)
    assert w.take() == [] and len(w) == 0
