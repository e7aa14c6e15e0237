"""Conditional disaggregation: is a separate prefill leg worth it for this prompt on this decode pod?

All times come from the one cost model, through the request's prediction (pickers/predictor.py) and
engine.costmodel's transfer times. For a prompt of P tokens whose decode pod d was already chosen:

    H_d   = tokens of the prompt cached on d (prefix index, ``auto``: precise where healthy, else approximate)
    U     = P - H_d                                   the KV d lacks: what a leg computes and ships to d

The ``slo`` decider (the default): queue- and SLO-aware, from predicted latencies.

    local  = TTFT_d                                   prefill of U on d, after the prefill queued on d, beside
                                                      d's running decodes, plus d's wait for KV space
    split_e = TTFT_p + W_e + transfer_p(U_e) + hop_s + TPOT_e      for every decode candidate e (``pair``;
                                                      else e = d only), U_e = P - H_e:
                                                      the best prefill pod p (least TTFT_p + transfer_p(U)): its
                                                      queue and the prompt's part not cached on p; then e's wait
                                                      W_e (queued prefill and KV space: e takes the KV in its
                                                      waiting order when it arrives, vLLM's FCFS queue, and on a
                                                      busy pod new local prefills keep the queue about as long
                                                      as now), the KV e lacks shipped to e, the extra hop and
                                                      e's first decode step
    split  = min over e of split_e (ties keep d)      the leg's decode pod: a leg may decode elsewhere than d
    stall  = prefill_d x (Q_d + U) / U                the local prefills d will run (its queue and this one),
                                                      each pausing every running decode on d
    rho_d  = decayed rate of the local prefill seconds this picker sent to d (window ``arrival_window_s``): the
             share of d's time that prefills arriving during a decode will take
    tpot_local = (TPOT_d + stall / mean output) / (1 - min(rho_d, 0.9))
                                                      the running requests' TPOT if it stays local: the stall
                                                      spread over a decode of the pool's observed mean length,
                                                      and the prefills that arrive meanwhile

    protected  = d runs no decode, or the request has no TPOT target, or tpot_local <= (1 - tpot_headroom) x target,
                 or TPOT_d alone is already above it (a leg would cost this request TTFT and protect nothing)
    leg  iff  not protected and split <= TTFT target (or none)     "protect-tpot": local prefill would break
              and split <= protect_ttft_ratio x local               the TPOT of d's running requests, and the
                                                                    leg still meets this request's TTFT, at
                                                                    most that many times its local TTFT
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

The leg's decode pod (``pair``): the decode profile keeps a prompt group on the pod that holds its prefix
(its prefix gate tolerates 2x a cold pod's TTFT), so on chat (one shared system prompt) it sent 80-100 % of
the turns to one decode pod (TPOT 50-75 ms there, the other two nearly idle). A leg computes the prompt on the
prefill pod and ships the KV anyway, so it can decode where the pair is fastest: the KV moves there, and the
conversation's next turns follow it (the profile routes them to the pod holding their prefix). The first legs
spread the groups over the decode pods.
The arrival rate: the local prefills that reach d while a request decodes stall its running decodes as much as
the queue does now. ``arrival_window_s`` 0.1 s is shorter than most prefills, so rho_d reads "d is prefilling
or just was": a burst of local prefills on one pod. Windows 5, 2, 1, 0.3, 0.1 s (and none), 9 seeds: chat
mean TTFT at 0.5/0.8/1.1x the knee 113/186/245, 107/178/247, 106/158/248, 97/122/207, 85/107/162 ms (none:
131/197/265), code TTFT p90 at 1.1x 670, 637, 641, 624, 624 ms (none 688), code attainment at 1.1x
0.994-0.999 (none 0.964). ``protect_ttft_ratio`` 3 (2: chat 85/107/162 ms against 84/97/140 ms with 3; no
bound: TTFT p90 above always-local's on code at 1.1x).
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


def transfer_coefficients_of(dl: DataLayer, slot: int, link: str) -> tuple[float, float]:
    """``transfer_coefficients`` of one slot's pod: moving n > 0 tokens from it takes lat + per x n seconds."""
    lat, per = _coefficients(dl, link)
    return float(lat[slot]), float(per[slot])


