"""Load curves in virtual time: every router at offered loads from 0.5x to 3x the knee, per workload.

    kvswitch bench curve [--workloads shared-prefix,multi-turn,no-sharing,mooncake] [--loads 0.5,1,2,3]
        [--seeds 0,1,2] [--routers default,envoy:round_robin,...] [--requests 300] [--out DIR] [--jobs 1]

The same decision code as the live picker (``pickers`` through ``SchedulerRouter``) and emulations of the
peers' published policies (engine/sim/cluster/peers.py) route the same traces on the same simulated fleet
(``ClusterSim``: vLLM scheduling, prefix caching and timing from the one cost model), in virtual time, so one
point takes seconds. The real-time version through Envoy with the real peers is ``kvswitch bench compare
--curve``.

The knee: for each workload, round robin is offered the first seed's trace compressed 20x (every request
queued almost at once), and the knee is the request rate it then completes (completed / makespan): the
fleet's service capacity for that traffic. Load factors multiply it; the knee and how it was found are in
the report.

Each workload is generated once per seed at its base rate and then replayed ``load x knee / base rate``
times faster (the trace's timestamps scaled, as a Mooncake replay at a speedup does), so every load point
of a seed has the same requests.

A change to the picker is judged against the tree before it, run by run: ``--report B/results.json --against
A/results.json`` adds to B's report, per workload and load, the differences B - A of the router both ran
(``default``) paired by seed (the same trace on both sides), their median, min and max, and how many seeds
changed at all (a change that never fires leaves the runs identical, bit for bit).
"""

from __future__ import annotations

import argparse
import bisect
import datetime as _dt
import json
import math
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from e2e.bench import workloads as W
from e2e.bench.bar import Figures, misses
from engine.sim.cluster.report import json_safe

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "e2e" / "bench" / "results"
ROUTERS = ["default", "envoy:round_robin", "least-loaded", "sglang:cache_aware", "vllm:cache_aware",
           "vllm:kv_aware", "tree:smallest"]
# the emulations of the four peers the bar names (engine/sim/cluster/peers.py); the other routers above
# are baselines, shown beside them but not judged against
PEERS = ("envoy:round_robin", "sglang:cache_aware", "vllm:cache_aware", "vllm:kv_aware")
LOADS = [0.5, 0.75, 1.0, 1.5, 2.0, 3.0]
PROBE_SPEEDUP = 20.0


@dataclass(frozen=True, slots=True)
class CurveFleet:
    pods: int = 4
    accelerator: str = "L40S"
    model_profile: str = "8b"
    max_model_len: int = 32768


@dataclass(slots=True)
class CurveWorkload:
    """A workload generator at its base rate (requests/s) with the parameters the report states."""

    name: str
    make: Callable[[int, int], W.Workload]  # (seed, requests) -> workload at the base rate
    params: dict[str, Any] = field(default_factory=dict)


def _shared_prefix(seed: int, n: int) -> W.Workload:
    return W.shared_prefix(num_requests=n, groups=16, prefix_tokens=4096, question_tokens=512,
                           output_tokens=128, rate=4.0, seed=seed)


