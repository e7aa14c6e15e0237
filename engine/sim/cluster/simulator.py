"""The virtual-time discrete-event cluster simulator.

One heap of ``(time, seq, kind, pod, payload)`` events and a ``ManualClock`` set to each event's time.
Arrivals come from the (sorted) trace without going through the heap; pod step ends and pod timers
(``EngineCore.next_event_time``) go through it; metric scrapes tick at a fixed interval while there is
work left, so the router sees load as stale as a real scrape would leave it. A pod steps only when it
has work or a timer is due: after a step ends, or when a request or a KV release reaches an idle pod.

P/D follows the llm-d sidecar: the prefill pod gets the request with ``do_remote_decode`` and one
output token; when that finishes, the decode pod gets it with the prefill's ``kv_transfer_params``,
pulls the KV (the core charges the transfer time) and, once pulled, the prefill pod's
``release_remote`` frees the held blocks. The client's first token is the decode pod's first token.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from engine.sim.cluster.fleet import FleetSpec, PodSpec
from engine.sim.cluster.routers import (
    ClusterRequest,
    Endpoint,
    ManualClock,
    Role,
    Router,
    SchedulingError,
    Usage,
    Warmup,
)
from engine.sim.cluster.trace import BlockTokens, TraceRequest
from engine.sim.core import EngineCore, EngineStats, SimRequest
from engine.sim.dpgroup import DPGroup, GroupStep

_STEP = 0
_TIMER = 1
_QUIET = 2  # the end of a pod's quiet decode run; payload: the run's generation
_READY = 3  # a pod added at run time finished starting
_DRAIN_DEADLINE = 4  # a draining pod's in-flight requests ran out of time
STARTING, READY, DRAINING, RELEASED = "starting", "ready", "draining", "released"
LOST = "503 pod removed"  # the failure reason of a request lost because its pod went away
_MAX_QUIET = 1024  # steps planned at once (bounds the per-pod list of durations)
_PREFILL_SUFFIX = "/prefill"


class RequestRecord:
    """What happened to one request (times in simulated seconds; -1 where it never happened)."""

    __slots__ = (
        "request_id", "index", "arrival", "input_length", "max_tokens", "decode_pod", "prefill_pod",
        "first_token", "finish", "prompt_tokens", "cached_tokens", "output_tokens", "status", "reason",
        "prefill_done", "req", "decode_rank",
    )

    def __init__(self, request_id: str, index: int, arrival: float, input_length: int, max_tokens: int) -> None:
        self.request_id = request_id
        self.index = index
        self.arrival = arrival
        self.input_length = input_length
        self.max_tokens = max_tokens
        self.decode_pod = ""
        self.decode_rank: int | None = None  # the data-parallel rank that served it (DP pods)
        self.prefill_pod: str | None = None
        self.first_token = -1.0
        self.finish = -1.0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.output_tokens = 0
        self.status = "pending"  # pending | ok | rejected | failed
        self.reason = ""
        self.prefill_done = -1.0
        self.req: ClusterRequest | None = None

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival if self.first_token >= 0 else math.nan

    @property
    def e2e(self) -> float:
        return self.finish - self.arrival if self.finish >= 0 else math.nan

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.request_id, "arrival": self.arrival, "first_token": self.first_token,
            "finish": self.finish, "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
            "output_tokens": self.output_tokens, "decode_pod": self.decode_pod,
            "prefill_pod": self.prefill_pod, "status": self.status, "reason": self.reason or None,
            "decode_rank": self.decode_rank,
        }


class Pod:
    """One simulated pod: a group of ``spec.dp`` engine cores stepping together (one core unless DP), with
    its lazily applied quiet decode run (see ``ClusterSim``; only a single-core pod runs them)."""

    __slots__ = ("index", "spec", "name", "group", "busy", "timer_at", "steps", "busy_time",
                 "run", "run_start", "run_next", "run_applied", "run_gen", "state", "requested_at", "ready_at",
                 "released_at", "gpus", "assigned", "scraped")

    def __init__(self, index: int, spec: PodSpec, group: DPGroup, requested_at: float = 0.0,
                 ready_at: float = 0.0) -> None:
        self.index = index
        # starting (paid, not routable) -> ready -> draining (no new requests) -> released (no longer paid)
        self.state = READY if ready_at <= requested_at else STARTING
        self.requested_at = requested_at
        self.ready_at = ready_at
        self.released_at = math.inf
        self.gpus = group.dp * group.cost.rank.deployment.gpus  # every rank's GPUs
        self.assigned = 0  # requests with a leg on this pod that has not ended
        self.spec = spec
        self.name = spec.name
        self.group = group
        self.busy = False
        self.timer_at = math.inf
        self.steps = 0
        self.busy_time = 0.0
        self.run: list[float] = []  # durations of the quiet steps of the current run (empty: none)
        self.run_start = 0.0  # start of the run's next step to apply
        self.run_next = 0  # index in ``run`` of the next step to apply
        self.run_applied = 0  # steps applied to the core
        self.run_gen = 0  # bumped when a run is cut short: its end event is then stale
        self.scraped = -1  # the core's load_version at the last scrape the router got stats from

    def settle(self, now: float, inclusive: bool) -> None:
        """Apply the quiet steps that have started by ``now`` (``inclusive``: also one starting at it)."""
        run = self.run
        i, t = self.run_next, self.run_start
        if i >= len(run):
            return
        first, start = i, t
        rank_busy = self.group.busy_time  # as DPGroup.step counts a single core's steps, one add per step
        while i < len(run) and (t < now or (inclusive and t == now)):
            self.busy_time += run[i]
            rank_busy[0] += run[i]
            start = t
            t = t + run[i]
            i += 1
        if i > first:
            self.core.apply_quiet(i - first, start)
            self.steps += i - first
            self.run_next, self.run_start = i, t

    def cut(self, now: float) -> float | None:
        """Something reaches the pod at ``now``: apply the steps started by then and end the run after
        the one in progress. Returns the new end of the run if it moved (the caller pushes the event)."""
        if not self.run:
            return None
        self.settle(now, inclusive=True)
        if self.run_next < len(self.run):
            del self.run[self.run_next:]
            self.run_gen += 1
            return self.run_start
        return None

    @property
    def core(self) -> EngineCore:
        """Rank 0's engine core (the only one of a pod without data parallelism)."""
        return self.group.cores[0]

    def stats(self) -> EngineStats:
        """The pod's engine stats (a data-parallel pod's ranks summed, as a rank-oblivious scrape reads them)."""
        cores = self.group.cores
        return cores[0].stats() if len(cores) == 1 else _sum_stats([c.stats() for c in cores])

    @property
    def num_preemptions(self) -> int:
        return sum(c.num_preemptions for c in self.group.cores)

    def endpoint(self, rank: int) -> str:
        """The picker's endpoint id of one rank: ``ip:port#rank`` (``ip:port`` for a pod without DP)."""
        return self.name if self.spec.dp == 1 else f"{self.name}#{rank}"


