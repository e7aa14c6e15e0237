"""vLLM's Prometheus metrics for one simulated pod (names, labels and buckets of vllm/v1/metrics/loggers.py).

Each pod has its own CollectorRegistry, so many pods live in one process. Times are simulated seconds.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from engine.sim.core import EngineStats, RequestOutput

TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0]
LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
TOKEN_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000]


class _EngineSeries:
    """The series of one engine (``engine="<rank>"``) in a pod's registry."""

    def __init__(self, fam: Mapping[str, Any], lv: tuple[str, str]) -> None:
        self.lv = lv
        child = {name: f.labels(*lv) for name, f in fam.items() if name != "success"}
        self.running = child["running"]
        self.waiting = child["waiting"]
        self.kv_usage = child["kv_usage"]
        self.prefix_queries = child["prefix_queries"]
        self.prefix_hits = child["prefix_hits"]
        self.preemptions = child["preemptions"]
        self.prompt_tokens = child["prompt_tokens"]
        self.generation_tokens = child["generation_tokens"]
        self.ttft = child["ttft"]
        self.itl = child["itl"]
        self.e2e = child["e2e"]
        self.queue = child["queue"]
        self.prefill = child["prefill"]
        self.decode = child["decode"]
        self.inference = child["inference"]
        self.prompt_len = child["prompt_len"]
        self.gen_len = child["gen_len"]
        self.success = fam["success"]
        self.last = EngineStats(0, 0, 0.0, 0, 0, 0, 0, 0, 0)


class PodMetrics:
    """One pod's registry. A data-parallel pod has one set of series per engine core, labelled
    ``engine="0"``, ``engine="1"``, ... as vLLM labels its per-rank series; methods take the rank."""

    def __init__(self, model_name: str, cache_info: dict[str, str], engine: str = "0",
                 engines: list[str] | None = None) -> None:
        self.registry = r = CollectorRegistry()
        labels = ["model_name", "engine"]
        names = engines or [engine]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r)

        def hist(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r)

        fam = {
            "running": gauge("vllm:num_requests_running", "Number of requests in model execution batches."),
            "waiting": gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed."),
            "kv_usage": gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."),
            "prefix_queries": counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of tokens."),
            "prefix_hits": counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of tokens."),
            "preemptions": counter("vllm:num_preemptions", "Cumulative number of preemption from the engine."),
            "prompt_tokens": counter("vllm:prompt_tokens", "Number of prefill tokens processed."),
            "generation_tokens": counter("vllm:generation_tokens", "Number of generation tokens processed."),
            "success": Counter("vllm:request_success", "Count of successfully processed requests.",
                               labels + ["finished_reason"], registry=r),
            "ttft": hist("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                         TTFT_BUCKETS),
            "itl": hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                        ITL_BUCKETS),
            "e2e": hist("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                        LATENCY_BUCKETS),
            "queue": hist("vllm:request_queue_time_seconds",
                          "Histogram of time spent in WAITING phase for request.", LATENCY_BUCKETS),
            "prefill": hist("vllm:request_prefill_time_seconds",
                            "Histogram of time spent in PREFILL phase for request.", LATENCY_BUCKETS),
            "decode": hist("vllm:request_decode_time_seconds",
                           "Histogram of time spent in DECODE phase for request.", LATENCY_BUCKETS),
            "inference": hist("vllm:request_inference_time_seconds",
                              "Histogram of time spent in RUNNING phase for request.", LATENCY_BUCKETS),
            "prompt_len": hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.", TOKEN_BUCKETS),
            "gen_len": hist("vllm:request_generation_tokens", "Number of generation tokens processed.",
                            TOKEN_BUCKETS),
        }
        self.engines = [_EngineSeries(fam, (model_name, e)) for e in names]
        info_labels = list(cache_info) + ["engine"]
        info = Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", info_labels, registry=r)
        for e in names:
            info.labels(**{**cache_info, "engine": e}).set(1)
        Gauge("vllm:lora_requests_info", "Running stats on lora requests.",
              ["max_lora", "waiting_lora_adapters", "running_lora_adapters"], registry=r
              ).labels("0", "", "").set(time.time())

    # rank 0's series, for callers of a pod without data parallelism
    @property
    def running(self) -> Gauge:
        return self.engines[0].running

    @property
    def waiting(self) -> Gauge:
        return self.engines[0].waiting

    def update(self, s: EngineStats, rank: int = 0) -> None:
        """Gauges to the engine's current state, counters by what changed since the last update."""
        e = self.engines[rank]
        last = e.last
        e.running.set(s.num_running)
        e.waiting.set(s.num_waiting)
        e.kv_usage.set(s.kv_usage)
        if s.prefix_queries > last.prefix_queries:
            e.prefix_queries.inc(s.prefix_queries - last.prefix_queries)
        if s.prefix_hits > last.prefix_hits:
            e.prefix_hits.inc(s.prefix_hits - last.prefix_hits)
        if s.num_preemptions > last.num_preemptions:
            e.preemptions.inc(s.num_preemptions - last.num_preemptions)
        if s.prompt_tokens > last.prompt_tokens:
            e.prompt_tokens.inc(s.prompt_tokens - last.prompt_tokens)
        if s.generation_tokens > last.generation_tokens:
            e.generation_tokens.inc(s.generation_tokens - last.generation_tokens)
        e.last = s

    def observe_token(self, out: RequestOutput, prev_time: float | None, rank: int = 0) -> None:
        e = self.engines[rank]
        if prev_time is None:
            e.ttft.observe(max(0.0, out.first_token_at - out.arrival))
        else:
            e.itl.observe(max(0.0, out.time - prev_time))

    def observe_finished(self, out: RequestOutput, rank: int = 0) -> None:
        e = self.engines[rank]
        e.success.labels(*e.lv, out.finish_reason or "abort").inc()
        e.e2e.observe(max(0.0, out.time - out.arrival))
        e.queue.observe(max(0.0, out.first_scheduled_at - out.arrival))
        e.prefill.observe(max(0.0, out.first_token_at - out.first_scheduled_at))
        e.decode.observe(max(0.0, out.time - out.first_token_at))
        e.inference.observe(max(0.0, out.time - out.first_scheduled_at))
        e.prompt_len.observe(out.num_prompt_tokens)
        e.gen_len.observe(out.num_output_tokens)

    def render(self, names: Sequence[str] = ()) -> bytes:
        """The exposition text; with ``names``, only the families holding those samples (``name[]``)."""
        return generate_latest(self.registry.restricted_registry(names) if names else self.registry)


__all__ = ["PodMetrics"]
