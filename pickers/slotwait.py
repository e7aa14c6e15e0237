"""How long a new request waits for a sequence slot on each pod: vLLM runs at most ``max_num_seqs``.

vLLM admits a waiting request only while fewer than ``max_num_seqs`` sequences run (engine/sim/core.py
``_admit`` likewise). Where prefixes are shared the KV cache holds far more sequences than that (the 4 L40S
pods of the shared-prefix curve hold 256 sequences of 4.7K tokens with free KV), so past the knee a pod can
have free KV and still make a new arrival wait until running sequences finish; the KV wait
(pickers/kvwait.py) sees free KV and predicts none. Virtual time, shared-prefix at 3x the knee, 1,000
requests: the last second's arrivals waited ~25 s on the one pod at 256 sequences (predicted 0.4-0.5 s)
while the three others had 30-50 free slots (TTFT p99 25 s against p90 2.3 s).

Per endpoint slot p (a pod that decodes; a prefill-only pod's sequences end at their first token):

    S_p   = max_num_seqs (the endpoint's, else its role's preset: pickers.costs)
    n_p   = sequences on p: max(running + waiting (fresh /metrics), the picker's own requests there)
    k_p   = n_p + 1 - S_p                     running sequences that must finish before this one starts
    b_p   = min(running_p, S_p), at least 1   the running sequences, each freeing a slot when it ends
    L_p   = mean decode tokens of the picker's requests on p (``inflight.decode_tokens``: their max_tokens,
            or the default), else of its requests anywhere, else 256
    ctx   = mean prompt seen + L_p / 2        the mean context of a running sequence (each one's KV is read
                                              every step, shared prefix or not: not the KV held, which
                                              counts a shared prefix once and made the step ~4x too short)
    c_p   = min(Q_p b_p / (k_p L_p), budget - b_p)     the queued prefill ahead (Q_p, pickers/predictor.py)
                                              spread over the drain: the waiting requests ahead take the
                                              freed slots and their prompts share its steps
    tau_p = step_seconds(b_p + c_p, b_p ctx + c_p (c_p + 1) / 2, b_p ctx)   one step of that batch
                                              (the one roofline, engine.costmodel.vector)
    A_p   = 2 x mean age of the picker's decoding requests on p (now - mean first-token time):
            with ages spread evenly, the oldest; the k-th oldest is A_p (1 - (k - 1/2) / b)
    wait_p = max(L_p tau_p - A_kp, k_p / b_p x L_p tau_p)          0 where k_p <= 0

The second term is the steady state (sequences of every age, one ending every L / b steps); the first is
the wait for the k-th oldest to produce the rest of its output at this step's pace, which is what binds
after a ramp (every running sequence started recently: none ends for most of an output). Without ages
(no decoding request of this picker on p) only the steady state counts. The predictor takes the larger of
(queue ahead + KV wait) and this wait: the queue's prefill runs inside the drain's steps, so the two are not
added. Below the knee no pod is full and nothing here is evaluated beyond two reductions (the decisions are
bit for bit those without it).

Measured (e2e/bench/results/2026-12-02-slotwait: virtual time, 4 L40S pods, 1,000 requests, seeds 0-4,
against main at ee34655): shared-prefix at 3x the knee TTFT p99 24.5 -> 3.1 s (median; every seed 2.8-4.4 s,
was 3.1-25.2 s), req/s 19.28 -> 20.81 (every seed up 1.0-2.0); multi-turn at 3x, where pods reach 256
sequences in the last seconds of arrivals, p99 1.21 -> 1.21 s median (the worst seed 17.3 -> 2.8 s) and req/s
-0.5 median in the 3 seeds that changed, within what a 0.1 % change of the offered rate moves either tree
(+-1.5 req/s); every other point of the four workloads' curves unchanged, bit for bit.

Limits: the ages assume sequences started evenly over the last 2 x mean age (a cohort that started together
is taken as younger and older than it is); L is the requests' max_tokens, which for real clients overstates
their outputs (the KV wait shares that bias; the outputs the pool observes would be better, but reach only
the director and the SLO plugins today).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pickers.datalayer import DataLayer

DEFAULT_DECODE_TOKENS = 256.0  # L where the picker has no request anywhere (the director's default max_tokens)


@dataclass(slots=True)
class SlotDrain:
    """The request-independent terms of the slot wait, per slot of the predictor's ``slots`` (meaningful
    where ``full``)."""

    full: np.ndarray  # no free sequence slot (k > 0) on a pod that decodes
    excess: np.ndarray  # k
    batch: np.ndarray  # b
    decode: np.ndarray  # L
    age_k: np.ndarray  # age of the k-th oldest running sequence (inf: unknown, the steady state alone)
    step_args: tuple[np.ndarray, np.ndarray, np.ndarray]  # step_seconds_v's (new tokens, pairs, KV read)


def slot_drain(dl: DataLayer, slots: np.ndarray, now: float, running: np.ndarray, waiting: np.ndarray,
               queued: np.ndarray, budget: np.ndarray, mean_prompt: float) -> SlotDrain | None:
    """The terms of the module docstring for ``slots``, or None when every pod has a free sequence slot (the
    usual case below the knee: nothing more to evaluate). ``running``, ``waiting`` (0 where metrics are
    stale), ``queued`` and ``budget`` are per slot as the predictor has them."""
    inf = dl.inflight
    own = inf.requests[slots]
    cap = dl.costs.max_seqs[slots]
    seqs = np.maximum(running + waiting, own)
    if seqs.max() + 1.0 <= cap.min():  # two reductions: the cheap exit of every decision below the knee
        return None
    excess = seqs + 1.0 - cap
    full = (excess > 0) & dl.endpoints.can_decode[slots]
    if not full.any():
        return None
    k = np.maximum(excess, 1.0)
    b = np.maximum(np.minimum(running, cap), 1.0)
    dec_tokens = inf.decode_tokens[slots]
    total = float(own.sum())
    mean_l = max(float(dec_tokens.sum()) / total, 1.0) if total > 0 else DEFAULT_DECODE_TOKENS
    dec = np.maximum(np.where(own > 0, dec_tokens / np.maximum(own, 1.0), mean_l), 1.0)
    m = inf.decoding[slots]
    mean_age = now - inf.decoding_since[slots] / np.maximum(m, 1.0)
    age_k = np.where(m > 0, np.maximum(2.0 * mean_age * (1.0 - (k - 0.5) / b), 0.0), np.inf)
    ctx = mean_prompt + 0.5 * dec
    c = np.minimum(queued * b / (k * dec), np.maximum(budget - b, 0.0))
    kv = b * ctx
    return SlotDrain(full, k, b, dec, age_k, (b + c, kv + c * (c + 1.0) / 2.0, kv))


def slot_wait_from_step(drain: SlotDrain, step: np.ndarray) -> np.ndarray:
    """Seconds of slot wait per slot (0 where a slot is free) from the drain's step (``step_seconds_v`` of
    the slots' rooflines on ``drain.step_args``)."""
    whole = drain.decode * step  # one sequence's whole output at this pace
    wait = np.maximum(whole - drain.age_k, drain.excess / drain.batch * whole)
    return np.where(drain.full, wait, 0.0)


__all__ = ["DEFAULT_DECODE_TOKENS", "SlotDrain", "slot_drain", "slot_wait_from_step"]
