"""Scraped pod metrics as numpy arrays indexed by endpoint slot.

``update(address, PodMetrics)`` is the one way in: the scraper calls it, and so can the virtual-time
simulator and tests. Metrics older than ``stale_after_s`` count as unknown: scorers then fall back to the
load the picker tracks itself (see ``InflightTracker``). ``epoch[slot]`` counts the scrapes a slot has had
(``update`` and ``touch``): the tracker keys what it sent and saw start "since the last scrape" to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pickers.clock import Clock


@dataclass(slots=True)
class PodMetrics:
    waiting: float = 0.0  # vllm:num_requests_waiting
    running: float = 0.0  # vllm:num_requests_running
    kv_usage: float = 0.0  # vllm:kv_cache_usage_perc (or gpu_cache_usage_perc), 0..1
    block_size: int | None = None  # vllm:cache_config_info{block_size}
    num_gpu_blocks: int | None = None  # vllm:cache_config_info{num_gpu_blocks}
    prefix_cache_queries: float | None = None  # vllm:prefix_cache_queries_total (tokens)
    prefix_cache_hits: float | None = None  # vllm:prefix_cache_hits_total (tokens)
    running_lora_adapters: tuple[str, ...] = ()
    waiting_lora_adapters: tuple[str, ...] = ()
    max_lora: int = 0
    extra: dict[str, float] = field(default_factory=dict)


class MetricsStore:
    def __init__(self, clock: Clock, resolve, max_endpoints: int = 1024, stale_after_s: float = 0.2) -> None:
        self.clock = clock
        self._resolve = resolve
        self.stale_after_s = stale_after_s
        n = max_endpoints
        self.waiting = np.zeros(n)
        self.running = np.zeros(n)
        self.kv_usage = np.zeros(n)
        self.updated_at = np.full(n, -math.inf)
        self.epoch = np.zeros(n, dtype=np.int64)  # scrapes so far; moves at every update, touch and reset
        self.num_gpu_blocks = np.zeros(n, dtype=np.int64)
        self.prefix_queries = np.zeros(n)
        self.prefix_hits = np.zeros(n)
        self.lora: list[tuple[frozenset[str], frozenset[str], int] | None] = [None] * n
        self.latest: list[PodMetrics | None] = [None] * n
        # callback(slot, block_size) when cache_config_info reports one
        self.on_block_size: Callable[[int, int], None] | None = None

    def update(self, address: str, m: PodMetrics, at: float | None = None) -> None:
        slot = self._resolve(address)
        if slot is None:
            raise KeyError(f"unknown endpoint {address!r}")
        self.update_slot(slot, m, at)

    def update_slot(self, slot: int, m: PodMetrics, at: float | None = None) -> None:
        self.waiting[slot] = max(0.0, m.waiting)
        self.running[slot] = max(0.0, m.running)
        self.kv_usage[slot] = min(1.0, max(0.0, m.kv_usage))
        self.updated_at[slot] = self.clock.now() if at is None else at
        self.epoch[slot] += 1
        if m.num_gpu_blocks:
            self.num_gpu_blocks[slot] = m.num_gpu_blocks
        if m.prefix_cache_queries is not None:
            self.prefix_queries[slot] = m.prefix_cache_queries
        if m.prefix_cache_hits is not None:
            self.prefix_hits[slot] = m.prefix_cache_hits
        if m.max_lora or m.running_lora_adapters or m.waiting_lora_adapters:
            self.lora[slot] = (frozenset(m.running_lora_adapters), frozenset(m.waiting_lora_adapters), m.max_lora)
        self.latest[slot] = m
        if m.block_size and self.on_block_size is not None:
            self.on_block_size(slot, m.block_size)

    def touch(self, address: str, at: float) -> None:
        """A scrape of ``address`` at ``at`` read the same values as its previous one: only its time moves
        (the virtual-time simulator, for pods whose load did not change between scrapes)."""
        slot = self._resolve(address)
        if slot is None:
            raise KeyError(f"unknown endpoint {address!r}")
        self.updated_at[slot] = at
        self.epoch[slot] += 1

    def fresh(self, slots: np.ndarray, now: float) -> np.ndarray:
        return (now - self.updated_at[slots]) <= self.stale_after_s

    def reset(self, slot: int) -> None:
        self.waiting[slot] = self.running[slot] = self.kv_usage[slot] = 0.0
        self.updated_at[slot] = -math.inf
        self.epoch[slot] += 1
        self.num_gpu_blocks[slot] = 0
        self.prefix_queries[slot] = self.prefix_hits[slot] = 0.0
        self.lora[slot] = None
        self.latest[slot] = None
