"""The planner's virtual-time adapter (with routers.py, the only place engine/ reaches into pickers/):
``kvswitch sim replay --autoscale`` and ``kvswitch plan`` take the planner's pieces from here.

A planner in the loop of a virtual-time replay: observe the fleet each interval, apply desired replicas.

``PlannerController`` is the ``ClusterSim`` controller: every ``planner.interval_s`` it builds the planner's
``Observation`` from what a gateway and a scrape would have seen (arrivals and their lengths since the last
tick, prefix hits and SLO attainment of requests that ended since, waiting requests and KV usage of ready
pods, pods per kind by state), asks the pure planner (``pickers.planner``) for desired replicas per kind and
applies the difference: new pods of the kind (paid from now, serving after the kind's start-up time) or
drain-first removals (pods still starting first, then the ready pods holding the fewest requests). One
decision that changes the fleet is one scaling action, however many pods it moves.
"""

from __future__ import annotations

import math
from collections import deque

from engine.sim.cluster.fleet import PodSpec
from engine.sim.cluster.report import SloTargets, request_tpot
from engine.sim.cluster.simulator import (
    DRAINING,
    READY,
    RELEASED,
    STARTING,
    ClusterSim,
    Pod,
    RequestRecord,
    SimResult,
)
from pickers.planner import (
    PLANNERS,
    LoadShape,
    PodKind,
    Slo,
    cheapest_kind,
    make_planner,
    pod_capacity,
)
from pickers.planner.autoscale import Desired, Observation, Planner, PoolState, parse_planner_spec
from pickers.planner.catalogue import PRICE_SOURCE, Catalogue, parse_accelerators
from pickers.planner.search import Candidate, search

_SAMPLE = 2048  # prompt/output lengths handed to the planner per tick, at most


class PlannerController:
    def __init__(self, planner: Planner, catalogue: Catalogue, slo: SloTargets, model_profile: str,
                 template: PodSpec | None = None) -> None:
        self.planner = planner
        self.interval_s = planner.interval_s
        self.catalogue = catalogue
        self.slo = slo
        self.model_profile = model_profile
        self.template = template or PodSpec("", "both", catalogue.kinds[0], model_profile)
        self._seen = 0  # records (in arrival order) already reported as arrivals
        self._open: deque[RequestRecord] = deque()  # arrived, not yet ended
        self._last = 0.0
        self.decisions: list[tuple[float, Desired]] = []  # bounded by the replay's length / interval

    def tick(self, sim: ClusterSim, now: float) -> None:
        obs = self.observe(sim, now)
        want = self.planner.decide(obs)
        if want is not None and self.apply(sim, want, obs, now):
            sim.scaling_actions += 1
            self.decisions.append((now, dict(want)))

    def observe(self, sim: ClusterSim, now: float) -> Observation:
        new = sim.records[self._seen:]
        self._seen = len(sim.records)
        self._open.extend(new)
        step = max(1, len(new) // _SAMPLE + (len(new) % _SAMPLE > 0))
        inputs = [r.input_length for r in new[::step]]
        outputs = [r.max_tokens for r in new[::step]]
        met = ended = 0
        prompt = cached = 0
        still: deque[RequestRecord] = deque()
        for r in self._open:
            if r.status == "pending":
                still.append(r)
                continue
            ended += 1
            if r.status == "ok":
                prompt += r.prompt_tokens
                cached += r.cached_tokens
                met += (r.first_token - r.arrival <= self.slo.ttft_s
                        and request_tpot(r.first_token, r.finish, r.output_tokens) <= self.slo.tpot_s)
        self._open = still
        ready = [p for p in sim.pods if p.state == READY]
        stats = [p.stats() for p in ready]
        pools: dict[str, PoolState] = {k: PoolState() for k in self.catalogue.kinds}
        for p in sim.pods:
            pool = pools.setdefault(p.spec.accelerator.upper(), PoolState())
            if p.state == READY:
                pool.ready += 1
            elif p.state == STARTING:
                pool.starting += 1
            elif p.state == DRAINING:
                pool.draining += 1
        window = max(now - self._last, 1e-9) if self._last or now else self.interval_s
        self._last = now
        return Observation(
            now=now, window_s=window, arrivals=len(new), inputs=inputs, outputs=outputs,
            hit_rate=cached / prompt if prompt else 0.0,
            waiting_per_pod=sum(s.num_waiting for s in stats) / len(stats) if stats else 0.0,
            kv_usage=sum(s.kv_usage for s in stats) / len(stats) if stats else 0.0,
            attainment=met / ended if ended else math.nan, pools=pools,
        )

    def apply(self, sim: ClusterSim, want: Desired, obs: Observation, now: float) -> bool:
        changed = False
        for kind in sorted(set(want) | set(obs.pools)):
            target = max(0, int(want.get(kind, 0)))
            pods = [p for p in sim.pods if p.spec.accelerator.upper() == kind and p.state in (READY, STARTING)]
            if target > len(pods):
                if kind not in self.catalogue.prices:
                    raise ValueError(f"planner {self.planner.name} wants {kind}, which is not in the catalogue")
                for _ in range(target - len(pods)):
                    t = self.template
                    spec = PodSpec(sim.new_pod_name(), "both", kind, t.model_profile, t.tp, t.ep, t.max_num_seqs,
                                   t.max_num_batched_tokens, t.max_model_len, t.block_size)
                    sim.add_pod(spec, now, self.catalogue.startup_s.get(kind, 0.0))
                changed = True
            elif target < len(pods):
                for pod in self._drain_order(pods)[: len(pods) - target]:
                    sim.drain_pod(pod.name, now)
                changed = True
        return changed

    @staticmethod
    def _drain_order(pods: list[Pod]) -> list[Pod]:
        """Pods still starting (newest first) cost nothing to drop; then ready pods holding the fewest
        requests, so the drain is short."""
        starting = sorted((p for p in pods if p.state == STARTING), key=lambda p: -p.requested_at)
        ready = sorted((p for p in pods if p.state == READY), key=lambda p: (p.assigned, -p.index))
        return starting + ready


def live_pods(sim: ClusterSim) -> int:
    return sum(1 for p in sim.pods if p.state != RELEASED)


__all__ = [
    "PLANNERS", "PRICE_SOURCE", "Candidate", "Catalogue", "PlannerController", "live_pods", "parse_accelerators",
    "parse_planner_spec",
    "peak_rate", "plan_fleets", "run_planner", "search",
]


def peak_rate(reqs: list, window_s: float = 300.0) -> float:
    """The highest mean arrival rate over any ``window_s`` window starting at an arrival (req/s)."""
    times = [r.arrival for r in reqs]
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] < t - window_s:
            j += 1
        best = max(best, i - j + 1)
    return best / window_s


