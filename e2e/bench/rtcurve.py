"""The real-time load curves: every workload x router x load x repetition through Envoy and the real peers,
sized to a wall-clock budget.

    kvswitch bench curves [--budget-min 120] [--workloads shared-prefix,multi-turn,no-sharing,mooncake]
        [--routers kvswitch,vllm-router:cache_aware,vllm-router:kv_aware,sglang-router:cache_aware,envoy-rr]
        [--loads 0.5,1,2,3] [--repetitions 3] [--requests N] [--plan] [--smoke] [--out DIR]
    make bench-curves                                          (the same, defaults)

The workloads are the virtual-time curves' (``e2e.bench.vcurve.WORKLOADS``: same generators, parameters,
seeds and Mooncake windows), on the same fleet model (4 simulated L40S pods, 8B profile); the knee of each
is the virtual-time one (round robin offered the seed-0 trace 20x faster, ``vcurve.knee``), so the loads
here are the same multiples of the same knee as the virtual-time report's.

Sizing (``plan``): a run's wall time is its simulated makespan x the time scale plus a fixed cost (fleet
restart, router start, client start; ``--overhead-s``). Per workload:

- time scale, per load = the smallest that keeps the wall request rate at that load under
  ``--max-wall-rate`` and the wall rate of streamed output tokens (the load's, at most about 1.4 x the
  knee's, what the best router completes past it) under ``--max-wall-tokens``: on two cores the client,
  Envoy, the routers and the simulated pods share the CPU, and a router's path must stay small against the
  TTFTs it is judged on; never below 0.5. A light load runs faster than the heaviest, so every load point
  costs about the same wall time per request;
- requests per run = as many as the budget allows when every workload gets the same share of it,
  from the virtual-time replay of the same traces (round robin's makespan per load, which the routers
  under test beat or match), at least ``--min-requests``; ``--requests`` fixes it instead.

``--plan`` prints the plan (knees, time scales, requests, estimated wall) and stops; ``--smoke`` runs one
point of it (the first workload at the knee, one repetition, every router) to prove the chain end to end.
Progress: one line per run with the whole set's ETA. Output: one folder per workload (``kvswitch bench
compare``'s report: table, plots against the offered load, TTFT CDFs) and a summary README.md with, per
workload, load and router, the medians over repetitions and where kvswitch misses the issue's bar against
the best peer, plus 4-panel plots against load / knee (req/s, TTFT p90, TTFT p99, hit rate), and every
router beside its virtual-time twin (``twins``). ``--plan-from DIR`` re-runs routers on an earlier set's plan
and judges kvswitch against that set's other routers. ``--report DIR --variants V.json`` replays picker variants
on a set's points in virtual time and judges them against its real peers (``variant_twins``): minutes, where a
real re-run of kvswitch alone takes an hour.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from e2e.bench import vcurve
from e2e.bench.bar import Figures, misses
from e2e.bench.procs import interrupt_on_sigterm
from e2e.bench.runner import RESULTS_DIR, CompareConfig, Comparison

ROUTERS = ["kvswitch", "vllm-router:cache_aware", "vllm-router:kv_aware", "sglang-router:cache_aware", "envoy-rr"]
LOADS = [0.5, 1.0, 2.0, 3.0]
# The knee is round robin's capacity on a 1,000-request trace: on 240 requests the probe mostly reads the drain
# (the last long decodes), which put the knees 1.2-1.85x low (e2e/bench/results/2026-12-02-vcurve1000/).
KNEE_REQUESTS = 1000
PROBE_REQUESTS = 160  # the makespan probe's trace when --requests is not given
PEAK_COMPLETION = 1.4  # completed req/s past the knee, as a multiple of the knee (the best router's, virtual time)
# Each router's virtual-time twin: its emulation in engine/sim/cluster/peers.py (kvswitch: the same default
# profile through pickers), replayed on the same trace, rate and requests (``twins``).
TWINS = {"kvswitch": "default", "vllm-router:cache_aware": "vllm:cache_aware", "vllm-router:kv_aware": "vllm:kv_aware",
         "sglang-router:cache_aware": "sglang:cache_aware", "envoy-rr": "envoy:round_robin"}


@dataclass(frozen=True, slots=True)
class Budget:
    minutes: float = 120.0
    overhead_s: float = 10.0  # per run: fleet restart, router start and readiness probe, client start
    max_wall_rate: float = 16.0  # offered requests per wall second at the highest load
    max_wall_tokens: float = 1200.0  # streamed output tokens per wall second
    min_time_scale: float = 0.5
    min_requests: int = 48
    max_requests: int = 240


DEFAULT_BUDGET = Budget()


@dataclass(slots=True)
class WorkloadPlan:
    workload: str
    knee_req_s: float
    mean_output_tokens: float
    time_scales: list[float]  # per rate: wall s per simulated s
    requests: int
    rates: list[float]  # simulated req/s: loads x knee
    est_wall_s: float  # every router, load and repetition of this workload

    def describe(self) -> str:
        return (f"{self.workload}: knee {self.knee_req_s:.2f} req/s, time scales "
                f"{', '.join(f'{t:g}' for t in self.time_scales)}, "
                f"{self.requests} requests per run, rates {', '.join(f'{r:g}' for r in self.rates)}, "
                f"est. {self.est_wall_s / 60:.0f} min")


def time_scale_for(knee: float, mean_output: float, load: float, budget: Budget) -> float:
    """The smallest time scale (wall s per simulated s) that keeps a run at ``load`` x the knee within the
    wall request and token rates (past the knee the fleet completes at most ``PEAK_COMPLETION`` x it)."""
    ts = max(budget.min_time_scale, load * knee / budget.max_wall_rate,
             min(load, PEAK_COMPLETION) * knee * mean_output / budget.max_wall_tokens)
    return math.ceil(ts * 100) / 100


def sim_makespans(workload: str, rates: list[float], requests: int) -> list[float]:
    """Round robin's simulated makespan (s) of the seed-0 trace at each rate (req/s), in virtual time."""
    return [float(vcurve.run_point(workload, "envoy:round_robin", 0, rate, requests)["makespan_s"])
            for rate in rates]


