"""Planners: observations of the last interval -> desired replicas per accelerator kind.

Each planner is pure (no clock, no I/O): ``decide(obs)`` gets what the data layer saw in the last interval
(arrivals, prompt and output lengths, prefix hit rate, queues, KV usage, SLO attainment of finished requests,
pods per kind by state) and returns the replicas it wants per kind, or None to leave the fleet as it is. The
caller (the virtual-time adapter, or the live loop) applies them drain-first. Pools are aggregated pods
(role "both"); planners compared:

- ``kvswitch``: forecasts the rate at now + start-up + interval from a robust line through recent rates
  (``KvswitchPlanner.trend``: bursts shorter than about half the start-up move nothing, steps are not
  extrapolated as ramps), sizes pods with the cost-model capacity at the length distribution's tail
  (``capacity``), adds one pod when observed attainment falls below the goal with requests queueing at a load
  the ready pods should carry; scales up at once, down only after the lower size held for ``down_after_s``
  (two intervals on a steady fall) and ``cooldown_s`` after the last change, in one step to the new size.
- ``static-peak``: the cheapest static fleet that meets the SLO at the trace's peak (sized once, offline).
- ``queue-hpa``: KEDA/HPA on the llm-d metrics: desired = ceil(current x max(waiting per pod / target,
  KV usage / 0.8)), 10 % tolerance, 300 s scale-down stabilisation (HPA defaults), every 15 s.
- ``dynamo-throughput``: Dynamo's throughput planner every 180 s: next-interval rate = the last one's,
  replicas = ceil((prompt tokens/s / prefill tokens/s per pod at the mean input + output tokens/s / decode
  tokens/s per pod at the largest batch whose step meets the TPOT target) / utilization), from mean lengths
  only; ``utilization`` (default 1) is the headroom knob for a fair comparison at equal attainment.

``make_planner`` takes a name or a ``PlannerSpec`` (``NAME:KEY=VALUE,...``, ``parse_planner_spec``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
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


@dataclass(frozen=True, slots=True)
class Trend:
    """A robust line through recent rates: ``slope`` (req/s per s), ``level`` (req/s at the last point) and
    ``falling`` (the share of pairwise slopes below zero, Kendall-style: 0.5 is noise, 1 a steady fall)."""

    slope: float = 0.0
    level: float = 0.0
    falling: float = 0.5


def theil_sen(times: Sequence[float], rates: Sequence[float]) -> Trend:
    """The Theil-Sen line through (time, rate): the median of the pairwise slopes, and the median of the
    points moved along it to the last time. Robust: points that are less than about 29 % of the window (a
    burst, a lull) move neither, where a least-squares fit follows them."""
    n = len(times)
    if n == 0:
        return Trend()
    last = times[-1]
    pairs = [(rates[j] - rates[i]) / (times[j] - times[i])
             for i in range(n) for j in range(i + 1, n) if times[j] > times[i]]
    slope = float(np.median(pairs)) if pairs else 0.0
    level = float(np.median([r - slope * (t - last) for t, r in zip(times, rates, strict=True)]))
    return Trend(slope, level, sum(1 for x in pairs if x < 0) / len(pairs) if pairs else 0.5)


class KvswitchPlanner:
    """Forecast, size with the cost model, scale up at once and down with hysteresis (see the module doc).

    The forecast is a robust line through the recent rates (``trend``: Theil-Sen slope over the last
    ``trend_window`` intervals, level from the last start-up's worth of them), read at now + start-up + one
    interval: it follows the day's rise and fall but not a burst shorter than about half the start-up, which
    pods that serve only after the start-up could not catch anyway. A pod is
    added when the fleet misses the goal with requests queueing at a load its ready pods should carry (the
    interval's rate within their cost-model capacity) and no pod still starting (the last one has not had
    its chance to help yet: one correction at a time): the model was optimistic. Above that capacity the
    miss is a burst above the trend (the trend itself is sized by the forecast), and a pod bought for it
    would serve after the start-up, most likely after the burst.
    A lower size must hold ``down_after_s`` before a scale-down, or only two intervals when the rate falls
    steadily (at least ``falling_share`` of the pairwise slopes negative): the lower size then fits all the
    start-up ahead, so a pod removed would not be needed again before a new one could serve; on a plateau
    the long hold keeps noise from flapping the fleet.
    """

    name = "kvswitch"

    def __init__(self, catalogue: Catalogue, model: str, slo: Slo, interval_s: float = 30.0,
                 utilization: float = 0.8, down_after_s: float = 480.0, cooldown_s: float = 300.0,
                 history: int = 40, sample: int = 4096, trend_window: int = 12, falling_share: float = 0.7,
                 off_line: float = 0.25) -> None:
        if not 0 < utilization <= 1:
            raise ValueError(f"utilization must be in (0, 1], got {utilization}")
        if trend_window < 3 or history < trend_window:
            raise ValueError("trend_window must be >= 3 and <= history")
        self.catalogue = catalogue
        self.model = model
        self.slo = slo
        self.interval_s = interval_s
        self.utilization = utilization  # plan each pod to this share of its SLO capacity
        self.down_after_s = down_after_s
        self.cooldown_s = cooldown_s
        self.trend_window = trend_window
        self.falling_share = falling_share
        self.off_line = off_line
        self._rates: deque[tuple[float, float]] = deque(maxlen=history)
        self._inputs: deque[int] = deque(maxlen=sample)
        self._outputs: deque[int] = deque(maxlen=sample)
        self._lower_since: float | None = None
        self._last_change = -math.inf
        self._kind: str | None = None
        self.last_forecast = 0.0
        self.last_trend = Trend()

    @property
    def startup_s(self) -> float:
        return max(self.catalogue.startup_s.values()) if self.catalogue.startup_s else 0.0

    def trend(self) -> Trend:
        """The robust line through the recent rates: its slope from the last ``trend_window`` intervals (none
        before 8: too few points to tell a trend from noise); its level from the last start-up's worth of
        intervals (at least 2), each moved along the slope to now, their median. A change that has lasted
        less than about half the start-up does not move the level: a pod bought for it would serve after
        the start-up, when such a change has most likely passed; with a short start-up it follows at once.
        When that level leaves the line by more than ``off_line`` of it, the rates are not a line (a step
        or a burst the level follows): no slope then, so a step is not extrapolated as a ramp."""
        rates = list(self._rates)[-self.trend_window:]
        if not rates:
            return Trend()
        tr = theil_sen([t for t, _ in rates], [r for _, r in rates]) if len(rates) >= 8 else Trend()
        recent = rates[-min(len(rates), max(2, round(self.startup_s / self.interval_s))):]
        last = rates[-1][0]
        level = float(np.median([r + tr.slope * (last - t) for t, r in recent]))
        if len(rates) >= 8 and abs(level - tr.level) > self.off_line * max(tr.level, 1e-9):
            return Trend(0.0, float(np.median([r for _, r in recent])), 0.5)
        return Trend(tr.slope, level, tr.falling)

    def forecast(self, now: float) -> float:
        """Rate expected at now + start-up + one interval (when a pod bought now has served one interval),
        never below the robust level: a falling rate is followed through the down hold."""
        tr = self.last_trend = self.trend()
        return max(tr.level, tr.level + tr.slope * (self.startup_s + self.interval_s))

    def pods_for(self, rate: float, cap: float) -> int:
        return max(1, math.ceil(rate / (cap * self.utilization))) if cap > 0 else 1

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
        want = self.pods_for(rate, cap)
        cur = obs.current()
        have = cur.get(kind, 0)
        pool = obs.pools.get(kind, PoolState(ready=have))
        if (obs.attainment == obs.attainment and obs.attainment < self.slo.goal and obs.waiting_per_pod >= 1.0
                and obs.rate <= pool.ready * cap and pool.starting == 0):
            want = max(want, have + 1)  # the model was optimistic at a load it says the pods carry
        if want > have:
            self._lower_since = None
            self._last_change = obs.now
            return {**{k: 0 for k in cur}, kind: want}
        if want < have:
            if self._lower_since is None:
                self._lower_since = obs.now
            falling = self.last_trend.falling >= self.falling_share
            hold = min(self.down_after_s, 2 * self.interval_s) if falling else self.down_after_s
            held = obs.now - self._lower_since >= hold
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

    def __init__(self, kind: str, model: str, slo: Slo, interval_s: float = 180.0, utilization: float = 1.0) -> None:
        if not 0 < utilization <= 1:
            raise ValueError(f"utilization must be in (0, 1], got {utilization}")
        self.kind = kind
        self.model = model
        self.slo = slo
        self.interval_s = interval_s
        # the share of the profiled per-pod throughput it plans for (1: Dynamo's formula as is; lower: headroom,
        # what sizing for a tighter TTFT/ITL target than the real one amounts to)
        self.utilization = utilization

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
        busy = rate * mean_in / prefill_tps + rate * mean_out / decode_tps  # pods' worth of work at 100 %
        want = max(1, math.ceil(busy / self.utilization - 1e-9))
        return {self.kind: want} if want != obs.current().get(self.kind, 0) else None


PLANNERS = ("kvswitch", "static-peak", "queue-hpa", "dynamo-throughput")
_OPTIONS = {"kvswitch": ("utilization",), "dynamo-throughput": ("utilization", "interval_s")}


@dataclass(frozen=True, slots=True)
class PlannerSpec:
    """A planner by name with its knobs: ``dynamo-throughput:utilization=0.6,interval_s=60`` on the command
    line (``label`` is that text, so several settings of one planner can run side by side)."""

    name: str
    options: tuple[tuple[str, float], ...] = ()

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v:g}" for k, v in self.options)
        return f"{self.name}:{opts}" if opts else self.name


def parse_planner_spec(text: str) -> PlannerSpec:
    """``NAME[:KEY=VALUE,...]`` -> PlannerSpec; a clear error on an unknown planner, knob or value."""
    name, colon, rest = text.strip().partition(":")
    name = name.strip()
    if name not in PLANNERS:
        raise ValueError(f"unknown planner {name!r}; known: {', '.join(PLANNERS)}")
    opts: dict[str, float] = {}
    for item in filter(None, (x.strip() for x in rest.split(","))) if rest else ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in _OPTIONS.get(name, ()):
            known = ", ".join(_OPTIONS.get(name, ())) or "none"
            raise ValueError(f"planner {name}: unknown option {key!r} (known: {known})")
        try:
            v = float(value) if sep else math.nan
        except ValueError:
            v = math.nan
        if not (v > 0 and math.isfinite(v)) or (key == "utilization" and v > 1):
            raise ValueError(f"planner {name}: {key} must be a number in (0, 1]" if key == "utilization"
                             else f"planner {name}: {key} must be a positive number, got {value!r}")
        opts[key] = v
    if colon and not opts:
        raise ValueError(f"planner {name}: empty option list after ':'")
    return PlannerSpec(name, tuple(sorted(opts.items())))


def make_planner(name: str | PlannerSpec, catalogue: Catalogue, model: str, slo: Slo,
                 peak: Desired | None = None) -> Planner:
    """A planner by name or spec; ``static-peak`` needs ``peak`` (its fixed fleet, sized offline)."""
    spec = name if isinstance(name, PlannerSpec) else parse_planner_spec(name)
    opts = dict(spec.options)
    first = catalogue.kinds[0]
    if spec.name == "kvswitch":
        return KvswitchPlanner(catalogue, model, slo, **opts)  # type: ignore[arg-type]
    if spec.name == "static-peak":
        if peak is None:
            raise ValueError("static-peak needs the peak fleet")
        return StaticPlanner(peak, name="static-peak")
    if spec.name == "queue-hpa":
        return QueueHpaPlanner(first)
    return DynamoThroughputPlanner(first, model, slo, **opts)


__all__ = [
    "PLANNERS", "Desired", "DynamoThroughputPlanner", "KvswitchPlanner", "Observation", "Planner", "PlannerSpec",
    "PoolState", "QueueHpaPlanner", "Slo", "StaticPlanner", "Trend", "cheapest_kind", "make_planner",
    "parse_planner_spec", "theil_sen",
]
