"""The issue's bar at one load point, one definition for the real-time and the virtual-time curves.

kvswitch meets it when, on medians over repetitions (the same traces for every router):

- its request throughput is at least the best peer's (no allowance: a point lost by 0.1 % is lost);
- its TTFT p90 is at most the best peer's;
- its TTFT p99 is at most ``P99_ALLOWANCE`` (1.1) x the best peer's.

"The best peer" is taken per figure, so the bar compares against the best of each column, which may be three
different routers. Who counts as a peer is the caller's to say: in real time every other router of the set (the
real vllm-router, sglang-router and Envoy), in virtual time the emulations of the same four
(``vcurve.PEERS``), not the baselines or variants that a study runs beside them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

P99_ALLOWANCE = 1.1


@dataclass(frozen=True, slots=True)
class Figures:
    """One router's medians at one point: completed requests per second, TTFT p90 and p99 in milliseconds."""

    req_s: float
    p90_ms: float
    p99_ms: float


def misses(mine: Figures, peers: Sequence[Figures]) -> list[str]:
    """What ``mine`` misses of the bar against ``peers`` (non-empty), each as "figure mine vs best"; empty when
    every part is met. A figure that is not a number (NaN: no request of those runs completed) meets nothing on
    kvswitch's side and is no one's best on a peer's."""
    if not peers:
        raise ValueError("the bar needs at least one peer")

    def best(values: list[float], pick: Callable[[list[float]], float]) -> float:
        finite = [v for v in values if math.isfinite(v)]
        return pick(finite) if finite else math.nan

    best_req_s = best([p.req_s for p in peers], max)
    best_p90 = best([p.p90_ms for p in peers], min)
    best_p99 = best([p.p99_ms for p in peers], min)
    out = []
    # written as "not met" so that a NaN on either side is a miss, never a pass
    if not mine.req_s >= best_req_s:
        out.append(f"req/s {mine.req_s:.3f} < {best_req_s:.3f}")
    if not mine.p90_ms <= best_p90:
        out.append(f"p90 {mine.p90_ms:.0f} > {best_p90:.0f} ms")
    if not mine.p99_ms <= P99_ALLOWANCE * best_p99:
        out.append(f"p99 {mine.p99_ms:.0f} > {P99_ALLOWANCE:g} x {best_p99:.0f} ms")
    return out
