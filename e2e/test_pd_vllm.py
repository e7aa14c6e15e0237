"""Prefill/decode disaggregation end to end on real vLLM: Envoy -> kvswitch (prefill-decode handler) ->
kvswitch sidecar in front of pod B -> prefill leg on pod A -> KV through ExampleConnector's shared folder ->
decode on B. Then a follow-up that shares the prefix and adds a few tokens: the decider sees the prompt
cached on B (KV events and its own decision) and skips the leg.

vLLM's counters are the judge: A's ``vllm:prefix_cache_queries_total`` grows by the prompt (A computed the
prefill), B's ``vllm:external_prefix_cache_hits_total`` grows (B loaded the KV instead of computing it).

Run: .venv/bin/python -m pytest -q e2e/test_pd_vllm.py
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from e2e.support.envoy import EnvoyProcess
from e2e.support.picker import picker_config, running_picker
from e2e.vllmcpu.capture import metric_value
from engine.kvcache.hashing import hash_blocks
from engine.sidecar import Sidecar, SidecarConfig
from extproc.envoyconfig.builder import EnvoyConfigOptions
from pickers.config import build_scheduler
from pickers.types import Endpoint, Role

pytestmark = [pytest.mark.vllm, pytest.mark.envoy, pytest.mark.slow]

THRESHOLD = 256  # the tiny model's context is 2048 tokens: a leg for prompts with >= 2 uncached blocks


def _prompt(tok, min_tokens: int) -> str:
    tag = uuid.uuid4().hex  # fresh: no pod and no file in the shared folder has any block of it
    parts = [f"Document {tag}."]
    while len(tok.encode(" ".join(parts))) < min_tokens:
        n = len(parts)
        parts.append(f"Clause {n} of {tag[:6]} says the prefill runs on pod A and decode on pod B ({n * 7}).")
    return " ".join(parts)


def _counter(server, name: str, model: str) -> float:
    return metric_value(server.metrics_text(), name, model_name=model) or 0.0


def _blocks_held(sched, address: str, hashes: list[int]) -> int:
    m = sched.dl.kv_index.index.match(hashes, touch=False)
    slot = sched.dl.endpoints.slot(address)
    return 0 if m is None or slot is None else int(m[0][slot])


async def _wait_blocks(sched, address: str, hashes: list[int], timeout: float = 10.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while _blocks_held(sched, address, hashes) < len(hashes):
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def _post(session, url: str, body: dict) -> tuple[int, dict[str, str], dict]:
    async with session.post(url, json=body) as r:
        doc = await r.json(content_type=None)
        return r.status, {k.lower(): v for k, v in r.headers.items()}, doc


@contextlib.asynccontextmanager
async def pd_stack(pair):
    """Sidecar before B (prefill allow list: A), kvswitch with the prefill-decode handler, Envoy in front."""
    cfg_sc = SidecarConfig(decode_url=pair.b.base_url, connector="shared-storage", host="127.0.0.1", port=0,
                           prefill_pods=(pair.a.address,))
    async with Sidecar(cfg_sc) as sidecar:
        endpoints = [
            Endpoint(pair.a.address, role=Role.PREFILL, model=pair.model_name, kv_events=pair.a.kv_events_endpoint,
                     block_size=pair.block_size),
            Endpoint(sidecar.address, role=Role.DECODE, model=pair.model_name, kv_events=pair.b.kv_events_endpoint,
                     metrics_url=f"{pair.b.base_url}/metrics", block_size=pair.block_size),
        ]
        raw = {"handler": {"type": "prefill-decode", "decider": "threshold", "threshold_tokens": THRESHOLD},
               "tokenizer": {"path": str(pair.tokenizer_path / "tokenizer.json")},
               "datalayer": {"scrape_interval_ms": 250}}
        sched = build_scheduler(raw, endpoints, registry=CollectorRegistry())
        cfg = picker_config([sidecar.address], debug_headers=True)
        async with running_picker(cfg, sched) as picker:
            async with EnvoyProcess(EnvoyConfigOptions(picker=picker.address, endpoints=[sidecar.address])) as envoy:
                yield envoy, sched, sidecar


async def _sync_events(pair, sched, sidecar, session) -> None:
    """ZMQ subscribers miss what was published before they joined: probe each pod until its events arrive."""
    tok = sched.dl.tokens.tokenizer
    for server, address in ((pair.a, pair.a.address), (pair.b, sidecar.address)):
        for _ in range(20):
            prompt = _prompt(tok, pair.block_size + 8)
            status, _, doc = await _post(session, server.base_url + "/v1/completions",
                                         {"model": pair.model_name, "prompt": prompt, "max_tokens": 1})
            assert status == 200, doc
            if await _wait_blocks(sched, address, hash_blocks(tok.encode(prompt), pair.block_size)[:1], 1.5):
                break
        else:
            raise AssertionError(f"no KV events from {server.address}")


async def test_long_prompt_prefills_on_a_and_decodes_on_b_then_a_follow_up_stays_on_b(vllm_pair):
    pair = vllm_pair
    model = pair.model_name
    pair.clear_shared_storage()
    async with pd_stack(pair) as (envoy, sched, sidecar), aiohttp.ClientSession() as session:
        await _sync_events(pair, sched, sidecar, session)
        tok = sched.dl.tokens.tokenizer
        prompt = _prompt(tok, 1000)
        n = len(tok.encode(prompt))
        assert 1000 <= n < pair.max_model_len - 16

        a_q, b_ext = _counter(pair.a, "vllm:prefix_cache_queries_total", model), \
            _counter(pair.b, "vllm:external_prefix_cache_hits_total", model)
        status, headers, doc = await _post(session, envoy.url + "/v1/completions",
                                           {"model": model, "prompt": prompt, "max_tokens": 4})
        assert status == 200, doc
        assert headers["x-kvswitch-endpoint"] == sidecar.address
        assert headers.get("x-kvswitch-prefill-endpoint") == pair.a.address, headers
        assert doc["usage"]["prompt_tokens"] == n, "picker and vLLM tokenize alike"
        assert _counter(pair.a, "vllm:prefix_cache_queries_total", model) - a_q == n, "A computed the prefill"
        loaded = _counter(pair.b, "vllm:external_prefix_cache_hits_total", model) - b_ext
        assert loaded >= (n - 1) // pair.block_size * pair.block_size, (loaded, n)

        # B published the loaded blocks; once the index holds them the follow-up is mostly cached on B
        full = hash_blocks(tok.encode(prompt), pair.block_size)
        assert await _wait_blocks(sched, sidecar.address, full), "B's BlockStored for the loaded KV never arrived"
        a_q = _counter(pair.a, "vllm:prefix_cache_queries_total", model)
        status, headers, doc = await _post(session, envoy.url + "/v1/completions",
                                           {"model": model, "prompt": prompt + " And one more line.", "max_tokens": 4})
        assert status == 200, doc
        assert headers["x-kvswitch-endpoint"] == sidecar.address
        assert "x-kvswitch-prefill-endpoint" not in headers, headers
        assert _counter(pair.a, "vllm:prefix_cache_queries_total", model) == a_q, "no prefill leg on A"
        assert doc["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(full) * pair.block_size
