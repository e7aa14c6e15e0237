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

import numpy as np

from engine.sim.cluster.fleet import FleetSpec, PodSpec
from engine.sim.cluster.routers import ClusterRequest, Endpoint, ManualClock, Role, Router, SchedulingError, Usage
from engine.sim.cluster.trace import BlockTokens, TraceRequest
from engine.sim.core import EngineCore, SimRequest, StepResult

_STEP = 0
_TIMER = 1
_PREFILL_SUFFIX = "/prefill"


class RequestRecord:
    """What happened to one request (times in simulated seconds; -1 where it never happened)."""

    __slots__ = (
        "request_id", "index", "arrival", "input_length", "max_tokens", "decode_pod", "prefill_pod",
        "first_token", "finish", "prompt_tokens", "cached_tokens", "output_tokens", "status", "reason",
        "prefill_done", "req",
    )

    def __init__(self, request_id: str, index: int, arrival: float, input_length: int, max_tokens: int) -> None:
        self.request_id = request_id
        self.index = index
        self.arrival = arrival
        self.input_length = input_length
        self.max_tokens = max_tokens
        self.decode_pod = ""
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
        }


class Pod:
    __slots__ = ("index", "spec", "name", "core", "busy", "timer_at", "steps", "busy_time")

    def __init__(self, index: int, spec: PodSpec, core: EngineCore) -> None:
        self.index = index
        self.spec = spec
        self.name = spec.name
        self.core = core
        self.busy = False
        self.timer_at = math.inf
        self.steps = 0
        self.busy_time = 0.0


@dataclass(slots=True)
class SimResult:
    records: list[RequestRecord]
    pods: list[Pod]
    end_time: float
    events: int
    policy: str = ""


def endpoints_for(fleet: FleetSpec) -> list[Endpoint]:
    return [
        Endpoint(p.name, role=Role(p.role), model="sim", accelerator=p.accelerator, model_profile=p.model_profile,
                 block_size=p.block_size, kv_events=f"inproc://{p.label or p.name}",
                 max_num_batched_tokens=p.max_num_batched_tokens)
        for p in fleet.pods
    ]


