"""KV-cache utilisation: score = 1 - kv_usage; stale metrics score ``stale_score`` (unknown).

``with_queue`` (the default profile): the usage counts the prompt tokens queued for the pod too (the
predictor's Q_p over the pod's KV capacity, capped at 1), because they will hold KV as soon as they are
admitted. Below the knee nothing is queued and the score is the plain one: a tie-breaker towards the pod
with room. Past it every pod's cache plus queue is full, so the term goes level instead of pulling requests
to a pod whose cache just emptied while its queue is the longest (which the expected TTFT, with its KV wait,
already prices). Virtual time, Mooncake trace at 3x the knee, 3 seeds: plain usage 2.54 req/s against round
robin's 2.58; without the term 2.64 but TTFT p90 at the knee of the shared-prefix curve 0.38 -> 0.49 s.
"""

import numpy as np

from pickers.framework import CycleContext, Param, Scorer, register


@register
class KVUsageScorer(Scorer):
    TYPE = "kv-usage"
    PARAMS = {"stale_score": Param(float, 0.5, min=0.0, max=1.0),
              "with_queue": Param(bool, False, doc="count the prompt tokens queued for the pod as used KV")}
    stale_score: float
    with_queue: bool

    def score(self, ctx: CycleContext, cands: np.ndarray) -> np.ndarray:
        m = self.dl.metrics
        use = m.kv_usage[cands]
        if self.with_queue:
            blocks = m.num_gpu_blocks[cands] * self.dl.endpoints.block_size[cands]
            cap = np.where(blocks > 0, blocks, self.dl.costs.kv_capacity[cands])
            use = np.minimum(use + ctx.prediction().queued[cands] / np.maximum(cap, 1.0), 1.0)
        return np.where(m.fresh(cands, ctx.now), 1.0 - use, self.stale_score)