def plan(workloads: list[str], routers: list[str], loads: list[float], repetitions: int, budget: Budget,
         requests: int | None = None, log: Any = print, share_s: float | None = None) -> list[WorkloadPlan]:
    """Knee, time scale and requests per run for each workload, so the whole set fits ``budget`` (each
    workload ``share_s`` of it: by default the same share)."""
    runs_per_load = len(routers) * repetitions
    if share_s is None:
        share_s = budget.minutes * 60.0 / len(workloads)
    plans = []
    for w in workloads:
        knee = vcurve.knee(w, KNEE_REQUESTS)
        wl = vcurve.WORKLOADS[w].make(0, KNEE_REQUESTS)
        mean_out = float(np.mean([r.output_length for r in wl.records]))
        scales = [time_scale_for(knee, mean_out, ld, budget) for ld in loads]
        probe_n = requests or PROBE_REQUESTS  # the drain is a smaller share of a longer run: probe at its size
        makespans = sim_makespans(w, [ld * knee for ld in loads], probe_n)
        wall_per_request = sum(ts * m for ts, m in zip(scales, makespans)) / probe_n  # wall s, all loads
        fixed = len(loads) * runs_per_load * budget.overhead_s
        n = requests or int((share_s - fixed) / (runs_per_load * wall_per_request))
        n = max(budget.min_requests, min(budget.max_requests, n // 8 * 8))
        est = fixed + runs_per_load * wall_per_request * n
        plans.append(WorkloadPlan(w, knee, mean_out, scales, n, [round(x * knee, 3) for x in loads], est))
        log(f"  plan {plans[-1].describe()}")
    return plans


def estimate_wall_s(p: WorkloadPlan, runs_per_rate: int, overhead_s: float) -> float:
    """Wall seconds for every run of ``p``: at each rate, round robin's simulated makespan of the seed-0 trace
    at ``p.requests`` (virtual time, seconds) x that rate's time scale, plus ``overhead_s`` per run. A plan
    re-timed or lengthened (``--time-scale``, ``--requests``) is estimated again this way rather than scaled:
    a run's wall grows with its time scale, and its drain (the last long decodes) does not grow with its
    requests, so neither factor is linear in the stored estimate."""
    spans = sim_makespans(p.workload, p.rates, p.requests)
    return runs_per_rate * sum(ts * span + overhead_s for ts, span in zip(p.time_scales, spans, strict=True))


def _config(p: WorkloadPlan, routers: list[str], repetitions: int, out: Path) -> CompareConfig:
    f = vcurve.CurveFleet()
    return CompareConfig(workload=p.workload, routers=routers, rates=p.rates, pods=f.pods,
                         time_scale=max(p.time_scales), time_scales=p.time_scales, repetitions=repetitions,
                         seed=0, model_profile=f.model_profile,
                         accelerator=f.accelerator, out=out, curve_requests=p.requests)


def plans_of(base: Path, workloads: list[str]) -> tuple[list[WorkloadPlan], list[float]]:
    """The plans (and loads) of the earlier set in ``base`` for ``workloads``, to re-run routers on exactly its
    knees, rates, time scales, requests and traces. A set from before per-load time scales kept one for every
    rate (``plan_scales``)."""
    meta = json.loads((base / "curves.json").read_text())["meta"]
    plans = [WorkloadPlan(**{k: v for k, v in x.items() if k not in ("time_scale", "time_scales")},
                          time_scales=plan_scales(x))
             for x in meta["plans"] if x["workload"] in workloads]
    missing = sorted(set(workloads) - {x.workload for x in plans})
    if missing:
        raise ValueError(f"no plan for {', '.join(missing)}")
    return plans, [float(x) for x in meta["loads"]]


def subset(p: WorkloadPlan, plan_loads: list[float], loads: list[float]) -> WorkloadPlan:
    """``p`` at some of its loads (``plan_loads``: the loads its rates and time scales are for)."""
    missing = [x for x in loads if x not in plan_loads]
    if missing:
        raise ValueError(f"loads {', '.join(f'{x:g}' for x in missing)} not in the plan "
                         f"({', '.join(f'{x:g}' for x in plan_loads)})")
    idx = [plan_loads.index(x) for x in loads]
    # a run's wall is its requests at the wall rate (rate / time scale): the estimate keeps the loads' share
    wall = [t / r for r, t in zip(p.rates, p.time_scales, strict=True)]
    share = sum(wall[i] for i in idx) / sum(wall) if sum(wall) > 0 else 1.0
    return replace(p, rates=[p.rates[i] for i in idx], time_scales=[p.time_scales[i] for i in idx],
                   est_wall_s=p.est_wall_s * share)


def run(plans: list[WorkloadPlan], routers: list[str], repetitions: int, out: Path, loads: list[float],
        log: Any = print, base: Path | None = None, with_twins: bool = True) -> Path:
    """Run every plan; ``base``: the earlier set whose plans these are (the summary judges kvswitch against
    its other routers too)."""
    out.mkdir(parents=True, exist_ok=True)
    total = sum(len(p.rates) for p in plans) * len(routers) * repetitions
    done = 0
    started = time.monotonic()
    summary = _summary(plans, routers, repetitions, loads, base)
    for p in plans:
        comparison = Comparison(_config(p, routers, repetitions, out / p.workload))
        comparison.knee = p.knee_req_s
        offset = done

        def progress(line: str, _p: WorkloadPlan = p, _offset: int = offset) -> None:
            i = _offset + int(line[1:line.index("/")]) if line.startswith("[") else _offset
            el = time.monotonic() - started
            log(f"[{i}/{total}] {_p.workload} {line.split('] ', 1)[-1]} (set ETA "
                f"{el / max(i, 1) * (total - i) / 60:.0f} min)")

        comparison.log = progress
        results = comparison.run()
        done += len(comparison.plan())
        from e2e.bench.report import render

        render(results)
        summary["workloads"][p.workload] = str(results.relative_to(out))
        (out / "curves.json").write_text(json.dumps(summary, indent=1))
    return _finish(out, summary, started, log, with_twins)


def _summary(plans: list[WorkloadPlan], routers: list[str], repetitions: int, loads: list[float],
             base: Path | None, **more: Any) -> dict[str, Any]:
    """curves.json before its workloads' results: the set's command, routers, loads and plans."""
    return {"meta": {
        "date": _dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
        "routers": routers, "loads": loads, "repetitions": repetitions, **more,
        "plans": [asdict(p) for p in plans], "base": str(base) if base is not None else None}, "workloads": {}}


def _finish(out: Path, summary: dict[str, Any], started: float, log: Any, with_twins: bool) -> Path:
    """The set's wall time into curves.json, the twins (unless left out) and the summary README."""
    summary["meta"]["wall_s"] = time.monotonic() - started
    (out / "curves.json").write_text(json.dumps(summary, indent=1))
    if with_twins:
        twins(out, log)
    return render_summary(out)


def run_parallel(plans: list[WorkloadPlan], routers: list[str], repetitions: int, out: Path, loads: list[float],
                 jobs: int, log: Any = print, base: Path | None = None, deadline_s: float | None = None,
                 with_twins: bool = True) -> Path:
    """``run`` with ``jobs`` points at once, for a machine with cores to spare: each (workload, router, load) is a
    comparison of its own (its own simulated fleet, router and client, on free ports), the longest first;
    their runs are merged into one comparison per workload, the results.json and report ``run`` writes.

    On two cores the points would share the CPU that their routers' paths are judged on: keep ``jobs`` at
    about a third of the cores (a run's client, router, Envoy and simulated pods). No run starts after
    ``deadline_s`` wall seconds (the runs done are kept; the summary counts the runs per point)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from e2e.bench.tokenizer import ensure_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    ensure_tokenizer(None)  # made once, before the points that share it start
    started = time.monotonic()
    stop = threading.Event()
    units = [(p, router, i) for p in plans for router in routers for i in range(len(p.rates))]
    # longest first: a run's wall is its trace's span at that time scale (requests / rate) plus the fixed cost
    units.sort(key=lambda u: -(u[0].time_scales[u[2]] * u[0].requests / u[0].rates[u[2]]))
    total = len(units) * repetitions
    done = [0]
    lock = threading.Lock()

    def one(p: WorkloadPlan, router: str, i: int) -> Comparison:
        point = f"{router.replace(':', '-')}-{loads[i]:g}x"
        cfg = _config(p, [router], repetitions, out / p.workload / "points" / point)
        cfg.rates, cfg.time_scales = [p.rates[i]], [p.time_scales[i]]
        comparison = Comparison(cfg)
        comparison.knee = p.knee_req_s
        comparison.should_stop = lambda: stop.is_set() or (
            deadline_s is not None and time.monotonic() - started > deadline_s)

        def progress(line: str) -> None:
            if not line.startswith("["):
                log(f"{p.workload} {router} {loads[i]:g}x: {line}")
                return
            with lock:
                done[0] += 1
                el = time.monotonic() - started
                n = done[0]
            log(f"[{n}/{total}] {p.workload} {line.split('] ', 1)[-1]} "
                f"(set ETA {el / n * (total - n) / 60:.0f} min)")

        comparison.log = progress
        comparison.run()
        return comparison

    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [(u, pool.submit(one, *u)) for u in units]
            parts = [(u, f.result()) for u, f in futures]
    except KeyboardInterrupt:
        stop.set()  # the runs under way finish; none starts after them
        raise
    summary = _summary(plans, routers, repetitions, loads, base, jobs=jobs)
    from e2e.bench.report import render

    for p in plans:
        whole = Comparison(_config(p, routers, repetitions, out / p.workload))
        whole.knee = p.knee_req_s
        mine = [c for (q, _, _), c in parts if q is p]
        whole.meta = {**whole.describe(), "jobs": jobs, "wall_s": time.monotonic() - started}
        order = {(rep, rate, r): k for k, (rep, rate, r) in enumerate(whole.plan())}
        whole.results = sorted((r for c in mine for r in c.results),
                               key=lambda r: order.get((r.repetition, r.rate, r.router), len(order)))
        whole.failures = [f for c in mine for f in c.failures]
        results = whole.save()
        render(results)
        summary["workloads"][p.workload] = str(results.relative_to(out))
    return _finish(out, summary, started, log, with_twins)


# ---- virtual-time twins ------------------------------------------------------------------------------
def twins(out: Path, log: Any = print) -> Path:
    """Replay every run of the set in ``out`` in virtual time through its router's twin (``TWINS``): the same trace
    (seed = repetition), rate and requests, the prompts' blocks as aiperf sends them, first tokens reported at
    each request's end as Envoy's access log does; the medians over repetitions go into curves.json (``twins``),
    and the summary sets them beside the real ones. A router that matches its twin is one the virtual-time
    curves stand for; one that does not is where the emulation, the simulated pods' time scale or the real
    router's path differ (session 8: kvswitch fell behind its twin as the time scale grew, which is how
    ``predictor.time_scale`` was found). Seconds per run; progress per workload."""
    path = out / "curves.json"
    summary = json.loads(path.read_text())
    meta = summary["meta"]
    knees = {p["workload"]: p["knee_req_s"] for p in meta["plans"]}
    rows = []
    for p in meta["plans"]:
        w = p["workload"]
        if w not in summary["workloads"]:
            continue
        started = time.monotonic()
        for rate in p["rates"]:
            for router in meta["routers"]:
                twin = TWINS.get(router)
                if twin is None:
                    continue
                got = _twin_runs(w, twin, rate, p["requests"], meta["repetitions"])
                rows.append({"workload": w, "load": round(rate / knees[w], 2), "router": router, "twin": twin,
                             **_twin_medians(got),
                             "late": 1e3 * float(np.median([g["ttft_p90_late_s"] for g in got])),
                             "hit": float(np.median([g["prefix_hit_rate"] for g in got]))})
        log(f"twins: {w} in {time.monotonic() - started:.0f} s")
    summary["twins"] = rows
    path.write_text(json.dumps(summary, indent=1))
    return path


def _twin_runs(w: str, router: str, rate: float, requests: int, repetitions: int,
               variants: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One virtual-time replay per repetition of a set's point, as the real runs were sent: repetition k's trace
    (seed k), the prompts' blocks as aiperf sends them, first tokens heard at each request's end (the access log)."""
    return [vcurve.run_point(w, router, rep, rate, requests, variants=variants, as_aiperf_sends=True,
                             access_log=True) for rep in range(repetitions)]


def _twin_medians(got: list[dict[str, Any]]) -> dict[str, float]:
    """Medians over repetitions of req/s and TTFT p90 / p99 (ms), keyed as ``medians``' real ones."""
    return {"req_s": float(np.median([g["throughput_req_s"] for g in got])),
            "p90": 1e3 * float(np.median([g["ttft_p90_s"] for g in got])),
            "p99": 1e3 * float(np.median([g["ttft_p99_s"] for g in got]))}


def variant_twins(out: Path, variants: dict[str, dict[str, Any]], log: Any = print) -> list[str]:
    """What a change to the picker would have done at a real-time set's points, before it is run there: each
    variant (``vcurve`` variants: router name -> picker config with its ``profile``) replayed in virtual time on
    every point of the set in ``out`` as the set's twins are (``_twin_runs``), and judged by the issue's bar
    against the set's real peers (every router but kvswitch), and against their twins where the set has them.
    Returns the report's lines (markdown); nothing is written into the set. Where the set's kvswitch and its
    twin agree, a variant's twin is a fair guess at its real run; the real run is still what counts."""
    summary = json.loads((out / "curves.json").read_text())
    meta = summary["meta"]
    med = medians(out, summary)
    lines = [f"Variants' virtual-time twins at {out.name}'s points ({meta['repetitions']} repetitions, medians; "
             "the bar against the set's real peers, and against those peers' twins):", "",
             "| workload | load | router | req/s | TTFT p90 ms | TTFT p99 ms | vs real peers | vs peers' twins |",
             "|---|---|---|---|---|---|---|---|"]
    for p in meta["plans"]:
        w = p["workload"]
        for rate in p["rates"]:
            ld = round(rate / p["knee_req_s"], 2)
            real = {r: m for (w2, l2, r), m in med.items() if (w2, l2) == (w, ld)}
            if not real:
                continue
            twins_here = {t["router"]: t for t in summary.get("twins", []) if (t["workload"], t["load"]) == (w, ld)}
            twin_peers = {r: t for r, t in twins_here.items() if r != "kvswitch"}
            started = time.monotonic()
            rows = [(f"kvswitch ({kind})", m) for kind, m in (("real", real.get("kvswitch")),
                                                             ("its twin", twins_here.get("kvswitch"))) if m]
            for name in variants:
                rows.append((name, _twin_medians(_twin_runs(w, name, rate, p["requests"], meta["repetitions"],
                                                            variants))))
            for name, m in rows:
                cells = [point_verdict({**real, "kvswitch": m}, w, ld),
                         point_verdict({**twin_peers, "kvswitch": m}, w, ld) if twin_peers else "-"]
                lines.append(f"| {w} | {ld:g}x | {name} | {m['req_s']:.3f} | {m['p90']:.0f} | {m['p99']:.0f} | "
                             f"{cells[0]} | {cells[1]} |")
            log(f"variant twins: {w} {ld:g}x in {time.monotonic() - started:.0f} s")
    return [*lines, ""]


def point_verdict(by_router: dict[str, dict[str, float]], w: str, ld: float) -> str:
    """``verdict`` of kvswitch against the other routers of ``by_router`` (one point's medians by router)."""
    return verdict({(w, ld, r): m for r, m in by_router.items()}, w, ld)


def _twin_lines(summary: dict[str, Any], med: dict[tuple[str, float, str], dict[str, float]], w: str) -> list[str]:
    rows = [t for t in summary.get("twins", []) if t["workload"] == w]
    if not rows:
        return []
    lines = ["Each router against its virtual-time twin (same traces, rates and requests; medians, real / twin):",
             "", "| load | router | req/s | TTFT p90 ms | TTFT p99 ms | TTFT p90 late ms | hit % |",
             "|---|---|---|---|---|---|---|"]
    for t in rows:
        m = med.get((w, t["load"], t["router"]))
        if m:
            lines.append(f"| {t['load']:g}x | {t['router']} | {m['req_s']:.2f} / {t['req_s']:.2f} | "
                         f"{m['p90']:.0f} / {t['p90']:.0f} | {m['p99']:.0f} / {t['p99']:.0f} | "
                         f"{_ms(m.get('late'))} / {_ms(t.get('late'))} | {100 * m['hit']:.0f} / {100 * t['hit']:.0f} |")
    return [*lines, ""]


def _kv_index_lines(out: Path, summary: dict[str, Any], w: str) -> list[str]:
    """Each run's lookups of a peer's own KV index (vllm-router kv_aware): hits / all. An index that never
    hits where prompts share prefixes has not taken the pods' KV events, and the run is not the peer's."""
    from e2e.bench.report import load

    knee = {p["workload"]: p["knee_req_s"] for p in summary["meta"]["plans"]}[w]
    _, runs, _ = load(out / summary["workloads"][w])
    cells: dict[tuple[str, float], list[str]] = {}
    for r in sorted(runs, key=lambda r: (r.router, r.rate, r.repetition)):
        if r.router_kv_lookups:
            hits, total = r.router_kv_lookups.get("hit", 0.0), sum(r.router_kv_lookups.values())
            cells.setdefault((r.router, round(r.rate / knee, 2)), []).append(f"{hits:.0f} / {total:.0f}")
    if not cells:
        return []
    return ["Peers' own KV index, hits / lookups per run (from the router's metrics):", "",
            *[f"- {router} at {ld:g}x: {', '.join(c)}" for (router, ld), c in cells.items()], ""]


# ---- summary -------------------------------------------------------------------------------------------
def medians(out: Path, summary: dict[str, Any]) -> dict[tuple[str, float, str], dict[str, float]]:
    """(workload, load, router) -> medians over repetitions of req/s, TTFT p90/p99 (ms), hit rate."""
    from e2e.bench.client import percentile
    from e2e.bench.report import load

    med: dict[tuple[str, float, str], dict[str, float]] = {}
    knees = {p["workload"]: p["knee_req_s"] for p in summary["meta"]["plans"]}
    for w, rel in summary["workloads"].items():
        _, runs, _ = load(out / rel)
        groups: dict[tuple[float, str], list[Any]] = {}
        for r in runs:
            groups.setdefault((round(r.rate / knees[w], 2), r.router), []).append(r)
        for (ld, router), rs in groups.items():
            med[(w, ld, router)] = {
                "req_s": float(np.median([r.request_throughput for r in rs])),
                "p90": float(np.median([percentile(r.ttft_ms, 90) for r in rs])),
                "p99": float(np.median([percentile(r.ttft_ms, 99) for r in rs])),
                "late": _nanmedian([r.late_ttft_p90 for r in rs]),
                "hit": float(np.median([r.hit_rate if r.hit_rate is not None else math.nan for r in rs])),
                "path": float(np.median([r.path_ms for r in rs])),
                "n": float(len(rs))}
    return med


def _ms(v: float | None) -> str:
    """Milliseconds for a table cell; "-" for a figure a set does not have (None, or NaN: runs recorded without
    send times have no late p90)."""
    return "-" if v is None or math.isnan(v) else f"{v:.0f}"


def _nanmedian(values: list[float]) -> float:
    """The median of the values that are numbers (NaN if none is)."""
    got = [v for v in values if not math.isnan(v)]
    return float(np.median(got)) if got else math.nan


def verdict(med: dict[tuple[str, float, str], dict[str, float]], w: str, ld: float, kv: str = "kvswitch") -> str:
    """The issue's bar at one point (``e2e.bench.bar``), every other router of the set a peer: "met", what is
    missed, or "(incomplete)" where ``kv`` or every peer is missing."""
    def figures(m: dict[str, float]) -> Figures:
        return Figures(req_s=m["req_s"], p90_ms=m["p90"], p99_ms=m["p99"])

    mine = med.get((w, ld, kv))
    peers = [figures(m) for (w2, l2, r), m in med.items() if w2 == w and l2 == ld and r != kv]
    if mine is None or not peers:
        return "(incomplete)"
    return "; ".join(misses(figures(mine), peers)) or "met"


def _beside(base: dict[tuple[str, float, str], dict[str, float]], mine: dict[tuple[str, float, str], dict[str, float]],
            w: str, ld: float, kv: str = "kvswitch") -> dict[tuple[str, float, str], dict[str, float]]:
    """``base``'s routers at (w, ld) other than ``kv``, with ``mine``'s ``kv`` in its place."""
    got = {k: v for k, v in base.items() if k[0] == w and k[1] == ld and k[2] != kv}
    if (w, ld, kv) in mine:
        got[(w, ld, kv)] = mine[(w, ld, kv)]
    return got


def plan_scales(p: dict[str, Any]) -> list[float]:
    """A stored plan's time scale per rate (sets before per-load scales kept one for every rate)."""
    return p.get("time_scales") or [p["time_scale"]] * len(p["rates"])


def runs_differ(base: dict[str, Any], mine: dict[str, Any]) -> str | None:
    """Why the runs of plan ``mine`` cannot stand beside those of ``base`` (the earlier set's plan of the same
    workload), or None: other requests per run are other traces (the first n of each seed's), and another time
    scale at a rate is another load on the machine's CPUs."""
    if base["requests"] != mine["requests"]:
        return f"{base['requests']} requests per run there, {mine['requests']} here"
    there = dict(zip(base["rates"], plan_scales(base), strict=True))
    for rate, ts in zip(mine["rates"], plan_scales(mine), strict=True):
        if there.get(rate) != ts:
            return f"time scale {there.get(rate)} there at {rate:g} req/s, {ts:g} here"
    return None


def render_summary(out: Path, plots: bool = True) -> Path:
    summary = json.loads((out / "curves.json").read_text())
    meta = summary["meta"]
    med = medians(out, summary)
    base_med: dict[tuple[str, float, str], dict[str, float]] = {}
    base_plans: dict[str, dict[str, Any]] = {}
    if meta.get("base"):
        base = Path(meta["base"])
        base_doc = json.loads((base / "curves.json").read_text())
        base_med = medians(base, base_doc)
        base_plans = {x["workload"]: x for x in base_doc["meta"]["plans"]}
    routers = meta["routers"]
    lines = [f"# Load curves in real time ({meta['date']})", "",
             "Through Envoy (kvswitch, Envoy round robin) and the real peers (vllm-router, sglang-router), real "
             "client (aiperf), simulated pods (4 x 8B on L40S, `python -m engine.sim`) replaying in real time "
             "x the time scale; every latency and rate below is in simulated time. Workloads, seeds and knees "
             "are the virtual-time curves' (`kvswitch bench curve`).", "",
             f"Command: `{meta['command']}`; wall {meta.get('wall_s', 0) / 60:.0f} min.", "",
             "| workload | knee req/s | time scale per load | requests per run | est. wall min |",
             "|---|---|---|---|---|"]
    for p in meta["plans"]:
        scales = p.get("time_scales") or [p["time_scale"]]  # sets before per-load scales kept one
        lines.append(f"| {p['workload']} | {p['knee_req_s']:.2f} | {' / '.join(f'{t:g}' for t in scales)} | "
                     f"{p['requests']} | "
                     f"{p['est_wall_s'] / 60:.0f} |")
    lines.append("")
    for p in meta["plans"]:
        w = p["workload"]
        if w not in summary["workloads"]:
            continue
        lines += [f"## {w} (knee {p['knee_req_s']:.2f} req/s; full report: [{w}/README.md]({w}/README.md))", ""]
        if plots:
            lines += [f"![{w}]({w}-curve.png)", ""]
        lines += ["| load | router | req/s | TTFT p90 ms | TTFT p99 ms | TTFT p90 late ms | hit % | path ms | runs |",
                  "|---|---|---|---|---|---|---|---|---|"]
        loads = sorted({ld for (w2, ld, _) in med if w2 == w})
        for ld in loads:
            for r in routers:
                m = med.get((w, ld, r))
                if m:
                    lines.append(f"| {ld:g}x | {r} | {m['req_s']:.3f} | {m['p90']:.0f} | {m['p99']:.0f} | "
                                 f"{_ms(m['late'])} | "
                                 f"{100 * m['hit']:.0f} | {m['path']:.1f} | {m['n']:.0f} |")
        lines += ["", "TTFT p90 late: the p90 of the requests sent in the second half of each run (the cold start "
                  "left out; not part of the bar), median over repetitions.", ""]
        if set(routers) - {"kvswitch"}:
            lines += ["| load | kvswitch against the best peer |", "|---|---|"]
            lines += [f"| {ld:g}x | {verdict(med, w, ld)} |" for ld in loads]
            lines.append("")
        if base_med and w in base_plans:
            if why := runs_differ(base_plans[w], p):
                lines += [f"Not judged against {meta['base']}'s other routers: {why}.", ""]
            else:
                lines += [f"| load | this set's kvswitch against {meta['base']}'s other routers |", "|---|---|"]
                lines += [f"| {ld:g}x | {verdict(_beside(base_med, med, w, ld), w, ld)} |" for ld in loads]
                lines.append("")
        lines += _twin_lines(summary, med, w)
        lines += _kv_index_lines(out, summary, w)
        if plots:
            plot_curve(out, w, p["knee_req_s"], routers, med)
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path


def plot_curve(out: Path, w: str, knee: float, routers: list[str], med: dict, note: str = "") -> None:
    """``<w>-curve.png`` in ``out``: req/s, TTFT p90 and p99, and hit rate against load / knee, a line per router
    (medians ``med`` keyed (workload, load, router)); ``note`` is added to the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("req_s", "completed req/s", False), ("p90", "TTFT p90 (ms)", True), ("p99", "TTFT p99 (ms)", True),
              ("hit", "prefix hit rate", False)]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, (key, label, log) in zip(axes, panels):
        vcurve.curve_panel(ax, med, w, routers, key, label, knee, log, highlight="kvswitch")
    if axes[0].get_legend_handles_labels()[0]:  # a set stopped before its first run has no curve to name
        axes[0].legend(fontsize=8)
    fig.suptitle(f"{w}: real time through Envoy and the real peers, medians over repetitions{note}")
    fig.tight_layout()
    fig.savefig(out / f"{w}-curve.png", dpi=90)
    plt.close(fig)


def _list(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvswitch bench curves", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="shared-prefix,multi-turn,no-sharing,mooncake")
    p.add_argument("--routers", default=",".join(ROUTERS))
    p.add_argument("--loads", default=None,
                   help=f"multiples of the knee (default {','.join(f'{x:g}' for x in LOADS)}; with --plan-from: "
                        "some of that set's loads, default all)")
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--requests", type=int, default=None,
                   help="requests per run (default: sized to the budget; with --plan-from, the plan's)")
    p.add_argument("--budget-min", type=float, default=DEFAULT_BUDGET.minutes, help="wall minutes for the whole set")
    p.add_argument("--overhead-s", type=float, default=DEFAULT_BUDGET.overhead_s, help="fixed wall seconds per run")
    p.add_argument("--max-wall-rate", type=float, default=DEFAULT_BUDGET.max_wall_rate)
    p.add_argument("--max-wall-tokens", type=float, default=DEFAULT_BUDGET.max_wall_tokens)
    p.add_argument("--jobs", type=int, default=1,
                   help="points run at once, each with its own fleet, router and client (cores to spare: about "
                        "one job per 3 cores, 5 on 16 ran at load 5.9; on two cores keep 1)")
    p.add_argument("--deadline-min", type=float, default=None,
                   help="no run starts after this many wall minutes (the runs done are reported)")
    p.add_argument("--time-scale", type=float, default=None,
                   help="with --plan-from: every load at this time scale instead of the plan's (a machine whose "
                        "router, client and pods do not share cores can replay faster)")
    p.add_argument("--no-twins", action="store_true",
                   help="leave out the virtual-time twins (--report DIR --twins adds them later)")
    p.add_argument("--plan", action="store_true", help="print the plan and stop")
    p.add_argument("--smoke", action="store_true",
                   help="one point: the first workload at the first load >= 1 (else the last), one repetition")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--report", type=Path, default=None, help="only re-render the summary of a curves folder")
    p.add_argument("--twins", action="store_true",
                   help="with --report: (re)compute every run's virtual-time twin first (a set runs them itself)")
    p.add_argument("--variants", type=Path, default=None,
                   help="with --report: JSON {name: picker config with its 'profile'}; print each variant's "
                        "virtual-time twins at the set's points, judged against its real peers (nothing written)")
    p.add_argument("--send-times", action="store_true",
                   help="with --report: give every run recorded without its requests' send times those of its "
                        "aiperf export under raw/ and render each workload's report again (its TTFT p90 late column "
                        "and TTFT-over-time plots); the set's README is left as it is")
    p.add_argument("--plan-from", type=Path, default=None,
                   help="run --routers on the plan of an earlier set (its knees, rates, time scales, requests and "
                        "traces) and judge kvswitch against that set's other routers")
    a = p.parse_args(argv)
    if a.variants is not None and a.report is None:
        print("kvswitch bench curves: --variants goes with --report DIR (a set to replay them on)", file=sys.stderr)
        return 2
    if a.report:
        if a.send_times:  # the set's own README may hold hand-written sections: only the workloads' are rendered
            from e2e.bench.report import add_send_times, render

            doc = json.loads((a.report / "curves.json").read_text())
            for rel in doc["workloads"].values():
                print(f"{rel}: send times added to {add_send_times(a.report / rel)} runs; report "
                      f"{render(a.report / rel)}", flush=True)
            return 0
        if a.variants is not None:
            try:
                variants = vcurve.read_variants(a.variants)
            except ValueError as exc:
                print(f"kvswitch bench curves: --variants {a.variants}: {exc}", file=sys.stderr)
                return 2
            print("\n".join(variant_twins(a.report, variants, log=lambda line: print(line, file=sys.stderr,
                                                                                      flush=True))))
            return 0
        if a.twins:
            twins(a.report, log=lambda line: print(line, flush=True))
        print(render_summary(a.report).read_text())
        return 0
    workloads, routers = _list(a.workloads), _list(a.routers)
    try:
        loads = [float(x) for x in _list(a.loads)] if a.loads is not None else list(LOADS)
    except ValueError as exc:
        print(f"kvswitch bench curves: --loads: {exc}", file=sys.stderr)
        return 2
    unknown = [w for w in workloads if w not in vcurve.WORKLOADS]
    if unknown or not workloads or not routers or not loads or any(x <= 0 for x in loads) or a.repetitions < 1:
        print(f"kvswitch bench curves: workloads from {', '.join(vcurve.WORKLOADS)} (unknown: {unknown}), "
              "routers and positive loads needed, --repetitions >= 1", file=sys.stderr)
        return 2
    if a.jobs < 1 or (a.requests is not None and a.requests < 2) or (
            a.time_scale is not None and a.time_scale <= 0) or (
            a.deadline_min is not None and a.deadline_min <= 0):
        print("kvswitch bench curves: --jobs >= 1, --requests >= 2, --time-scale > 0 and --deadline-min > 0",
              file=sys.stderr)
        return 2
    if a.time_scale is not None and a.plan_from is None:
        print("kvswitch bench curves: --time-scale re-times an earlier set's plan: it needs --plan-from (a new "
              "plan sizes its time scales with --max-wall-rate and --max-wall-tokens)", file=sys.stderr)
        return 2
    from e2e.bench import peersenv
    from e2e.bench.routers import make_router

    for r in routers:
        try:
            make_router(r, Path("."))
        except ValueError as exc:
            print(f"kvswitch bench curves: {exc}", file=sys.stderr)
            return 2
    budget = Budget(a.budget_min, a.overhead_s, a.max_wall_rate, a.max_wall_tokens)
    reps = a.repetitions
    if a.plan_from is not None:
        try:
            plans, plan_loads = plans_of(a.plan_from, workloads)
            if a.loads is not None:
                plans = [subset(x, plan_loads, loads) for x in plans]
            else:
                loads = plan_loads
            if a.time_scale is not None:
                for x in plans:
                    x.time_scales = [a.time_scale] * len(x.rates)
            if a.requests is not None:  # longer runs of the same traces: fewer cold starts per request judged
                for x in plans:
                    x.requests = a.requests
            if a.time_scale is not None or a.requests is not None:
                for x in plans:
                    x.est_wall_s = estimate_wall_s(x, len(routers) * reps, budget.overhead_s)
        except (OSError, ValueError, KeyError) as exc:
            print(f"kvswitch bench curves: --plan-from {a.plan_from}: {exc}", file=sys.stderr)
            return 2
        print(f"kvswitch bench curves: {len(plans)} workloads x {len(routers)} routers on the plan of "
              f"{a.plan_from}", flush=True)
        for x in plans:
            print(f"  {x.describe()}", flush=True)
    else:
        print(f"kvswitch bench curves: {len(workloads)} workloads x {len(routers)} routers x {len(loads)} loads x "
              f"{reps} repetitions; planning (virtual-time knees and makespans)", flush=True)
        # the smoke point is planned as part of the whole set (its time scale and requests), then run alone
        plans = plan(workloads[:1] if a.smoke else workloads, routers, loads, reps, budget, a.requests,
                     log=lambda line: print(line, flush=True),
                     share_s=budget.minutes * 60.0 / len(workloads))
    for x in plans:  # repetition r replays seed r of the virtual-time curves' trace
        if why := vcurve.check_seeds([x.workload], list(range(reps)), x.requests):
            print(f"kvswitch bench curves: {why}", file=sys.stderr)
            return 2
    est = sum(x.est_wall_s for x in plans)
    print(f"kvswitch bench curves: estimated wall {est / 60:.0f} min on a quiet machine", flush=True)
    if a.plan:
        return 0
    if a.smoke:
        i = next((k for k, x in enumerate(loads) if x >= 1.0), len(loads) - 1)
        loads, reps = [loads[i]], 1
        plans[0].rates, plans[0].time_scales = [plans[0].rates[i]], [plans[0].time_scales[i]]
        print(f"kvswitch bench curves: smoke point: {plans[0].workload} at {loads[0]:g}x the knee "
              f"({plans[0].rates[0]:g} req/s), {plans[0].requests} requests, time scale {plans[0].time_scales[0]:g}, "
              "one repetition", flush=True)
    if why := peersenv.missing():
        print(f"kvswitch bench curves: {why}", file=sys.stderr)
        return 2
    out = a.out or RESULTS_DIR / f"{_dt.datetime.now():%Y-%m-%d-%H%M}-curves{'-smoke' if a.smoke else ''}"
    interrupt_on_sigterm()
    if a.jobs > 1 or a.deadline_min is not None:
        readme = run_parallel(plans, routers, reps, out, loads, a.jobs, log=lambda line: print(line, flush=True),
                              base=a.plan_from, with_twins=not a.no_twins,
                              deadline_s=None if a.deadline_min is None else 60.0 * a.deadline_min)
    else:
        readme = run(plans, routers, reps, out, loads, log=lambda line: print(line, flush=True), base=a.plan_from,
                     with_twins=not a.no_twins)
    print(readme.read_text())
    print(f"report: {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
