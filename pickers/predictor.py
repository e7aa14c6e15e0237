"""Expected TTFT and TPOT of a request on every endpoint, from the one cost model (engine.costmodel).

For a prompt of P tokens and each endpoint slot p:

    H_p  = prompt tokens cached on p (prefix index under ``mode``; CPU-held blocks weighted 0.8)
    Q_p  = prompt tokens queued ahead on p: the uncached tokens kvswitch sent there that have not reached
           first token, plus the waiting requests on p (fresh /metrics) it did not send (waiting - its own
           requests before first token) x the mean prompt seen; on a decode-role pod only the first: its
           waiting requests wait for KV from a prefill pod
    r_p  = running decodes on p (fresh /metrics, at least the requests kvswitch started there)
    B_p  = p's step token budget (max_num_batched_tokens, pickers.costs)

    ttft_p    = CostModel.time_to_first_token(P, H_p, budget=B_p, queued=Q_p, running=r_p,
                                              decode_context=ctx)          (closed form, all pods at once)
    ttft_p   += kvwait_p: the wait for KV space on a pod whose cache is full (pickers/kvwait.py)
    ttft_p   += (sqrt 2 - 1) x CostModel.decode_step_time(r_p, held_p)   when r_p > 0: the step in progress
    wait_p    = the part of ttft_p that prefills Q_p, plus kvwait_p; or, when larger, slotwait_p: the wait
                for a sequence slot on a pod running max_num_seqs (pickers/slotwait.py), whose steps carry
                that same prefill
    prefill_p = the same with nothing queued and nothing running, less one empty step: the time this
                prompt's own tokens keep each running decode on p waiting
    tpot_p    = CostModel.decode_step_time(r_p + 1, r_p x ctx + P)          once it joins the batch (its own
                                                                            context is its prompt)

ctx is ``decode_context_tokens``, the mean context of a running decode; with ``kv_from_metrics`` it is
held_p / r_p, held_p the KV the pod holds (kv_usage x capacity, fresh /metrics: pickers/kvwait.py), where p
runs decodes and reports a usage. One configured mean is wrong for every pod that serves another mix: on a
fleet whose A100 pods ran short prompts and H100 pods long ones (the mixed fleet of the README's prediction
error, 15.4K configured) the A100 steps were over-predicted ~10 %, and kv_from_metrics takes the A100 TPOT
MAPE from 10 % to 4.4 % at 1x, 17.9 % to 12.4 % at 1.25x. It is off by default because predictive admission
(pickers/plugins/admission_slo.py) scales its own decode-batch projection by this predictor's TPOT
correction: learned against r x 2048 tokens on the Mooncake P/D fleet, that correction inflated the
projection (the README's "projected 1.22x observed"), which is what kept the admitted attainment at 0.999;
learned against the held KV it does not, and predictive at 2x admits 0.952 within target (rejects 0.079).

The step in progress: a request that reaches a busy pod joins the batch when the step it is in ends, a
residual uniform on [0, step]. Its mean is half a step; the figure added is the value that minimises the
expected relative error of a one-step latency (a short prompt: the case where it matters), the 1/y-weighted
median c of 1 + U[0, 1]: ln(1 + c) = ln(2) / 2. Without it a short prompt on a busy pod was predicted up to
0.6 step early (mixed fleet, A100 TTFT MAPE 7.8 / 10.9 % at 0.75 / 1x; with it 3.6 / 7.0 %).

Every figure is then corrected per
kind of pod (model profile, accelerator, role) by what the picker observed (pickers/correction.py):
ttft -> a_t + b_t x ttft (wait and prefill scaled by b_t), tpot -> a_p + b_p x tpot; the raw numbers stay on
the ``Prediction`` for the correction to learn from. The same numbers serve the scorers,
the P/D decider and admission; the state keeps one ``Prediction`` per prefix mode, computed on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from engine.costmodel.vector import prefill_split, step_seconds_v
from pickers.correction import OnlineCorrection
from pickers.kvwait import kv_held, kv_wait_from_step
from pickers.slotwait import slot_drain, slot_wait_from_step
from pickers.state import Prediction, PrefixMode

if TYPE_CHECKING:
    from pickers.datalayer import DataLayer
    from pickers.framework import CycleContext


# The 1/y-weighted median of a residual uniform on [0, step] added to a latency of one step (a short prompt
# on a busy pod): the point that minimises the expected relative error, c with ln(1 + c) = ln(2) / 2.
STEP_RESIDUAL = 2.0 ** 0.5 - 1.0


@dataclass(slots=True)
class PredictorSettings:
    decode_context_tokens: float = 2048.0  # mean KV context of a running decode
    waiting_prompt_tokens: float = 0.0  # tokens per waiting request; 0: running mean of the prompts seen
    correction: bool = True  # learn a per-kind affine correction from observed latencies (pickers/correction.py)
    correction_window: int = 64  # finished requests remembered per kind of pod
    # running decodes' KV from the pod's kv_usage instead of r x decode_context_tokens: off until predictive
    # admission calibrates its own TPOT projection (see the module doc)
    kv_from_metrics: bool = False
    step_in_progress: bool = True  # a busy pod's new request waits for the end of the step in progress
    # wall seconds per second of the cost model: simulated pods replaying at a time scale run that much slower
    # than their profile (the benchmark and the local stack's sims). Every step is scaled before the online
    # correction, which otherwise learns the factor only from finished requests: in access-log mode the first
    # tokens arrive with each request's end, after a short run's decisions are made (a fleet at time scale
    # 1.9 was predicted to drain its prefill queues 1.9x too fast). Real engines: 1.
    time_scale: float = 1.0


class Predictor:
    """Turns the data layer's signals into a ``Prediction`` per request (pickers/state.py)."""

    def __init__(self, dl: DataLayer, settings: PredictorSettings | None = None) -> None:
        self.dl = dl
        self.settings = settings or PredictorSettings()
        self.mean_prompt = 1024.0  # exponential mean of prompt lengths, for requests seen only as "waiting"
        self.correction = OnlineCorrection(dl.endpoints.max_endpoints, self.settings.correction_window)
        if self.settings.correction:
            dl.endpoints.listen(self.correction.on_endpoint)
        self._const: tuple[np.ndarray, np.ndarray] | None = None  # _constants

    def queued_tokens(self, slots: np.ndarray, waiting: np.ndarray) -> np.ndarray:
        """Q_p per slot of ``slots``: prompt tokens queued ahead of a new request (``waiting``: each pod's waiting
        requests from fresh /metrics, 0 where they are stale: ``DataLayer.scraped_waiting``)."""
        dl = self.dl
        inflight = dl.inflight
        # Own requests counted exactly, the rest at the mean prompt. Not max(own, waiting x mean): that took
        # a pod holding many short waiting requests for one holding as many average ones, so past the knee
        # long prompts piled onto the pods whose queues were really longer (one pod took 37 % of the
        # requests of an overloaded fleet; tests/sim/test_overload_balance.py). A decode-role pod's waiting
        # requests are mostly P/D requests waiting for their KV (no prefill there): they do not count.
        per = np.where(dl.endpoints.can_prefill[slots], self.settings.waiting_prompt_tokens or self.mean_prompt, 0.0)
        return inflight.prefill_tokens[slots] + np.maximum(waiting - inflight.prefill_requests[slots], 0.0) * per

    def predict(self, ctx: CycleContext, mode: PrefixMode) -> Prediction:
        dl, s = self.dl, self.settings
        slots = dl.endpoints.active_slots()
        n = dl.endpoints.slot_count
        p = float(ctx.prompt_tokens())
        self.mean_prompt += 0.01 * (p - self.mean_prompt)
        k = slots.size
        if not k:
            ttft, wait, prefill, tpot = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
            return self._corrected(n, Prediction(mode, ttft, wait, prefill, tpot, np.zeros(n), np.zeros(n),
                                                 np.zeros(n)))
        fresh = dl.fresh(slots, ctx.now)  # once per decision: the queue, the running decodes, the KV wait
        waiting = dl.scraped_waiting(slots, ctx.now, fresh)
        q = self.queued_tokens(slots, waiting)
        budget = dl.costs.budget[slots]
        run = dl.running(slots, ctx.now, fresh)
        r = np.minimum(run, 0.9 * budget)
        h = np.minimum(ctx.hit_tokens(mode)[slots], p)
        u = np.maximum(p - h, 1.0)
        zero, grow = self._constants(k)
        cap, held, b = kv_held(dl, slots, fresh, r)
        # the running decodes' KV: what the pod's fresh /metrics say it holds (kv_usage x capacity), else
        # r x the configured mean context (a stale pod, or one whose usage reads 0 while it runs)
        kv = r * s.decode_context_tokens
        if s.kv_from_metrics:
            kv = np.where((held > 0.0) & (r > 0.0), held, kv)
        # three segments in one pass (time_to_first_token's steps, closed form): the queue ahead (fresh
        # prompts), this prompt after its cached prefix with the running decodes, and the same alone
        chunk = budget - r
        rr = np.concatenate((r, r, zero))
        full, last = prefill_split(dl.costs.rooflines(slots, 3), np.concatenate((q, u, u)),
                                   np.concatenate((chunk, chunk, budget)), rr, np.concatenate((kv, kv, zero)),
                                   np.concatenate((zero, h, h)), grow)
        # every single step of the decision in one evaluation of the roofline: the three segments' partial
        # last steps, the decode step that drains the KV cache (kvwait), this request's decode step and, where
        # some pod has no free sequence slot, the step of each pod's slot drain (slotwait)
        dec_b = r + 1.0  # tpot: once it joins the batch, its own context being its prompt
        dec_kv = kv + p
        new, pairs, reads = [last[0], b, dec_b], [last[1], held, dec_kv], [last[2], held, dec_kv]
        drain = slot_drain(dl, slots, ctx.now, run, waiting, q, budget, self.mean_prompt)
        if drain is not None:
            for args, more in zip((new, pairs, reads), drain.step_args, strict=True):
                args.append(more)
        steps = step_seconds_v(dl.costs.rooflines(slots, 5 if drain is None else 6), np.concatenate(new),
                               np.concatenate(pairs), np.concatenate(reads))
        empty = dl.costs.empty_step_s[slots]
        if s.time_scale != 1.0:  # the pods' steps in wall seconds (PredictorSettings.time_scale)
            full, steps, empty = full * s.time_scale, steps * s.time_scale, empty * s.time_scale
        seg = full + steps[:3 * k]
        drain_step = steps[3 * k:4 * k]  # decode_step(b, held): the running batch's own step
        w = seg[:k] + kv_wait_from_step(dl, slots, fresh, q, u, cap, held, drain_step)
        if s.step_in_progress:  # a busy pod starts this prompt at the end of the step it is in (see module doc)
            w = w + np.where(fresh & (r > 0.0), STEP_RESIDUAL * drain_step, 0.0)
        if drain is not None:
            w = np.maximum(w, slot_wait_from_step(drain, steps[5 * k:]))
        own, alone, tp = seg[k:2 * k], seg[2 * k:], steps[4 * k:5 * k]
        pre = np.maximum(alone - empty, 0.0)
        if k == n:  # every slot active (slots is 0..n-1): the per-slot arrays are the per-candidate ones
            pred = Prediction(mode, w + own, w, pre, tp, u, q, r)
        else:
            ttft, wait, prefill, tpot = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
            uncached, queued, run = np.zeros(n), np.zeros(n), np.zeros(n)
            ttft[slots] = w + own
            wait[slots] = w
            prefill[slots] = pre
            tpot[slots] = tp
            uncached[slots] = u
            queued[slots] = q
            run[slots] = r
            pred = Prediction(mode, ttft, wait, prefill, tpot, uncached, queued, run)
        return self._corrected(n, pred)

    def _constants(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """zeros(k) and the segments' ``grow`` (0 for the queue, 1 for this prompt's two): read-only."""
        got = self._const
        if got is None or got[0].size != k:
            zero = np.zeros(k)
            got = self._const = (zero, np.concatenate((zero, zero + 1.0, zero + 1.0)))
            for a in got:
                a.flags.writeable = False
        return got

    def _corrected(self, n: int, raw: Prediction) -> Prediction:
        """The online correction (identity until observations arrive): observed ~= a + b x raw, per slot."""
        if not self.settings.correction:
            return raw
        cr = self.correction
        b_t, b_p = cr.ttft_b[:n], cr.tpot_b[:n]
        return Prediction(raw.mode, cr.ttft_a[:n] + b_t * raw.ttft_s, b_t * raw.wait_s, b_t * raw.prefill_s,
                          cr.tpot_a[:n] + b_p * raw.tpot_s, raw.uncached, raw.queued, raw.running, raw.ttft_s,
                          raw.tpot_s)


__all__ = ["Predictor", "PredictorSettings"]
