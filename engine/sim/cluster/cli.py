"""``kvswitch sim replay``: replay a Mooncake trace on a simulated fleet in virtual time.

    kvswitch sim replay TRACE.jsonl --pods 16 --accelerator H100 --model-profile 8b --policy round-robin
    kvswitch sim replay TRACE.jsonl --pd 4:12 --policies round-robin,least-inflight --json out.json
    kvswitch sim replay TRACE.jsonl --fleet fleet.yaml --speedup 2 --max-requests 500
    kvswitch sim replay TRACE.jsonl --pods 4 --dp 8 --model-profile dsv3 --accelerator H200 \
        --policies default,rank-oblivious --json out.json

``--dp R``: every pod runs R data-parallel ranks (DP attention + EP experts, lockstep steps) behind one address;
picker profiles see each (pod, rank) as an endpoint, except ``rank-oblivious`` (the default profile seeing each
pod as one endpoint; the pod balances its ranks as vLLM does without a rank header).

    kvswitch sim replay TRACE.jsonl --pd 4:12 --policy default --slo-ttft-ms 2000 --slo-tpot-ms 40 \
        --admission none,stage-saturation,early,predictive

Each policy (x each admission arm) replays the same trace on a fresh fleet; the table has one column per run.
With SLO targets, every request carries them (the picker's pool defaults, ``scheduler.slo``) and the summary
adds attainment, goodput, rejection, wasted prefill, decode TPOT oscillation and the picker's prediction
error per accelerator (engine/sim/cluster/slo.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from engine.sim.cluster.autoscale import PRICE_SOURCE, parse_accelerators, parse_planner_spec, run_planner
from engine.sim.cluster.fleet import FleetSpec, fleet_from_flags, load_fleet
from engine.sim.cluster.progress import ReplayProgress
from engine.sim.cluster.report import SloTargets, format_table, json_safe, summarize
from engine.sim.cluster.routers import BUILTIN, RANK_OBLIVIOUS, Router, SchedulerRouter, make_router
from engine.sim.cluster.simulator import ClusterSim, SimResult, trace_prompts
from engine.sim.cluster.slo import SLO_ROWS, admission_summary
from engine.sim.cluster.trace import BlockTokens, TraceRequest, read_mooncake
from engine.sim.dpgroup import BALANCERS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvswitch sim replay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", help="Mooncake JSONL trace (timestamp ms, input_length, output_length, hash_ids)")
    t = p.add_argument_group("trace")
    t.add_argument("--speedup", type=float, default=1.0, help="divide arrival times by this (default 1)")
    t.add_argument("--max-requests", type=int, default=None, help="replay only the first N requests")
    t.add_argument("--duration", type=float, default=None, help="replay only arrivals in the first S seconds "
                   "(after --speedup)")
    f = p.add_argument_group("fleet")
    f.add_argument("--fleet", default=None, help="fleet YAML (pods: [{count, role, accelerator, model_profile, "
                   "...}], link); overrides --pods/--pd")
    f.add_argument("--pods", type=int, default=16, help="aggregated pods (default 16)")
    f.add_argument("--pd", default=None, metavar="P:D", help="disaggregated: P prefill and D decode pods")
    f.add_argument("--dp", type=int, default=1, help="data-parallel ranks per pod (default 1)")
    f.add_argument("--speculative", action="store_true",
                   help="pods decode with their model's speculative decoding (engine.presets.SPECULATIVE)")
    f.add_argument("--dp-balancer", choices=BALANCERS, default="vllm",
                   help="how a pod spreads requests without a rank header over its ranks: vllm (0.32) or the "
                        "legacy rule it replaced (default vllm)")
    f.add_argument("--accelerator", default="H100")
    f.add_argument("--model-profile", default="8b")
    f.add_argument("--link", default="rdma-400g", help="KV transfer link for P/D (default rdma-400g)")
    f.add_argument("--max-model-len", type=int, default=None,
                   help="per-pod context limit (default: the model profile's, capped by KV capacity)")
    f.add_argument("--max-num-seqs", type=int, default=256)
    f.add_argument("--max-num-batched-tokens", type=int, default=8192)
    r = p.add_argument_group("routing")
    r.add_argument("--policy", default=None,
                   help=f"built-in ({', '.join(BUILTIN)}) or a picker profile name (default round-robin)")
    r.add_argument("--policies", default=None, help="comma-separated policies, run in turn on a fresh fleet")
    r.add_argument("--picker-config", default=None, help="picker YAML passed to pickers.config.build_scheduler")
    r.add_argument("--scrape-interval", type=float, default=0.05,
                   help="seconds between metric scrapes the picker sees (default 0.05)")
    r.add_argument("--seed", type=int, default=0)
    a = p.add_argument_group("autoscaling and SLOs")
    a.add_argument("--autoscale", default=None, metavar="PLANNERS",
                   help="comma-separated planners run in the loop, one replay each: kvswitch, static-peak, "
                        "queue-hpa, dynamo-throughput; knobs after a colon, e.g. "
                        "dynamo-throughput:utilization=0.6,interval_s=60 or kvswitch:utilization=0.9 "
                        "(routing: --policy, default least-inflight here)")
    a.add_argument("--startup-s", type=float, default=60.0, help="start-up time of a pod added at run time")
    a.add_argument("--accelerators", default=None, metavar="KIND=PRICE,...",
                   help="kinds the planner may buy and their price per GPU-hour (default: --accelerator at "
                        "its default price); prices also give the summary's cost")
    a.add_argument("--slo-ttft-ms", type=float, default=None, help="TTFT target (ms) for slo_attainment")
    a.add_argument("--slo-tpot-ms", type=float, default=None, help="TPOT target (ms) for slo_attainment")
    a.add_argument("--attainment", type=float, default=0.95, help="the planners' attainment goal (0-1)")
    a.add_argument("--admission", default=None,
                   help="comma-separated admission arms (none, saturation, stage-saturation, early, predictive): "
                        "each policy runs once per arm, on a fresh fleet; --slo-* become every request's "
                        "targets (the picker's scheduler.slo) (default: the picker config's admission)")
    o = p.add_argument_group("output")
    o.add_argument("--json", dest="json_out", default=None, help="write the summaries as JSON here")
    o.add_argument("--requests-out", default=None,
                   help="write one JSON line per request here (with several policies: one file per policy, "
                        "POLICY inserted before the suffix)")
    o.add_argument("--quiet", action="store_true", help="print only the table")
    return p


def _fleet(args: argparse.Namespace) -> FleetSpec:
    engine = {"max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
              "max_num_batched_tokens": args.max_num_batched_tokens}
    if args.speculative:
        engine["speculative"] = True
    if args.dp < 1:
        raise ValueError("--dp must be at least 1")
    if args.dp > 1:
        engine["dp"] = args.dp
        engine["dp_balancer"] = args.dp_balancer
    if args.fleet:
        return load_fleet(args.fleet, **engine)
    return fleet_from_flags(args.pods, args.accelerator, args.model_profile, args.pd, args.link, **engine)


def replay(
    reqs: list[TraceRequest], fleet: FleetSpec, policy: str, *, seed: int = 0, scrape_interval: float = 0.05,
    picker_config: dict[str, Any] | None = None, blocks: BlockTokens | None = None, progress: bool = False,
    predicted: dict[str, tuple[float, float]] | None = None, access_log: bool = False,
) -> tuple[SimResult, float]:
    """One replay of ``reqs`` on a fresh fleet; returns the result and its wall time. ``progress``: report
    on stderr while it runs (see ``ReplayProgress``). ``predicted``, when given, receives the picker's
    predicted (TTFT, TPOT) per request id. ``access_log``: the picker hears of first tokens only at each
    request's end, as behind Envoy in access-log mode."""
    start = time.perf_counter()
    routers: list[Router] = []

    def build(eps: Any, clock: Any) -> Router:
        routers.append(make_router(policy, eps, clock, seed=seed, config=picker_config,
                                   scrape_interval=scrape_interval, access_log=access_log))
        return routers[-1]

    sim = ClusterSim(fleet, build, scrape_interval=scrape_interval, seed=seed,
                     rank_endpoints=policy != RANK_OBLIVIOUS)
    bar = ReplayProgress(policy, len(reqs), reqs[-1].arrival if reqs else 0.0) if progress else None
    sim.progress = bar
    try:
        res = sim.run(trace_prompts(reqs, blocks))
    finally:
        if bar is not None:
            bar.close()
    res.policy = policy
    if predicted is not None and routers and isinstance(routers[0], SchedulerRouter):
        predicted.update(routers[0].predicted)
    return res, time.perf_counter() - start


