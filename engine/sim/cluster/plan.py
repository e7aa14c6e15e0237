"""``kvswitch plan``: the cheapest fleet for a workload under SLOs, found with the cost model and confirmed
by replaying the workload in virtual time.

    kvswitch plan TRACE.jsonl --model-profile 8b --accelerators H100=2.49,L40S=0.86 \\
        --slo-ttft-ms 2000 --slo-tpot-ms 60 --attainment 0.99 --out fleet.yaml --json plan.json

1. search (pickers.planner.search): every single-kind fleet (TP 1/2/4) and every two-kind fleet split by
   prompt length, sized by the cost-model capacity at the trace's peak five-minute rate and its length
   distribution (tail included), cheapest first;
2. confirm: replay the trace on the best ``--confirm`` candidates of each family (one kind, mixed kinds) in
   virtual time (least in flight routing; mixed fleets route by the candidate's length split) and measure
   slo_attainment and goodput;
3. the winner is the cheapest confirmed candidate whose attainment meets ``--attainment``; it is written as
   a fleet YAML that ``kvswitch sim --config`` and ``kvswitch sim replay --fleet`` read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from engine.sim.cluster.autoscale import PRICE_SOURCE, Candidate, parse_accelerators, peak_rate, search
from engine.sim.cluster.fleet import FleetSpec, PodSpec, _address
from engine.sim.cluster.progress import ReplayProgress
from engine.sim.cluster.report import SloTargets, summarize
from engine.sim.cluster.routers import LengthSplitRouter
from engine.sim.cluster.simulator import ClusterSim, trace_prompts
from engine.sim.cluster.trace import TraceRequest, read_mooncake


def fleet_for(c: Candidate, model: str) -> FleetSpec:
    spec = FleetSpec()
    for g, pool in enumerate(c.pools):
        for i in range(pool.count):
            spec.pods.append(PodSpec(_address(g, i), "both", pool.kind.accelerator, pool.kind.model,
                                     tp=pool.kind.tp, label=f"{pool.kind.accelerator.lower()}-{g}-{i}"))
    return spec


def fleet_yaml(c: Candidate, model: str) -> str:
    """The candidate as the fleet file (engine.sim.fleet's schema)."""
    lines = [f"# kvswitch plan: {c.describe()}; ${c.cost_per_hour:.2f}/hour, {c.gpus} GPUs"]
    if c.split_tokens is not None:
        lines.append(f"# route prompts longer than {c.split_tokens} tokens to the pods of group g0 "
                     f"({c.pools[0].kind.accelerator}), the rest to group g1 ({c.pools[1].kind.accelerator})")
    lines += [f"defaults: {{model_profile: {model}}}", "pods:"]
    for g, p in enumerate(c.pools):
        tp = f", tp: {p.kind.tp}" if p.kind.tp else ""
        lines.append(f"  - {{count: {p.count}, role: both, accelerator: {p.kind.accelerator}{tp}, "
                     f"name: {p.kind.accelerator.lower()}-g{g}}}")
    return "\n".join(lines) + "\n"


def confirm(c: Candidate, reqs: list[TraceRequest], model: str, slo: SloTargets, prices: dict[str, float],
            seed: int = 0, progress: bool = True) -> dict[str, Any]:
    fleet = fleet_for(c, model)
    long_pods = frozenset(p.name for p in fleet.pods[: c.pools[0].count]) if c.split_tokens is not None else None
    sim = ClusterSim(fleet, lambda eps, clock: LengthSplitRouter(eps, c.split_tokens, long_pods=long_pods),
                     seed=seed)
    bar = ReplayProgress(c.describe(), len(reqs), reqs[-1].arrival if reqs else 0.0) if progress else None
    sim.progress = bar
    start = time.perf_counter()
    try:
        res = sim.run(trace_prompts(reqs))
    finally:
        if bar is not None:
            bar.close()
    return summarize(res, time.perf_counter() - start, slo=slo, prices=prices)


def _row(c: Candidate, s: dict[str, Any], model: str) -> dict[str, Any]:
    return {"fleet": c.describe(), "kinds": list(c.kinds), "mixed": c.mixed,
            "split_tokens": c.split_tokens, "cost_per_hour": c.cost_per_hour, "gpus": c.gpus,
            "slo_attainment": s["slo_attainment"], "goodput_req_s": s["goodput_req_s"],
            "ttft_p99_s": s["ttft_p99_s"], "tpot_mean_s": s["tpot_mean_s"], "yaml": fleet_yaml(c, model)}


def _shrink(c: Candidate, catalogue: Any) -> Candidate | None:
    """The candidate with one pod fewer in its most expensive pool that has more than one pod."""
    pools = list(c.pools)
    order = sorted(range(len(pools)), key=lambda i: -pools[i].gpus * catalogue.price(pools[i].kind.accelerator))
    for i in order:
        if pools[i].count > 1:
            p = pools[i]
            pools[i] = type(p)(p.kind, p.count - 1, p.min_input, p.max_input)
            cost = sum(q.gpus * catalogue.price(q.kind.accelerator) for q in pools)
            return Candidate(tuple(pools), cost, c.split_tokens, dict(c.notes))
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvswitch plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", help="Mooncake-format JSONL trace")
    p.add_argument("--model-profile", default="8b")
    p.add_argument("--accelerators", default="H100", help=f"KIND=PRICE,... per GPU-hour ({PRICE_SOURCE})")
    p.add_argument("--slo-ttft-ms", type=float, required=True)
    p.add_argument("--slo-tpot-ms", type=float, required=True)
    p.add_argument("--attainment", type=float, default=0.99)
    p.add_argument("--confirm", type=int, default=3, help="candidates of each family replayed (default 3)")
    p.add_argument("--speedup", type=float, default=1.0)
    p.add_argument("--max-requests", type=int, default=None)
    p.add_argument("--duration", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the winner's fleet YAML here")
    p.add_argument("--json", dest="json_out", default=None, help="write candidates and results as JSON here")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not 0 < args.attainment <= 1:
            raise ValueError(f"--attainment must be in (0, 1], got {args.attainment}")
        slo = SloTargets(args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)
        catalogue = parse_accelerators(args.accelerators)
        reqs = read_mooncake(args.trace, args.speedup, args.max_requests, args.duration)
        if not reqs:
            raise ValueError("the trace is empty")
        peak = peak_rate(reqs)
        cands = search([r.input_length for r in reqs], [r.output_length for r in reqs], peak, catalogue,
                       args.model_profile, slo.ttft_s, slo.tpot_s, args.attainment)
    except (OSError, ValueError) as exc:
        print(f"kvswitch plan: {exc}", file=sys.stderr)
        return 2
    if not cands:
        print("kvswitch plan: no fleet of these kinds meets the targets (a single request's prompt tail already "
              "misses TTFT); relax the SLO or add a faster kind", file=sys.stderr)
        return 1
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    say(f"{len(reqs)} requests, peak {peak:.2f} req/s (5-min window); {len(cands)} candidates from the cost model")
    single = [c for c in cands if not c.mixed][: args.confirm]  # one kind, one pool or a split by TP size
    mixed = [c for c in cands if c.mixed][: args.confirm]
    rows: list[dict[str, Any]] = []
    confirmed: list[Candidate] = []
    for i, c in enumerate(sorted(single + mixed, key=lambda c: c.cost_per_hour)):
        say(f"[{i + 1}/{len(single) + len(mixed)}] replaying {c.describe()}")
        s = confirm(c, reqs, args.model_profile, slo, catalogue.prices, args.seed, progress=not args.quiet)
        rows.append(_row(c, s, args.model_profile))
        confirmed.append(c)
    # the model errs on the safe side: shrink the cheapest confirmed fleet of each family pod by pod while the
    # replay still meets the goal (each step one more replay)
    for family in (False, True):
        fam = [(r, c) for r, c in zip(rows, confirmed, strict=True)
               if r["mixed"] == family and r["slo_attainment"] >= args.attainment]
        if not fam:
            continue
        row, cand = min(fam, key=lambda rc: rc[0]["cost_per_hour"])
        while True:
            smaller = _shrink(cand, catalogue)
            if smaller is None:
                break
            say(f"shrinking: replaying {smaller.describe()}")
            r = _row(smaller, confirm(smaller, reqs, args.model_profile, slo, catalogue.prices, args.seed,
                                      progress=not args.quiet), args.model_profile)
            rows.append(r)
            confirmed.append(smaller)
            if r["slo_attainment"] < args.attainment:
                break
            cand = smaller
    ok = [r for r in rows if r["slo_attainment"] >= args.attainment]
    winner = min(ok, key=lambda r: (r["cost_per_hour"], r["gpus"])) if ok else max(
        rows, key=lambda r: r["slo_attainment"])
    print(f"{'fleet':58s} {'$/hour':>8s} {'GPUs':>5s} {'attain':>7s} {'goodput':>8s}")
    for r in sorted(rows, key=lambda r: r["cost_per_hour"]):
        mark = " <- winner" if r is winner else ""
        print(f"{r['fleet'][:58]:58s} {r['cost_per_hour']:8.2f} {r['gpus']:5d} {r['slo_attainment']:7.3f} "
              f"{r['goodput_req_s']:8.3f}{mark}")
    best_single = min((r for r in ok if not r["mixed"]), key=lambda r: r["cost_per_hour"], default=None)
    best_mixed = min((r for r in ok if r["mixed"]), key=lambda r: r["cost_per_hour"], default=None)
    verdict = None
    if best_single and best_mixed:
        saving = 1 - best_mixed["cost_per_hour"] / best_single["cost_per_hour"]
        verdict = saving
        print(f"mixing kinds: {saving:+.1%} cost against the best single-kind fleet at attainment >= "
              f"{args.attainment}" + ("" if saving > 0 else " (mixing does not pay here)"))
    if not ok:
        print(f"kvswitch plan: no replayed candidate reached attainment {args.attainment}; wrote the best one",
              file=sys.stderr)
    if args.out:
        Path(args.out).write_text(winner["yaml"], encoding="utf-8")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({
            "requests": len(reqs), "peak_rate": peak, "slo_ttft_ms": args.slo_ttft_ms,
            "slo_tpot_ms": args.slo_tpot_ms, "attainment_goal": args.attainment, "prices": catalogue.prices,
            "price_source": PRICE_SOURCE, "candidates": rows, "winner": winner["fleet"],
            "mixed_saving_vs_single": verdict}, indent=2), encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
