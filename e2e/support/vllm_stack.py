"""kvswitch (the director, precise prefix index) + real Envoy in front of the real-vLLM pair, for
end-to-end routing tests, and the small tools those tests need: fresh long prompts, direct requests to one
pod, waiting for the picker's index, and re-deriving our block hashes from vLLM's own ``BlockStored``.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from e2e.support.envoy import EnvoyProcess
from e2e.support.picker import picker_config, running_picker
from e2e.support.stack import RecordingScheduler
from e2e.vllmcpu.capture import metric_value
from e2e.vllmcpu.kvevents import KvEventCollector
from engine.kvcache.hashing import ROOT_HASH, hash_blocks
from extproc.envoyconfig.builder import EnvoyConfigOptions
from extproc.server import Server
from pickers.config import build_scheduler
from pickers.director import Director
from pickers.types import Decision, Endpoint, InferenceRequest, Role

# The metrics scraper's interval against real vLLM: /metrics is not free on 2 shared cores.
SCRAPE_MS = 250


def pair_endpoints(pair) -> list[Endpoint]:
    """A and B as the picker sees them: decode pods with their KV-event publisher and real block size."""
    return [Endpoint(address=s.address, role=Role.DECODE, model=pair.model_name, kv_events=s.kv_events_endpoint,
                     block_size=pair.block_size) for s in pair.servers]


def precise_scheduler(pair, profile: str = "precise") -> Director:
    """One kvswitch replica's scheduler over the pair (own metrics registry, so replicas do not collide)."""
    raw = {"profile": profile, "tokenizer": {"path": str(pair.tokenizer_path / "tokenizer.json")},
           "datalayer": {"scrape_interval_ms": SCRAPE_MS}}
    return build_scheduler(raw, pair_endpoints(pair), registry=CollectorRegistry())


@dataclass
class DecisionRecorder(RecordingScheduler):
    """RecordingScheduler that also keeps every Decision (explanations, per-scorer scores)."""

    decisions: list[Decision] = field(default_factory=list)

    async def route(self, request: InferenceRequest) -> Decision:
        decision = await super().route(request)
        self.decisions.append(decision)
        return decision


@dataclass
class VllmStack:
    envoy: EnvoyProcess
    picker: Server
    scheduler: DecisionRecorder

    @property
    def url(self) -> str:
        return self.envoy.url

    @property
    def kv(self) -> Director:
        return self.scheduler.inner


@contextlib.asynccontextmanager
async def vllm_envoy_stack(pair, profile: str = "precise") -> AsyncIterator[VllmStack]:
    """kvswitch in-process (debug headers on) + real Envoy (override-host over A and B)."""
    pool = [s.address for s in pair.servers]
    cfg = picker_config(pool, debug_headers=True)
    sched = DecisionRecorder(precise_scheduler(pair, profile))
    async with running_picker(cfg, sched) as picker:
        async with EnvoyProcess(EnvoyConfigOptions(picker=picker.address, endpoints=pool)) as envoy:
            yield VllmStack(envoy, picker, sched)


# ---- prompts and requests ---------------------------------------------------------------------------------
def long_prompt(tokenizer, min_tokens: int = 1000, tag: str | None = None) -> str:
    """A fresh (uuid-prefixed) prompt of at least ``min_tokens`` tokens: nobody has cached any block of it."""
    tag = tag or uuid.uuid4().hex
    parts = [f"Session {tag}."]
    i = 0
    while len(tokenizer.encode(" ".join(parts))) < min_tokens:
        parts.extend(f"Step {i} of {tag[:6]} moves the cached prefix to pod {i % 7} with latency {i * 3} ms."
                     for i in range(i, i + 10))
        i += 10
    return " ".join(parts)


async def post(base_url: str, path: str, body: dict[str, Any],
               session: aiohttp.ClientSession) -> tuple[int, dict[str, str], Any]:
    async with session.post(base_url + path, json=body) as r:
        text = await r.text()
        try:
            doc = await r.json(content_type=None)
        except ValueError:
            doc = text
        return r.status, {k.lower(): v for k, v in r.headers.items()}, doc


def local_hits(server, model: str) -> float:
    """vllm:prefix_cache_hits_total (local hits only; connector loads count as external)."""
    return metric_value(server.metrics_text(), "vllm:prefix_cache_hits_total", model_name=model) or 0.0