def _multi_turn(seed: int, n: int) -> W.Workload:
    conv = max(1, n // 5)
    return W.multi_turn(conversations=conv, turns=5, system_tokens=1024, first_user_tokens=1024,
                        user_tokens=256, output_tokens=128, rate=0.5, think_time_s=20.0, seed=seed)


def _no_sharing(seed: int, n: int) -> W.Workload:
    return W.no_sharing(num_requests=n, rate=4.0, input_median=1024, input_sigma=0.9, output_median=150,
                        output_sigma=0.8, max_input=8192, max_output=1024, seed=seed)


MOONCAKE_WINDOW_MS = 120_000  # seed s replays the trace from s x this


def _mooncake(seed: int, n: int) -> W.Workload:
    """Seed s: the ``n`` requests from s x 120 s of the trace on (consecutive windows, so repetitions see
    different traffic). A window that ends before ``n`` requests is refused: a short run, or an empty one, would
    join the medians as if it were a run of ``n`` (seeds 7-9 at 1,000 requests held 755, 251 and 0)."""
    start_ms = seed * MOONCAKE_WINDOW_MS
    wl = W.mooncake(num_requests=n, start_ms=start_ms, max_input_tokens=16384, max_output_tokens=512)
    if len(wl.records) < n:
        times = sorted(r.timestamp for r in W.read_trace(W.DEFAULT_MOONCAKE_TRACE))
        fits = [s for s in range(seed) if len(times) - bisect.bisect_left(times, s * MOONCAKE_WINDOW_MS) >= n]
        allowed = f"seeds 0-{fits[-1]} give {n}" if fits else f"no seed gives {n} (the trace has {len(times)})"
        raise ValueError(f"mooncake: seed {seed}'s window (from {start_ms / 1000:g} s of the trace, which ends at "
                         f"{times[-1] / 1000:g} s) holds {len(wl.records)} of the {n} requests asked; {allowed}")
    return wl


WORKLOADS: dict[str, CurveWorkload] = {
    "shared-prefix": CurveWorkload("shared-prefix", _shared_prefix, dict(
        groups=16, prefix_tokens=4096, question_tokens=512, output_tokens=128)),
    "multi-turn": CurveWorkload("multi-turn", _multi_turn, dict(
        turns=5, system_tokens=1024, first_user_tokens=1024, user_tokens=256, output_tokens=128,
        think_time_s=20.0, note="think time scales with the load like every timestamp")),
    "no-sharing": CurveWorkload("no-sharing", _no_sharing, dict(
        input_median=1024, input_sigma=0.9, output_median=150, output_sigma=0.8, max_input=8192,
        max_output=1024)),
    "mooncake": CurveWorkload("mooncake", _mooncake, dict(
        trace=str(W.DEFAULT_MOONCAKE_TRACE), window="seed s starts at s x 120 s of the trace",
        max_input_tokens=16384, max_output_tokens=512)),
}


def check_seeds(workloads: list[str], seeds: list[int], requests: int) -> str | None:
    """Why some seed cannot give some workload ``requests`` requests (a Mooncake window past the trace's end),
    or None: checked before any run, so a set is refused rather than judged on short runs."""
    for w in workloads:
        for seed in seeds:
            try:
                WORKLOADS[w].make(seed, requests)
            except ValueError as exc:
                return str(exc)
    return None


def mean_rate(wl: W.Workload) -> float:
    return (len(wl.records) - 1) / wl.duration_s if wl.duration_s > 0 and len(wl.records) > 1 else 1.0


def _to_requests(wl: W.Workload, as_aiperf_sends: bool = False) -> list[Any]:
    """The simulator's requests for ``wl``; ``as_aiperf_sends``: with the hash ids aiperf's trace loader
    turns them into (``workloads.aiperf_ids``: a partial last block shares nothing with the full one), as
    the real-time runs send them."""
    from engine.sim.cluster.trace import TraceRequest

    ids = W.aiperf_ids(wl.records) if as_aiperf_sends else [r.hash_ids for r in wl.records]
    return [TraceRequest(i, r.timestamp / 1000.0, r.input_length, r.output_length, list(h))
            for i, (r, h) in enumerate(zip(wl.records, ids, strict=True))]


VARIANTS: dict[str, dict[str, Any]] = {}  # router name -> picker config (a profile under test), --variants


def run_point(workload: str, router: str, seed: int, rate: float, requests: int,
              fleet: CurveFleet = CurveFleet(), variants: dict[str, dict[str, Any]] | None = None,
              as_aiperf_sends: bool = False, access_log: bool = False) -> dict[str, Any]:
    """One replay: ``workload`` (seed) at ``rate`` requests/s through ``router``; its summary. A router named
    in ``variants`` is the picker profile ``variants[router]["profile"]`` built with that config.
    ``as_aiperf_sends``: the prompts as the real-time runs send them (``_to_requests``); ``access_log``: the
    picker hears of first tokens only at each request's end, as behind Envoy in access-log mode."""
    from engine.sim.cluster.cli import replay
    from engine.sim.cluster.fleet import fleet_from_flags
    from engine.sim.cluster.report import summarize
    from engine.sim.cluster.trace import BlockTokens

    wl = WORKLOADS[workload].make(seed, requests)
    wl = W.scale_rate(wl, rate / mean_rate(wl))
    reqs = _to_requests(wl, as_aiperf_sends)
    spec = fleet_from_flags(fleet.pods, fleet.accelerator, fleet.model_profile, max_model_len=fleet.max_model_len)
    variant = (variants if variants is not None else VARIANTS).get(router)
    policy = router if variant is None else variant_profile(variant)
    res, wall = replay(reqs, spec, policy, seed=seed, blocks=BlockTokens(), picker_config=variant,
                       access_log=access_log)
    s = summarize(res, wall)
    ok = [r for r in res.records if r.status == "ok"]
    s["cold"] = sum(1 for r in ok if r.cached_tokens < 0.5 * r.prompt_tokens)
    s["max_share"] = max(s["pod_share"].values(), default=0.0)
    s.update(workload=workload, router=router, seed=seed, rate=rate)
    for k in ("pod_busy", "prefill_share"):
        s.pop(k, None)
    return s


def knee(workload: str, requests: int, fleet: CurveFleet = CurveFleet()) -> float:
    """Round robin's completed requests/s when offered the seed-0 trace ``PROBE_SPEEDUP`` x faster."""
    wl = WORKLOADS[workload].make(0, requests)
    s = run_point(workload, "envoy:round_robin", 0, mean_rate(wl) * PROBE_SPEEDUP, requests, fleet)
    return float(s["throughput_req_s"])




@dataclass(frozen=True, slots=True)
class PlannedRun:
    """One replay of a curve: what ``run_point`` gets, picklable for the process pool."""

    workload: str
    router: str
    seed: int
    rate: float  # offered requests/s (the load x the knee)
    requests: int
    variants: dict[str, dict[str, Any]]
    access_log: bool

    def run(self) -> dict[str, Any]:
        return run_point(self.workload, self.router, self.seed, self.rate, self.requests,
                         variants=self.variants, access_log=self.access_log)


def run_curves(workloads: list[str], routers: list[str], loads: list[float], seeds: list[int], requests: int,
               out: Path, jobs: int = 1, log: Callable[[str], None] = print, access_log: bool = False) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    fleet = CurveFleet()
    doc: dict[str, Any] = {"meta": {
        "date": _dt.datetime.now().isoformat(timespec="seconds"), "mode": "virtual time (kvswitch sim)",
        "fleet": f"{fleet.pods} x {fleet.model_profile} on {fleet.accelerator}", "routers": routers,
        "loads": loads, "seeds": seeds, "requests": requests, "knee_method": (
            f"round robin offered the seed-0 trace {PROBE_SPEEDUP:g}x faster than its base rate; knee = completed "
            "req/s (the fleet's service capacity for that traffic)"),
        "workloads": {w: WORKLOADS[w].params for w in workloads}, "command": " ".join(sys.argv),
        "access_log": access_log},
        "knees": {}, "runs": []}
    path = out / "results.json"
    started = time.monotonic()
    for w in workloads:
        k = knee(w, requests, fleet)
        doc["knees"][w] = k
        log(f"{w}: knee {k:.2f} req/s (round robin at {PROBE_SPEEDUP:g}x the base rate)")
        plan = [PlannedRun(w, r, s, load * k, requests, VARIANTS, access_log) for load in loads for s in seeds
                for r in routers]
        done = 0
        t0 = time.monotonic()
        pool = ProcessPoolExecutor(jobs) if jobs > 1 else None
        try:
            results = pool.map(PlannedRun.run, plan) if pool else map(PlannedRun.run, plan)
            for planned, s in zip(plan, results):
                s["load"] = planned.rate / k
                doc["runs"].append(json_safe(s))
                done += 1
                if done % max(1, len(routers)) == 0 or done == len(plan):
                    el = time.monotonic() - t0
                    log(f"  [{done}/{len(plan)}] {w} load {s['load']:.2f}x seed {s['seed']}: "
                        f"{s['router']} {s['throughput_req_s']:.2f} req/s, p90 {1e3 * s['ttft_p90_s']:.0f} ms "
                        f"(ETA {el / done * (len(plan) - done):.0f} s)")
        finally:
            if pool:
                pool.shutdown()
        path.write_text(json.dumps(doc, indent=1))
    doc["meta"]["wall_s"] = time.monotonic() - started
    path.write_text(json.dumps(doc, indent=1))
    return path


def adopt_peers(path: Path, source: Path) -> int:
    """Add to ``path``'s results the runs of ``source`` (another set's results.json) by routers ``path`` did not
    run, at its workloads, loads and seeds: a change to the default judged against peers that did not change
    (their emulations do not read the picker's code) without re-running them. The two sets must have run the
    same traces: equal requests per run, access-log mode and knees, and ``source`` every (workload, load, seed)
    for each router it adds, else ValueError and ``path`` is unchanged. Returns the runs added."""
    doc, other = json.loads(path.read_text()), json.loads(source.read_text())
    meta, ometa = doc["meta"], other["meta"]
    for key, default in (("requests", None), ("access_log", False), ("fleet", None)):
        if meta.get(key, default) != ometa.get(key, default):
            raise ValueError(f"{source}: {key} {ometa.get(key, default)!r}, this set {meta.get(key, default)!r}")
    for w, k in doc["knees"].items():
        if other["knees"].get(w) != k:
            raise ValueError(f"{source}: knee of {w} {other['knees'].get(w)!r}, this set {k!r} (other traces)")
    cells = {(r["workload"], r["load"], r["seed"]) for r in doc["runs"]}
    added = [r for r in other["runs"] if r["router"] not in meta["routers"]
             and (r["workload"], r["load"], r["seed"]) in cells]
    peers = [r for r in ometa["routers"] if r not in meta["routers"]]
    for router in peers:
        have = {(r["workload"], r["load"], r["seed"]) for r in added if r["router"] == router}
        if have != cells:
            raise ValueError(f"{source}: {router} lacks {len(cells - have)} of this set's runs")
    doc["runs"] += added
    meta["routers"] = meta["routers"] + peers
    meta["peers_from"] = f"{source} ({', '.join(peers)})"
    path.write_text(json.dumps(doc, indent=1))
    return len(added)


# ---- report ------------------------------------------------------------------------------------------------
METRICS = [("throughput_req_s", "req/s", 1.0), ("ttft_p50_s", "TTFT p50 ms", 1e3),
           ("ttft_p90_s", "TTFT p90 ms", 1e3), ("ttft_p99_s", "TTFT p99 ms", 1e3),
           ("ttft_p90_late_s", "TTFT p90 late ms", 1e3), ("tpot_mean_s", "TPOT ms", 1e3),
           ("prefix_hit_rate", "hit %", 100.0), ("share_cv", "share CV", 1.0),
           ("max_share", "max share %", 100.0)]


def medians(runs: list[dict[str, Any]]) -> dict[tuple[str, float, str], dict[str, float]]:
    groups: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["workload"], round(r["load"], 3), r["router"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        out[key] = {m: float(np.median([x[m] for x in rs if x.get(m) is not None] or [math.nan]))
                    for m, _, _ in METRICS}
        out[key]["n"] = len(rs)
    return out


def _figures(m: dict[str, float]) -> Figures:
    """The bar's figures from one router's ``medians`` at one point."""
    return Figures(req_s=m["throughput_req_s"], p90_ms=1e3 * m["ttft_p90_s"], p99_ms=1e3 * m["ttft_p99_s"])


def verdicts(doc: dict[str, Any], kvswitch: str = "default", peers: tuple[str, ...] = PEERS) -> list[str]:
    """Markdown rows, per workload and load: where ``kvswitch`` misses the issue's bar (``e2e.bench.bar``)
    against the best of ``peers`` that ran the point, on medians over the seeds ``kvswitch`` and every one of
    them ran (the same traces on both sides). Baselines and variants run beside them are not peers."""
    by_seed: dict[tuple[str, float, str], dict[int, dict[str, Any]]] = {}
    for r in doc["runs"]:
        by_seed.setdefault((r["workload"], round(r["load"], 3), r["router"]), {})[r["seed"]] = r
    lines = []
    for w, load, _ in sorted(k for k in by_seed if k[2] == kvswitch):
        present = [p for p in peers if (w, load, p) in by_seed]
        seeds = sorted(set(by_seed[(w, load, kvswitch)]).intersection(*(by_seed[(w, load, p)] for p in present)))
        if not present or not seeds:
            continue
        med = medians([by_seed[(w, load, r)][s] for r in (kvswitch, *present) for s in seeds])
        miss = misses(_figures(med[(w, load, kvswitch)]), [_figures(med[(w, load, p)]) for p in present])
        lines.append(f"| {w} | {load:g}x | {len(seeds)} | {'; '.join(miss) or 'met'} |")
    return lines


PAIRED = [("throughput_req_s", "req/s", 1.0, "{:+.3f}"), ("ttft_p90_s", "TTFT p90 s", 1.0, "{:+.3f}"),
          ("ttft_p99_s", "TTFT p99 s", 1.0, "{:+.3f}")]


def paired(doc: dict[str, Any], base: dict[str, Any], router: str = "default") -> list[str]:
    """Markdown rows: per workload and load, ``router``'s per-seed differences ``doc`` - ``base`` (median
    [min, max]) over the seeds both ran, and how many seeds differ in any of them."""
    def runs(d: dict[str, Any]) -> dict[tuple[str, float, int], dict[str, Any]]:
        return {(r["workload"], round(r["load"], 3), r["seed"]): r for r in d["runs"] if r["router"] == router}

    new, old = runs(doc), runs(base)
    lines = []
    for w, load in sorted({(w, load) for w, load, _ in new}):
        seeds = sorted(s for w2, l2, s in new if (w2, l2) == (w, load) and (w, load, s) in old)
        if not seeds:
            continue
        cells = []
        for key, _, scale, fmt in PAIRED:
            d = [scale * (new[(w, load, s)][key] - old[(w, load, s)][key]) for s in seeds]
            cells.append(f"{fmt.format(float(np.median(d)))} [{fmt.format(min(d))}, {fmt.format(max(d))}]")
        changed = sum(any(new[(w, load, s)][k] != old[(w, load, s)][k] for k, _, _, _ in PAIRED) for s in seeds)
        lines.append(f"| {w} | {load:g}x | {len(seeds)} | " + " | ".join(cells) + f" | {changed} |")
    return lines


def render(path: Path, plots: bool = True, against: Path | None = None) -> Path:
    doc = json.loads(Path(path).read_text())
    out = Path(path).parent
    med = medians(doc["runs"])
    meta = doc["meta"]
    lines = [f"# Load curves in virtual time ({meta['date']})", "",
             f"Fleet: {meta['fleet']}. Routers: {', '.join(meta['routers'])}. Seeds: {meta['seeds']} "
             f"({meta['requests']} requests per run). Medians over seeds.", "",
             f"Knee: {meta['knee_method']}.", "",
             "Peers (`sglang:`, `vllm:`, `envoy:round_robin`) are emulations of their policies as installed, "
             "beside two baselines (`least-loaded`, `tree:smallest`: the cache-aware tree with earlier "
             "sgl-router's smallest-tree fallback), in the simulator (engine/sim/cluster/peers.py, which states "
             "where they approximate); the "
             "real peers through Envoy are `kvswitch bench compare --curve`.", "",
             f"Command: `{meta.get('command', '')}`; wall {meta.get('wall_s', 0):.0f} s.", ""]
    if meta.get("peers_from"):
        lines += [f"Runs of the routers this command did not run, from {meta['peers_from']}: the same traces "
                  "(requests, knees and access-log mode checked), not re-run.", ""]
    for w, k in doc["knees"].items():
        lines += [f"## {w}: knee {k:.2f} req/s", "", f"Parameters: `{json.dumps(meta['workloads'].get(w, {}))}`", ""]
        if plots or (out / f"{w}.png").exists():  # a re-render without plots keeps the ones drawn before
            lines += [f"![{w}]({w}.png)", ""]
        lines.append("| load | router | " + " | ".join(lbl for _, lbl, _ in METRICS) + " |")
        lines.append("|---|---|" + "---|" * len(METRICS))
        for (w2, load, router), m in sorted(med.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                            meta["routers"].index(kv[0][2]))):
            if w2 != w:
                continue
            cells = []
            for key, _, scale in METRICS:
                v = m[key] * scale
                cells.append("-" if not math.isfinite(v) else (f"{v:.3f}" if scale == 1.0 else f"{v:.0f}"))
            lines.append(f"| {load:g}x | {router} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Against the issue's bar (the default vs the best of the four peers' emulations, medians over "
              "the seeds all of them ran)", "",
              "| workload | load | seeds | verdict |", "|---|---|---|---|", *verdicts(doc), ""]
    if against is not None:
        lines += [f"## Paired by seed against {against} (default: this run - that one)", "",
                  "| workload | load | seeds | " + " | ".join(f"d {lbl} median [min, max]" for _, lbl, _, _ in PAIRED)
                  + " | seeds changed |", "|---|---|---|" + "---|" * (len(PAIRED) + 1),
                  *paired(doc, json.loads(Path(against).read_text())), ""]
    readme = out / "README.md"
    readme.write_text("\n".join(lines))
    if plots:
        _plots(doc, med, out)
    return readme


def curve_panel(ax: Any, med: dict, workload: str, routers: list[str], key: str, label: str, knee: float, log: bool,
                scale: float = 1.0, highlight: str = "default") -> None:
    """One panel of a load curve: ``key`` against offered load / knee per router (medians ``med`` keyed
    (workload, load, router)); ``highlight``: the router drawn thick (every router whose name starts with it)."""
    for r in routers:
        pts = sorted((load, m[key] * scale) for (w2, load, r2), m in med.items() if w2 == workload and r2 == r)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=r,
                    linewidth=2.5 if r.startswith(highlight) else 1.2)
    ax.set_xlabel(f"offered load / knee ({knee:.2f} req/s)")
    ax.set_ylabel(label)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


