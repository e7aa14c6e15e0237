"""Expected time to first token on each pod, from the request's prediction (pickers/predictor.py).

TTFT_p is the predicted time to first token on p: the prefill queued ahead, this prompt's part not cached on
p in chunks of p's step budget, and p's running decodes sharing every step, all charged by the one cost
model's roofline (the formula the simulator charges). The score adds what the choice costs the requests
already on p:

    stall_p = r_p x prefill_p     the r_p running decodes on p each wait for this prompt's own prefill
                                  (prefill_p: its uncached part alone on p, above an empty step)
    C_p     = TTFT_p + stall_weight x stall_p     (0 = TTFT alone, the default profile's choice)
    score_p = min_q C_q / C_p, in (0, 1].

The default profile no longer charges the stall (it used stall_weight 0.5 until the load-curve study, issue
15). With the predictor's TTFT, which now counts the running decodes sharing every step, the prefill queue
by its real tokens and the wait for KV space on a full pod, the charge hurt past the knee, even faded by the
work ahead (x prefill / (prefill + wait)): it is r_p x prefill_p, tens of seconds for an 8K-token prompt
beside 50 running decodes, so it outweighed the real differences in queue and sorted prompts by length onto
the pods with the fewest running decodes. Virtual time, 4 L40S, 240 requests, medians of 3 seeds (faded
charge -> none): no sharing at 2x the knee TTFT p90 1.03 -> 0.36 s; shared prefix at 2x 12.55 -> 13.26
req/s. At the knee it did protect TPOT (+5-17 % without it, README "The default profile"). The history
below is why it was added (with the earlier linear TTFT estimate), kept for whoever sets it in a profile.

Why the stall term: TTFT_p alone is accurate for the request itself but greedy on it, so a hot group leaves
its warm pod as soon as the warm pod's queue costs more than one cold prefill elsewhere, and the next spill of
that group again picks whichever pod is idle: one group ended up cold on all 4 pods. Each such spill
recomputes the whole shared prefix (4096 tokens, ~0.46 s on an L40S) inside steps that r_p other requests
decode in, which TTFT_p does not see: TPOT, the median TTFT of everyone behind, and throughput pay for it.
Charging the stall kept a group on its warm pod(s) unless the queue there really costs more than the miss
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

from pickers.framework import CycleContext, Param, PrefixModeScorer, register


@register
class TTFTScorer(PrefixModeScorer):
    TYPE = "ttft"
    PARAMS = {
        **PrefixModeScorer.PARAMS,
        "stall_weight": Param(float, 0.0, min=0.0,
                              doc="weight of the decode stall r x prefill added to the predicted TTFT"),
    }
    stall_weight: float

    def score(self, ctx: CycleContext, cands: np.ndarray) -> np.ndarray:
        pred = ctx.prediction(self.mode)
        cost = pred.ttft_s[cands]
        if self.stall_weight > 0:
            cost = cost + self.stall_weight * pred.running[cands] * pred.prefill_s[cands]
        return cost.min() / cost
