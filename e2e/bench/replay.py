"""Benchmark: replay the whole shared Mooncake trace on 16 H100 pods of the 8B profile; print wall time.

    .venv/bin/python -m e2e.bench.replay [--policies round-robin,precise] [--profile] [--limit-s 60]

Exit code 1 when a replay takes longer than ``--limit-s`` of wall time (the budget is 60 s). Prompts longer
than the 8B profile's 32K context would be refused (400); the replay raises the limit to 128K (Llama 3.1's
real one) so the whole trace runs.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import sys
from pathlib import Path

from engine.sim.cluster.cli import replay
from engine.sim.cluster.fleet import fleet_from_flags
from engine.sim.cluster.report import format_table, summarize
from engine.sim.cluster.trace import BlockTokens, read_mooncake

DEFAULT_TRACE = Path(__file__).resolve().parents[3] / "shared" / "data" / "mooncake_synthetic_trace.jsonl"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m e2e.bench.replay")
    p.add_argument("--trace", default=str(DEFAULT_TRACE))
    p.add_argument("--policies", default="round-robin")
    p.add_argument("--pods", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=131072)
    p.add_argument("--limit-s", type=float, default=60.0)
    p.add_argument("--profile", action="store_true", help="cProfile the replays; print the top functions")
    args = p.parse_args(argv)
    reqs = read_mooncake(args.trace)
    fleet = fleet_from_flags(args.pods, "H100", "8b", max_model_len=args.max_model_len)
    blocks = BlockTokens()
    summaries = []
    prof = cProfile.Profile() if args.profile else None
    for policy in [s for s in args.policies.split(",") if s]:
        if prof:
            prof.enable()
        res, wall = replay(reqs, fleet, policy, blocks=blocks)
        if prof:
            prof.disable()
        summaries.append(summarize(res, wall))
        print(f"{policy}: {len(reqs)} requests, {res.end_time:.0f} s simulated, {wall:.1f} s wall, "
              f"{res.events} events, {sum(p.steps for p in res.pods)} pod steps", flush=True)
    print(format_table(summaries))
    print(f"max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    slow = [s["policy"] for s in summaries if s["wall_s"] > args.limit_s]
    if slow:
        print(f"over the {args.limit_s:.0f} s budget: {', '.join(slow)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
