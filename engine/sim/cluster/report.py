"""Summaries of a replay: the figures a routing policy is judged by, as a dict and as a table."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.sim.cluster.simulator import LOST, RequestRecord, SimResult


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


@dataclass(frozen=True, slots=True)
class SloTargets:
    """Per-request latency targets: time to first token and time per output token after it (seconds)."""

    ttft_s: float
    tpot_s: float

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.tpot_s > 0):
            raise ValueError(f"SLO targets must be positive, got TTFT {self.ttft_s} s and TPOT {self.tpot_s} s")


def request_tpot(first_token: float, finish: float, output_tokens: int) -> float:
    """Seconds per output token after the first; 0 for a one-token answer (it has no TPOT to miss)."""
    return (finish - first_token) / (output_tokens - 1) if output_tokens > 1 else 0.0


def slo_summary(records: Sequence[RequestRecord], targets: SloTargets) -> dict[str, float]:
    """The SLO figures of a replay, the one definition every report uses (replay, planner, admission).

    ``slo_attainment``: requests completed within both targets / all requests (rejected, failed and lost
    requests count as misses); ``goodput_req_s``: requests within both targets per second of makespan (first
    arrival to last end); ``slo_ttft_attainment`` / ``slo_tpot_attainment``: each target on its own over all
    requests. Requests still pending count as misses.
    """
    n = len(records)
    met = ttft_ok = tpot_ok = 0
    start = math.inf
    end = -math.inf
    for r in records:
        start = min(start, r.arrival)
        if r.status != "ok":
            end = max(end, r.arrival)
            continue
        end = max(end, r.finish)
        a = r.first_token - r.arrival <= targets.ttft_s
        b = request_tpot(r.first_token, r.finish, r.output_tokens) <= targets.tpot_s
        ttft_ok += a
        tpot_ok += b
        met += a and b
    span = end - start if n and end > start else math.nan
    return {
        "slo_ttft_ms": targets.ttft_s * 1e3,
        "slo_tpot_ms": targets.tpot_s * 1e3,
        "slo_met": met,
        "slo_attainment": met / n if n else math.nan,
        "slo_ttft_attainment": ttft_ok / n if n else math.nan,
        "slo_tpot_attainment": tpot_ok / n if n else math.nan,
        "goodput_req_s": met / span if span == span and span > 0 else math.nan,
    }


def fleet_usage(result: SimResult, prices: Mapping[str, float] | None = None) -> dict[str, Any]:
    """What the fleet cost: GPU-hours and cost per accelerator kind (a pod is paid for from the moment it is
    requested until it is released, or the end of the replay), pods at the peak, scaling actions per hour
    and requests lost because their pod went away. ``prices``: per GPU-hour by kind (missing kinds: 0)."""
    prices = {k.upper(): v for k, v in (prices or {}).items()}
    end = result.end_time
    by_kind: dict[str, float] = {}
    changes: list[tuple[float, int]] = []
    for p in result.pods:
        stop = min(p.released_at, end)
        kind = p.spec.accelerator.upper()
        by_kind[kind] = by_kind.get(kind, 0.0) + p.gpus * max(0.0, stop - p.requested_at) / 3600.0
        changes += [(p.requested_at, 1), (stop, -1)]
    live = peak = 0
    for _, d in sorted(changes, key=lambda c: (c[0], c[1])):
        live += d
        peak = max(peak, live)
    hours = end / 3600.0 if end > 0 else math.nan
    cost_by_kind = {k: h * prices.get(k, 0.0) for k, h in by_kind.items()}
    return {
        "gpu_hours": sum(by_kind.values()),
        "gpu_hours_by_kind": by_kind,
        "cost": sum(cost_by_kind.values()),
        "cost_by_kind": cost_by_kind,
        "peak_pods": peak,
        "scaling_actions": result.scaling_actions,
        "scaling_actions_per_hour": result.scaling_actions / hours if hours == hours else math.nan,
        "lost_requests": sum(1 for r in result.records if r.reason == LOST),
    }


def _cv(values: np.ndarray) -> float:
    """Coefficient of variation (population std / mean); 0 for no values or a zero mean."""
    return float(values.std() / values.mean()) if len(values) and values.mean() else 0.0


def late_p90(arrival: np.ndarray, ttft: np.ndarray) -> float:
    """TTFT p90 of the requests that arrived in the second half of the arrival span (NaN for none). A run's first
    seconds find every cache cold (each prompt group's prefix computed once, the requests behind it waiting); on
    a short run near the knee they hold most of the requests at or above the run's p90, which then measures the
    cold start. The real-time reports take the same figure from the client's send times
    (``e2e.bench.client.RunResult.late_ttft_p90``)."""
    if not len(arrival):
        return math.nan
    return _pct(ttft[arrival >= (arrival.min() + arrival.max()) / 2], 90)


def summarize(result: SimResult, wall_s: float | None = None, slo: SloTargets | None = None,
              prices: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Completed/rejected/failed counts, throughput, TTFT/TPOT/e2e percentiles, prefix hit rate, shares.

    TPOT = (e2e - TTFT) / (output tokens - 1), over requests with at least two output tokens. Throughput
    is over the makespan: first arrival to last finish.
    """
    recs = result.records
    ok = [r for r in recs if r.status == "ok"]
    arrival = np.array([r.arrival for r in ok])
    first = np.array([r.first_token for r in ok])
    finish = np.array([r.finish for r in ok])
    out_tok = np.array([r.output_tokens for r in ok], dtype=np.float64)
    prompt = np.array([r.prompt_tokens for r in ok], dtype=np.float64)
    cached = np.array([r.cached_tokens for r in ok], dtype=np.float64)
    ttft = first - arrival
    e2e = finish - arrival
    multi = out_tok > 1
    tpot = (e2e[multi] - ttft[multi]) / (out_tok[multi] - 1)
    start = min((r.arrival for r in recs), default=0.0)
    makespan = (float(finish.max()) - start) if len(ok) else 0.0
    span = makespan if makespan > 0 else math.nan
    share: dict[str, int] = {p.name: 0 for p in result.pods if p.spec.role != "prefill"}
    pshare: dict[str, int] = {p.name: 0 for p in result.pods if p.spec.role == "prefill"}
    for r in recs:
        if r.decode_pod:
            share[r.decode_pod] = share.get(r.decode_pod, 0) + 1
        if r.prefill_pod:
            pshare[r.prefill_pod] = pshare.get(r.prefill_pod, 0) + 1
    counts = np.array(list(share.values()), dtype=np.float64)
    # (pod, data-parallel rank): requests served and time each rank computed (it waits for the straggler
    # the rest of a step). Pods without ranks count as one rank each.
    rshare: dict[str, int] = {}
    rbusy: dict[str, float] = {}
    for p in result.pods:
        if p.spec.role == "prefill":
            continue
        for rank in range(p.spec.dp):
            key = p.endpoint(rank)
            rshare[key] = 0
            rbusy[key] = p.group.busy_time[rank]
    pods = {p.name: p for p in result.pods}
    for r in recs:
        pod = pods.get(r.decode_pod)
        # a request the pod refused (400, e.g. prompt over the model length) reached no rank: not rank 0's
        if pod is not None and (r.decode_rank is not None or pod.spec.dp <= 1):
            key = pod.endpoint(r.decode_rank or 0)
            rshare[key] = rshare.get(key, 0) + 1
    rcounts = np.array(list(rshare.values()), dtype=np.float64)
    rbusy_arr = np.array(list(rbusy.values()), dtype=np.float64)
    out: dict[str, Any] = {
        "policy": result.policy,
        "requests": len(recs),
        "completed": len(ok),
        "rejected": sum(1 for r in recs if r.status == "rejected"),
        "failed": sum(1 for r in recs if r.status == "failed"),
        "makespan_s": makespan,
        "throughput_req_s": len(ok) / span,
        "output_tok_s": float(out_tok.sum()) / span,
        "input_tok_s": float(prompt.sum()) / span,
        "ttft_p50_s": _pct(ttft, 50), "ttft_p90_s": _pct(ttft, 90), "ttft_p99_s": _pct(ttft, 99),
        "ttft_p90_late_s": late_p90(arrival, ttft),
        "tpot_mean_s": float(tpot.mean()) if len(tpot) else math.nan, "tpot_p90_s": _pct(tpot, 90),
        "e2e_p50_s": _pct(e2e, 50), "e2e_p90_s": _pct(e2e, 90),
        "prefix_hit_rate": float(cached.sum() / prompt.sum()) if prompt.sum() else 0.0,
        "preemptions": sum(p.num_preemptions for p in result.pods),
        "pod_share": {k: v / max(1, len(recs)) for k, v in share.items()},
        "prefill_share": {k: v / max(1, len(recs)) for k, v in pshare.items()},
        "share_cv": float(counts.std() / counts.mean()) if len(counts) and counts.mean() else 0.0,
        "rank_share": {k: v / max(1, sum(rshare.values())) for k, v in rshare.items()},  # of requests a rank took
        "rank_share_cv": _cv(rcounts),
        "rank_busy": {k: v / span for k, v in rbusy.items()},
        "rank_busy_cv": _cv(rbusy_arr),
        "pod_busy": {p.name: p.busy_time / span for p in result.pods},
        "sim_events": result.events,
    }
    if slo is not None:
        out.update(slo_summary(recs, slo))
    usage = fleet_usage(result, prices)
    if prices is None:
        del usage["cost"], usage["cost_by_kind"]
    out.update(usage)
    if wall_s is not None:
        out["wall_s"] = wall_s
    return out


_ROWS: list[tuple[str, str, str]] = [
    ("requests", "requests", "{:.0f}"),
    ("completed", "completed", "{:.0f}"),
    ("rejected", "rejected", "{:.0f}"),
    ("failed", "failed (400)", "{:.0f}"),
    ("makespan_s", "makespan s", "{:.1f}"),
    ("throughput_req_s", "throughput req/s", "{:.3f}"),
    ("output_tok_s", "output tok/s", "{:.0f}"),
    ("input_tok_s", "input tok/s", "{:.0f}"),
    ("ttft_p50_s", "TTFT p50 ms", "ms"),
    ("ttft_p90_s", "TTFT p90 ms", "ms"),
    ("ttft_p99_s", "TTFT p99 ms", "ms"),
    ("ttft_p90_late_s", "TTFT p90 late ms", "ms"),
    ("tpot_mean_s", "TPOT mean ms", "ms"),
    ("tpot_p90_s", "TPOT p90 ms", "ms"),
    ("e2e_p50_s", "e2e p50 ms", "ms"),
    ("e2e_p90_s", "e2e p90 ms", "ms"),
    ("prefix_hit_rate", "prefix hit rate", "{:.1%}"),
    ("preemptions", "preemptions", "{:.0f}"),
    ("share_cv", "pod share CV", "{:.3f}"),
    ("slo_attainment", "SLO attainment", "{:.1%}"),
    ("goodput_req_s", "goodput req/s", "{:.3f}"),
    ("gpu_hours", "GPU-hours", "{:.2f}"),
    ("cost", "cost", "{:.2f}"),
    ("peak_pods", "peak pods", "{:.0f}"),
    ("scaling_actions_per_hour", "scaling actions/h", "{:.1f}"),
    ("lost_requests", "lost requests", "{:.0f}"),
    ("rank_share_cv", "rank share CV", "{:.3f}"),
    ("rank_busy_cv", "rank busy CV", "{:.3f}"),
    ("min_rank_share", "min rank share", "{:.1%}"),
    ("max_share", "max pod share", "{:.1%}"),
    ("wall_s", "wall s", "{:.1f}"),
]


_OPTIONAL = {"wall_s", "slo_attainment", "goodput_req_s", "cost"}


def json_safe(obj: Any) -> Any:
    """A summary made strict JSON: NaN and infinities (metrics of empty samples) become null, through nested
    dicts and lists."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj


def _fmt(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if fmt == "ms":
        return f"{v * 1e3:.1f}"
    return fmt.format(v)


def format_table(summaries: list[dict[str, Any]], extra_rows: list[tuple[str, str, str]] | None = None) -> str:
    """One column per run (``column``, else ``policy``), one row per figure (``extra_rows`` after the rest)."""
    cols = [s.get("column") or s.get("policy") or f"run {i + 1}" for i, s in enumerate(summaries)]
    rows: list[list[str]] = []
    for key, label, fmt in [*_ROWS, *(extra_rows or [])]:
        vals = []
        for s in summaries:
            if key == "max_share":
                v = max(s["pod_share"].values(), default=0.0)
            elif key == "min_rank_share":
                v = min(s["rank_share"].values(), default=0.0)
            else:
                v = s.get(key)
            vals.append(_fmt(v, fmt))
        if key in _OPTIONAL and all(v == "-" for v in vals):
            continue
        rows.append([label, *vals])
    width0 = max(len(r[0]) for r in rows + [["metric"]])
    widths = [max(len(c), *(len(r[i + 1]) for r in rows)) for i, c in enumerate(cols)]
    line = "  ".join(["metric".ljust(width0), *(c.rjust(w) for c, w in zip(cols, widths))])
    out = [line, "-" * len(line)]
    for r in rows:
        out.append("  ".join([r[0].ljust(width0), *(v.rjust(w) for v, w in zip(r[1:], widths))]))
    return "\n".join(out)


__all__ = ["SloTargets", "fleet_usage", "format_table", "request_tpot", "slo_summary", "summarize"]
