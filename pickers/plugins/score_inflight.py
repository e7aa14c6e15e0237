"""What the picker itself has in flight on each pod. ``inflight-tokens``: uncached prompt tokens not yet
prefilled plus ``decode_weight`` x decode tokens still to come. ``inflight-requests``: requests routed and
not finished. score = (max - x) / (max - min); all equal -> 1."""

from pickers.framework import Param, Scorer, register
from pickers.plugins._norm import lower_is_better


@register
class InflightTokensScorer(Scorer):
    TYPE = "inflight-tokens"
    reads_metrics = False
    PARAMS = {"decode_weight": Param(float, 0.1, min=0.0)}
    decode_weight: float

    def score(self, ctx, cands):
        f = self.dl.inflight
        return lower_is_better(f.prefill_tokens[cands] + self.decode_weight * f.decode_tokens[cands])


@register
class InflightRequestsScorer(Scorer):
    TYPE = "inflight-requests"
    reads_metrics = False

    def score(self, ctx, cands):
        return lower_is_better(self.dl.inflight.requests[cands])
