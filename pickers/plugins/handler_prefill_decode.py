"""Prefill/decode profile handler: choose the decode pod first, then decide whether a prefill leg pays.

1. Run the decode profile (``profile``, default ``scheduler.profile``: role decode/both and its scorers)
   over the director's candidates: its ranking is the decode fallback list.
2. Ask the decider (``decider``: ``slo``, the default, ``threshold``, ``always`` or ``never``;
   pickers/plugins/pd_decider.py: formulas, constants and why) whether the part of the prompt the chosen
   decode pod lacks is worth computing on a prefill pod.
3. If so, pick the prefill pod (healthy, role prefill/both, not the decode pod) with the lowest

       E_p = TTFT_p + transfer_p(U)

   where TTFT_p is the request's predicted TTFT on p (its queued prefill + prefill of the part not cached on
   p + its decode load) and transfer_p the cost model's KV transfer of the U tokens the decode pod lacks over
   ``link``. ``Decision.prefill`` = that pod; extproc sends it to the decode pod's sidecar as
   ``x-prefiller-host-port``. The ``slo`` decider may give the leg another decode pod than the profile's
   first (``pair``: the one with the least predicted split TTFT); that pod then leads the fallback list,
   the profile's ranking after it.

The verdict (``RequestState.pd``) carries the decider's numbers; the director puts them first in the
explanation (``_pd``), and the prefill candidates appear beside the decode ones (scores ``pd-ttft-ms``,
``pd-queue-ms``, ``pd-transfer-ms``, total = best E / E_p). The director records both pods in the
approximate index and the in-flight tracker (prefill work on the prefill pod, decode on the decode pod).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.costmodel import resolve_link
from pickers.framework import CycleContext, Param, Profile, ProfileHandler, reads_kv_events, register
from pickers.plugins import pd_decider as pd
from pickers.state import PDVerdict, PrefixMode, ProfileResult
from pickers.types import Decision, Usage

DECIDERS = ("slo", "threshold", "always", "never")


@register
class PrefillDecodeHandler(ProfileHandler):
    TYPE = "prefill-decode"
    runs_prefill_legs = True
    PARAMS = {
        "profile": Param((str, type(None)), None, doc="decode profile (default: scheduler.profile)"),
        "decider": Param(str, "slo", choices=DECIDERS, doc="slo: predicted TTFT of both ways, queues included, "
                         "and the decode pod's TPOT; threshold: uncached tokens; always; never"),
        "tpot_headroom": Param(float, 0.05, min=0.0, max=0.9,
                               doc="slo: local prefill keeps the decode pod's TPOT below (1 - this) x target"),
        "default_output_tokens": Param(float, 256.0, min=1.0,
                                       doc="slo: mean output length until finished requests have shown it"),
        "arrival_window_s": Param(float, 0.1, min=0.01, max=600.0,
                                  doc="slo: window of the decayed rate of local prefill per decode pod, the "
                                      "prefill expected to arrive during a request's decode"),
        "protect_ttft_ratio": Param(float, 3.0, min=1.0,
                                    doc="slo: a leg that protects the decode pod's TPOT costs this request at most "
                                        "this many times its local TTFT"),
        "pair": Param(bool, True, doc="slo: a leg decodes on the decode pod with the least predicted split TTFT "
                                      "(not only the decode profile's first)"),
        "threshold_tokens": Param(int, 2048, min=0, doc="least uncached tokens on the decode pod for a leg"),
        "min_uncached_ratio": Param(float, 0.5, min=0.0, max=1.0, doc="least uncached / prompt for a leg"),
        "skip_when_saturated": Param(bool, True, doc="no leg when the prefill queue costs more than it saves "
                                                     "and the decode pod has room"),
        "link": Param(str, "rdma-400g", doc="cost-model link profile between prefill and decode pods"),
        "hop_s": Param(float, 0.002, min=0.0, doc="fixed cost of the extra hop through the sidecar"),
        "decode_room_kv": Param(float, 0.8, min=0.0, max=1.0, doc="KV usage under which the decode pod has room"),
        "mode": Param(str, "auto", choices=("approximate", "precise", "auto")),
    }
    decider: str
    tpot_headroom: float
    default_output_tokens: float
    arrival_window_s: float
    protect_ttft_ratio: float
    pair: bool
    threshold_tokens: int
    min_uncached_ratio: float
    skip_when_saturated: bool
    link: str
    hop_s: float
    decode_room_kv: float
    mode: PrefixMode

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        try:
            resolve_link(self.link)
        except ValueError as e:
            raise ValueError(f"link: {e}") from None
        self.mean_output = self.default_output_tokens  # exponential mean of finished requests' outputs
        self.local_prefill = pd.PrefillRate(self.arrival_window_s)  # per decode pod: local prefill s per s

    def on_finished(self, decision: Decision, usage: Usage | None, at: float) -> None:
        if usage is not None and usage.completion_tokens > 0:
            self.mean_output += 0.02 * (usage.completion_tokens - self.mean_output)

    @property
    def uses_kv_events(self) -> bool:
        return reads_kv_events(self.mode)

    # ---- the cycle ---------------------------------------------------------------------------------------
    def handle(self, ctx: CycleContext, profiles: dict[str, Profile], default: str) -> Decision:
        name = self.profile or default
        dl = self.dl
        res = profiles[name].run(ctx, ctx.candidates)
        ctx.state.results.append(res)
        decision = Decision(ctx.state, dl.endpoints.addresses(res.ranked), profile=name, decided_at=ctx.now)
        d = int(res.ranked[0])
        verdict, pres, leg_d = self._decide(ctx, d, res.cands)
        if pres is not None:
            ctx.state.results.append(pres)
        if verdict.leg and pres is not None:
            decision.prefill = dl.endpoints.address(int(pres.ranked[0]))
            if leg_d != d:  # the leg decodes on another pod: it goes first, the profile's ranking after it
                rest = res.ranked[res.ranked != leg_d]
                decision.endpoints = dl.endpoints.addresses(np.concatenate(([leg_d], rest)).astype(res.ranked.dtype))
        elif self.decider == "slo" and pres is not None:
            self.local_prefill.observe(d, float(ctx.prediction(self.mode).prefill_s[d]), ctx.now)
        ctx.state.pd = verdict
        return decision

    def _prefill_candidates(self, d: int) -> np.ndarray:
        dl = self.dl
        cands = dl.endpoints.active_slots()
        return cands[dl.endpoints.can_prefill[cands] & dl.health.healthy[cands] & (cands != d)]

    def _decide(self, ctx: CycleContext, d: int, dcands: np.ndarray
                ) -> tuple[PDVerdict, ProfileResult | None, int]:
        """(verdict, the prefill candidates' result, the decode pod of a leg)."""
        dl = self.dl
        cands = self._prefill_candidates(d)
        p = float(ctx.prompt_tokens())
        threshold = float(self.threshold_tokens) if self.decider == "threshold" else 0.0
        if cands.size == 0:
            return PDVerdict(False, "no-prefill-pods", p, p, threshold), None, d
        hits = ctx.hit_tokens(self.mode)  # also the "auto" hits the director records in-flight work with
        cached_d = min(float(hits[d]) if d < hits.size else 0.0, p)
        u = max(p - cached_d, 0.0)
        if self.decider == "never":
            return PDVerdict(False, "never", p, u, threshold), None, d
        if self.decider == "threshold":
            if u < self.threshold_tokens:
                return PDVerdict(False, "below-threshold", p, u, threshold), None, d
            if p > 0 and u / p < self.min_uncached_ratio:
                return PDVerdict(False, "mostly-cached-on-decode", p, u, threshold), None, d

        # the prefill pods: predicted TTFT + the KV transfer to d
        pred = ctx.prediction(self.mode)
        wait = pred.wait_s[cands]
        xfer = pd.transfer_seconds(dl, cands, u, self.link)
        expected = pred.ttft_s[cands] + xfer
        totals = expected.min() / expected
        order = np.argsort(expected, kind="stable")
        pres = ProfileResult(
            "prefill", cands[order[:1]], cands, totals,
            {"pd-ttft-ms": np.round(expected * 1e3, 3), "pd-queue-ms": np.round(wait * 1e3, 3),
             "pd-transfer-ms": np.round(xfer * 1e3, 3)})
        best = int(order[0])
        local = float(pred.prefill_s[d] + dl.costs.empty_step_s[d])  # U alone on d
        saved = local - float(xfer[best]) - self.hop_s
        dslot = np.array([d])
        room = bool(dl.queue_depth(dslot, ctx.now)[0] < 1.0
                    and (not dl.fresh(dslot, ctx.now)[0] or dl.metrics.kv_usage[d] < self.decode_room_kv))
        verdict = PDVerdict(True, "leg", p, u, threshold, saved, float(wait[best]), room)
        leg_d = d
        if self.decider == "always":
            verdict.reason = "always"
        elif self.decider == "threshold":
            if self.skip_when_saturated and verdict.prefill_wait_s > saved and room:
                verdict.leg, verdict.reason = False, "prefill-saturated"
        else:
            leg_d = self._slo(ctx, d, int(cands[best]), float(xfer[best]), dcands if self.pair else np.array([d]),
                              verdict)
        return verdict, pres, leg_d

    def _slo(self, ctx: CycleContext, d: int, pslot: int, xfer_d: float, dcands: np.ndarray,
             verdict: PDVerdict) -> int:
        """The ``slo`` decider (pickers/plugins/pd_decider.py): local vs split by predicted TTFT, queues
        included, with the decode pod's running requests' TPOT protected; returns the leg's decode pod.
        ``xfer_d``: the transfer from the prefill pod ``pslot`` of the KV ``d`` lacks (``_decide`` has it)."""
        pred = ctx.prediction(self.mode)
        tpot_d = float(pred.tpot_s[d])
        verdict.local_ttft_s = float(pred.ttft_s[d])
        # a leg through the best prefill pod p to each decode candidate e: the decode pod takes the KV in its
        # waiting order, when it arrives: behind the prefills queued there then (about as much as now on a
        # busy pod: new local work keeps arriving) and its wait for KV space; the KV e lacks, the hop and e's
        # first decode step
        base = float(pred.ttft_s[pslot]) + self.hop_s
        verdict.split_ttft_s = base + float(pred.wait_s[d]) + xfer_d + tpot_d
        leg_d = d
        if dcands.size > 1:  # the profile's pod unless another is faster (ties keep the profile's choice)
            p = float(ctx.prompt_tokens())
            lat, per = pd.transfer_coefficients_of(self.dl, pslot, self.link)
            lacks = p - np.minimum(ctx.hit_tokens(self.mode)[dcands], p)
            split = base + pred.wait_s[dcands] + np.where(lacks > 0, lat + per * lacks, 0.0) + pred.tpot_s[dcands]
            split[dcands == pslot] = np.inf  # a pod both prefill and decode is not its own leg's decode pod
            j = int(np.argmin(split))
            if split[j] < verdict.split_ttft_s:
                verdict.split_ttft_s, leg_d = float(split[j]), int(dcands[j])
        own = float(pred.uncached[d])
        stall = float(pred.prefill_s[d]) * (float(pred.queued[d]) + own) / max(own, 1.0)
        verdict.local_tpot_s = pd.tpot_with_arrivals(tpot_d, stall, self.mean_output, self.local_prefill.at(d, ctx.now))
        verdict.leg, verdict.reason = pd.slo_verdict(verdict.local_ttft_s, verdict.split_ttft_s, tpot_d,
                                                     verdict.local_tpot_s, float(pred.running[d]),
                                                     ctx.state.slo, self.tpot_headroom, self.protect_ttft_ratio)
        return leg_d
