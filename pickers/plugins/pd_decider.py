"""Conditional disaggregation: is a separate prefill leg worth it for this prompt on this decode pod?

All times come from the one cost model, through the request's prediction (pickers/predictor.py) and
engine.costmodel's transfer times. For a prompt of P tokens whose decode pod d was already chosen:

    H_d   = tokens of the prompt cached on d (prefix index, ``auto``: precise where healthy, else approximate)
    U     = P - H_d                                   the KV d lacks: what a leg computes and ships to d

The ``slo`` decider (the default): queue- and SLO-aware, from predicted latencies.

    local  = TTFT_d                                   prefill of U on d, after the prefill queued on d, beside
                                                      d's running decodes, plus d's wait for KV space
    split  = TTFT_p + W_d + transfer_p(U) + hop_s + TPOT_d
                                                      the best prefill pod p (least TTFT_p + transfer_p(U)): its
                                                      queue and the prompt's part not cached on p; then d's wait
                                                      W_d (queued prefill and KV space: d takes the KV in its
                                                      waiting order when it arrives, vLLM's FCFS queue, and on a
                                                      busy pod new local prefills keep the queue about as long
                                                      as now), the KV shipped to d, the extra hop and d's first
                                                      decode step
    stall  = prefill_d x (Q_d + U) / U                the local prefills d will run (its queue and this one),
                                                      each pausing every running decode on d
    tpot_local = TPOT_d + stall / mean output         the running requests' TPOT if it stays local (the stall
                                                      spread over a decode of the pool's observed mean length)

    protected  = d runs no decode, or the request has no TPOT target, or tpot_local <= (1 - tpot_headroom) x target,
                 or TPOT_d alone is already above it (a leg would cost this request TTFT and protect nothing)
    leg  iff  not protected and split <= TTFT target (or none)     "protect-tpot": local prefill would break
                                                                    the TPOT of d's running requests, and the
                                                                    leg still meets this request's TTFT
         or   split < local                                         "split-faster"
    else local                                                      "local-faster"

Why: a fixed uncached-token threshold splits every long-enough prompt whatever the queues hold. llm-d's own
simulator (1 prefill + 3 decode pods) measured a 16-token threshold splitting ~100 % of code prompts and
TTFT up to 20x worse than never splitting: one prefill pod cannot take the prefill work of three decode pods.
Comparing the two predicted TTFTs, queues included, sends a prompt to the prefill pod only while its queue is
shorter than the decode pod's own prefill of the prompt, and keeps a short new chat turn (most of the prompt
cached on d) local. W_d is counted on both ways: with max(TTFT_p, W_d) instead (the leg waits for d's queue
only if that outlasts the prefill leg), legs on chat took 1.4-2.7x their predicted TTFT, because the local
prefills sent to d while the leg ran went ahead of it. The TPOT guard is the reason to disaggregate at all:
when the decode pod's running requests would miss their TPOT target because of local prefills, the leg is
taken while it meets this request's TTFT target; past that, the faster way (a leg predicted to miss the
TTFT target took 2-3 s on chat, and protected little). When d misses the TPOT target with no local prefill
at all, a leg protects little and costs this request TTFT: the faster way too (dropping that guard gave
chat TPOT 44-54 ms against 48-58 ms at 0.8-1.1x the knee, but TTFT p90 above always-local's at 1.1x).
``python -m e2e.bench.pd_split`` measures it against always-local, always-split and a
fixed threshold (README "Prefill/decode: the decider").

The ``threshold`` decider (kvswitch's earlier rule, and llm-d's with ``min_uncached_ratio`` 0 and
``skip_when_saturated`` false):

    local_alone = prefill time of U on d after H_d cached    (alone on d: no queue, no decodes)
    saved = local_alone - transfer(U, link) - hop_s          decode-pod time the leg frees, net of its cost
    W     = queue wait on the best prefill pod               (the wait part of its predicted TTFT)

    leg  iff  U >= threshold_tokens  and  U / P >= min_uncached_ratio
              and not (W > saved and the decode pod has room)

"Has room": nothing waiting for prefill on d (scraped ``waiting`` and our own in-flight prefills) and its
KV usage below ``decode_room_kv``. ``always`` runs a leg whenever a prefill pod is healthy; ``never`` none.

Why the threshold defaults (llama-3.1-8b on H100, rdma-400g; run ``CostModel('8b','H100')``):

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

import math
from functools import lru_cache

import numpy as np

from engine.costmodel import CostModel
from pickers.datalayer import DataLayer
from pickers.state import PDReason, SLOTargets


@lru_cache(maxsize=256)
def transfer_coefficients(model_profile: str, accelerator: str, link: str) -> tuple[float, float]:
    """(fixed seconds, seconds per token) of moving KV to a decode pod: CostModel.transfer_time is linear."""
    cm = CostModel(model_profile, accelerator)
    n = 1_000_000
    per_tok = (cm.transfer_time(n, link) - cm.transfer_time(1, link)) / (n - 1)
    return cm.transfer_time(1, link) - per_tok, per_tok


def transfer_seconds(dl: DataLayer, slots: np.ndarray, tokens: float, link: str) -> np.ndarray:
    """Seconds to ship ``tokens`` of KV from each slot's pod (its model x accelerator) over ``link``:
    lat + per x tokens per slot (the same two float operations as one pod at a time)."""
    if tokens <= 0:
        return np.zeros(slots.size)
    lat, per = _coefficients(dl, link)
    return lat[slots] + per[slots] * tokens


def _coefficients(dl: DataLayer, link: str) -> tuple[np.ndarray, np.ndarray]:
    """``transfer_coefficients`` of every endpoint slot (NaN where none), kept by the cost table until it
    changes (an endpoint set or replaced)."""
    def build() -> tuple[np.ndarray, np.ndarray]:
        eps = dl.endpoints.endpoints
        lat, per = np.full(len(eps), math.nan), np.full(len(eps), math.nan)
        for s, ep in enumerate(eps):
            if ep is not None:
                lat[s], per[s] = transfer_coefficients(ep.model_profile, ep.accelerator, link)
        return lat, per

    got: tuple[np.ndarray, np.ndarray] = dl.costs.derived(("transfer", link), build)
    if got[0].size < dl.endpoints.slot_count:  # a slot added without a cost-table change: cannot happen, but
        got = build()                          # never index past the arrays
    return got


def slo_verdict(local_ttft_s: float, split_ttft_s: float, tpot_s: float, local_tpot_s: float, running: float,
                slo: SLOTargets, tpot_headroom: float) -> tuple[bool, PDReason]:
    """The ``slo`` decider's rule on its predicted inputs (module docstring): (leg, reason). ``tpot_s``: the
    decode pod's TPOT without this local prefill, ``local_tpot_s`` with it."""
    limit = (1.0 - tpot_headroom) * slo.tpot_s if slo.tpot_s is not None else math.inf
    # protected: nothing decodes there, or the local prefill keeps the TPOT within the target, or the pod misses
    # it anyway (its batch alone is too slow: a leg would cost this request TTFT and protect nothing)
    protected = running <= 0.0 or local_tpot_s <= limit or tpot_s > limit
    if not protected and (slo.ttft_s is None or split_ttft_s <= slo.ttft_s):
        return True, "protect-tpot"
    if split_ttft_s < local_ttft_s:
        return True, "split-faster"
    return False, "local-faster"


__all__ = ["slo_verdict", "transfer_coefficients", "transfer_seconds"]
