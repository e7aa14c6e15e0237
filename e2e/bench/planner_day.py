"""The planners on the day-shaped workload: a matrix of ``kvswitch sim replay --autoscale`` runs, a table, a plot.

    python -m e2e.bench.planner_day run --trace day.jsonl --out DIR \\
        --runs "kvswitch@60,120,300" "static-peak@300" "dynamo-throughput:utilization=0.5@300" \\
        [--accelerators H100=2.49] [--jobs 2]
    python -m e2e.bench.planner_day report --out DIR     # table.md and planners.png from DIR/*.json
    python -m e2e.bench.planner_day timeline --trace day.jsonl --png timeline.png v2=OLD.json v3=NEW.json

Each run is one ``kvswitch sim replay TRACE --autoscale SPEC --startup-s S --accelerators ...`` process (8B,
TTFT 2 s / TPOT 60 ms, goal 0.95: the README's study) writing ``DIR/<catalogue>_<spec>_<S>.json``; a run whose
file exists is skipped, so an interrupted matrix resumes. ``--jobs`` processes at once (the replays are
single-threaded). The report reads every JSON in DIR: one row per (catalogue, start-up, planner), GPU-hours
against ``static-peak``'s of the same catalogue, and plots attainment against GPU-hours per start-up time.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Run:
    spec: str  # planner spec, e.g. dynamo-throughput:utilization=0.5
    startup_s: float
    accelerators: str

    @property
    def file(self) -> str:
        cat = re.sub(r"[^A-Za-z0-9.]+", "-", self.accelerators)
        spec = re.sub(r"[^A-Za-z0-9.]+", "-", self.spec)
        return f"{cat}_{spec}_{self.startup_s:g}.json"


def parse_runs(items: list[str], accelerators: str) -> list[Run]:
    """``SPEC@S1,S2`` -> one Run per start-up time; a clear error on a missing or bad start-up list."""
    out: list[Run] = []
    for item in items:
        spec, sep, times = item.rpartition("@")
        if not sep or not spec:
            raise ValueError(f"--runs {item!r}: expected SPEC@STARTUP[,STARTUP...]")
        for t in times.split(","):
            try:
                s = float(t)
            except ValueError:
                raise ValueError(f"--runs {item!r}: start-up {t!r} is not a number") from None
            if s < 0:
                raise ValueError(f"--runs {item!r}: start-up must be >= 0")
            out.append(Run(spec, s, accelerators))
    return out


def command(run: Run, trace: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "engine.sim.cluster.cli", trace, "--autoscale", run.spec,
            "--startup-s", f"{run.startup_s:g}", "--accelerators", run.accelerators, "--model-profile", "8b",
            "--slo-ttft-ms", "2000", "--slo-tpot-ms", "60", "--quiet", "--json", str(out / run.file)]


def run_matrix(runs: list[Run], trace: str, out: Path, jobs: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    todo = [r for r in runs if not (out / r.file).exists()]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} done already, {len(todo)} to go, {jobs} at once",
          file=sys.stderr)
    active: list[tuple[Run, subprocess.Popen[bytes], float]] = []
    done = 0
    while todo or active:
        while todo and len(active) < jobs:
            r = todo.pop(0)
            active.append((r, subprocess.Popen(command(r, trace, out), stdout=subprocess.DEVNULL), time.time()))
        time.sleep(0.5)  # polling finished children; each run takes minutes
        for item in list(active):
            r, proc, started = item
            if proc.poll() is None:
                continue
            active.remove(item)
            done += 1
            status = "ok" if proc.returncode == 0 else f"FAILED rc={proc.returncode}"
            print(f"[{done}] {r.spec} @ {r.startup_s:g} s ({r.accelerators}): {status}, "
                  f"{time.time() - started:.0f} s wall", file=sys.stderr)


def load_rows(out: Path) -> list[dict[str, Any]]:
    rows = []
    for f in sorted(out.glob("*.json")):
        data = json.loads(f.read_text())
        for s in data.get("runs", []):
            rows.append({**s, "catalogue": ",".join(f"{k}={v:g}" for k, v in s["accelerators"].items())})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    peak = {(r["catalogue"], r["startup_s"]): r["gpu_hours"] for r in rows if r["planner"] == "static-peak"}
    any_peak = {r["catalogue"]: r["gpu_hours"] for r in rows if r["planner"] == "static-peak"}
    head = ("| catalogue | start-up s | planner | slo_attainment | goodput req/s | gpu_hours | vs static-peak | cost "
            "| scaling actions/h | lost | peak pods |")
    lines = [head, "|" + "---|" * 11]
    for r in sorted(rows, key=lambda r: (r["catalogue"], r["startup_s"], r["planner"])):
        ref = peak.get((r["catalogue"], r["startup_s"]), any_peak.get(r["catalogue"]))
        vs = f"{r['gpu_hours'] / ref:.2f}" if ref else "-"
        lines.append(f"| {r['catalogue']} | {r['startup_s']:g} | {r['planner']} | {r['slo_attainment']:.3f} "
                     f"| {r['goodput_req_s']:.3f} | {r['gpu_hours']:.2f} | {vs} | ${r['cost']:.2f} "
                     f"| {r['scaling_actions_per_hour']:.1f} | {r['lost_requests']} | {r['peak_pods']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    startups = sorted({r["startup_s"] for r in rows})
    fig, axes = plt.subplots(1, len(startups), figsize=(5 * len(startups), 4.2), squeeze=False, sharey=True)
    for ax, s in zip(axes[0], startups, strict=True):
        for r in (r for r in rows if r["startup_s"] == s):
            name = r["planner"]
            color = {"kvswitch": "tab:green", "static-peak": "tab:blue", "queue-hpa": "tab:red"}.get(
                name.split(":")[0], "tab:orange")
            marker = "s" if "L40S" in r["catalogue"] else "o"
            ax.scatter(r["gpu_hours"], r["slo_attainment"], color=color, marker=marker)
            ax.annotate(name.replace("dynamo-throughput", "dynamo").replace("utilization", "u"),
                        (r["gpu_hours"], r["slo_attainment"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        ax.axhline(0.95, color="grey", lw=0.8, ls="--")
        ax.set_title(f"start-up {s:g} s")
        ax.set_xlabel("GPU-hours (day workload, 1 h)")
    axes[0][0].set_ylabel("SLO attainment (TTFT 2 s, TPOT 60 ms)")
    fig.suptitle("Planners on the day-shaped workload, 8B on H100 (squares: H100 + L40S catalogue)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def paid_pods(decisions: list[dict[str, Any]], start: int, end: float, step: float = 10.0
              ) -> tuple[list[float], list[int]]:
    """Pods paid for over time from a run's decisions (each sets the desired size at its time; a pod is paid
    from its request until its release; drains are short here and counted as released at the decision)."""
    times, paid = [], []
    cur, i = start, 0
    t = 0.0
    while t <= end:
        while i < len(decisions) and decisions[i]["at"] <= t:
            cur = sum(decisions[i]["desired"].values())
            i += 1
        times.append(t)
        paid.append(cur)
        t += step
    return times, paid


def timeline_plot(trace: str, runs: list[tuple[str, Path]], path: Path) -> None:
    """The trace's arrival rate per minute and the pods each run paid for, on one time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arrivals = [json.loads(line)["timestamp"] / 1000.0 for line in Path(trace).read_text().splitlines() if line]
    end = max(arrivals)
    minutes = [0] * (int(end // 60) + 1)
    for a in arrivals:
        minutes[int(a // 60)] += 1
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.bar([m + 0.5 for m in range(len(minutes))], [c / 60 for c in minutes], width=1.0, color="lightgrey",
           label="arrivals req/s (per minute)")
    ax.set_xlabel("minute of the compressed day")
    ax.set_ylabel("req/s")
    ax2 = ax.twinx()
    for label, f in runs:
        r = json.loads(f.read_text())["runs"][0]
        ts, paid = paid_pods(r["decisions"], r.get("initial_pods", r["peak_pods"]), end)
        ax2.step([t / 60 for t in ts], paid, where="post",
                 label=f"{label}: {r['gpu_hours']:.2f} GPU-h, attainment {r['slo_attainment']:.3f}")
    ax2.set_ylabel("pods paid for")
    ax2.set_ylim(0, 5)
    ax2.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m e2e.bench.planner_day", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--trace", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--runs", nargs="+", required=True, metavar="SPEC@S1,S2")
    r.add_argument("--accelerators", default="H100=2.49")
    r.add_argument("--jobs", type=int, default=2)
    rep = sub.add_parser("report")
    rep.add_argument("--out", required=True)
    tl = sub.add_parser("timeline")
    tl.add_argument("--trace", required=True)
    tl.add_argument("--png", required=True)
    tl.add_argument("runs", nargs="+", metavar="LABEL=RESULT.json")
    args = p.parse_args(argv)
    if args.cmd == "timeline":
        pairs = [(item.partition("=")[0], Path(item.partition("=")[2])) for item in args.runs]
        timeline_plot(args.trace, pairs, Path(args.png))
        return 0
    out = Path(args.out)
    if args.cmd == "run":
        try:
            runs = parse_runs(args.runs, args.accelerators)
        except ValueError as exc:
            print(f"planner_day: {exc}", file=sys.stderr)
            return 2
        run_matrix(runs, args.trace, out, max(1, args.jobs))
        return 0
    rows = load_rows(out)
    if not rows:
        print(f"planner_day: no results in {out}", file=sys.stderr)
        return 1
    (out / "table.md").write_text(table(rows), encoding="utf-8")
    plot(rows, out / "planners.png")
    print(table(rows))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
