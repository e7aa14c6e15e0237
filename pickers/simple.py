"""LeastInFlight: the simplest useful Scheduler, and the default until the full framework is configured.

Each request goes to the decode-capable endpoint with the fewest requests in flight (random tie-break); the
reply lists every other eligible endpoint after it, least loaded first, as the gateway's fallback list. It
honours the gateway's subset hint and never sends decode work to a prefill-only pod.
"""

from __future__ import annotations

import random

from pickers.clock import Clock, MonotonicClock
from pickers.types import Decision, Endpoint, InferenceRequest, SchedulingError, Usage


class LeastInFlight:
    """Least in-flight requests first; the count is what this picker routed and has not seen finish."""

    def __init__(self, endpoints: list[Endpoint], clock: Clock | None = None, seed: int | None = None) -> None:
        self.endpoints = list(endpoints)
        self.clock = clock or MonotonicClock()
        self.inflight: dict[str, int] = {e.address: 0 for e in self.endpoints}
        self._decoders = [e.address for e in self.endpoints if e.role.can_decode()]
        self._rng = random.Random(seed)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def ready(self) -> bool:
        return bool(self._decoders)

    def add_endpoint(self, endpoint: Endpoint) -> None:
        """A pod joined (autoscaling): it takes requests from now on."""
        self.remove_endpoint(endpoint.address)
        self.endpoints.append(endpoint)
        self.inflight.setdefault(endpoint.address, 0)
        if endpoint.role.can_decode():
            self._decoders.append(endpoint.address)

    def remove_endpoint(self, address: str) -> None:
        """A pod is leaving (drain-first): no new requests; its in-flight ones still report their end."""
        self.endpoints = [e for e in self.endpoints if e.address != address]
        if address in self._decoders:
            self._decoders.remove(address)

    async def schedule(self, request: InferenceRequest) -> Decision:
        candidates = self._decoders
        if request.subset is not None:
            allowed = set(request.subset)
            candidates = [a for a in candidates if a in allowed]
        if not candidates:
            if request.subset is not None:
                raise SchedulingError(503, "no decode endpoint in the gateway's subset hint is known to the "
                                      "picker", "subset_no_match")
            raise SchedulingError(503, "no decode endpoint is configured or ready; add endpoints to the "
                                  "picker's configuration", "no_endpoints")
        load = self.inflight
        rnd = self._rng.random
        ordered = sorted(candidates, key=lambda a: (load[a], rnd()))
        load[ordered[0]] += 1
        return Decision(
            request=request,
            endpoints=ordered,
            profile="least-inflight",
            explanation={a: {"inflight": float(load[a] - (a == ordered[0]))} for a in ordered[:4]},
            decided_at=self.clock.now(),
        )

    def _release(self, decision: Decision) -> None:
        addr = decision.request.cache.pop("least_inflight_at", decision.primary)
        if self.inflight.get(addr, 0) > 0:
            self.inflight[addr] -= 1

    def on_served(self, decision: Decision, served: str) -> None:
        counted = decision.request.cache.get("least_inflight_at", decision.primary)
        if served != counted and served in self.inflight:
            if self.inflight.get(counted, 0) > 0:
                self.inflight[counted] -= 1
            self.inflight[served] += 1
            decision.request.cache["least_inflight_at"] = served

    def on_first_token(self, decision: Decision, at: float) -> None:
        return None

    def on_finished(self, decision: Decision, usage: Usage | None, at: float) -> None:
        self._release(decision)

    def on_failed(self, decision: Decision, reason: str, at: float) -> None:
        self._release(decision)