# ---- hashes -------------------------------------------------------------------------------------------------
def picker_tokens(sched: Director, request: InferenceRequest):
    """The token ids the picker uses for ``request`` (its own TokenService, as on the hot path)."""
    return sched.dl.tokens.tokens_sync(request)


def own_hashes_from_events(events: list[dict[str, Any]], block_size: int) -> dict[int, int]:
    """vLLM engine hash -> our chained hash, re-derived from BlockStored token_ids (parent chained)."""
    own: dict[int, int] = {}
    for ev in events:
        if ev.get("type") != "BlockStored":
            continue
        parent = ev["parent_block_hash"]
        start = ROOT_HASH if parent is None else own[parent]
        assert ev["block_size"] == block_size, ev["block_size"]
        hashes = hash_blocks(ev["token_ids"], block_size, start)
        assert len(hashes) == len(ev["block_hashes"]), "token_ids must be whole blocks"
        own.update(zip(ev["block_hashes"], hashes))
    return own


def stored_token_chain(events: list[dict[str, Any]], first_tokens) -> tuple[list[int], list[int]]:
    """(token ids, own hashes) of the chain of BlockStored events that starts with ``first_tokens`` (a root
    block) and follows parents; the events are a pod's, in order."""
    bs = len(first_tokens)
    stored = [e for e in events if e.get("type") == "BlockStored"]
    own = own_hashes_from_events(stored, bs)
    tokens: list[int] = []
    hashes: list[int] = []
    tail = None
    first = list(first_tokens)
    for ev in stored:
        starts = tail is None and ev["parent_block_hash"] is None and list(ev["token_ids"][:bs]) == first
        follows = tail is not None and ev["parent_block_hash"] == tail
        if not (starts or follows):
            continue
        tokens += list(ev["token_ids"])
        hashes += [own[h] for h in ev["block_hashes"]]
        tail = ev["block_hashes"][-1]
    return tokens, hashes


def pod_blocks(sched: Director, address: str, hashes: list[int]) -> int:
    """How many leading blocks of ``hashes`` the scheduler's precise index says ``address`` holds."""
    m = sched.dl.kv_index.index.match(hashes, touch=False)
    slot = sched.dl.endpoints.slot(address)
    return 0 if m is None or slot is None else int(m[0][slot])


async def wait_index(scheds: list[Director], address: str, hashes: list[int], timeout: float = 10.0) -> float:
    """Wait until every scheduler's index holds all ``hashes`` for ``address``; returns seconds waited."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while True:
        got = [pod_blocks(s, address, hashes) for s in scheds]
        if all(g == len(hashes) for g in got):
            return loop.time() - t0
        if loop.time() - t0 > timeout:
            raise TimeoutError(f"index never held {len(hashes)} blocks for {address} within {timeout}s: {got}")
        await asyncio.sleep(0.02)


async def sync_subscribers(pair, scheds: list[Director], collectors: dict[str, KvEventCollector],
                           session: aiohttp.ClientSession, timeout: float = 20.0) -> None:
    """ZMQ SUB sockets drop what was published before they joined: send small fresh probe prompts to each pod
    until every scheduler and collector has seen one (then nothing later is lost to the slow join)."""
    tok = scheds[0].dl.tokens.tokenizer
    loop = asyncio.get_running_loop()
    for server in pair.servers:
        deadline = loop.time() + timeout
        while True:
            prompt = long_prompt(tok, pair.block_size + 8)
            ids = tok.encode(prompt)
            status, _, doc = await post(server.base_url, "/v1/completions",
                                        {"model": pair.model_name, "prompt": prompt, "max_tokens": 1}, session)
            assert status == 200, doc
            first = hash_blocks(ids, pair.block_size)[:1]
            col = collectors.get(server.address)
            try:
                await wait_index(scheds, server.address, first, timeout=1.5)
                if col is not None:
                    for _ in range(30):
                        if any(e.get("type") == "BlockStored" and list(e["token_ids"][:pair.block_size])
                               == ids[:pair.block_size] for e in col.events()):
                            break
                        await asyncio.sleep(0.05)
                    else:
                        raise TimeoutError("collector missed the probe")
                break
            except TimeoutError:
                if loop.time() > deadline:
                    raise
