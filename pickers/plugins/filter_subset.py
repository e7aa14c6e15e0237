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
        slot = self.dl.endpoints.by_address
        allowed = {s for a in subset if (s := slot.get(a)) is not None}
        keep = np.fromiter((c for c in cands.tolist() if c in allowed), dtype=cands.dtype)
        ctx.rejected["subset"] = ctx.rejected.get("subset", 0) + cands.size - keep.size
        return keep
