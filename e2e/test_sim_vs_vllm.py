"""The simulator against real vLLM (CPU, tiny model): same names, shapes and token ids.

Both get the same tokenizer (the tiny model's), block size (vLLM's, read from cache_config_info) and the
same requests. Values that cannot match (ids, timestamps, generated text, engine block hashes, timings)
are not compared; everything a client or the picker parses is: metric names and label keys, histogram
buckets, KV-event framing and map keys/types, block token ids, response and SSE key sets, error statuses
and error shapes. Run: .venv/bin/python -m pytest -p e2e.vllmcpu.fixtures e2e/test_sim_vs_vllm.py
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest

from e2e.vllmcpu.capture import (
    CHAT_MESSAGES,
    LONG_PROMPT,
    SHORT_PROMPT,
    bad_requests,
    metric_families,
    post_json,
    request,
    shape,
    sse,
)
from e2e.vllmcpu.kvevents import KvEventCollector

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# The families a picker reads (reference/vllm-signals.md); both engines must expose them identically.
SIGNAL_FAMILIES = [
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries", "vllm:prefix_cache_hits",
    "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds", "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds",
]
# cache_config_info has ~40 labels in vLLM; the sim need only carry the ones a picker reads.
CACHE_INFO_KEYS = {"engine", "block_size", "num_gpu_blocks", "enable_prefix_caching", "prefix_caching_hash_algo"}


def diff_shapes(a: Any, b: Any, path: str = "$") -> list[str]:
    """Where two JSON shapes (see capture.shape) differ, as readable paths."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: only in vLLM" for k in sorted(a.keys() - b.keys())]
        out += [f"{path}.{k}: only in sim" for k in sorted(b.keys() - a.keys())]
        for k in sorted(a.keys() & b.keys()):
            out += diff_shapes(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) == 1 and len(b) == 1:
            return diff_shapes(a[0], b[0], f"{path}[]")
        return [] if a == b else [f"{path}: vLLM {a!r:.200} != sim {b!r:.200}"]
    return [] if a == b else [f"{path}: vLLM {a!r} != sim {b!r}"]


@pytest.fixture
async def sim(vllm_pair):
    """One sim pod configured like the vLLM pair (model name, block size, cache blocks, max_model_len)."""
    from engine.sim.fleet import PodSpec, SimFleet
    from engine.tokens.tokenizer import HFTokenizer

    spec = PodSpec(name="sim-0", model_name=vllm_pair.model_name, block_size=vllm_pair.block_size,
                   num_blocks=64, max_model_len=vllm_pair.max_model_len, max_num_seqs=8, seed=0)
    async with SimFleet([spec], time_scale=1.0, tokenizer=HFTokenizer(vllm_pair.tokenizer_path)) as fleet:
        yield fleet.pods[0]


def sim_url(pod) -> str:
    return f"http://{pod.address}"


async def both(fn, *args_per_engine):
    """Run a blocking client call for vLLM and for the sim, off the event loop (the sim lives on it)."""
    return await asyncio.gather(*(asyncio.to_thread(fn, *a) for a in args_per_engine))


async def test_metric_names_labels_and_buckets(vllm_pair, sim):
    body = {"model": vllm_pair.model_name, "prompt": SHORT_PROMPT, "max_tokens": 3}
    await both(post_json, (vllm_pair.a.base_url, "/v1/completions", body), (sim_url(sim), "/v1/completions", body))
    (_, _, vt), (_, _, st) = await both(request, (vllm_pair.a.base_url, "GET", "/metrics"),
                                        (sim_url(sim), "GET", "/metrics"))
    real, fake = metric_families(vt.decode()), metric_families(st.decode())
    problems = []
    for name in SIGNAL_FAMILIES:
        if name not in fake:
            problems.append(f"{name}: missing in sim")
            continue
        for key in ("type", "label_keys", "samples", "buckets"):
            if real[name].get(key) != fake[name].get(key):
                problems.append(f"{name}.{key}: vLLM {real[name].get(key)} != sim {fake[name].get(key)}")
    info_real = set(real["vllm:cache_config_info"]["label_keys"])
    info_fake = set(fake.get("vllm:cache_config_info", {}).get("label_keys", []))
    assert CACHE_INFO_KEYS <= info_real, "vLLM changed cache_config_info"
    if not CACHE_INFO_KEYS <= info_fake:
        problems.append(f"cache_config_info: sim lacks {sorted(CACHE_INFO_KEYS - info_fake)}")
    # Families vLLM has and the sim lacks are reported, not failed: most are irrelevant to a picker.
    # (prometheus_client's *_created gauges are dropped on both sides.)
    missing = sorted(n for n in real if n not in fake and not n.endswith("_created"))
    print(f"vLLM families the sim does not export: {missing}")
    assert not problems, "\n".join(problems)


