"""Admission against latency targets and per-stage saturation (``scheduler.admission`` types).

    none              admit everything (an explicit empty list of rules)
    stage-saturation  llm-d v1.0's stage-aware back-pressure: S = max(S_prefill, S_decode), each the mean over
                      the pool's healthy pods with fresh metrics of max(waiting / queue_threshold,
                      kv_usage / kv_threshold) (a pool without dedicated prefill pods is one pool). Every
                      request is rejected at S >= threshold x m(priority), with or without targets.
    early             Mooncake's non-predictive early rejection: reject at arrival when the best predicted TTFT
                      on the prefill pool now (every pod that can prefill; the decode pods without one), or the
                      best decode pod's predicted TPOT now, misses the request's target x m(priority).
    predictive        Mooncake's prediction-based early rejection, done with the picker's own ledger: the TTFT
                      check as ``early``; then the decode pool's TPOT is predicted at T = now + predicted TTFT,
                      counting on each decode pod the requests admitted before this one whose prefill ends by
                      T and whose decode has not ended by T (expected output length from the outputs the pool
                      has produced, capped by each request's max_tokens; decode time = that x its predicted
                      TPOT), plus the load the pod's metrics show that the ledger does not explain; the
                      batch is checked at ``window_points`` times from T to this request's expected end
                      (Mooncake checks T only: a request admitted just before a burst's prefills end then
                      decodes in the burst's batch), and the worst TPOT must meet the target.

Requests without targets are never rejected by ``early`` or ``predictive`` (there is nothing to miss).

Priorities (InferenceObjective semantics, ``RequestState.slo.priority``): the admission limit is the target
(or the saturation threshold) times m(priority) = 1 for priority >= 0 and ``sheddable_margin`` (< 1) below
zero. m never decreases with priority, so on the same fleet a request is never rejected while one of lower
priority with the same targets would have been admitted; sheddable requests go first, while the fleet still
meets the others' targets.

Every rejection is a 429 at arrival (no prefill has started, none is wasted) with ``Retry-After``, an
OpenAI error body naming the target that cannot be met and the predicted value, and a code counted by
reason in ``kvswitch_scheduler_rejections{code=...}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from engine.costmodel.vector import decode_step_seconds
from pickers.framework import Admission, CycleContext, Param, register
from pickers.state import SLOTargets
from pickers.types import Decision, SchedulingError, Usage

TPOT_HEADROOM = Param(float, 0.05, min=0.0, max=0.9,
                      doc="admit only when the predicted TPOT is below (1 - this) x the target: the decode "
                          "pod's TPOT varies around the prediction (local prefills of short prompts, KV arrivals)")
SHEDDABLE_MARGIN = Param(float, 0.8, min=0.05, max=1.0,
                         doc="a sheddable request (priority < 0) is admitted only below this share of its limit")


def margin(priority: int, sheddable_margin: float) -> float:
    """m(priority): non-decreasing in priority (the never-reject-higher-first invariant rests on it)."""
    return 1.0 if priority >= 0 else sheddable_margin


def _who(slo: SLOTargets) -> str:
    obj = f"objective {slo.objective!r}, " if slo.objective else ""
    return f"{obj}priority {slo.priority}"


def miss(latency: str, predicted_s: float, target_s: float, limit_s: float, slo: SLOTargets, where: str,
         retry_after_s: float) -> SchedulingError:
    """The 429 for a target the fleet is predicted to miss."""
    name = "TTFT" if latency == "ttft" else "TPOT"
    header = f"x-slo-{latency}-ms"
    shed = (f"; as a sheddable request ({_who(slo)}) it is admitted only below {limit_s * 1e3:.1f} ms"
            if slo.priority < 0 else f" (admitted below {limit_s * 1e3:.1f} ms)" if limit_s < target_s else "")
    retry = int(min(60, max(1, math.ceil(retry_after_s))))
    return SchedulingError(
        429,
        f"{name} target {target_s * 1e3:.1f} ms cannot be met: predicted {name} {predicted_s * 1e3:.1f} ms on "
        f"{where}{shed}. Retry after {retry} s, or send a looser {header}.",
        f"slo_{latency}_unattainable", headers=(("retry-after", str(retry)),))


def healthy(ctx: CycleContext) -> np.ndarray:
    c = ctx.candidates
    return c[ctx.dl.health.healthy[c]]


class _Stable:
    """Hands back the previous array object while the values are equal, so the cost table's memo of
    rooflines (keyed on the slots array's identity) hits on every decision of a steady fleet."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: np.ndarray | None = None

    def __call__(self, a: np.ndarray) -> np.ndarray:
        last = self.last
        if last is not None and last.size == a.size and np.array_equal(last, a):
            return last
        self.last = a
        return a


@register
class NoAdmission(Admission):
    """Admit every request (``admission: [none]``; same as an empty list)."""

    TYPE = "none"
    reads_metrics = False

    def admit(self, ctx: CycleContext) -> None:
        return None


@register
class StageSaturationAdmission(Admission):
    TYPE = "stage-saturation"
    PARAMS: ClassVar[dict[str, Param]] = {
        "queue_threshold": Param(float, 5.0, min=1e-9),
        "kv_threshold": Param(float, 0.8, min=1e-9, max=1.0),
        "threshold": Param(float, 1.0, min=1e-9, doc="reject at S >= threshold x m(priority)"),
        "stale_counts_as_saturated": Param(bool, False),
        "sheddable_margin": SHEDDABLE_MARGIN,
    }
    queue_threshold: float
    kv_threshold: float
    threshold: float
    stale_counts_as_saturated: bool
    sheddable_margin: float

    def pool_saturation(self, slots: np.ndarray, now: float) -> tuple[float, int]:
        """Mean of max(waiting/qt, kv/kt) over ``slots`` (stale pods ignored, or saturated when strict)."""
        if slots.size == 0:
            return 0.0, 0
        m = self.dl.metrics
        waiting = m.waiting[slots] + self.dl.held_requests / slots.size  # flow control's held requests, spread
        per = np.maximum(waiting / self.queue_threshold, m.kv_usage[slots] / self.kv_threshold)
        fresh = m.fresh(slots, now)
        stale = int(slots.size - np.count_nonzero(fresh))
        self.stale_endpoints += stale
        if self.stale_counts_as_saturated:
            per = np.where(fresh, per, np.maximum(per, 1.0))
        elif stale:
            per = per[fresh]
        return (float(per.mean()), int(per.size)) if per.size else (0.0, 0)

    def saturation(self, ctx: CycleContext) -> tuple[float, str]:
        """max(S_prefill, S_decode) and the pool it comes from."""
        self.stale_endpoints = 0
        ep = self.dl.endpoints
        slots = healthy(ctx)
        prefill = slots[ep.can_prefill[slots] & ~ep.can_decode[slots]]
        decode = slots[ep.can_decode[slots]]
        sd, nd = self.pool_saturation(decode, ctx.now)
        sp, np_ = self.pool_saturation(prefill, ctx.now)
        if sp > sd:
            return sp, f"the prefill pool ({np_} pods)"
        return sd, f"the decode pool ({nd} pods)" if prefill.size else f"the pool ({nd} pods)"

    def admit(self, ctx: CycleContext) -> None:
        slo = ctx.state.slo
        limit = self.threshold * margin(slo.priority, self.sheddable_margin)
        s, where = self.saturation(ctx)
        if s >= limit:
            raise SchedulingError(
                429,
                f"{where} is saturated ({s:.2f} >= {limit:.2f}: mean over its pods of max(waiting/"
                f"{self.queue_threshold:g}, kv_usage/{self.kv_threshold:g}), {_who(slo)}). Retry after 1 s.",
                "stage_saturated", headers=(("retry-after", "1"),))


@register
class EarlyAdmission(Admission):
    """Mooncake's early rejection on the current prediction (see the module docstring)."""

    TYPE = "early"
    PARAMS: ClassVar[dict[str, Param]] = {"sheddable_margin": SHEDDABLE_MARGIN, "tpot_headroom": TPOT_HEADROOM}
    sheddable_margin: float
    tpot_headroom: float

    def ttft_check(self, ctx: CycleContext, slots: np.ndarray) -> float:
        """The best predicted TTFT over the pods that may run the prompt (the prefill pool when the handler
        runs prefill legs and there is one, else the decode pods); raises the 429 when it misses the target."""
        slo = ctx.state.slo
        pred = ctx.prediction("auto")
        ep = self.dl.endpoints
        prefill = slots[ep.can_prefill[slots]] if self.prefill_legs else slots[:0]
        slots = prefill if prefill.size else slots[ep.can_decode[slots]]
        t = float(pred.ttft_s[slots].min())
        if slo.ttft_s is not None:
            limit = slo.ttft_s * margin(slo.priority, self.sheddable_margin)
            if t > limit:
                raise miss("ttft", t, slo.ttft_s, limit, slo, f"the best of {slots.size} pods", t - slo.ttft_s)
        return t

    def admit(self, ctx: CycleContext) -> None:
        """Targets checked at arrival: TTFT on the candidates, then TPOT (``tpot_check``; the predictive rule
        projects it to when this request's prefill ends)."""
        slo = ctx.state.slo
        if not slo.any:
            return
        slots = healthy(ctx)
        if slots.size == 0:
            return  # the handler answers with its 503
        t_first = self.ttft_check(ctx, slots)
        if slo.tpot_s is not None:
            self.tpot_check(ctx, slots, t_first, slo.tpot_s)

    def tpot_limit(self, slo: SLOTargets, target_s: float) -> float:
        return target_s * (1.0 - self.tpot_headroom) * margin(slo.priority, self.sheddable_margin)

    def tpot_check(self, ctx: CycleContext, slots: np.ndarray, t_first: float, target_s: float) -> None:
        """The best decode pod's TPOT now."""
        slo = ctx.state.slo
        decode = slots[self.dl.endpoints.can_decode[slots]]
        if decode.size:
            tp = float(ctx.prediction("auto").tpot_s[decode].min())
            limit = self.tpot_limit(slo, target_s)
            if tp > limit:
                raise miss("tpot", tp, target_s, limit, slo, f"the best of {decode.size} decode pods now", 1.0)


@dataclass(slots=True)
class _Columns:
    """The ledger's arrays (one row per admitted, unfinished request; rows reused through a free list)."""

    decode: np.ndarray  # decode pod slot
    first: np.ndarray  # expected (then actual) first-token time
    end: np.ndarray  # expected end of decode
    context: np.ndarray  # KV tokens it holds while decoding (prompt + half its expected output)
    tpot: np.ndarray  # predicted TPOT on its decode pod
    out: np.ndarray  # expected output tokens
    live: np.ndarray  # bool

    @classmethod
    def empty(cls, n: int) -> _Columns:
        z = np.zeros
        return cls(z(n, dtype=np.int64), z(n), z(n), z(n), z(n), z(n), z(n, dtype=bool))

    def grown(self, n: int) -> _Columns:
        new = _Columns.empty(n)
        k = self.live.size
        for name in self.__slots__:
            getattr(new, name)[:k] = getattr(self, name)
        return new


class DecodeLedger:
    """The requests this picker admitted and has not seen finish: where they decode and when they are
    expected to start and end. Bounded by ``max_rows`` (the oldest row is dropped when full) and by
    ``ttl_s`` past its expected end (a lost "finished" report)."""

    def __init__(self, max_rows: int = 65536, ttl_s: float = 600.0, outputs_window: int = 256) -> None:
        self.max_rows = max_rows
        self.ttl_s = ttl_s
        self.cols = _Columns.empty(256)
        self.high = 0  # rows [0, high) have been used
        self.free: list[int] = []
        self.row_of: dict[str, int] = {}
        self.outputs = np.zeros(outputs_window)
        self.outputs_seen = 0
        self._expected: tuple[tuple[int, int | None, float], float] | None = None

    # expected output length from what the pool produced
    def expected_output(self, max_tokens: int | None, default: float) -> float:
        """Memoised until the next observed output (a decision asks twice: admission and ``on_routed``)."""
        key = (self.outputs_seen, max_tokens, default)
        got = self._expected
        if got is not None and got[0] == key:
            return got[1]
        v = self._expected_output(max_tokens, default)
        self._expected = (key, v)
        return v

    def _expected_output(self, max_tokens: int | None, default: float) -> float:
        k = min(self.outputs_seen, self.outputs.size)
        if k == 0:
            return float(min(max_tokens, default)) if max_tokens else default
        seen = self.outputs[:k]
        return float(np.minimum(seen, max_tokens).mean()) if max_tokens else float(seen.mean())

    def observe_output(self, tokens: int) -> None:
        self.outputs[self.outputs_seen % self.outputs.size] = tokens
        self.outputs_seen += 1

    def add(self, key: str, decode: int, first: float, tpot: float, out: float, prompt: float, now: float) -> None:
        self.remove(key)
        if not self.free and self.high == self.cols.live.size:
            if self.high < self.max_rows:
                self.cols = self.cols.grown(min(self.max_rows, 2 * self.cols.live.size))
            else:
                self._expire(now, force=True)
        if self.free:
            row = self.free.pop()
        else:
            row = self.high
            self.high += 1
        c = self.cols
        c.decode[row], c.first[row], c.tpot[row], c.out[row] = decode, first, tpot, out
        c.end[row] = first + out * tpot
        c.context[row] = prompt + out / 2.0
        c.live[row] = True
        self.row_of[key] = row

    def started(self, key: str, at: float) -> None:
        row = self.row_of.get(key)
        if row is not None:
            c = self.cols
            c.first[row] = at
            c.end[row] = at + c.out[row] * c.tpot[row]

    def remove(self, key: str) -> None:
        row = self.row_of.pop(key, None)
        if row is not None:
            self.cols.live[row] = False
            self.free.append(row)

    def _expire(self, now: float, force: bool = False) -> None:
        c, h = self.cols, self.high
        old = c.live[:h] & (c.end[:h] + self.ttl_s < now)
        if force and not old.any():  # full of live rows: drop the earliest-ending tenth
            live = np.flatnonzero(c.live[:h])
            old = np.zeros(h, dtype=bool)
            old[live[np.argsort(c.end[live])[: max(1, live.size // 10)]]] = True
        if old.any():
            drop = set(np.flatnonzero(old).tolist())
            for key in [k for k, r in self.row_of.items() if r in drop]:
                self.remove(key)

    def batches_at(self, times: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Per time in ``times`` and slot (``n`` of them): the requests decoding then and their KV tokens."""
        c, h = self.cols, self.high
        k = times.size
        if h == 0:
            return np.zeros((k, n)), np.zeros((k, n))
        t = times[:, None]
        at_t = c.live[:h] & (c.first[:h] <= t) & (c.end[:h] > t)  # (k, h)
        idx = (c.decode[:h] + n * np.arange(k)[:, None])[at_t]
        count = np.bincount(idx, minlength=k * n)[: k * n].astype(np.float64).reshape(k, n)
        kv = np.bincount(idx, weights=np.broadcast_to(c.context[:h], (k, h))[at_t],
                         minlength=k * n)[: k * n].reshape(k, n)
        return count, kv

    def decoding_now(self, now: float, n: int) -> np.ndarray:
        c, h = self.cols, self.high
        sel = c.live[:h] & (c.first[:h] <= now)
        return np.bincount(c.decode[:h][sel], minlength=n)[:n].astype(np.float64)


@register
class PredictiveAdmission(EarlyAdmission):
    """Mooncake's prediction-based early rejection (see the module docstring)."""

    TYPE = "predictive"
    PARAMS: ClassVar[dict[str, Param]] = {
        "sheddable_margin": SHEDDABLE_MARGIN,
        "tpot_headroom": TPOT_HEADROOM,
        "default_output_tokens": Param(float, 256.0, min=1.0, doc="expected output before any was observed"),
        "max_ledger": Param(int, 65536, min=16, max=1 << 22),
        "outputs_window": Param(int, 256, min=8, max=65536),
        "window_points": Param(int, 2, min=1, max=32, doc="times across its decode at which the batch is checked"),
    }
    default_output_tokens: float
    max_ledger: int
    outputs_window: int
    window_points: int

    def __init__(self, **params: object) -> None:
        super().__init__(**params)
        self.ledger = DecodeLedger(self.max_ledger, outputs_window=self.outputs_window)
        self._decode = _Stable()

    def projected_tpot(self, ctx: CycleContext, decode: np.ndarray, at: float, prompt: float,
                       out: float) -> np.ndarray:
        """Predicted TPOT on each pod of ``decode`` during this request's decode: the worst of the batches
        at ``window_points`` times from ``at`` (its prefill's end) to its expected end there (its expected
        output x the best decode pod's TPOT now), each with this request in it. Taking the worst point also
        protects the requests already decoding there, whose TPOT is the same step time. One vectorised
        evaluation for all points and pods."""
        dl = self.dl
        n = dl.endpoints.slot_count
        k = self.window_points
        span = out * float(ctx.prediction("auto").tpot_s[decode].min())
        times = at + span * np.arange(k) / max(1, k - 1)
        led = self.ledger
        count, kv = led.batches_at(times, n)  # (k, n) each
        # load the pod reports (fresh metrics) that the ledger does not explain: another picker's, or a
        # request decoding longer than expected; counted as staying, with the ledger's mean context
        extra = np.maximum(dl.running(decode, ctx.now) - led.decoding_now(ctx.now, n)[decode], 0.0)
        c, v = count[:, decode], kv[:, decode]
        own = prompt + out / 2.0
        mean_ctx = np.where(c > 0, v / np.maximum(c, 1.0), own)
        batch = (c + extra + 1.0).ravel()
        tokens = (v + extra * mean_ctx + own).ravel()
        raw = decode_step_seconds(dl.costs.rooflines(decode, k), batch, tokens).reshape(k, decode.size)
        raw *= dl.predictor.settings.time_scale  # the pods' wall seconds, as the correction learned them
        cr = dl.predictor.correction
        return (cr.tpot_a[decode] + cr.tpot_b[decode] * raw).max(axis=0)

    def tpot_check(self, ctx: CycleContext, slots: np.ndarray, t_first: float, target_s: float) -> None:
        """The best decode pod's TPOT when this request's prefill will have ended (ledger projection)."""
        slo = ctx.state.slo
        decode = self._decode(slots[self.dl.endpoints.can_decode[slots]])
        if decode.size == 0:
            return
        out = self.ledger.expected_output(ctx.request.max_tokens, self.default_output_tokens)
        tp = self.projected_tpot(ctx, decode, ctx.now + t_first, float(ctx.prompt_tokens()), out)
        best = float(tp.min())
        limit = self.tpot_limit(slo, target_s)
        if best > limit:
            raise miss("tpot", best, target_s, limit, slo,
                       f"the best of {decode.size} decode pods when its prefill ends ({t_first * 1e3:.0f} ms from "
                       f"now)", t_first + 1.0)

    # the ledger follows every admitted request
    def on_routed(self, decision: Decision) -> None:
        state = decision.state
        exp = state.expected
        if exp is None:
            return
        out = self.ledger.expected_output(state.request.max_tokens, self.default_output_tokens)
        prompt = float(state.tokens.size) if state.tokens is not None else float(
            self.dl.tokens.estimate(state.request))
        self.ledger.add(state.key, exp.decode_slot, state.arrival + exp.ttft_s, exp.tpot_s, out, prompt,
                        decision.decided_at)

    def on_served(self, decision: Decision, served: str) -> None:
        if decision.state.expected is None:  # moved to another pod than predicted: follow it there
            slot = self.dl.endpoints.slot(served)
            row = self.ledger.row_of.get(decision.state.key)
            if slot is not None and row is not None:
                self.ledger.cols.decode[row] = slot

    def on_first_token(self, decision: Decision, at: float) -> None:
        self.ledger.started(decision.state.key, at)

    def on_finished(self, decision: Decision, usage: Usage | None, at: float) -> None:
        self.ledger.remove(decision.state.key)
        if usage is not None and usage.completion_tokens > 0:
            self.ledger.observe_output(usage.completion_tokens)

    def on_failed(self, decision: Decision, reason: str, at: float) -> None:
        self.ledger.remove(decision.state.key)


__all__ = [
    "DecodeLedger", "EarlyAdmission", "NoAdmission", "PredictiveAdmission", "StageSaturationAdmission", "margin",
    "miss",
]
