"""Planners: observations of the last interval -> desired replicas per accelerator kind.

Each planner is pure (no clock, no I/O): ``decide(obs)`` gets what the data layer saw in the last interval
(arrivals, prompt and output lengths, prefix hit rate, queues, KV usage, SLO attainment of finished requests,
pods per kind by state) and returns the replicas it wants per kind, or None to leave the fleet as it is. The
caller (the virtual-time adapter, or the live loop) applies them drain-first. Pools are aggregated pods
(role "both"); planners compared:

- ``kvswitch``: forecasts the rate at now + start-up + interval (recent level plus trend), sizes pods with the
  cost-model capacity at the length distribution's tail (``capacity``), adds a pod when observed attainment
  falls below the goal with requests queueing; scales up at once, down only after the lower size held for
  ``down_after_s`` and ``cooldown_s`` after the last change (hysteresis), in one step to the new size.
- ``static-peak``: the cheapest static fleet that meets the SLO at the trace's peak (sized once, offline).
- ``queue-hpa``: KEDA/HPA on the llm-d metrics: desired = ceil(current x max(waiting per pod / target,
  KV usage / 0.8)), 10 % tolerance, 300 s scale-down stabilisation (HPA defaults), every 15 s.
- ``dynamo-throughput``: Dynamo's throughput planner every 180 s: next-interval rate = the last one's,
  replicas = ceil(prompt tokens/s / prefill tokens/s per pod at the mean input + output tokens/s / decode
  tokens/s per pod at the largest batch whose step meets the TPOT target), from mean lengths only.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from pickers.planner.capacity import LoadShape, PodKind, pod_capacity
from pickers.planner.catalogue import Catalogue

Desired = dict[str, int]  # accelerator kind -> replicas


@dataclass(slots=True)
class PoolState:
    """Pods of one kind right now."""

    ready: int = 0
    starting: int = 0
    draining: int = 0

    @property
    def wanted(self) -> int:
        """Pods that count toward the desired size (draining ones are on their way out)."""
        return self.ready + self.starting


@dataclass(slots=True)
class Observation:
    now: float
    window_s: float
    arrivals: int
    inputs: list[int]  # prompt lengths of the window's arrivals (a bounded sample)
    outputs: list[int]  # their output lengths
    hit_rate: float  # share of prompt tokens served from prefix caches, recent requests
    waiting_per_pod: float  # mean scraped waiting requests per ready pod
    kv_usage: float  # mean KV usage of ready pods, 0..1
    attainment: float  # share of the window's finished requests within both targets (nan: none finished)
    pools: dict[str, PoolState] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.arrivals / self.window_s if self.window_s > 0 else 0.0

    def current(self) -> Desired:
        return {k: p.wanted for k, p in self.pools.items()}


class Planner(Protocol):
    name: str
    interval_s: float

    def decide(self, obs: Observation) -> Desired | None: ...


@dataclass(slots=True)
class Slo:
    ttft_s: float
    tpot_s: float
    goal: float = 0.95


def cheapest_kind(catalogue: Catalogue, model: str, shape: LoadShape, slo: Slo) -> tuple[str, float]:
    """The kind with the lowest price per request/s of capacity, and that capacity (per pod)."""
    best: tuple[float, str, float] | None = None
    for kind in catalogue.kinds:
        pk = PodKind(kind, model)
        cap = pod_capacity(pk, shape, slo.ttft_s, slo.tpot_s, slo.goal)
        if cap <= 0:
            continue
        per = catalogue.price(kind) * pk.gpus / cap
        if best is None or per < best[0]:
            best = (per, kind, cap)
    if best is None:
        raise ValueError(f"no kind in {catalogue.kinds} meets TTFT {slo.ttft_s} s / TPOT {slo.tpot_s} s for this "
                         f"workload's prompts even alone")
    return best[1], best[2]


class StaticPlanner:
    """A fixed fleet: wants ``desired`` from the first tick on."""

    name = "static"

    def __init__(self, desired: Desired, interval_s: float = 60.0, name: str = "static") -> None:
        self.desired = dict(desired)
        self.interval_s = interval_s
        self.name = name

    def decide(self, obs: Observation) -> Desired | None:
        return dict(self.desired) if obs.current() != self.desired else None


class KvswitchPlanner:
    name = "kvswitch"

    def __init__(self, catalogue: Catalogue, model: str, slo: Slo, interval_s: float = 30.0,
                 utilization: float = 0.8, down_after_s: float = 480.0, cooldown_s: float = 300.0,
                 history: int = 40, sample: int = 4096) -> None:
        self.catalogue = catalogue
        self.model = model
        self.slo = slo
        self.interval_s = interval_s
        self.utilization = utilization  # plan each pod to this share of its SLO capacity
        self.down_after_s = down_after_s
        self.cooldown_s = cooldown_s
        self._rates: deque[tuple[float, float]] = deque(maxlen=history)
        self._inputs: deque[int] = deque(maxlen=sample)
        self._outputs: deque[int] = deque(maxlen=sample)
        self._lower_since: float | None = None
        self._last_change = -math.inf
        self._kind: str | None = None
        self.last_forecast = 0.0

    def forecast(self, now: float) -> float:
        """Rate expected at now + start-up + one interval: the recent level plus its trend, never below the
        recent level (so a falling rate is followed only through the down hysteresis)."""
        rates = list(self._rates)
        level = float(np.mean([r for _, r in rates[-4:]])) if rates else 0.0
        if len(rates) >= 6:
            t = np.array([a for a, _ in rates[-12:]])
            r = np.array([b for _, b in rates[-12:]])
            slope = float(np.polyfit(t - t[-1], r, 1)[0])
        else:
            slope = 0.0
        startup = max(self.catalogue.startup_s.values()) if self.catalogue.startup_s else 0.0
        return max(level, level + slope * (startup + 2 * self.interval_s))

    def decide(self, obs: Observation) -> Desired | None:
        self._rates.append((obs.now, obs.rate))
        self._inputs.extend(obs.inputs)
        self._outputs.extend(obs.outputs)
        if not self._inputs:
            return None
        shape = LoadShape.from_lengths(list(self._inputs), list(self._outputs), obs.hit_rate)
        if self._kind is None:
            self._kind, _ = cheapest_kind(self.catalogue, self.model, shape, self.slo)
        kind = self._kind
        cap = pod_capacity(PodKind(kind, self.model), shape, self.slo.ttft_s, self.slo.tpot_s, self.slo.goal)
        rate = self.forecast(obs.now)
        self.last_forecast = rate
        want = max(1, math.ceil(rate / (cap * self.utilization))) if cap > 0 else 1
        cur = obs.current()
        have = cur.get(kind, 0)
        if obs.attainment == obs.attainment and obs.attainment < self.slo.goal and obs.waiting_per_pod >= 1.0:
            want = max(want, have + 1)  # the model was optimistic: the fleet says so
        if want > have:
            self._lower_since = None
            self._last_change = obs.now
            return {**{k: 0 for k in cur}, kind: want}
        if want < have:
            if self._lower_since is None:
                self._lower_since = obs.now
            held = obs.now - self._lower_since >= self.down_after_s
            if held and obs.now - self._last_change >= self.cooldown_s:
                self._lower_since = None
                self._last_change = obs.now
                return {**{k: 0 for k in cur}, kind: want}
            return None
        self._lower_since = None
        return None


class QueueHpaPlanner:
    name = "queue-hpa"

    def __init__(self, kind: str, interval_s: float = 15.0, target_waiting: float = 5.0, kv_target: float = 0.8,
                 tolerance: float = 0.1, stabilization_s: float = 300.0) -> None:
        self.kind = kind
        self.interval_s = interval_s
        self.target_waiting = target_waiting
        self.kv_target = kv_target
        self.tolerance = tolerance
        self.stabilization_s = stabilization_s
        self._recent: deque[tuple[float, int]] = deque(maxlen=256)

    def decide(self, obs: Observation) -> Desired | None:
        have = obs.current().get(self.kind, 0)
        ready = obs.pools.get(self.kind, PoolState()).ready or 1
        ratio = max(obs.waiting_per_pod / self.target_waiting, obs.kv_usage / self.kv_target)
        want = have if abs(ratio - 1.0) <= self.tolerance else max(1, math.ceil(ready * ratio))
        self._recent.append((obs.now, want))
        while self._recent and self._recent[0][0] < obs.now - self.stabilization_s:
            self._recent.popleft()
        if want < have:  # scale down only to the highest recommendation of the stabilisation window
            want = max(w for _, w in self._recent)
        return {self.kind: want} if want != have else None


class DynamoThroughputPlanner:
    name = "dynamo-throughput"

    def __init__(self, kind: str, model: str, slo: Slo, interval_s: float = 180.0) -> None:
        self.kind = kind
        self.model = model
        self.slo = slo
        self.interval_s = interval_s

    def decide(self, obs: Observation) -> Desired | None:
        if not obs.inputs:
            return None
        cost = PodKind(self.kind, self.model).cost()
        mean_in = float(np.mean(obs.inputs)) * (1.0 - obs.hit_rate)
        mean_out = float(np.mean(obs.outputs)) if obs.outputs else 1.0
        prefill_tps = max(1.0, mean_in) / cost.prefill_time(max(1, int(mean_in)))
        ctx = int(np.mean(obs.inputs) + mean_out / 2)
        best = 0.0
        b = 1
        while b <= 1024:
            step = cost.decode_step_time(b, b * ctx)
            if step > self.slo.tpot_s or b * ctx > cost.kv_capacity_tokens:
                break
            best = b / step
            b *= 2
        decode_tps = max(best, 1e-9)
        rate = obs.rate  # the constant predictor: the next interval looks like the last
        want = max(1, math.ceil(rate * mean_in / prefill_tps + rate * mean_out / decode_tps))
        return {self.kind: want} if want != obs.current().get(self.kind, 0) else None


PLANNERS = ("kvswitch", "static-peak", "queue-hpa", "dynamo-throughput")


def make_planner(name: str, catalogue: Catalogue, model: str, slo: Slo, peak: Desired | None = None) -> Planner:
    """A planner by name; ``static-peak`` needs ``peak`` (its fixed fleet, sized offline)."""
    first = catalogue.kinds[0]
    if name == "kvswitch":
        return KvswitchPlanner(catalogue, model, slo)
    if name == "static-peak":
        if peak is None:
            raise ValueError("static-peak needs the peak fleet")
        return StaticPlanner(peak, name="static-peak")
    if name == "queue-hpa":
        return QueueHpaPlanner(first)
    if name == "dynamo-throughput":
        return DynamoThroughputPlanner(first, model, slo)
    raise ValueError(f"unknown planner {name!r}; known: {', '.join(PLANNERS)}")


__all__ = [
    "PLANNERS", "Desired", "DynamoThroughputPlanner", "KvswitchPlanner", "Observation", "Planner", "PoolState",
    "QueueHpaPlanner", "Slo", "StaticPlanner", "cheapest_kind", "make_planner",
]
