"""The sidecar's own Prometheus metrics, in a registry per sidecar (many may share one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class SidecarMetrics:
    """Prefill leg time, decode time to first byte, legs by outcome, retries and refusals."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.prefill_seconds = Histogram(
            "kvswitch_sidecar_prefill_leg_seconds",
            "Time of the prefill leg (all attempts) until the prefill pod answered.",
            buckets=_BUCKETS, registry=self.registry,
        )
        self.decode_ttft_seconds = Histogram(
            "kvswitch_sidecar_decode_first_byte_seconds",
            "From sending the decode leg to its first body byte: KV transfer plus first decode step.",
            buckets=_BUCKETS, registry=self.registry,
        )
        self.request_ttft_seconds = Histogram(
            "kvswitch_sidecar_first_byte_seconds",
            "From the request's arrival at the sidecar to the first body byte sent back (both legs).",
            buckets=_BUCKETS, registry=self.registry,
        )
        self.legs = Counter(
            "kvswitch_sidecar_legs_total", "Legs by kind and outcome.", ["leg", "outcome"],
            registry=self.registry,
        )
        self.prefill_retries = Counter(
            "kvswitch_sidecar_prefill_retries_total", "Prefill attempts repeated after 502/503/504 or connect errors.",
            registry=self.registry,
        )
        self.refused = Counter(
            "kvswitch_sidecar_refused_total", "Requests refused before contacting anything, by reason.",
            ["reason"], registry=self.registry,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
