"""Use every pod while the fleet has room: score_p = (min_q n_q + k) / (n_p + k), in (0, 1], n_p the
requests the picker has in flight on p, k the ``offset`` (4); every score is 1 once every candidate has
prompt tokens queued (the predictor's Q_p > 0: the fleet is past its knee).

Why: below the knee the expected TTFT is lowest on a pod that holds the request's prefix, so a pod that holds
none gets nothing, and never comes to hold it. On multi-turn traffic (one system prompt shared by every
conversation) at half the knee, one of four pods got no request at all and the other three ran 20-24 decodes
each: TPOT 41 ms against 35 ms for a router that spreads the conversations. The TPOT term sees the longer step
there (~42 against ~31 ms predicted), but the prefix and TTFT terms (5 of the profile's weight, against its 2)
outvote it. This term is steep only between an idle pod and busy ones (0 against 20 in flight: 4 / 24), and
one cold prefill of the shared prompt is what the idle pod pays once to serve its share from then on. Between
nearly idle pods it is gentle (1 against 0 in flight: 0.8), so the second request of a long prefix still
follows its cache (tests/pickers/test_scheduler.py); with k = 1 (0.5 there) it did not. Multi-turn at 0.5x and
1x the knee, 5 seeds: k = 1, 2, 4 alike (TTFT p90 128-131 and 152 ms, against 139 and 159 without).

Why level past the knee: there the counts are large (hundreds queued) and say little about work (a
Mooncake request is 1 to 16K tokens); counting them moved the throughput at 2-3x the knee by -1 to -3 %
(5 seeds), while the TTFT with its queue and KV wait already balances the work.
"""

from __future__ import annotations

import numpy as np

from pickers.framework import CycleContext, Param, Scorer, register


@register
class SpreadScorer(Scorer):
    TYPE = "spread"
    PARAMS = {"offset": Param(float, 4.0, min=0.1, doc="k of (min + k) / (n + k): larger is gentler")}
    offset: float

    def score(self, ctx: CycleContext, cands: np.ndarray) -> np.ndarray:
        if bool(np.all(ctx.prediction().queued[cands] > 0)):
            return np.ones(cands.size)
        n = self.dl.inflight.requests[cands]
        k = self.offset
        return (n.min() + k) / (n + k)
