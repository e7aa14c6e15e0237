"""Expected time to first token on each pod, from the request's prediction (pickers/predictor.py).

TTFT_p is the predicted time to first token on p: the prefill queued ahead, this prompt's part not cached on
p in chunks of p's step budget, and p's running decodes sharing every step, all charged by the one cost
model's roofline (the formula the simulator charges). The score adds what the choice costs the requests
already on p:

    stall_p = r_p x prefill_p     the r_p running decodes on p each wait for this prompt's own prefill
                                  (prefill_p: its uncached part alone on p, above an empty step)
    C_p     = TTFT_p + stall_weight x stall_p     (the default profile: stall_weight 0.5; 0 = TTFT alone)
    score_p = min_q C_q / C_p, in (0, 1].

Why the stall term: TTFT_p alone is accurate for the request itself but greedy on it, so a hot group leaves
its warm pod as soon as the warm pod's queue costs more than one cold prefill elsewhere, and the next spill of
that group again picks whichever pod is idle: one group ended up cold on all 4 pods. Each such spill
recomputes the whole shared prefix (4096 tokens, ~0.46 s on an L40S) inside steps that r_p other requests
decode in, which TTFT_p does not see: TPOT, the median TTFT of everyone behind, and throughput pay for it.
Charging the stall keeps a group on its warm pod(s) unless the queue there really costs more than the miss
does to everyone; a spill target, once warm, has the small U_p and so takes later spills (a hot group gains
one replica, not four). With no prefix sharing U_p is the same on every pod and the term is a mild preference
for pods with fewer decodes. Measured (kvswitch sim, virtual time, see README "The default profile"): the
reduced-knee workload at 20 req/s, 5 seeds: cold prompts 23.2 -> 18.4, TTFT p50 338 -> 175 ms, TPOT 56.7 ->
51.6 ms, p90 level.

Why cache affinity cannot hot-spot a pod: a cache hit only removes U_p x tau_tok of work, while every
request routed to p adds its U to Q_p at once (in-flight tracking, before any scrape), so after a few
requests the pod holding the prefix is slower than recomputing elsewhere and traffic spills over.
"""

from __future__ import annotations

import numpy as np

from pickers.framework import CycleContext, Param, Scorer, reads_kv_events, register
from pickers.state import PrefixMode


@register
class TTFTScorer(Scorer):
    TYPE = "ttft"
    needs_tokens = True
    PARAMS = {
        "mode": Param(str, "auto", choices=("approximate", "precise", "auto")),
        "stall_weight": Param(float, 0.0, min=0.0,
                              doc="weight of the decode stall r x prefill added to the predicted TTFT"),
    }
    mode: PrefixMode
    stall_weight: float

    @property
    def uses_kv_events(self) -> bool:
        return reads_kv_events(self.mode)

    def score(self, ctx: CycleContext, cands: np.ndarray) -> np.ndarray:
        pred = ctx.prediction(self.mode)
        cost = pred.ttft_s[cands]
        if self.stall_weight > 0:
            cost = cost + self.stall_weight * pred.running[cands] * pred.prefill_s[cands]
        return cost.min() / cost
