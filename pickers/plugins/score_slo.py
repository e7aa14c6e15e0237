"""SLO-aware routing: among the pods predicted to meet the request's targets, the best fit; else the least late.

For a request with targets (``RequestState.slo``: TTFT T_t and/or TPOT T_p) and each candidate p, from the
request's prediction (pickers/predictor.py, corrected online):

    late_p = max(TTFT_p / T_t, TPOT_p / T_p)          over the targets it has; <= 1: p is predicted to meet them
    tiers (``Scorer.tiers``): every pod of a higher tier ranks above every pod of a lower one, whatever the
    other scores; pods missing the targets get tier 0 when some pod meets them
    meeting them:  tier_p = 1; score_p = s_p / max_F s
                   s_p = seconds per token of a 1024-token prompt alone on p: its kind (model, accelerator,
                         deployment), from the cost model, 3 significant digits (pods of one kind tie)
                   the best fit, as a score (weight 2 in the default profile): the slower kind of pod that
                   meets the targets is preferred (do not burn the fastest pod on a request with slack),
                   against the profile's expected-TTFT (3), prefix (1) and KV (1) scores
    missing them:  tier_p = 0 (when some pod meets them), score 0
    none meets them: tier_p = -rank of late_p; score_p = min_q late_q / late_p     the least late first

Prefix affinity is the profile's expected-TTFT scorer's: a pod holding the prefix has the smaller TTFT_p and
keeps the request while that, its queue included, stays the least, i.e. while staying costs less than the
miss elsewhere; with targets, only among the pods that meet them (a sticky pod predicted to miss loses the
request to one that meets them, whatever its prefix). A recompute term in the fit itself was tried and
doubled the affinity: chat on 1 prefill + 3 decode pods piled onto the pod holding the shared system prompt
(208 of 240 requests, TPOT 48 ms against 37 ms without it).

The kind preference is a score, not a tier: as a tier (every slower pod meeting the targets before any
faster one) it sent the Mooncake trace's requests with slack to the A100s of a 4 H100 + 4 A100 fleet until
their queues broke the targets the prediction said they met (400 requests at 1x, targets 5 s / 20 ms: SLO
attainment 0.608 and TTFT p50 1325 ms, against 0.680 and 330 ms without slo-fit and 0.808 and 228 ms with
the feasibility tier and this score; `kvswitch sim replay ... --fleet e2e/bench/slo/mixed-fleet.yaml`, README).

The fit is by speed, not by the headroom left (llm-d's best fit, the least positive SLO - predicted): on pods
of one kind the headroom is the queue, and packing each pod's queue up to the target raised the mean TTFT of
everyone (chat, 1 prefill + 3 decode pods: spill recomputes queued on one decode pod); by speed, pods of one
kind tie and the profile's expected-TTFT scorer picks the quickest among those meeting the targets.

A request without targets gets no tiers and score 0 on every pod: the scorer adds nothing to any total, so
the default profile routes it exactly as without this scorer (bit for bit: no constant is added). The other
scorers of the profile (expected TTFT, prefix, KV) still order pods within a tier, with their weights.

Why tiers and not a weight: with a weight the other scorers (TTFT 3, prefix 1, KV 1 in the default profile)
can outvote feasibility and put a request on a pod predicted to miss its TPOT while another meets it; a
request that fits somewhere should go where it fits.
"""

from __future__ import annotations

import numpy as np

from engine.costmodel.vector import prefill_seconds
from pickers.framework import CycleContext, PrefixModeScorer, register


@register
class SLOFitScorer(PrefixModeScorer):
    TYPE = "slo-fit"

    def __init__(self, **params: object) -> None:
        super().__init__(**params)
        # memos, both read-only arrays: lateness of the cycle being scored (``score`` and ``tiers`` ask for the
        # same state and candidates), and the speeds of the last candidates (they change only with the
        # fleet: the cost table's version)
        self._late: tuple[object, np.ndarray, np.ndarray | None] | None = None
        self._speed: tuple[int, np.ndarray, np.ndarray] | None = None

    def lateness(self, ctx: CycleContext, cands: np.ndarray) -> np.ndarray | None:
        """late_p per candidate (None without targets)."""
        got = self._late
        if got is not None and got[0] is ctx.state and got[1] is cands:
            return got[2]
        late = self._lateness(ctx, cands)
        self._late = (ctx.state, cands, late)
        return late

    def _lateness(self, ctx: CycleContext, cands: np.ndarray) -> np.ndarray | None:
        slo = ctx.state.slo
        if not slo.any:
            return None
        pred = ctx.prediction(self.mode)
        late = np.zeros(cands.size)
        if slo.ttft_s is not None:
            late = np.maximum(late, pred.ttft_s[cands] / slo.ttft_s)
        if slo.tpot_s is not None:
            late = np.maximum(late, pred.tpot_s[cands] / slo.tpot_s)
        late.flags.writeable = False
        return late

    def speed(self, cands: np.ndarray) -> np.ndarray:
        """Seconds per token of a 1024-token prompt alone on each candidate (its kind: model, accelerator,
        deployment), rounded to 3 significant digits so pods of one kind tie exactly. Memoised for the
        same candidates while the cost table is unchanged (a pod's kind changes only with its endpoint)."""
        got, version = self._speed, self.dl.costs.version
        if got is not None and got[0] == version and got[1].size == cands.size and np.array_equal(got[1], cands):
            return got[2]
        sp = self._speeds(cands)
        sp.flags.writeable = False
        self._speed = (version, cands.copy(), sp)
        return sp

    def _speeds(self, cands: np.ndarray) -> np.ndarray:
        dl = self.dl
        n = np.full(cands.size, REFERENCE_TOKENS)
        zero = np.zeros(cands.size)
        t = prefill_seconds(dl.costs.rooflines(cands), n, dl.costs.budget[cands], zero, zero, zero, zero + 1.0)
        per = t / REFERENCE_TOKENS
        scale = 10.0 ** (np.floor(np.log10(np.maximum(per, 1e-30))) - 2)
        return np.round(per / scale) * scale

    def score(self, ctx: CycleContext, cands: np.ndarray) -> np.ndarray:
        late = self.lateness(ctx, cands)
        if late is None:
            return np.zeros(cands.size)
        ok = late <= 1.0
        if not ok.any():
            return late.min() / np.maximum(late, 1e-12)
        sp = self.speed(cands)
        return np.where(ok, sp / sp[ok].max(), 0.0)

    def tiers(self, ctx: CycleContext, cands: np.ndarray) -> np.ndarray | None:
        late = self.lateness(ctx, cands)
        if late is None:
            return None
        ok = late <= 1.0
        if not ok.any():  # the least late first: tiers by rank of lateness (equal lateness, equal tier)
            return -np.unique(late, return_inverse=True)[1].astype(np.float64)
        return ok.astype(np.float64)  # meeting the targets: 1; missing them: 0

REFERENCE_TOKENS = 1024.0