def _plots(doc: dict[str, Any], med: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routers = doc["meta"]["routers"]
    panels = [("throughput_req_s", "completed req/s", 1.0, False), ("ttft_p90_s", "TTFT p90 (s)", 1.0, True),
              ("ttft_p99_s", "TTFT p99 (s)", 1.0, True), ("prefix_hit_rate", "prefix hit rate (%)", 100.0, False)]
    for w, k in doc["knees"].items():
        fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
        for ax, (key, label, scale, log) in zip(axes, panels):
            curve_panel(ax, med, w, routers, key, label, k, log, scale, highlight="default")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{w}: {doc['meta']['fleet']}, virtual time, median of {len(doc['meta']['seeds'])} seeds")
        fig.tight_layout()
        fig.savefig(out / f"{w}.png", dpi=90)
        plt.close(fig)


def variant_profile(variant: dict[str, Any]) -> str:
    """The picker profile a variant's config runs (its ``profile``, "default" without one)."""
    return str(variant.get("profile", "default"))


def read_variants(path: Path) -> dict[str, dict[str, Any]]:
    """``--variants``: a JSON object {router name: picker config with its ``profile`` (default: "default")}. Each
    config is built once here, over no pods, so that a bad one is refused before hours of replays; ValueError
    says which and why."""
    from prometheus_client import CollectorRegistry

    from engine.sim.cluster.routers import scheduler_config
    from pickers.config import ConfigError, build_scheduler

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read it: {exc}") from None
    if not isinstance(doc, dict) or not doc:
        raise ValueError("expected a JSON object {router name: picker config}, with at least one variant")
    for name, cfg in doc.items():
        if not isinstance(cfg, dict):
            raise ValueError(f"{name!r}: expected a picker config (an object), got {type(cfg).__name__}")
        try:
            build_scheduler(scheduler_config(variant_profile(cfg), cfg), [], network=False,
                            registry=CollectorRegistry())
        except ConfigError as exc:
            raise ValueError(f"{name!r}: {exc}") from None
    return doc


def _results_json(path: Path | None) -> Path | None:
    """A set's results.json: ``path`` itself, or the one in the folder ``path``."""
    return path / "results.json" if path is not None and path.is_dir() else path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvswitch bench curve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--routers", default=",".join(ROUTERS))
    p.add_argument("--loads", default=",".join(f"{x:g}" for x in LOADS), help="multiples of the knee")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--requests", type=int, default=300, help="requests per run")
    p.add_argument("--jobs", type=int, default=1, help="parallel replays (processes)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--report", type=Path, default=None, help="only re-render the report of a results.json")
    p.add_argument("--against", type=Path, default=None,
                   help="another results.json (the tree before a change): add the paired-by-seed differences")
    p.add_argument("--peers-from", type=Path, default=None,
                   help="another set (folder or results.json): its runs of the routers not in --routers join this "
                        "report (the same traces, checked), so a change to the default needs no peer re-runs")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--access-log", action="store_true",
                   help="the picker hears of first tokens only at each request's end, as behind Envoy in its "
                        "default access-log mode (peers are unaffected)")
    p.add_argument("--variants", type=Path, default=None,
                   help="JSON {router name: picker config with its 'profile'} (profiles under test)")
    a = p.parse_args(argv)
    if a.variants:
        try:
            VARIANTS.update(read_variants(a.variants))
        except ValueError as exc:
            print(f"kvswitch bench curve: --variants {a.variants}: {exc}", file=sys.stderr)
            return 2
    # a report's folder names its results.json; a missing one is refused before hours of runs
    a.against, a.peers_from = (_results_json(x) for x in (a.against, a.peers_from))
    for flag, given in (("--against", a.against), ("--peers-from", a.peers_from)):
        if given is not None and not given.is_file():
            print(f"kvswitch bench curve: {flag} {given}: no such results.json", file=sys.stderr)
            return 2
    if a.report:
        print(render(a.report, not a.no_plots, a.against))
        return 0
    workloads = [w for w in a.workloads.split(",") if w]
    for w in workloads:
        if w not in WORKLOADS:
            print(f"kvswitch bench curve: unknown workload {w!r}; known: {', '.join(WORKLOADS)}", file=sys.stderr)
            return 2
    try:
        loads = [float(x) for x in a.loads.split(",") if x]
        seeds = [int(x) for x in a.seeds.split(",") if x]
    except ValueError as exc:
        print(f"kvswitch bench curve: {exc}", file=sys.stderr)
        return 2
    if not loads or any(x <= 0 for x in loads) or not seeds or a.requests < 2:
        print("kvswitch bench curve: loads must be positive, seeds non-empty, --requests >= 2", file=sys.stderr)
        return 2
    if why := check_seeds(workloads, seeds, a.requests):
        print(f"kvswitch bench curve: {why}", file=sys.stderr)
        return 2
    out = a.out or RESULTS_DIR / f"{_dt.datetime.now():%Y-%m-%d-%H%M}-vcurve"
    path = run_curves(workloads, [r for r in a.routers.split(",") if r], loads, seeds, a.requests, out,
                      max(1, a.jobs), lambda line: print(line, flush=True), access_log=a.access_log)
    if a.peers_from is not None:
        try:
            print(f"{adopt_peers(path, a.peers_from)} runs of other routers from {a.peers_from}", flush=True)
        except ValueError as exc:
            print(f"kvswitch bench curve: --peers-from {exc}; this set's own runs are in {path}", file=sys.stderr)
            return 2
    print(render(path, not a.no_plots, a.against).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
