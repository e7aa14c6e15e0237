"""The peer emulations follow the peers' published rules (engine/sim/cluster/peers.py)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.sim.cluster import ClusterSim, fleet_from_flags, trace_prompts
from engine.sim.cluster.peers import (
    SGLANG_CACHE_AWARE,
    SMALLEST_TREE,
    VLLM_CACHE_AWARE,
    CacheAwareRouter,
    KvAwareRouter,
    make_peer,
)
from engine.sim.cluster.routers import ClusterRequest, make_router
from engine.sim.cluster.trace import TraceRequest
from pickers.clock import ManualClock
from pickers.types import Endpoint, Usage


def _eps(n: int) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i + 1}:8000") for i in range(n)]


def _req(rid: str, tokens: np.ndarray) -> ClusterRequest:
    return ClusterRequest(rid, 0.0, tokens, 8)


def _prompt(seed: int, n: int = 512) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 30000, n).astype(np.uint32)


def test_sglang_cache_aware_follows_a_match_and_sends_a_miss_to_the_least_loaded_worker():
    """As the installed sglang-router 0.3.2 does (tests/bench/test_peer_placement.py): a miss goes to the least
    loaded worker, ties to the same one, however much prompt that worker was sent before."""
    r = CacheAwareRouter(_eps(3), SGLANG_CACHE_AWARE, "sglang:cache_aware")
    a = _prompt(1)
    first, _ = r.route(_req("a", a), 0.0)
    assert r.route(_req("a2", np.concatenate([a[:400], _prompt(9, 112)])), 0.0)[0] == first  # 400/512 > 0.3
    r.load[:] = 0  # both finished: every worker idle
    assert r.route(_req("b", _prompt(2)), 0.0)[0] == first  # a tie: the same worker, its tree the largest
    r.load[:] = [1, 1, 0]
    assert r.route(_req("c", _prompt(3)), 0.0)[0] == "10.0.0.3:8000"
    assert r.decisions == {"load_balance": 0, "cache_affinity": 1, "low_match": 3}


def test_smallest_tree_baseline_sends_a_miss_to_the_smallest_tree():
    r = make_peer("tree:smallest", _eps(3))
    assert isinstance(r, CacheAwareRouter) and r.params == SMALLEST_TREE
    a = _prompt(1)
    first, _ = r.route(_req("a", a), 0.0)
    # a miss goes to a worker whose tree is smallest (empty), never to the one holding a's blocks
    miss, _ = r.route(_req("b", _prompt(2)), 0.0)
    assert miss != first
    third, _ = r.route(_req("c", _prompt(3)), 0.0)
    assert third not in (first, miss)
    assert r.decisions == {"load_balance": 0, "cache_affinity": 0, "low_match": 3}


def test_cache_aware_switches_to_least_loaded_only_when_both_thresholds_hold():
    r = CacheAwareRouter(_eps(2), SGLANG_CACHE_AWARE, "sglang:cache_aware")
    hot = _prompt(3)
    reqs = [_req(f"h{i}", hot) for i in range(66)]
    pods = [r.route(q, 0.0)[0] for q in reqs]
    # the hot prompt sticks to one worker until it has 65 more in flight than the other (> 64 and > 1.5x)
    assert len(set(pods[:65])) == 1
    assert pods[65] != pods[0] and r.decisions["load_balance"] == 1
    for q in reqs:  # finishing releases the load
        r.on_finished(q, Usage(), 1.0)
    assert r.load.sum() == 0


def test_vllm_cache_aware_sends_a_low_match_to_the_least_loaded_worker():
    r = CacheAwareRouter(_eps(2), VLLM_CACHE_AWARE, "vllm:cache_aware")
    a = _prompt(4)
    first, _ = r.route(_req("a", a), 0.0)
    # 208/512 = 0.41 > 0.3 follows the match; 144/512 = 0.28 goes to the least loaded (the other one)
    assert r.route(_req("b", np.concatenate([a[:208], _prompt(8, 304)])), 0.0)[0] == first
    assert r.route(_req("c", np.concatenate([a[:144], _prompt(7, 368)])), 0.0)[0] != first


def _kv_sim(pods: int = 3) -> ClusterSim:
    fleet = fleet_from_flags(pods, "H100", "8b")
    return ClusterSim(fleet, lambda eps, c: make_router("vllm:kv_aware", eps, c), clock=ManualClock())


def test_kv_aware_spreads_a_shared_prefix_by_its_cost_instead_of_piling_on_one_pod():
    """vllm-router 0.1.17 kv_aware: cost = (new prefill + active prefill tokens) x (requests + 1). Twelve
    requests 10 ms apart share 4096 prompt tokens (each prefill takes longer than 10 ms): a cached prefix
    lowers one pod's prefill term, but the requests it already holds multiply it, so the others get work
    (the longest-match rule it replaced sent all twelve to one pod)."""
    shared = list(range(8))  # 8 x 512-token blocks shared by every request
    reqs = [TraceRequest(i, 0.01 * i, 4096 + 256, 4, shared + [100 + i]) for i in range(12)]
    res = _kv_sim().run(trace_prompts(reqs))
    pods = [r.decode_pod for r in res.records]
    assert len(set(pods)) == 3
    assert max(pods.count(p) for p in set(pods)) < 12


def _attached(pods: int) -> tuple[ClusterSim, KvAwareRouter]:
    sim = _kv_sim(pods)
    router = sim.router
    assert isinstance(router, KvAwareRouter)
    return sim, router


def test_kv_aware_cost_weighs_cached_prefix_against_requests_in_flight():
    sim, r = _attached(2)
    bs = sim.pods[0].core.pool.block_size
    prompt = _prompt(5, 64 * bs)  # 64 full blocks
    # nothing cached, nothing in flight: equal costs, the first worker
    first = _req("a", prompt)
    assert r.route(first, 0.0)[0] == r.workers[0]
    assert r.prefill_tokens.tolist() == [64 * bs, 0] and r.load.tolist() == [1, 0]
    # worker 0 holds a request still in prefill: (n + n) x 2 > n x 1, the idle worker
    second = _req("b", prompt)
    assert r.route(second, 0.0)[0] == r.workers[1]
    # the first token moves a request to decode: its prefill tokens come off, the request stays
    r.on_first_token(first, 1.0)
    assert r.prefill_tokens.tolist() == [0, 64 * bs] and r.load.tolist() == [1, 1]
    r.on_finished(second, Usage(), 2.0)  # finishing before its first token releases both counters
    assert r.prefill_tokens.tolist() == [0, 0] and r.load.tolist() == [1, 0]
    r.on_finished(first, Usage(), 2.0)
    assert r.load.tolist() == [0, 0]


def test_kv_aware_new_prefill_counts_the_cached_prefix_and_always_computes_the_last_token():
    sim, r = _attached(2)
    pool = sim.pods[1].core.pool
    bs = pool.block_size
    prompt = _prompt(6, 8 * bs)  # exactly 8 full blocks
    assert r.new_prefill_tokens(1, prompt) == 8 * bs
    hashes = pool.hash_tokens(prompt)
    blocks = pool.allocate(8)
    assert blocks is not None
    pool.commit(blocks[:5], hashes[:5], None, prompt)  # the first 5 blocks cached on worker 1
    assert r.new_prefill_tokens(1, prompt) == 3 * bs and r.new_prefill_tokens(0, prompt) == 8 * bs
    pool.commit(blocks[5:], hashes[5:], hashes[4], prompt[5 * bs:])
    # all 8 cached: at most (n - 1) // bs = 7 blocks count, the last block is computed again
    assert r.new_prefill_tokens(1, prompt) == bs
    # worker 1's cost 16 x 1 beats worker 0's 128 x 1
    assert r.route(_req("c", prompt), 0.0)[0] == r.workers[1]


def test_unknown_peer_names_fail_clearly():
    with pytest.raises(ValueError, match="unknown peer emulation"):
        make_peer("sglang:nope", _eps(2))
