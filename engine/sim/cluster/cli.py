"""``kvswitch sim replay``: replay a Mooncake trace on a simulated fleet in virtual time.

    kvswitch sim replay TRACE.jsonl --pods 16 --accelerator H100 --model-profile 8b --policy round-robin
    kvswitch sim replay TRACE.jsonl --pd 4:12 --policies round-robin,least-inflight --json out.json
    kvswitch sim replay TRACE.jsonl --fleet fleet.yaml --speedup 2 --max-requests 500
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
import math
import sys
import time
from pathlib import Path
from typing import Any

from engine.sim.cluster.fleet import FleetSpec, fleet_from_flags, load_fleet
from engine.sim.cluster.report import format_table, summarize
from engine.sim.cluster.routers import BUILTIN, Router, SchedulerRouter, make_router
from engine.sim.cluster.simulator import ClusterSim, SimResult, trace_prompts
from engine.sim.cluster.slo import SLO_ROWS, slo_summary
from engine.sim.cluster.trace import BlockTokens, TraceRequest, read_mooncake


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
    f.add_argument("--accelerator", default="H100")
    f.add_argument("--model-profile", default="8b")
    f.add_argument("--link", default="rdma-400g", help="KV transfer link for P/D (default rdma-400g)")
    f.add_argument("--max-model-len", type=int, default=None,
                   help="per-pod context limit (default: the model profile's, capped by KV capacity)")
    f.add_argument("--max-num-seqs", type=int, default=256)
    f.add_argument("--max-num-batched-tokens", type=int, default=8192)
    r = p.add_argument_group("routing")
    r.add_argument("--policy", default="round-robin",
                   help=f"built-in ({', '.join(BUILTIN)}) or a picker profile name (default round-robin)")
    r.add_argument("--policies", default=None, help="comma-separated policies, run in turn on a fresh fleet")
    r.add_argument("--picker-config", default=None, help="picker YAML passed to pickers.config.build_scheduler")
    r.add_argument("--scrape-interval", type=float, default=0.05,
                   help="seconds between metric scrapes the picker sees (default 0.05)")
    r.add_argument("--seed", type=int, default=0)
    s = p.add_argument_group("SLOs and admission")
    s.add_argument("--slo-ttft-ms", type=float, default=None, help="TTFT target of every request (ms)")
    s.add_argument("--slo-tpot-ms", type=float, default=None, help="TPOT target of every request (ms)")
    s.add_argument("--admission", default=None,
                   help="comma-separated admission arms (none, saturation, stage-saturation, early, predictive): "
                        "each policy runs once per arm, on a fresh fleet (default: the picker config's)")
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
    if args.fleet:
        return load_fleet(args.fleet, **engine)
    return fleet_from_flags(args.pods, args.accelerator, args.model_profile, args.pd, args.link, **engine)


def replay(
    reqs: list[TraceRequest], fleet: FleetSpec, policy: str, *, seed: int = 0, scrape_interval: float = 0.05,
    picker_config: dict[str, Any] | None = None, blocks: BlockTokens | None = None,
    predicted: dict[str, tuple[float, float]] | None = None,
) -> tuple[SimResult, float]:
    """One replay of ``reqs`` on a fresh fleet; returns the result and its wall time. ``predicted``, when
    given, receives the picker's predicted (TTFT, TPOT) per request id."""
    start = time.perf_counter()
    routers: list[Router] = []

    def build(eps: Any, clock: Any) -> Router:
        routers.append(make_router(policy, eps, clock, seed=seed, config=picker_config,
                                   scrape_interval=scrape_interval))
        return routers[-1]

    sim = ClusterSim(fleet, build, scrape_interval=scrape_interval, seed=seed)
    res = sim.run(trace_prompts(reqs, blocks))
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


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    return obj


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        policies = [s.strip() for s in (args.policies or args.policy).split(",") if s.strip()]
        if not policies:
            raise ValueError("--policies is empty")
        fleet = _fleet(args)
        reqs = read_mooncake(args.trace, args.speedup, args.max_requests, args.duration)
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
    ttft_s = args.slo_ttft_ms / 1e3 if args.slo_ttft_ms is not None else None
    tpot_s = args.slo_tpot_ms / 1e3 if args.slo_tpot_ms is not None else None
    with_slo = ttft_s is not None or tpot_s is not None or args.admission is not None
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
                               picker_config=arm_config(picker_config, arm, args.slo_ttft_ms, args.slo_tpot_ms),
                               blocks=blocks, predicted=predicted)
        except ValueError as exc:
            print(f"kvswitch sim replay: policy {policy}: {exc}", file=sys.stderr)
            return 2
        summary = summarize(res, wall)
        summary["column"] = column
        if with_slo:
            summary["admission"] = arm or "config"
            summary.update(slo_summary(res, ttft_s, tpot_s, predicted))
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
        payload = {"fleet": fleet.describe(), "requests": len(reqs), "runs": [_clean(s) for s in summaries]}
        Path(args.json_out).write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
