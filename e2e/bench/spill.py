"""Virtual-time comparison of routing profiles on the spill-study workloads (no Envoy, no CPU noise).

    .venv/bin/python -m e2e.bench.spill --workloads reduced@20,g64@120,nosh@20,mt@4 \\
        --policies default,approximate,precise,oracle --seeds 0,1,2,3,4 [--config variants.json]

Workloads (NAME@RATE, rate in simulated req/s; conversations/s for mt): reduced = the bench "reduced" preset
(4 L40S pods, 16 groups x 4096-token context + 512-token question, 64 output tokens, 120 requests, generated
at rate/2 and replayed 2x faster exactly as the bench does); g64 = 64 groups x 4K on 8 H100 pods, 800
requests; nosh = no prefix sharing on 4 L40S; mt = multi-turn chats on 4 L40S. --config: JSON mapping a
policy name "PROFILE+TAG" to a picker config (e.g. profiles overriding "default"). "cold" = requests that
found less than half their prompt cached. Prints one markdown table per workload (means over seeds).
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from e2e.bench import workloads as W
from engine.sim.cluster.fleet import fleet_from_flags
from engine.sim.cluster.oracle import OracleRouter
from engine.sim.cluster.report import summarize
from engine.sim.cluster.routers import make_router
from engine.sim.cluster.simulator import ClusterSim, trace_prompts
from engine.sim.cluster.trace import BlockTokens, TraceRequest


def to_reqs(wl):
    return [TraceRequest(i, r.timestamp / 1000.0, r.input_length, r.output_length, list(r.hash_ids))
            for i, r in enumerate(wl.records)]

def workload(name, seed):
    if name.startswith("reduced"):   # reduced preset, rate 10 or 20 sim req/s
        rate = float(name.split("@")[1])
        wl = W.scale_rate(W.shared_prefix(num_requests=120, groups=16, prefix_tokens=4096, question_tokens=512,
                                          output_tokens=64, rate=rate / 2, seed=seed), 2.0)
        return wl, dict(pods=4, acc="L40S")
    if name.startswith("g64"):      # 64 groups x 4K on 8 H100
        rate = float(name.split("@")[1])
        wl = W.shared_prefix(num_requests=800, groups=64, prefix_tokens=4096, question_tokens=512,
                             output_tokens=128, rate=rate, seed=seed)
        return wl, dict(pods=8, acc="H100")
    if name.startswith("nosh"):
        rate = float(name.split("@")[1])
        wl = W.no_sharing(num_requests=600, rate=rate, seed=seed)
        return wl, dict(pods=4, acc="L40S")
    if name.startswith("mt"):
        rate = float(name.split("@")[1])
        wl = W.multi_turn(conversations=150, turns=5, system_tokens=1024, first_user_tokens=1024,
                          user_tokens=256, output_tokens=128, rate=rate, think_time_s=10.0, seed=seed)
        return wl, dict(pods=4, acc="L40S")
    raise ValueError(name)

def run(wname, policy, seed, cfg):
    wl, f = workload(wname, seed)
    reqs = to_reqs(wl)
    fleet = fleet_from_flags(f["pods"], f["acc"], "8b")
    if policy == "oracle":
        router = OracleRouter()
        sim = ClusterSim(fleet, router, seed=seed)
        router.attach(sim.pods)
    else:
        sim = ClusterSim(fleet, lambda eps, clock: make_router(policy.split("+")[0], eps, clock, seed=seed,
                          config=cfg.get(policy)), seed=seed)
    res = sim.run(trace_prompts(reqs, BlockTokens()))
    s = summarize(res)
    ok = [r for r in res.records if r.status == "ok"]
    s["cold"] = sum(1 for r in ok if r.cached_tokens < 0.5 * r.prompt_tokens)
    return s

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--workloads", default="reduced@10,reduced@20")
    p.add_argument("--policies", default="default,approximate,precise,oracle")
    p.add_argument("--seeds", default="0")
    p.add_argument("--config", default=None, help="json {policy+tag: scheduler config}")
    a = p.parse_args()
    cfg = json.loads(open(a.config).read()) if a.config else {}
    seeds = [int(x) for x in a.seeds.split(",")]
    for wn in a.workloads.split(","):
        print(f"\n## {wn} (seeds {a.seeds})")
        print("| policy | req/s | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | TPOT mean ms | e2e p90 ms | hit | cold |")
        print("|---|---|---|---|---|---|---|---|---|")
        for pol in a.policies.split(","):
            rows = [run(wn, pol, sd, cfg) for sd in seeds]
            keys = ("throughput_req_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tpot_mean_s", "e2e_p90_s",
                    "prefix_hit_rate", "cold")
            m = {k: float(np.mean([r[k] for r in rows])) for k in keys}
            print(f"| {pol} | {m['throughput_req_s']:.3f} | {1e3 * m['ttft_p50_s']:.0f} | "
                  f"{1e3 * m['ttft_p90_s']:.0f} | {1e3 * m['ttft_p99_s']:.0f} | {1e3 * m['tpot_mean_s']:.1f} | "
                  f"{1e3 * m['e2e_p90_s']:.0f} | {100 * m['prefix_hit_rate']:.1f}% | {m['cold']:.1f} |", flush=True)
