"""Admission arms on the Mooncake trace in virtual time, at several speedups: the SLO table and its plot.

    python -m e2e.bench.slo_admission [--max-requests 1000] [--speedups 1,1.5,2] [--out e2e/bench/results/slo]

Every (speedup, arm) is one ``kvswitch sim replay`` run on a fresh fleet (engine/sim/cluster/cli.py): the
P/D fleet, targets and picker config are below and printed with the results. Writes ``slo_admission.json``,
``slo_admission.md`` (the table for the README) and ``slo_admission.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from engine.sim.cluster.cli import arm_config, replay
from engine.sim.cluster.fleet import fleet_from_flags
from engine.sim.cluster.report import SloTargets, summarize
from engine.sim.cluster.slo import admission_summary
from engine.sim.cluster.trace import BlockTokens, read_mooncake

TRACE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mooncake_synthetic_trace.jsonl"
CONFIG = Path(__file__).resolve().parent / "slo" / "mooncake-pd.yaml"
ARMS = ("none", "saturation", "stage-saturation", "early", "predictive")
KEYS = ("slo_attainment", "admitted_attainment", "goodput_req_s", "rejected_frac", "wasted_prefill_frac",
        "decode_tpot_cv_per_min")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", default=str(TRACE))
    p.add_argument("--pd", default="4:1", help="prefill:decode pods (default 4:1: ~70 %% prefill busy at 1x)")
    p.add_argument("--ttft-ms", type=float, default=5000.0)
    p.add_argument("--tpot-ms", type=float, default=20.0)
    p.add_argument("--speedups", default="1,1.5,2")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--max-requests", type=int, default=1000)
    p.add_argument("--out", default="e2e/bench/results/slo")
    args = p.parse_args(argv)
    cfg = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    fleet = fleet_from_flags(pd=args.pd)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    load = os.getloadavg()[0]
    meta = {"fleet": fleet.describe(), "ttft_ms": args.ttft_ms, "tpot_ms": args.tpot_ms,
            "max_requests": args.max_requests, "config": cfg, "load_at_start": load}
    print(f"fleet {fleet.describe()}; targets TTFT {args.ttft_ms:g} ms, TPOT {args.tpot_ms:g} ms; "
          f"{args.max_requests} requests; load {load:.1f}", file=sys.stderr)
    for sp in (float(x) for x in args.speedups.split(",")):
        reqs = read_mooncake(args.trace, sp, args.max_requests)
        blocks = BlockTokens()
        for arm in args.arms.split(","):
            t0 = time.perf_counter()
            predicted: dict[str, tuple[float, float]] = {}
            res, wall = replay(reqs, fleet, "default", picker_config=arm_config(cfg, arm, args.ttft_ms, args.tpot_ms),
                               blocks=blocks, predicted=predicted)
            targets = SloTargets(args.ttft_ms / 1e3, args.tpot_ms / 1e3)
            s = summarize(res, wall, slo=targets)
            s.update(admission_summary(res, targets, predicted))
            row = {"speedup": sp, "admission": arm, **{k: s[k] for k in KEYS},
                   "ttft_p90_s": s["ttft_p90_s"], "tpot_mean_s": s["tpot_mean_s"],
                   "prediction_mape": s.get("prediction_mape", {}), "pod_busy": s["pod_busy"], "wall_s": wall}
            rows.append(row)
            (out / "slo_admission.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2),
                                                    encoding="utf-8")  # after every run: a partial table
            print(f"  {sp:g}x {arm:17s} attain {row['slo_attainment']:.3f} admitted {row['admitted_attainment']:.3f} "
                  f"goodput {row['goodput_req_s']:.3f} rejected {row['rejected_frac']:.3f} wasted "
                  f"{row['wasted_prefill_frac']:.4f} cv {row['decode_tpot_cv_per_min']:.3f} "
                  f"({time.perf_counter() - t0:.0f} s wall, load {os.getloadavg()[0]:.1f})", file=sys.stderr)
    table = markdown(rows)
    (out / "slo_admission.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    plot(rows, out / "slo_admission.png")
    return 0


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| speedup | admission | " + " | ".join(KEYS) + " |"
    lines = [head, "|" + "---|" * (len(KEYS) + 2)]
    for r in rows:
        lines.append(f"| {r['speedup']:g} | {r['admission']} | " + " | ".join(
            f"{r[k]:.3f}" if k != "wasted_prefill_frac" else f"{r[k]:.4f}" for k in KEYS) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(r["admission"] for r in rows))
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, key in zip(axes, ("goodput_req_s", "admitted_attainment", "rejected_frac", "wasted_prefill_frac")):
        for arm in arms:
            pts = [(r["speedup"], r[key]) for r in rows if r["admission"] == arm]
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=arm)
        ax.set_title(key)
        ax.set_xlabel("speedup")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
