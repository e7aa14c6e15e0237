"""EngineCore: scheduling, prefix hits, chunked prefill, preemption, P/D holds (virtual time)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from engine.costmodel import CostModel
from engine.sim.blockpool import BlockRemoved, BlockStored
from engine.sim.core import EngineConfig, EngineCore, SimRequest, draw_token, draw_tokens

COST = CostModel("llama-3.1-8b", "H100")


def core(**kw) -> EngineCore:
    kw.setdefault("hash_seed", 7)
    return EngineCore(COST, EngineConfig(**kw))


def run(c: EngineCore, now: float = 0.0, limit: int = 10_000) -> tuple[float, dict[str, list]]:
    """Step until idle (timers are not awaited); returns the end time and the outputs per request."""
    outs: dict[str, list] = {}
    for _ in range(limit):
        r = c.step(now)
        for o in r.outputs:
            outs.setdefault(o.request_id, []).append(o)
        if r.idle:
            break
        now = r.end
    return now, outs


def prompt(n: int, base: int = 0) -> np.ndarray:
    return (np.arange(n) + base).astype(np.uint32) % 30000


def test_second_request_hits_the_prefix_and_is_faster():
    c = core()
    t, outs = run(c)
    c.add_request(SimRequest("a", prompt(2048), 4, arrival=0.0))
    t, outs = run(c, 0.0)
    a = outs["a"]
    assert [o.num_output_tokens for o in a] == [1, 2, 3, 4] and a[-1].finish_reason == "length"
    assert a[-1].num_cached_tokens == 0
    c.add_request(SimRequest("b", prompt(2048), 4, arrival=t))
    _, outs = run(c, t)
    b = outs["b"]
    assert b[-1].num_cached_tokens == 2032  # all but the last block (vLLM recomputes the last token)
    ttft_a = a[0].first_token_at - a[0].arrival
    ttft_b = b[0].first_token_at - b[0].arrival
    assert ttft_b < ttft_a / 5
    s = c.stats()
    assert (s.prefix_queries, s.prefix_hits) == (4096, 2032)
    assert s.kv_usage == 0.0 and s.num_running == 0


def test_requests_one_step_starts_share_the_prefix_the_first_is_computing():
    """vLLM's ``allocate_slots`` caches the blocks a step will fill when it schedules them (``cache_blocks`` with
    the computed tokens plus the step's new ones), so a request scheduled after another in the same step hits
    the blocks that one is computing: two waiting requests with one new prefix compute it once."""
    c = core()
    c.add_request(SimRequest("a", prompt(2048), 4, arrival=0.0))
    c.add_request(SimRequest("b", prompt(2048), 4, arrival=0.0))
    first = c.step(0.0)
    assert not first.idle
    _, outs = run(c, first.end)
    for o in first.outputs:
        outs.setdefault(o.request_id, []).insert(0, o)
    assert outs["a"][-1].num_cached_tokens == 0
    assert outs["b"][-1].num_cached_tokens == 2032  # all but the last block, as from a finished request
    assert (c.stats().prefix_queries, c.stats().prefix_hits) == (4096, 2032)
    # a chunk scheduled in the step covers only the tokens of that chunk: with a 512-token budget the second
    # request starts once the first's chunks are scheduled, and hits what they cover by then
    c = core(max_num_batched_tokens=512)
    c.add_request(SimRequest("a", prompt(2048, base=7), 4, arrival=0.0))
    c.add_request(SimRequest("b", prompt(2048, base=7), 4, arrival=0.0))
    _, outs = run(c, 0.0)
    assert outs["a"][-1].num_cached_tokens == 0 and outs["b"][-1].num_cached_tokens == 2032


def test_chunked_prefill_respects_the_token_budget():
    c = core(max_num_batched_tokens=512)
    c.add_request(SimRequest("a", prompt(1300), 2))
    sizes = []
    now = 0.0
    while c.has_work():
        r = c.step(now)
        sizes.append(r.num_new_tokens)
        now = r.end
    assert sizes == [512, 512, 276, 1]


def test_decode_blocks_are_committed_with_output_tokens():
    events = []
    c = EngineCore(COST, EngineConfig(block_size=4, num_blocks=64, hash_seed=1),
                   events=lambda ev, ts: events.extend(ev))
    c.add_request(SimRequest("a", prompt(6), 7, seed=3))
    _, outs = run(c)
    toks = [o.new_token_ids[0] for o in outs["a"]]
    stored = [e for e in events if isinstance(e, BlockStored)]
    all_tokens = list(prompt(6)) + toks
    # 13 tokens; the last one's KV is never computed, so 12 computed tokens = 3 full blocks
    assert [t for e in stored for t in e.token_ids] == [int(x) for x in all_tokens[:12]]
    hashes = [h for e in stored for h in e.block_hashes]
    assert hashes == c.pool.hash_tokens(all_tokens[:12])


def test_output_is_deterministic_per_seed():
    ids = []
    for _ in range(2):
        c = core()
        c.add_request(SimRequest("x", prompt(20), 5, seed=42))
        _, outs = run(c)
        ids.append([o.new_token_ids[0] for o in outs["x"]])
    assert ids[0] == ids[1]


def test_eos_min_tokens_and_ignore_eos():
    c = core()
    c.add_request(SimRequest("stop", prompt(20), 50, eos_at=3))
    c.add_request(SimRequest("min", prompt(20, 1), 50, eos_at=3, min_tokens=6))
    c.add_request(SimRequest("ign", prompt(20, 2), 8, eos_at=3, ignore_eos=True))
    _, outs = run(c)
    assert (outs["stop"][-1].num_output_tokens, outs["stop"][-1].finish_reason) == (3, "stop")
    assert (outs["min"][-1].num_output_tokens, outs["min"][-1].finish_reason) == (6, "stop")
    assert (outs["ign"][-1].num_output_tokens, outs["ign"][-1].finish_reason) == (8, "length")


def test_preemption_when_blocks_run_out_and_everyone_finishes():
    c = core(block_size=16, num_blocks=22)  # all three fit at admission (7 blocks each), not at the end
    for i in range(3):
        c.add_request(SimRequest(f"r{i}", prompt(100, 1000 * i), 60))  # each needs 10 blocks at the end
    _, outs = run(c)
    assert c.stats().num_preemptions > 0
    for i in range(3):
        assert outs[f"r{i}"][-1].finished and outs[f"r{i}"][-1].num_output_tokens == 60
    assert c.stats().kv_usage == 0.0


def test_full_pool_evicts_lru_and_emits_block_removed():
    events = []
    c = EngineCore(COST, EngineConfig(block_size=16, num_blocks=16, hash_seed=1),
                   events=lambda ev, ts: events.extend(ev))
    c.add_request(SimRequest("a", prompt(128), 1))
    run(c)
    a_hashes = c.pool.hash_tokens(prompt(128))
    c.add_request(SimRequest("b", prompt(200, 5000), 1))
    run(c)
    removed = [h for e in events if isinstance(e, BlockRemoved) for h in e.block_hashes]
    assert removed and set(removed) <= set(a_hashes)
    # a's tail blocks go first (freed tail first)
    assert removed[0] == a_hashes[-1]


def test_without_kv_events_nothing_is_built_and_scheduling_is_the_same():
    def replay(kv_events: bool):
        events = []
        c = EngineCore(COST, EngineConfig(block_size=16, num_blocks=22, hash_seed=1, kv_events=kv_events),
                       events=lambda ev, ts: events.extend(ev))
        for i in range(3):  # shared prefix, evictions and preemptions
            c.add_request(SimRequest(f"r{i}", prompt(100 + 20 * i, 1000 * (i % 2)), 40))
        _, outs = run(c)
        c.reset_prefix_cache()
        return events, {k: [(o.new_token_ids, o.time, o.num_cached_tokens) for o in v] for k, v in outs.items()}, c

    ev_on, outs_on, c_on = replay(True)
    ev_off, outs_off, c_off = replay(False)
    assert ev_on and any(isinstance(e, BlockRemoved) for e in ev_on) and ev_off == []
    assert outs_off == outs_on and c_off.stats() == c_on.stats()


def test_abort_frees_blocks():
    c = core(num_blocks=64)
    c.add_request(SimRequest("a", prompt(300), 100))
    c.step(0.0)
    assert c.stats().kv_usage > 0
    assert c.abort("a") and not c.abort("a")
    assert c.stats().kv_usage == 0.0 and not c.has_work()


def test_bad_requests_are_rejected():
    c = core(num_blocks=8, block_size=16)  # max_model_len capped at 128
    with pytest.raises(ValueError):
        c.add_request(SimRequest("a", prompt(0), 1))
    with pytest.raises(ValueError):
        c.add_request(SimRequest("a", prompt(200), 1))
    with pytest.raises(ValueError):
        c.add_request(SimRequest("a", prompt(10), 0))
    c.add_request(SimRequest("a", prompt(10), 1))
    with pytest.raises(ValueError):
        c.add_request(SimRequest("a", prompt(10), 1))


def test_prefill_role_holds_blocks_until_released_or_timeout():
    p = core(role="prefill", num_blocks=64, kv_transfer_timeout_s=5.0)
    p.add_request(SimRequest("a", prompt(100), 1, kv_transfer_params={"do_remote_decode": True}))
    t, outs = run(p)
    params = outs["a"][-1].kv_transfer_params
    assert params["do_remote_prefill"] is True and params["remote_engine_id"] == p.engine_id
    assert len(params["remote_block_ids"]) == 7  # ceil(100/16)
    assert p.stats().num_held_blocks == 7 and p.pool.num_free == 57
    assert p.release_remote(params["remote_block_ids"]) and not p.release_remote(params["remote_block_ids"])
    assert p.pool.num_free == 64
    # again, and let the hold time out
    p.add_request(SimRequest("b", prompt(100, 7), 1, kv_transfer_params={"do_remote_decode": True}))
    t, outs = run(p, t)
    assert p.stats().num_held_blocks == 7
    deadline = p.next_event_time()
    assert deadline == pytest.approx(outs["b"][-1].time + 5.0)
    p.step(deadline)
    assert p.stats().num_held_blocks == 0 and p.pool.num_free == 64


def test_decode_role_charges_transfer_and_caches_the_pulled_blocks():
    events = []
    d = EngineCore(COST, EngineConfig(role="decode", num_blocks=256, hash_seed=2),
                   events=lambda ev, ts: events.extend(ev))
    pulled = []
    d.on_kv_pulled = pulled.append
    kvp = {"do_remote_prefill": True, "remote_block_ids": [1, 2, 3], "remote_engine_id": "p",
           "remote_host": "h", "remote_port": 1, "tp_size": 1}
    d.add_request(SimRequest("a", prompt(1024), 3, kv_transfer_params=kvp))
    r = d.step(0.0)
    assert r.idle and not d.has_work()
    ready = d.next_event_time()
    assert ready == pytest.approx(COST.transfer_time(1024, "rdma-400g"))
    _, outs = run(d, ready)
    assert pulled == [kvp]
    o = outs["a"]
    assert o[0].first_token_at - o[0].arrival < COST.prefill_time(1024) / 2  # no local prefill
    assert o[-1].num_cached_tokens == 1023
    stored = [h for e in events if isinstance(e, BlockStored) for h in e.block_hashes]
    assert stored[:64] == d.pool.hash_tokens(prompt(1024))
    assert len(d.pool.find_cached(d.pool.hash_tokens(prompt(1024)))) == 64
    # a second remote request for the same prompt transfers nothing new but the last block
    d.add_request(SimRequest("b", prompt(1024), 1, arrival=0, kv_transfer_params=kvp))
    t0 = outs["a"][-1].time
    d.step(t0)
    assert d.next_event_time() == pytest.approx(t0 + COST.transfer_time(16, "rdma-400g"))


def test_roles_ignore_params_they_do_not_serve():
    d = core(role="decode", num_blocks=64)
    d.add_request(SimRequest("a", prompt(40), 1, kv_transfer_params={"do_remote_decode": True}))
    _, outs = run(d)
    assert outs["a"][-1].kv_transfer_params is None and d.pool.num_free == 64


@pytest.mark.parametrize("vocab", [1, 2, 3, 1000, 32000, 32768, 50257, 151936])
def test_token_draws_are_randrange_draws(vocab):
    """The engine's token ids come from each request's own generator: the batched draws give the ids
    randrange gives, one by one, and leave the generator in the same state."""
    a, b, c = random.Random(7), random.Random(7), random.Random(7)
    for n in (1, 5, 200, 0, 37):
        want = [a.randrange(vocab) for _ in range(n)]
        assert draw_tokens(b, vocab, n) == want
        assert [draw_token(c, vocab) for _ in range(n)] == want
    assert a.random() == b.random() == c.random()
