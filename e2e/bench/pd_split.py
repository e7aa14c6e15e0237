"""The P/D split decision in virtual time: always-local, always-split, a fixed threshold and the SLO-aware
decider on a chat and a code workload, 1 prefill + 3 decode pods, at several loads.

    python -m e2e.bench.pd_split [--requests 240] [--loads 0.5,0.8,1.1] [--seeds 0,1,2]
        [--deciders always-local,always-split,fixed-threshold,slo-aware,threshold-2048]
        [--out e2e/bench/results/2026-12-02-pd-split]

Fleet: llama-3.1-8b on H100, 1 prefill + 3 decode pods, rdma-400g between them; every decider routes the
decode pod with the default profile through the real picker (``SchedulerRouter``) and differs only in
``scheduler.handler``:

- ``always-local``: ``decider: never`` (the prefill pod idles; every prompt is prefilled on its decode pod);
- ``always-split``: ``decider: always`` (every prompt through the prefill pod);
- ``fixed-threshold``: llm-d's rule as its simulator study ran it: a leg iff the decode pod lacks at least
  16 prompt tokens (``decider: threshold``, ``threshold_tokens: 16``, no ratio, no queue check);
- ``slo-aware``: ``decider: slo`` (pickers/plugins/pd_decider.py: predicted TTFT of both ways, queues
  included, and the decode pod's TPOT);
- ``threshold-2048``: kvswitch's earlier default (2048 tokens, ratio 0.5, skip when the prefill queue costs
  more than the leg saves), for reference.

Workloads (e2e/bench/workloads.py):

- ``chat``: multi-turn conversations on one 4096-token system prompt, a 512-token first message, then
  1024-token new messages and 128-token answers, 6 turns (prompts 4.6K to 10.9K tokens): a long shared
  prefix and short new turns. (With 128-token messages, knee 20.2 req/s, seeds 0-2, mean TTFT at 0.5/0.8/1.1x:
  always-local 39/80/181 ms, always-split = fixed threshold 65/95/107 ms, slo-aware 34/43/45 ms.)
- ``code``: independent prompts (no sharing), lognormal around 6000 tokens (max 16384), outputs around 256.

Loads: the knee of each workload is always-local's completed req/s when offered the trace 20x faster than
its base rate; the runs offer ``load x knee``. Every request carries the pool's targets (``scheduler.slo``:
TTFT and TPOT below, used by the slo-aware decider only; no admission), and the summary has mean, p50, p90
and p99 TTFT, TPOT, SLO attainment and the split fraction. Writes ``results.json``, ``README.md`` (tables
and the acceptance verdicts of issue 10) and ``pd_split.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from e2e.bench import workloads as W
from engine.sim.cluster.report import json_safe

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "e2e" / "bench" / "results" / "2026-12-02-pd-split"
PROBE_SPEEDUP = 20.0

DECIDERS: dict[str, dict[str, Any]] = {
    "always-local": {"type": "prefill-decode", "decider": "never"},
    "always-split": {"type": "prefill-decode", "decider": "always"},
    "fixed-threshold": {"type": "prefill-decode", "decider": "threshold", "threshold_tokens": 16,
                        "min_uncached_ratio": 0.0, "skip_when_saturated": False},
    "slo-aware": {"type": "prefill-decode", "decider": "slo"},
    "threshold-2048": {"type": "prefill-decode", "decider": "threshold"},
}


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    ttft_ms: float
    tpot_ms: float

    def make(self, seed: int, n: int) -> W.Workload:
        if self.name == "chat":
            turns = 6
            return W.multi_turn(conversations=max(1, n // turns), turns=turns, system_tokens=4096,
                                first_user_tokens=512, user_tokens=1024, output_tokens=128, rate=0.5,
                                think_time_s=20.0, seed=seed)
        return W.no_sharing(num_requests=n, rate=2.0, input_median=6000, input_sigma=0.5, output_median=256,
                            output_sigma=0.6, max_input=16384, max_output=1024, seed=seed)


WORKLOADS = {"chat": Workload("chat", 1000.0, 40.0), "code": Workload("code", 3000.0, 50.0)}


def _requests(wl: W.Workload) -> list[Any]:
    from engine.sim.cluster.trace import TraceRequest

    return [TraceRequest(i, r.timestamp / 1000.0, r.input_length, r.output_length, list(r.hash_ids))
            for i, r in enumerate(wl.records)]


def _rate(wl: W.Workload) -> float:
    return (len(wl.records) - 1) / wl.duration_s if wl.duration_s > 0 and len(wl.records) > 1 else 1.0


def run_point(workload: str, decider: str, seed: int, rate: float, n: int) -> dict[str, Any]:
    """One replay of ``workload`` (seed) at ``rate`` requests/s on 1P+3D with ``decider``; its summary."""
    from engine.sim.cluster.cli import replay
    from engine.sim.cluster.fleet import fleet_from_flags
    from engine.sim.cluster.report import SloTargets, summarize
    from engine.sim.cluster.trace import BlockTokens

    spec = WORKLOADS[workload]
    wl = spec.make(seed, n)
    wl = W.scale_rate(wl, rate / _rate(wl))
    fleet = fleet_from_flags(accelerator="H100", model_profile="8b", pd="1:3")
    cfg = {"scheduler": {"profile": "default", "handler": DECIDERS[decider],
                         "slo": {"ttft_ms": spec.ttft_ms, "tpot_ms": spec.tpot_ms}}}
    res, wall = replay(_requests(wl), fleet, "default", seed=seed, picker_config=cfg, blocks=BlockTokens())
    s = summarize(res, wall, slo=SloTargets(spec.ttft_ms / 1e3, spec.tpot_ms / 1e3))
    ok = [r for r in res.records if r.status == "ok"]
    ttft = np.array([r.first_token - r.arrival for r in ok])
    keys = ("requests", "completed", "throughput_req_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tpot_mean_s",
            "tpot_p90_s", "slo_attainment", "prefix_hit_rate")
    out: dict[str, Any] = {k: s[k] for k in keys if k in s}
    out.update(workload=workload, decider=decider, seed=seed, rate=rate, wall_s=wall,
               ttft_mean_s=float(ttft.mean()) if ttft.size else math.nan,
               split_frac=sum(1 for r in res.records if r.prefill_pod) / max(1, len(res.records)))
    return out


def knee(workload: str, n: int) -> float:
    """always-local's completed req/s on the seed-0 trace offered ``PROBE_SPEEDUP`` x faster."""
    wl = WORKLOADS[workload].make(0, n)
    return float(run_point(workload, "always-local", 0, _rate(wl) * PROBE_SPEEDUP, n)["throughput_req_s"])




