"""Decision-path benchmark (on demand, not a test): decisions per second on one core and per-decision
latency with 8K-token prompts, 64 pods and a precise index of 10M blocks; index memory per million blocks;
KV-event ingestion rate; tokenization cost.

    .venv/bin/python -m e2e.bench.decisions [--blocks 10000000] [--pods 64] [--decisions 3000]
        [--tokenizer DIR] [--fresh-tails]

The default 512 prompts (64 shared 6K-token contexts + a 2K-token tail each) recur, so a tail is seen
again every 512 decisions; ``--fresh-tails`` gives every decision a new tail (the harder case for the
row table and approximate learning).

DESIGN.md budget: >= 3,000 decisions/s with 8K-token prompts and 64 pods.

``--slo-only`` (or ``--slo``, after the rest): the cost of SLO admission and the online correction per
decision, 100 pods (``--slo-pods``), every request with TTFT and TPOT targets, ``--slo-inflight`` requests
kept in flight (the predictive ledger holds them), each arm measured side by side with ``none``.

``--default-only``: the CPU time of one decision of the default profile (issue 16's serving path), at each
of ``--default-pods`` (aggregated pods), prompts of ``--default-prompt-tokens`` from 32 shared contexts,
``--default-inflight`` requests per pod kept in flight and a scrape of every pod every 50 decisions; with
``--default-slo`` every request carries TTFT/TPOT targets and admission is ``predictive``; with
``--no-explain`` (also for ``--slo-only``) no explanation is built (the server's setting unless a client
asks for one). Per decision: CPU p50/p99 (``time.process_time``) and wall p50/p99. Decisions are
deterministic (seeded), so two commits run with the same arguments make the same decisions;
``--default-digest`` prints a digest of the chosen endpoints to show it.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import time

import numpy as np
from prometheus_client import CollectorRegistry

from engine.kvcache.hashing import hash_blocks
from pickers.clock import ManualClock
from pickers.config import build_scheduler
from pickers.datalayer import PodMetrics
from pickers.types import Endpoint, InferenceRequest, Usage

BS = 16


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(profile: str, pods: int, max_blocks: int):
    eps = [Endpoint(f"10.1.{i // 250}.{i % 250}:8000", kv_events=f"tcp://10.1.0.{i}:5557") for i in range(pods)]
    clock = ManualClock(0.0)
    s = build_scheduler({"profile": profile, "prefix": {"precise": {"max_blocks": max_blocks}}}, eps, clock,
                        network=False, registry=CollectorRegistry())
    return s, clock, eps


def feed_metrics(s, eps, rng: random.Random) -> None:
    for e in eps:
        s.dl.metrics.update(e.address, PodMetrics(waiting=rng.randint(0, 4), running=rng.randint(0, 64),
                                                        kv_usage=rng.random() * 0.7))


def fill_index(s, pods: int, blocks: int, prefixes: list[np.ndarray], rng: np.random.Generator) -> float:
    """Shared prefixes on a few pods each (so decisions find real hits), then filler up to ``blocks``."""
    ix = s.dl.kv_index.index
    t0 = time.perf_counter()
    for p in prefixes:
        h = hash_blocks(p, BS)
        for pod in rng.choice(pods, size=4, replace=False).tolist():
            ix.add(pod, h)
    chunk = 512
    while len(ix) < blocks:
        n = min(chunk, blocks - len(ix))
        hs = rng.integers(1, 2**63, size=n, dtype=np.int64).tolist()
        ix.add(int(rng.integers(pods)), hs)
    return time.perf_counter() - t0


def bench_events(n_blocks: int) -> tuple[float, float]:
    """Blocks per second through apply_events (map form, 32 blocks per BlockStored), bytes per block
    including the engine-hash map."""
    s, clock, eps = build("precise", 8, n_blocks * 2)
    kv = s.dl.kv_index
    rng = np.random.default_rng(1)
    per = 32
    batches = []
    eh = 1
    for i in range(n_blocks // per):
        toks = rng.integers(0, 32000, size=per * BS).tolist()
        batches.append((eps[i % 8].address, {"type": "BlockStored", "block_hashes": list(range(eh, eh + per)),
                                              "parent_block_hash": None, "token_ids": toks, "block_size": BS,
                                              "lora_id": None, "medium": "GPU"}))
        eh += per
    gc.collect()
    r0 = rss()
    t0 = time.perf_counter()
    for addr, ev in batches:
        kv.apply_events(addr, [ev])
    dt = time.perf_counter() - t0
    del batches
    gc.collect()
    return n_blocks / dt, (rss() - r0) / n_blocks


def run_decisions(s, clock, prompts: list[list[int]], n: int, text: bool = False, fresh=None
                  ) -> tuple[float, np.ndarray]:
    """``fresh``: a generator; when given, each prompt gets a new unique tail (made outside the timing)."""
    lat = np.zeros(n)
    cpu = 0.0
    for i in range(n):
        p = prompts[i % len(prompts)]
        if fresh is not None:
            p = np.concatenate([p[: p.size * 3 // 4], fresh.integers(0, 32000, size=p.size - p.size * 3 // 4,
                                                                      dtype=np.uint32)])
        if text:
            req = InferenceRequest(request_id=f"r{i}", model="m", prompt=p)
        else:
            req = InferenceRequest(request_id=f"r{i}", model="m", prompt_token_ids=p)
        c0 = time.process_time()
        t0 = time.perf_counter()
        d = s.decide(req)
        lat[i] = time.perf_counter() - t0
        cpu += time.process_time() - c0
        clock.advance(0.0003)
        s.on_first_token(d, clock.now())
        s.on_finished(d, Usage(), clock.now())
    # decisions per CPU-second of this process: on a shared machine wall time includes waiting for a core
    return n / cpu, lat * 1e6


def bench_slo(pods: int, decisions: int, inflight: int, prompt_tokens: int, explain: bool = True) -> None:
    """Per-decision latency of the default profile with each admission arm (targets on every request),
    interleaved in rounds so machine load hits every arm alike; the predictive ledger holds ``inflight``
    requests and the correction has observations for every kind of pod."""
    from collections import deque

    arms = ("none", "early", "predictive", "stage-saturation")
    nrng = np.random.default_rng(3)
    rng = random.Random(3)
    prompts = [nrng.integers(0, 32000, size=prompt_tokens, dtype=np.uint32) for _ in range(256)]
    kinds = ("H100", "A100")
    eps = [Endpoint(f"10.2.{i // 250}.{i % 250}:8000", role="prefill" if i < pods // 4 else "decode",
                    accelerator=kinds[i % 2]) for i in range(pods)]
    built = {}
    for arm in arms:
        clock = ManualClock(0.0)
        s = build_scheduler({"profile": "load-only", "handler": {"type": "prefill-decode"}, "admission": [arm],
                             "slo": {"ttft_ms": 60_000, "tpot_ms": 1000}}, eps, clock, network=False,
                            registry=CollectorRegistry())
        s.explain = explain
        feed_metrics(s, eps, rng)
        built[arm] = (s, clock, deque())
    lat: dict[str, list[float]] = {a: [] for a in arms}
    cpu: dict[str, float] = {a: 0.0 for a in arms}
    cpus: dict[str, list[float]] = {a: [] for a in arms}  # CPU seconds of each decision
    rounds = max(1, decisions // 100)
    for rnd in range(rounds + 2):  # two warm-up rounds
        for arm in arms:
            s, clock, live = built[arm]
            for i in range(100):
                req = InferenceRequest(request_id=f"{arm}-{rnd}-{i}", model="m",
                                       prompt_token_ids=prompts[(rnd * 100 + i) % len(prompts)], max_tokens=200)
                c0 = time.process_time()
                t0 = time.perf_counter()
                d = s.decide(req)
                dt = time.perf_counter() - t0
                dc = time.process_time() - c0
                if rnd >= 2:
                    lat[arm].append(dt)
                    cpu[arm] += dc
                    cpus[arm].append(dc)
                clock.advance(0.001)
                live.append(d)
                if len(live) > inflight:  # the oldest ends: first token and end feed the correction
                    old = live.popleft()
                    s.on_first_token(old, clock.now())
                    s.on_finished(old, Usage(prompt_tokens, 200), clock.now() + 0.01)
    base = np.percentile(np.array(lat["none"]) * 1e6, 99)
    base_cpu = cpu["none"] / len(lat["none"]) * 1e6
    print(f"== SLO admission: {pods} pods (P/D, two accelerator kinds), {prompt_tokens}-token prompts, "
          f"{inflight} in flight{'' if explain else ', no explanation'}, load {os.getloadavg()[0]:.1f}")
    for arm in arms:
        v = np.array(lat[arm]) * 1e6
        ledger = getattr(built[arm][0].admission[0], "ledger", None)
        extra = f"  ledger {len(ledger.row_of)} rows" if ledger is not None else ""
        c = cpu[arm] / len(lat[arm]) * 1e6
        print(f"{arm:>17}: wall p50 {np.percentile(v, 50):6.0f} us  p99 {np.percentile(v, 99):6.0f} us  "
              f"(p99 - none p99: {np.percentile(v, 99) - base:+6.0f} us); CPU {c:5.0f} us/decision "
              f"({c - base_cpu:+5.0f} us vs none), CPU p50 {np.percentile(cpus[arm], 50) * 1e6:5.0f} us "
              f"p99 {np.percentile(cpus[arm], 99) * 1e6:5.0f} us{extra}")


def bench_default(pods: int, decisions: int, prompt_tokens: int, inflight_per_pod: int, slo: bool,
                  digest: bool, explain: bool = True) -> None:
    """CPU per decision of the default profile (see the module docstring)."""
    import hashlib
    from collections import deque

    nrng = np.random.default_rng(5)
    rng = random.Random(5)
    shared = prompt_tokens * 3 // 4
    groups = [nrng.integers(0, 32000, size=shared, dtype=np.uint32) for _ in range(32)]
    prompts = [np.concatenate([groups[i % 32], nrng.integers(0, 32000, size=prompt_tokens - shared,
                                                               dtype=np.uint32)]) for i in range(512)]
    eps = [Endpoint(f"10.3.{i // 250}.{i % 250}:8000") for i in range(pods)]
    clock = ManualClock(0.0)
    cfg: dict = {"profile": "default"}
    if slo:
        cfg |= {"admission": ["predictive"], "slo": {"ttft_ms": 60_000, "tpot_ms": 1000}}
    s = build_scheduler(cfg, eps, clock, network=False, registry=CollectorRegistry())
    s.explain = explain  # the server turns it off unless a client asks for the explanation header
    live: deque = deque()
    keep = max(1, inflight_per_pod * pods)
    warm = min(500, decisions // 4)
    cpu = np.zeros(decisions)
    wall = np.zeros(decisions)
    h = hashlib.sha256()
    for i in range(warm + decisions):
        if i % 50 == 0:
            feed_metrics(s, eps, rng)
        req = InferenceRequest(request_id=f"d{i}", model="m", prompt_token_ids=prompts[i % len(prompts)],
                               max_tokens=200)
        c0 = time.process_time()
        t0 = time.perf_counter()
        d = s.decide(req)
        t1 = time.perf_counter()
        c1 = time.process_time()
        if i >= warm:
            cpu[i - warm] = c1 - c0
            wall[i - warm] = t1 - t0
        h.update(f"{d.primary}|{','.join(d.endpoints)}\n".encode())
        clock.advance(0.002)
        live.append(d)
        if len(live) > keep:
            old = live.popleft()
            s.on_first_token(old, clock.now())
            s.on_finished(old, Usage(prompt_tokens, 200), clock.now())
    c, w = cpu * 1e6, wall * 1e6
    name = f"default{'+slo/predictive' if slo else ''}{'' if explain else ' (no explain)'}"
    print(f"{name} {pods:>4} pods, {prompt_tokens}-token prompts, "
          f"{keep} in flight: CPU p50 {np.percentile(c, 50):6.0f} us  p99 {np.percentile(c, 99):6.0f} us  "
          f"mean {c.mean():6.0f} us;  wall p50 {np.percentile(w, 50):6.0f} us  p99 {np.percentile(w, 99):6.0f} us"
          f"  (load {os.getloadavg()[0]:.1f})" + (f"  digest {h.hexdigest()[:16]}" if digest else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=10_000_000)
    ap.add_argument("--pods", type=int, default=64)
    ap.add_argument("--decisions", type=int, default=3000)
    ap.add_argument("--prompt-tokens", type=int, default=8192)
    ap.add_argument("--event-blocks", type=int, default=200_000)
    ap.add_argument("--tokenizer", default=None, help="folder with tokenizer.json to time a real tokenizer")
    ap.add_argument("--profiles", default="default,precise,approximate,load-only,round-robin")
    ap.add_argument("--fresh-tails", action="store_true",
                    help="a new unique 2K-token tail for every decision (default: 512 prompts that recur)")
    ap.add_argument("--slo", action="store_true", help="also time SLO admission (see the module docstring)")
    ap.add_argument("--slo-only", action="store_true", help="only time SLO admission")
    ap.add_argument("--slo-pods", type=int, default=100)
    ap.add_argument("--slo-inflight", type=int, default=2000)
    ap.add_argument("--default-only", action="store_true", help="only time the default profile's decision")
    ap.add_argument("--default-pods", default="4,100")
    ap.add_argument("--default-prompt-tokens", type=int, default=1024)
    ap.add_argument("--default-inflight", type=int, default=8, help="requests in flight per pod")
    ap.add_argument("--default-slo", action="store_true", help="TTFT/TPOT targets and predictive admission")
    ap.add_argument("--no-explain", action="store_true",
                    help="--default-only and --slo-only: no per-endpoint explanation (the server's setting when "
                         "no client asks for one)")
    ap.add_argument("--default-digest", action="store_true", help="print a digest of the decisions made")
    a = ap.parse_args(argv)
    if a.default_only:
        for pods in (int(x) for x in a.default_pods.split(",")):
            bench_default(pods, a.decisions, a.default_prompt_tokens, a.default_inflight, a.default_slo,
                          a.default_digest, not a.no_explain)
        return 0
    if a.slo_only:
        bench_slo(a.slo_pods, a.decisions, a.slo_inflight, 2048, not a.no_explain)
        return 0
    rng = random.Random(7)
    nrng = np.random.default_rng(7)

    # prompts: 8K tokens = a 6K-token shared context (one of 64) + 2K unique tokens
    shared_len = a.prompt_tokens * 3 // 4
    prefixes = [nrng.integers(0, 32000, size=shared_len, dtype=np.uint32) for _ in range(64)]
    prompts = [np.concatenate([prefixes[i % 64], nrng.integers(0, 32000, size=a.prompt_tokens - shared_len,
                                                               dtype=np.uint32)])
               for i in range(512)]

    print(f"== precise index: {a.blocks:,} blocks over {a.pods} pods")
    gc.collect()
    r0 = rss()
    s, clock, eps = build("default", a.pods, a.blocks)
    fill_s = fill_index(s, a.pods, a.blocks, prefixes, nrng)
    gc.collect()
    ix = s.dl.kv_index.index
    used = rss() - r0
    print(f"filled in {fill_s:.1f} s ({len(ix) / fill_s / 1e6:.2f} M blocks/s direct add); RSS +{used / 2**20:.0f} MiB"
          f" = {used / len(ix):.0f} B/block = {used / len(ix) * 1e6 / 2**20:.0f} MiB per million blocks"
          f" (index estimate {ix.nbytes() / len(ix):.0f} B/block)")

    gc.freeze()  # the index's millions of objects stay out of the collector's way (serve should do this too)
    ev_rate, ev_bytes = bench_events(a.event_blocks)
    print(f"KV events: {ev_rate / 1e3:.0f} K blocks/s through apply_events (32-block BlockStored, hashing "
          f"included); {ev_bytes:.0f} B/block with the engine-hash map")

    print(f"== decisions: {a.prompt_tokens}-token prompts (prompt_token_ids as uint32 arrays), {a.pods} pods, one core")
    for prof in a.profiles.split(","):
        s.profile = prof
        s.needs_tokens = s.profiles[prof].needs_tokens
        feed_metrics(s, eps, rng)
        fresh = np.random.default_rng(11) if a.fresh_tails else None
        run_decisions(s, clock, prompts, 200, fresh=fresh)  # warm up
        feed_metrics(s, eps, rng)
        rate, lat = run_decisions(s, clock, prompts, a.decisions, fresh=fresh)
        print(f"{prof:>12}: {rate:8,.0f} decisions/s  p50 {np.percentile(lat, 50):6.0f} us  "
              f"p99 {np.percentile(lat, 99):6.0f} us  max {lat.max():6.0f} us")

    s.profile = "default"
    s.needs_tokens = True
    feed_metrics(s, eps, rng)
    texts = ["".join(chr(97 + (int(t) % 26)) for t in p) * 4 for p in prompts[:64]]
    rate, lat = run_decisions(s, clock, texts, min(a.decisions, 1000), text=True)
    lists = [p.tolist() for p in prompts[:64]]
    rate_l, lat_l = run_decisions(s, clock, lists, min(a.decisions, 1000))
    print(f"{'default+text':>12}: {rate:8,.0f} decisions/s  p50 {np.percentile(lat, 50):6.0f} us  "
          f"p99 {np.percentile(lat, 99):6.0f} us  (builtin tokenizer, {len(texts[0]):,}-char prompts)")
    print(f"{'default+list':>12}: {rate_l:8,.0f} decisions/s  p50 {np.percentile(lat_l, 50):6.0f} us  "
          f"p99 {np.percentile(lat_l, 99):6.0f} us  (prompt_token_ids as a Python list)")

    print("== tokenization (per prompt)")
    from engine.tokens.tokenizer import BuiltinTokenizer

    t0 = time.perf_counter()
    for t in texts:
        BuiltinTokenizer().encode_array(t)
    print(f"builtin: {(time.perf_counter() - t0) / len(texts) * 1e6:.0f} us for {len(texts[0]):,} chars")
    t0 = time.perf_counter()
    for p in prompts[:64]:
        hash_blocks(p, BS)
    print(f"block hashing: {(time.perf_counter() - t0) / 64 * 1e6:.0f} us per {a.prompt_tokens}-token prompt "
          f"(block size {BS}, uint32 array)")
    if a.tokenizer:
        from engine.tokens.tokenizer import HFTokenizer
        from pickers.tokenize import TokenService

        hf = HFTokenizer(a.tokenizer)
        words = " ".join(f"word{i % 977} token{i % 131}" for i in range(a.prompt_tokens // 2))
        ts = TokenService(hf)
        t0 = time.perf_counter()
        n = 20
        for i in range(n):
            ids = hf.encode(f"{i} " + words)
        dt = (time.perf_counter() - t0) / n
        t0 = time.perf_counter()
        for _ in range(200):
            ts.tokens_sync(InferenceRequest(request_id="x", model="m", prompt=words))
        ct = (time.perf_counter() - t0) / 200
        print(f"HF tokenizer ({a.tokenizer}): {dt * 1e3:.2f} ms for {len(words):,} chars -> {len(ids):,} tokens;"
              f" cached (same text): {ct * 1e6:.0f} us")
    if a.slo:
        bench_slo(a.slo_pods, a.decisions, a.slo_inflight, 2048, not a.no_explain)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