def plan_fleets(reqs: list, planner: str, catalogue: Catalogue, slo: SloTargets, model: str, goal: float,
                utilization: float = 0.8) -> tuple[str, int]:
    """(kind, pods) a replay starts with: static-peak's fleet for the trace's peak; for the others the size
    the cost model gives for the first five minutes (the same start for every planner of one kind)."""
    shape = LoadShape.from_lengths([r.input_length for r in reqs], [r.output_length for r in reqs])
    s = Slo(slo.ttft_s, slo.tpot_s, goal)
    planner = parse_planner_spec(planner).name
    if planner in ("kvswitch", "static-peak"):
        kind, cap = cheapest_kind(catalogue, model, shape, s)
    else:
        kind = catalogue.kinds[0]
        cap = pod_capacity(PodKind(kind, model), shape, s.ttft_s, s.tpot_s, s.goal)
    cap = cap if cap > 0 else 1e-3
    if planner == "static-peak":
        rate = peak_rate(reqs)
    else:
        first = [r for r in reqs if r.arrival <= reqs[0].arrival + 300.0]
        rate = len(first) / 300.0
    return kind, max(1, math.ceil(rate / (cap * utilization)))


def run_planner(reqs: list, planner_name: str, catalogue: Catalogue, slo: SloTargets, model: str,
                goal: float = 0.95, policy: str = "least-inflight", seed: int = 0, progress: bool = False,
                **engine: object) -> tuple[SimResult, float, PlannerController]:
    """Replay ``reqs`` with ``planner_name`` (a name, or ``NAME:KEY=VALUE,...`` with its knobs) in the loop;
    returns (SimResult, wall seconds, controller)."""
    import time

    from engine.sim.cluster.fleet import fleet_from_flags
    from engine.sim.cluster.progress import ReplayProgress
    from engine.sim.cluster.routers import make_router
    from engine.sim.cluster.simulator import trace_prompts
    start = time.perf_counter()
    kind, n = plan_fleets(reqs, planner_name, catalogue, slo, model, goal)
    planner = make_planner(planner_name, catalogue, model, Slo(slo.ttft_s, slo.tpot_s, goal), peak={kind: n})
    fleet = fleet_from_flags(n, kind, model, **engine)  # type: ignore[arg-type]
    sim = ClusterSim(fleet, lambda eps, clock: make_router(policy, eps, clock, seed=seed), seed=seed)
    ctl = PlannerController(planner, catalogue, slo, model, fleet.pods[0])
    sim.controller = ctl
    bar = ReplayProgress(planner_name, len(reqs), reqs[-1].arrival if reqs else 0.0) if progress else None
    sim.progress = bar
    try:
        res = sim.run(trace_prompts(reqs))
    finally:
        if bar is not None:
            bar.close()
    res.policy = planner_name
    return res, time.perf_counter() - start, ctl
