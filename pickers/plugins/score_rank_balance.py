"""Straggler cost of a data-parallel rank: fill the idle ranks of a pod before lengthening its slowest one.

The ranks of a DP-attention + EP-experts pod step together (every MoE layer is an all-to-all among them), so
a step lasts as long as its slowest rank (engine.costmodel.dataparallel). Prefill work sent to a rank whose
queue is below the pod's longest runs in steps the pod takes anyway; only the part that makes it the new
longest queue costs the pod time, and it costs every rank of the pod. With W_s the prefill tokens queued on
rank s (sent by us and not at first token yet, or the rank's waiting requests x mean prompt) and U_r this
prompt's uncached tokens on rank r:

    M_p     = max W_s over the ranks s of r's pod
    extra_r = max(0, W_r + U_r - M_p)             tokens by which the pod's straggler grows
    score_r = 1 - extra_r / U_r                   1: fits in the pod's idle capacity; 0: all of it is new

That spreads prefill work, but cache affinity keeps each prompt group on the rank that first computed it, so
where groups land decides the ranks' shares: a new group going to whichever idle rank wins a tie places 32
groups on 8 ranks as balls in bins (some ranks get twice the groups of others). So the score also carries the
ranks' recent traffic, requests routed there in an exponentially decaying window (``half_life_s``):

    recent_score_r = (max R - R_r) / (max R - min R)   over the ranked candidates (1 for the quietest)
    quiet_r        = 1 - (U_r / P) x (1 - recent_score_r)   only the uncached part of the prompt sees traffic
    score_r        = (1 - recent_weight) x (1 - extra_r / U_r) + recent_weight x quiet_r

A cold group then goes to the quietest rank; a warm one is not pushed off the rank that holds it by that rank's
traffic (``recent_cold_only``; without it, at light load a group with a short prefix moved for nothing), only by
its queue (the straggler term and the TTFT score).

Endpoints that are not ranks score 1 (nothing to balance), so the scorer changes no decision among them.
"""

import math

import numpy as np

from pickers.framework import Param, Scorer, register
from pickers.state import PrefixMode


@register
class RankBalanceScorer(Scorer):
    TYPE = "rank-balance"
    needs_tokens = True
    PARAMS = {
        "mode": Param(str, "auto", choices=("approximate", "precise", "auto"),
                      doc="prefix index for this prompt's cached tokens on each rank"),
        "waiting_prompt_tokens": Param(float, 1024.0, min=0.0, doc="tokens per waiting request (fresh /metrics)"),
        "decode_tokens": Param(float, 0.0, min=0.0,
                               doc="prefill-token equivalent of one running decode in a rank's load"),
        "recent_weight": Param(float, 0.5, min=0.0, max=1.0, doc="share of the recent-traffic term"),
        "half_life_s": Param(float, 5.0, min=0.001, doc="half-life of the recent-traffic count"),
        "recent_cold_only": Param(bool, True, doc="apply the recent-traffic term only to the uncached part"),
    }
    mode: PrefixMode
    waiting_prompt_tokens: float
    decode_tokens: float
    recent_weight: float
    half_life_s: float
    recent_cold_only: bool

    def __init__(self, **params):
        super().__init__(**params)
        self._recent = np.zeros(0)
        self._at = 0.0

    def _decay(self, now: float, size: int) -> np.ndarray:
        if self._recent.size < size:
            self._recent = np.concatenate([self._recent, np.zeros(size - self._recent.size)])
        if now > self._at:
            self._recent *= math.exp(-(now - self._at) * math.log(2) / self.half_life_s)
            self._at = now
        return self._recent

    def on_routed(self, decision):
        slot = self.dl.endpoints.slot(decision.primary)
        if slot is not None and self.dl.endpoints.is_rank[slot]:
            self._decay(self.dl.clock.now(), slot + 1)[slot] += 1.0

    def score(self, ctx, cands):
        dl = self.dl
        table = dl.endpoints
        ranked = table.is_rank[cands]
        out = np.ones(cands.size)
        if not ranked.any():
            return out
        active = table.active_slots()
        fresh = dl.fresh(active, ctx.now)
        waiting = np.where(fresh, dl.metrics.waiting[active], 0.0) * self.waiting_prompt_tokens
        queued = np.maximum(dl.inflight.prefill_tokens[active], waiting)
        if self.decode_tokens:
            queued = queued + self.decode_tokens * dl.running(active, ctx.now)
        groups = table.pod_group[active]
        longest = np.zeros(int(groups.max()) + 1 if groups.size else 1)
        np.maximum.at(longest, groups, queued)
        w = np.zeros(table.slot_count)
        w[active] = queued
        p = float(ctx.prompt_tokens())
        u = np.maximum(p - np.minimum(ctx.hit_tokens(self.mode)[cands], p), 1.0)
        extra = np.maximum(0.0, w[cands] + u - longest[table.pod_group[cands]])
        straggler = 1.0 - extra / u
        rc = cands[ranked]
        recent = self._decay(ctx.now, table.slot_count)[rc]
        spread = recent.max() - recent.min() if rc.size else 0.0
        quiet = (recent.max() - recent) / spread if spread > 0 else np.ones(rc.size)
        if self.recent_cold_only:  # a rank that holds the prompt is not pushed away by its traffic
            cold = (u / max(p, 1.0))[ranked]
            quiet = 1.0 - cold * (1.0 - quiet)
        rw = self.recent_weight
        out[ranked] = (1.0 - rw) * straggler[ranked] + rw * quiet
        return out