METRICS = [("ttft_mean_s", "TTFT mean ms", 1e3), ("ttft_p50_s", "TTFT p50 ms", 1e3), ("ttft_p90_s", "TTFT p90 ms", 1e3),
           ("ttft_p99_s", "TTFT p99 ms", 1e3), ("tpot_mean_s", "TPOT ms", 1e3), ("tpot_p90_s", "TPOT p90 ms", 1e3),
           ("slo_attainment", "SLO attain", 1.0),
           ("split_frac", "split %", 100.0), ("throughput_req_s", "req/s", 1.0)]


def means(runs: list[dict[str, Any]]) -> dict[tuple[str, float, str], dict[str, float]]:
    """Mean over seeds per (workload, load, decider)."""
    groups: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["workload"], round(r["load"], 3), r["decider"]), []).append(r)
    return {k: {m: float(np.mean([x[m] for x in rs if x.get(m) is not None] or [math.nan])) for m, _, _ in METRICS}
            for k, rs in groups.items()}


def verdicts(doc: dict[str, Any]) -> list[str]:
    """Issue 10's bar per workload and load: slo-aware TTFT p90 <= min(always-local, always-split); on chat,
    slo-aware mean TTFT <= 0.5 x fixed-threshold's."""
    m = means(doc["runs"])
    lines = []
    for (w, load, d), v in sorted(m.items()):
        if d != "slo-aware":
            continue
        loc, spl, fix = (m.get((w, load, x)) for x in ("always-local", "always-split", "fixed-threshold"))
        notes = []
        if loc and spl:
            best = min(loc["ttft_p90_s"], spl["ttft_p90_s"])
            ok = v["ttft_p90_s"] <= best
            notes.append(f"p90 {v['ttft_p90_s'] * 1e3:.0f} ms vs best of local/split {best * 1e3:.0f} ms: "
                         f"{'met' if ok else 'NOT met'}")
        if w == "chat" and fix:
            ratio = v["ttft_mean_s"] / fix["ttft_mean_s"]
            notes.append(f"mean {v['ttft_mean_s'] * 1e3:.0f} ms = {ratio:.2f} x fixed-threshold's "
                         f"{fix['ttft_mean_s'] * 1e3:.0f} ms: {'met' if ratio <= 0.5 else 'NOT met'}")
        lines.append(f"| {w} | {load:g}x | {'; '.join(notes)} |")
    return lines


