"""Data-parallel MoE pods in virtual time: rank-aware routing against a rank-oblivious router.

    .venv/bin/python -m e2e.bench.dp --pods 2 --dp 4 --model-profile moe --accelerator H200 \\
        --workloads sp@120,mooncake@1 --seeds 0,1,2 [--variants variants.json] [--plot out.png]

Workloads: ``sp@RATE`` = shared prefix (32 groups x 4096-token context + 256-token question, 128 output tokens,
1200 requests at RATE req/s); ``mooncake@SPEEDUP`` = the first ``--mooncake-requests`` of the shared
Mooncake trace (../shared/data) at SPEEDUP. Policies: ``default`` (each (pod, rank) an endpoint; the rank goes to
the pod), ``rank-oblivious`` (the default profile seeing each pod as one endpoint; the pod spreads requests over
its ranks as vLLM 0.32 does) and ``rank-oblivious/legacy`` (the same with the balancing rule vLLM replaced).
``--variants``: JSON {"NAME": picker config} run as extra policies named NAME (profile ``default`` overridden).
Prints one markdown table per workload: means over seeds (min-max of the CVs in brackets), then per-rank shares.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from e2e.bench import workloads as W
from engine.sim.cluster.cli import replay
from engine.sim.cluster.fleet import fleet_from_flags
from engine.sim.cluster.report import summarize
from engine.sim.cluster.trace import BlockTokens, TraceRequest, read_mooncake

MOONCAKE = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "mooncake_synthetic_trace.jsonl"
FIGURES = ("ttft_p50_s", "ttft_p90_s", "tpot_mean_s", "throughput_req_s", "prefix_hit_rate", "rank_share_cv",
           "rank_busy_cv", "failed")


def workload(name: str, seed: int, mooncake_requests: int) -> list[TraceRequest]:
    kind, _, arg = name.partition("@")
    if kind == "sp":
        wl = W.shared_prefix(num_requests=1200, groups=32, prefix_tokens=4096, question_tokens=256,
                             output_tokens=128, rate=float(arg or 60), seed=seed)
        with tempfile.TemporaryDirectory() as d:
            return read_mooncake(wl.write(Path(d) / "sp.jsonl"))
    if kind == "mooncake":
        return read_mooncake(MOONCAKE.resolve(), float(arg or 1), mooncake_requests)
    raise ValueError(f"unknown workload {name!r} (sp@RATE, mooncake@SPEEDUP)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    variants = json.loads(Path(args.variants).read_text()) if args.variants else {}
    base = [p for p in args.policies.split(",") if p] if args.policies else []
    policies = [*base, *variants]
    out: dict[str, Any] = {}
    for wname in args.workloads.split(","):
        rows: dict[str, list[dict[str, Any]]] = {p: [] for p in policies}
        for seed in [int(s) for s in args.seeds.split(",")]:
            reqs = workload(wname, seed, args.mooncake_requests)
            for policy in policies:
                balancer = "legacy" if policy.endswith("/legacy") else "vllm"
                fleet = fleet_from_flags(args.pods, args.accelerator, args.model_profile, dp=args.dp,
                                         dp_balancer=balancer, max_num_batched_tokens=args.max_num_batched_tokens)
                if policy in variants:
                    profile, prof = "default", dict(variants[policy])
                else:
                    profile, prof = policy.removesuffix("/legacy"), _default_profile()
                prof["picker"] = {**prof.get("picker", {"type": "max-score", "max_endpoints": 3}), "seed": seed}
                cfg = {"scheduler": {"profiles": {profile: prof}}}
                t0 = time.perf_counter()
                res, wall = replay(reqs, fleet, profile, seed=seed, picker_config=cfg,
                                   blocks=BlockTokens())
                s = summarize(res, wall)
                s["policy"] = policy
                rows[policy].append(s)
                print(f"{wname} seed {seed} {policy}: {s['completed']} done, TTFT p90 {s['ttft_p90_s'] * 1e3:.0f} ms, "
                      f"hit {s['prefix_hit_rate']:.1%}, rank share CV {s['rank_share_cv']:.3f}, busy CV "
                      f"{s['rank_busy_cv']:.3f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        out[wname] = rows
    return out


def _default_profile() -> dict[str, Any]:
    from pickers.profiles import BUILTIN_PROFILES

    return json.loads(json.dumps(BUILTIN_PROFILES["default"]))


def table(rows: dict[str, list[dict[str, Any]]]) -> str:
    head = ("| policy | TTFT p50 ms | TTFT p90 ms | TPOT ms | req/s | prefix hit | rank share CV | rank busy CV "
            "| min / max rank share | failed |")
    lines = [head, "|" + "---|" * 10]
    for policy, runs in rows.items():
        if not runs:
            continue
        m = {k: float(np.mean([r[k] for r in runs])) for k in FIGURES}
        cv = [r["rank_share_cv"] for r in runs]
        bcv = [r["rank_busy_cv"] for r in runs]
        shares = [v for r in runs for v in r["rank_share"].values()]
        lines.append(
            f"| {policy} | {m['ttft_p50_s'] * 1e3:.1f} | {m['ttft_p90_s'] * 1e3:.1f} | {m['tpot_mean_s'] * 1e3:.1f} "
            f"| {m['throughput_req_s']:.2f} | {m['prefix_hit_rate']:.1%} | {m['rank_share_cv']:.3f} "
            f"[{min(cv):.3f}-{max(cv):.3f}] | {m['rank_busy_cv']:.3f} [{min(bcv):.3f}-{max(bcv):.3f}] "
            f"| {min(shares):.1%} / {max(shares):.1%} | {m['failed']:.0f} |")
    return "\n".join(lines)


def shares(rows: dict[str, list[dict[str, Any]]]) -> str:
    """Per (pod, rank): share of requests and busy fraction, first seed."""
    out = []
    for policy, runs in rows.items():
        if runs:
            r = runs[0]
            cells = " ".join(f"{k.split('.')[-1]}={v:.1%}/{r['rank_busy'][k]:.0%}" for k, v in r["rank_share"].items())
            out.append(f"- {policy}: {cells}")
    return "\n".join(out)


def plot(results: dict[str, dict[str, list[dict[str, Any]]]], path: str) -> None:
    """Per (pod, rank) request shares of the first seed: one panel per workload, one bar group per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, (wname, rows) in zip(axes[0], results.items()):
        policies = [p for p, runs in rows.items() if runs]
        ranks = list(rows[policies[0]][0]["rank_share"])
        per_pod = sum(1 for k in ranks if k.split("#")[0] == ranks[0].split("#")[0])
        width = 0.8 / len(policies)
        for i, policy in enumerate(policies):
            shares = [rows[policy][0]["rank_share"].get(k, 0.0) * 100 for k in ranks]
            ax.bar([j + i * width for j in range(len(ranks))], shares, width, label=policy)
        ax.axhline(100 / len(ranks), color="grey", lw=0.8, ls="--")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ranks))])
        ax.set_xticklabels([f"pod{n // per_pod} r{n % per_pod}" for n in range(len(ranks))], fontsize=7,
                           rotation=45)
        ax.set_title(wname)
        ax.set_ylabel("requests (%)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m e2e.bench.dp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pods", type=int, default=2)
    p.add_argument("--dp", type=int, default=4)
    p.add_argument("--model-profile", default="moe")
    p.add_argument("--accelerator", default="H200")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--workloads", default="sp@120,mooncake@1")
    p.add_argument("--mooncake-requests", type=int, default=1000)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default=None)
    p.add_argument("--policies", default="default,rank-oblivious,rank-oblivious/legacy",
                   help="built-in policies to run (comma-separated; empty: only --variants)")
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--plot", default=None, help="write the per-rank shares (first seed) as a PNG here")
    p.add_argument("--from-json", default=None, help="plot or print a --json file of an earlier run instead of running")
    args = p.parse_args(argv)
    results = json.loads(Path(args.from_json).read_text()) if args.from_json else run(args)
    if args.plot:
        plot(results, args.plot)
    for wname, rows in results.items():
        print(f"\n### {wname}: {args.pods} pods x DP{args.dp}, {args.model_profile} on {args.accelerator}\n")
        print(table(rows))
        print("\nper (pod, rank), seed 0: request share / busy fraction\n")
        print(shares(rows))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
