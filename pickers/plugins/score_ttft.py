"""Expected time to first token on each pod, from the request's prediction (pickers/predictor.py).

TTFT_p is the predicted time to first token on p: the prefill queued ahead, this prompt's part not cached on
p in chunks of p's step budget, and p's running decodes sharing every step, all charged by the one cost
model's roofline (the formula the simulator charges). The score adds what the choice costs the requests
already on p:

    stall_p = r_p x prefill_p     the r_p running decodes on p each wait for this prompt's own prefill
                                  (prefill_p: its uncached part alone on p, above an empty step)
    fade_p  = prefill_p / (prefill_p + wait_p)    with ``stall_fade`` (the default profile), else 1
    C_p     = TTFT_p + stall_weight x fade_p x stall_p     (default: stall_weight 0.5; 0 = TTFT alone)
    score_p = min_q C_q / C_p, in (0, 1].

wait_p is the part of TTFT_p spent behind others' work (the prefill queued ahead and, on a pod whose cache is
full, the wait for KV space). Why the fade: the decodes running on p now are the ones this prefill stalls only
if it starts now. Below the knee (wait ~ 0) the full charge applies, as measured below. Past it the prefill
runs after wait_p, beside whatever runs then, and on a saturated fleet that is the same on every pod; the
unfaded charge (r_p x prefill_p, tens of seconds for a 30K-token prompt beside 60 short decodes) instead
sorted requests by length onto pods (long prompts to the pods with few running decodes) and, with every pod's
TTFT large, outweighed real differences in queue. In virtual time (4 L40S, the shared Mooncake trace, 240
requests, 2x and 3x the knee) the fade took throughput from 2.46 and 2.40 to 2.59 and 2.56 req/s and the pod
share CV from 0.54 and 0.61 to 0.37 and 0.19 (one seed; README "The default profile" has the curves).

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
        "stall_fade": Param(bool, False, doc="charge the stall in proportion prefill / (prefill + wait ahead)"),
    }
    mode: PrefixMode
    stall_weight: float
    stall_fade: bool

    @property
    def uses_kv_events(self) -> bool:
        return reads_kv_events(self.mode)

    def score(self, ctx: CycleContext, cands: np.ndarray) -> np.ndarray:
        pred = ctx.prediction(self.mode)
        cost = pred.ttft_s[cands]
        if self.stall_weight > 0:
            own = pred.prefill_s[cands]
            stall = self.stall_weight * pred.running[cands] * own
            if self.stall_fade:
                # The decodes running on p now are the ones this prefill stalls only if it starts now. With
                # wait_s of work ahead of it, it stalls whatever runs then, and on a saturated fleet that is
                # the same on every pod: the charge fades as the work ahead grows (in full below the knee).
                own = np.maximum(own, ctx.dl.costs.empty_step_s[cands])
                stall = stall * own / (own + pred.wait_s[cands])
            cost = cost + stall
        return cost.min() / cost
