"""The demo's summary: client-side latencies, the pods' prefix-cache counters, where requests went, and
what the picker counted (its Prometheus metrics), as plain text a person reads in a terminal.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from extproc.localstack.stack import LocalStack
from extproc.localstack.workload import Workload

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(session: aiohttp.ClientSession, url: str) -> Samples:
    """Every sample at ``url`` keyed by (name, sorted labels); empty when unreachable."""
    try:
        async with session.get(url) as r:
            text = await r.text()
    except (TimeoutError, aiohttp.ClientError):
        return {}
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, lab), v in samples.items():
        if n == name:
            key = dict(lab).get(label, "")
            out[key] = out.get(key, 0.0) + v
    return out


@dataclass
class Snapshot:
    """Counters before or after the workload (the summary reports differences)."""

    pods: dict[str, Samples]
    picker: Samples


async def snapshot(stack: LocalStack) -> Snapshot:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        pods = {p.name: await scrape(s, p.metrics_url) for p in stack.pods}
        picker = await scrape(s, stack.picker_metrics_url) if stack.picker_metrics_url else {}
    return Snapshot(pods, picker)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:,.0f} ms"


def _bar(share: float, width: int = 30) -> str:
    full = share * width
    return "█" * int(full) + ("▌" if full - int(full) >= 0.5 else "")


def summarize(stack: LocalStack, wl: Workload, before: Snapshot, after: Snapshot) -> str:
    spec, res = wl.spec, wl.results
    ok = [r for r in res if r.error is None]
    errors = [r for r in res if r.error is not None]
    o = stack.options
    lines = [
        "",
        "== workload ==",
        f"  {len(res)} requests ({sum(r.api == 'completions' for r in res)} completions, "
        f"{sum(r.api == 'chat' for r in res)} chat, all streamed) from {spec.groups} groups, each sharing a "
        f"~{spec.system_tokens:,}-token system prompt",
        f"  Poisson arrivals at {spec.rate:g} req/s, at most {spec.concurrency} in flight; "
        f"{len(stack.pods)} pods ({o.model_profile} on {o.accelerator}), time scale {o.time_scale:g}",
        f"  wall {wl.wall_s:.1f} s, errors {len(errors)}",
    ]
    for r in errors[:5]:
        lines.append(f"    #{r.index} {r.api}: {r.error}")
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    lines += [
        "",
        "== latency (client side, through Envoy) ==",
        f"  TTFT  p50 {_ms(_pct(ttft, 0.5)):>9}   p90 {_ms(_pct(ttft, 0.9)):>9}",
        f"  e2e   p50 {_ms(_pct(e2e, 0.5)):>9}   p90 {_ms(_pct(e2e, 0.9)):>9}",
    ]
    cached = [r for r in ok if r.cached_tokens is not None and r.prompt_tokens]
    if cached:
        warm = [r.ttft_s for r in cached if r.cached_tokens and r.ttft_s is not None]
        cold = [r.ttft_s for r in cached if not r.cached_tokens and r.ttft_s is not None]
        lines.append(f"  TTFT p50 with a prefix hit {_ms(_pct(warm, 0.5))} ({len(warm)} requests), "
                     f"without {_ms(_pct(cold, 0.5))} ({len(cold)})")

    hits = sum(total(after.pods[n], "vllm:prefix_cache_hits_total")
               - total(before.pods[n], "vllm:prefix_cache_hits_total")
               for n in after.pods)
    queries = sum(total(after.pods[n], "vllm:prefix_cache_queries_total")
                  - total(before.pods[n], "vllm:prefix_cache_queries_total") for n in after.pods)
    lines += ["", "== prefix cache (pods' vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total) =="]
    if queries > 0:
        lines.append(f"  hit rate {hits / queries:6.1%}  ({hits:,.0f} of {queries:,.0f} prompt tokens came from cache)")
    else:
        lines.append("  no prefix-cache queries counted")

    lines += ["", "== requests per pod (x-kvswitch-endpoint) =="]
    counts = Counter(r.endpoint for r in ok)
    names = {p.address: p.name for p in stack.pods}
    width = max([len(p.name) for p in stack.pods] + [8])
    for p in stack.pods:
        if p.role == "prefill":
            continue
        n = counts.get(p.address, 0)
        share = n / len(ok) if ok else 0.0
        lines.append(f"  {p.name:<{width}} {p.address:<21} {n:>5} {share:6.1%}  {_bar(share)}")
    unknown = sum(n for a, n in counts.items() if a not in names)
    if unknown:
        lines.append(f"  {'(other)':<{width}} {'':<21} {unknown:>5}  header missing or unknown address")
    prefilled = Counter(r.prefill_endpoint for r in ok if r.prefill_endpoint)
    if any(p.role == "prefill" for p in stack.pods):
        legs = ", ".join(f"{names.get(a, a)} {n}" for a, n in prefilled.most_common()) or "none"
        lines.append(f"  prefill legs (x-kvswitch-prefill-endpoint): {legs}")
    by_group: dict[int, Counter] = {}
    for r in ok:
        by_group.setdefault(r.group, Counter())[r.endpoint] += 1
    if by_group:
        sticky = sum(c.most_common(1)[0][1] for c in by_group.values())
        lines.append(f"  group affinity: {sticky / len(ok):.0%} of requests went to their group's most used pod "
                     f"({len(by_group)} groups)")

    lines += ["", f"== picker ({stack.picker_metrics_url or 'metrics off'}) =="]
    if after.picker:
        def delta(name: str, label: str) -> dict[str, float]:
            a, b = by_label(after.picker, name, label), by_label(before.picker, name, label)
            return {k: v - b.get(k, 0.0) for k, v in a.items() if v - b.get(k, 0.0) > 0}

        results = delta("kvswitch_decisions_total", "result")
        profiles = delta("kvswitch_scheduler_decisions_total", "profile")
        rejected = delta("kvswitch_scheduler_rejections_total", "code")
        errs = delta("kvswitch_errors_total", "reason")
        decisions = (total(after.picker, "kvswitch_decision_seconds_count")
                     - total(before.picker, "kvswitch_decision_seconds_count"))
        secs = (total(after.picker, "kvswitch_decision_seconds_sum")
                - total(before.picker, "kvswitch_decision_seconds_sum"))

        def fmt(d: dict[str, float]) -> str:
            return ", ".join(f"{k} {v:,.0f}" for k, v in sorted(d.items())) or "none"

        lines.append(f"  decisions     {fmt(results)}")
        handler = f"  (P/D handler {stack.pd_handler})" if stack.pd_handler else ""
        lines.append(f"  by profile    {fmt(profiles)}{handler}")
        lines.append(f"  rejections    {fmt(rejected)}")
        lines.append(f"  errors        {fmt(errs)}")
        if decisions > 0:
            lines.append(f"  decision time mean {secs / decisions * 1000:.2f} ms (body parsed + scheduled, "
                         f"{decisions:,.0f} decisions)")
    else:
        lines.append("  (picker metrics unavailable)")
    for note in stack.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)
