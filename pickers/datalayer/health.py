"""Pod health from consecutive failures: N failed scrapes or requests in a row take a pod out, one success
brings it back (the scraper keeps probing pods that are out)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

log = logging.getLogger("kvswitch.pickers.health")


class HealthTracker:
    def __init__(self, address_of: Callable[[int], str | None], max_endpoints: int = 1024,
                 failure_threshold: int = 3, on_change: Callable[[str, bool], None] | None = None) -> None:
        self.failures = np.zeros(max_endpoints, dtype=np.int64)
        self.healthy = np.ones(max_endpoints, dtype=bool)
        self.threshold = failure_threshold
        self._address_of = address_of
        self._on_change = on_change
        self.last_reason: dict[int, str] = {}

    def success(self, slot: int) -> None:
        self.failures[slot] = 0
        if not self.healthy[slot]:
            self.healthy[slot] = True
            self.last_reason.pop(slot, None)
            addr = self._address_of(slot)
            log.info("endpoint %s is healthy again", addr)
            if self._on_change and addr:
                self._on_change(addr, True)

    def failure(self, slot: int, reason: str) -> None:
        self.failures[slot] += 1
        self.last_reason[slot] = reason
        if self.healthy[slot] and self.failures[slot] >= self.threshold:
            self.healthy[slot] = False
            addr = self._address_of(slot)
            log.warning("endpoint %s taken out after %d consecutive failures (last: %s)",
                        addr, self.failures[slot], reason)
            if self._on_change and addr:
                self._on_change(addr, False)

    def reset(self, slot: int) -> None:
        self.failures[slot] = 0
        self.healthy[slot] = True
        self.last_reason.pop(slot, None)
