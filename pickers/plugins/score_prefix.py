"""Prefix cache affinity: score = cached prompt tokens on the pod / prompt tokens, in [0, 1].

``mode``: ``approximate`` (learned from our own decisions), ``precise`` (vLLM KV events) or ``auto``
(precise per pod unless it publishes no events or is degraded, then approximate). With ``gate_ttft_ratio``
> 0 (the default profile uses 2) a pod whose estimated TTFT exceeds that multiple of the best pod's
gets 0: cache affinity never pulls traffic onto a pod that is already the slow choice (the TTFT is the
request's shared prediction, pickers/predictor.py).
"""

from __future__ import annotations

import numpy as np

from pickers.framework import CycleContext, Param, PrefixModeScorer, register


@register
class PrefixScorer(PrefixModeScorer):
    TYPE = "prefix"
    PARAMS = {
        **PrefixModeScorer.PARAMS,
        "gate_ttft_ratio": Param(float, 0.0, min=0.0),
    }
    gate_ttft_ratio: float

    @property
    def label(self) -> str:
        return f"prefix-{self.mode}" if self.mode != "auto" else "prefix"

    def score(self, ctx: CycleContext, cands: np.ndarray) -> np.ndarray:
        p = ctx.prompt_tokens()
        if p <= 0:
            return np.zeros(cands.size)
        s = np.minimum(ctx.hit_tokens(self.mode)[cands] / p, 1.0)
        if self.gate_ttft_ratio > 0:
            est = ctx.prediction(self.mode).ttft_s[cands]
            s = np.where(est <= self.gate_ttft_ratio * est.min(), s, 0.0)
        return s