@dataclass(frozen=True, slots=True)
class _Warming:
    """A warm-up the simulator is sending (pickers/warmup.py): its pod and rank, read once off its endpoint."""

    pod: Pod
    rank: int | None
    warmup: Warmup


@dataclass(slots=True)
class SimResult:
    records: list[RequestRecord]
    pods: list[Pod]
    end_time: float
    events: int
    policy: str = ""
    scaling_actions: int = 0  # fleet-changing decisions while it ran (one may add or drain several pods)


def endpoints_for_pod(p: PodSpec, ranks: bool = True) -> list[Endpoint]:
    """One pod's endpoints: one per data-parallel rank, or with ``ranks=False`` (or without DP) the pod."""
    per_rank = ranks and p.dp > 1
    return [
        Endpoint(
            p.name, role=Role(p.role), model="sim", accelerator=p.accelerator, model_profile=p.model_profile,
            block_size=p.block_size, kv_events=f"inproc://{p.label or p.name}" + (f"_dp{r}" if per_rank else ""),
            max_num_batched_tokens=p.max_num_batched_tokens,
            max_num_seqs=p.max_num_seqs if per_rank else p.max_num_seqs * p.dp,  # every rank's sequence slots
            dp_rank=r if per_rank else None,
            dp_size=p.dp if per_rank else None)
        for r in range(p.dp if per_rank else 1)
    ]


def endpoints_for(fleet: FleetSpec, ranks: bool = True) -> list[Endpoint]:
    """The picker's endpoints: one per (pod, data-parallel rank), or with ``ranks=False`` one per pod (a
    rank-oblivious router: the pod balances its ranks itself, and sees all of them as one cache)."""
    return [e for p in fleet.pods for e in endpoints_for_pod(p, ranks)]