class ClusterSim:
    """Replays requests on a fleet of EngineCores in virtual time through one Router."""

    def __init__(
        self, fleet: FleetSpec, router: Router | Callable[[list[Endpoint], ManualClock], Router],
        clock: ManualClock | None = None, scrape_interval: float = 0.05, seed: int = 0,
    ) -> None:
        if scrape_interval <= 0:
            raise ValueError("scrape_interval must be positive")
        self.fleet = fleet
        self.clock = clock or ManualClock()
        self.router: Router = router if isinstance(router, Router) else router(endpoints_for(fleet), self.clock)
        self.scrape_interval = scrape_interval
        self.pods: list[Pod] = []
        self.by_name: dict[str, Pod] = {}
        self.by_engine: dict[str, Pod] = {}
        for i, spec in enumerate(fleet.pods):
            # Pods build KV events only when the router reads them.
            core = EngineCore(spec.cost_model(),
                              spec.engine_config(fleet.link, seed, i, kv_events=self.router.wants_kv_events))
            pod = Pod(i, spec, core)
            core.on_kv_pulled = self._on_kv_pulled
            self.pods.append(pod)
            self.by_name[spec.name] = pod
            self.by_engine[core.engine_id] = pod
        self._heap: list[tuple[float, int, int, int, StepResult | None]] = []
        self._seq = 0
        self._live: dict[str, RequestRecord] = {}  # engine request id -> record
        self._released: list[Pod] = []  # prefill pods freed during a step, kicked after it
        self.records: list[RequestRecord] = []
        self.events = 0

    # ---- running -------------------------------------------------------------------------------
    def run(self, requests: Iterable[tuple[TraceRequest, np.ndarray]]) -> SimResult:
        """Replay ``(trace request, prompt tokens)`` pairs, sorted by arrival, until every request ends."""
        it: Iterator[tuple[TraceRequest, np.ndarray]] = iter(requests)
        nxt = next(it, None)
        heap, router, clock = self._heap, self.router, self.clock
        scrape = 0.0 if router.wants_metrics else math.inf
        pop = heapq.heappop
        last_arrival = -math.inf
        while True:
            while heap and heap[0][2] == _TIMER and self._stale_timer(heap[0][0], self.pods[heap[0][3]]):
                pop(heap)
            t_arr = nxt[0].arrival if nxt is not None else math.inf
            t_heap = heap[0][0] if heap else math.inf
            t = min(t_arr, t_heap, scrape)
            if t == math.inf:
                break
            clock.set(max(t, clock.now()))
            now = clock.now()
            self.events += 1
            if scrape <= t_heap and scrape <= t_arr:
                self._scrape(now)
                scrape = now + self.scrape_interval if (heap or nxt is not None) else math.inf
                continue
            if t_heap <= t_arr:
                _, _, kind, idx, res = pop(heap)
                pod = self.pods[idx]
                if kind == _STEP:
                    self._step_end(pod, res, now)  # type: ignore[arg-type]
                elif pod.timer_at <= now:
                    pod.timer_at = math.inf
                    self._kick(pod, now)
                continue
            tr, prompt = nxt  # type: ignore[misc]
            if tr.arrival < last_arrival:
                raise ValueError("requests must be sorted by arrival")
            last_arrival = tr.arrival
            nxt = next(it, None)
            self._arrive(tr, prompt, now)
            if scrape == math.inf and router.wants_metrics:
                scrape = now
        return SimResult(self.records, self.pods, clock.now(), self.events, getattr(router, "name", ""))

    def _stale_timer(self, t: float, pod: Pod) -> bool:
        """A timer whose reason went away (blocks released early, a step ran past it): drop it without
        moving the clock, and re-arm the pod's timer if its next deadline moved later."""
        if pod.timer_at != t:
            return True
        if pod.busy:
            pod.timer_at = math.inf  # the step end re-checks the core's timers
            return True
        nt = pod.core.next_event_time()
        if nt is not None and nt <= t:
            return False
        pod.timer_at = math.inf
        if nt is not None:
            pod.timer_at = nt
            self._seq += 1
            heapq.heappush(self._heap, (nt, self._seq, _TIMER, pod.index, None))
        return True

    def _scrape(self, now: float) -> None:
        for pod in self.pods:
            self.router.on_metrics(pod.name, pod.core.stats(), now)

    # ---- requests --------------------------------------------------------------------------------
    def _arrive(self, tr: TraceRequest, prompt: np.ndarray, now: float) -> None:
        rid = f"req-{tr.index}"
        rec = RequestRecord(rid, tr.index, tr.arrival, tr.input_length, tr.output_length)
        self.records.append(rec)
        req = ClusterRequest(rid, tr.arrival, prompt, tr.output_length, hash_ids=tr.hash_ids)
        rec.req = req
        try:
            decode, prefill = self.router.route(req, now)
        except SchedulingError as exc:
            rec.status, rec.reason = "rejected", f"{exc.status} {exc.code}"
            rec.req = None
            return
        dpod = self.by_name.get(decode)
        ppod = self.by_name.get(prefill) if prefill else None
        if dpod is None or (prefill and ppod is None):
            raise ValueError(f"router {self.router.name!r} picked an unknown pod: {decode!r} / {prefill!r}")
        rec.decode_pod = decode
        if ppod is not None and ppod is not dpod:
            rec.prefill_pod = ppod.name
            sreq = SimRequest(rid + _PREFILL_SUFFIX, prompt, 1, arrival=now,
                              kv_transfer_params={"do_remote_decode": True}, seed=tr.index)
            self._submit(rec, ppod, sreq, now)
        else:
            self._submit(rec, dpod, SimRequest(rid, prompt, tr.output_length, arrival=now, ignore_eos=True,
                                               seed=tr.index), now)

    def _submit(self, rec: RequestRecord, pod: Pod, sreq: SimRequest, now: float) -> None:
        try:
            pod.core.add_request(sreq)
        except ValueError as exc:
            self._fail(rec, f"400 {exc}", now)
            return
        self._live[sreq.request_id] = rec
        self._kick(pod, now)

    def _fail(self, rec: RequestRecord, reason: str, now: float) -> None:
        rec.status, rec.reason = "failed", reason
        if rec.req is not None:
            self.router.on_failed(rec.req, reason, now)
            rec.req = None

    # ---- pods ------------------------------------------------------------------------------------
    def _kick(self, pod: Pod, now: float) -> None:
        if pod.busy:
            return
        core = pod.core
        res = core.step(now)
        if res.num_new_tokens:
            pod.busy = True
            pod.steps += 1
            pod.busy_time += res.duration
            self._seq += 1
            heapq.heappush(self._heap, (res.end, self._seq, _STEP, pod.index, res))
        elif res.events and self.router.wants_kv_events:
            self.router.on_kv_events(pod.name, res.events, now)
        if self._released:
            self._kick_released(now)
        if not pod.busy:
            t = core.next_event_time()
            if t is not None and t < pod.timer_at:
                pod.timer_at = t
                self._seq += 1
                heapq.heappush(self._heap, (t, self._seq, _TIMER, pod.index, None))

    def _kick_released(self, now: float) -> None:
        released, self._released = self._released, []
        for p in released:
            self._kick(p, now)

    def _on_kv_pulled(self, params: dict) -> None:
        pod = self.by_engine.get(str(params.get("remote_engine_id")))
        if pod is not None and pod.core.release_remote(params.get("remote_block_ids") or ()):
            self._released.append(pod)

    def _step_end(self, pod: Pod, res: StepResult, now: float) -> None:
        pod.busy = False
        router = self.router
        if res.events and router.wants_kv_events:
            router.on_kv_events(pod.name, res.events, now)
        live = self._live
        for out in res.outputs:
            rid = out.request_id
            rec = live.get(rid)
            if rec is None:
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
        dpod = self.by_name[rec.decode_pod]
        req = rec.req
        if req is None:  # pragma: no cover - a record always keeps its request until it ends
            return
        sreq = SimRequest(rec.request_id, req.prompt, rec.max_tokens, arrival=rec.arrival, ignore_eos=True,
                          kv_transfer_params=params, seed=rec.index)
        self._submit(rec, dpod, sreq, now)
        if rec.status == "failed" and params:  # the decode pod refused it: let the prefill pod free its KV
            self._on_kv_pulled(params)
            self._kick_released(now)


def trace_prompts(reqs: list[TraceRequest],
                  blocks: BlockTokens | None = None) -> Iterator[tuple[TraceRequest, np.ndarray]]:
    """Prompts made lazily, one request at a time, so memory holds only requests in flight."""
    blocks = blocks or BlockTokens()
    for r in reqs:
        yield r, blocks.prompt(r.hash_ids, r.input_length, r.index)


__all__ = ["ClusterSim", "Pod", "RequestRecord", "SimResult", "endpoints_for", "trace_prompts"]
