"""Data-parallel pods in the virtual-time cluster simulator: rank-aware routing against rank-oblivious."""

from __future__ import annotations

import json

from engine.sim.cluster.cli import replay
from engine.sim.cluster.fleet import fleet_from_flags
from engine.sim.cluster.report import summarize
from engine.sim.cluster.trace import TraceRequest
from pickers.profiles import BUILTIN_PROFILES


def _groups(n: int = 240, groups: int = 8, rate: float = 40.0) -> list[TraceRequest]:
    """Requests of ``groups`` shared 8-block prefixes (Mooncake blocks of 512 tokens) plus one own block."""
    return [TraceRequest(i, i / rate, 9 * 512, 32, [1000 + i % groups * 16 + b for b in range(8)] + [10**6 + i])
            for i in range(n)]


def _seeded(profile: str) -> dict:
    """The built-in profile with a seeded tie-break, so the run is the same every time."""
    prof = json.loads(json.dumps(BUILTIN_PROFILES[profile]))
    prof["picker"] = {**prof["picker"], "seed": 0}
    return {"scheduler": {"profiles": {profile: prof}}}


def test_rank_aware_routing_keeps_prefixes_on_ranks_and_balances_them():
    reqs = _groups(groups=16)
    fleet = fleet_from_flags(2, "H200", "moe", dp=4)
    aware, _ = replay(reqs, fleet, "default", picker_config=_seeded("default"))
    blind, _ = replay(reqs, fleet, "rank-oblivious", picker_config=_seeded("rank-oblivious"))
    a, b = summarize(aware), summarize(blind)
    assert a["completed"] == b["completed"] == len(reqs)
    # every request went to a named rank of a pod, and each prefix group stayed on few (pod, rank)s
    assert all(r.decode_rank is not None for r in aware.records)
    homes: dict[int, set] = {}
    for tr, rec in zip(reqs, aware.records):
        homes.setdefault(tr.hash_ids[0], set()).add((rec.decode_pod, rec.decode_rank))
    assert max(len(h) for h in homes.values()) <= 2
    # the oblivious pod spreads a group over its ranks: each rank computes the prefix once more
    assert a["prefix_hit_rate"] > b["prefix_hit_rate"] + 0.08
    assert len(a["rank_share"]) == 8 and a["rank_share_cv"] < 0.35
    assert a["ttft_p90_s"] < b["ttft_p90_s"]


def test_legacy_pod_balancing_leaves_ranks_idle_at_light_load():
    reqs = _groups(n=120, rate=2.0)
    legacy = fleet_from_flags(1, "H200", "moe", dp=4, dp_balancer="legacy")
    current = fleet_from_flags(1, "H200", "moe", dp=4)
    old = summarize(replay(reqs, legacy, "rank-oblivious")[0])
    new = summarize(replay(reqs, current, "rank-oblivious")[0])
    shares = sorted(old["rank_share"].values())
    assert shares[-1] > 0.9 and shares[0] < 0.05  # rank 0 takes nearly everything
    assert new["rank_share_cv"] < 0.1  # vLLM 0.32's rule spreads the same traffic
