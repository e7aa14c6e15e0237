"""``kvswitch plan``: the cheapest fleet for a workload under SLOs, found with the cost model and confirmed
by replaying the workload in virtual time.

    kvswitch plan TRACE.jsonl --model-profile 8b --accelerators H100=2.49,L40S=0.86 \\
        --slo-ttft-ms 2000 --slo-tpot-ms 60 --attainment 0.99 --out fleet.yaml --json plan.json

1. search (pickers.planner.search): every single-kind fleet (TP 1/2/4), every two-pool fleet split by
   prompt length, and every prefill/decode disaggregated fleet (prefill pool of one kind and TP size, decode
   pool of the same or another), sized by the cost-model capacity at the trace's peak five-minute rate and
   its length distribution (tail included), cheapest first;
2. confirm: replay the trace on the best ``--confirm`` candidates of each family (each kind alone, or two
   kinds mixed; aggregated or P/D: the best one-kind fleet is looked for in every kind, not only in the
   kind the model ranks first) in virtual time (least in flight routing; split fleets route by the candidate's length
   split, P/D fleets take the least loaded prefill pod and the least loaded decode pod) and measure
   slo_attainment and goodput;
3. the winner is the cheapest confirmed candidate whose attainment meets ``--attainment``; it is written as
   a fleet YAML that ``kvswitch sim --config`` and ``kvswitch sim replay --fleet`` read.
"""

from __future__ import annotations

import argparse
import dataclasses
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


def family(c: Candidate) -> str:
    """The family a candidate is confirmed and shrunk in: its kind (or "mixed"), aggregated or P/D."""
    return f"{'+'.join(c.kinds) if not c.mixed else 'two kinds'}, {'P/D' if c.disaggregated else 'aggregated'}"


def fleet_for(c: Candidate, model: str) -> FleetSpec:
    spec = FleetSpec()
    for g, pool in enumerate(c.pools):
        for i in range(pool.count):
            spec.pods.append(PodSpec(_address(g, i), pool.role, pool.kind.accelerator, pool.kind.model,
                                     tp=pool.kind.tp, label=f"{pool.kind.accelerator.lower()}-{g}-{i}"))
    return spec


def fleet_yaml(c: Candidate, model: str) -> str:
    """The candidate as the fleet file (engine.sim.fleet's schema)."""
    lines = [f"# kvswitch plan: {c.describe()}; ${c.cost_per_hour:.2f}/hour, {c.gpus} GPUs"]
    if c.split_tokens is not None:
        lines.append(f"# route prompts longer than {c.split_tokens} tokens to the pods of group g0 "
                     f"({c.pools[0].kind.accelerator}), the rest to group g1 ({c.pools[1].kind.accelerator})")
    if c.disaggregated:
        lines.append("# prefill/decode disaggregated: every request is prefilled on a prefill pod, its KV pulled by "
                     "a decode pod")
    lines += [f"defaults: {{model_profile: {model}}}", "pods:"]
    for g, p in enumerate(c.pools):
        tp = f", tp: {p.kind.tp}" if p.kind.tp else ""
        lines.append(f"  - {{count: {p.count}, role: {p.role}, accelerator: {p.kind.accelerator}{tp}, "
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
    return {"fleet": c.describe(), "kinds": list(c.kinds), "mixed": c.mixed, "pd": c.disaggregated,
            "family": family(c),
            "split_tokens": c.split_tokens, "cost_per_hour": c.cost_per_hour, "gpus": c.gpus,
            "slo_attainment": s["slo_attainment"], "goodput_req_s": s["goodput_req_s"],
            "ttft_p99_s": s["ttft_p99_s"], "tpot_mean_s": s["tpot_mean_s"], "yaml": fleet_yaml(c, model)}


def _shrinks(c: Candidate, catalogue: Any) -> list[Candidate]:
    """The candidate with one pod fewer in one pool, for each pool that has more than one pod, the most
    expensive pool first (a pool left empty would change the fleet's shape, so a pool keeps one pod)."""
    out = []
    order = sorted(range(len(c.pools)), key=lambda i: -c.pools[i].gpus * catalogue.price(c.pools[i].kind.accelerator))
    for i in order:
        if c.pools[i].count > 1:
            pools = list(c.pools)
            pools[i] = dataclasses.replace(pools[i], count=pools[i].count - 1)
            cost = sum(q.gpus * catalogue.price(q.kind.accelerator) for q in pools)
            out.append(Candidate(tuple(pools), cost, c.split_tokens, dict(c.notes)))
    return out


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
    # families: each kind alone (one pool, a split by TP size, a one-kind P/D fleet) and two kinds mixed
    families = list(dict.fromkeys(family(c) for c in cands))
    chosen = [c for fam in families for c in [c for c in cands if family(c) == fam][: args.confirm]]
    rows: list[dict[str, Any]] = []
    confirmed: list[Candidate] = []
    for i, c in enumerate(sorted(chosen, key=lambda c: c.cost_per_hour)):
        say(f"[{i + 1}/{len(chosen)}] replaying {c.describe()}")
        s = confirm(c, reqs, args.model_profile, slo, catalogue.prices, args.seed, progress=not args.quiet)
        rows.append(_row(c, s, args.model_profile))
        confirmed.append(c)
    # the model errs on the safe side: shrink the cheapest confirmed fleet of each family pod by pod while the
    # replay still meets the goal: each round tries one pod fewer in each pool (most expensive pool first) and
    # keeps the first that still meets it; it stops when none does (each try one more replay, none twice)
    tried = {r["fleet"] for r in rows}
    for fam_name in families:
        fam = [(r, c) for r, c in zip(rows, confirmed, strict=True)
               if r["family"] == fam_name and r["slo_attainment"] >= args.attainment]
        if not fam:
            continue
        row, cand = min(fam, key=lambda rc: rc[0]["cost_per_hour"])
        shrunk = True
        while shrunk:
            shrunk = False
            for smaller in _shrinks(cand, catalogue):
                if smaller.describe() in tried:
                    continue
                tried.add(smaller.describe())
                say(f"shrinking: replaying {smaller.describe()}")
                r = _row(smaller, confirm(smaller, reqs, args.model_profile, slo, catalogue.prices, args.seed,
                                          progress=not args.quiet), args.model_profile)
                rows.append(r)
                confirmed.append(smaller)
                if r["slo_attainment"] >= args.attainment:
                    cand, shrunk = smaller, True
                    break
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
    best_by_family = {}
    for name in families:
        best = min((r for r in ok if r["family"] == name), key=lambda r: r["cost_per_hour"], default=None)
        best_by_family[name] = None if best is None else {k: best[k] for k in (
            "fleet", "cost_per_hour", "gpus", "slo_attainment")}
        print(f"best {name}: " + ("none met the goal" if best is None else
                                  f"{best['fleet']} ${best['cost_per_hour']:.2f}/hour {best['slo_attainment']:.4f}"))
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
            "mixed_saving_vs_single": verdict, "best_by_family": best_by_family}, indent=2), encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
