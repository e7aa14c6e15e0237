"""Expected time to first token on each pod, from the shared cost model (engine.costmodel).

For a prompt of P tokens and a candidate pod p:

    H_p  = cached prompt tokens on p (prefix index, ``mode``; CPU-held blocks weighted 0.8)
    U_p  = max(P - H_p, 1)                                  prefill work of THIS prompt on p
    Q_p  = max(uncached prompt tokens we sent to p and not yet at first token,
               waiting_p (fresh /metrics) x mean prompt tokens)   prefill work queued ahead of it
    r_p  = running decodes on p (fresh /metrics, at least our own started requests)
    B    = token budget of one engine step (vLLM max_num_batched_tokens, ``budget_tokens``)
    steps_p = ceil((Q_p + U_p) / (B - min(r_p, 0.9 B)))      decodes take r_p tokens of every step
    TTFT_p  = steps_p x (overhead + r_p x tau_tok + r_p x ctx x d_kv)          per-step decode load
            + (Q_p + U_p) x tau_tok + (U_p x H_p + U_p^2 / 2) x tau_pair        prefill compute

(tau_tok, tau_pair, d_kv, overhead: pickers.costs, from the pod's model profile x accelerator; ctx =
``decode_context_tokens``.) The score adds what the choice costs the requests already on p:

    stall_p = U_p x tau_tok x r_p                 the r_p running decodes wait U_p x tau_tok for their next token
    C_p     = TTFT_p + stall_weight x stall_p     (the default profile: stall_weight 0.5; 0 = TTFT alone)
    score_p = min_q C_q / C_p, in (0, 1].

Why the stall term: TTFT_p alone is accurate for the request itself (in virtual time, actual/estimated
TTFT has median 1.0-1.1) but greedy on it, so a hot group leaves its warm pod as soon as the warm pod's queue
costs more than one cold prefill elsewhere, and the next spill of that group again picks whichever pod is
idle: one group ended up cold on all 4 pods. Each such spill recomputes the whole shared prefix (4096
tokens, ~0.46 s on an L40S) inside steps that r_p other requests decode in, which TTFT_p does not see:
TPOT, the median TTFT of everyone behind, and throughput pay for it. Charging the stall keeps a group on
its warm pod(s) unless the queue there really costs more than the miss does to everyone; a spill target,
once warm, has the small U_p and so takes later spills (a hot group gains one replica, not four). With no
prefix sharing U_p is the same on every pod and the term is a mild preference for pods with fewer decodes.
Measured (kvswitch sim, virtual time, see README "The default profile"): the reduced-knee workload at 20
req/s, 5 seeds: cold prompts 23.2 -> 18.4, TTFT p50 338 -> 175 ms, TPOT 56.7 -> 51.6 ms, p90 level.

Why cache affinity cannot hot-spot a pod: a cache hit only removes U_p x tau_tok of work, while every
request routed to p adds its U to Q_p at once (in-flight tracking, before any scrape), so after a few
requests the pod holding the prefix is slower than recomputing elsewhere and traffic spills over.
"""

import numpy as np

from pickers.costs import estimate_ttft
from pickers.framework import Param, Scorer, register


@register
class TTFTScorer(Scorer):
    TYPE = "ttft"
    needs_tokens = True
    PARAMS = {
        "mode": Param(str, "auto", choices=("approximate", "precise", "auto")),
        "budget_tokens": Param(float, 8192.0, min=16.0),
        "decode_context_tokens": Param(float, 2048.0, min=0.0),
        "waiting_prompt_tokens": Param(float, 0.0, min=0.0,
                                       doc="tokens per waiting request; 0 = running mean of prompts seen"),
        "stall_weight": Param(float, 0.0, min=0.0,
                              doc="weight of the decode stall U x tau x running added to TTFT in the score"),
    }

    def __init__(self, **params):
        super().__init__(**params)
        self._mean_prompt = 1024.0

    def estimate(self, ctx, cands) -> np.ndarray:
        got = ctx.memo.get("ttft")
        if got is not None and got[0] is cands:
            return got[1]
        dl = self.dl
        p = float(ctx.prompt_tokens())
        self._mean_prompt += 0.01 * (p - self._mean_prompt)
        per_waiting = self.waiting_prompt_tokens or self._mean_prompt
        fresh = dl.fresh(cands, ctx.now)
        waiting = np.where(fresh, dl.metrics.waiting[cands], 0.0)
        queued = np.maximum(dl.inflight.prefill_tokens[cands], waiting * per_waiting)
        cached = np.minimum(ctx.hit_tokens(self.mode)[cands], p)
        est = estimate_ttft(dl.costs, cands, p, cached, queued, dl.running(cands, ctx.now),
                            self.budget_tokens, self.decode_context_tokens)
        ctx.memo["ttft"] = (cands, est)
        ctx.memo["ttft_parts"] = (np.maximum(p - cached, 1.0), dl.running(cands, ctx.now))
        return est

    def score(self, ctx, cands):
        est = self.estimate(ctx, cands)
        if self.stall_weight > 0:
            uncached, running = ctx.memo["ttft_parts"]
            est = est + self.stall_weight * uncached * self.dl.costs.tau_tok[cands] * running
        return est.min() / est