async def test_block_size_reported_alike(vllm_pair, sim):
    (_, _, st), = await both(request, (sim_url(sim), "GET", "/metrics"))
    from prometheus_client.parser import text_string_to_metric_families

    info = [f for f in text_string_to_metric_families(st.decode()) if f.name == "vllm:cache_config_info"]
    assert info and info[0].samples[0].labels["block_size"] == str(vllm_pair.block_size)
    assert vllm_pair.a.cache_config()["block_size"] == str(vllm_pair.block_size)


def _stored(collector: KvEventCollector, timeout: float = 15.0) -> list[dict[str, Any]]:
    return [e for e in collector.wait_for(lambda evs: any(e.get("type") == "BlockStored" for e in evs), timeout)
            if e.get("type") == "BlockStored"]


async def _kv_round(vllm_pair, sim, path: str, body: dict) -> tuple[list, list, list, list]:
    """Send ``body`` to vLLM A and the sim with KV subscribers attached; their messages and BlockStored events."""
    with KvEventCollector(vllm_pair.a.kv_events_endpoint) as cv, KvEventCollector(sim.kv_events_endpoint) as cs:
        await asyncio.to_thread(cv.joined)  # both subscriptions reach their publishers before anything is sent
        await asyncio.to_thread(cs.joined)
        (s1, r1), (s2, r2) = await both(post_json, (vllm_pair.a.base_url, path, body), (sim_url(sim), path, body))
        assert (s1, s2) == (200, 200), (r1, r2)
        ev_real, ev_fake = await both(_stored, (cv,), (cs,))
        return cv.snapshot(), cs.snapshot(), ev_real, ev_fake


async def test_kv_events_same_framing_keys_and_token_ids(vllm_pair, sim):
    prompt = f"Run {uuid.uuid4().hex}. " + LONG_PROMPT  # never seen by either engine (nor the shared folder)
    body = {"model": vllm_pair.model_name, "prompt": prompt, "max_tokens": 1}
    msgs_real, msgs_fake, ev_real, ev_fake = await _kv_round(vllm_pair, sim, "/v1/completions", body)
    m_real, m_fake = msgs_real[0], msgs_fake[0]
    assert (m_fake.frames, m_fake.topic, len(m_fake.seq_raw)) == (m_real.frames, m_real.topic, len(m_real.seq_raw))
    assert shape(m_fake.payload[:1] + m_fake.payload[2:]) == shape(m_real.payload[:1] + m_real.payload[2:])
    # Map keys and value types of BlockStored (the block hashes are the engine's own: never compared).
    problems = diff_shapes(shape(ev_real[0]), shape(ev_fake[0]))
    assert not problems, "\n".join(problems)
    tokens_real = [t for e in ev_real for t in e["token_ids"]]
    tokens_fake = [t for e in ev_fake for t in e["token_ids"]]
    assert tokens_real, "vLLM published no full block: the prompt is shorter than one block"
    assert tokens_fake == tokens_real
    assert [e["block_size"] for e in ev_fake] == [e["block_size"] for e in ev_real]
    assert sum(len(e["block_hashes"]) for e in ev_fake) == sum(len(e["block_hashes"]) for e in ev_real)


async def test_chat_block_token_ids_match(vllm_pair, sim):
    """The sim must render and tokenize chat as vLLM does (template, then no extra special tokens)."""
    messages = [{"role": "system", "content": f"Session {uuid.uuid4().hex}."}, {"role": "user", "content": LONG_PROMPT}]
    body = {"model": vllm_pair.model_name, "messages": messages, "max_tokens": 1}
    _, _, ev_real, ev_fake = await _kv_round(vllm_pair, sim, "/v1/chat/completions", body)
    tokens_real = [t for e in ev_real for t in e["token_ids"]]
    tokens_fake = [t for e in ev_fake for t in e["token_ids"]]
    assert len(tokens_real) >= vllm_pair.block_size, "the chat prompt filled no block on vLLM"
    assert tokens_fake[:16] == tokens_real[:16], "chat prompt starts differently (BOS twice?)"
    assert tokens_fake == tokens_real


