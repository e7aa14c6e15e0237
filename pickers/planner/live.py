"""The live planner: the virtual-time planner's decisions, run on what the picker sees, every interval.

One planner, one cost model: each interval this module builds the same ``Observation`` the virtual-time
adapter builds (``engine/sim/cluster/autoscale.py``) from the picker's own data layer and traffic, and asks
the same ``KvswitchPlanner`` (forecast, cost-model capacity at the length tail, hysteresis, cooldown) for the
desired replicas per accelerator kind. What it observes:

- ``TrafficObserver`` (request hooks on the director): arrivals with their prompt lengths (tokens as routed)
  and output budgets (``max_tokens``), as the virtual-time adapter reports arrivals; cached prompt tokens of
  finished requests (the response's ``usage``); observed TTFT and TPOT, and the share of requests within
  both targets (a failed request counts as missed);
- the data layer: scraped waiting requests and KV usage of the pool's active pods, pods per kind that are
  routable (active), draining, and (from the target) requested but not routable yet (starting).

What it does with the decision:

- Prometheus gauges (always): ``kvswitch_planner_desired_replicas{role, accelerator}`` and the observations
  behind it, for KEDA / HPA to scale on (README, "Live planner");
- with a ``ScaleTarget`` (Kubernetes Deployments, or ``kvswitch up``'s own simulated fleet): scale up at once;
  scale down *drain-first*: the pods with the fewest in-flight requests leave every new decision at once
  (``EndpointTable.drain``) and are held out of discovery; each one's in-flight requests finish (bounded by
  ``drain_timeout_s``); only then the target releases that pod. A removed pod loses no request it was given.

Times: the clock is the director's (wall seconds); measured rates and latencies are divided by
``time_scale`` (wall seconds per pod second) so that simulated pods running slower or faster than real time
are planned in their own time, as the cost model is. Intervals, cooldowns and the start-up are wall seconds.
Everything kept is bounded: the length samples (deques), the first-token map (``max_open``), the drain log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from pickers.clock import Clock
from pickers.datalayer import DataLayer
from pickers.framework import ConfigError, Plugin
from pickers.planner.autoscale import Desired, KvswitchPlanner, Observation, PoolState, Slo
from pickers.planner.capacity import PodKind
from pickers.planner.catalogue import Catalogue
from pickers.planner.settings import PlannerSettings
from pickers.types import Decision, Role, Usage

log = logging.getLogger("kvswitch.planner")

ROLE = "both"  # the planner sizes aggregated pools (role both); P/D roles are not sized yet


# ---- what the traffic says ------------------------------------------------------------------------------
@dataclass(slots=True)
class TrafficWindow:
    """One interval of traffic, in pod time (latencies and the window divided by the time scale)."""

    window_s: float
    arrivals: int
    inputs: list[int]
    outputs: list[int]
    hit_rate: float
    attainment: float  # nan: nothing ended
    ttft_p90_s: float  # nan: no first token seen
    tpot_p90_s: float


class TrafficObserver(Plugin):
    """Request hooks that count arrivals and judge finished requests against the SLO (not a scheduling
    plugin: the director calls it through ``add_observer``)."""

    TYPE = "planner-observer"
    reads_metrics = False

    def __init__(self, slo: Slo, time_scale: float = 1.0, sample: int = 2048, max_open: int = 100_000,
                 default_output: int = 256) -> None:
        super().__init__()
        self.default_output = default_output  # a request without max_tokens (the director's default too)
        self.slo = slo
        self.time_scale = time_scale
        self.max_open = max_open
        self.arrivals = 0
        self.inputs: deque[int] = deque(maxlen=sample)
        self.outputs: deque[int] = deque(maxlen=sample)
        self.ttfts: deque[float] = deque(maxlen=sample)
        self.tpots: deque[float] = deque(maxlen=sample)
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.ended = 0
        self.met = 0
        self._first: dict[str, float] = {}  # request key -> first token time (bounded by max_open)
        self._prompt: dict[str, int] = {}  # request key -> prompt tokens as routed (bounded by max_open)

    def _prompt_tokens(self, decision: Decision) -> int:
        """The prompt's length as the picker knew it when routing (a stream without ``usage`` reports none)."""
        st = decision.state
        if st.tokens is not None:
            return int(st.tokens.size)
        if st.request.prompt_token_ids is not None:
            return len(st.request.prompt_token_ids)
        return self.dl.tokens.estimate(st.request)

    def on_routed(self, decision: Decision) -> None:
        """An arrival: its prompt length and its output budget (``max_tokens``) join the interval's sample at
        once, as the virtual-time adapter reports arrivals (a planner must not wait for requests to end)."""
        self.arrivals += 1
        prompt = self._prompt_tokens(decision)
        self.inputs.append(prompt)
        self.outputs.append(decision.request.max_tokens or self.default_output)
        if len(self._prompt) < self.max_open:
            self._prompt[decision.state.key] = prompt

    def on_first_token(self, decision: Decision, at: float) -> None:
        if len(self._first) < self.max_open:
            self._first.setdefault(decision.state.key, at)

    def on_finished(self, decision: Decision, usage: Usage | None, at: float) -> None:
        state = decision.state
        first = self._first.pop(state.key, at)
        routed_prompt = self._prompt.pop(state.key, 0)
        ttft = (first - state.arrival) / self.time_scale
        self.ttfts.append(ttft)
        ok = ttft <= self.slo.ttft_s
        if usage is not None:
            prompt = usage.prompt_tokens or routed_prompt
            self.prompt_tokens += prompt
            self.cached_tokens += min(usage.cached_tokens, prompt)
            if usage.completion_tokens >= 2:
                tpot = (at - first) / self.time_scale / (usage.completion_tokens - 1)
                self.tpots.append(tpot)
                ok = ok and tpot <= self.slo.tpot_s
        self.ended += 1
        self.met += ok

    def on_failed(self, decision: Decision, reason: str, at: float) -> None:
        self._first.pop(decision.state.key, None)
        self._prompt.pop(decision.state.key, None)
        self.ended += 1

    def take(self, window_wall_s: float) -> TrafficWindow:
        """The interval's traffic; counters start again (the length samples roll over intervals)."""
        w = TrafficWindow(
            window_s=max(window_wall_s, 1e-9) / self.time_scale, arrivals=self.arrivals,
            inputs=list(self.inputs), outputs=list(self.outputs),
            hit_rate=self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
            attainment=self.met / self.ended if self.ended else math.nan,
            ttft_p90_s=float(np.quantile(self.ttfts, 0.9)) if self.ttfts else math.nan,
            tpot_p90_s=float(np.quantile(self.tpots, 0.9)) if self.tpots else math.nan)
        self.arrivals = self.ended = self.met = 0
        self.prompt_tokens = self.cached_tokens = 0
        self.inputs.clear()
        self.outputs.clear()
        self.ttfts.clear()
        self.tpots.clear()
        return w