def arm_config(base: dict[str, Any] | None, admission: str | None, ttft_ms: float | None,
               tpot_ms: float | None) -> dict[str, Any] | None:
    """The picker config of one arm: ``base`` with ``scheduler.admission`` and ``scheduler.slo`` set."""
    if admission is None and ttft_ms is None and tpot_ms is None:
        return base
    raw = dict(base or {})
    sched = dict(raw["scheduler"]) if isinstance(raw.get("scheduler"), dict) else raw
    if admission is not None:
        sched["admission"] = [admission]
    if ttft_ms is not None or tpot_ms is not None:
        sched["slo"] = {**(sched.get("slo") or {}), "ttft_ms": ttft_ms, "tpot_ms": tpot_ms}
    return sched


def _requests_path(base: str, policy: str, many: bool) -> Path:
    path = Path(base)
    return path.with_name(f"{path.stem}.{policy}{path.suffix}") if many else path




def _slo(args: argparse.Namespace) -> SloTargets | None:
    if (args.slo_ttft_ms is None) != (args.slo_tpot_ms is None):
        raise ValueError("give both --slo-ttft-ms and --slo-tpot-ms")
    if not 0 < args.attainment <= 1:
        raise ValueError(f"--attainment must be in (0, 1], got {args.attainment}")
    if args.slo_ttft_ms is None:
        return None
    return SloTargets(args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)