RESPONSE_CASES = {
    "completion": ("/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 4}),
    "chat": ("/v1/chat/completions", {"messages": CHAT_MESSAGES, "max_tokens": 4}),
}


@pytest.mark.parametrize("case", sorted(RESPONSE_CASES))
async def test_response_shapes(vllm_pair, sim, case):
    path, extra = RESPONSE_CASES[case]
    body = {"model": vllm_pair.model_name, "temperature": 0, **extra}
    (s1, real), (s2, fake) = await both(post_json, (vllm_pair.a.base_url, path, body), (sim_url(sim), path, body))
    assert (s1, s2) == (200, 200), (real, fake)
    problems = diff_shapes(shape(real), shape(fake))
    assert not problems, "\n".join(problems)
    assert fake["usage"]["completion_tokens"] == real["usage"]["completion_tokens"] == 4
    assert fake["usage"]["prompt_tokens"] == real["usage"]["prompt_tokens"]


def _chunks(lines: list[str]) -> list[Any]:
    return [json.loads(x) if x != "[DONE]" else x for x in lines]


@pytest.mark.parametrize("case", sorted(RESPONSE_CASES))
@pytest.mark.parametrize("usage", [True, False], ids=["include_usage", "no_usage"])
async def test_sse_shapes(vllm_pair, sim, case, usage):
    path, extra = RESPONSE_CASES[case]
    # ignore_eos: the random-weight model may otherwise stop early, and then vLLM sends fewer chunks.
    body = {"model": vllm_pair.model_name, "temperature": 0, "stream": True, **extra, "max_tokens": 3,
            "ignore_eos": True}
    if usage:
        body["stream_options"] = {"include_usage": True}
    (s1, h1, real), (s2, h2, fake) = await both(sse, (vllm_pair.a.base_url, path, body), (sim_url(sim), path, body))
    assert (s1, s2) == (200, 200)
    assert h2.get("content-type") == h1.get("content-type")
    real, fake = _chunks(real), _chunks(fake)
    assert real[-1] == fake[-1] == "[DONE]"
    # vLLM sends one chunk per output token (+ a role chunk for chat, + a usage chunk), but may fold tokens
    # whose text is held back (incomplete UTF-8) into the next chunk. So: the first chunk, the last one before
    # [DONE] (finish reason or usage) and, for every sim chunk, a vLLM chunk of the same shape.
    problems = diff_shapes(shape(real[0]), shape(fake[0]), "first chunk")
    problems += diff_shapes(shape(real[-2]), shape(fake[-2]), "last chunk")
    real_shapes = [shape(c) for c in real[:-1]]
    for i, chunk in enumerate(fake[:-1]):
        if all(diff_shapes(r, shape(chunk), "") for r in real_shapes):
            problems.append(f"sim chunk[{i}] has a shape no vLLM chunk has: {shape(chunk)}")
    assert not problems, "\n".join(problems) + f"\nvLLM: {real}\nsim: {fake}"
    if usage:
        assert fake[-2]["usage"]["completion_tokens"] == real[-2]["usage"]["completion_tokens"] == 3


# Inputs the simulator answers differently on purpose.
SIM_DIFFERS_ON_PURPOSE = {
    "n_2": "the sim serves n=1 only and says so with a 400 (param n); vLLM returns n choices",
}


@pytest.mark.parametrize("name", sorted(bad_requests("tiny", 2048)))
async def test_error_status_and_shape(vllm_pair, sim, name):
    if name in SIM_DIFFERS_ON_PURPOSE:
        pytest.skip(SIM_DIFFERS_ON_PURPOSE[name])
    path, body, raw = bad_requests(vllm_pair.model_name, vllm_pair.max_model_len)[name]
    (s1, real), (s2, fake) = await both(post_json, (vllm_pair.a.base_url, path, body, raw),
                                        (sim_url(sim), path, body, raw))
    assert s2 == s1, f"{name}: vLLM {s1} {real!r:.400} / sim {s2} {fake!r:.400}"
    if s1 >= 400:
        # Messages are free text (pydantic's for validation errors): only the structure and type/param/code.
        assert set(fake) == set(real) == {"error"}
        assert set(fake["error"]) == set(real["error"])
        for key in ("type", "param", "code"):
            assert fake["error"][key] == real["error"][key], f"{name}.{key}: {real['error']} / {fake['error']}"
    else:
        assert diff_shapes(shape(real), shape(fake)) == []