# ---- where decisions go --------------------------------------------------------------------------------
class ScaleTarget(Protocol):
    """What the planner scales: pods per accelerator kind (role both)."""

    async def requested(self, kind: str) -> int | None:
        """Pods of ``kind`` asked for and not released (routable, starting or draining); None: unknown."""
        ...

    async def scale(self, kind: str, replicas: int) -> None:
        """Ask for ``replicas`` pods of ``kind`` (up: new pods; down: only pods that are not routable yet)."""
        ...

    async def release(self, kind: str, address: str) -> None:
        """Remove the pod at ``address`` (already drained and idle, or past its drain deadline)."""
        ...

    async def close(self) -> None: ...

    def describe(self) -> str:
        """What it scales, for a log line."""
        ...


@dataclass(slots=True)
class DrainRecord:
    """One drain-first removal: what the pod held when it was taken out of routing, and how it ended."""

    address: str
    kind: str
    inflight_at_drain: int
    started_at: float
    waited_s: float = 0.0
    timed_out: bool = False
    released: bool = False


class PlannerMetrics:
    """The planner's Prometheus series (one set per registry)."""

    # registry id -> (the registry, its metrics): the registry is kept so that its id is never reused
    _by_registry: dict[int, tuple[CollectorRegistry, PlannerMetrics]] = {}

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.desired = Gauge("kvswitch_planner_desired_replicas",
                             "Replicas the live planner wants per pool (KEDA/HPA scale on this)",
                             ["role", "accelerator"], registry=r)
        self.replicas = Gauge("kvswitch_planner_replicas", "Pods per pool as the planner sees them, by state",
                              ["role", "accelerator", "state"], registry=r)
        self.arrival_rate = Gauge("kvswitch_planner_arrival_rate",
                                  "Requests per (pod) second over the last interval", registry=r)
        self.forecast_rate = Gauge("kvswitch_planner_forecast_rate",
                                   "Requests per (pod) second the planner plans for", registry=r)
        self.hit_rate = Gauge("kvswitch_planner_prefix_hit_rate",
                              "Share of prompt tokens served from prefix caches, last interval", registry=r)
        self.attainment = Gauge("kvswitch_planner_slo_attainment",
                                "Share of requests ended in the last interval within both targets", registry=r)
        self.ttft = Gauge("kvswitch_planner_observed_ttft_p90_seconds", "Observed TTFT p90, last interval",
                          registry=r)
        self.tpot = Gauge("kvswitch_planner_observed_tpot_p90_seconds", "Observed TPOT p90, last interval",
                          registry=r)
        self.waiting = Gauge("kvswitch_planner_waiting_per_pod", "Scraped waiting requests per active pod",
                             registry=r)
        self.decisions = Counter("kvswitch_planner_scaling_decisions_total",
                                 "Decisions that changed a pool's size", ["direction"], registry=r)
        self.drains = Counter("kvswitch_planner_drains_total",
                              "Drain-first removals by how the drain ended", ["outcome"], registry=r)
        self.drained_inflight = Counter("kvswitch_planner_drained_inflight_requests_total",
                                        "Requests in flight on pods when the planner took them out of routing "
                                        "(each finished before its pod was released, unless the drain timed out)",
                                        registry=r)
        self.errors = Counter("kvswitch_planner_target_errors_total",
                              "Failed calls to the scale target (retried next interval)", registry=r)

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None) -> PlannerMetrics:
        r = registry if registry is not None else REGISTRY
        got = cls._by_registry.get(id(r))
        if got is None:
            got = cls._by_registry[id(r)] = (r, cls(r))
        return got[1]


