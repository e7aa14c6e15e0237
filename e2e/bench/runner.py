"""The comparison loop: for each repetition x rate x router, a fresh fleet, the router, aiperf, counters.

Every run starts from the same cold state (the fleet process is restarted: empty caches, zeroed counters)
and replays the very same trace (same seed) through a different router. Results are written as they come
(results.json is rewritten after every run) so a long comparison that dies keeps what it measured.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from e2e.bench import peersenv
from e2e.bench.client import RunResult, percentile, run_aiperf, run_dir_name
from e2e.bench.fleet import FleetSpec, SimFleetProcess, hit_rate
from e2e.bench.routers import make_router
from e2e.bench.tokenizer import ensure_tokenizer
from e2e.bench.workloads import Workload, make

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "e2e" / "bench" / "results"


@dataclass
class CompareConfig:
    workload: str = "shared-prefix"
    workload_params: dict[str, Any] = field(default_factory=dict)
    routers: list[str] = field(default_factory=lambda: ["kvswitch", "envoy-rr"])
    rates: list[float] = field(default_factory=lambda: [4.0])
    pods: int = 4
    time_scale: float = 1.0
    # per rate (same order as ``rates``): wall s per simulated s of the runs at that rate; None: time_scale
    # for every rate. A light load can run faster than the heaviest without crowding the shared CPU.
    time_scales: list[float] | None = None
    repetitions: int = 1
    seed: int = 0
    roles: list[str] | None = None  # P/D fleets: per-pod role
    model_profile: str = "llama-3.1-8b"
    accelerator: str = "H100"
    out: Path | None = None
    cache_dir: Path | None = None
    # load curves: the virtual-time curves' trace (e2e.bench.vcurve.WORKLOADS[workload], this many requests,
    # seed = seed + repetition, its window for Mooncake) replayed at the rate asked, as `kvswitch bench curve`
    # does; None: the workload generator with ``workload_params`` at that rate
    curve_requests: int | None = None

    def scale_for(self, rate: float) -> float:
        """The time scale of the runs at ``rate``."""
        if self.time_scales is None:
            return self.time_scale
        return self.time_scales[self.rates.index(rate)]

    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        stamp = _dt.datetime.now().strftime("%Y-%m-%d-%H%M")
        return RESULTS_DIR / f"{stamp}-{self.workload}"


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model or platform.processor(), "platform": platform.platform(),
            "python": sys.version.split()[0]}


def build_workload(cfg: CompareConfig, rate: float, repetition: int) -> Workload:
    """The trace for one rate and repetition: the same for every router (seed = seed + repetition)."""
    if cfg.curve_requests is not None:
        from e2e.bench.vcurve import WORKLOADS, mean_rate
        from e2e.bench.workloads import scale_rate

        wl = WORKLOADS[cfg.workload].make(cfg.seed + repetition, cfg.curve_requests)
        return scale_rate(wl, rate / mean_rate(wl))
    params = dict(cfg.workload_params)
    params["seed"] = cfg.seed + repetition
    return make(cfg.workload, rate=rate, **params)


def _fmt_s(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Comparison:
    """Runs a CompareConfig and keeps meta + results in ``out_dir/results.json``."""

    def __init__(self, cfg: CompareConfig, log: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.log = log or (lambda line: print(line, flush=True))  # progress must show when stdout is a file
        self.out = cfg.out_dir()
        self.raw = self.out / "raw"
        self.results: list[RunResult] = []
        self.failures: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {}
        self.knee: float | None = None  # --curve: the probed knee (req/s), kept in the report
        # asked before each run; True: no further run starts (the runs done are saved as usual)
        self.should_stop: Callable[[], bool] = lambda: False

    def plan(self) -> list[tuple[int, float, str]]:
        return [(rep, rate, router) for rep in range(self.cfg.repetitions) for rate in self.cfg.rates
                for router in self.cfg.routers]

    def save(self) -> Path:
        path = self.out / "results.json"
        doc = {"meta": self.meta, "runs": [r.to_json() for r in self.results], "failures": self.failures}
        path.write_text(json.dumps(doc, indent=1, default=str))
        return path

    def describe(self) -> dict[str, Any]:
        """The comparison's meta: workload, routers, rates, fleet, machine and versions (results.json's)."""
        cfg = self.cfg
        wl0 = build_workload(cfg, cfg.rates[0], 0)
        return {
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "workload": cfg.workload, "workload_params": {**wl0.params, "rate": None},
            "workload_stats": wl0.stats(), "routers": cfg.routers, "rates": cfg.rates, "pods": cfg.pods,
            "roles": cfg.roles, "time_scale": max(cfg.time_scales or [cfg.time_scale]),
            "time_scales": cfg.time_scales, "repetitions": cfg.repetitions, "seed": cfg.seed,
            "model_profile": cfg.model_profile, "accelerator": cfg.accelerator, "machine": machine(),
            "versions": peersenv.versions(), "client": "aiperf (streaming completions, fixed schedule)",
            "command": " ".join(sys.argv), "knee_req_s": self.knee,
        }

    def run(self) -> Path:
        cfg = self.cfg
        for name in cfg.routers:  # bad names fail before anything starts
            make_router(name, self.raw)
        self.raw.mkdir(parents=True, exist_ok=True)
        tokenizer = ensure_tokenizer(cfg.cache_dir)
        self.meta = self.describe()
        fleet = SimFleetProcess(FleetSpec(pods=cfg.pods, time_scale=cfg.time_scale, tokenizer=tokenizer,
                                          model_profile=cfg.model_profile, accelerator=cfg.accelerator,
                                          roles=cfg.roles, seed=cfg.seed), self.raw)
        plan = self.plan()
        started = time.monotonic()
        try:
            for i, (rep, rate, name) in enumerate(plan, 1):
                if self.should_stop():
                    self.log(f"stopped before run {i}/{len(plan)}")
                    break
                t0 = time.monotonic()
                try:
                    res = self.one(fleet, name, rate, rep)
                    self.results.append(res)
                    line = (f"{res.ok} ok, {res.errors} errors, {res.request_throughput:.2f} req/s, "
                            f"TTFT p90 {percentile(res.ttft_ms, 90):.0f} ms, hit {100 * (res.hit_rate or 0):.0f}%")
                except Exception as exc:  # noqa: BLE001 - one router failing must not sink the comparison
                    self.failures.append({"router": name, "rate": rate, "repetition": rep,
                                          "error": str(exc)[-4000:]})
                    line = f"FAILED: {str(exc).splitlines()[0][:200]}"
                self.save()
                elapsed = time.monotonic() - started
                eta = elapsed / i * (len(plan) - i)
                self.log(f"[{i}/{len(plan)}] {name} rate={rate:g} rep={rep}: {line} "
                         f"({time.monotonic() - t0:.0f}s, ETA {_fmt_s(eta)})")
        finally:
            fleet.stop()
        self.meta["wall_s"] = time.monotonic() - started
        return self.save()

    def one(self, fleet: SimFleetProcess, name: str, rate: float, rep: int) -> RunResult:
        # ``rate`` is simulated requests/s: the trace is replayed time_scale x slower in wall time, and the
        # samples are converted back to simulated time, so results do not depend on the time scale.
        ts = self.cfg.scale_for(rate)
        wl = build_workload(self.cfg, rate / ts, rep)
        run_dir = self.raw / run_dir_name(name, rate, rep)
        trace = wl.write(run_dir / "trace.jsonl")
        fleet.spec = replace(fleet.spec, time_scale=ts)  # read when the fleet (re)starts
        fleet.restart()
        router = make_router(name, run_dir)
        t0 = time.monotonic()
        try:
            url = router.start(fleet)
            before, own0, kv0 = fleet.counters(), router.own_prefills(), router.kv_lookups()
            res = run_aiperf(url, fleet.model, trace, run_dir / "aiperf", router=name, rate=rate, repetition=rep,
                             timeout_s=wl.duration_s * 4 + 120, seed=self.cfg.seed + rep,
                             cache_dir=self.cfg.cache_dir)
            res.rate = rate
            res.to_simulated(ts)
            after, own1 = fleet.counters(), router.own_prefills()
            hr = hit_rate(before.prefix, after.prefix)
            res.engine_ttft_ms = engine_ttft_ms(before.ttft, after.ttft, own0, own1, ts)
            res.router_prompts = own1[1] - own0[1]
            res.router_kv_lookups = {k: v - kv0.get(k, 0.0) for k, v in router.kv_lookups().items()}
            res.hit_rate, res.max_pod_share = hr["hit_rate"], hr["max_pod_share"]
            res.pod_query_tokens = hr["pod_query_tokens"]
        finally:
            router.stop()
        res.wall_s = time.monotonic() - t0
        return res


def engine_ttft_ms(before: tuple[float, float], after: tuple[float, float], own_before: tuple[float, float],
                   own_after: tuple[float, float], time_scale: float) -> float | None:
    """The pods' own mean TTFT over the client's requests, in simulated ms (None: none counted).

    ``before``/``after``: the fleet's TTFT histograms (sum in simulated seconds, count) around the run;
    ``own_*``: the prompts the router sent the pods itself (``Router.own_prefills``: wall seconds, count), which
    those histograms count too. kvswitch's warm-up pieces (512 new tokens each behind a cached prefix) are prefills
    like any other at the pods: left in, they moved the pods' mean by their own (shared-prefix at the knee, time
    scale 4: 80 pieces of 121 ms beside 240 requests of 103 ms read 107 ms, and the path 5 ms short)."""
    total = (after[0] - before[0]) - (own_after[0] - own_before[0]) / time_scale
    count = (after[1] - before[1]) - (own_after[1] - own_before[1])
    return 1000.0 * total / count if count > 0 else None


def probe_knee(cfg: CompareConfig, speedup: float = 20.0) -> float:
    """The fleet's service capacity for this workload, in virtual time: round robin is offered the first
    repetition's trace ``speedup`` x faster than its base rate (every request queued almost at once) on the
    same pods as the real-time run; the knee is the request rate it completes (completed / makespan)."""
    from e2e.bench.vcurve import mean_rate
    from engine.sim.cluster.cli import replay
    from engine.sim.cluster.fleet import fleet_from_flags
    from engine.sim.cluster.report import summarize
    from engine.sim.cluster.trace import BlockTokens, TraceRequest

    params = dict(cfg.workload_params)
    params["seed"] = cfg.seed
    wl = make(cfg.workload, **params)
    from e2e.bench.workloads import scale_rate

    wl = scale_rate(wl, speedup)
    reqs = [TraceRequest(i, r.timestamp / 1000.0, r.input_length, r.output_length, list(r.hash_ids))
            for i, r in enumerate(wl.records)]
    fleet = fleet_from_flags(cfg.pods, cfg.accelerator, cfg.model_profile)
    res, _ = replay(reqs, fleet, "round-robin", seed=cfg.seed, blocks=BlockTokens())
    knee = float(summarize(res)["throughput_req_s"])
    if not knee > 0:
        raise ValueError(f"the knee probe completed nothing (base rate {mean_rate(wl):.2f} req/s)")
    return knee


PRESETS: dict[str, dict[str, Any]] = {
    # `make bench`: every peer once against kvswitch, below and at the knee, one repetition; < 15 min on 2
    # cores. L40S-class pods (cost model: a 4608-token miss ~0.5 s, 512 new on 4096 cached ~0.06 s) and 16
    # groups put the knee of 4 pods at 15-20 simulated req/s (virtual-time replay of this trace,
    # `kvswitch sim replay`: round robin saturates at ~16.7 req/s, kvswitch default at ~20); time scale 2
    # keeps the wall rate (5-10 req/s) within what the client, routers and sim sustain on 2 shared cores.
    "reduced": dict(
        workload="shared-prefix",
        workload_params=dict(num_requests=120, groups=16, prefix_tokens=4096, question_tokens=512,
                             output_tokens=64),
        routers=["kvswitch", "envoy-rr", "vllm-router:cache_aware", "vllm-router:kv_aware",
                 "vllm-router:power_of_two", "sglang-router:cache_aware"],
        rates=[10.0, 20.0], pods=4, time_scale=2.0, repetitions=1, accelerator="L40S",
    ),
    # The end-to-end test's size: seconds, not minutes.
    "tiny": dict(
        workload="shared-prefix",
        workload_params=dict(num_requests=20, groups=2, prefix_tokens=1024, question_tokens=64,
                             output_tokens=16),
        routers=["envoy-rr", "vllm-router:cache_aware"], rates=[10.0], pods=2, time_scale=0.2, repetitions=1,
    ),
}


def config_from_preset(name: str, **overrides: Any) -> CompareConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    fields = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return CompareConfig(**fields)


def asdict_config(cfg: CompareConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
