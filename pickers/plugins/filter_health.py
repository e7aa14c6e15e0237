"""Drop pods taken out by failed scrapes or ejected by passive outlier detection (pickers.datalayer.health);
a pod on probation passes only while no request of ours is in flight on it (one probe at a time).

Panic, as Envoy's panic threshold does it: when every candidate is out and some are out only because their
metrics scrapes failed (none of our requests failed there), those are kept. Scrapes of every pod failing at
once says more about the picker (overloaded, its network) than about the pods, and a request routed on stale
metrics beats a 503 for all; a pod that really is down then fails requests and is ejected for that (request
ejection never takes out more than half the pool).
"""

import logging

import numpy as np

from pickers.framework import Filter, register

log = logging.getLogger("kvswitch.pickers.health")


@register
class HealthFilter(Filter):
    TYPE = "health"
    _panicking = False

    def filter(self, ctx, cands):
        health = self.dl.health
        health.refresh(ctx.now, self.dl.inflight.requests)
        keep = cands[health.healthy[cands]]
        if keep.size == 0 and cands.size:
            stale = cands[~health.scrape_ok[cands] & (health.ejected_until[cands] <= ctx.now)
                          & ~health.probation[cands]]
            if stale.size:
                if not self._panicking:
                    log.warning("every endpoint is out; %d of them only for failed metrics scrapes: routing to "
                                "those on their last known metrics", stale.size)
                    self._panicking = True
                ctx.rejected["health"] = ctx.rejected.get("health", 0) + cands.size - stale.size
                return np.asarray(stale)
        if self._panicking and keep.size:
            log.info("endpoints answer their scrapes again: health filter out of panic")
            self._panicking = False
        ctx.rejected["health"] = ctx.rejected.get("health", 0) + cands.size - keep.size
        return keep
