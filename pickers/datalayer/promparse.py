"""A cheap reader for the few vLLM metric families the picker uses.

vLLM's /metrics page is tens of KB of histograms; the full Prometheus text parser costs milliseconds per
page. One compiled regular expression matching at line starts and restricted to the wanted names scans it
in C; everything else is skipped. Old and new names are both accepted (``gpu_cache_usage_perc`` was
renamed ``kv_cache_usage_perc``). Samples of the same family are summed over engines (data parallel) by
``parse_vllm_metrics``; ``parse_vllm_metrics_by_engine`` keeps each ``engine="<rank>"`` apart.

``restricted_url`` asks a pod for those families alone (``name[]`` query parameters, prometheus_client's
standard filter): a page served by prometheus_client's own exposition (``make_asgi_app``, which vLLM mounts at
/metrics; the simulator) then renders ~1.3 KB instead of tens of KB, which at 20 scrapes a second is most of
what a pod's server spends on the picker. A server that ignores the parameters (vLLM 0.32's instrumentator
route answers GET /metrics before the mount) sends the whole page, which parses the same.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pickers.datalayer.metrics import PodMetrics

_NAMES = (
    "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "gpu_cache_usage_perc",
    "prefix_cache_queries_total", "prefix_cache_hits_total", "gpu_prefix_cache_queries_total",
    "gpu_prefix_cache_hits_total", "cache_config_info", "lora_requests_info",
)
# The sample names read (both generations of names), as ``name[]`` asks for them
SAMPLE_NAMES = tuple(f"vllm:{n}" for n in _NAMES)
# A wanted line starts after a newline (the page is scanned with one prepended): "\nvllm:" is a literal prefix,
# which the regex engine finds with a fast search; "^" under re.M made it try every position (~90 against ~17
# us for a 22 KB page).
_LINE = re.compile(r"\nvllm:(" + "|".join(_NAMES) + r")(?:\{([^}]*)\})?[ \t]+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
_ENGINE = re.compile(r'(?:^|,)\s*engine="([^"]*)"')


class MetricsParseError(ValueError):
    pass


def restricted_url(url: str) -> str:
    """``url`` with one ``name[]`` parameter per sample name the parser reads, after any query it had."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + [("name[]", n) for n in SAMPLE_NAMES]
    return urlunsplit(parts._replace(query=urlencode(query)))


class _Acc:
    """One engine's (or, summed, one pod's) families while scanning."""

    __slots__ = ("m", "kv_new", "kv_old", "lora_best", "q", "h")

    def __init__(self) -> None:
        self.m = PodMetrics()
        self.kv_new: float | None = None
        self.kv_old: float | None = None
        self.lora_best = -1.0
        self.q: float | None = None
        self.h: float | None = None

    def add(self, name: str, labels: str, v: float) -> None:
        m = self.m
        if name == "num_requests_running":
            m.running += v
        elif name == "num_requests_waiting":
            m.waiting += v
        elif name == "kv_cache_usage_perc":
            self.kv_new = v if self.kv_new is None else max(self.kv_new, v)
        elif name == "gpu_cache_usage_perc":
            self.kv_old = v if self.kv_old is None else max(self.kv_old, v)
        elif name in ("prefix_cache_queries_total", "gpu_prefix_cache_queries_total"):
            self.q = (self.q or 0.0) + v
        elif name in ("prefix_cache_hits_total", "gpu_prefix_cache_hits_total"):
            self.h = (self.h or 0.0) + v
        elif name == "cache_config_info":
            lab = dict(_LABEL.findall(labels))
            if lab.get("block_size", "").isdigit():
                m.block_size = int(lab["block_size"])
            if lab.get("num_gpu_blocks", "").isdigit():
                m.num_gpu_blocks = int(lab["num_gpu_blocks"])
        elif name == "lora_requests_info" and v >= self.lora_best:
            self.lora_best = v  # the value is a timestamp: keep the latest sample
            lab = dict(_LABEL.findall(labels))
            m.running_lora_adapters = tuple(a for a in lab.get("running_lora_adapters", "").split(",") if a)
            m.waiting_lora_adapters = tuple(a for a in lab.get("waiting_lora_adapters", "").split(",") if a)
            ml = lab.get("max_lora", "")
            m.max_lora = int(ml) if ml.isdigit() else 0

    def done(self) -> PodMetrics:
        m = self.m
        m.kv_usage = self.kv_new if self.kv_new is not None else (self.kv_old or 0.0)
        m.prefix_cache_queries, m.prefix_cache_hits = self.q, self.h
        return m


def parse_vllm_metrics(text: str) -> PodMetrics:
    """The picker's view of one /metrics page. Raises MetricsParseError when no vLLM family is present."""
    acc = _Acc()
    seen = 0
    for name, labels, value in _LINE.findall("\n" + text):
        try:
            v = float(value)
        except ValueError:
            continue
        seen += 1
        acc.add(name, labels, v)
    if not seen:
        raise MetricsParseError("no vllm: metric families found (is this a vLLM /metrics page?)")
    return acc.done()


def parse_vllm_metrics_by_engine(text: str) -> dict[str, PodMetrics]:
    """One PodMetrics per ``engine`` label value (vLLM's data-parallel ranks label their series
    ``engine="<rank>"``). Series without an engine label (``lora_requests_info``) go to every engine."""
    accs: dict[str, _Acc] = {}
    shared: list[tuple[str, str, float]] = []
    for name, labels, value in _LINE.findall("\n" + text):
        try:
            v = float(value)
        except ValueError:
            continue
        m = _ENGINE.search(labels) if labels else None
        if m is None:
            shared.append((name, labels, v))
            continue
        acc = accs.get(m.group(1))
        if acc is None:
            acc = accs[m.group(1)] = _Acc()
        acc.add(name, labels, v)
    if not accs and not shared:
        raise MetricsParseError("no vllm: metric families found (is this a vLLM /metrics page?)")
    for acc in accs.values():
        for name, labels, v in shared:
            acc.add(name, labels, v)
    return {k: a.done() for k, a in accs.items()}
