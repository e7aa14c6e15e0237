"""Prometheus metrics of the ext_proc server (one set per process, served on their own port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_STREAM_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

DECISIONS = Counter("kvswitch_decisions_total", "Routing decisions by result", ["result"])
DECISION_SECONDS = Histogram(
    "kvswitch_decision_seconds", "Time from full request body to routing reply (parse + schedule)",
    buckets=_LATENCY_BUCKETS,
)
STREAM_SECONDS = Histogram(
    "kvswitch_extproc_stream_seconds", "Whole ext_proc stream duration (request start to response end)",
    buckets=_STREAM_BUCKETS,
)
ERRORS = Counter("kvswitch_errors_total", "Requests answered with an error or failed, by reason", ["reason"])
INFLIGHT = Gauge("kvswitch_inflight_requests", "Requests routed to an endpoint and not yet finished",
                 ["endpoint"])
STREAMS = Gauge("kvswitch_extproc_streams", "Open ext_proc streams")


# Children resolved once: labels() takes a lock and builds a tuple on every call, several times per request.
ROUTED = DECISIONS.labels("routed")
_INFLIGHT_CHILDREN: dict[str, object] = {}
_MAX_INFLIGHT_CHILDREN = 4096  # endpoints are a bounded fleet; past this, fall back to labels()


def inflight(endpoint: str):
    """The in-flight gauge child of one endpoint (cached)."""
    child = _INFLIGHT_CHILDREN.get(endpoint)
    if child is None:
        child = INFLIGHT.labels(endpoint)
        if len(_INFLIGHT_CHILDREN) < _MAX_INFLIGHT_CHILDREN:
            _INFLIGHT_CHILDREN[endpoint] = child
    return child
