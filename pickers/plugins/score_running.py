"""Running requests (decode batch): the pod's metric when fresh, never below our own started requests.
score = (max - r) / (max - min); all equal -> 1."""

from pickers.framework import Scorer, register
from pickers.plugins._norm import lower_is_better


@register
class RunningScorer(Scorer):
    TYPE = "running"

    def score(self, ctx, cands):
        return lower_is_better(self.dl.running(cands, ctx.now))
