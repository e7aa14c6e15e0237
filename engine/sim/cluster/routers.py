"""Routers: who picks the pods in the cluster simulator.

The simulator talks to one small ``Router`` protocol, so the built-in policies and the real picker
(pickers/, through ``SchedulerRouter``) plug in the same way. The simulator calls, in virtual time:

- ``route(req, now) -> (decode_pod, prefill_pod | None)`` when a request arrives (raise
  ``pickers.types.SchedulingError`` to reject it, e.g. admission's 429);
- ``on_first_token(req, at)``, ``on_finished(req, usage, at)``, ``on_failed(req, reason, at)``;
- ``on_kv_events(pod, events, at)`` after every step that changed a pod's cache, if ``wants_kv_events``;
- ``on_metrics(pod, stats, at)`` every scrape interval, if ``wants_metrics`` (stale by design).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from engine.sim.blockpool import KVEvent
from engine.sim.core import EngineStats
from pickers.clock import ManualClock
from pickers.types import Decision, Endpoint, InferenceRequest, Role, Usage


@dataclass(slots=True)
class ClusterRequest:
    """A request as the simulator routes it."""

    request_id: str
    arrival: float
    prompt: np.ndarray
    max_tokens: int
    model: str = "sim"
    hash_ids: Sequence[int] = ()
    state: dict[str, Any] = field(default_factory=dict)  # a router's own per-request data


Route = tuple[str, "str | None"]


class Router(Protocol):
    name: str
    wants_kv_events: bool
    wants_metrics: bool

    def route(self, req: ClusterRequest, now: float) -> Route: ...
    def on_first_token(self, req: ClusterRequest, at: float) -> None: ...
    def on_finished(self, req: ClusterRequest, usage: Usage, at: float) -> None: ...
    def on_failed(self, req: ClusterRequest, reason: str, at: float) -> None: ...
    def on_kv_events(self, pod: str, events: list[KVEvent], at: float) -> None: ...
    def on_metrics(self, pod: str, stats: EngineStats, at: float) -> None: ...


class BaseRouter:
    """No-op hooks; subclasses implement ``route``."""

    name = "base"
    wants_kv_events = False
    wants_metrics = False

    def route(self, req: ClusterRequest, now: float) -> Route:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_first_token(self, req: ClusterRequest, at: float) -> None:
        return None

    def on_finished(self, req: ClusterRequest, usage: Usage, at: float) -> None:
        return None

    def on_failed(self, req: ClusterRequest, reason: str, at: float) -> None:
        return None

    def on_kv_events(self, pod: str, events: list[KVEvent], at: float) -> None:
        return None

    def on_metrics(self, pod: str, stats: EngineStats, at: float) -> None:
        return None


class RoundRobinRouter(BaseRouter):
    """Decode pods in turn; on a P/D fleet every request also takes the next prefill pod in turn."""

    name = "round-robin"

    def __init__(self, endpoints: list[Endpoint]) -> None:
        self._decode = [e.address for e in endpoints if e.role.can_decode() and e.role is not Role.BOTH] or [
            e.address for e in endpoints if e.role.can_decode()
        ]
        self._prefill = [e.address for e in endpoints if e.role is Role.PREFILL]
        if not self._decode:
            raise ValueError("round-robin needs at least one decode-capable pod")
        self._d = 0
        self._p = 0

    def route(self, req: ClusterRequest, now: float) -> Route:
        d = self._decode[self._d % len(self._decode)]
        self._d += 1
        p = None
        if self._prefill:
            p = self._prefill[self._p % len(self._prefill)]
            self._p += 1
        return d, p


def _run_sync(coro: Any) -> Any:
    """Drive a coroutine that never really awaits (a scheduler's ``schedule``) to its result."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError("the scheduler awaited something; the simulator needs a synchronous decision")


class SchedulerRouter(BaseRouter):
    """Adapter for any pickers scheduler: sync ``decide(request)`` or async ``schedule(request)``.

    Hooks go to the scheduler's on_served/on_first_token/on_finished/on_failed with its Decision. If the
    scheduler exposes its data layer (``.dl``), the simulator feeds it directly, as documented in
    pickers/datalayer: ``dl.metrics.update(addr, PodMetrics(...), at)`` every scrape and
    ``dl.kv_index.apply_events(addr, events, now=at)`` after every step that changed a cache (the pool's own
    event records; only when the scheduler reads KV events, ``scheduler.uses_kv_events``).
    """

    def __init__(self, scheduler: Any, name: str, clock: ManualClock) -> None:
        self.scheduler = scheduler
        self.name = name
        self.clock = clock
        decide = getattr(scheduler, "decide", None)
        self._decide: Callable[[InferenceRequest], Decision] = (
            decide if callable(decide) else (lambda r: _run_sync(scheduler.schedule(r)))
        )
        dl = next((getattr(scheduler, a) for a in ("dl", "datalayer", "data_layer")
                   if getattr(scheduler, a, None) is not None), None)
        self._metrics_store = getattr(dl, "metrics", None) if dl is not None else None
        self._kv_index = getattr(dl, "kv_index", None) if dl is not None else None
        self.wants_metrics = callable(getattr(self._metrics_store, "update", None))
        # KV events only for a scheduler that reads them (the pods then skip building them altogether)
        self.wants_kv_events = (callable(getattr(self._kv_index, "apply_events", None))
                                and bool(getattr(scheduler, "uses_kv_events", True)))
        if self.wants_metrics:
            from pickers.datalayer.metrics import PodMetrics

            self._pod_metrics = PodMetrics

    def route(self, req: ClusterRequest, now: float) -> Route:
        ir = InferenceRequest(
            request_id=req.request_id, model=req.model, api="completions",
            prompt_token_ids=req.prompt.tolist(), max_tokens=req.max_tokens, arrival=now,
            body_size=4 * len(req.prompt),
        )
        decision = self._decide(ir)
        req.state["decision"] = decision
        self.scheduler.on_served(decision, decision.endpoints[0])
        return decision.endpoints[0], decision.prefill

    def on_first_token(self, req: ClusterRequest, at: float) -> None:
        d = req.state.get("decision")
        if d is not None:
            self.scheduler.on_first_token(d, at)

    def on_finished(self, req: ClusterRequest, usage: Usage, at: float) -> None:
        d = req.state.pop("decision", None)
        if d is not None:
            self.scheduler.on_finished(d, usage, at)

    def on_failed(self, req: ClusterRequest, reason: str, at: float) -> None:
        d = req.state.pop("decision", None)
        if d is not None:
            self.scheduler.on_failed(d, reason, at)

    def on_kv_events(self, pod: str, events: list[KVEvent], at: float) -> None:
        # The pool's event records have the fields and class names of pickers.kvblocks.events' own: handed
        # over as they are, without the wire-format (map) round trip.
        self._kv_index.apply_events(pod, events, now=at)  # type: ignore[union-attr]

    def on_metrics(self, pod: str, stats: EngineStats, at: float) -> None:
        m = self._pod_metrics(
            waiting=float(stats.num_waiting), running=float(stats.num_running), kv_usage=float(stats.kv_usage),
            prefix_cache_queries=float(stats.prefix_queries), prefix_cache_hits=float(stats.prefix_hits),
        )
        self._metrics_store.update(pod, m, at)  # type: ignore[union-attr]


BUILTIN = ("round-robin", "least-inflight", "envoy:round_robin", "least-loaded", "sglang:cache_aware",
           "vllm:cache_aware", "vllm:kv_aware")


def make_router(name: str, endpoints: list[Endpoint], clock: ManualClock, seed: int = 0,
                config: dict[str, Any] | None = None, scrape_interval: float = 0.05) -> Router:
    """A router by policy name: a built-in (``round-robin`` alias ``envoy:round_robin``, ``least-inflight``
    alias ``least-loaded``), a peer emulation (``sglang:cache_aware``, ``vllm:cache_aware``, ``vllm:kv_aware``:
    engine/sim/cluster/peers.py), or a picker profile
    (``default``, ``load-only``, ``approximate``, ``precise``, ... or ``picker:NAME`` to force the picker's
    own profile of a built-in's name) built by ``pickers.config.build_scheduler`` in virtual time."""
    if name in ("round-robin", "envoy:round_robin"):
        rr = RoundRobinRouter(endpoints)
        rr.name = name
        return rr
    if ":" in name and not name.startswith("picker:"):
        from engine.sim.cluster.peers import make_peer

        return make_peer(name, endpoints)
    if name in ("least-inflight", "least-loaded"):
        from pickers.simple import LeastInFlight

        decoders = [e for e in endpoints if e.role.can_decode()]
        return SchedulerRouter(LeastInFlight(decoders, clock=clock, seed=seed), name, clock)
    try:
        from pickers.config import build_scheduler
    except ImportError:
        raise ValueError(
            f"unknown policy {name!r}: built-in policies are {', '.join(BUILTIN)}; picker profiles need "
            "pickers.config.build_scheduler, which is not available"
        ) from None
    raw = dict(config or {})
    if isinstance(raw.get("scheduler"), dict):  # a whole picker config file: take its scheduler section
        raw = dict(raw["scheduler"])
    raw["profile"] = name.removeprefix("picker:")
    dl = dict(raw.get("datalayer") or {})
    dl.setdefault("scrape_interval_ms", scrape_interval * 1000.0)
    raw["datalayer"] = dl
    try:
        scheduler = build_scheduler(raw, endpoints, clock=clock, network=False)
    except ValueError as exc:  # ConfigError: an unknown profile or a bad key
        raise ValueError(f"policy {name!r}: {exc}") from None
    return SchedulerRouter(scheduler, name, clock)


__all__ = [
    "BUILTIN", "BaseRouter", "ClusterRequest", "RoundRobinRouter", "Route", "Router", "SchedulerRouter",
    "make_router",
]
