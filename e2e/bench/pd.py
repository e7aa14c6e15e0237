"""Benchmark: aggregated vs always-disaggregated vs conditionally disaggregated, in virtual time.

    .venv/bin/python -m e2e.bench.pd [--requests 400] [--rates long=3,5,7 mixed=8,12,16]

llama-3.1-8b on H100 pods, rdma-400g between prefill and decode pods, Poisson arrivals, unique prompts
(no prefix sharing, so the prefix index only matters through the decider's view of the decode pod):

- workload ``long``: 8192 tokens in, 256 out;
- workload ``mixed``: 70 % short chat (500 in, 200 out) + 30 % long (8192 in, 256 out).

Fleets (6 H100 each), all routed by the real picker (``default`` profile) through SchedulerRouter:

- ``agg``:    6 aggregated pods (role both), decode-only handler;
- ``pd-all``: 2 prefill + 4 decode, prefill-decode handler forced on (threshold 0, ratio 0, never skip);
- ``pd-cond``: 2 prefill + 4 decode, prefill-decode handler with its defaults (the decider).

Service targets (per request, from the cost model, idle = one request alone on a pod):

- TTFT <= 2 x idle prefill time of its prompt + 0.5 s. Twice the bare compute leaves room for one
  request's worth of queueing and the KV transfer (~26 ms for 8K over RDMA); 0.5 s is the usual
  interactive budget on top (8K: 2 x 336 ms + 0.5 s = 1.17 s; 500 tokens: 2 x 20 ms + 0.5 s = 0.54 s).
- TPOT <= 1.5 x the decode step at batch 32 with every sequence at the workload's mean context
  (long: 1.5 x 20.8 ms = 31 ms; mixed: 1.5 x 12.6 ms = 19 ms). Batch 32 is a moderately loaded H100 pod
  for 8B; 1.5x allows some chunked-prefill interference but not a 300 ms prefill landing in the batch.

Goodput = requests meeting BOTH targets per second of makespan. Rates are chosen around the knee of
``pd-all`` (2 prefill pods x ~3 long prefills/s each).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np

from engine.costmodel import CostModel
from engine.sim.cluster.fleet import FleetSpec, fleet_from_flags
from engine.sim.cluster.report import summarize
from engine.sim.cluster.routers import make_router
from engine.sim.cluster.simulator import ClusterSim, SimResult
from engine.sim.cluster.trace import BlockTokens, TraceRequest

MODEL, ACCEL = "8b", "H100"
WORKLOADS: dict[str, list[tuple[float, int, int]]] = {  # (share, input tokens, output tokens)
    "long": [(1.0, 8192, 256)],
    "mixed": [(0.7, 500, 200), (0.3, 8192, 256)],
}
DEFAULT_RATES = {"long": [3.0, 5.0, 7.0], "mixed": [8.0, 12.0, 16.0]}

FORCED = {"type": "prefill-decode", "decider": "threshold", "threshold_tokens": 0, "min_uncached_ratio": 0.0,
          "skip_when_saturated": False}
SETUPS: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {
    "agg": ({"pods": 6}, None),
    "pd-all": ({"pd": "2:4"}, {"handler": FORCED}),
    "pd-cond": ({"pd": "2:4"}, {"handler": {"type": "prefill-decode"}}),
}


def make_trace(workload: str, rate: float, n: int, seed: int) -> list[TraceRequest]:
    rng = np.random.default_rng(seed)
    mix = WORKLOADS[workload]
    shares = np.array([m[0] for m in mix])
    kinds = rng.choice(len(mix), size=n, p=shares / shares.sum())
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=n))
    return [TraceRequest(i, float(arrivals[i]), mix[k][1], mix[k][2], []) for i, k in enumerate(kinds.tolist())]


def targets(workload: str) -> tuple[dict[int, float], float]:
    """(TTFT target per prompt length, TPOT target) for ``workload`` (see the module docstring)."""
    cm = CostModel(MODEL, ACCEL)
    mix = WORKLOADS[workload]
    ttft = {p: 2.0 * cm.prefill_time(p) + 0.5 for _, p, _ in mix}
    total = sum(s for s, _, _ in mix)
    mean_ctx = sum(s * (p + o) for s, p, o in mix) / total
    tpot = 1.5 * cm.decode_step_time(32, int(32 * mean_ctx))
    return ttft, tpot


def goodput(res: SimResult, ttft_t: dict[int, float], tpot_t: float) -> float:
    ok = [r for r in res.records if r.status == "ok"]
    if not ok:
        return 0.0
    start = min(r.arrival for r in res.records)
    span = max(r.finish for r in ok) - start
    good = 0
    for r in ok:
        tpot = (r.finish - r.first_token) / max(1, r.output_tokens - 1)
        if r.ttft <= ttft_t[r.input_length] and tpot <= tpot_t:
            good += 1
    return good / span if span > 0 else 0.0


def run_one(setup: str, trace: list[TraceRequest], seed: int) -> SimResult:
    flags, cfg = SETUPS[setup]
    fleet: FleetSpec = fleet_from_flags(accelerator=ACCEL, model_profile=MODEL, **flags)
    sim = ClusterSim(fleet, lambda eps, clock: make_router("default", eps, clock, seed=seed, config=cfg), seed=seed)
    blocks = BlockTokens()
    res = sim.run((r, blocks.prompt(r.hash_ids, r.input_length, r.index)) for r in trace)
    res.policy = setup
    return res


def _rates(spec: list[str] | None) -> dict[str, list[float]]:
    out = {k: list(v) for k, v in DEFAULT_RATES.items()}
    for item in spec or []:
        name, _, vals = item.partition("=")
        if name not in WORKLOADS or not vals:
            raise SystemExit(f"--rates: expected WORKLOAD=R1,R2 with WORKLOAD in {', '.join(WORKLOADS)}; got {item!r}")
        out[name] = [float(v) for v in vals.split(",")]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m e2e.bench.pd")
    ap.add_argument("--requests", type=int, default=400, help="requests per run")
    ap.add_argument("--rates", nargs="*", help="e.g. long=3,5,7 mixed=8,12,16 (requests/s)")
    ap.add_argument("--workloads", default="long,mixed")
    ap.add_argument("--setups", default=",".join(SETUPS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rates = _rates(args.rates)
    setups = [s for s in args.setups.split(",") if s]
    for s in setups:
        if s not in SETUPS:
            raise SystemExit(f"--setups: unknown {s!r}; known: {', '.join(SETUPS)}")
    cols = ["goodput/s", "TTFT p90 ms", "TPOT p90 ms", "legs"]
    head = f"{'workload':<8} {'rate':>5} " + " | ".join(f"{s:^40}" for s in setups)
    sub = f"{'':<8} {'req/s':>5} " + " | ".join(" ".join(f"{c:>9}" for c in cols) for _ in setups)
    lines = [head, sub, "-" * len(sub)]
    for wl in [w for w in args.workloads.split(",") if w]:
        ttft_t, tpot_t = targets(wl)
        print(f"# {wl}: TTFT target " + ", ".join(f"{p} tok {t * 1e3:.0f} ms" for p, t in ttft_t.items())
              + f"; TPOT target {tpot_t * 1e3:.1f} ms", flush=True)
        for rate in rates[wl]:
            trace = make_trace(wl, rate, args.requests, args.seed)
            cells = []
            for s in setups:
                t0 = time.perf_counter()
                res = run_one(s, trace, args.seed)
                summ = summarize(res)
                legs = sum(1 for r in res.records if r.prefill_pod) / max(1, len(res.records))
                gp = goodput(res, ttft_t, tpot_t)
                print(f"  {wl} {rate:g}/s {s}: {summ['completed']}/{summ['requests']} ok, goodput {gp:.2f}/s, "
                      f"{time.perf_counter() - t0:.1f} s wall", flush=True)
                cells.append(f"{gp:>9.2f} {summ['ttft_p90_s'] * 1e3:>9.0f} {summ['tpot_p90_s'] * 1e3:>9.1f} "
                             f"{legs:>9.0%}")
            lines.append(f"{wl:<8} {rate:>5g} " + " | ".join(cells))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
