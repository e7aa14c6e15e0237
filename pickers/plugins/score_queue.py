"""Queue depth: requests waiting on the pod (its metric when fresh, never below what we sent and that has
not produced a first token yet). score = (max - q) / (max - min) over the candidates; all equal -> 1."""

from pickers.framework import Scorer, register
from pickers.plugins._norm import lower_is_better


@register
class QueueScorer(Scorer):
    TYPE = "queue"

    def score(self, ctx, cands):
        return lower_is_better(self.dl.queue_depth(cands, ctx.now))
