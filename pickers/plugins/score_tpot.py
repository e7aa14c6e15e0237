"""Expected time per output token on each pod once the request joins its batch, from the request's
prediction (pickers/predictor.py: the one cost model's decode step with the pod's running decodes and this
prompt's context): score_p = min_q TPOT_q / TPOT_p, in (0, 1].

Why a profile weighs it beside the TTFT: the TTFT a request gets on a warm pod can be the lowest while its
decode, and every decode already there, runs slower for it. Below the knee that is what concentrates a
group or a conversation on the pod that holds it: each new request's TTFT is lowest there, the batch grows,
and its steps slow down for all of them. Past the knee every pod's batch is full, the TPOTs are alike and
the term is level, so it does not undo the prefix affinity that saves the fleet's work there.
"""

from __future__ import annotations

import numpy as np

from pickers.framework import CycleContext, PrefixModeScorer, register


@register
class TPOTScorer(PrefixModeScorer):
    TYPE = "tpot"

    def score(self, ctx: CycleContext, cands: np.ndarray) -> np.ndarray:
        tpot = ctx.prediction(self.mode).tpot_s[cands]
        return tpot.min() / tpot
