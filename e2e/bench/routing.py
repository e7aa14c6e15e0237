"""Routing-quality benchmark: prefix hit rate vs an oracle, TTFT and throughput, per picker profile.

    .venv/bin/python -m e2e.bench.routing [--requests 200] [--time-scale 1.5] [--loads 0.7,1.0]
        [--policies round-robin,load-only,approximate,precise,default] [--virtual-only]

A shared-prefix workload (64 groups, ~4K-token system prompt, ~200-token question, 200 output tokens,
Poisson arrivals) on 8 simulated H100 pods of the 8B profile, run twice per policy and load:

1. in virtual time (engine.sim.cluster, the same picker code, exact simulated clock), next to the
   oracle router that reads every pod's block pool (engine.sim.cluster.oracle);
2. in real time through real Envoy and the in-process picker (extproc.localstack), with the demo's
   openai-SDK client; client-side times are divided by the time scale to give simulated seconds, and the
   hit rate comes from the pods' vllm:prefix_cache_hits_total / queries_total.

"100 % of capacity" is the aggregate rate at which each pod's busy time per second reaches 1 with
perfect prefix reuse at the batch size that rate implies (see ``capacity``). An on-demand benchmark, not
a test: it prints tables and exits 0 unless something failed to run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import os
import random
import sys
import time
from collections import Counter
from typing import Any

import numpy as np

from engine.costmodel import CostModel
from engine.sim.cluster import ClusterSim, TraceRequest, fleet_from_flags, make_router, summarize
from engine.sim.cluster.oracle import OracleRouter, prefix_hit_bound
from engine.sim.cluster.simulator import endpoints_for
from engine.tokens.tokenizer import BuiltinTokenizer
from extproc.localstack import LocalStack, StackOptions
from extproc.localstack.report import snapshot, total
from extproc.localstack.workload import _WORDS, Workload, WorkloadSpec, build_workload, run_workload
from pickers.clock import ManualClock

POLICIES = ("round-robin", "load-only", "approximate", "precise", "default")
MODEL, ACCEL, PODS = "llama-3.1-8b", "H100", 8
GROUPS, SYSTEM_TOKENS, QUESTION_TOKENS, OUTPUT_TOKENS = 64, 4096, 200, 200


# ---- capacity -------------------------------------------------------------------------------------
def capacity(pods: int = PODS, question: int = QUESTION_TOKENS, prefix: int = SYSTEM_TOKENS,
             output: int = OUTPUT_TOKENS) -> dict[str, float]:
    """Requests/s at which the pods' busy time per second reaches 1 with perfect prefix reuse.

    A request costs prefill(question | cached prefix) plus ``output`` decode steps. In a continuous
    batching pod the busy fraction is lambda * (prefill + output * step(B) / B) with B the mean batch
    while busy, and by Little's law B = lambda * (prefill + output * step(B)) / busy. Setting busy = 1
    makes both the same equation, satisfied for every rate from the one where B = 1 upwards (above it
    the batch just grows and TPOT with it, until max_num_seqs). So the rate at which busy time reaches 1
    is the B = 1 point: lambda = 1 / (prefill + output * step(1)) per pod. The same formula at B = 256
    (max_num_seqs) gives the throughput ceiling, reported for scale.
    """
    cost = CostModel(MODEL, ACCEL)
    ctx = prefix + question + output // 2
    pre = cost.prefill_time(question, prefix)

    def per_pod(b: int) -> float:
        return 1.0 / (pre + output * cost.decode_step_time(b, b * ctx) / b)

    return {"prefill_s": pre, "step1_s": cost.decode_step_time(1, ctx), "per_pod": per_pod(1),
            "rate": pods * per_pod(1), "ceiling_b256": pods * per_pod(256),
            "cold_prefill_s": cost.prefill_time(prefix + question, 0)}


# ---- workload -------------------------------------------------------------------------------------
def make_workload(requests: int, rate_sim: float, time_scale: float, seed: int) -> Workload:
    """The demo's workload (completions only, 200 output tokens) with ~``QUESTION_TOKENS``-token
    questions: its short question plus request-unique filler words. Arrivals are in wall seconds."""
    tok = BuiltinTokenizer()
    spec = WorkloadSpec(requests=requests, groups=GROUPS, system_tokens=SYSTEM_TOKENS,
                        rate=rate_sim / time_scale, concurrency=4096, max_tokens=(OUTPUT_TOKENS, OUTPUT_TOKENS),
                        chat_share=0.0, seed=seed, timeout_s=600.0)
    wl = build_workload(spec, tok)
    plan = []
    for req in wl.plan:
        rng = random.Random(seed * 7919 + req.index)
        q = req.question
        while tok.count(q) < QUESTION_TOKENS:
            q += " " + rng.choice(_WORDS)
        plan.append(dataclasses.replace(req, question=q))
    wl.plan = plan
    return wl


def prompt_text(wl: Workload, i: int) -> str:
    """The completions prompt the demo client sends (extproc.localstack.workload._one)."""
    req = wl.plan[i]
    return f"{wl.system_prompts[req.group]}\nUser: {req.question}\nAssistant:"


def prompt_arrays(wl: Workload) -> list[np.ndarray]:
    tok = BuiltinTokenizer()
    return [tok.encode_array(prompt_text(wl, i)) for i in range(len(wl.plan))]


# ---- virtual time ---------------------------------------------------------------------------------
def run_virtual(policy: str, wl: Workload, prompts: list[np.ndarray], time_scale: float) -> dict[str, Any]:
    fleet = fleet_from_flags(PODS, ACCEL, MODEL)
    clock = ManualClock()
    if policy == "oracle":
        router: Any = OracleRouter()
        sim = ClusterSim(fleet, router, clock=clock)
        router.attach(sim.pods)
    else:
        name = "picker:round-robin" if policy == "round-robin" else policy
        sim = ClusterSim(fleet, make_router(name, endpoints_for(fleet), clock), clock=clock)
    reqs = [TraceRequest(r.index, r.at / time_scale, len(p), r.max_tokens, []) for r, p in zip(wl.plan, prompts)]
    t0 = time.perf_counter()
    res = sim.run(zip(reqs, prompts))
    s = summarize(res, time.perf_counter() - t0)
    s["policy"] = policy
    return {"policy": policy, "thr": s["throughput_req_s"], "tok": s["output_tok_s"],
            "p50": s["ttft_p50_s"], "p90": s["ttft_p90_s"], "hit": s["prefix_hit_rate"],
            "share": max(s["pod_share"].values()), "errors": s["rejected"] + s["failed"]}


# ---- real time ------------------------------------------------------------------------------------
async def run_real(policy: str, wl: Workload, time_scale: float) -> dict[str, Any]:
    wl = dataclasses.replace(wl, results=[])
    opts = StackOptions(pods=PODS, port=0, time_scale=time_scale, profile=policy, accelerator=ACCEL,
                        model_profile=MODEL, seed=0)
    async with LocalStack(opts) as stack:
        before = await snapshot(stack)
        load0 = os.getloadavg()[0]
        await run_workload(stack.url, opts.model_name, wl)
        load1 = os.getloadavg()[0]
        after = await snapshot(stack)
    ok = [r for r in wl.results if r.error is None]
    ttft = [r.ttft_s / time_scale for r in ok if r.ttft_s is not None]
    hits = sum(total(after.pods[n], "vllm:prefix_cache_hits_total")
               - total(before.pods[n], "vllm:prefix_cache_hits_total")
               for n in after.pods)
    queries = sum(total(after.pods[n], "vllm:prefix_cache_queries_total")
                  - total(before.pods[n], "vllm:prefix_cache_queries_total") for n in after.pods)
    span = wl.wall_s / time_scale
    counts = Counter(r.endpoint for r in ok)
    return {"policy": policy, "thr": len(ok) / span, "tok": sum(r.output_chunks for r in ok) / span,
            "p50": _pct(ttft, 0.5), "p90": _pct(ttft, 0.9), "hit": hits / queries if queries else 0.0,
            "share": max(counts.values()) / len(ok) if ok else 0.0, "errors": len(wl.results) - len(ok),
            "load": max(load0, load1), "wall": wl.wall_s}


def _pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    return float(np.percentile(values, q * 100))


# ---- report ---------------------------------------------------------------------------------------
def table(rows: list[dict[str, Any]], oracle: dict[float, float], real: bool) -> str:
    head = (f"{'policy':<12} {'load':>5} {'req/s':>7} {'out tok/s':>9} {'TTFT p50':>9} {'TTFT p90':>9} "
            f"{'hit':>6} {'/oracle':>7} {'max pod':>7} {'err':>4}" + (f" {'uptime':>6} {'wall s':>6}" if real else ""))
    out = [head, "-" * len(head)]
    for r in rows:
        ratio = r["hit"] / oracle[r["load_frac"]] if oracle.get(r["load_frac"]) else math.nan
        line = (f"{r['policy']:<12} {r['load_frac']:>5.0%} {r['thr']:>7.2f} {r['tok']:>9.0f} "
                f"{r['p50'] * 1e3:>7.0f}ms {r['p90'] * 1e3:>7.0f}ms {r['hit']:>6.1%} {ratio:>7.1%} "
                f"{r['share']:>7.1%} {r['errors']:>4}")
        if real:
            line += f" {r['load']:>6.2f} {r['wall']:>6.0f}"
        out.append(line)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m e2e.bench.routing", description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--time-scale", type=float, default=1.5)
    p.add_argument("--loads", default="0.7,1.0", help="fractions of capacity")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--virtual-only", action="store_true", help="skip the real-time runs through Envoy")
    args = p.parse_args(argv)
    loads = [float(x) for x in args.loads.split(",") if x]
    policies = [x for x in args.policies.split(",") if x]
    cap = capacity()
    print(f"capacity ({PODS}x {MODEL}/{ACCEL}, perfect prefix reuse): prefill {cap['prefill_s'] * 1e3:.1f} ms "
          f"(cold {cap['cold_prefill_s'] * 1e3:.0f} ms), decode step at B=1 {cap['step1_s'] * 1e3:.2f} ms -> "
          f"{cap['per_pod']:.3f} req/s per pod, 100% = {cap['rate']:.2f} req/s "
          f"(throughput ceiling at B=256: {cap['ceiling_b256']:.0f} req/s)", flush=True)
    virt: list[dict[str, Any]] = []
    real: list[dict[str, Any]] = []
    oracle_v: dict[float, float] = {}
    bounds: dict[float, float] = {}
    for frac in loads:
        wl = make_workload(args.requests, frac * cap["rate"], args.time_scale, args.seed)
        prompts = prompt_arrays(wl)
        bounds[frac] = prefix_hit_bound(prompts)
        o = run_virtual("oracle", wl, prompts, args.time_scale)
        oracle_v[frac] = o["hit"]
        for row in [o] + [run_virtual(pol, wl, prompts, args.time_scale) for pol in policies]:
            virt.append({**row, "load_frac": frac})
        print(f"load {frac:.0%}: {frac * cap['rate']:.2f} req/s, {args.requests} requests, "
              f"{wl.plan[-1].at / args.time_scale:.0f} s simulated; hit bound {bounds[frac]:.1%}, "
              f"oracle router {o['hit']:.1%}", flush=True)
        if args.virtual_only:
            continue
        for pol in policies:
            row = asyncio.run(run_real(pol, wl, args.time_scale))
            real.append({**row, "load_frac": frac})
            print(f"  real {pol} {frac:.0%}: hit {row['hit']:.1%} p90 {row['p90'] * 1e3:.0f} ms "
                  f"errors {row['errors']} wall {row['wall']:.0f} s uptime {row['load']:.2f}", flush=True)
    print("\n== virtual time (engine.sim.cluster; /oracle = hit / oracle router's hit) ==")
    print(table(virt, oracle_v, real=False))
    if real:
        print(f"\n== real time through Envoy (time scale {args.time_scale:g}; simulated seconds; "
              "/oracle = hit / virtual-time oracle router's hit) ==")
        print(table(real, oracle_v, real=True))
    print("\nhit bound (one infinite shared cache): "
          + ", ".join(f"{f:.0%} load {b:.1%}" for f, b in bounds.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
