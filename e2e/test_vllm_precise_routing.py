"""Precise prefix routing end to end: real vLLM pods (A, B) -> KV events -> kvswitch's precise index ->
a routing decision -> real Envoy -> the pod that really holds the prefix (vLLM's local hit counters agree).

Each pod is warmed DIRECTLY (not through Envoy), so only the KV events can tell kvswitch where the prefix
lives; the approximate index (learned from kvswitch's own decisions) knows nothing of it. Prompts are fresh
(uuid-prefixed): the pair's shared ExampleConnector folder can never turn them into hits on the other pod.

Run: .venv/bin/python -m pytest -q e2e/test_vllm_precise_routing.py
"""

from __future__ import annotations

import asyncio
import time
import uuid

import aiohttp
import pytest

from e2e.support.vllm_stack import (
    local_hits,
    long_prompt,
    picker_tokens,
    pod_blocks,
    post,
    precise_scheduler,
    stored_token_chain,
    sync_subscribers,
    vllm_envoy_stack,
    wait_index,
)
from e2e.vllmcpu.kvevents import KvEventCollector
from engine.kvcache.hashing import hash_blocks
from engine.tokens.tokenizer import HFTokenizer
from pickers.types import InferenceRequest

pytestmark = [pytest.mark.vllm, pytest.mark.envoy, pytest.mark.slow]

PROMPT_TOKENS = 1000  # ~7 full 128-token blocks


def _completion(pair, prompt: str, max_tokens: int = 1) -> dict:
    return {"model": pair.model_name, "prompt": prompt, "max_tokens": max_tokens}


def _request(pair, prompt: str | None = None, messages: list | None = None) -> InferenceRequest:
    return InferenceRequest(request_id=uuid.uuid4().hex, model=pair.model_name,
                            api="chat" if messages is not None else "completions", prompt=prompt, messages=messages)


async def _wait_chain(col: KvEventCollector, first_tokens, n_blocks: int, timeout: float = 10.0):
    """The BlockStored chain (token ids, own hashes) for a prompt, once it has ``n_blocks`` blocks."""
    deadline = time.monotonic() + timeout
    while True:
        tokens, hashes = stored_token_chain(col.events(), first_tokens)
        if len(hashes) >= n_blocks or time.monotonic() > deadline:
            return tokens, hashes
        await asyncio.sleep(0.05)


def _index_view(sched, hashes: list[int]) -> dict[int, dict[str, tuple[str, ...]]]:
    """The index content for ``hashes``, with pod addresses (slots may differ between replicas)."""
    idx = sched.dl.kv_index
    out = {}
    for h in hashes:
        held = idx.index.pods_holding(h)
        out[h] = {m: tuple(sorted(idx._address_of(p) for p in pods)) for m, pods in held.items()}
    return out


# ---- 1, 2, 5: the index equals what vLLM stored, in two replicas ---------------------------------------------
async def test_index_equals_vllm_block_stored_in_two_replicas(vllm_pair):
    pair = vllm_pair
    bs = pair.block_size
    replicas = [precise_scheduler(pair), precise_scheduler(pair)]
    collectors = {s.address: KvEventCollector(s.kv_events_endpoint) for s in pair.servers}
    try:
        for r in replicas:
            await r.start()
        async with aiohttp.ClientSession() as session:
            await sync_subscribers(pair, replicas, collectors, session)
            seen: list[int] = []
            owner: dict[int, str] = {}
            for warm, other in [(pair.a, pair.b), (pair.b, pair.a)]:
                prompt = long_prompt(replicas[0].dl.tokens.tokenizer, PROMPT_TOKENS)
                tokens = [int(t) for t in picker_tokens(replicas[0], _request(pair, prompt))]
                expected = hash_blocks(tokens, bs)
                assert len(expected) >= 7
                status, _, doc = await post(warm.base_url, "/v1/completions", _completion(pair, prompt), session)
                assert status == 200, doc
                assert doc["usage"]["prompt_tokens"] == len(tokens), "picker and vLLM tokenize the prompt alike"
                assert doc["usage"]["prompt_tokens_details"]["cached_tokens"] == 0, "the prompt must be fresh"
                waited = await wait_index(replicas, warm.address, expected)

                ev_tokens, ev_hashes = await _wait_chain(collectors[warm.address], tokens[:bs], len(expected))
                # vLLM stored exactly the prompt's full blocks, and our hash of its token_ids is the picker's
                assert ev_tokens == tokens[: len(expected) * bs]
                assert ev_hashes == expected
                for r in replicas:
                    assert pod_blocks(r, warm.address, expected) == len(expected)
                    assert pod_blocks(r, other.address, expected) == 0
                seen += expected
                owner.update((h, warm.address) for h in expected)
                print(f"warm {warm.address}: {len(tokens)} tokens, {len(expected)} blocks, index after {waited:.2f}s")

            views = [_index_view(r, seen) for r in replicas]
            assert views[0] == views[1], "two replicas fed the same events must hold the same index"
            assert views[0] == {h: {"GPU": (owner[h],)} for h in seen}
            assert [r.dl.kv_index.stats["orphans"] for r in replicas] == [0, 0]
            assert [r.dl.kv_index.stats["gaps"] for r in replicas] == [0, 0]
    finally:
        for c in collectors.values():
            c.close()
        for r in replicas:
            await r.stop()


