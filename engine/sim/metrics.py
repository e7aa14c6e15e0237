"""vLLM's Prometheus metrics for one simulated pod (names, labels and buckets of vllm/v1/metrics/loggers.py).

Each pod has its own CollectorRegistry, so many pods live in one process. Times are simulated seconds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from engine.sim.core import EngineStats, RequestOutput

TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0]
LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
TOKEN_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000]


class PodMetrics:
    def __init__(self, model_name: str, cache_info: dict[str, str], engine: str = "0") -> None:
        self.registry = r = CollectorRegistry()
        labels = ["model_name", "engine"]
        lv = (model_name, engine)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r).labels(*lv)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r).labels(*lv)

        def hist(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(*lv)

        self.running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.prefix_queries = counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of tokens.")
        self.prefix_hits = counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of tokens.")
        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self._success = Counter(
            "vllm:request_success", "Count of successfully processed requests.", labels + ["finished_reason"],
            registry=r,
        )
        self._lv = lv
        self.ttft = hist("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                         TTFT_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                        ITL_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                        LATENCY_BUCKETS)
        self.queue = hist("vllm:request_queue_time_seconds",
                          "Histogram of time spent in WAITING phase for request.", LATENCY_BUCKETS)
        self.prefill = hist("vllm:request_prefill_time_seconds",
                            "Histogram of time spent in PREFILL phase for request.", LATENCY_BUCKETS)
        self.decode = hist("vllm:request_decode_time_seconds",
                           "Histogram of time spent in DECODE phase for request.", LATENCY_BUCKETS)
        self.inference = hist("vllm:request_inference_time_seconds",
                              "Histogram of time spent in RUNNING phase for request.", LATENCY_BUCKETS)
        self.prompt_len = hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                               TOKEN_BUCKETS)
        self.gen_len = hist("vllm:request_generation_tokens", "Number of generation tokens processed.",
                            TOKEN_BUCKETS)
        info = dict(cache_info)
        info["engine"] = engine
        Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", list(info),
              registry=r).labels(**info).set(1)
        Gauge("vllm:lora_requests_info", "Running stats on lora requests.",
              ["max_lora", "waiting_lora_adapters", "running_lora_adapters"], registry=r
              ).labels("0", "", "").set(time.time())
        self._last = EngineStats(0, 0, 0.0, 0, 0, 0, 0, 0, 0)

    def update(self, s: EngineStats) -> None:
        """Gauges to the engine's current state, counters by what changed since the last update."""
        last = self._last
        self.running.set(s.num_running)
        self.waiting.set(s.num_waiting)
        self.kv_usage.set(s.kv_usage)
        if s.prefix_queries > last.prefix_queries:
            self.prefix_queries.inc(s.prefix_queries - last.prefix_queries)
        if s.prefix_hits > last.prefix_hits:
            self.prefix_hits.inc(s.prefix_hits - last.prefix_hits)
        if s.num_preemptions > last.num_preemptions:
            self.preemptions.inc(s.num_preemptions - last.num_preemptions)
        if s.prompt_tokens > last.prompt_tokens:
            self.prompt_tokens.inc(s.prompt_tokens - last.prompt_tokens)
        if s.generation_tokens > last.generation_tokens:
            self.generation_tokens.inc(s.generation_tokens - last.generation_tokens)
        self._last = s

    def observe_token(self, out: RequestOutput, prev_time: float | None) -> None:
        if prev_time is None:
            self.ttft.observe(max(0.0, out.first_token_at - out.arrival))
        else:
            self.itl.observe(max(0.0, out.time - prev_time))

    def observe_finished(self, out: RequestOutput) -> None:
        self._success.labels(*self._lv, out.finish_reason or "abort").inc()
        self.e2e.observe(max(0.0, out.time - out.arrival))
        self.queue.observe(max(0.0, out.first_scheduled_at - out.arrival))
        self.prefill.observe(max(0.0, out.first_token_at - out.first_scheduled_at))
        self.decode.observe(max(0.0, out.time - out.first_token_at))
        self.inference.observe(max(0.0, out.time - out.first_scheduled_at))
        self.prompt_len.observe(out.num_prompt_tokens)
        self.gen_len.observe(out.num_output_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["PodMetrics"]
