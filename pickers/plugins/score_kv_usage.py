"""KV-cache utilisation: score = 1 - kv_usage; stale metrics score ``stale_score`` (unknown)."""

import numpy as np

from pickers.framework import Param, Scorer, register


@register
class KVUsageScorer(Scorer):
    TYPE = "kv-usage"
    PARAMS = {"stale_score": Param(float, 0.5, min=0.0, max=1.0)}
    stale_score: float

    def score(self, ctx, cands):
        m = self.dl.metrics
        return np.where(m.fresh(cands, ctx.now), 1.0 - m.kv_usage[cands], self.stale_score)