# ---- 3: completions through Envoy go to the pod that holds the prefix -------------------------------------
@pytest.mark.parametrize("profile", ["precise", "default"])
async def test_shared_prefix_routes_to_the_warm_pod_through_envoy(vllm_pair, profile):
    pair = vllm_pair
    bs = pair.block_size
    async with vllm_envoy_stack(pair, profile) as stack, aiohttp.ClientSession() as session:
        kv = stack.kv
        await sync_subscribers(pair, [kv], {}, session)
        # Alternate the warm pod: a fixed tie-break cannot pass this.
        for warm, other in [(pair.a, pair.b), (pair.b, pair.a), (pair.a, pair.b), (pair.b, pair.a)]:
            prompt = long_prompt(kv.dl.tokens.tokenizer, PROMPT_TOKENS)
            expected = hash_blocks(picker_tokens(kv, _request(pair, prompt)), bs)
            status, _, doc = await post(warm.base_url, "/v1/completions", _completion(pair, prompt), session)
            assert status == 200, doc
            await wait_index([kv], warm.address, expected)
            assert kv.dl.approx.match(expected, touch=False) is None, "only KV events may know this prefix"

            hits = {s.address: local_hits(s, pair.model_name) for s in pair.servers}
            body = _completion(pair, prompt + " Then name the pod that served this request.", max_tokens=2)
            status, headers, doc = await post(stack.url, "/v1/completions", body, session)
            assert status == 200, doc
            assert headers["x-kvswitch-endpoint"] == warm.address, headers.get("x-kvswitch-explanation")
            assert "prefix=" in headers["x-kvswitch-explanation"]
            decision = stack.scheduler.decisions[-1]
            assert decision.primary == warm.address and decision.profile == profile
            ex = decision.explanation
            assert ex[warm.address]["prefix"] > ex[other.address]["prefix"], ex
            sent = len(picker_tokens(kv, decision.request))
            assert ex[warm.address]["prefix"] == pytest.approx(len(expected) * bs / sent, abs=1e-3), ex
            assert ex[other.address]["prefix"] == 0.0, ex
            await stack.scheduler.ended(len(stack.scheduler.decisions))
            assert stack.scheduler.served[-1] == warm.address
            # vLLM agrees: the warm pod served it from its local prefix cache, the other saw nothing
            assert local_hits(warm, pair.model_name) - hits[warm.address] >= len(expected) * bs
            assert local_hits(other, pair.model_name) == hits[other.address]


# ---- 4: chat ----------------------------------------------------------------------------------------------------
def _conversation(tok: HFTokenizer) -> list[dict]:
    return [{"role": "system", "content": "You are a terse assistant that routes requests."},
            {"role": "user", "content": long_prompt(tok, PROMPT_TOKENS)}]


def _chat(pair, messages: list[dict], max_tokens: int = 1) -> dict:
    return {"model": pair.model_name, "messages": messages, "max_tokens": max_tokens}


async def test_chat_blocks_stored_by_vllm_match_the_engine_tokenizer(vllm_pair):
    """vLLM renders the template and tokenizes without special tokens: HFTokenizer.encode_chat agrees, so
    the precise index (fed from events) holds exactly the chat's blocks for pod B."""
    pair = vllm_pair
    bs = pair.block_size
    tok = HFTokenizer(pair.tokenizer_path)
    sched = precise_scheduler(pair)
    col = KvEventCollector(pair.b.kv_events_endpoint)
    try:
        await sched.start()
        async with aiohttp.ClientSession() as session:
            await sync_subscribers(pair, [sched], {pair.b.address: col}, session)
            messages = _conversation(tok)
            tokens = [int(t) for t in tok.encode_chat(messages)]
            expected = hash_blocks(tokens, bs)
            status, _, doc = await post(pair.b.base_url, "/v1/chat/completions", _chat(pair, messages), session)
            assert status == 200, doc
            assert doc["usage"]["prompt_tokens"] == len(tokens)
            await wait_index([sched], pair.b.address, expected)
            ev_tokens, ev_hashes = await _wait_chain(col, tokens[:bs], len(expected))
            assert ev_tokens == tokens[: len(expected) * bs]
            assert ev_hashes == expected
            assert pod_blocks(sched, pair.a.address, expected) == 0
    finally:
        col.close()
        await sched.stop()


async def test_chat_continuation_routes_to_the_warm_pod_through_envoy(vllm_pair):
    """The picker must tokenize chat as vLLM does (template carries BOS; no special tokens added): with a
    double BOS every hash is shifted and B's prefix score would be 0 (fixed in 15262ae)."""
    pair = vllm_pair
    bs = pair.block_size
    tok = HFTokenizer(pair.tokenizer_path)
    async with vllm_envoy_stack(pair, "precise") as stack, aiohttp.ClientSession() as session:
        kv = stack.kv
        await sync_subscribers(pair, [kv], {}, session)
        messages = _conversation(tok)
        expected = hash_blocks(tok.encode_chat(messages), bs)  # what vLLM stores (previous test)
        status, _, doc = await post(pair.b.base_url, "/v1/chat/completions", _chat(pair, messages), session)
        assert status == 200, doc
        await wait_index([kv], pair.b.address, expected)

        more = messages + [{"role": "assistant", "content": "Routed."},
                           {"role": "user", "content": "And the next one?"}]
        hits = local_hits(pair.b, pair.model_name)
        status, headers, doc = await post(stack.url, "/v1/chat/completions", _chat(pair, more, 2), session)
        assert status == 200, doc
        decision = stack.scheduler.decisions[-1]
        ex = decision.explanation
        # the picker tokenizes the chat as vLLM does ...
        assert [int(t) for t in picker_tokens(kv, decision.request)] == [int(t) for t in tok.encode_chat(more)]
        # ... so B's prefix wins, and vLLM's local hits confirm it
        assert ex[pair.b.address]["prefix"] > ex[pair.a.address]["prefix"], ex
        assert headers["x-kvswitch-endpoint"] == pair.b.address
        assert local_hits(pair.b, pair.model_name) - hits >= len(expected) * bs
