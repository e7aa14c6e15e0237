"""The peer emulations follow the peers' published rules (engine/sim/cluster/peers.py)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.sim.cluster import ClusterSim, fleet_from_flags, trace_prompts
from engine.sim.cluster.peers import SGLANG_CACHE_AWARE, VLLM_CACHE_AWARE, CacheAwareRouter, make_peer
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


def test_sglang_cache_aware_follows_a_match_and_sends_a_miss_to_the_smallest_tree():
    r = CacheAwareRouter(_eps(3), SGLANG_CACHE_AWARE, "sglang:cache_aware")
    a = _prompt(1)
    first, _ = r.route(_req("a", a), 0.0)
    assert r.route(_req("a2", np.concatenate([a[:400], _prompt(9, 112)])), 0.0)[0] == first  # 400/512 > 0.3
    # a miss goes to a worker whose tree is smallest (empty), never to the one holding a's blocks
    miss, _ = r.route(_req("b", _prompt(2)), 0.0)
    assert miss != first
    assert r.decisions == {"load_balance": 0, "cache_affinity": 1, "low_match": 2}


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
    # 208/512 = 0.41 > 0.3 follows the match; 144/512 = 0.28 goes to the least loaded (the other one), where
    # sglang would pick the smallest tree
    assert r.route(_req("b", np.concatenate([a[:208], _prompt(8, 304)])), 0.0)[0] == first
    assert r.route(_req("c", np.concatenate([a[:144], _prompt(7, 368)])), 0.0)[0] != first


def test_kv_aware_reads_the_pods_caches_and_ignores_load():
    fleet = fleet_from_flags(3, "H100", "8b")
    clock = ManualClock()
    sim = ClusterSim(fleet, lambda eps, c: make_router("vllm:kv_aware", eps, c), clock=clock)
    shared = list(range(8))  # 8 x 512-token blocks shared by every request
    reqs = [TraceRequest(i, 0.01 * i, 4096 + 256, 4, shared + [100 + i]) for i in range(12)]
    res = sim.run(trace_prompts(reqs))
    pods = [r.decode_pod for r in res.records]
    # the first goes to the least loaded; once its prefix is cached (or speculated) every later one follows
    # it whatever its load: kv_aware has no load term
    assert len(set(pods)) == 1


def test_unknown_peer_names_fail_clearly():
    with pytest.raises(ValueError, match="unknown peer emulation"):
        make_peer("sglang:nope", _eps(2))
