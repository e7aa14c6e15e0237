"""Prefill/decode profile handler: choose the decode pod first, then decide whether a prefill leg pays.

1. Run the decode profile (``profile``, default ``scheduler.profile``: role decode/both and its scorers)
   over the active pods: its ranking is the decode fallback list.
2. Ask the decider (pickers/plugins/pd_decider.py: formula, constants and why) whether the part of the
   prompt the chosen decode pod lacks is worth computing on a prefill pod.
3. If so, pick the prefill pod (healthy, role prefill/both, not the decode pod) with the lowest

       E_p = TTFT_p + transfer_p(U)

   where TTFT_p is score_ttft's estimate (its queued prefill + prefill of the part not cached on p + its
   decode load) and transfer_p the cost model's KV transfer of the U tokens the decode pod lacks over
   ``link``. ``Decision.prefill`` = that pod; extproc sends it to the decode pod's sidecar as
   ``x-prefiller-host-port``.

Explanation: the prefill candidates appear beside the decode ones (scores ``pd-ttft-ms``,
``pd-queue-ms``, ``pd-transfer-ms``, total = best E / E_p) and ``explanation["_pd"]`` carries the decider's
numbers (leg, reason code, prompt, uncached, ratio, threshold, saved-ms, prefill-wait-ms, decode-room);
``request.cache["pd"]`` keeps the reason as words for logs. The scheduler's ``_routed`` records both pods
in the approximate index and the in-flight tracker (prefill work on the prefill pod, decode on the
decode pod).
"""

from __future__ import annotations

import numpy as np

from engine.costmodel import resolve_link
from pickers.framework import Param, ProfileHandler, ProfileResult, register
from pickers.plugins import pd_decider as pd
from pickers.plugins.score_ttft import TTFTScorer
from pickers.types import Decision


@register
class PrefillDecodeHandler(ProfileHandler):
    TYPE = "prefill-decode"
    PARAMS = {
        "profile": Param((str, type(None)), None, doc="decode profile (default: scheduler.profile)"),
        "threshold_tokens": Param(int, 2048, min=0, doc="least uncached tokens on the decode pod for a leg"),
        "min_uncached_ratio": Param(float, 0.5, min=0.0, max=1.0, doc="least uncached / prompt for a leg"),
        "skip_when_saturated": Param(bool, True, doc="no leg when the prefill queue costs more than it saves "
                                                     "and the decode pod has room"),
        "link": Param(str, "rdma-400g", doc="cost-model link profile between prefill and decode pods"),
        "hop_s": Param(float, 0.002, min=0.0, doc="fixed cost of the extra hop through the sidecar"),
        "decode_room_kv": Param(float, 0.8, min=0.0, max=1.0, doc="KV usage under which the decode pod has room"),
        "mode": Param(str, "auto", choices=("approximate", "precise", "auto")),
        "budget_tokens": Param(float, 8192.0, min=16.0, doc="engine step token budget (score_ttft)"),
    }

    def __init__(self, **params):
        super().__init__(**params)
        try:
            resolve_link(self.link)
        except ValueError as e:
            raise ValueError(f"link: {e}") from None
        self._ttft = TTFTScorer(mode=self.mode, budget_tokens=self.budget_tokens)

    def bind(self, dl) -> None:
        super().bind(dl)
        self._ttft.bind(dl)

    # ---- the cycle ---------------------------------------------------------------------------------------
    def handle(self, ctx, profiles, default):
        name = self.profile or default
        dl = self.dl
        res = profiles[name].run(ctx, dl.endpoints.active_slots())
        results = [res]
        ctx.memo["results"] = results
        addr = dl.endpoints.address
        decision = Decision(request=ctx.request, endpoints=[addr(s) for s in res.ranked.tolist()], profile=name,
                            decided_at=ctx.now)
        d = int(res.ranked[0])
        verdict, pres = self._decide(ctx, d)
        if pres is not None:
            results.append(pres)
        if verdict.leg and pres is not None:
            decision.prefill = addr(int(pres.ranked[0]))
        ctx.request.cache["pd"] = pd.REASONS[verdict.reason]
        ctx.request.cache["_pd_explain"] = verdict.explain(self.threshold_tokens)
        return decision

    def _prefill_candidates(self, ctx, d: int) -> np.ndarray:
        dl = self.dl
        cands = dl.endpoints.active_slots()
        keep = cands[dl.endpoints.can_prefill[cands] & dl.health.healthy[cands] & (cands != d)]
        return keep

    def _decide(self, ctx, d: int) -> tuple[pd.Verdict, ProfileResult | None]:
        dl = self.dl
        cands = self._prefill_candidates(ctx, d)
        p = float(ctx.prompt_tokens())
        if cands.size == 0:
            return pd.Verdict(False, pd.NO_PREFILL_PODS, p, p), None
        hits = ctx.hit_tokens(self.mode)  # also the "auto" hits _routed uses for the in-flight record
        cached_d = min(float(hits[d]) if d < hits.size else 0.0, p)
        u = max(p - cached_d, 0.0)
        if u < self.threshold_tokens:
            return pd.Verdict(False, pd.BELOW_THRESHOLD, p, u), None
        if p > 0 and u / p < self.min_uncached_ratio:
            return pd.Verdict(False, pd.MOSTLY_CACHED, p, u), None

        # the prefill pods: score_ttft's estimate + the KV transfer to d
        ttft = self._ttft.estimate(ctx, cands)
        cached = np.minimum(hits[cands], p)
        no_queue = pd.estimate_ttft(dl.costs, cands, p, cached, np.zeros(cands.size), dl.running(cands, ctx.now),
                                    self._ttft.budget_tokens, self._ttft.decode_context_tokens)
        wait = np.maximum(ttft - no_queue, 0.0)
        xfer = pd.transfer_seconds(dl, cands, u, self.link)
        expected = ttft + xfer
        totals = expected.min() / expected
        order = np.argsort(expected, kind="stable")
        pres = ProfileResult(
            "prefill", cands[order[:1]], cands, totals,
            {"pd-ttft-ms": np.round(expected * 1e3, 3), "pd-queue-ms": np.round(wait * 1e3, 3),
             "pd-transfer-ms": np.round(xfer * 1e3, 3)})
        best = int(order[0])
        saved = (pd.local_prefill_seconds(dl, d, p, cached_d, self.budget_tokens)
                 - float(xfer[best]) - self.hop_s)
        dslot = np.array([d])
        room = bool(dl.queue_depth(dslot, ctx.now)[0] < 1.0
                    and (not dl.fresh(dslot, ctx.now)[0] or dl.metrics.kv_usage[d] < self.decode_room_kv))
        verdict = pd.Verdict(True, pd.LEG, p, u, saved, float(wait[best]), room)
        if self.skip_when_saturated and verdict.prefill_wait_s > saved and room:
            verdict.leg, verdict.reason = False, pd.PREFILL_SATURATED
        return verdict, pres

    # ---- explanation -------------------------------------------------------------------------------------
    def on_routed(self, decision: Decision) -> None:
        """The scheduler builds the explanation after ``handle``; put the decider's numbers first."""
        numbers = decision.request.cache.pop("_pd_explain", None)
        if numbers is not None:
            decision.explanation = {"_pd": numbers, **decision.explanation}
