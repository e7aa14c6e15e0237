"""The routing benchmark's pieces: the hit bound, the oracle router, capacity and the workload shape."""

import numpy as np

from e2e.bench.routing import QUESTION_TOKENS, SYSTEM_TOKENS, capacity, make_workload, prompt_arrays
from engine.sim.cluster import ClusterSim, TraceRequest, fleet_from_flags
from engine.sim.cluster.oracle import OracleRouter, prefix_hit_bound
from pickers.clock import ManualClock


def _tokens(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 32000, n).astype(np.uint32)


def test_hit_bound_counts_each_distinct_block_once():
    shared = _tokens(1, 64)
    a = np.concatenate([shared, _tokens(2, 32)])
    b = np.concatenate([shared, _tokens(3, 32)])
    # a: 96 tokens, no hit; b: its 4 shared blocks hit (64 tokens); a again: 5 blocks (last one recomputed)
    assert prefix_hit_bound([a, b, a], block_size=16) == (0 + 64 + 80) / 288
    assert prefix_hit_bound([a], block_size=16) == 0.0
    assert prefix_hit_bound([], block_size=16) == 0.0


def test_oracle_sends_a_group_to_the_pod_that_holds_its_prefix():
    fleet = fleet_from_flags(4, "H100", "8b")
    router = OracleRouter()
    sim = ClusterSim(fleet, router, clock=ManualClock())
    router.attach(sim.pods)
    prefixes = [_tokens(10 + g, 1024) for g in range(3)]
    reqs, prompts = [], []
    for i in range(24):  # 3 groups; arrivals 10 ms apart, inside the first cold prefill
        prompts.append(np.concatenate([prefixes[i % 3], _tokens(100 + i, 48)]))
        reqs.append(TraceRequest(i, i * 0.01, len(prompts[-1]), 4, []))
    res = sim.run(zip(reqs, prompts))
    pods_by_group = {g: {r.decode_pod for r in res.records if r.index % 3 == g} for g in range(3)}
    assert all(len(p) == 1 for p in pods_by_group.values())  # in-flight prefixes count too
    assert len(set().union(*pods_by_group.values())) == 3  # new groups go to the least loaded pod
    hits = sum(r.cached_tokens for r in res.records) / sum(r.prompt_tokens for r in res.records)
    assert abs(hits - prefix_hit_bound(prompts)) < 1e-9


def test_capacity_is_the_batch_one_rate_and_below_the_ceiling():
    cap = capacity()
    assert cap["rate"] == 8 * cap["per_pod"]
    assert abs(1.0 / cap["per_pod"] - (cap["prefill_s"] + 200 * cap["step1_s"])) < 1e-12
    assert cap["rate"] < cap["ceiling_b256"]
    assert cap["prefill_s"] < cap["cold_prefill_s"]


def test_workload_has_long_questions_and_shared_system_prompts():
    wl = make_workload(12, rate_sim=5.0, time_scale=2.0, seed=3)
    prompts = prompt_arrays(wl)
    assert all(SYSTEM_TOKENS + QUESTION_TOKENS <= len(p) <= SYSTEM_TOKENS + QUESTION_TOKENS + 80 for p in prompts)
    assert all(r.max_tokens == 200 and not r.chat for r in wl.plan)
    by_group = {}
    for r, p in zip(wl.plan, prompts):
        by_group.setdefault(r.group, []).append(p)
    same = [ps for ps in by_group.values() if len(ps) > 1]
    assert same and all(np.array_equal(ps[0][:SYSTEM_TOKENS], ps[1][:SYSTEM_TOKENS]) for ps in same)
    assert len({wl.plan[i].question for i in range(12)}) == 12
