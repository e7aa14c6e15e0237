"""The gateway's subset hint (envoy.lb.subset_hint): pick only inside it; an empty hint is a 503."""

import numpy as np

from pickers.framework import Filter, register
from pickers.types import SchedulingError


@register
class SubsetFilter(Filter):
    TYPE = "subset"

    def filter(self, ctx, cands):
        subset = ctx.request.subset
        if subset is None:
            return cands
        if not subset:
            raise SchedulingError(503, "the gateway's subset hint (x-gateway-destination-endpoint-subset) is "
                                  "empty: no endpoint may serve this request", "subset_empty")
        table = self.dl.endpoints  # the hint names pods (ip:port); every rank of a named pod may serve
        allowed = {s for a in subset for s in table.pod_slots(a)}
        keep = np.fromiter((c for c in cands.tolist() if c in allowed), dtype=cands.dtype)
        ctx.rejected["subset"] = ctx.rejected.get("subset", 0) + cands.size - keep.size
        return keep
