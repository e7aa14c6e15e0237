"""SLO figures of a replay: attainment, goodput, rejection, wasted prefill, decode oscillation, and how
well the picker predicted the latencies it was judged on.

A request meets its targets when it completed, its TTFT <= ``ttft_s`` and its TPOT (e2e - TTFT over
output tokens - 1; a one-token answer has no TPOT and meets any TPOT target) <= ``tpot_s``; a target of
None is met by every completed request.

    slo_attainment        met / all requests
    admitted_attainment   met / requests not rejected at arrival
    goodput_req_s         met / makespan (first arrival to last finish, as report.summarize)
    rejected_frac         rejected / all requests
    wasted_prefill_frac   prompt tokens computed (uncached) for requests that then missed a target or failed,
                          over all prompt tokens computed (a request rejected at arrival computed none)
    decode_tpot_cv_per_min  coefficient of variation over the minutes of the run of the mean TPOT of the
                          requests whose decode started in that minute (Mooncake's oscillation: a burst
                          admitted, decode saturated, everything rejected, decode drained)
    prediction_mape       per accelerator: mean |predicted - simulated| / simulated of TTFT (on the pod that
                          ran the prefill) and TPOT (on the decode pod), over completed requests the picker
                          predicted (``predicted``: request id -> (TTFT, TPOT) seconds)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from engine.sim.cluster.simulator import RequestRecord, SimResult


def _tpot(r: RequestRecord) -> float:
    return (r.finish - r.first_token) / (r.output_tokens - 1) if r.output_tokens > 1 else math.nan


def meets(r: RequestRecord, ttft_s: float | None, tpot_s: float | None) -> bool:
    if r.status != "ok":
        return False
    if ttft_s is not None and r.ttft > ttft_s:
        return False
    tp = _tpot(r)
    return tpot_s is None or math.isnan(tp) or tp <= tpot_s


def _computed(r: RequestRecord) -> float:
    """Prompt tokens this request made a pod compute (0 when it never reached a pod's prefill)."""
    if r.status == "rejected":
        return 0.0
    if r.status == "ok" or r.prefill_done >= 0:
        return float(max(0, (r.prompt_tokens or r.input_length) - r.cached_tokens))
    return 0.0


def slo_summary(result: SimResult, ttft_s: float | None, tpot_s: float | None,
                predicted: dict[str, tuple[float, float]] | None = None) -> dict[str, Any]:
    recs = result.records
    n = len(recs)
    met = [meets(r, ttft_s, tpot_s) for r in recs]
    rejected = sum(1 for r in recs if r.status == "rejected")
    ok = [r for r in recs if r.status == "ok"]
    start = min((r.arrival for r in recs), default=0.0)
    makespan = max((r.finish for r in ok), default=start) - start
    computed = np.array([_computed(r) for r in recs])
    wasted = float(sum(c for c, m in zip(computed, met) if not m))
    # per-minute mean TPOT of the decodes that started in that minute
    minutes: dict[int, list[float]] = {}
    for r in ok:
        tp = _tpot(r)
        if not math.isnan(tp):
            minutes.setdefault(int((r.first_token - start) // 60.0), []).append(tp)
    per_min = np.array([np.mean(v) for _, v in sorted(minutes.items())])
    out: dict[str, Any] = {
        "slo_ttft_ms": ttft_s * 1e3 if ttft_s is not None else None,
        "slo_tpot_ms": tpot_s * 1e3 if tpot_s is not None else None,
        "slo_attainment": sum(met) / n if n else math.nan,
        "admitted_attainment": sum(met) / (n - rejected) if n > rejected else math.nan,
        "goodput_req_s": sum(met) / makespan if makespan > 0 else math.nan,
        "rejected_frac": rejected / n if n else math.nan,
        "wasted_prefill_frac": wasted / float(computed.sum()) if computed.sum() else 0.0,
        "decode_tpot_cv_per_min": float(per_min.std() / per_min.mean()) if per_min.size > 1 else math.nan,
    }
    if predicted:
        out["prediction_mape"] = prediction_mape(result, predicted)
    return out


def prediction_mape(result: SimResult, predicted: dict[str, tuple[float, float]]) -> dict[str, dict[str, float]]:
    """Per accelerator: MAPE of the predicted TTFT (prefill pod) and TPOT (decode pod), with counts."""
    accel = {p.name: p.spec.accelerator for p in result.pods}
    errs: dict[str, dict[str, list[float]]] = {}
    for r in result.records:
        got = predicted.get(r.request_id)
        if r.status != "ok" or got is None:
            continue
        pt, pp = got
        if r.ttft > 0 and pt > 0:
            a = accel[r.prefill_pod or r.decode_pod]
            errs.setdefault(a, {"ttft": [], "tpot": []})["ttft"].append(abs(pt - r.ttft) / r.ttft)
        tp = _tpot(r)
        if not math.isnan(tp) and tp > 0 and pp > 0:
            errs.setdefault(accel[r.decode_pod], {"ttft": [], "tpot": []})["tpot"].append(abs(pp - tp) / tp)
    return {a: {"ttft": float(np.mean(e["ttft"])) if e["ttft"] else math.nan,
                "tpot": float(np.mean(e["tpot"])) if e["tpot"] else math.nan,
                "n_ttft": float(len(e["ttft"])), "n_tpot": float(len(e["tpot"]))}
            for a, e in sorted(errs.items())}


# rows for report.format_table (key, label, format)
SLO_ROWS: list[tuple[str, str, str]] = [
    ("slo_attainment", "SLO attainment", "{:.3f}"),
    ("admitted_attainment", "admitted attainment", "{:.3f}"),
    ("goodput_req_s", "goodput req/s", "{:.3f}"),
    ("rejected_frac", "rejected frac", "{:.3f}"),
    ("wasted_prefill_frac", "wasted prefill frac", "{:.4f}"),
    ("decode_tpot_cv_per_min", "decode TPOT CV/min", "{:.3f}"),
]


__all__ = ["SLO_ROWS", "meets", "prediction_mape", "slo_summary"]
