"""Router cost at long prompts: CPU seconds per request, the figure DESIGN.md budgets at 0.1 core per req/s.

    .venv/bin/python -m e2e.bench.router_cost [--pods 100] [--tokens 100000] [--conversations 8]
        [--requests 48] [--profiles precise,default]

A request here is what the picker does for one long multi-turn request, end to end in one process: the
director's ``route`` (the OpenAI body's prompt through a real Hugging Face BPE tokenizer, made at run time by
e2e/bench/tokenizer.py, off the event loop; block hashes; prefix match over 100 pods; the prediction; the
bookkeeping), the KV events the chosen pod then publishes for the new blocks (decoded, re-hashed from their
token ids and indexed, as the precise index does for every pod), first token and finish. Conversations grow
turn by turn (each request extends the previous one's text by ``--turn-tokens``) from ``--tokens`` minus the
turns; requests of different conversations interleave. CPU time is the process's (all threads: the worker
threads that tokenize count). Printed per profile: CPU ms per request and its split, i.e. cores per request/s.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

from prometheus_client import CollectorRegistry

from e2e.bench.tokenizer import ensure_tokenizer
from engine.kvcache.events import BlockStored
from pickers.clock import ManualClock
from pickers.config import build_scheduler
from pickers.datalayer import PodMetrics
from pickers.types import Endpoint, InferenceRequest, Usage

BUDGET_CORES_PER_RPS = 0.1  # DESIGN.md: at most 0.1 CPU core per request/s (llm-d's picker: 0.5-1)


def _words(rng: random.Random, n_words: int) -> str:
    vocab = [f"{a}{b}" for a in ("data", "route", "cache", "token", "pod", "gpu", "queue", "block")
             for b in ("", "s", "ing", "ed", "er", "ly")]
    return " ".join(rng.choice(vocab) + str(rng.randint(0, 99)) for _ in range(n_words))


async def run(profile: str, pods: int, tokens: int, conversations: int, requests: int, turn_tokens: int,
              tokenizer_dir: str) -> tuple[float, float, float, int, str]:
    """(CPU s per request, of which routing, of which KV-event ingestion, mean prompt tokens, prefix reuse)."""
    eps = [Endpoint(f"10.2.{i // 250}.{i % 250}:8000", kv_events=f"tcp://10.2.0.{i}:5557", block_size=16)
           for i in range(pods)]
    clock = ManualClock(1000.0)
    director = build_scheduler({"profile": profile, "tokenizer": {"path": f"{tokenizer_dir}/tokenizer.json"}},
                               eps, clock, network=False, registry=CollectorRegistry())
    dl = director.dl
    rng = random.Random(3)
    for e in eps:
        dl.metrics.update(e.address, PodMetrics(waiting=rng.randint(0, 3), running=rng.randint(0, 48),
                                                kv_usage=0.4), clock.now())
    tok = dl.tokens.tokenizer
    sample = _words(rng, 2000)
    tokens_per_word = len(tok.encode(sample)) / 2000
    turns = max(1, requests // conversations)
    start_words = int((tokens - turns * turn_tokens) / tokens_per_word)
    texts = [f"Conversation {c}. " + _words(rng, start_words) for c in range(conversations)]
    cpu_route = cpu_events = 0.0
    prompt_tokens = 0
    n = 0
    engine_hash = 1
    t_all = time.process_time()
    for _ in range(turns):
        for c in range(conversations):
            texts[c] += " " + _words(rng, int(turn_tokens / tokens_per_word))
            req = InferenceRequest(request_id=f"r{n}", model="m", prompt=texts[c], body_size=len(texts[c]))
            t0 = time.process_time()
            d = await director.route(req)
            t1 = time.process_time()
            ids = d.state.tokens
            assert ids is not None
            prompt_tokens += int(ids.size)
            # the chosen pod stores the prompt's full blocks and publishes them, as vLLM does
            full = int(ids.size) // 16 * 16
            hashes = list(range(engine_hash, engine_hash + full // 16))
            engine_hash += len(hashes)
            dl.kv_index.apply_events(d.primary, [BlockStored(hashes, None, ids[:full].tolist(), 16)], clock.now())
            director.on_first_token(d, clock.now())
            director.on_finished(d, Usage(int(ids.size), 1, 0), clock.now())
            t2 = time.process_time()
            cpu_route += t1 - t0
            cpu_events += t2 - t1
            clock.advance(0.05)
            n += 1
    total = time.process_time() - t_all
    prefix = dl.tokens.prefix
    reuse = f"{prefix.reused} of {prefix.reused + prefix.full}" if prefix is not None else "n/a"
    return total / n, cpu_route / n, cpu_events / n, prompt_tokens // n, reuse


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m e2e.bench.router_cost", description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=100_000, help="prompt length at the last turn")
    ap.add_argument("--turn-tokens", type=int, default=1000, help="tokens each turn adds")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--profiles", default="precise,default")
    a = ap.parse_args(argv)
    tokenizer_dir = str(ensure_tokenizer())
    print(f"router cost: {a.pods} pods, multi-turn prompts growing to ~{a.tokens:,} tokens, HF BPE tokenizer "
          f"({tokenizer_dir}), {a.requests} requests per profile", flush=True)
    for profile in a.profiles.split(","):
        per, route, events, mean_tokens, reuse = asyncio.run(
            run(profile, a.pods, a.tokens, a.conversations, a.requests, a.turn_tokens, tokenizer_dir))
        print(f"{profile:>10}: {per * 1e3:7.1f} CPU ms/request (route {route * 1e3:.1f}, KV events "
              f"{events * 1e3:.1f}); mean prompt {mean_tokens:,} tokens, prefix ids reused {reuse}; "
              f"{per:.3f} cores per request/s "
              f"= {per / BUDGET_CORES_PER_RPS:.2f}x the {BUDGET_CORES_PER_RPS} budget", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
