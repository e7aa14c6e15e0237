"""The director: one owner of a request's way through the picker, from the parsed request to its end.

extproc/ turns an Envoy stream into an ``InferenceRequest`` and calls ``route``; everything between that
and the Envoy header mutations happens here, in this order:

1. state     a ``RequestState`` (pickers/state.py) keyed by the gateway's request id; token ids computed
             now if the profile needs them (a big prompt through a real tokenizer in a worker thread).
   slo       the request's targets and priority (headers, objective, pool defaults: pickers/slo.py),
             resolved once into ``state.slo``; a malformed SLO header is a 400.
2. subset    the gateway's subset hint, applied once: an empty hint, or one naming no known endpoint, is a
             503 (``subset_empty`` / ``subset_no_match``); otherwise only endpoints inside it are candidates.
3. admission each admission plugin accepts or raises 429 (``SchedulingError``) before any work is paid for.
   hold      flow control (pickers/flowcontrol.py): when no candidate's queue has room, the admitted request
             waits in the picker and steps 4-6 run the moment one has (late binding); released requests are
             decided on the fleet's events (first tokens, ends, failures) and on a short tick.
4. handler   the profile handler runs the profile(s) over the candidates: filters, scorers (reading the
             state's prediction, computed once), picker; maybe a prefill pod (prefill/decode handler).
5. fallback  the decode ranking becomes the fallback list, cut to ``max_fallback``.
6. record    in-flight load (prefill work on the prefill pod, decode on the decode pod), the prompt's blocks
             in the approximate index, pending blocks and expected KV events for the precise index, the
             the chosen pods' predicted TTFT/TPOT (``state.expected``), the explanation; then the
             plugins' ``on_routed`` hooks.
7. response  ``on_served`` (the gateway's fallback may have moved it), ``on_first_token``, then exactly one of
             ``on_finished`` / ``on_failed``: load released, pending blocks cleared, KV-event expectations
             judged, pod health updated, the predictor's online correction fed with the observed TTFT
             (first token) and TPOT (end), plugin hooks called.

``decide`` (steps 2-6) is synchronous and never awaits, so the virtual-time simulator drives this same
code with a ManualClock (``decide_or_hold`` and ``dispatch_held`` with flow control). Background upkeep
(scrapes, KV events, discovery) belongs to the data layer and runs between ``start`` and ``stop``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from engine.kvcache.hashing import MAX_ROUTED_BLOCKS, hash_block_keys
from pickers.clock import Clock
from pickers.datalayer import DataLayer
from pickers.explain import explain_text
from pickers.flowcontrol import FlowControl, FlowControlSettings, Held, Room
from pickers.framework import Admission, CycleContext, Plugin, Profile, ProfileHandler
from pickers.promstats import SchedulerMetrics
from pickers.slo import SLOPolicy
from pickers.state import Expected, KVExpectation, RequestState
from pickers.types import Decision, Endpoint, InferenceRequest, SchedulingError, Usage

# Prompts at least this long are hashed in a worker thread (route). The compiled chain hashes ~1 ns per token (a
# 50K-token prompt in ~50 us, the most it hashes at block size 16, MAX_ROUTED_BLOCKS, in ~0.3 ms), while a worker
# thread's hop (submit, wake, the loop woken back, the GIL handed twice) cost ~0.3 ms on a 2-core VM: below this
# length the hop cost the request more than it freed the loop.
OFFLOAD_HASH_TOKENS = 1 << 18
# A request whose prefill end is watched in its pod's KV events (access-log mode) leaves the queued prefill at
# that event, or at this multiple of its predicted TTFT if the event never comes (lost, or the pod down).
WATCHED_PREFILL_BOUND = 4.0
log = logging.getLogger("kvswitch.pickers.director")


class Director:
    """Implements ``pickers.types.Scheduler`` over the scheduling framework (see the module docstring)."""

    def __init__(
        self,
        datalayer: DataLayer,
        profiles: dict[str, Profile],
        profile: str,
        handler: ProfileHandler,
        admission: list[Admission],
        clock: Clock,
        stats: SchedulerMetrics,
        network: bool = True,
        explain_top: int = 5,
        default_decode_tokens: int = 256,
        max_fallback: int = 0,
        slo: SLOPolicy | None = None,
        prefill_end_from_kv_events: bool = False,
        flow_control: FlowControlSettings | None = None,
    ) -> None:
        self.dl = datalayer
        self.profiles = profiles
        self.profile = profile
        self.handler = handler
        self.admission = admission
        self.clock = clock
        self.stats = stats
        self.network = network
        self.explain_top = explain_top
        self.default_decode_tokens = default_decode_tokens
        self.max_fallback = max_fallback  # 0: the picker's whole ranking
        self.slo = slo or SLOPolicy()
        # True when the gateway reports a response only once it ended (extproc access-log mode): a routed
        # request's prompt then leaves the in-flight prefill counts at its predicted first token.
        self.predicted_first_token = False
        # With predicted first tokens: end a prefill at its pod's KV event for the prompt's last full block
        # (pickers/kvblocks/prefill_watch.py). Off by default: in real time through Envoy it cost multi-turn at
        # 3x the knee 12.8 -> 12.1 req/s and 6-8 points of hit rate in all three repetitions, which its virtual-
        # time emulation does not show (there it matches live first tokens on shared-prefix, where the real
        # runs did not clearly gain); README "The default profile".
        self.prefill_end_from_kv_events = prefill_end_from_kv_events
        ends = stats.prefill_ends  # the counter's children once, not a label lookup per request
        self._ended_by_event, self._ended_by_prediction, self._ended_without_event = (
            ends.labels("kv_event"), ends.labels("prediction"), ends.labels("no_event"))
        # Fill Decision.explanation (the scores per endpoint, the prediction, the targets). A server without
        # debug headers turns it off: nothing else reads it there, and it is ~10 % of a default decision.
        self.explain = True
        # Flow control: on when its settings say so, else when the running profile asks for it
        fc = flow_control or FlowControlSettings()
        on = fc.enabled if fc.enabled is not None else profiles[handler.profile or profile].flow_control
        self.flow: FlowControl | None = FlowControl(datalayer, fc, stats.flow_queued.set) if on else None
        self._ticker: asyncio.Task[None] | None = None
        run = profiles[handler.profile or profile]
        used: list[Plugin] = [handler, *admission, *run.plugins]
        every: list[Plugin] = [handler, *admission]
        for prof in profiles.values():
            every += prof.plugins
        for plugin in every:
            plugin.bind(datalayer)
        for a in admission:
            a.prefill_legs = handler.runs_prefill_legs
        # the hooks each plugin overrides (the base class's are no-ops)
        self._on_routed = [p.on_routed for p in every if type(p).on_routed is not Plugin.on_routed]
        self._on_served = [p.on_served for p in every if type(p).on_served is not Plugin.on_served]
        self._on_first_token = [p.on_first_token for p in every
                                if type(p).on_first_token is not Plugin.on_first_token]
        self._on_finished = [p.on_finished for p in every if type(p).on_finished is not Plugin.on_finished]
        self._on_failed = [p.on_failed for p in every if type(p).on_failed is not Plugin.on_failed]
        self.needs_tokens = any(p.needs_tokens for p in used)
        # KV events cost a subscription per pod and index upkeep per event: only when a plugin reads them
        self.uses_kv_events = any(p.uses_kv_events for p in used)
        datalayer.want_precise(self.uses_kv_events)
        self.uses_metrics = any(p.reads_metrics for p in used)
        datalayer.want_metrics(self.uses_metrics)
        self._started = False
        datalayer.endpoints.listen(self._endpoint_gauges)

    def add_observer(self, observer: Plugin) -> None:
        """Call ``observer``'s request hooks (those it overrides) after the profiles' own: something outside
        the scheduling profiles that watches the traffic (the live planner's ``TrafficObserver``)."""
        for name, hooks in (("on_routed", self._on_routed), ("on_served", self._on_served),
                            ("on_first_token", self._on_first_token), ("on_finished", self._on_finished),
                            ("on_failed", self._on_failed)):
            if getattr(type(observer), name) is not getattr(Plugin, name):
                hooks.append(getattr(observer, name))

    # ---- endpoints and lifecycle ------------------------------------------------------------------------
    def add_endpoint(self, endpoint: Endpoint) -> None:
        self.dl.endpoints.add(endpoint)

    def remove_endpoint(self, address: str) -> None:
        self.dl.endpoints.remove(address)

    def ready(self) -> bool:
        return self.dl.ready()

    async def start(self) -> None:
        if self._started or not self.network:
            return
        self._started = True
        await self.dl.start()
        if self.dl.warmups is not None:
            counters = {o: self.stats.warmups.labels(o) for o in ("offered", "ok", "failed", "expired")}
            self.dl.warmups.count = lambda outcome: counters[outcome].inc()
            self.dl.warmups.piece_time = self.stats.warmup_piece.observe

    async def stop(self) -> None:
        """Stop the data layer's upkeep; requests still held are answered with a 503 (the picker is going)."""
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
        if self.flow is not None:
            for h in self.flow.take_all():
                h.release(SchedulingError(503, "the endpoint picker is stopping; retry the request",
                                          "picker_stopping"))
        if not self._started:
            return
        self._started = False
        await self.dl.stop()

    def _endpoint_gauges(self, what: str, slot: int, ep: Endpoint) -> None:
        if what == "add":
            self.stats.healthy.labels(ep.id).set(1)
            return
        for gauge in (self.stats.healthy, self.stats.degraded):
            try:
                gauge.remove(ep.id)
            except KeyError:
                pass

    # ---- 1-6: deciding ------------------------------------------------------------------------------------
    def _new_state(self, request: InferenceRequest) -> RequestState:
        now = self.clock.now()
        if not request.arrival:
            request.arrival = now
        return RequestState(request, request.request_id or f"req-{id(request):x}", request.arrival)

    async def route(self, request: InferenceRequest) -> Decision:
        """Decide for a request off the wire (tokenizing a big prompt off the event loop first)."""
        state = self._new_state(request)
        if self.needs_tokens:
            state.tokens = await self.dl.tokens.tokens(request)
            if state.tokens is not None and state.tokens.size >= OFFLOAD_HASH_TOKENS:
                await self._hash_off_loop(state)
        ctx = self._admit(state)
        flow = self._holding(state)
        return self._schedule(ctx) if flow is None else await self._held(flow, ctx)

    def _holding(self, state: RequestState) -> FlowControl | None:
        """The flow control that holds this admitted request, or None when it is decided now."""
        flow = self.flow
        return flow if flow is not None and flow.should_hold(state, self.handler.runs_prefill_legs) else None

    async def _held(self, flow: FlowControl, ctx: CycleContext) -> Decision:
        """Wait for the release of a held request; a client that goes away takes it out of the queue (or, released
        already, gives its decision's load back)."""
        fut: asyncio.Future[Decision | SchedulingError] = asyncio.get_running_loop().create_future()

        def release(result: Decision | SchedulingError) -> None:
            if not fut.done():
                fut.set_result(result)

        held = flow.hold(ctx.state, ctx.now, release, self._prefill_work(ctx))
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick(flow), name="flow control")
        try:
            result = await fut
        except asyncio.CancelledError:
            if not flow.cancel(held) and fut.done():
                got = fut.result()
                if isinstance(got, Decision):
                    self._release(got.state)  # decided, never sent: its load goes back
            raise
        if isinstance(result, SchedulingError):
            raise result
        return result

    async def _tick(self, flow: FlowControl) -> None:
        """Re-check the room while requests are held: scrapes and predicted first tokens move it without a hook."""
        tick = flow.settings.tick_s
        while flow.queued:
            await asyncio.sleep(tick)
            try:
                self.dispatch_held()
            except Exception:  # a bug here must not strand the held requests: they still go at their deadline
                log.exception("flow control: dispatching held requests failed")

    async def _hash_off_loop(self, state: RequestState) -> None:
        """A long prompt's block hashes, computed in a worker thread before the (synchronous) cycle reads
        them, so the event loop keeps serving health checks, scrapes and small requests meanwhile."""
        active = self.dl.endpoints.active_slots()
        tokens = state.tokens
        assert tokens is not None
        for bs in sorted({int(b) for b in self.dl.endpoints.block_size[active].tolist()}):
            if bs not in state.block_hashes:
                state.block_hashes[bs] = await asyncio.to_thread(hash_block_keys, tokens, bs,
                                                                 limit=MAX_ROUTED_BLOCKS)

    def decide(self, request: InferenceRequest) -> Decision:
        """Decide now, synchronously, whatever the room (raises SchedulingError 429/503)."""
        return self._schedule(self._admit(self._new_state(request)))

    def decide_or_hold(self, request: InferenceRequest,
                       release: Callable[[Decision | SchedulingError], None]) -> Decision | None:
        """Decide now, or hold the request (flow control) and return None: ``release`` then gets its decision
        (or the error that answers it) from a later ``dispatch_held``. Synchronous (virtual time)."""
        state = self._new_state(request)
        ctx = self._admit(state)
        flow = self._holding(state)
        if flow is None:
            return self._schedule(ctx)
        flow.hold(state, ctx.now, release, self._prefill_work(ctx))
        return None

    def _prefill_work(self, ctx: CycleContext) -> float:
        """The prompt tokens of this request that no candidate holds: its prefill where it is warmest, as the
        caches are now (a profile that never tokenizes knows no caches: the whole prompt, estimated)."""
        prompt = float(ctx.prompt_tokens())
        cands = ctx.state.candidates
        if not self.needs_tokens or cands is None or cands.size == 0:
            return prompt
        return prompt - float(ctx.hit_tokens("auto")[cands].max())

    def dispatch_held(self) -> int:
        """Decide every held request that may go now (room, deadline, nothing left to serve it), one at a time:
        each decision's load closes the room it used before the next is weighed. Returns how many went."""
        flow = self.flow
        if flow is None or not flow.queued:
            return 0
        now = self.clock.now()
        self._refresh(now)
        n = 0
        while (nxt := flow.next_ready(now)) is not None:
            held, why, room = nxt
            result = self._decide_held(held, room, now)
            self.stats.flow_released.labels(why).inc()
            self.stats.flow_wait.observe(now - held.held_at)
            held.release(result)
            n += 1
        return n

    def _decide_held(self, held: Held, room: Room | None, now: float) -> Decision | SchedulingError:
        """Decide a released request; ``room``: the room it was released on, when it was released for room."""
        state = held.state
        # what the admission cycle computed describes the fleet as it was then
        state.hits.clear()
        state.predictions.clear()
        state.results.clear()
        state.rejected.clear()
        try:
            state.candidates = self._candidates(state.request)  # the fleet may have changed while it waited
        except SchedulingError as e:
            self._rejected(state, e)
            return e
        ctx = CycleContext(state, self.dl, now)
        full = self._to_room(ctx, room) if room is not None else None
        try:
            decision = self._schedule(ctx)
        except SchedulingError as e:  # counted by _schedule
            return e
        if full is not None:
            self._fall_back_to_full(decision, full, now)
        return decision

    def _to_room(self, ctx: CycleContext, room: Room) -> np.ndarray | None:
        """With ``room_first``, a request released because a pod has room goes among the pods with room (what late
        binding is for: the TTFT terms may not tell a pod with an empty queue from one with a short one), unless
        that would lose more than ``cache_loss`` of its prompt in cached tokens against the warmest candidate.
        Without token ids (a profile that never tokenizes) nothing is known of caches and the room decides.
        Returns the healthy pods set aside (for the fallback list), or None when the candidates are left as they
        were."""
        flow = self.flow
        state = ctx.state
        cands = state.candidates
        if flow is None or cands is None or not flow.settings.room_first:
            return None
        usable, roomy = room  # as flow control found it when it released the request (nothing moved since)
        keep = cands[roomy[cands]]
        if keep.size == 0 or keep.size == cands.size:
            return None
        if self.needs_tokens:
            hits = ctx.hit_tokens("auto")
            if float(hits[cands].max() - hits[keep].max()) > flow.settings.cache_loss * ctx.prompt_tokens():
                return None
        state.candidates = keep
        return cands[usable[cands] & ~roomy[cands]]

    def _fall_back_to_full(self, decision: Decision, full: np.ndarray, now: float) -> None:
        """The healthy pods without room that ``_to_room`` set aside stay in the fallback list, after the profile's
        ranking and shortest queue first: the gateway still has somewhere to retry if the pods with room fail."""
        if full.size:
            full = full[np.argsort(self.dl.waiting_now(full, now), kind="stable")]
            seen = set(decision.endpoints)
            decision.endpoints += [a for a in self.dl.endpoints.addresses(full) if a not in seen]
            if self.max_fallback:
                decision.endpoints = decision.endpoints[: self.max_fallback]

    def _refresh(self, now: float) -> None:
        """Bring the in-flight load up to ``now``: prefills ended per KV events, predicted first tokens due."""
        dl = self.dl
        if dl.precise_enabled:
            dl.kv_index.refresh(now)
            for key, at in dl.kv_index.prefill_watch.take():  # prefills ended, per their pods' KV events
                dl.inflight.first_token(key, at)
                dl.kv_index.clear_pending(key)  # as at a first token: the pods' events tell the rest
                self._ended_by_event.inc()
        dl.inflight.settle(now)

    def _admit(self, state: RequestState) -> CycleContext:
        """Steps 1-3: targets, candidates, admission (raises the SchedulingError that answers the request)."""
        now = self.clock.now()
        self._refresh(now)
        ctx = CycleContext(state, self.dl, now)
        if self.needs_tokens:  # before anything reads the prompt's length: one count for the whole cycle
            ctx.token_ids()
        try:
            state.slo = self.slo.resolve(state.request)
            state.candidates = self._candidates(state.request)
            for a in self.admission:
                try:
                    a.admit(ctx)
                finally:
                    self.stats.stale_ignored.set(a.stale_endpoints)
        except SchedulingError as e:
            self._rejected(state, e)
            raise
        return ctx

    def _rejected(self, state: RequestState, e: SchedulingError) -> None:
        self.stats.rejections.labels(str(e.status), e.code).inc()
        log.info("request %s not routed: %d %s", state.key, e.status, e.message)

    def _schedule(self, ctx: CycleContext) -> Decision:
        """Steps 4-6 on an admitted request: the handler's decision, recorded."""
        state, now = ctx.state, ctx.now
        try:
            decision = self.handler.handle(ctx, self.profiles, self.profile)
        except SchedulingError as e:
            self._rejected(state, e)
            raise
        if self.max_fallback:
            decision.endpoints = decision.endpoints[: self.max_fallback]
        state.decode = decision.primary
        state.prefill = decision.prefill
        state.decided_at = decision.decided_at = now
        state.expected = self._expected(ctx, decision)
        if self.explain:  # per-endpoint scores for debug headers and logs; off, a server saves the work
            decision.explanation = self._explain(state, decision)
        self._record(ctx, decision)
        self.stats.decisions.labels(decision.profile).inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request %s -> %s", state.key, explain_text(decision))
        return decision

    def _candidates(self, request: InferenceRequest) -> np.ndarray:
        """Active endpoints, inside the gateway's subset hint when it sent one (the one place it is applied)."""
        active = self.dl.endpoints.active_slots()
        subset = request.subset
        if subset is None:
            return active
        if not subset:
            raise SchedulingError(503, "the gateway's subset hint (x-gateway-destination-endpoint-subset) is "
                                  "empty: no endpoint may serve this request", "subset_empty")
        pod_slots = self.dl.endpoints.pod_slots  # the hint names pods (ip:port): every rank of one may serve
        inside = {s for a in subset for s in pod_slots(a)}
        keep = np.fromiter((s for s in active.tolist() if s in inside), dtype=active.dtype)
        if keep.size == 0:
            raise SchedulingError(503, f"no endpoint the picker knows is in the gateway's subset hint "
                                  f"{subset[:8]}", "subset_no_match")
        return keep

    def _explain(self, state: RequestState, decision: Decision) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        if state.pd is not None:
            out["_pd"] = state.pd.explain()

        addr = self.dl.endpoints.address
        k = self.explain_top
        for res in state.results:
            n = res.cands.size
            top = np.argsort(-res.totals, kind="stable")[:k].tolist() if n > k else list(range(n))
            cands = res.cands.tolist()
            chosen = [cands.index(s) for s in res.ranked.tolist()]
            keep = list(dict.fromkeys([*chosen, *top]))[: max(k, len(chosen))]
            # one vector gather per scorer, then plain floats
            cols = [(label, np.asarray(v[keep], dtype=np.float64).tolist()) for label, v in res.scores.items()]
            cols.append(("total", np.asarray(res.totals[keep], dtype=np.float64).tolist()))
            for j, i in enumerate(keep):
                a = addr(cands[i])
                if a is not None:
                    out[a] = {label: round(vals[j], 4) for label, vals in cols}
        exp, slo = state.expected, state.slo
        if exp is not None:  # last: the chosen pods' predicted latencies and the request's targets
            sx = {"pred-ttft-ms": round(exp.ttft_s * 1e3, 2), "pred-tpot-ms": round(exp.tpot_s * 1e3, 3)}
            if slo.ttft_s is not None:
                sx["ttft-ms"] = round(slo.ttft_s * 1e3, 2)
            if slo.tpot_s is not None:
                sx["tpot-ms"] = round(slo.tpot_s * 1e3, 3)
            if slo.priority:
                sx["priority"] = float(slo.priority)
            out["_slo"] = sx
        return out

    def _expected(self, ctx: CycleContext, decision: Decision) -> Expected | None:
        """The chosen pods' predicted latencies, from the prediction the cycle already made (else one now).

        Without a prefill leg: TTFT and TPOT on the decode pod. With one: the prefill pod's TTFT plus one
        decode step on the decode pod (its first token), TPOT on the decode pod.
        """
        ep = self.dl.endpoints
        slot = ep.slot(decision.primary)
        if slot is None:
            return None
        pslot = ep.slot(decision.prefill) if decision.prefill else None
        preds = ctx.state.predictions
        pred = preds.get("auto") or next(iter(preds.values()), None) or ctx.prediction("auto")
        if slot >= pred.ttft_s.size or (pslot is not None and pslot >= pred.ttft_s.size):
            return None
        raw_t = pred.ttft_raw_s if pred.ttft_raw_s is not None else pred.ttft_s
        raw_p = pred.tpot_raw_s if pred.tpot_raw_s is not None else pred.tpot_s
        if pslot is None:
            return Expected(slot, slot, float(pred.ttft_s[slot]), float(pred.tpot_s[slot]),
                            float(raw_t[slot]), float(raw_p[slot]))
        return Expected(pslot, slot, float(pred.ttft_s[pslot] + pred.tpot_s[slot]), float(pred.tpot_s[slot]),
                        float(raw_t[pslot] + raw_p[slot]), float(raw_p[slot]))

    def _observe(self, exp: Expected, latency: str, observed: float) -> None:
        """Feed the online correction (raw prediction vs observed) and the error histogram (corrected)."""
        slot = exp.prefill_slot if latency == "ttft" else exp.decode_slot
        raw, pred = (exp.ttft_raw_s, exp.ttft_s) if latency == "ttft" else (exp.tpot_raw_s, exp.tpot_s)
        self.dl.predictor.correction.observe(slot, latency, raw, observed)
        endpoint = self.dl.endpoints.endpoints[slot] if slot < len(self.dl.endpoints.endpoints) else None
        if endpoint is not None and pred > 0.0:
            self.stats.prediction_ratio.labels(latency, endpoint.accelerator, endpoint.role.value).observe(
                observed / pred)

    def _record(self, ctx: CycleContext, decision: Decision) -> None:
        """Step 6: what the decision commits the fleet to, before any response is seen."""
        dl, state = self.dl, ctx.state
        req = state.request
        slot = dl.endpoints.slot(decision.primary)
        pslot = dl.endpoints.slot(decision.prefill) if decision.prefill else None
        assert slot is not None
        p = ctx.prompt_tokens()
        hits = state.hits.get("auto")
        compute_on = pslot if pslot is not None else slot
        uncached = max(1.0, p - float(hits[compute_on])) if hits is not None and compute_on < hits.size else p
        decode = min(req.max_tokens or self.default_decode_tokens, 32768)
        exp = state.expected  # no live first token (access-log mode): the prediction stands in for it
        due = ctx.now + exp.ttft_s if self.predicted_first_token and exp is not None else None
        targets = [slot] if pslot is None else [slot, pslot]
        expect = [s for s in targets if self._new_blocks(ctx, s) > 0] if dl.precise_enabled else []
        if (due is not None and exp is not None and self.prefill_end_from_kv_events and compute_on in expect
                and self._watch_prefill(ctx, compute_on)):
            # the pod's KV event ends the prefill; the prediction only bounds a lost event (a short one released
            # the queued prefill early and piled prompts on the pod: pickers/kvblocks/prefill_watch.py)
            due = ctx.now + WATCHED_PREFILL_BOUND * exp.ttft_s
        elif due is not None:
            self._ended_by_prediction.inc()
        dl.inflight.add(state.key, slot, pslot, uncached, decode, ctx.now, due)
        if state.block_hashes:
            dl.learn(state.block_hashes, targets)
        if dl.precise_enabled:
            if expect:  # these pods will announce new blocks: judged from the first token
                state.kv_expect = KVExpectation(ctx.now, expect)
            if state.block_hashes:
                self._pend(state, targets, ctx.now)
        for hook in self._on_routed:
            hook(decision)

    def _watch_prefill(self, ctx: CycleContext, slot: int) -> bool:
        """No first token will be reported while this request runs: take the KV event of its prompt's last full
        block on ``slot`` (the pod computing it) as the end of its prefill, when that is sooner than the
        predicted first token (pickers/kvblocks/prefill_watch.py). Only for a prompt hashed in full (every
        block, not a routing prefix of it) on a pod that publishes events."""
        kv = self.dl.kv_index
        bs = int(self.dl.endpoints.block_size[slot]) or 16
        hashes = ctx.state.block_hashes.get(bs)
        if hashes is None or not len(hashes) or len(hashes) != ctx.prompt_tokens() // bs or not kv.has_events[slot]:
            return False
        return kv.prefill_watch.watch(ctx.state.key, slot, int(hashes[-1]))

    def _pend(self, state: RequestState, slots: list[int], now: float) -> None:
        """Speculative blocks: the pods computing this prompt count as holding it until its first token."""
        kv = self.dl.kv_index
        bsz = self.dl.endpoints.block_size
        for s in slots:
            h = state.block_hashes.get(int(bsz[s]))
            if h is not None and len(h) and kv.has_events[s]:
                kv.add_pending(state.key, s, h, now)

    def _new_blocks(self, ctx: CycleContext, slot: int) -> int:
        """Full prompt blocks pod ``slot`` does not hold per the precise index: the blocks it will store and
        announce in KV events. Without block hashes (a profile that never tokenizes) every full block counts."""
        bs = int(self.dl.endpoints.block_size[slot]) or 16
        state = ctx.state
        hashes = state.block_hashes.get(bs)
        if hashes is None:
            return ctx.prompt_tokens() // bs
        hits = state.hits.get("precise")
        if hits is None:
            hits = state.hits.get("auto")
            if hits is None or self.dl.kv_index.degraded[slot]:
                hits = ctx.hit_tokens("precise")
        held = int(hits[slot]) // bs if slot < hits.size else 0
        return len(hashes) - held

    # ---- 7: the response ---------------------------------------------------------------------------------
    def on_served(self, decision: Decision, served: str) -> None:
        state = decision.state
        state.served = served
        self._passed_over(decision, served)
        if served != decision.primary:
            state.expected = None  # predicted for another pod: nothing to learn from this one
            slot = self.dl.endpoints.slot(served)
            if slot is not None:
                self.dl.inflight.move(state.key, slot)
                expect = state.kv_expect
                was = self.dl.endpoints.slot(decision.primary)
                if expect is not None and was in expect.slots:
                    expect.slots[expect.slots.index(was)] = slot
                if state.block_hashes:
                    self.dl.learn(state.block_hashes, [slot])
                    if self.dl.precise_enabled:  # the pending blocks follow the request to the pod serving it
                        self.dl.kv_index.clear_pending(state.key)
                        self.dl.kv_index.prefill_watch.unwatch(state.key)  # another pod: the prediction stands
                        pslot = self.dl.endpoints.slot(decision.prefill) if decision.prefill else None
                        self._pend(state, [slot] if pslot is None else [slot, pslot], self.clock.now())
        self._call(self._on_served, decision, served)

    def _passed_over(self, decision: Decision, served: str) -> None:
        """The gateway walked past the endpoints before ``served`` in the fallback list: each of them failed
        this request (connect failure, reset, 5xx or per-try timeout) before any byte reached the client."""
        if served not in decision.endpoints:
            return
        now = self.clock.now()
        for addr in decision.endpoints[: decision.endpoints.index(served)]:
            slot = self.dl.endpoints.slot(addr)
            if slot is not None:
                self.dl.health.request_failure(slot, "passed over by the gateway (failed before any byte)", now)

    def on_first_token(self, decision: Decision, at: float) -> None:
        state = decision.state
        self.dl.inflight.first_token(state.key)
        self.dl.kv_index.clear_pending(state.key)
        self._unwatch(state)
        self._judge_kv_events(state, at)
        exp = state.expected
        if exp is not None and exp.first_token_at < 0.0:
            exp.first_token_at = at
            # from the decision: the prediction is the pod's part (a held request waited before it)
            self._observe(exp, "ttft", at - state.decided_at)
        self._call(self._on_first_token, decision, at)
        if self.flow is not None and self.flow.queued:
            self.dispatch_held()

    def on_finished(self, decision: Decision, usage: Usage | None, at: float) -> None:
        state = decision.state
        self._release(state)
        self._judge_kv_events(state, at)  # no first token was reported: judge from the end
        slot = self._serving_slot(state)
        if slot is not None:
            self.dl.health.request_success(slot, at)
        exp = state.expected
        if exp is not None and exp.first_token_at >= 0.0 and usage is not None and usage.completion_tokens >= 2:
            self._observe(exp, "tpot", (at - exp.first_token_at) / (usage.completion_tokens - 1))
        self._call(self._on_finished, decision, usage, at)
        if self.flow is not None and self.flow.queued:
            self.dispatch_held()

    def on_failed(self, decision: Decision, reason: str, at: float) -> None:
        state = decision.state
        self._release(state)
        state.kv_expect = None  # a failed request may never have stored its blocks: no evidence
        slot = self._serving_slot(state)
        if slot is not None:
            self.dl.health.request_failure(slot, reason, at)  # pod faults only (datalayer.health.pod_fault)
        self._call(self._on_failed, decision, reason, at)
        if self.flow is not None and self.flow.queued:
            self.dispatch_held()

    def _release(self, state: RequestState) -> None:
        self.dl.inflight.finish(state.key)
        self.dl.kv_index.clear_pending(state.key)
        self._unwatch(state)

    def _unwatch(self, state: RequestState) -> None:
        if self.dl.kv_index.prefill_watch.unwatch(state.key):  # watched, and its pod's event never came
            self._ended_without_event.inc()

    def _serving_slot(self, state: RequestState) -> int | None:
        serving = state.serving
        return self.dl.endpoints.slot(serving) if serving is not None else None

    def _judge_kv_events(self, state: RequestState, at: float) -> None:
        expect, state.kv_expect = state.kv_expect, None
        if expect is not None:
            for s in expect.slots:
                self.dl.kv_index.expect_events(s, expect.routed_at, at)

    @staticmethod
    def _call(hooks: list[Callable[..., None]], *args: Any) -> None:
        for hook in hooks:
            hook(*args)


__all__ = ["Director"]