def _split_specs(text: str) -> list[str]:
    """``kvswitch,dynamo-throughput:utilization=0.6,interval_s=60`` -> one item per planner: a comma starts
    a new planner only when what follows is not a ``KEY=VALUE`` knob of the one before."""
    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if out and "=" in part and ":" not in part and ":" in out[-1]:
            out[-1] += "," + part
        else:
            out.append(part)
    return out


def _autoscale(args: argparse.Namespace, reqs: list[TraceRequest], slo: SloTargets | None) -> int:
    if slo is None:
        raise ValueError("--autoscale needs --slo-ttft-ms and --slo-tpot-ms (the planners size for them)")
    if args.fleet or args.pd:
        raise ValueError("--autoscale plans aggregated pods itself: drop --fleet/--pd")
    if args.dp != 1 or args.speculative:
        raise ValueError("--autoscale plans single-engine pods without speculative decoding: drop --dp/--speculative")
    names = [parse_planner_spec(n).label for n in _split_specs(args.autoscale)]
    if not reqs:
        raise ValueError("the trace is empty")
    catalogue = parse_accelerators(args.accelerators or args.accelerator, startup_s=args.startup_s)
    engine = {"max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
              "max_num_batched_tokens": args.max_num_batched_tokens}
    summaries = []
    for name in names:
        res, wall, ctl = run_planner(reqs, name, catalogue, slo, args.model_profile, args.attainment,
                                     policy=args.policy or "least-inflight", seed=args.seed,
                                     progress=not args.quiet, **engine)
        s = summarize(res, wall, slo=slo, prices=catalogue.prices)
        s = {"planner": name, **s, "startup_s": args.startup_s, "accelerators": catalogue.prices,
             "decisions": [{"at": t, "desired": d} for t, d in ctl.decisions],
             "initial_pods": sum(p.requested_at == 0.0 for p in res.pods)}
        summaries.append(s)
        if not args.quiet:
            print(f"{name}: attainment {s['slo_attainment']:.3f}, {s['gpu_hours']:.2f} GPU-h, "
                  f"{s['scaling_actions_per_hour']:.1f} actions/h, {wall:.1f} s wall", file=sys.stderr)
    print(format_table(summaries))
    if args.json_out:
        payload = {"requests": len(reqs), "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms,
                   "attainment_goal": args.attainment, "startup_s": args.startup_s, "price_source": PRICE_SOURCE,
                   "runs": [json_safe(s) for s in summaries]}
        Path(args.json_out).write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        slo = _slo(args)
        reqs = read_mooncake(args.trace, args.speedup, args.max_requests, args.duration)
        if args.autoscale:
            return _autoscale(args, reqs, slo)
        policies = [s.strip() for s in (args.policies or args.policy or "round-robin").split(",") if s.strip()]
        if not policies:
            raise ValueError("--policies is empty")
        fleet = _fleet(args)
        prices = parse_accelerators(args.accelerators).prices if args.accelerators else None
        picker_config = None
        if args.picker_config:
            import yaml

            picker_config = yaml.safe_load(Path(args.picker_config).read_text(encoding="utf-8")) or {}
    except (OSError, ValueError) as exc:
        print(f"kvswitch sim replay: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"trace: {len(reqs)} requests over {reqs[-1].arrival if reqs else 0:.1f} s; "
              f"fleet: {fleet.describe()}", file=sys.stderr)
    arms: list[str | None] = [None]
    if args.admission:
        arms = [a.strip() for a in args.admission.split(",") if a.strip()]
        if not arms:
            print("kvswitch sim replay: --admission is empty", file=sys.stderr)
            return 2
    if args.admission and slo is None:
        print("kvswitch sim replay: --admission needs --slo-ttft-ms and --slo-tpot-ms (the arms are judged on "
              "them)", file=sys.stderr)
        return 2
    summaries = []
    extra_rows: dict[str, tuple[str, str, str]] = {}
    blocks = BlockTokens()
    runs = [(p, a) for p in policies for a in arms]
    for policy, arm in runs:
        column = policy if arm is None else (arm if len(policies) == 1 else f"{policy}+{arm}")
        if arm is not None and arm != "none" and policy in BUILTIN:
            print(f"kvswitch sim replay: admission {arm!r} needs a picker policy, not the built-in {policy!r}",
                  file=sys.stderr)
            return 2
        predicted: dict[str, tuple[float, float]] = {}
        try:
            res, wall = replay(reqs, fleet, policy, seed=args.seed, scrape_interval=args.scrape_interval,
                               picker_config=arm_config(picker_config, arm, args.slo_ttft_ms if arm else None,
                                                        args.slo_tpot_ms if arm else None),
                               blocks=blocks, progress=not args.quiet, predicted=predicted)
        except ValueError as exc:
            print(f"kvswitch sim replay: policy {policy}: {exc}", file=sys.stderr)
            return 2
        summary = summarize(res, wall, slo=slo, prices=prices)
        summary["column"] = column
        if slo is not None:
            summary["admission"] = arm or "config"
            summary.update(admission_summary(res, slo, predicted))
            for rk, rl, rf in SLO_ROWS:
                extra_rows.setdefault(rk, (rk, rl, rf))
            for acc, m in summary.get("prediction_mape", {}).items():
                for lat in ("ttft", "tpot"):
                    key = f"{lat}_mape_{acc}"
                    summary[key] = m[lat]
                    extra_rows.setdefault(key, (key, f"{lat.upper()} MAPE {acc}", "{:.1%}"))
        summaries.append(summary)
        if not args.quiet:
            print(f"{column}: {summary['completed']} completed in {wall:.1f} s wall", file=sys.stderr)
        if args.requests_out:
            with open(_requests_path(args.requests_out, column, len(runs) > 1), "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(rec.as_dict()) + "\n" for rec in res.records)
    print(format_table(summaries, list(extra_rows.values())))
    if args.json_out:
        payload = {"fleet": fleet.describe(), "requests": len(reqs), "runs": [json_safe(s) for s in summaries]}
        Path(args.json_out).write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
