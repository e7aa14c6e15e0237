"""Per-block work of one big prompt through the picker (on demand, not a test): parse, tokenize, block hashes,
the prefix indexes' lookup and the commit of the prompt's blocks (approximate learning + pending blocks), for a
chat body of ``--kb`` KB, default profile, ``--pods`` pods, in process (no gRPC, no Envoy).

    .venv/bin/python -m pickers.kvblocks.bench [--kb 200] [--pods 4] [--n 200]

Two shapes: ``repeat`` sends the same body every time (a resent conversation: hash memo and index hits) and
``fresh`` a body whose last quarter is new every time (a conversation's next turn: new blocks to hash, index
and pend); after each decision the chosen pod announces the blocks it did not hold (one BlockStored, applied
to the precise index). Prints CPU (``time.process_time``) per request and phase, median over ``--n`` requests; compare
code versions by running this file against each tree (PYTHONPATH) side by side, alternating.
"""

from __future__ import annotations

import argparse
import os
import random
import time

import numpy as np
from prometheus_client import CollectorRegistry

from engine.kvcache.events import BlockStored
from engine.kvcache.hashing import MAX_ROUTED_BLOCKS, hash_blocks
from extproc.parse import parse_client_body
from pickers.clock import ManualClock
from pickers.config import build_scheduler
from pickers.datalayer import PodMetrics
from pickers.types import Endpoint, InferenceRequest, Usage


def _body(kb: int, rng: random.Random, fresh_tail: str) -> bytes:
    """A chat body of about ``kb`` KB: a system prompt, a long user history and ``fresh_tail`` at the end."""
    words = [f"w{rng.randrange(50_000)}" for _ in range(kb * 1024 // 6)]
    head = " ".join(words)
    cut = len(head) * 3 // 4
    import orjson

    return orjson.dumps({"model": "m", "max_tokens": 64, "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": head[:cut] + fresh_tail[: len(head) - cut]},
    ]})


def _stored(held: set[int], ids: np.ndarray) -> BlockStored | None:
    """The BlockStored a pod sends after computing the prompt ``ids``: its full blocks from the first it did not
    hold (engine hashes = our chained hashes here; the index re-hashes the token ids either way)."""
    hs = hash_blocks(ids, 16, limit=MAX_ROUTED_BLOCKS)
    k = next((i for i, h in enumerate(hs) if h not in held), len(hs))
    if k == len(hs):
        return None
    held.update(hs[k:])
    return BlockStored(hs[k:], hs[k - 1] if k else None, ids[k * 16 : len(hs) * 16], 16)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kb", type=int, default=200)
    ap.add_argument("--pods", type=int, default=4)
    ap.add_argument("--n", type=int, default=200)
    a = ap.parse_args(argv)
    eps = [Endpoint(f"10.1.0.{i}:8000", kv_events=f"tcp://10.1.0.{i}:5557") for i in range(a.pods)]
    clock = ManualClock(0.0)
    s = build_scheduler({"profile": "default"}, eps, clock, network=False, registry=CollectorRegistry())
    rng = random.Random(7)
    for e in eps:
        s.dl.metrics.update(e.address, PodMetrics(waiting=0, running=rng.randint(0, 8), kv_usage=0.3))
    tails = ["".join(f"t{rng.randrange(10**6)} " for _ in range(a.kb * 1024 // 28)) for _ in range(a.n)]
    repeat = _body(a.kb, random.Random(1), tails[0])
    print(f"pid {os.getpid()}: {len(repeat) / 1024:.0f} KB chat body, {a.pods} pods, default profile; "
          f"{os.uptime() if hasattr(os, 'uptime') else ''}")
    stored: dict[str, set[int]] = {}  # per pod: the engine hashes it announced (the bench's own bookkeeping)

    def ids_of(req: InferenceRequest) -> np.ndarray:
        return s.dl.tokens.tokens_sync(req)

    for shape in ("repeat", "fresh"):
        bodies = [repeat] * a.n if shape == "repeat" else [_body(a.kb, random.Random(1), t) for t in tails]
        phases: dict[str, list[float]] = {k: [] for k in ("parse", "decide", "finish", "total", "hash",
                                                          "tokens", "blocks")}
        for i, body in enumerate(bodies):
            t0 = time.process_time()
            req = parse_client_body(body, "/v1/chat/completions", f"{shape}{i}").request
            t1 = time.process_time()
            d = s.decide(req)
            t2 = time.process_time()
            clock.advance(0.5)
            ev = _stored(stored.setdefault(d.primary, set()), ids_of(req))  # what the pod announces
            t2e = time.process_time()
            if ev is not None:
                s.dl.kv_index.apply_events(d.primary, [ev], clock.now())
            s.on_first_token(d, clock.now())
            s.on_finished(d, Usage(), clock.now())
            t3 = time.process_time()
            own = t2e - t2  # the bench's bookkeeping (_stored), not the picker's work
            ids = s.dl.tokens.tokens_sync(req)  # the decision's own steps, again, timed alone
            t4 = time.process_time()
            hs = hash_blocks(ids, 16, limit=MAX_ROUTED_BLOCKS)
            t5 = time.process_time()
            phases["parse"].append(t1 - t0)
            phases["decide"].append(t2 - t1)
            phases["finish"].append(t3 - t2 - own)
            phases["total"].append(t3 - t0 - own)
            phases["tokens"].append(t4 - t3)
            phases["hash"].append(t5 - t4)
            phases["blocks"].append(len(hs))
        med = {k: float(np.median(v[a.n // 10:])) for k, v in phases.items()}  # skip the first tenth (warm-up)
        print(f"{shape:>6}: total {med['total'] * 1e3:6.2f} ms CPU = parse {med['parse'] * 1e3:.2f} + decide "
              f"{med['decide'] * 1e3:.2f} + events, first token, finish {med['finish'] * 1e3:.2f}; the decision's "
              f"tokenize {med['tokens'] * 1e3:.2f}, hash {med['hash'] * 1e3:.2f} ({med['blocks']:.0f} blocks)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
