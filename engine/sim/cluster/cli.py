"""``kvswitch sim replay``: replay a Mooncake trace on a simulated fleet in virtual time.

    kvswitch sim replay TRACE.jsonl --pods 16 --accelerator H100 --model-profile 8b --policy round-robin
    kvswitch sim replay TRACE.jsonl --pd 4:12 --policies round-robin,least-inflight --json out.json
    kvswitch sim replay TRACE.jsonl --fleet fleet.yaml --speedup 2 --max-requests 500
    kvswitch sim replay TRACE.jsonl --pods 4 --dp 8 --model-profile dsv3 --accelerator H200 \
        --policies default,rank-oblivious --json out.json

``--dp R``: every pod runs R data-parallel ranks (DP attention + EP experts, lockstep steps) behind one address;
picker profiles see each (pod, rank) as an endpoint, except ``rank-oblivious`` (the default profile seeing each
pod as one endpoint; the pod balances its ranks as vLLM does without a rank header).

Each policy replays the same trace on a fresh fleet; the table has one column per policy.
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
from engine.sim.cluster.routers import BUILTIN, RANK_OBLIVIOUS, make_router
from engine.sim.cluster.simulator import ClusterSim, SimResult, trace_prompts
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
    r.add_argument("--policy", default="round-robin",
                   help=f"built-in ({', '.join(BUILTIN)}) or a picker profile name (default round-robin)")
    r.add_argument("--policies", default=None, help="comma-separated policies, run in turn on a fresh fleet")
    r.add_argument("--picker-config", default=None, help="picker YAML passed to pickers.config.build_scheduler")
    r.add_argument("--scrape-interval", type=float, default=0.05,
                   help="seconds between metric scrapes the picker sees (default 0.05)")
    r.add_argument("--seed", type=int, default=0)
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
    picker_config: dict[str, Any] | None = None, blocks: BlockTokens | None = None,
) -> tuple[SimResult, float]:
    """One replay of ``reqs`` on a fresh fleet; returns the result and its wall time."""
    start = time.perf_counter()
    sim = ClusterSim(
        fleet, lambda eps, clock: make_router(policy, eps, clock, seed=seed, config=picker_config,
                                        scrape_interval=scrape_interval),
        scrape_interval=scrape_interval, seed=seed, rank_endpoints=policy != RANK_OBLIVIOUS,
    )
    res = sim.run(trace_prompts(reqs, blocks))
    res.policy = policy
    return res, time.perf_counter() - start


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
    summaries = []
    blocks = BlockTokens()
    for policy in policies:
        try:
            res, wall = replay(reqs, fleet, policy, seed=args.seed, scrape_interval=args.scrape_interval,
                               picker_config=picker_config, blocks=blocks)
        except ValueError as exc:
            print(f"kvswitch sim replay: policy {policy}: {exc}", file=sys.stderr)
            return 2
        summary = summarize(res, wall)
        summaries.append(summary)
        if not args.quiet:
            print(f"{policy}: {summary['completed']} completed in {wall:.1f} s wall", file=sys.stderr)
        if args.requests_out:
            with open(_requests_path(args.requests_out, policy, len(policies) > 1), "w", encoding="utf-8") as fh:
                for rec in res.records:
                    fh.write(json.dumps(rec.as_dict()) + "\n")
    print(format_table(summaries))
    if args.json_out:
        payload = {"fleet": fleet.describe(), "requests": len(reqs), "runs": [_clean(s) for s in summaries]}
        Path(args.json_out).write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