def render(path: Path) -> Path:
    doc = json.loads(path.read_text())
    meta = doc["meta"]
    m = means(doc["runs"])
    deciders = meta["deciders"]
    lines = [f"# P/D split decision in virtual time ({meta['date']})", "",
             f"Fleet: {meta['fleet']}. Seeds {meta['seeds']}, {meta['requests']} requests per run, means over "
             "seeds. Knee: always-local's completed req/s with the trace offered 20x faster.", "",
             f"Command: `{meta['command']}`; wall {meta.get('wall_s', 0):.0f} s; load average at start "
             f"{meta['load_at_start']:.1f} (virtual time: the machine's load changes only the wall time).", "",
             "![pd split](pd_split.png)", ""]
    for w, k in doc["knees"].items():
        spec = meta["workloads"][w]
        lines += [f"## {w}: knee {k:.2f} req/s; targets TTFT {spec['ttft_ms']:g} ms, TPOT {spec['tpot_ms']:g} ms",
                  "", "| load | decider | " + " | ".join(lbl for _, lbl, _ in METRICS) + " |",
                  "|---|---|" + "---|" * len(METRICS)]
        for (w2, load, d), v in sorted(m.items(), key=lambda kv: (kv[0][0], kv[0][1], deciders.index(kv[0][2]))):
            if w2 == w:
                cells = [f"{v[key] * sc:.0f}" if sc == 1e3 or sc == 100.0 else f"{v[key] * sc:.3f}"
                         for key, _, sc in METRICS]
                lines.append(f"| {load:g}x | {d} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Issue 10's bar", "", "| workload | load | verdict |", "|---|---|---|", *verdicts(doc), ""]
    readme = path.parent / "README.md"
    readme.write_text("\n".join(lines))
    return readme


def plot(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = json.loads(path.read_text())
    m = means(doc["runs"])
    ws = list(doc["knees"])
    panels = [("ttft_mean_s", "TTFT mean (s)"), ("ttft_p90_s", "TTFT p90 (s)"), ("tpot_mean_s", "TPOT mean (s)"),
              ("split_frac", "split fraction")]
    fig, axes = plt.subplots(len(ws), len(panels), figsize=(4.2 * len(panels), 3.4 * len(ws)), squeeze=False)
    for i, w in enumerate(ws):
        for j, (key, label) in enumerate(panels):
            ax = axes[i][j]
            for d in doc["meta"]["deciders"]:
                pts = sorted((load, v[key]) for (w2, load, d2), v in m.items() if w2 == w and d2 == d)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=d,
                            linewidth=2.5 if d == "slo-aware" else 1.2)
            ax.set_title(f"{w}: {label}")
            ax.set_xlabel(f"load / knee ({doc['knees'][w]:.2f} req/s)")
            if key.startswith("ttft"):
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[i][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path.parent / "pd_split.png", dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m e2e.bench.pd_split", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--deciders", default=",".join(DECIDERS))
    p.add_argument("--loads", default="0.5,0.8,1.1", help="multiples of the knee")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--requests", type=int, default=240)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--report", type=Path, default=None, help="only re-render a results.json")
    a = p.parse_args(argv)
    if a.report:
        plot(a.report)
        print(render(a.report).read_text())
        return 0
    workloads = [w for w in a.workloads.split(",") if w]
    deciders = [d for d in a.deciders.split(",") if d]
    for name, known in ((workloads, WORKLOADS), (deciders, DECIDERS)):
        for x in name:
            if x not in known:
                print(f"pd_split: unknown {x!r}; known: {', '.join(known)}", file=sys.stderr)
                return 2
    loads = [float(x) for x in a.loads.split(",") if x]
    seeds = [int(x) for x in a.seeds.split(",") if x]
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "results.json"
    doc: dict[str, Any] = {"meta": {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "fleet": "1 prefill + 3 decode, 8b on H100, rdma-400g",
        "deciders": deciders, "handlers": {d: DECIDERS[d] for d in deciders}, "loads": loads, "seeds": seeds,
        "requests": a.requests, "command": "python -m e2e.bench.pd_split " + " ".join(argv or sys.argv[1:]),
        "load_at_start": os.getloadavg()[0],
        "workloads": {w: {"ttft_ms": WORKLOADS[w].ttft_ms, "tpot_ms": WORKLOADS[w].tpot_ms} for w in workloads}},
        "knees": {}, "runs": []}
    t0 = time.monotonic()
    for w in workloads:
        k = knee(w, a.requests)
        doc["knees"][w] = k
        print(f"{w}: knee {k:.2f} req/s (always-local at {PROBE_SPEEDUP:g}x the base rate)", flush=True)
        plan = [(load, s, d) for load in loads for s in seeds for d in deciders]
        for i, (load, s, d) in enumerate(plan, 1):
            r = run_point(w, d, s, load * k, a.requests)
            r["load"] = load
            doc["runs"].append(json_safe(r))
            path.write_text(json.dumps(doc, indent=1))
            el = time.monotonic() - t0
            print(f"  [{i}/{len(plan)}] {w} {load:g}x seed {s} {d:15s} TTFT mean {r['ttft_mean_s'] * 1e3:7.0f} ms "
                  f"p90 {r['ttft_p90_s'] * 1e3:7.0f} ms TPOT {r['tpot_mean_s'] * 1e3:5.1f} ms split "
                  f"{r['split_frac']:4.0%} attain {r.get('slo_attainment', math.nan):.3f} ({r['wall_s']:.0f} s wall, "
                  f"{el:.0f} s so far, load {os.getloadavg()[0]:.1f})", flush=True)
    doc["meta"]["wall_s"] = time.monotonic() - t0
    path.write_text(json.dumps(doc, indent=1))
    plot(path)
    print(render(path).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