class Controller(Protocol):
    """Changes the fleet while a replay runs (an autoscaler): ``tick`` every ``interval_s`` simulated seconds
    calls ``ClusterSim.add_pod`` / ``drain_pod``."""

    interval_s: float

    def tick(self, sim: ClusterSim, now: float) -> None: ...


class ClusterSim:
    """Replays requests on a fleet of EngineCores in virtual time through one Router."""

    def __init__(
        self, fleet: FleetSpec, router: Router | Callable[[list[Endpoint], ManualClock], Router],
        clock: ManualClock | None = None, scrape_interval: float = 0.05, seed: int = 0,
        quiet_runs: bool = True, rank_endpoints: bool = True, incremental_scrapes: bool = True,
        compact_events: bool = True,
    ) -> None:
        if scrape_interval <= 0:
            raise ValueError("scrape_interval must be positive")
        self.fleet = fleet
        self.clock = clock or ManualClock()
        # Whether the router sees each data-parallel rank as an endpoint (metrics and KV events per rank) or
        # each pod as one (aggregated metrics, every rank's events under the pod's name).
        self.rank_endpoints = rank_endpoints
        self.router: Router = router if isinstance(router, Router) else router(
            endpoints_for(fleet, rank_endpoints), self.clock)
        self.scrape_interval = scrape_interval
        self.quiet_runs = quiet_runs  # False: one event per engine step (the reference the runs must match)
        # Routers with ``on_metrics_unchanged`` get stats only from pods whose load moved since their last
        # scrape, and one call naming the others (False: stats of every pod every time, the reference).
        self.incremental_scrapes = incremental_scrapes
        # KV events in the pools' in-process shapes (engine.sim.blockpool; False: vLLM's wire shapes)
        self.compact_events = compact_events
        self.pods: list[Pod] = []
        self.by_name: dict[str, Pod] = {}
        self.by_engine: dict[str, Pod] = {}
        for i, spec in enumerate(fleet.pods):
            # Pods build KV events only when the router reads them.
            group = DPGroup(spec.group_cost(),
                            spec.engine_config(fleet.link, seed, i, kv_events=self.router.wants_kv_events,
                                               in_process=compact_events),
                            balancer=spec.dp_balancer)
            pod = Pod(i, spec, group)
            self.pods.append(pod)
            self.by_name[spec.name] = pod
            for core in group.cores:
                core.on_kv_pulled = self._on_kv_pulled
                self.by_engine[core.engine_id] = pod
        attach = getattr(self.router, "attach", None)
        # routers that read the pods themselves (peer emulations, the oracle): they must see every quiet step
        # that started by the time they route (see ``_arrive``)
        self._router_reads_pods = callable(attach)
        if callable(attach):
            attach(self.pods)
        self.seed = seed
        self.controller: Controller | None = None
        self.drain_timeout_s = 600.0  # a draining pod's requests still running after this are lost
        # decisions that changed the fleet (counted by the controller: one decision may move several pods)
        self.scaling_actions = 0
        self._added = 0
        self._heap: list[tuple[float, int, int, int, GroupStep | int | None]] = []
        self._seq = 0
        self._live: dict[str, RequestRecord] = {}  # engine request id -> record
        self._held: dict[str, RequestRecord] = {}  # request id -> record of a request the router holds
        # the router's own prefills: a warm-up piece's request id -> (its warm-up, the piece's index)
        self._warming: dict[str, tuple[_Warming, int]] = {}
        self._released: list[Pod] = []  # prefill pods freed during a step, kicked after it
        self.records: list[RequestRecord] = []
        self.events = 0
        self.ended = 0  # requests that completed, failed or were rejected
        # progress(sim_time, arrived, ended): called every ``progress_every`` events (and once at the end)
        self.progress: Callable[[float, int, int], None] | None = None
        self.progress_every = 8192

    # ---- running -------------------------------------------------------------------------------
    def run(self, requests: Iterable[tuple[TraceRequest, np.ndarray]]) -> SimResult:
        """Replay ``(trace request, prompt tokens)`` pairs, sorted by arrival, until every request ends."""
        it: Iterator[tuple[TraceRequest, np.ndarray]] = iter(requests)
        nxt = next(it, None)
        heap, router, clock = self._heap, self.router, self.clock
        scrape = 0.0 if router.wants_metrics else math.inf
        control = 0.0 if self.controller is not None else math.inf
        pop = heapq.heappop
        last_arrival = -math.inf
        while True:
            while heap and heap[0][2] == _TIMER and self._stale_timer(heap[0][0], self.pods[heap[0][3]]):
                pop(heap)
            t_arr = nxt[0].arrival if nxt is not None else math.inf
            t_heap = heap[0][0] if heap else math.inf
            t_rel = router.next_release_at() if self._held else math.inf  # a held request's deadline
            t = min(t_arr, t_heap, scrape, control, t_rel)
            if t == math.inf:
                break
            clock.set(max(t, clock.now()))
            now = clock.now()
            self.events += 1
            if self.progress is not None and self.events % self.progress_every == 0:
                self.progress(now, len(self.records), self.ended)
            if t_rel <= t_heap and t_rel <= t_arr and t_rel <= scrape and t_rel <= control:
                self._take_released(now)
                continue
            if scrape <= t_heap and scrape <= t_arr and scrape <= control:
                self._scrape(now)
                scrape = now + self.scrape_interval if (heap or nxt is not None or self._held) else math.inf
                if self._held:
                    self._take_released(now)
                continue
            if control <= t_heap and control <= t_arr:
                assert self.controller is not None
                self.controller.tick(self, now)
                control = now + self.controller.interval_s if (heap or nxt is not None) else math.inf
                if scrape == math.inf and router.wants_metrics and (heap or nxt is not None):
                    scrape = now
                continue
            if t_heap <= t_arr:
                _, _, kind, idx, res = pop(heap)
                pod = self.pods[idx]
                if kind == _STEP:
                    self._step_end(pod, res, now)  # type: ignore[arg-type]
                elif kind == _QUIET:
                    if res == pod.run_gen:
                        self._quiet_end(pod, now)
                elif kind == _READY:
                    self._ready(pod, now)
                elif kind == _DRAIN_DEADLINE:
                    self._drain_deadline(pod, now)
                elif pod.timer_at <= now:
                    pod.timer_at = math.inf
                    self._kick(pod, now)
                if self._held:
                    self._take_released(now)
                continue
            tr, prompt = nxt  # type: ignore[misc]
            if tr.arrival < last_arrival:
                raise ValueError("requests must be sorted by arrival")
            last_arrival = tr.arrival
            nxt = next(it, None)
            self._arrive(tr, prompt, now)
            if scrape == math.inf and router.wants_metrics:
                scrape = now
            if control == math.inf and self.controller is not None:
                control = now
        if self.progress is not None:
            self.progress(clock.now(), len(self.records), self.ended)
        return SimResult(self.records, self.pods, clock.now(), self.events, getattr(router, "name", ""),
                         self.scaling_actions)

    def _stale_timer(self, t: float, pod: Pod) -> bool:
        """A timer whose reason went away (blocks released early, a step ran past it): drop it without
        moving the clock, and re-arm the pod's timer if its next deadline moved later."""
        if pod.timer_at != t:
            return True
        if pod.busy:
            pod.timer_at = math.inf  # the step end re-checks the core's timers
            return True
        nt = pod.group.next_event_time()
        if nt is not None and nt <= t:
            return False
        pod.timer_at = math.inf
        if nt is not None:
            pod.timer_at = nt
            self._seq += 1
            heapq.heappush(self._heap, (nt, self._seq, _TIMER, pod.index, None))
        return True

    def _scrape(self, now: float) -> None:
        router = self.router
        unchanged = getattr(router, "on_metrics_unchanged", None) if self.incremental_scrapes else None
        same: list[str] = []
        for pod in self.pods:
            if pod.state != READY:
                continue  # the router does not know it (yet, or any more)
            if pod.run:
                pod.settle(now, inclusive=False)  # a scrape at a step's start sees the state before it
            cores = pod.group.cores
            if len(cores) == 1:
                core = cores[0]
                if unchanged is not None:
                    if core.load_version == pod.scraped:
                        same.append(pod.name)  # the same running, waiting, KV usage and prefix counters
                        continue
                    pod.scraped = core.load_version
                router.on_metrics(pod.name, core.stats(), now)
            elif self.rank_endpoints:  # per-rank series (vLLM's engine="<rank>" label)
                for r, core in enumerate(cores):
                    router.on_metrics(pod.endpoint(r), core.stats(), now)
            else:  # a rank-oblivious reader sums the ranks' series, as a Prometheus sum() does
                router.on_metrics(pod.name, _sum_stats([c.stats() for c in cores]), now)
        if same:
            unchanged(same, now)  # type: ignore[misc]

    # ---- requests --------------------------------------------------------------------------------
    def _arrive(self, tr: TraceRequest, prompt: np.ndarray, now: float) -> None:
        rid = f"req-{tr.index}"
        rec = RequestRecord(rid, tr.index, tr.arrival, tr.input_length, tr.output_length)
        self.records.append(rec)
        req = ClusterRequest(rid, tr.arrival, prompt, tr.output_length, hash_ids=tr.hash_ids)
        rec.req = req
        if self._router_reads_pods:  # an arrival comes after the step events at its time: steps started by now
            for pod in self.pods:
                if pod.run:
                    pod.settle(now, inclusive=True)
        try:
            route = self.router.route(req, now)
        except SchedulingError as exc:
            self._reject(rec, exc)
            return
        if route is None:  # held by the router (flow control): placed when ``take_released`` hands it back
            self._held[rid] = rec
        else:
            self._place(rec, req, route, now)
        self._send_warmups(now)

    def _reject(self, rec: RequestRecord, exc: SchedulingError) -> None:
        rec.status, rec.reason = "rejected", f"{exc.status} {exc.code}"
        self.ended += 1
        rec.req = None

    def _take_released(self, now: float) -> None:
        for req, route in self.router.take_released():
            rec = self._held.pop(req.request_id)
            if isinstance(route, SchedulingError):
                self._reject(rec, route)
            else:
                self._place(rec, req, route, now)
        self._send_warmups(now)

    def _send_warmups(self, now: float) -> None:
        """Submit the router's warm-up prefills (pickers/warmup.py) to their pods: one-token requests that are
        no trace request's (no record), a warm-up's pieces one after another; the router hears of each end
        through ``warmup_done``."""
        for w in self.router.take_warmups():
            name, rank = _split_rank(w.endpoint_id)
            pod = self.by_name.get(name)
            if pod is None or not self._send_piece(_Warming(pod, rank, w), 0, now):
                self.router.warmup_done(w.request_id, False)

    def _send_piece(self, warming: _Warming, k: int, now: float, kick: bool = True) -> bool:
        """Piece ``k`` of the warm-up to its pod (queued behind the requests waiting there); False where the pod
        no longer takes requests. ``kick``: start the pod's next step (not from within its step's end)."""
        pod, w = warming.pod, warming.warmup
        if pod.state != READY:
            return False
        rid = f"{w.request_id}.{k}"
        try:
            self._enqueue(pod, SimRequest(rid, w.piece(k), 1, arrival=now, ignore_eos=True), warming.rank, now)
        except ValueError:
            return False
        self._warming[rid] = (warming, k)
        if kick:
            self._kick(pod, now)
        return True

    def _warmup_piece_done(self, rid: str, now: float) -> None:
        warming, k = self._warming.pop(rid)
        request_id = warming.warmup.request_id
        if k + 1 == len(warming.warmup.ends):
            self.router.warmup_done(request_id, True)
        elif not self._send_piece(warming, k + 1, now, kick=False):  # the step's end kicks the pod
            self.router.warmup_done(request_id, False)

    def _place(self, rec: RequestRecord, req: ClusterRequest, route: tuple[str, str | None], now: float) -> None:
        """Send a routed request to its pods (a prefill leg first when the route names another pod)."""
        rid, tr_index, prompt = rec.request_id, rec.index, req.prompt
        decode, prefill = route
        decode, drank = _split_rank(decode)
        prank = None
        if prefill:
            prefill, prank = _split_rank(prefill)
        dpod = self.by_name.get(decode)
        ppod = self.by_name.get(prefill) if prefill else None
        if dpod is None or (prefill and ppod is None):
            raise ValueError(f"router {self.router.name!r} picked an unknown pod: {decode!r} / {prefill!r}")
        if dpod.state != READY or (ppod is not None and ppod.state != READY):
            raise ValueError(f"router {self.router.name!r} picked a pod that is not serving: {decode!r} / "
                             f"{prefill!r} (removed pods must leave the router at once)")
        rec.decode_pod = decode
        dpod.assigned += 1
        if ppod is not None and ppod is not dpod:
            rec.prefill_pod = ppod.name
            ppod.assigned += 1
            sreq = SimRequest(rid + _PREFILL_SUFFIX, prompt, 1, arrival=now,
                              kv_transfer_params={"do_remote_decode": True}, seed=tr_index)
            self._submit(rec, ppod, sreq, now, prank)
            rec.decode_rank = drank  # the decode leg goes there once the prefill is done
        else:
            self._submit(rec, dpod, SimRequest(rid, prompt, rec.max_tokens, arrival=now, ignore_eos=True,
                                               seed=tr_index), now, drank)

    def _submit(self, rec: RequestRecord, pod: Pod, sreq: SimRequest, now: float, rank: int | None = None) -> None:
        if pod.state == RELEASED:  # its decode pod went away while the prefill leg ran
            self._fail(rec, LOST, now)
            return
        try:
            served = self._enqueue(pod, sreq, rank, now)
        except ValueError as exc:
            self._fail(rec, f"400 {exc}", now)
            return
        if not sreq.request_id.endswith(_PREFILL_SUFFIX):
            rec.decode_rank = served
        self._live[sreq.request_id] = rec
        self._kick(pod, now)

    def _enqueue(self, pod: Pod, sreq: SimRequest, rank: int | None, now: float) -> int:
        """Queue ``sreq`` on ``pod`` (its quiet run cut first: the new request changes its steps); the rank that
        took it. ValueError as vLLM's 400."""
        if pod.run:
            self._cut(pod, now)
        return pod.group.add_request(sreq, rank, now)

    def _fail(self, rec: RequestRecord, reason: str, now: float) -> None:
        rec.status, rec.reason = "failed", reason
        self.ended += 1
        self._unassign(rec, now)
        if rec.req is not None:
            self.router.on_failed(rec.req, reason, now)
            rec.req = None

    # ---- pods ------------------------------------------------------------------------------------
    def _kick(self, pod: Pod, now: float) -> None:
        if pod.busy:
            return
        group = pod.group
        if self.quiet_runs and group.dp == 1 and group.has_work():
            core = group.cores[0]
            run = core.plan_quiet(now, _MAX_QUIET, with_blocks=not core.pool.publish_events)
            if len(run) > 1:
                self._start_run(pod, run, now)
                return
        if pod.state == RELEASED:
            return
        res = group.step(now)
        if res.duration > 0:
            pod.busy = True
            pod.steps += 1
            pod.busy_time += res.duration
            self._seq += 1
            heapq.heappush(self._heap, (res.end, self._seq, _STEP, pod.index, res))
        elif self.router.wants_kv_events and pod.state == READY:
            self._events(pod, res, now)
        if self._released:
            self._kick_released(now)
        if not pod.busy:
            t = group.next_event_time()
            if t is not None and t < pod.timer_at:
                pod.timer_at = t
                self._seq += 1
                heapq.heappush(self._heap, (t, self._seq, _TIMER, pod.index, None))
            if pod.state == DRAINING:
                self._maybe_release(pod, now)

    def _kick_released(self, now: float) -> None:
        released, self._released = self._released, []
        for p in released:
            self._kick(p, now)

    def _start_run(self, pod: Pod, run: list[float], now: float) -> None:
        """Step lazily: one event at the run's end instead of one per step (see ``Pod.settle``)."""
        pod.run, pod.run_next, pod.run_start = run, 0, now
        pod.busy = True
        end = now
        for d in run:
            end = end + d
        self._seq += 1
        heapq.heappush(self._heap, (end, self._seq, _QUIET, pod.index, pod.run_gen))

    def _cut(self, pod: Pod, now: float) -> None:
        end = pod.cut(now)
        if end is not None:
            self._seq += 1
            heapq.heappush(self._heap, (end, self._seq, _QUIET, pod.index, pod.run_gen))

    def _quiet_end(self, pod: Pod, now: float) -> None:
        pod.settle(now, inclusive=False)
        pod.run = []
        pod.run_next = 0
        pod.busy = False
        self._kick(pod, now)

    def _on_kv_pulled(self, params: dict) -> None:
        engine = str(params.get("remote_engine_id"))
        pod = self.by_engine.get(engine)
        if pod is not None and pod.run:
            self._cut(pod, self.clock.now())
        if pod is not None and pod.group.release_remote(params.get("remote_block_ids") or (), engine):
            self._released.append(pod)

    def _events(self, pod: Pod, res: GroupStep, now: float) -> None:
        """Each rank's KV events under its endpoint (or, rank-oblivious, all under the pod's name)."""
        for rank, events in res.events():
            self.router.on_kv_events(pod.endpoint(rank) if self.rank_endpoints else pod.name, events, now)

    def _step_end(self, pod: Pod, res: GroupStep, now: float) -> None:
        pod.busy = False
        router = self.router
        if router.wants_kv_events and pod.state == READY:
            self._events(pod, res, now)
        live = self._live
        for _, out in res.outputs():
            rid = out.request_id
            rec = live.get(rid)
            if rec is None:
                if out.finished and rid in self._warming:
                    self._warmup_piece_done(rid, now)
                continue
            if rid.endswith(_PREFILL_SUFFIX):
                if out.finished:
                    del live[rid]
                    self._prefill_done(rec, out.kv_transfer_params, out.num_cached_tokens, now)
                continue
            if out.num_output_tokens == 1:
                rec.first_token = now
                if rec.req is not None:
                    router.on_first_token(rec.req, now)
            if out.finished:
                del live[rid]
                rec.finish = now
                rec.status = "ok"
                self.ended += 1
                self._unassign(rec, now)
                rec.prompt_tokens = out.num_prompt_tokens
                rec.output_tokens = out.num_output_tokens
                if rec.prefill_pod is None:
                    rec.cached_tokens = out.num_cached_tokens
                if rec.req is not None:
                    router.on_finished(
                        rec.req, Usage(out.num_prompt_tokens, out.num_output_tokens, rec.cached_tokens), now)
                    rec.req = None
        self._kick(pod, now)

    def _prefill_done(self, rec: RequestRecord, params: dict | None, cached: int, now: float) -> None:
        rec.prefill_done = now
        rec.cached_tokens = cached
        if rec.prefill_pod is not None:
            ppod = self.by_name[rec.prefill_pod]
            ppod.assigned -= 1
            self._maybe_release(ppod, now)
        dpod = self.by_name[rec.decode_pod]
        req = rec.req
        if req is None:  # pragma: no cover - a record always keeps its request until it ends
            return
        sreq = SimRequest(rec.request_id, req.prompt, rec.max_tokens, arrival=rec.arrival, ignore_eos=True,
                          kv_transfer_params=params, seed=rec.index)
        self._submit(rec, dpod, sreq, now, rec.decode_rank)
        if rec.status == "failed" and params:  # the decode pod refused it: let the prefill pod free its KV
            self._on_kv_pulled(params)
            self._kick_released(now)

    # ---- the fleet at run time -----------------------------------------------------------------------
    def add_pod(self, spec: PodSpec, now: float, startup_s: float = 0.0) -> Pod:
        """Request a pod now: it is paid for from ``now`` and joins the router after ``startup_s``."""
        if spec.name in self.by_name:
            raise ValueError(f"pod name {spec.name} is used twice")
        i = len(self.pods)
        group = DPGroup(spec.group_cost(), spec.engine_config(
            self.fleet.link, self.seed, i, kv_events=self.router.wants_kv_events, in_process=self.compact_events),
            balancer=spec.dp_balancer)
        pod = Pod(i, spec, group, requested_at=now, ready_at=now + max(0.0, startup_s))
        self.pods.append(pod)
        self.by_name[spec.name] = pod
        for core in group.cores:
            core.on_kv_pulled = self._on_kv_pulled
            self.by_engine[core.engine_id] = pod
        self._added += 1
        if pod.state == READY:
            self._ready(pod, now)
        else:
            self._seq += 1
            heapq.heappush(self._heap, (pod.ready_at, self._seq, _READY, i, None))
        return pod

    def new_pod_name(self) -> str:
        """A fresh address for a pod added at run time (10.200+.x.y:8000)."""
        n = self._added
        return f"10.{200 + n // 65536 % 56}.{n // 256 % 256}.{n % 256}:8000"

    def drain_pod(self, name: str, now: float) -> None:
        """Drain-first removal: the router forgets the pod now (no new requests), the pod finishes what it
        holds and is released (no longer paid) once idle; what still runs after ``drain_timeout_s`` is lost.
        A pod still starting is released at once."""
        pod = self.by_name[name]
        if pod.state in (DRAINING, RELEASED):
            return
        if pod.state == STARTING:
            self._release(pod, now)
            return
        pod.state = DRAINING
        self.router.on_pod_removed(pod.name, now)
        self._seq += 1
        heapq.heappush(self._heap, (now + self.drain_timeout_s, self._seq, _DRAIN_DEADLINE, pod.index, None))
        self._maybe_release(pod, now)

    def _ready(self, pod: Pod, now: float) -> None:
        if pod.state == RELEASED:
            return  # drained while it was starting
        pod.state = READY
        pod.ready_at = now
        for endpoint in endpoints_for_pod(pod.spec, self.rank_endpoints):
            self.router.on_pod_added(endpoint, now)

    def _maybe_release(self, pod: Pod, now: float) -> None:
        group = pod.group
        if (pod.state == DRAINING and pod.assigned <= 0 and not pod.busy and not group.has_work()
                and group.next_event_time() is None):
            self._release(pod, now)

    def _release(self, pod: Pod, now: float) -> None:
        known = pod.state == DRAINING  # the router knew it (a pod drained while starting never joined)
        pod.state = RELEASED
        pod.released_at = now
        if known:
            self.router.on_pod_released(pod.name, now)

    def _drain_deadline(self, pod: Pod, now: float) -> None:
        """The drain ran out of time: what the pod still runs is lost, and the pod goes."""
        if pod.state != DRAINING:
            return
        if pod.run:
            self._cut(pod, now)
        for rid, rec in list(self._live.items()):
            on_prefill = rid.endswith(_PREFILL_SUFFIX)
            if (rec.prefill_pod if on_prefill else rec.decode_pod) == pod.name:
                pod.group.abort(rid)
                del self._live[rid]
                self._fail(rec, LOST, now)
        self._release(pod, now)

    def _unassign(self, rec: RequestRecord, now: float) -> None:
        """A request ended: its legs no longer hold their pods (a draining pod may go)."""
        dpod = self.by_name.get(rec.decode_pod) if rec.decode_pod else None
        if dpod is not None:
            dpod.assigned -= 1
            self._maybe_release(dpod, now)
        if rec.prefill_pod is not None and rec.prefill_done < 0:
            ppod = self.by_name[rec.prefill_pod]
            ppod.assigned -= 1
            self._maybe_release(ppod, now)