def _coefficients(dl: DataLayer, link: str) -> tuple[np.ndarray, np.ndarray]:
    """``transfer_coefficients`` of every endpoint slot (NaN where none), kept by the cost table until it
    changes (an endpoint set or replaced). In wall seconds of the pods: x ``predictor.time_scale``, like every
    step the predictor charges, so that simulated pods at a time scale weigh a leg's transfer against their
    prefill as real ones would (unscaled, pods 20x faster than their profile never took a leg)."""
    scale = dl.predictor.settings.time_scale

    def build() -> tuple[np.ndarray, np.ndarray]:
        eps = dl.endpoints.endpoints
        lat, per = np.full(len(eps), math.nan), np.full(len(eps), math.nan)
        for s, ep in enumerate(eps):
            if ep is not None:
                lat[s], per[s] = transfer_coefficients(ep.model_profile, ep.accelerator, link)
        return lat * scale, per * scale

    got: tuple[np.ndarray, np.ndarray] = dl.costs.derived(("transfer", link), build)
    if got[0].size < dl.endpoints.slot_count:  # a slot added without a cost-table change: cannot happen, but
        got = build()                          # never index past the arrays
    return got


class PrefillRate:
    """Per endpoint slot: the cost model's seconds of local prefill this picker sent to the pod, as a rate
    (seconds of prefill per second) decayed exponentially with time constant ``window_s``: the share of the
    decode pod's time that prefills arriving during a request's decode will take from it. Each slot decays
    lazily when read or written (O(1) per decision); the arrays grow with the slot table (bounded by it). A
    slot reused by another endpoint starts from what the old one left, which decays away within a few
    windows."""

    __slots__ = ("window_s", "_rate", "_at")

    def __init__(self, window_s: float) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self._rate = np.zeros(0)
        self._at = np.zeros(0)

    def at(self, slot: int, now: float) -> float:
        """The rate of ``slot`` at ``now`` (0 for a slot never written)."""
        if slot >= self._rate.size:
            return 0.0
        dt = now - float(self._at[slot])
        rate = float(self._rate[slot])
        return rate * math.exp(-dt / self.window_s) if dt > 0 else rate

    def observe(self, slot: int, seconds: float, now: float) -> None:
        """A prefill of ``seconds`` (cost model, alone on the pod) sent to ``slot`` at ``now``."""
        if not (seconds > 0 and math.isfinite(seconds)):
            return
        if slot >= self._rate.size:
            grow = slot + 1 - self._rate.size
            self._rate = np.concatenate([self._rate, np.zeros(grow)])
            self._at = np.concatenate([self._at, np.full(grow, now)])
        self._rate[slot] = self.at(slot, now) + seconds / self.window_s
        self._at[slot] = max(now, float(self._at[slot]))


def tpot_with_arrivals(tpot_s: float, stall_s: float, output_tokens: float, rate: float,
                       max_share: float = 0.9) -> float:
    """The running requests' TPOT over a decode of ``output_tokens``: their decode step ``tpot_s``, the
    ``stall_s`` of the prefill queued now (this prompt's included) spread over the decode, and the prefills
    arriving meanwhile, which take ``rate`` of the pod's time (capped at ``max_share``):

        T = n x tpot + stall + rate x T      =>      TPOT = (tpot + stall / n) / (1 - rate)
    """
    return (tpot_s + stall_s / max(output_tokens, 1.0)) / (1.0 - min(max(rate, 0.0), max_share))


def slo_verdict(local_ttft_s: float, split_ttft_s: float, tpot_s: float, local_tpot_s: float, running: float,
                slo: SLOTargets, tpot_headroom: float, protect_ttft_ratio: float = math.inf) -> tuple[bool, PDReason]:
    """The ``slo`` decider's rule on its predicted inputs (module docstring): (leg, reason). ``tpot_s``: the
    decode pod's TPOT without this local prefill, ``local_tpot_s`` with it."""
    limit = (1.0 - tpot_headroom) * slo.tpot_s if slo.tpot_s is not None else math.inf
    # protected: nothing decodes there, or the local prefill keeps the TPOT within the target, or the pod misses
    # it anyway (its batch alone is too slow: a leg would cost this request TTFT and protect nothing)
    protected = running <= 0.0 or local_tpot_s <= limit or tpot_s > limit
    if (not protected and (slo.ttft_s is None or split_ttft_s <= slo.ttft_s)
            and split_ttft_s <= protect_ttft_ratio * local_ttft_s):
        return True, "protect-tpot"
    if split_ttft_s < local_ttft_s:
        return True, "split-faster"
    return False, "local-faster"


__all__ = ["PrefillRate", "slo_verdict", "tpot_with_arrivals", "transfer_coefficients", "transfer_coefficients_of",
           "transfer_seconds"]
