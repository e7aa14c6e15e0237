"""A cheap reader for the few vLLM metric families the picker uses.

vLLM's /metrics page is tens of KB of histograms; the full Prometheus text parser costs milliseconds per
page. One compiled regular expression anchored at line starts and restricted to the wanted names scans it
in C; everything else is skipped. Old and new names are both accepted (``gpu_cache_usage_perc`` was
renamed ``kv_cache_usage_perc``). Samples of the same family are summed over engines (data parallel).
"""

from __future__ import annotations

import re

from pickers.datalayer.metrics import PodMetrics

_NAMES = (
    "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "gpu_cache_usage_perc",
    "prefix_cache_queries_total", "prefix_cache_hits_total", "gpu_prefix_cache_queries_total",
    "gpu_prefix_cache_hits_total", "cache_config_info", "lora_requests_info",
)
_LINE = re.compile(r"^vllm:(" + "|".join(_NAMES) + r")(?:\{([^}]*)\})?[ \t]+(\S+)", re.M)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class MetricsParseError(ValueError):
    pass


def parse_vllm_metrics(text: str) -> PodMetrics:
    """The picker's view of one /metrics page. Raises MetricsParseError when no vLLM family is present."""
    m = PodMetrics()
    seen = 0
    kv_new: float | None = None
    kv_old: float | None = None
    lora_best = -1.0
    q = h = None
    for name, labels, value in _LINE.findall(text):
        try:
            v = float(value)
        except ValueError:
            continue
        seen += 1
        if name == "num_requests_running":
            m.running += v
        elif name == "num_requests_waiting":
            m.waiting += v
        elif name == "kv_cache_usage_perc":
            kv_new = v if kv_new is None else max(kv_new, v)
        elif name == "gpu_cache_usage_perc":
            kv_old = v if kv_old is None else max(kv_old, v)
        elif name in ("prefix_cache_queries_total", "gpu_prefix_cache_queries_total"):
            q = (q or 0.0) + v
        elif name in ("prefix_cache_hits_total", "gpu_prefix_cache_hits_total"):
            h = (h or 0.0) + v
        elif name == "cache_config_info":
            lab = dict(_LABEL.findall(labels))
            if lab.get("block_size", "").isdigit():
                m.block_size = int(lab["block_size"])
            if lab.get("num_gpu_blocks", "").isdigit():
                m.num_gpu_blocks = int(lab["num_gpu_blocks"])
        elif name == "lora_requests_info" and v >= lora_best:
            lora_best = v  # the value is a timestamp: keep the latest sample
            lab = dict(_LABEL.findall(labels))
            m.running_lora_adapters = tuple(a for a in lab.get("running_lora_adapters", "").split(",") if a)
            m.waiting_lora_adapters = tuple(a for a in lab.get("waiting_lora_adapters", "").split(",") if a)
            ml = lab.get("max_lora", "")
            m.max_lora = int(ml) if ml.isdigit() else 0
    if not seen:
        raise MetricsParseError("no vllm: metric families found (is this a vLLM /metrics page?)")
    m.kv_usage = kv_new if kv_new is not None else (kv_old or 0.0)
    m.prefix_cache_queries, m.prefix_cache_hits = q, h
    return m
