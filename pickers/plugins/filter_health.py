"""Drop pods taken out by failed scrapes or ejected by passive outlier detection (pickers.datalayer.health);
a pod on probation passes only while no request of ours is in flight on it (one probe at a time)."""

from pickers.framework import Filter, register


@register
class HealthFilter(Filter):
    TYPE = "health"

    def filter(self, ctx, cands):
        self.dl.health.refresh(ctx.now, self.dl.inflight.requests)
        keep = cands[self.dl.health.healthy[cands]]
        ctx.rejected["health"] = ctx.rejected.get("health", 0) + cands.size - keep.size
        return keep
