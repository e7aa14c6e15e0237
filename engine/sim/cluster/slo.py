"""What admission did in a replay, beside the SLO figures of ``report.slo_summary`` (slo_attainment and
goodput_req_s: one definition of "within both targets", used by every report):

    admitted_attainment   requests within both targets / requests not rejected at arrival
    rejected_frac         rejected / all requests
    wasted_prefill_frac   prompt tokens computed (uncached) for requests that then missed a target, failed or
                          were lost, over all prompt tokens computed (a request rejected at arrival computed
                          none)
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

from engine.sim.cluster.report import SloTargets, request_tpot
from engine.sim.cluster.simulator import RequestRecord, SimResult


def meets(r: RequestRecord, targets: SloTargets) -> bool:
    """Completed within both targets (report.slo_summary's rule)."""
    return (r.status == "ok" and r.first_token - r.arrival <= targets.ttft_s
            and request_tpot(r.first_token, r.finish, r.output_tokens) <= targets.tpot_s)


def _computed(r: RequestRecord) -> float:
    """Prompt tokens this request made a pod compute (0 when it never reached a pod's prefill)."""
    if r.status == "rejected":
        return 0.0
    if r.status == "ok" or r.prefill_done >= 0:
        return float(max(0, (r.prompt_tokens or r.input_length) - r.cached_tokens))
    return 0.0


def admission_summary(result: SimResult, targets: SloTargets,
                      predicted: dict[str, tuple[float, float]] | None = None) -> dict[str, Any]:
    recs = result.records
    n = len(recs)
    met = [meets(r, targets) for r in recs]
    rejected = sum(1 for r in recs if r.status == "rejected")
    ok = [r for r in recs if r.status == "ok"]
    start = min((r.arrival for r in recs), default=0.0)
    computed = np.array([_computed(r) for r in recs])
    wasted = float(sum(c for c, m in zip(computed, met, strict=True) if not m))
    minutes: dict[int, list[float]] = {}
    for r in ok:
        if r.output_tokens > 1:
            minutes.setdefault(int((r.first_token - start) // 60.0), []).append(
                request_tpot(r.first_token, r.finish, r.output_tokens))
    per_min = np.array([np.mean(v) for _, v in sorted(minutes.items())])
    out: dict[str, Any] = {
        "admitted_attainment": sum(met) / (n - rejected) if n > rejected else math.nan,
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
        tp = request_tpot(r.first_token, r.finish, r.output_tokens)
        if r.output_tokens > 1 and tp > 0 and pp > 0:
            errs.setdefault(accel[r.decode_pod], {"ttft": [], "tpot": []})["tpot"].append(abs(pp - tp) / tp)
    return {a: {"ttft": float(np.mean(e["ttft"])) if e["ttft"] else math.nan,
                "tpot": float(np.mean(e["tpot"])) if e["tpot"] else math.nan,
                "n_ttft": float(len(e["ttft"])), "n_tpot": float(len(e["tpot"]))}
            for a, e in sorted(errs.items())}


# rows for report.format_table (key, label, format)
SLO_ROWS: list[tuple[str, str, str]] = [  # beside report's slo_attainment and goodput_req_s rows
    ("admitted_attainment", "admitted attainment", "{:.3f}"),
    ("rejected_frac", "rejected frac", "{:.3f}"),
    ("wasted_prefill_frac", "wasted prefill frac", "{:.4f}"),
    ("decode_tpot_cv_per_min", "decode TPOT CV/min", "{:.3f}"),
]


__all__ = ["SLO_ROWS", "admission_summary", "meets", "prediction_mape"]
