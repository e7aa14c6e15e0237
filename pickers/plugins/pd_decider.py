"""Conditional disaggregation: is a separate prefill leg worth it for this prompt on this decode pod?

All times come from the one cost model, through the request's prediction (pickers/predictor.py) and
engine.costmodel's transfer times. For a prompt of P tokens whose decode pod d was already chosen:

    H_d   = tokens of the prompt cached on d (prefix index, ``auto``: precise where healthy, else approximate)
    U     = P - H_d                                   the KV d lacks: what a leg computes and ships to d
    local = prefill time of U on d after H_d cached    (alone on d: no queue, no decodes, d's step budget)
    saved = local - transfer(U, link) - hop_s          decode-pod time the leg frees, net of its cost
    W     = queue wait on the best prefill pod         (the wait part of its predicted TTFT)

    leg  iff  U >= threshold_tokens  and  U / P >= min_uncached_ratio
              and not (W > saved and the decode pod has room)

"Has room": nothing waiting for prefill on d (scraped ``waiting`` and our own in-flight prefills) and its
KV usage below ``decode_room_kv``. A saturated prefill pool with a busy decode pod still gets the leg: the
decode pod is then the scarcer resource.

Why these defaults (llama-3.1-8b on H100, rdma-400g; run ``CostModel('8b','H100')``):

- ``threshold_tokens = 2048``. Prefill of 2048 tokens takes ~77 ms; moving its KV takes ~8 ms (2 ms link
  latency + 268 MB at 45 GB/s) plus ~2 ms for the extra HTTP hop through the sidecar: the leg costs ~13 %
  of what it moves. Done locally those 77 ms stall every running decode on d for 4 to 9 decode steps
  (8.5-20 ms each at batch 16-32), which breaks any TPOT target near the idle step time. At 512 tokens the
  prefill is ~20 ms, about one decode step (a stall chunked prefill absorbs), while the fixed leg cost
  (3.5 ms transfer + hop, one more engine step on the prefill pod) is ~30 % of it: not worth a second pod.
  Dynamo uses the same 2048.
- ``min_uncached_ratio = 0.5``. When the decode pod already holds more than half the prompt (a multi-turn
  session), a prefill pod without that history recomputes up to 2x the tokens d would, and the local
  prefill of the tail is cheap per token: keep it local. (Dynamo's 0.7 is stricter; 0.5 is the point where
  a cold prefill pod does at most twice the work.)
- ``hop_s = 0.002``: one extra loopback/in-cluster HTTP round trip plus the prefill engine's scheduling.
- ``decode_room_kv = 0.8``: the same KV threshold the saturation admission uses.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from engine.costmodel import CostModel
from pickers.datalayer import DataLayer


@lru_cache(maxsize=256)
def transfer_coefficients(model_profile: str, accelerator: str, link: str) -> tuple[float, float]:
    """(fixed seconds, seconds per token) of moving KV to a decode pod: CostModel.transfer_time is linear."""
    cm = CostModel(model_profile, accelerator)
    n = 1_000_000
    per_tok = (cm.transfer_time(n, link) - cm.transfer_time(1, link)) / (n - 1)
    return cm.transfer_time(1, link) - per_tok, per_tok


def transfer_seconds(dl: DataLayer, slots: np.ndarray, tokens: float, link: str) -> np.ndarray:
    """Seconds to ship ``tokens`` of KV from each slot's pod (its model x accelerator) over ``link``."""
    out = np.zeros(slots.size)
    if tokens <= 0:
        return out
    eps = dl.endpoints.endpoints
    for i, s in enumerate(slots.tolist()):
        ep = eps[s]
        assert ep is not None
        lat, per = transfer_coefficients(ep.model_profile, ep.accelerator, link)
        out[i] = lat + per * tokens
    return out
