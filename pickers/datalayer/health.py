"""Pod health from two independent signals, combined into one eligibility mask ``healthy``.

1. Scrapes (``success`` / ``failure``, called by the metrics scraper): ``failure_threshold`` failed scrapes in a
   row take a pod out, one good scrape brings it back. This catches a pod that is down or unreachable.
2. Passive outlier detection (``request_success`` / ``request_failure``, called from the scheduler's hooks with
   what the picker itself saw of its requests): ``request_failure_threshold`` pod faults in a row (a 5xx, a
   reset, a timeout, a truncated stream, the gateway passing over the pod in the fallback list; never a client
   4xx, see ``pod_fault``) eject the pod for ``base_ejection_s * 2**(k-1)`` seconds (``k``: ejections so far,
   capped at ``max_ejection_s``). A scrape cannot undo an ejection: a pod that answers /metrics and fails
   every request stays out. When the time is up the pod is on probation: eligible only while no request of
   ours is in flight on it, so exactly one real request probes it; the probe's success re-admits it fully
   (and lowers ``k`` by one), a fault ejects it again for twice as long. With the gateway retrying a 5xx on the
   next endpoint of the fallback list, a failed probe costs the client nothing.

Invariants: at most ``max_ejected_fraction`` of the active pods are ejected at once (a fleet-wide fault must
not empty the pool); ``healthy[s]`` is ``scrape_ok[s] and not ejected(s) and (not probation[s] or idle(s))``,
made current by ``refresh(now, inflight)`` which the health filter calls before reading it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

log = logging.getLogger("kvswitch.pickers.health")


def pod_fault(reason: str) -> bool:
    """Whether a failed request's reason blames the pod. A status the client caused (4xx: unknown model, bad
    parameters, 429 shed) does not; 5xx, resets, timeouts, truncated streams and error events do."""
    if reason.startswith("http "):
        try:
            return int(reason[5:8]) >= 500
        except ValueError:
            return True
    return True


class HealthTracker:
    def __init__(self, address_of: Callable[[int], str | None], max_endpoints: int = 1024,
                 failure_threshold: int = 3, on_change: Callable[[str, bool], None] | None = None,
                 request_failure_threshold: int = 3, base_ejection_s: float = 1.0, max_ejection_s: float = 60.0,
                 max_ejected_fraction: float = 0.5, active_count: Callable[[], int] | None = None) -> None:
        n = max_endpoints
        self.failures = np.zeros(n, dtype=np.int64)  # consecutive failed scrapes
        self.scrape_ok = np.ones(n, dtype=bool)
        self.request_failures = np.zeros(n, dtype=np.int64)  # consecutive pod faults seen on requests
        self.ejected_until = np.zeros(n)  # clock time; 0: not ejected
        self.ejections = np.zeros(n, dtype=np.int64)  # k: how many times in a row ejected (backoff exponent)
        self.probation = np.zeros(n, dtype=bool)
        self.healthy = np.ones(n, dtype=bool)  # the eligibility mask plugins read
        self.threshold = failure_threshold
        self.request_threshold = request_failure_threshold
        self.base_ejection_s = base_ejection_s
        self.max_ejection_s = max_ejection_s
        self.max_ejected_fraction = max_ejected_fraction
        self.ejection_count = 0  # total ejections (a counter, for tests and metrics)
        self._address_of = address_of
        self._active_count = active_count
        self._on_change = on_change
        self.last_reason: dict[int, str] = {}
        self._n = 0  # slots ever touched + 1: refresh looks at no more
        self._kept_in: set[int] = set()  # failing slots left in because too many are ejected (logged once)

    # ---- scrapes ------------------------------------------------------------------------------------
    def success(self, slot: int) -> None:
        self.failures[slot] = 0
        if not self.scrape_ok[slot]:
            self.scrape_ok[slot] = True
            log.info("endpoint %s answers its scrapes again", self._address_of(slot))
            self._update(slot)

    def failure(self, slot: int, reason: str) -> None:
        self.failures[slot] += 1
        self.last_reason[slot] = reason
        if self.scrape_ok[slot] and self.failures[slot] >= self.threshold:
            self.scrape_ok[slot] = False
            log.warning("endpoint %s taken out after %d consecutive failed scrapes (last: %s)",
                        self._address_of(slot), self.failures[slot], reason)
            self._update(slot)

    # ---- requests (passive outlier detection) ---------------------------------------------------------
    def request_success(self, slot: int, now: float) -> None:
        self.request_failures[slot] = 0
        if self.probation[slot]:
            self.probation[slot] = False
            self.ejections[slot] = max(0, int(self.ejections[slot]) - 1)
            log.info("endpoint %s passed its probe and is back in rotation", self._address_of(slot))
            self._update(slot)

    def request_failure(self, slot: int, reason: str, now: float) -> None:
        """A request of ours failed on this pod; only pod faults (``pod_fault``) count."""
        if not pod_fault(reason):
            return
        self.last_reason[slot] = reason
        self.request_failures[slot] += 1
        if self.ejected_until[slot] > now:
            return  # already out (a request that was in flight when it was ejected)
        if self.probation[slot] or self.request_failures[slot] >= self.request_threshold:
            self._eject(slot, reason, now)

    def _eject(self, slot: int, reason: str, now: float) -> None:
        if self._active_count is not None:
            out = int(np.count_nonzero(self.ejected_until[: self._n] > now))
            if out + 1 > self.max_ejected_fraction * max(1, self._active_count()):
                if slot not in self._kept_in:  # say it once per episode, not at every failure
                    self._kept_in.add(slot)
                    log.warning("endpoint %s is failing (%s) but %d pods are already ejected: kept in",
                                self._address_of(slot), reason, out)
                return
        self._kept_in.discard(slot)
        k = int(self.ejections[slot]) + 1
        self.ejections[slot] = k
        duration = min(self.max_ejection_s, self.base_ejection_s * 2 ** (k - 1))
        self.ejected_until[slot] = now + duration
        self.probation[slot] = False
        self.request_failures[slot] = 0
        self.ejection_count += 1
        self._n = max(self._n, slot + 1)
        log.warning("endpoint %s ejected for %.1fs (ejection %d; last fault: %s)",
                    self._address_of(slot), duration, k, reason)
        self._update(slot)

    def refresh(self, now: float, inflight: np.ndarray | None = None) -> None:
        """Make ``healthy`` current: ejections that ran out start probation; a pod on probation is eligible
        only while nothing of ours is in flight on it (one probe at a time)."""
        n = self._n
        if n == 0:
            return
        until = self.ejected_until[:n]
        expired = np.flatnonzero((until > 0) & (until <= now))
        for e in expired.tolist():
            self.ejected_until[e] = 0.0
            self.probation[e] = True
            log.info("endpoint %s on probation: one request will probe it", self._address_of(e))
        probing = np.flatnonzero(self.probation[:n])
        if expired.size == 0 and probing.size == 0:
            return
        for p in set(expired.tolist()) | set(probing.tolist()):
            idle = inflight is None or inflight[p] <= 0
            self._set(p, bool(self.scrape_ok[p]) and (not self.probation[p] or idle))

    def ejected(self, slot: int, now: float) -> bool:
        return bool(self.ejected_until[slot] > now)

    # ---- bookkeeping ----------------------------------------------------------------------------------
    def _update(self, slot: int) -> None:
        self._n = max(self._n, slot + 1)
        ok = bool(self.scrape_ok[slot]) and self.ejected_until[slot] == 0.0
        self._set(slot, ok)

    def _set(self, slot: int, ok: bool) -> None:
        if bool(self.healthy[slot]) == ok:
            return
        self.healthy[slot] = ok
        addr = self._address_of(slot)
        if ok:
            self.last_reason.pop(slot, None)
        if self._on_change and addr:
            self._on_change(addr, ok)

    def reset(self, slot: int) -> None:
        self.failures[slot] = 0
        self.scrape_ok[slot] = True
        self.request_failures[slot] = 0
        self.ejected_until[slot] = 0.0
        self.ejections[slot] = 0
        self.probation[slot] = False
        self.healthy[slot] = True
        self.last_reason.pop(slot, None)
        self._kept_in.discard(slot)
