"""Drop pods taken out by consecutive scrape or request failures."""

from pickers.framework import Filter, register


@register
class HealthFilter(Filter):
    TYPE = "health"

    def filter(self, ctx, cands):
        keep = cands[self.dl.health.healthy[cands]]
        ctx.rejected["health"] = ctx.rejected.get("health", 0) + cands.size - keep.size
        return keep
