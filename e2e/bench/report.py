"""The report: results.json -> README.md (table, setup, versions) + plots, in the results folder.

Each cell of the table is the median over repetitions, with [min-max] when there was more than one.
Percentiles are per run (from aiperf's per-request samples); TTFT CDFs pool the repetitions.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from e2e.bench.client import RunResult, parse_exports, percentile, run_dir_name

# column key -> (header, function of one run, format)
METRICS: list[tuple[str, str, Any, str]] = [
    ("req_s", "req/s", lambda r: r.request_throughput, "{:.2f}"),
    ("tok_s", "out tok/s", lambda r: r.output_tok_s, "{:.0f}"),
    ("ttft_p50", "TTFT p50 ms", lambda r: percentile(r.ttft_ms, 50), "{:.0f}"),
    ("ttft_p90", "TTFT p90 ms", lambda r: percentile(r.ttft_ms, 90), "{:.0f}"),
    ("ttft_p99", "TTFT p99 ms", lambda r: percentile(r.ttft_ms, 99), "{:.0f}"),
    ("ttft_p90_late", "TTFT p90 late ms", lambda r: r.late_ttft_p90, "{:.0f}"),
    ("ttft_mean", "TTFT mean ms", lambda r: float(np.mean(r.ttft_ms)) if r.ttft_ms else math.nan, "{:.0f}"),
    ("engine_ttft", "pod TTFT mean ms",
     lambda r: r.engine_ttft_ms if r.engine_ttft_ms is not None else math.nan, "{:.0f}"),
    ("path", "path ms", lambda r: r.path_ms, "{:.1f}"),
    ("itl_p50", "ITL p50 ms", lambda r: percentile(r.itl_ms, 50), "{:.1f}"),
    ("itl_p90", "ITL p90 ms", lambda r: percentile(r.itl_ms, 90), "{:.1f}"),
    ("e2e_p90", "e2e p90 ms", lambda r: percentile(r.e2e_ms, 90), "{:.0f}"),
    ("cold", "cold prompts", lambda r: r.cold_prompts, "{:.0f}"),
    ("errors", "errors", lambda r: float(r.errors), "{:.0f}"),
    ("hit", "hit rate", lambda r: r.hit_rate if r.hit_rate is not None else float("nan"), "{:.0%}"),
]


def load(path: Path) -> tuple[dict[str, Any], list[RunResult], list[dict[str, Any]]]:
    doc = json.loads(Path(path).read_text())
    return doc.get("meta", {}), [RunResult.from_json(r) for r in doc.get("runs", [])], doc.get("failures", [])


def add_send_times(results_path: Path) -> int:
    """Give each run of ``results_path`` that has none its requests' send times (``RunResult.sent_s``), read
    again from its aiperf export under ``raw/`` (sets recorded before they were kept); the number of runs given
    them. A run whose export is gone, or whose TTFT samples are not the stored ones, is left as it was."""
    results_path = Path(results_path)
    doc = json.loads(results_path.read_text())
    added = 0
    for r in doc.get("runs", []):
        if r.get("sent_s"):
            continue
        art = results_path.parent / "raw" / run_dir_name(r["router"], r["rate"], r["repetition"]) / "aiperf"
        if not (art / "profile_export.jsonl").exists():
            continue
        ts = float(r.get("time_scale") or 1.0)
        again = parse_exports(art, r["router"], r["rate"], r["repetition"]).to_simulated(ts)
        if (not again.sent_s or len(again.ttft_ms) != len(r["ttft_ms"])
                or not np.allclose(again.ttft_ms, r["ttft_ms"], rtol=1e-9, atol=1e-9)):
            continue
        r["sent_s"] = again.sent_s
        added += 1
    if added:
        results_path.write_text(json.dumps(doc, indent=1))
    return added


def aggregate(runs: list[RunResult]) -> dict[tuple[str, float], dict[str, tuple[float, float, float]]]:
    """(router, rate) -> metric key -> (median, min, max) over repetitions."""
    groups: dict[tuple[str, float], list[RunResult]] = defaultdict(list)
    for r in runs:
        groups[(r.router, r.rate)].append(r)
    out = {}
    for key, rs in groups.items():
        cell = {}
        for mkey, _, fn, _ in METRICS:
            vals = [v for v in (fn(r) for r in rs) if not (isinstance(v, float) and math.isnan(v))]
            cell[mkey] = (float(np.median(vals)), min(vals), max(vals)) if vals else (math.nan,) * 3
        cell["n"] = (float(len(rs)),) * 3
        out[key] = cell
    return out


def _cell(value: tuple[float, float, float], fmt: str, show_range: bool) -> str:
    med, lo, hi = value
    if math.isnan(med):
        return "-"
    text = fmt.format(med)
    if show_range and lo != hi:
        text += f" [{fmt.format(lo)}-{fmt.format(hi)}]"
    return text


def table(meta: dict[str, Any], runs: list[RunResult]) -> str:
    agg = aggregate(runs)
    routers = list(dict.fromkeys(meta.get("routers") or [r.router for r in runs]))
    rates = sorted({r.rate for r in runs})
    show_range = (meta.get("repetitions") or 1) > 1
    head = ["router", "offered req/s"] + [h for _, h, _, _ in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rate in rates:
        for router in routers:
            cell = agg.get((router, rate))
            if cell is None:
                lines.append(f"| {router} | {rate:g} | " + " | ".join(["(failed)"] * len(METRICS)) + " |")
                continue
            vals = [_cell(cell[k], fmt, show_range) for k, _, _, fmt in METRICS]
            lines.append(f"| {router} | {rate:g} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def plots(out_dir: Path, meta: dict[str, Any], runs: list[RunResult]) -> list[str]:
    """throughput.png, req_s.png, ttft_p90.png, ttft_p99.png and hit_rate.png against offered load,
    ttft_cdf_r<rate>.png and (runs with send times) ttft_time_r<rate>.png per rate; names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(runs)
    routers = list(dict.fromkeys(meta.get("routers") or [r.router for r in runs]))
    rates = sorted({r.rate for r in runs})
    written = []
    for key, label, fname in (("tok_s", "output tokens/s", "throughput.png"),
                              ("req_s", "completed requests/s", "req_s.png"),
                              ("ttft_p90", "TTFT p90 (ms)", "ttft_p90.png"),
                              ("ttft_p99", "TTFT p99 (ms)", "ttft_p99.png"),
                              ("hit", "prefix hit rate", "hit_rate.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for router in routers:
            xs = [rate for rate in rates if (router, rate) in agg]
            if not xs:
                continue
            med = [agg[(router, x)][key][0] for x in xs]
            lo = [agg[(router, x)][key][0] - agg[(router, x)][key][1] for x in xs]
            hi = [agg[(router, x)][key][2] - agg[(router, x)][key][0] for x in xs]
            ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, label=router)
        ax.set_xlabel("offered load (requests/s)")
        ax.set_ylabel(label)
        written.append(_save(fig, ax, out_dir, fname))
    for rate in rates:
        fig, ax = plt.subplots(figsize=(6, 4))
        for router in routers:
            samples = sorted(v for r in runs if r.router == router and r.rate == rate for v in r.ttft_ms)
            if samples:
                ax.plot(samples, np.arange(1, len(samples) + 1) / len(samples), label=router)
        ax.set_xscale("log")
        ax.set_xlabel("TTFT (ms, log)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"TTFT CDF at {rate:g} req/s offered")
        written.append(_save(fig, ax, out_dir, f"ttft_cdf_r{rate:g}.png"))
        if name := _over_time_plot(out_dir, routers, [r for r in runs if r.rate == rate], rate):
            written.append(name)
    return written


def over_time(runs: list[RunResult], windows: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """TTFT p90 by send time: the runs' send span cut into ``windows`` equal windows, and per window the p90 of
    the requests of every run sent in it (NaN where none was); (window midpoints in seconds, p90s in ms). Runs
    without send times are left out."""
    timed = [r for r in runs if r.sent_s and len(r.sent_s) == len(r.ttft_ms)]
    if not timed:
        return np.empty(0), np.empty(0)
    t, v = np.concatenate([r.sent_s for r in timed]), np.concatenate([r.ttft_ms for r in timed])
    edges = np.linspace(0.0, max(float(t.max()), 1e-9), windows + 1)
    which = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, windows - 1)
    p90 = np.array([np.percentile(v[which == k], 90) if (which == k).any() else np.nan for k in range(windows)])
    return (edges[:-1] + edges[1:]) / 2, p90


def _over_time_plot(out_dir: Path, routers: list[str], runs: list[RunResult], rate: float) -> str | None:
    """ttft_time_r<rate>.png: each router's TTFT p90 by send time, its repetitions pooled (``over_time``); None
    where no run has send times."""
    import matplotlib.pyplot as plt

    curves = {router: over_time([r for r in runs if r.router == router]) for router in routers}
    if not any(x.size for x, _ in curves.values()):
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for router, (x, p90) in curves.items():
        if x.size:
            ax.plot(x, p90, marker=".", label=router)
    ax.set_yscale("log")
    ax.set_xlabel("request sent at (s after the run's first)")
    ax.set_ylabel("TTFT p90 of the requests sent then (ms, log)")
    ax.set_title(f"TTFT over the run at {rate:g} req/s offered (repetitions pooled)")
    return _save(fig, ax, out_dir, f"ttft_time_r{rate:g}.png")


def _save(fig: Any, ax: Any, out_dir: Path, fname: str) -> str:
    """Grid, legend, ``out_dir/fname`` written and the figure closed; ``fname``."""
    import matplotlib.pyplot as plt

    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / fname, dpi=110)
    plt.close(fig)
    return fname


def render(results_path: Path, with_plots: bool = True) -> Path:
    """Write README.md (and plots) beside results.json; return the README path."""
    results_path = Path(results_path)
    out_dir = results_path.parent
    meta, runs, failures = load(results_path)
    images = plots(out_dir, meta, runs) if with_plots and runs else []
    m = meta.get("machine", {})
    versions = meta.get("versions", {})
    stats = meta.get("workload_stats", {})
    lines = [
        f"# kvswitch vs peers: {meta.get('workload', '?')} ({meta.get('date', '?')})",
        "",
        "Same simulated fleet (restarted before every run: cold caches), same trace per rate, same client.",
        "",
        "## Setup",
        f"- Workload: `{meta.get('workload')}` {json.dumps(meta.get('workload_params', {}))}",
        f"- Trace: {stats.get('requests', '?')} requests, mean input {stats.get('mean_input', 0):.0f} tokens, "
        f"mean output {stats.get('mean_output', 0):.0f} tokens, reusable prompt blocks "
        f"{100 * stats.get('reusable_block_share', 0):.0f}% (upper bound on the hit rate)",
        f"- Fleet: {meta.get('pods')} simulated pods ({meta.get('model_profile')} on {meta.get('accelerator')}"
        f"{', roles ' + ','.join(meta['roles']) if meta.get('roles') else ''}), time scale {meta.get('time_scale')}"
        " (wall seconds per simulated second; every rate, latency and throughput below is in simulated time)",
        f"- Offered loads (req/s): {', '.join(f'{r:g}' for r in meta.get('rates', []))}; repetitions: "
        f"{meta.get('repetitions')}; seed {meta.get('seed')}" + (
            f"; knee {meta['knee_req_s']:.2f} req/s (virtual-time probe: round robin offered the trace 20x faster "
            "on the same fleet model; the loads are multiples of it)" if meta.get("knee_req_s") else ""),
        f"- Client: {meta.get('client', 'aiperf')}",
        f"- Machine: {m.get('cpus')} CPUs, {m.get('cpu_model')}; {m.get('platform', '')}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- Command: `{meta.get('command', '')}`",
        "",
        "## Results",
        "Median over repetitions" + (" [min-max]" if (meta.get("repetitions") or 1) > 1 else "") +
        ". req/s and out tok/s are achieved throughput; ITL is each request's mean inter-token latency; hit "
        "rate is the fleet's prefix-cache hits / queries (tokens) during the run. pod TTFT is the pods' own mean TTFT "
        "(from arrival at the pod: queueing + prefill, what routing decides); path = client mean TTFT - pod mean "
        "TTFT, what the router, proxy and client add per request. cold prompts: requests that found less than half "
        "their prompt cached (from each response's usage), i.e. the prefix misses the placement cost. TTFT p90 late: "
        "the p90 of the requests sent in the second half of the run (the first seconds of a run find every cache "
        "cold; on a short run near the knee they hold most of the requests at or above the run's p90).",
        "",
        table(meta, runs),
        "",
    ]
    if images:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in images] + [""]
    if failures:
        lines += ["## Failed runs", ""]
        for f in failures:
            first = str(f.get("error", "")).strip().splitlines()[:1]
            lines.append(f"- {f.get('router')} rate={f.get('rate')} rep={f.get('repetition')}: "
                         f"{first[0] if first else ''}")
        lines.append("")
    notes = meta.get("notes") or []
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    path = out_dir / "README.md"
    path.write_text("\n".join(lines))
    return path
