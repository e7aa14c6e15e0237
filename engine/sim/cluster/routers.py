"""Routers: who picks the pods in the cluster simulator, and the one seam between engine/ and pickers/.

This module is the virtual-time adapter: the only module under engine/ that imports pickers/. The rest of
the cluster simulator takes the picker's types it shares (Endpoint, Usage, SchedulingError, ManualClock)
from here, so the dependency runs one way through one place.

The simulator talks to one small ``Router`` protocol, so the built-in policies and the real picker
(pickers/, through ``SchedulerRouter``) plug in the same way. The simulator calls, in virtual time:

- ``route(req, now) -> (decode_pod, prefill_pod | None)`` when a request arrives (raise
  ``pickers.types.SchedulingError`` to reject it, e.g. admission's 429), or ``None`` to hold it (the
  picker's flow control): ``take_released()`` then hands back each held request with its route (or the
  ``SchedulingError`` that answers it), and the simulator asks after every event and at
  ``next_release_at()``;
- ``on_first_token(req, at)``, ``on_finished(req, usage, at)``, ``on_failed(req, reason, at)``;
- ``on_kv_events(pod, events, at)`` after every step that changed a pod's cache, if ``wants_kv_events``;
- ``on_metrics(pod, stats, at)`` every scrape interval, if ``wants_metrics`` (stale by design); a router
  that also has ``on_metrics_unchanged(pods, at)`` gets ``on_metrics`` only for pods whose load (running,
  waiting, KV usage, prefix counters, held blocks; ``EngineCore.load_version``) moved since their previous
  scrape, and one ``on_metrics_unchanged`` call naming the pods scraped at ``at`` whose load did not;
- ``on_pod_added(endpoint, at)`` when a pod added at run time is ready, ``on_pod_removed(pod, at)`` when a
  pod starts draining: from then on the router must not pick it (its in-flight requests still report);
  ``on_pod_released(pod, at)`` when the drained pod is gone.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from engine.sim.blockpool import KVEvent
from engine.sim.core import EngineStats
from pickers.clock import ManualClock
from pickers.config import ConfigError, build_scheduler
from pickers.datalayer.metrics import PodMetrics
from pickers.director import Director
from pickers.profiles import RANK_OBLIVIOUS  # re-exported: the simulator's rank-oblivious fleet view
from pickers.types import Decision, Endpoint, InferenceRequest, Role, SchedulingError, Usage
from pickers.warmup import Warmup, Warmups


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


@runtime_checkable
class Router(Protocol):
    name: str
    wants_kv_events: bool
    wants_metrics: bool

    def route(self, req: ClusterRequest, now: float) -> Route | None: ...
    def take_released(self) -> list[tuple[ClusterRequest, Route | SchedulingError]]: ...
    def next_release_at(self) -> float: ...
    def on_first_token(self, req: ClusterRequest, at: float) -> None: ...
    def on_finished(self, req: ClusterRequest, usage: Usage, at: float) -> None: ...
    def on_failed(self, req: ClusterRequest, reason: str, at: float) -> None: ...
    def on_kv_events(self, pod: str, events: list[KVEvent], at: float) -> None: ...
    def on_metrics(self, pod: str, stats: EngineStats, at: float) -> None: ...
    def on_pod_added(self, endpoint: Endpoint, at: float) -> None: ...
    def on_pod_removed(self, pod: str, at: float) -> None: ...
    def on_pod_released(self, pod: str, at: float) -> None: ...
    def take_warmups(self) -> list[Warmup]: ...
    def warmup_done(self, request_id: str, ok: bool) -> None: ...


class BaseRouter:
    """No-op hooks; subclasses implement ``route``."""

    name = "base"
    wants_kv_events = False
    wants_metrics = False

    def route(self, req: ClusterRequest, now: float) -> Route | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def take_released(self) -> list[tuple[ClusterRequest, Route | SchedulingError]]:
        return []

    def next_release_at(self) -> float:
        return math.inf

    def take_warmups(self) -> list[Warmup]:
        """Prefills the router sends on its own (pickers/warmup.py), since the simulator last asked."""
        return []

    def warmup_done(self, request_id: str, ok: bool) -> None:
        return None

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

    def on_pod_added(self, endpoint: Endpoint, at: float) -> None:
        return None

    def on_pod_removed(self, pod: str, at: float) -> None:
        return None

    def on_pod_released(self, pod: str, at: float) -> None:
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

    def on_pod_added(self, endpoint: Endpoint, at: float) -> None:
        if endpoint.role is Role.PREFILL:
            self._prefill.append(endpoint.address)
        elif endpoint.role.can_decode():
            self._decode.append(endpoint.address)

    def on_pod_removed(self, pod: str, at: float) -> None:
        for pods in (self._decode, self._prefill):
            if pod in pods:
                pods.remove(pod)

    def route(self, req: ClusterRequest, now: float) -> Route:
        if not self._decode:
            raise SchedulingError(503, "no pod can decode", "no_endpoints")
        d = self._decode[self._d % len(self._decode)]
        self._d += 1
        p = None
        if self._prefill:
            p = self._prefill[self._p % len(self._prefill)]
            self._p += 1
        return d, p


class LengthSplitRouter(BaseRouter):
    """Prompts longer than ``split_tokens`` go to pods of ``long_kind`` (or, given ``long_pods``, to those
    addresses: a split of one kind into two pools), the rest to the other pods; the pod with the fewest
    requests in flight within the group (ties: in turn). Without a split: least in flight over all pods. On a
    fleet with prefill pods every request also takes the prefill pod with the fewest prefills in flight
    (ties: in turn; a prefill counts until the request's first token or its end). The router a planned fleet
    (``kvswitch plan``: one pool, a length split or P/D pools) is replayed with."""

    name = "length-split"

    def __init__(self, endpoints: list[Endpoint], split_tokens: int | None = None, long_kind: str | None = None,
                 long_pods: frozenset[str] | None = None) -> None:
        self.split = split_tokens
        self.long_kind = (long_kind or "").upper()
        self.long_pods = long_pods
        self._kind: dict[str, str] = {}
        self._load: dict[str, int] = {}
        self._prefill: dict[str, int] = {}  # prefill pod -> prefills in flight
        self._turn = 0
        for e in endpoints:
            self.on_pod_added(e, 0.0)

    def on_pod_added(self, endpoint: Endpoint, at: float) -> None:
        if endpoint.role is Role.PREFILL:
            self._prefill.setdefault(endpoint.address, 0)
        elif endpoint.role.can_decode():
            self._kind[endpoint.address] = endpoint.accelerator.upper()
            self._load.setdefault(endpoint.address, 0)

    def on_pod_removed(self, pod: str, at: float) -> None:
        self._kind.pop(pod, None)
        self._prefill.pop(pod, None)

    @staticmethod
    def _least(pods: list[str], load: dict[str, int], turn: int) -> str:
        n = len(pods)
        return pods[min(range(n), key=lambda i: (load[pods[i]], (i - turn) % n))]

    def route(self, req: ClusterRequest, now: float) -> Route:
        pods = list(self._kind)
        if self.split is not None:
            want_long = len(req.prompt) > self.split
            if self.long_pods is not None:
                group = [p for p in pods if (p in self.long_pods) == want_long]
            else:
                group = [p for p in pods if (self._kind[p] == self.long_kind) == want_long]
            pods = group or pods
        if not pods:
            raise SchedulingError(503, "no pod can decode", "no_endpoints")
        self._turn += 1
        pod = self._least(pods, self._load, self._turn)
        self._load[pod] += 1
        req.state["pod"] = pod
        prefill = None
        if self._prefill:
            prefill = self._least(list(self._prefill), self._prefill, self._turn)
            self._prefill[prefill] += 1
            req.state["prefill_pod"] = prefill
        return pod, prefill

    def _prefilled(self, req: ClusterRequest) -> None:
        pod = req.state.pop("prefill_pod", None)
        if pod is not None and self._prefill.get(pod, 0) > 0:
            self._prefill[pod] -= 1

    def _done(self, req: ClusterRequest) -> None:
        self._prefilled(req)
        pod = req.state.pop("pod", None)
        if pod is not None and self._load.get(pod, 0) > 0:
            self._load[pod] -= 1

    def on_first_token(self, req: ClusterRequest, at: float) -> None:
        self._prefilled(req)

    def on_finished(self, req: ClusterRequest, usage: Usage, at: float) -> None:
        self._done(req)

    def on_failed(self, req: ClusterRequest, reason: str, at: float) -> None:
        self._done(req)


class SchedulerRouter(BaseRouter):
    """The picker itself (pickers.director.Director) deciding in virtual time.

    ``route`` calls the director's synchronous ``decide`` with the simulator's ManualClock; the hooks go to
    the director's on_served/on_first_token/on_finished/on_failed with its Decision. The simulator feeds
    the director's data layer directly, as pickers/datalayer documents: ``dl.metrics.update`` every scrape
    and ``dl.kv_index.apply_events`` after every step that changed a cache (the pool's own event records;
    only when a plugin reads KV events, ``director.uses_kv_events``, so pods skip building them otherwise).
    """

    def __init__(self, director: Director, name: str, clock: ManualClock, access_log: bool = False) -> None:
        self.director = director
        self.name = name
        self.clock = clock
        # ``access_log``: as behind Envoy in extproc's access-log mode, the director hears of a first token only
        # when the request ends (its first token then, with the real time), and meanwhile tracks the prefill by
        # prediction and KV events (pickers/kvblocks/prefill_watch.py)
        self.access_log = access_log
        if access_log:
            director.predicted_first_token = True
        self._metrics = director.dl.metrics
        self._kv_index = director.dl.kv_index
        self.wants_metrics = director.uses_metrics
        self.wants_kv_events = director.uses_kv_events
        # request id -> the decision's predicted (TTFT, TPOT) on the pods it chose (engine/sim/cluster/slo.py)
        self.predicted: dict[str, tuple[float, float]] = {}
        # held requests released (flow control) since the simulator last asked
        self._released: list[tuple[ClusterRequest, Route | SchedulingError]] = []
        # the picker's warm-up prefills: the simulator is their transport (it submits each to its pod)
        self.warmups = director.dl.warmups = Warmups(director.dl.inflight)

    def route(self, req: ClusterRequest, now: float) -> Route | None:
        ir = InferenceRequest(
            request_id=req.request_id, model=req.model, api="completions",
            prompt_token_ids=req.prompt, max_tokens=req.max_tokens, arrival=now,
            body_size=4 * len(req.prompt),
        )

        def release(result: Decision | SchedulingError) -> None:
            self._released.append((req, result if isinstance(result, SchedulingError) else self._routed(req, result)))

        decision = self.director.decide_or_hold(ir, release)
        return None if decision is None else self._routed(req, decision)

    def _routed(self, req: ClusterRequest, decision: Decision) -> Route:
        req.state["decision"] = decision
        exp = decision.state.expected
        if exp is not None:
            self.predicted[req.request_id] = (exp.ttft_s, exp.tpot_s)
        self.director.on_served(decision, decision.endpoints[0])
        return decision.endpoints[0], decision.prefill

    def take_released(self) -> list[tuple[ClusterRequest, Route | SchedulingError]]:
        self.director.dispatch_held()
        out, self._released = self._released, []
        return out

    def take_warmups(self) -> list[Warmup]:
        return self.warmups.take()

    def warmup_done(self, request_id: str, ok: bool) -> None:
        self.warmups.done(request_id, ok)

    def next_release_at(self) -> float:
        flow = self.director.flow
        return flow.next_deadline() if flow is not None and flow.queued else math.inf

    def on_first_token(self, req: ClusterRequest, at: float) -> None:
        if self.access_log:
            req.state["first_token_at"] = at  # reported with the end, as Envoy's access log does
            return
        d = req.state.get("decision")
        if d is not None:
            self.director.on_first_token(d, at)

    def on_finished(self, req: ClusterRequest, usage: Usage, at: float) -> None:
        d = req.state.pop("decision", None)
        if d is not None:
            first = req.state.pop("first_token_at", None)
            if first is not None:
                self.director.on_first_token(d, first)
            self.director.on_finished(d, usage, at)

    def on_failed(self, req: ClusterRequest, reason: str, at: float) -> None:
        d = req.state.pop("decision", None)
        if d is not None:
            self.director.on_failed(d, reason, at)

    def on_kv_events(self, pod: str, events: list[KVEvent], at: float) -> None:
        # The pool's event records are pickers.kvblocks.events' own types: handed over as they are.
        self._kv_index.apply_events(pod, events, now=at)

    def on_pod_added(self, endpoint: Endpoint, at: float) -> None:
        self.director.add_endpoint(endpoint)

    def on_pod_removed(self, pod: str, at: float) -> None:
        # the endpoint table's draining state: out of every decision now, its open requests still resolve
        self.director.dl.endpoints.drain(pod, math.inf)

    def on_pod_released(self, pod: str, at: float) -> None:
        self.director.remove_endpoint(pod)

    def on_metrics_unchanged(self, pods: list[str], at: float) -> None:
        """These pods were scraped at ``at`` and report what their previous scrape did: only its time moves."""
        touch = self._metrics.touch
        for pod in pods:
            touch(pod, at)

    def on_metrics(self, pod: str, stats: EngineStats, at: float) -> None:
        m = PodMetrics(
            waiting=float(stats.num_waiting), running=float(stats.num_running), kv_usage=float(stats.kv_usage),
            prefix_cache_queries=float(stats.prefix_queries), prefix_cache_hits=float(stats.prefix_hits),
            num_gpu_blocks=stats.num_gpu_blocks or None, block_size=stats.block_size or None,
        )
        self._metrics.update(pod, m, at)


# The peer emulations and baselines engine/sim/cluster/peers.py builds (``make_peer``), named here, where a
# router name is resolved, so the list of built-ins and the emulations' own check read one tuple.
PEERS = ("sglang:cache_aware", "vllm:cache_aware", "vllm:kv_aware", "tree:smallest")
BUILTIN = ("round-robin", "envoy:round_robin", *PEERS)


def scheduler_config(profile: str, config: dict[str, Any] | None = None,
                     scrape_interval: float = 0.05) -> dict[str, Any]:
    """The ``scheduler:`` section a picker profile runs with in virtual time: ``config`` (or, for a whole picker
    config file, its scheduler section) with ``profile`` (``picker:NAME`` for NAME) and the simulator's scrape
    interval unless the config sets one. What ``make_router`` builds, and what a check of a config ahead of the
    replays must build to refuse the same."""
    raw = dict(config or {})
    if isinstance(raw.get("scheduler"), dict):  # a whole picker config file: take its scheduler section
        raw = dict(raw["scheduler"])
    raw["profile"] = profile.removeprefix("picker:")
    dl = dict(raw.get("datalayer") or {})
    dl.setdefault("scrape_interval_ms", scrape_interval * 1000.0)
    raw["datalayer"] = dl
    return raw


def make_router(name: str, endpoints: list[Endpoint], clock: ManualClock, seed: int = 0,
                config: dict[str, Any] | None = None, scrape_interval: float = 0.05,
                access_log: bool = False) -> Router:
    """A router by policy name: ``round-robin`` (built in; alias ``envoy:round_robin``), a peer emulation
    (``sglang:cache_aware``, ``vllm:cache_aware``, ``vllm:kv_aware``, and the ``tree:smallest`` baseline:
    engine/sim/cluster/peers.py), or a picker
    profile (``default``, ``least-inflight`` (alias ``least-loaded``), ``load-only``, ``approximate``,
    ``precise``, ... or ``picker:NAME`` to force the picker's own profile of a built-in's name) built by
    ``pickers.config.build_scheduler`` in virtual time; ``access_log``: the picker hears of first tokens only
    at each request's end (``SchedulerRouter``), as behind Envoy in access-log mode."""
    if name in ("round-robin", "envoy:round_robin"):
        rr = RoundRobinRouter(endpoints)
        rr.name = name
        return rr
    if ":" in name and not name.startswith("picker:"):
        from engine.sim.cluster.peers import make_peer

        return make_peer(name, endpoints)
    if name == "least-loaded":
        name = "least-inflight"
    raw = scheduler_config(name, config, scrape_interval)
    # Plugins without a configured seed (max-score's tie-break, random pickers) seed themselves from the
    # random module when built: seed it for the build, so the same seed replays the same decisions.
    saved = random.getstate()
    random.seed(seed)
    try:
        director = build_scheduler(raw, endpoints, clock=clock, network=False)
    except ConfigError as exc:  # an unknown profile or a bad key
        raise ValueError(f"policy {name!r}: {exc}") from None
    finally:
        random.setstate(saved)
    return SchedulerRouter(director, name, clock, access_log)


__all__ = [
    "BUILTIN", "PEERS", "BaseRouter", "ClusterRequest", "Endpoint", "LengthSplitRouter", "ManualClock",
    "RANK_OBLIVIOUS", "Role", "RoundRobinRouter", "Route", "Router", "SchedulerRouter", "SchedulingError", "Usage",
    "Warmup", "make_router",
]
