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

Bounded load (``bound``, consistent hashing with bounded loads, Mirrokni et al. 2018): affinity still leaves
each rank with its groups' random sizes (requests-per-rank CV 0.10-0.19 on 2 pods x DP4 at 10 req/s), so a
decaying count C_r of the requests routed to each rank (``bound_half_life_s``) caps it:

    over_r  = C_r > (1 + bound) x mean C over the ranked candidates + bound_slack
    score_r = 0 if over_r, else max(score_r, bound_spill)    (only while some candidate is over)

An over-bound rank loses the rank-balance weight to every other rank, so the group's request goes to the best
of the rest by the other scorers: a rank that already holds the prefix (a replica, warmed by an earlier spill)
before a cold one, so a hot group costs one miss per extra replica and then spreads over its replicas. Some
rank is always under the mean, so the bound never leaves every rank at 0. ``bound_slack`` keeps light load
(a handful of requests) on the rank that holds the prefix.

The top bound alone leaves a rank whose groups are small starved (2 pods x DP8, 32 groups, 10 req/s: one rank
at 3.3 % against a 6.25 % mean, CV 0.06-0.14), since spills go to replicas, not to it. ``bound_floor`` bounds
the bottom the same way: while a rank is under (1 - bound) x the mean - bound_slack it scores 1 and every rank
at or above the mean 0, so the next request (of whichever group) goes there and warms it (CV 0.036-0.040,
TTFT p90 10-12 ms, hit 88-89 % there).

Default ``recent_weight`` 1: the straggler term is off. It assumes an idle rank's capacity is free in the
pod's steps, but the experts are shared over the pod (EP): a second rank prefilling in the same steps adds
its tokens to every expert's work, and the term sent prompts to a busy pod's idle rank before an idle pod
(Mooncake trace at 0.7x, 2 x DP4: TTFT p50 479 vs 280 ms, p90 1470 vs 1233 ms, TPOT 28.9 vs 13.1 ms with
and without it; e2e/bench/results/2026-12-02-dp-moe-v2).

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
        "recent_weight": Param(float, 1.0, min=0.0, max=1.0, doc="share of the recent-traffic term"),
        "half_life_s": Param(float, 5.0, min=0.001, doc="half-life of the recent-traffic count"),
        "recent_cold_only": Param(bool, True, doc="apply the recent-traffic term only to the uncached part"),
        "bound": Param(float, 0.05, min=0.0,
                       doc="a rank routed more than (1 + bound) x the ranks' mean (+ bound_slack) scores 0; 0: off"),
        "bound_slack": Param(float, 2.0, min=0.0, doc="requests a rank may exceed the bound by (light load)"),
        "bound_half_life_s": Param(float, 120.0, min=0.001, doc="half-life of the bounded-load request count"),
        "bound_spill": Param(float, 1.0, min=0.0, max=1.0,
                             doc="while a candidate is over the bound, the others score at least this"),
        "bound_floor": Param(bool, True,
                             doc="also pull to a rank under (1 - bound) x the mean - bound_slack (the others "
                                 "at or above the mean score 0); off: only the top is bounded"),
    }
    mode: PrefixMode
    waiting_prompt_tokens: float
    decode_tokens: float
    recent_weight: float
    half_life_s: float
    recent_cold_only: bool
    bound: float
    bound_slack: float
    bound_half_life_s: float
    bound_spill: float
    bound_floor: bool

    def __init__(self, **params):
        super().__init__(**params)
        self._recent = _Decaying(self.half_life_s)
        self._routed = _Decaying(self.bound_half_life_s)

    def bind(self, dl):
        super().bind(dl)
        dl.endpoints.listen(self._on_endpoint)

    def _on_endpoint(self, change: str, slot: int, ep) -> None:
        """A removed endpoint's counts go with it: its slot is reused by the next endpoint added, which must
        start at zero (else a replacement pod inherits its predecessor's traffic and the bound misjudges it)."""
        if change == "remove":
            for counts in (self._recent, self._routed):
                if slot < counts.counts.size:
                    counts.counts[slot] = 0.0

    def on_routed(self, decision):
        slot = self.dl.endpoints.slot(decision.primary)
        if slot is not None and self.dl.endpoints.is_rank[slot]:
            now = self.dl.clock.now()
            self._recent.at(now, slot + 1)[slot] += 1.0
            self._routed.at(now, slot + 1)[slot] += 1.0

    def score(self, ctx, cands):
        dl = self.dl
        table = dl.endpoints
        ranked = table.is_rank[cands]
        out = np.ones(cands.size)
        if not ranked.any():
            return out
        active = table.active_slots()
        fresh = dl.fresh(active, ctx.now)
        waiting = dl.scraped_waiting(active, ctx.now, fresh) * self.waiting_prompt_tokens
        queued = np.maximum(dl.inflight.prefill_tokens[active], waiting)
        if self.decode_tokens:
            queued = queued + self.decode_tokens * dl.running(active, ctx.now, fresh)
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
        recent = self._recent.at(ctx.now, table.slot_count)[rc]
        spread = recent.max() - recent.min() if rc.size else 0.0
        quiet = (recent.max() - recent) / spread if spread > 0 else np.ones(rc.size)
        if self.recent_cold_only:  # a rank that holds the prompt is not pushed away by its traffic
            cold = (u / max(p, 1.0))[ranked]
            quiet = 1.0 - cold * (1.0 - quiet)
        rw = self.recent_weight
        out[ranked] = (1.0 - rw) * straggler[ranked] + rw * quiet
        if self.bound > 0 and rc.size > 1:
            routed = self._routed.at(ctx.now, table.slot_count)[rc]
            mean = routed.mean()
            over = routed > (1.0 + self.bound) * mean + self.bound_slack
            if over.any():
                sub = out[ranked]
                out[ranked] = np.where(over, 0.0, np.maximum(sub, self.bound_spill))
            if self.bound_floor:
                under = routed < (1.0 - self.bound) * mean - self.bound_slack
                if under.any():
                    out[ranked] = np.where(under, 1.0, np.where(routed >= mean, 0.0, out[ranked]))
        return out


class _Decaying:
    """Per endpoint slot: a count that halves every ``half_life_s`` (grows with the slot table)."""

    __slots__ = ("half_life_s", "counts", "_at")

    def __init__(self, half_life_s: float):
        self.half_life_s = half_life_s
        self.counts = np.zeros(0)
        self._at = 0.0

    def at(self, now: float, size: int) -> np.ndarray:
        if self.counts.size < size:
            self.counts = np.concatenate([self.counts, np.zeros(size - self.counts.size)])
        if now > self._at:
            self.counts *= math.exp(-(now - self._at) * math.log(2) / self.half_life_s)
            self._at = now
        return self.counts
