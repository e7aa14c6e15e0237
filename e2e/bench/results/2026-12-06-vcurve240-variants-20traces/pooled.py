"""The tables of this set's README from its results.json files (virtual time, so re-running them gives the same).

    python pooled.py verdicts 240/*/results.json            # each variant against the four peers
    python pooled.py paired 240/W/results.json knee/W/results.json  # req/s paired by trace

``verdicts``: per workload and load, each router that is not a peer against the issue's bar (medians over the
traces every router of the point ran: req/s >= the best peer's, TTFT p90 <= the best peer's, p99 <= 1.1x the
best peer's), the peers being the emulations as installed; "met", or what is missed by how much. The
folders' own verdict tables count every other router as a peer; these do not.

``paired``: each router's req/s against vllm-router kv_aware's and the default's on the same trace, the median
and interquartile range of the differences in %, and on how many traces it has the highest req/s of itself and
the four peers.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from typing import Any

import numpy as np

PEERS = ("envoy:round_robin", "vllm:cache_aware", "vllm:kv_aware", "sglang:cache_aware")
BASELINES = ("least-loaded", "tree:smallest")

Runs = dict[tuple[str, float, str], dict[int, dict[str, Any]]]  # (workload, load, router) -> {seed: run}


def load(paths: list[str]) -> Runs:
    runs: Runs = defaultdict(dict)
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for run in json.load(f)["runs"]:
                runs[(run["workload"], round(run["load"], 3), run["router"])][run["seed"]] = run
    return runs


def points(runs: Runs) -> list[tuple[str, float, list[str], list[int]]]:
    """(workload, load, routers under test, the traces every router of the point ran)."""
    out = []
    for w, load_x in sorted({(w, x) for w, x, _ in runs}):
        routers = sorted({r for ww, xx, r in runs if (ww, xx) == (w, load_x)})
        seeds = sorted(set.intersection(*(set(runs[(w, load_x, r)]) for r in routers)))
        out.append((w, load_x, [r for r in routers if r not in PEERS and r not in BASELINES], seeds))
    return out


def median(runs: Runs, key: tuple[str, float, str], seeds: list[int], metric: str) -> float:
    return statistics.median(runs[key][s][metric] for s in seeds)


def verdicts(runs: Runs) -> None:
    """One row per point: the default's req/s / p90 / p99, then each router's misses of the bar ("met")."""
    rows = points(runs)
    routers = sorted({r for _, _, rs, _ in rows for r in rs}, key=lambda r: (r != "default", r))
    print("| workload | load | traces | default: req/s / p90 / p99 ms | " + " | ".join(routers) + " |")
    print("|---|---|---|---|" + "---|" * len(routers))
    for w, load_x, present, seeds in rows:
        peer = {m: [median(runs, (w, load_x, p), seeds, m) for p in PEERS]
                for m in ("throughput_req_s", "ttft_p90_s", "ttft_p99_s")}
        req, p90, p99 = max(peer["throughput_req_s"]), min(peer["ttft_p90_s"]), min(peer["ttft_p99_s"])
        cells = []
        for r in routers:
            if r not in present:
                cells.append("")
                continue
            t, a, b = (median(runs, (w, load_x, r), seeds, m) for m in ("throughput_req_s", "ttft_p90_s", "ttft_p99_s"))
            miss = [f"req/s {100 * (t / req - 1):+.1f} %"] if t < req else []
            miss += [f"p90 {100 * (a / p90 - 1):+.0f} %"] if a > p90 else []
            miss += [f"p99 {b / p99:.2f}x"] if b > 1.1 * p99 else []
            cells.append(", ".join(miss) or "met")
        d = [median(runs, (w, load_x, "default"), seeds, m) for m in ("throughput_req_s", "ttft_p90_s", "ttft_p99_s")]
        print(f"| {w} | {load_x:g} | {len(seeds)} | {d[0]:.3f} / {1000 * d[1]:.0f} / {1000 * d[2]:.0f} | "
              + " | ".join(cells) + " |")


def paired(runs: Runs) -> None:
    print("| workload | load | traces | router | vs kv_aware, % (median [IQR]) | vs default, % | top req/s |")
    print("|---|---|---|---|---|---|---|")
    for w, load_x, routers, seeds in points(runs):
        tput = {(r, s): float(runs[(w, load_x, r)][s]["throughput_req_s"]) for r in (*routers, *PEERS) for s in seeds}
        for r in routers:
            cols = []
            for ref in ("vllm:kv_aware", "default"):
                d = np.array([100 * (tput[(r, s)] / tput[(ref, s)] - 1) for s in seeds])
                cols.append(f"{np.median(d):+.2f} [{np.percentile(d, 25):+.2f}, {np.percentile(d, 75):+.2f}]")
            top = sum(tput[(r, s)] >= max(tput[(p, s)] for p in PEERS) for s in seeds)
            print(f"| {w} | {load_x:g} | {len(seeds)} | {r} | {cols[0]} | {cols[1]} | {top}/{len(seeds)} |")


if __name__ == "__main__":
    {"verdicts": verdicts, "paired": paired}[sys.argv[1]](load(sys.argv[2:]))