# ---- the loop ------------------------------------------------------------------------------------------
@dataclass(slots=True)
class PoolView:
    ready: list[str] = field(default_factory=list)  # routable pod addresses
    draining: list[str] = field(default_factory=list)


class LivePlanner:
    """``start()`` runs one decision per ``interval_s`` until ``stop()``; ``tick()`` is one decision (tests)."""

    def __init__(self, settings: PlannerSettings, dl: DataLayer, clock: Clock,
                 target: ScaleTarget | None = None, registry: CollectorRegistry | None = None,
                 poll_s: float = 0.05, max_drain_log: int = 256) -> None:
        self.settings = s = settings
        self.dl = dl
        self.clock = clock
        self.target = target
        self.poll_s = poll_s
        pods = self._pool_endpoints()
        k = s.target.kubernetes
        self.catalogue: Catalogue = s.catalogue([ep.accelerator for ep in pods]
                                                + ([d.accelerator for d in k.deployments] if k else []))
        model = s.model_profile or (pods[0].model_profile if pods else "llama-3.1-8b")
        for kind in self.catalogue.kinds:
            try:
                PodKind(kind, model).cost()
            except (KeyError, ValueError) as exc:
                raise ConfigError(f"planner: {model} on {kind}: {exc}") from None
        self.model = model
        self.slo = Slo(s.slo.ttft_ms / 1000.0, s.slo.tpot_ms / 1000.0, s.slo.goal)
        self.planner = KvswitchPlanner(self.catalogue, model, self.slo, interval_s=s.interval_s,
                                       utilization=s.utilization, down_after_s=s.down_after_s,
                                       cooldown_s=s.cooldown_s)
        self.observer = TrafficObserver(self.slo, s.time_scale)
        self.observer.bind(dl)
        self.metrics = PlannerMetrics.for_registry(registry)
        self.desired: Desired = {}
        self.drains: deque[DrainRecord] = deque(maxlen=max_drain_log)
        self._drain_tasks: dict[str, tuple[str, asyncio.Task[None]]] = {}  # address -> (kind, its drain)
        self._release_lock = asyncio.Lock()
        self._last_tick: float | None = None
        self._task: asyncio.Task[None] | None = None

    # ---- what the fleet looks like ----
    def _pool_endpoints(self) -> list[Any]:
        return [ep for ep in self.dl.endpoints.endpoints if ep is not None and ep.role is Role.BOTH]

    def pools(self) -> dict[str, PoolView]:
        """Pods (addresses) of role both per kind: routable, draining."""
        table = self.dl.endpoints
        out: dict[str, PoolView] = {k: PoolView() for k in self.catalogue.kinds}
        for address, slots in table.by_pod.items():
            ep = table.endpoints[slots[0]]
            if ep is None or ep.role is not Role.BOTH:
                continue
            view = out.setdefault(ep.accelerator.upper(), PoolView())
            (view.draining if table.is_draining(address) else view.ready).append(address)
        return out

    def pod_inflight(self, address: str) -> int:
        inf = self.dl.inflight
        return int(sum(inf.requests[s] for s in self.dl.endpoints.pod_slots(address)))

    def pod_busy(self, address: str) -> bool:
        table = self.dl.endpoints
        return any(table.busy(s) for s in table.pod_slots(address))

    async def observe(self, now: float) -> Observation:
        last = self._last_tick
        self._last_tick = now
        wall = now - last if last is not None else self.settings.interval_s
        w = self.observer.take(wall)
        views = self.pools()
        pools: dict[str, PoolState] = {}
        for kind, v in views.items():
            requested = await self.target.requested(kind) if self.target is not None else None
            # a pod whose drain is under way counts as draining until released, even once discovery reaped it
            ready, draining = len(v.ready), len(v.draining) + sum(
                1 for a, (k, _) in self._drain_tasks.items() if k == kind and a not in v.draining)
            starting = max(0, requested - ready - draining) if requested is not None else 0
            pools[kind] = PoolState(ready=ready, starting=starting, draining=draining)
        slots = np.array([s for v in views.values() for a in v.ready for s in self.dl.endpoints.pod_slots(a)],
                         dtype=np.int64)
        m = self.dl.metrics
        fresh = m.fresh(slots, now) if slots.size else np.zeros(0, dtype=bool)
        waiting = float(m.waiting[slots][fresh].mean()) if fresh.any() else 0.0
        kv = float(m.kv_usage[slots][fresh].mean()) if fresh.any() else 0.0
        mt = self.metrics
        mt.arrival_rate.set(w.arrivals / w.window_s)
        mt.hit_rate.set(w.hit_rate)
        mt.waiting.set(waiting)
        if w.attainment == w.attainment:
            mt.attainment.set(w.attainment)
        if w.ttft_p90_s == w.ttft_p90_s:
            mt.ttft.set(w.ttft_p90_s)
        if w.tpot_p90_s == w.tpot_p90_s:
            mt.tpot.set(w.tpot_p90_s)
        for kind, p in pools.items():
            for state in ("ready", "starting", "draining"):
                mt.replicas.labels(ROLE, kind, state).set(getattr(p, state))
        return Observation(now=now, window_s=w.window_s, arrivals=w.arrivals, inputs=w.inputs, outputs=w.outputs,
                           hit_rate=w.hit_rate, waiting_per_pod=waiting, kv_usage=kv, attainment=w.attainment,
                           pools=pools)

    def clamp(self, want: Desired) -> Desired:
        """``min_replicas`` / ``max_replicas`` per pool the planner uses (a kind it wants 0 of stays 0, unless no
        kind has any: then the cheapest kind gets ``min_replicas``)."""
        s = self.settings
        out = {k: (min(s.max_replicas, max(s.min_replicas, n)) if n > 0 else 0) for k, n in want.items()}
        if s.min_replicas > 0 and not any(out.values()):
            first = self.planner._kind or self.catalogue.kinds[0]
            out[first] = s.min_replicas
        return out

    async def tick(self) -> Desired:
        """One decision: observe, decide, publish, and (with a target) act. Returns the desired replicas."""
        now = self.clock.now()
        obs = await self.observe(now)
        want = self.planner.decide(obs)
        log.debug("planner tick: rate %.2f, %d inputs (mean %.0f), attainment %.2f, waiting %.1f, pools %s, "
                 "forecast %.2f -> %s", obs.rate, len(obs.inputs), float(np.mean(obs.inputs)) if obs.inputs else 0,
                 obs.attainment, obs.waiting_per_pod, obs.pools, self.planner.last_forecast, want)
        self.metrics.forecast_rate.set(self.planner.last_forecast)
        current = obs.current()
        desired = self.clamp(want if want is not None else current)
        for kind in set(desired) | set(self.desired):
            self.metrics.desired.labels(ROLE, kind).set(desired.get(kind, 0))
        if want is not None and desired != current:  # a change (hysteresis and cooldown passed)
            log.info("planner: forecast %.2f req/s, desired %s (have %s)", self.planner.last_forecast, desired,
                     current)
            if any(desired.get(k, 0) > current.get(k, 0) for k in desired):
                self.metrics.decisions.labels("up").inc()
            if any(desired.get(k, 0) < current.get(k, 0) for k in set(desired) | set(current)):
                self.metrics.decisions.labels("down").inc()
        self.desired = desired
        if self.target is not None:
            try:
                await self.apply(desired, obs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the API server is down, a pod would not start: try again next tick
                self.metrics.errors.inc()
                log.warning("planner: scaling to %s failed: %s", desired, exc)
        return desired

    async def apply(self, desired: Desired, obs: Observation) -> None:
        """Make the target hold ``desired``: start pods now; remove pods drain-first (starting ones first:
        they hold no request)."""
        assert self.target is not None
        views = self.pools()
        for kind in sorted(set(desired) | set(obs.pools)):
            pool = obs.pools.get(kind, PoolState())
            want, have = desired.get(kind, 0), pool.wanted
            if want > have:
                await self.target.scale(kind, want + pool.draining)
            elif want < have:
                extra = have - want
                drop_starting = min(extra, pool.starting)
                if drop_starting:
                    await self.target.scale(kind, have - drop_starting + pool.draining)
                for address in self.drain_order(views.get(kind, PoolView()).ready)[: extra - drop_starting]:
                    self.start_drain(kind, address)

    def drain_order(self, ready: list[str]) -> list[str]:
        """Pods to remove first: the fewest requests in flight (the shortest drain), then the newest."""
        table = self.dl.endpoints
        return sorted(ready, key=lambda a: (self.pod_inflight(a), -int(table.pod_group[table.pod_slots(a)[0]])))

    def start_drain(self, kind: str, address: str) -> DrainRecord:
        """Take ``address`` out of routing now; a task waits for its requests, then releases it."""
        table = self.dl.endpoints
        now = self.clock.now()
        deadline = now + self.settings.drain_timeout_s
        rec = DrainRecord(address, kind, self.pod_inflight(address), now)
        table.hold(address, deadline + max(60.0, self.settings.drain_timeout_s))
        table.drain(address, deadline)
        self.drains.append(rec)
        self.metrics.drained_inflight.inc(rec.inflight_at_drain)
        log.info("planner: draining %s (%s, %d in flight)", address, kind, rec.inflight_at_drain)
        self._drain_tasks[address] = (kind, asyncio.get_running_loop().create_task(
            self._finish_drain(rec, deadline), name=f"planner drain {address}"))
        return rec

    async def _finish_drain(self, rec: DrainRecord, deadline: float) -> None:
        table = self.dl.endpoints
        try:
            while self.pod_busy(rec.address) and self.clock.now() < deadline:
                await asyncio.sleep(self.poll_s)
            rec.timed_out = self.pod_busy(rec.address)
            rec.waited_s = self.clock.now() - rec.started_at
            assert self.target is not None
            async with self._release_lock:  # releases change the target's count one at a time
                await self.target.release(rec.kind, rec.address)
            rec.released = True
            for slot in list(table.pod_slots(rec.address)):
                ep = table.endpoints[slot]
                if ep is not None:
                    table.remove(ep.id)
            self.metrics.drains.labels("timeout" if rec.timed_out else "idle").inc()
            log.info("planner: released %s after %.2fs (%s)", rec.address, rec.waited_s,
                     "drain timed out" if rec.timed_out else "idle")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the pod stays drained (no new requests); the next decision sees it
            self.metrics.errors.inc()
            log.warning("planner: releasing %s failed: %s", rec.address, exc)
        finally:
            self._drain_tasks.pop(rec.address, None)

    # ---- lifecycle ----
    async def start(self) -> None:
        if self._task is None:
            self._last_tick = self.clock.now()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="live planner")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.interval_s)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # the API server is down (reading the target's size): decide again next time
                self.metrics.errors.inc()
                log.warning("planner: this interval's decision failed", exc_info=True)

    async def drained(self) -> None:
        """Wait for the drains in progress (tests, shutdown)."""
        while self._drain_tasks:
            await asyncio.gather(*[t for _, t in self._drain_tasks.values()], return_exceptions=True)

    async def stop(self) -> None:
        """Stop deciding; drains in progress are cancelled (their pods stay out of routing); close the target."""
        task, self._task = self._task, None
        tasks = [t for t in (task, *(t for _, t in self._drain_tasks.values())) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self.target is not None:
            await self.target.close()


__all__ = ["DrainRecord", "LivePlanner", "PlannerMetrics", "PoolView", "ScaleTarget", "TrafficObserver",
           "TrafficWindow"]
