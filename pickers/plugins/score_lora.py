"""LoRA affinity from vllm:lora_requests_info: for a request whose model is an adapter, 1.0 where the
adapter is running, 0.8 where it is waiting to load, 0.5 where a LoRA slot is free (running < max_lora),
0 elsewhere. Requests for a pod's base model (or with no LoRA info anywhere) score 1 everywhere."""

import numpy as np

from pickers.framework import Scorer, register


@register
class LoraAffinityScorer(Scorer):
    TYPE = "lora-affinity"

    def score(self, ctx, cands):
        model = ctx.request.model
        lora = self.dl.metrics.lora
        eps = self.dl.endpoints.endpoints
        out = np.ones(cands.size)
        for i, slot in enumerate(cands.tolist()):
            info = lora[slot]
            ep = eps[slot]
            if info is None or (ep is not None and ep.model == model):
                continue
            running, waiting, max_lora = info
            if model in running:
                out[i] = 1.0
            elif model in waiting:
                out[i] = 0.8
            elif len(running) < max_lora:
                out[i] = 0.5
            else:
                out[i] = 0.0
        return out
