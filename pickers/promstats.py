"""Prometheus metrics of the scheduling framework (one set per registry, so tests and two replicas in one
process do not collide)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

# observed / predicted latency: 1.0 is a perfect prediction; the buckets resolve +-5 % around it
RATIO_BUCKETS = (0.25, 0.5, 0.67, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25, 1.5, 2.0, 4.0)
# seconds held by flow control: a step or two below the knee, minutes deep past it
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0)


@dataclass
class SchedulerMetrics:
    decisions: Counter
    rejections: Counter
    degraded: Gauge
    healthy: Gauge
    index_blocks: Gauge
    stale_ignored: Gauge
    prediction_ratio: Histogram
    prefill_ends: Counter
    flow_queued: Gauge
    flow_released: Counter
    flow_wait: Histogram
    warmups: Counter
    warmup_piece: Histogram


# keyed by the registry itself, weakly: an id() key outlives a collected registry, and a new one allocated at
# the same address then got the old registry's metrics (counts vanished from the new registry)
_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, SchedulerMetrics] = weakref.WeakKeyDictionary()


def scheduler_metrics(registry: CollectorRegistry | None = None) -> SchedulerMetrics:
    reg = registry or REGISTRY
    got = _BY_REGISTRY.get(reg)
    if got is None:
        got = SchedulerMetrics(
            decisions=Counter("kvswitch_scheduler_decisions", "Routing decisions made", ["profile"], registry=reg),
            rejections=Counter("kvswitch_scheduler_rejections", "Requests not routed", ["status", "code"],
                               registry=reg),
            degraded=Gauge("kvswitch_prefix_index_degraded",
                           "1 while the precise prefix index is not trusted for this endpoint (no KV events "
                           "while serving, or a sequence gap); it is then scored with the approximate index",
                           ["endpoint"], registry=reg),
            healthy=Gauge("kvswitch_endpoint_healthy", "1 while the endpoint is eligible", ["endpoint"],
                          registry=reg),
            index_blocks=Gauge("kvswitch_prefix_index_blocks", "Blocks held by a prefix index", ["index"],
                               registry=reg),
            stale_ignored=Gauge("kvswitch_saturation_stale_endpoints",
                                "Ready endpoints whose stale metrics saturation admission ignored at its last "
                                "check (stale data is not evidence of saturation)", registry=reg),
            prediction_ratio=Histogram(
                "kvswitch_prediction_observed_over_predicted",
                "Observed over predicted latency of finished requests (after the online correction): TTFT on "
                "the pod that ran the prefill, TPOT on the decode pod", ["latency", "accelerator", "role"],
                buckets=RATIO_BUCKETS, registry=reg),
            prefill_ends=Counter(
                "kvswitch_prefill_ends",
                "How the picker learned that a request's prefill ended when no first token is reported while it "
                "runs (access-log mode): kv_event (its pod stored the prompt's last full block), prediction (not "
                "watched: no KV events or no new block; released at the predicted first token), no_event "
                "(watched, no event came: released at 4x the prediction or at the end)", ["source"],
                registry=reg),
            flow_queued=Gauge("kvswitch_flow_control_queued",
                              "Requests held by flow control, waiting for a pod with room", registry=reg),
            flow_released=Counter(
                "kvswitch_flow_control_released",
                "Held requests decided, by why: room (a pod had room), deadline (max_wait_s or the gateway's "
                "deadline passed), unservable (no healthy decode pod left among its candidates)", ["reason"],
                registry=reg),
            flow_wait=Histogram("kvswitch_flow_control_wait_seconds", "Time a request was held by flow control",
                                buckets=WAIT_BUCKETS, registry=reg),
            warmups=Counter(
                "kvswitch_warmups",
                "The picker's own prefills of a hot group prefix on a quiet pod (pickers/warmup.py), by outcome: "
                "offered, ok (the pod ran it), failed (an error or no answer within the timeout), expired (no "
                "report from the transport)", ["outcome"], registry=reg),
            warmup_piece=Histogram(
                "kvswitch_warmup_piece_seconds",
                "Latency of each answered piece of a warm-up prefill (post to answer; max_tokens 1, so about the "
                "pod's TTFT for it): the pods' own TTFT and prefix-cache counters include these requests",
                buckets=WAIT_BUCKETS, registry=reg),
        )
        _BY_REGISTRY[reg] = got
    return got
