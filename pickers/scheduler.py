"""The scheduler extproc talks to: admission -> profile handler -> Decision, plus the request hooks.

``decide`` is synchronous and never awaits: the virtual-time simulator calls it with a ManualClock.
``schedule`` only adds the part that must not block the loop (tokenizing a big prompt in a thread), then
calls ``decide``. Background work (scrapers, KV-event subscribers, discovery) runs between ``start`` and
``stop`` and only when the scheduler was built with ``network=True``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np

from pickers.clock import Clock
from pickers.datalayer import DataLayer
from pickers.datalayer.endpoints import Discovery, StaticDiscovery
from pickers.datalayer.scraper import MetricsScraper
from pickers.explain import explain_text
from pickers.framework import Admission, CycleContext, Plugin, Profile, ProfileHandler
from pickers.kvblocks.subscriber import KVEventSubscriber
from pickers.promstats import SchedulerMetrics
from pickers.types import Decision, Endpoint, InferenceRequest, SchedulingError, Usage

log = logging.getLogger("kvswitch.pickers.scheduler")

_HOOKS = ("on_routed", "on_served", "on_first_token", "on_finished", "on_failed")


class KVScheduler:
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
        discovery: Discovery | None = None,
        explain_top: int = 5,
        default_decode_tokens: int = 256,
    ) -> None:
        self.datalayer = self.dl = datalayer
        self.profiles = profiles
        self.profile = profile
        self.handler = handler
        self.admission = admission
        self.clock = clock
        self.stats = stats
        self.network = network
        self.discovery = discovery
        self.explain_top = explain_top
        self.default_decode_tokens = default_decode_tokens
        plugins: list[Plugin] = [handler, *admission]
        for p in profiles.values():
            plugins += [*p.filters, *(s for s, _ in p.scorers), p.picker]
        for p in plugins:
            p.bind(datalayer)
        self._hooks: dict[str, list[Any]] = {
            h: [getattr(p, h) for p in plugins if callable(getattr(p, h, None))] for h in _HOOKS}
        self._needs_tokens = profiles[profile].needs_tokens
        run = profiles[getattr(handler, "profile", None) or profile]
        used: list[Plugin] = [handler, *admission, *run.filters, *(s for s, _ in run.scorers), run.picker]
        # KV events cost a subscription per pod and index upkeep per event: only when a plugin reads them
        self.uses_kv_events = any(p.uses_kv_events for p in used)
        datalayer.want_precise(self.uses_kv_events)
        self._scraper: MetricsScraper | None = None
        self._subscriber: KVEventSubscriber | None = None
        self._discovery_task: asyncio.Task | None = None
        self._started = False
        datalayer.endpoints.listen(self._on_endpoint)

    # ---- endpoints (discovery interface) ---------------------------------------------------------------
    def add_endpoint(self, endpoint: Endpoint) -> None:
        self.dl.endpoints.add(endpoint)

    def remove_endpoint(self, address: str) -> None:
        self.dl.endpoints.remove(address)

    def ready(self) -> bool:
        """Ready to serve once some endpoint can decode. Pod health is not part of it on purpose: a picker
        whose pods are all down still answers every request with a clear 503, which beats Envoy's own error."""
        slots = self.dl.endpoints.active_slots()
        return bool(self.dl.endpoints.can_decode[slots].any()) if len(slots) else False

    def _on_endpoint(self, what: str, slot: int, ep: Endpoint) -> None:
        if what == "add":
            self.stats.healthy.labels(ep.address).set(1)
        else:
            for g in (self.stats.healthy, self.stats.degraded):
                try:
                    g.remove(ep.address)
                except KeyError:
                    pass
        if not self._started:
            return
        if what == "add":
            self._watch(slot, ep)
        else:
            assert self._scraper is not None and self._subscriber is not None
            self._scraper.unwatch(ep.address)
            self._subscriber.unsubscribe(ep.address)

    def _watch(self, slot: int, ep: Endpoint) -> None:
        assert self._scraper is not None and self._subscriber is not None
        self._scraper.watch(slot, ep.address, ep.scrape_url)
        if ep.kv_events and self.uses_kv_events:
            self._subscriber.subscribe(ep.address, ep.kv_events)

    # ---- lifecycle --------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._started or not self.network:
            return
        s = self.dl.settings
        self._scraper = MetricsScraper(self.dl.metrics, self.dl.health, s.scrape_interval_s)
        self._subscriber = KVEventSubscriber(self.dl.kv_index, self.clock, s.kv_events_topic)
        self._started = True
        for slot in self.dl.endpoints.active_slots().tolist():
            ep = self.dl.endpoints.endpoints[slot]
            assert ep is not None
            self._watch(slot, ep)
        if self.discovery is not None and not isinstance(self.discovery, StaticDiscovery):
            self._discovery_task = asyncio.get_running_loop().create_task(
                self.discovery.run(self.dl.endpoints), name="endpoint discovery")

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        if self._discovery_task is not None:
            self._discovery_task.cancel()
            await asyncio.gather(self._discovery_task, return_exceptions=True)
            self._discovery_task = None
        if self._scraper is not None:
            await self._scraper.stop()
        if self._subscriber is not None:
            await self._subscriber.stop()

    # ---- deciding -----------------------------------------------------------------------------------------
    async def schedule(self, request: InferenceRequest) -> Decision:
        if self._needs_tokens and "tokens" not in request.cache:
            await self.dl.tokens.tokens(request)
        return self.decide(request)

    def decide(self, request: InferenceRequest) -> Decision:
        """Pick destinations now (synchronous; raises SchedulingError 429/503)."""
        now = self.clock.now()
        if not request.arrival:
            request.arrival = now
        dl = self.dl
        if dl.precise_enabled:
            dl.kv_index.refresh(now)
        ctx = CycleContext(request, dl, now)
        try:
            for a in self.admission:
                try:
                    a.admit(ctx)
                finally:
                    stale = getattr(a, "stale_endpoints", None)
                    if stale is not None:
                        self.stats.stale_ignored.set(stale)
            decision = self.handler.handle(ctx, self.profiles, self.profile)
        except SchedulingError as e:
            self.stats.rejections.labels(str(e.status), e.code).inc()
            log.info("request %s not routed: %d %s", request.request_id, e.status, e.message)
            raise
        decision.explanation = self._explain(ctx, decision)
        self._routed(ctx, decision)
        self.stats.decisions.labels(decision.profile).inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request %s -> %s", request.request_id, explain_text(decision))
        return decision

    def _explain(self, ctx: CycleContext, decision: Decision) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        addr = self.dl.endpoints.address
        k = self.explain_top
        for res in ctx.memo.get("results", ()):
            n = res.cands.size
            top = np.argsort(-res.totals, kind="stable")[:k].tolist() if n > k else range(n)
            cands = res.cands.tolist()
            chosen = [cands.index(s) for s in res.ranked.tolist()]
            keep = list(dict.fromkeys([*chosen, *top]))[: max(k, len(chosen))]
            # one vector gather per scorer, then plain floats: the same values as float(v[i]) per entry
            cols = [(label, np.asarray(v[keep], dtype=np.float64).tolist()) for label, v in res.scores.items()]
            cols.append(("total", np.asarray(res.totals[keep], dtype=np.float64).tolist()))
            for j, i in enumerate(keep):
                out[addr(cands[i])] = {label: round(vals[j], 4) for label, vals in cols}
        return out

    def _routed(self, ctx: CycleContext, decision: Decision) -> None:
        dl = self.dl
        req = decision.request
        slot = dl.endpoints.slot(decision.primary)
        pslot = dl.endpoints.slot(decision.prefill) if decision.prefill else None
        assert slot is not None
        p = ctx.prompt_tokens()
        hits = ctx._hits.get("auto")
        compute_on = pslot if pslot is not None else slot
        uncached = max(1.0, p - float(hits[compute_on])) if hits is not None and compute_on < hits.size else p
        decode = min(req.max_tokens or self.default_decode_tokens, 32768)
        dl.inflight.add(req.request_id or str(id(req)), slot, pslot, uncached, decode, ctx.now)
        hashes = req.cache.get("block_hashes")
        targets = [slot] if pslot is None else [slot, pslot]
        if hashes:
            dl.learn(hashes, targets)
        if dl.precise_enabled:
            expect = [s for s in targets if self._new_blocks(ctx, s) > 0]
            if expect:  # these pods will announce new blocks: judged from the first token (on_first_token)
                req.cache["kv_expect"] = (ctx.now, expect)
            if hashes:
                self._pend(req, targets, hashes, ctx.now)
        for h in self._hooks["on_routed"]:
            h(decision)

    def _pend(self, req: InferenceRequest, slots: list[int], hashes: dict[int, list[int]], now: float) -> None:
        """Speculative blocks: the pods computing this prompt count as holding it until its first token."""
        kv = self.dl.kv_index
        bsz = self.dl.endpoints.block_size
        key = req.request_id or str(id(req))
        for s in slots:
            h = hashes.get(int(bsz[s]))
            if h and kv.has_events[s]:
                kv.add_pending(key, s, h, now)

    def _new_blocks(self, ctx: CycleContext, slot: int) -> int:
        """Full prompt blocks pod ``slot`` does not hold per the precise index: the blocks it will store and
        announce in KV events. Without block hashes (a profile that never tokenizes) every full block counts."""
        bs = int(self.dl.endpoints.block_size[slot]) or 16
        hashes = ctx.request.cache.get("block_hashes", {}).get(bs)
        if hashes is None:
            return ctx.prompt_tokens() // bs
        hits = ctx._hits.get("precise")
        if hits is None:
            hits = ctx._hits.get("auto")
            if hits is None or self.dl.kv_index.degraded[slot]:
                hits = ctx.hit_tokens("precise")
        held = int(hits[slot]) // bs if slot < hits.size else 0
        return len(hashes) - held

    def _expect_events(self, req: InferenceRequest, at: float) -> None:
        expect = req.cache.pop("kv_expect", None)
        if expect is not None:
            routed_at, slots = expect
            for s in slots:
                self.dl.kv_index.expect_events(s, routed_at, at)

    # ---- hooks from the response path ------------------------------------------------------------------
    def on_served(self, decision: Decision, served: str) -> None:
        req = decision.request
        req.cache["served"] = served
        self._passed_over(decision, served)
        if served != decision.primary:
            slot = self.dl.endpoints.slot(served)
            if slot is not None:
                key = req.request_id or str(id(req))
                self.dl.inflight.move(key, slot)
                expect = req.cache.get("kv_expect")
                was = self.dl.endpoints.slot(decision.primary)
                if expect is not None and was in expect[1]:
                    expect[1][expect[1].index(was)] = slot
                hashes = req.cache.get("block_hashes")
                if hashes:
                    self.dl.learn(hashes, [slot])
                    if self.dl.precise_enabled:  # the pending blocks follow the request to the pod serving it
                        self.dl.kv_index.clear_pending(key)
                        pslot = self.dl.endpoints.slot(decision.prefill) if decision.prefill else None
                        self._pend(req, [slot] if pslot is None else [slot, pslot], hashes, self.clock.now())
        for h in self._hooks["on_served"]:
            h(decision, served)

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
        req = decision.request
        key = req.request_id or str(id(req))
        self.dl.inflight.first_token(key)
        self.dl.kv_index.clear_pending(key)
        self._expect_events(req, at)
        for h in self._hooks["on_first_token"]:
            h(decision, at)

    def on_finished(self, decision: Decision, usage: Usage | None, at: float) -> None:
        req = decision.request
        key = req.request_id or str(id(req))
        self.dl.inflight.finish(key)
        self.dl.kv_index.clear_pending(key)
        self._expect_events(req, at)  # no first token was reported: judge from the end
        slot = self.dl.endpoints.slot(req.cache.get("served", decision.primary))
        if slot is not None:
            self.dl.health.request_success(slot, at)
        for h in self._hooks["on_finished"]:
            h(decision, usage, at)

    def on_failed(self, decision: Decision, reason: str, at: float) -> None:
        req = decision.request
        key = req.request_id or str(id(req))
        self.dl.inflight.finish(key)
        self.dl.kv_index.clear_pending(key)
        req.cache.pop("kv_expect", None)  # a failed request may never have stored its blocks: no evidence
        slot = self.dl.endpoints.slot(req.cache.get("served", decision.primary))
        if slot is not None:
            self.dl.health.request_failure(slot, reason, at)
        for h in self._hooks["on_failed"]:
            h(decision, reason, at)
