"""The data layer every plugin reads: endpoints, scraped metrics, health, in-flight load, KV-block indexes
(approximate, learned from our own decisions; precise, fed by KV events), the cost model per pod, the
latency predictor, tokens. Between ``start`` and ``stop`` it keeps itself current: a metrics scrape per
pod, a KV-event subscription per pod that publishes events (only when a plugin reads them), and the
discovery source that adds and removes pods. Without ``start`` (virtual time, tests) it is fed directly:

Feed it directly in virtual time or tests::

    dl.metrics.update("10.0.0.1:8000", PodMetrics(waiting=2, running=10, kv_usage=0.4))
    dl.kv_index.apply_events("10.0.0.1:8000", [{"type": "BlockStored", ...}], now=clock.now())
    dl.endpoints.add(Endpoint(...)); dl.endpoints.remove("10.0.0.1:8000")
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pickers.clock import Clock
from pickers.costs import CostTable
from pickers.datalayer.endpoints import Discovery, EndpointTable, StaticDiscovery
from pickers.datalayer.health import HealthTracker
from pickers.datalayer.inflight import InflightTracker
from pickers.datalayer.metrics import MetricsStore, PodMetrics
from pickers.datalayer.scraper import MetricsScraper
from pickers.datalayer.warmupsender import WarmupSender
from pickers.kvblocks.index import BlockIndex
from pickers.kvblocks.precise import PreciseIndex
from pickers.kvblocks.subscriber import KVEventSubscriber
from pickers.predictor import Predictor, PredictorSettings
from pickers.ranks import learn_ranks
from pickers.state import PrefixMode
from pickers.tokenize import TokenService
from pickers.types import Endpoint
from pickers.warmup import Warmups

if TYPE_CHECKING:
    from pickers.framework import CycleContext

__all__ = ["DataLayer", "DataLayerSettings", "Discovery", "EndpointTable", "PodMetrics", "StaticDiscovery"]


@dataclass
class DataLayerSettings:
    max_endpoints: int = 1024
    scrape_interval_s: float = 0.05
    # each scrape names the families the picker reads (name[]): a pod serving prometheus_client's filter renders
    # only those (pickers/datalayer/promparse.py); False: the configured URL as it is
    scrape_read_families_only: bool = True
    stale_after_intervals: float = 4.0
    failure_threshold: int = 3  # failed scrapes in a row that take a pod out
    request_failure_threshold: int = 3  # pod faults in a row on our requests that eject a pod (outlier detection)
    base_ejection_s: float = 1.0  # first ejection; doubles with each ejection in a row
    max_ejection_s: float = 60.0
    max_ejected_fraction: float = 0.5  # never eject more than this share of the pool
    approx_max_blocks: int = 4_000_000
    approx_pod_blocks: int = 200_000  # per pod when /metrics gives no num_gpu_blocks
    precise_max_blocks: int = 10_000_000
    medium_weights: dict[str, float] = field(default_factory=lambda: {"GPU": 1.0, "CPU": 0.8})
    engine_map_cap: int = 2_000_000
    degraded_after_s: float = 10.0
    pending_ttl_s: float = 5.0
    pending_max_blocks: int = 1_000_000
    inflight_ttl_s: float = 600.0
    kv_events_topic: str = ""
    dp_ranks: str = "auto"  # auto: learn a pod's data-parallel ranks from its metrics' engine labels; off: don't


class DataLayer:
    def __init__(self, clock: Clock, tokens: TokenService, settings: DataLayerSettings | None = None,
                 on_degraded: Callable[[str, bool, str], None] | None = None,
                 on_health: Callable[[str, bool], None] | None = None,
                 predictor: PredictorSettings | None = None, discovery: Discovery | None = None) -> None:
        s = self.settings = settings or DataLayerSettings()
        self.clock = clock
        self.tokens = tokens
        n = s.max_endpoints
        self.endpoints = EndpointTable(n)
        ep = self.endpoints
        self.metrics = MetricsStore(clock, ep.slot, n, s.scrape_interval_s * s.stale_after_intervals)
        self.metrics.on_block_size = self._block_size_seen
        self.health = HealthTracker(ep.address, n, s.failure_threshold, on_health, s.request_failure_threshold,
                                    s.base_ejection_s, s.max_ejection_s, s.max_ejected_fraction,
                                    lambda: int(ep.active_slots().size))
        self.inflight = InflightTracker(n, s.inflight_ttl_s, scrape_epoch=self.metrics.epoch)
        self.costs = CostTable(n)
        # requests the director's flow control holds (pickers/flowcontrol.py): queued for the pool as a whole
        self.held_requests = 0
        self.saturated_at = -math.inf  # when flow control last found a queue on every pod: past the knee then
        # the picker's own prefills (pickers/warmup.py), when a transport sends them (the simulator, kvswitch serve)
        self.warmups: Warmups | None = None
        self.approx = BlockIndex(s.approx_max_blocks, ("GPU",), max_pods=64, per_pod_cap=None)
        self.approx_pod_cap = np.full(n, s.approx_pod_blocks, dtype=np.int64)
        self.kv_index = PreciseIndex(ep.slot, ep.address, s.precise_max_blocks, s.medium_weights, 64,
                                     s.engine_map_cap, s.degraded_after_s, on_degraded,
                                     s.pending_ttl_s, s.pending_max_blocks, resolve_rank=ep.rank_slot)
        self.predictor = Predictor(self, predictor)
        self.discovery = discovery
        self.precise_enabled = False  # some pod publishes KV events and the director reads them
        self._precise_wanted = True
        self._metrics_wanted = True
        self._scraper: MetricsScraper | None = None
        self._subscriber: KVEventSubscriber | None = None
        self._discovery_task: asyncio.Task[None] | None = None
        self._warmup_sender: WarmupSender | None = None
        ep.listen(self._on_endpoint)
        ep.set_busy_probe(self._busy)

    def _busy(self, slot: int) -> bool:
        """A request this picker routed is still open on ``slot`` (decoding there, or prefilling there)."""
        inf = self.inflight
        return bool(inf.requests[slot] > 0 or inf.prefill_requests[slot] > 0)

    # ---- background upkeep ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Scrape every pod, subscribe to the KV events the director reads, run discovery. Idempotent."""
        if self._scraper is not None:
            return
        s = self.settings
        # dp_ranks auto: a pod whose /metrics shows several engines (vLLM DP ranks) becomes one endpoint per rank
        on_engines = self._learn_ranks if s.dp_ranks == "auto" else None
        self._scraper = MetricsScraper(self.metrics, self.health, s.scrape_interval_s, on_engines=on_engines,
                                       read_families_only=s.scrape_read_families_only)
        self._subscriber = KVEventSubscriber(self.kv_index, self.clock, s.kv_events_topic)
        for slot in self.endpoints.active_slots().tolist():
            ep = self.endpoints.endpoints[slot]
            assert ep is not None
            self._watch(slot, ep)
        if self.discovery is not None and not isinstance(self.discovery, StaticDiscovery):
            self._discovery_task = asyncio.get_running_loop().create_task(
                self.discovery.run(self.endpoints), name="endpoint discovery")
        # the picker's own prefills (pickers/warmup.py), posted to the pods
        self.warmups = Warmups(self.inflight)
        self._warmup_sender = WarmupSender(self.warmups)
        await self._warmup_sender.start()

    async def stop(self) -> None:
        """Stop discovery, scrapes and subscriptions; every task is awaited. Idempotent."""
        sender, self._warmup_sender = self._warmup_sender, None
        if sender is not None:
            await sender.stop()
            self.warmups = None
        if self._discovery_task is not None:
            self._discovery_task.cancel()
            await asyncio.gather(self._discovery_task, return_exceptions=True)
            self._discovery_task = None
        scraper, subscriber = self._scraper, self._subscriber
        self._scraper = self._subscriber = None
        if scraper is not None:
            await scraper.stop()
        if subscriber is not None:
            await subscriber.stop()

    def _learn_ranks(self, url: str, engines: list[str]) -> None:
        learn_ranks(self.endpoints, url, engines)

    def ready(self) -> bool:
        """Some endpoint can decode. Pod health is not part of it on purpose: a picker whose pods are all
        down still answers every request with a clear 503, which beats the gateway's own error. A discovery
        that has not completed its first list (``synced`` False, e.g. Kubernetes) is not ready yet."""
        if not getattr(self.discovery, "synced", True):
            return False
        slots = self.endpoints.active_slots()
        return bool(self.endpoints.can_decode[slots].any()) if len(slots) else False

    def want_metrics(self, wanted: bool) -> None:
        """Whether any plugin reads scraped metrics; if none does, no pod is scraped."""
        self._metrics_wanted = wanted

    def _watch(self, slot: int, ep: Endpoint) -> None:
        assert self._scraper is not None and self._subscriber is not None
        if self._metrics_wanted:
            self._scraper.watch(slot, ep.id, ep.scrape_url, ep.engine_label)
        if ep.kv_events and self._precise_wanted:
            self._subscriber.subscribe(ep.id, ep.kv_events)

    def want_precise(self, wanted: bool) -> None:
        """The scheduler says whether any of its plugins reads the precise index; if none does, it stays off
        (no degradation tracking, no pending blocks) even where pods publish events."""
        self._precise_wanted = wanted
        self.precise_enabled = wanted and bool(self.kv_index.has_events.any())

    # ---- endpoint lifecycle -------------------------------------------------------------------------
    def _on_endpoint(self, what: str, slot: int, e: Endpoint) -> None:
        if what == "add":
            self.approx.ensure_pods(slot + 1)
            self.kv_index.ensure_pods(slot + 1)
            self.kv_index.set_source(slot, bool(e.kv_events))
            self.precise_enabled = self.precise_enabled or (self._precise_wanted and bool(e.kv_events))
            self.costs.set(slot, e)
            if self._scraper is not None:
                self._watch(slot, e)
        else:
            if self._scraper is not None and self._subscriber is not None:
                self._scraper.unwatch(e.id)
                self._subscriber.unsubscribe(e.id)
            self.approx.drop_pod(slot)
            self.kv_index.forget_pod(slot)
            self.metrics.reset(slot)
            self.health.reset(slot)
            self.inflight.reset(slot)
            self.approx_pod_cap[slot] = self.settings.approx_pod_blocks

    def _block_size_seen(self, slot: int, block_size: int) -> None:
        if self.endpoints.block_size[slot] != block_size:
            self.endpoints.block_size[slot] = block_size

    # ---- derived signals ----------------------------------------------------------------------------
    def fresh(self, cands: np.ndarray, now: float) -> np.ndarray:
        return self.metrics.fresh(cands, now)

    def scraped_waiting(self, cands: np.ndarray, now: float, fresh: np.ndarray | None = None) -> np.ndarray:
        """Waiting requests per candidate as its last scrape counted them, 0 where that scrape is stale.
        ``fresh``: ``self.fresh(cands, now)`` when the caller has it."""
        return np.where(self.fresh(cands, now) if fresh is None else fresh, self.metrics.waiting[cands], 0.0)

    def queue_depth(self, cands: np.ndarray, now: float) -> np.ndarray:
        """Requests waiting for prefill: the pod's own count when fresh, never below what we sent."""
        return np.maximum(self.scraped_waiting(cands, now), self.inflight.prefill_requests[cands])

    def waiting_now(self, cands: np.ndarray, now: float) -> np.ndarray:
        """Requests waiting in each candidate's queue now, as well as the picker knows: with fresh metrics, the
        pod's last scraped count brought up to date with what this picker sent there and saw start since
        (``InflightTracker.waiting_since_scrape``); without, the requests it sent that have not started, less
        one that may be in its prefill."""
        inf = self.inflight
        est = inf.waiting_since_scrape(cands, self.metrics.waiting[cands])
        blind = np.maximum(inf.prefill_requests[cands] - 1.0, 0.0)
        return np.where(self.fresh(cands, now), est, blind)

    def running(self, cands: np.ndarray, now: float, fresh: np.ndarray | None = None) -> np.ndarray:
        """Running requests per candidate: the pod's count when its metrics are fresh, never below the requests
        this picker has past their first token there. ``fresh``: ``self.fresh(cands, now)`` when the caller has it."""
        r = np.where(self.fresh(cands, now) if fresh is None else fresh, self.metrics.running[cands], 0.0)
        return np.maximum(r, self.inflight.requests[cands] - self.inflight.prefill_requests[cands])

    def prefix_hits(self, ctx: CycleContext, mode: PrefixMode) -> np.ndarray:
        """Per endpoint slot: cached prompt tokens (weighted by medium) under ``mode``."""
        ep = self.endpoints
        n = ep.slot_count
        out = np.zeros(n)
        slots = ep.active_slots()
        if slots.size == 0:
            return out
        sizes = ep.block_size[slots]
        bs0 = int(sizes[0])
        groups = [(bs0, None)] if (sizes == bs0).all() else [(int(b), sizes == b) for b in np.unique(sizes)]
        use_precise = mode in ("precise", "auto") and self.precise_enabled
        degraded = self.kv_index.degraded_mask(ctx.now)[:n] if mode == "auto" and use_precise else None
        for bs, sel in groups:
            hashes = ctx.block_hashes(bs)
            if not len(hashes):
                continue
            vals = np.zeros(n)
            if mode == "approximate" or not use_precise or (degraded is not None and degraded[slots].any()):
                m = self.approx.match(hashes)
                if m is not None:
                    vals = m[1][:n].astype(np.float64)
            if use_precise:
                m = self.kv_index.index.match(hashes)
                pv = m[1][:n] if m is not None else np.zeros(n)
                vals = pv if degraded is None else np.where(degraded, vals, pv)
            vals = vals * bs
            if sel is None:
                out[slots] = vals[slots]
            else:
                out[slots[sel]] = vals[slots[sel]]
        return out

    def learn(self, hashes_by_bs: dict[int, np.ndarray], slots: list[int]) -> None:
        """Approximate index: the pods we sent a prompt to will hold its blocks."""
        bsz = self.endpoints.block_size
        for slot in slots:
            hashes = hashes_by_bs.get(int(bsz[slot]))
            if hashes is not None and len(hashes):
                cap = int(self.metrics.num_gpu_blocks[slot]) or int(self.approx_pod_cap[slot])
                self.approx.add(slot, hashes, unique=True)
                held = int(self.approx.pod_counts[0, slot])
                if held > cap:
                    self.approx.evict_pod(slot, held - cap + cap // 8)