def _split_rank(endpoint: str) -> tuple[str, int | None]:
    """``ip:port#rank`` -> (``ip:port``, rank); a plain address -> (address, None)."""
    addr, sep, rank = endpoint.partition("#")
    return (addr, int(rank)) if sep else (addr, None)


def _sum_stats(stats: list[EngineStats]) -> EngineStats:
    """A pod's ranks as one engine, as the picker reads a DP pod's /metrics without ranks: counts summed,
    KV usage the fullest rank's (pickers.datalayer.promparse)."""
    return EngineStats(
        num_running=sum(s.num_running for s in stats), num_waiting=sum(s.num_waiting for s in stats),
        kv_usage=max(s.kv_usage for s in stats),
        prefix_queries=sum(s.prefix_queries for s in stats), prefix_hits=sum(s.prefix_hits for s in stats),
        num_preemptions=sum(s.num_preemptions for s in stats), prompt_tokens=sum(s.prompt_tokens for s in stats),
        generation_tokens=sum(s.generation_tokens for s in stats),
        num_held_blocks=sum(s.num_held_blocks for s in stats),
        num_gpu_blocks=stats[0].num_gpu_blocks, block_size=stats[0].block_size,  # per engine, as cache_config_info
    )


def trace_prompts(reqs: list[TraceRequest],
                  blocks: BlockTokens | None = None) -> Iterator[tuple[TraceRequest, np.ndarray]]:
    """Prompts made lazily, one request at a time, so memory holds only requests in flight."""
    blocks = blocks or BlockTokens()
    for r in reqs:
        yield r, blocks.prompt(r.hash_ids, r.input_length, r.index)


__all__ = [
    "DRAINING", "LOST", "READY", "RELEASED", "STARTING", "ClusterSim", "Controller", "Pod", "RequestRecord",
    "SimResult", "endpoints_for", "endpoints_for_pod", "trace_prompts",
]
