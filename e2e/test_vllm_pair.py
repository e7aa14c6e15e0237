"""The real-vLLM pair behaves as the e2e tests built on it assume (see e2e/vllm_facts.md).

Run: .venv/bin/python -m pytest -p e2e.vllmcpu.fixtures e2e/test_vllm_pair.py
"""

from __future__ import annotations

import uuid

import pytest

from e2e.vllmcpu.capture import LONG_PROMPT, metric_value, post_json, request
from e2e.vllmcpu.kvevents import KvEventCollector

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PREFILL_LEG = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
               "remote_block_ids": None, "remote_host": None, "remote_port": None}


def fresh_prompt() -> str:
    return f"Run {uuid.uuid4().hex}. " + LONG_PROMPT


def counter(server, name: str) -> float:
    return metric_value(server.metrics_text(), name, model_name="tiny") or 0.0


def test_pair_is_configured_as_documented(vllm_pair):
    for srv in vllm_pair.servers:
        info = srv.cache_config()
        assert info["block_size"] == str(vllm_pair.block_size)
        assert info["enable_prefix_caching"] == "True"
        assert info["num_gpu_blocks"] == "64"
        assert srv.alive()
    assert vllm_pair.a.address != vllm_pair.b.address
    assert (vllm_pair.tokenizer_path / "tokenizer.json").exists()


def test_repeat_prompt_hits_local_cache_and_publishes_blocks_once(vllm_pair):
    a = vllm_pair.a
    body = {"model": vllm_pair.model_name, "prompt": fresh_prompt(), "max_tokens": 1}
    with KvEventCollector(a.kv_events_endpoint) as kv:
        kv.joined()
        s, first = post_json(a.base_url, "/v1/completions", body)
        assert s == 200 and first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        stored = kv.wait_for(lambda evs: any(e["type"] == "BlockStored" for e in evs))
        n_blocks = first["usage"]["prompt_tokens"] // vllm_pair.block_size
        assert sum(len(e["block_hashes"]) for e in stored if e["type"] == "BlockStored") == n_blocks
        hits = counter(a, "vllm:prefix_cache_hits_total")
        s, again = post_json(a.base_url, "/v1/completions", body)
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == n_blocks * vllm_pair.block_size
        assert counter(a, "vllm:prefix_cache_hits_total") - hits == n_blocks * vllm_pair.block_size
        # a marker request after the repeat: one publisher, in order, so once the marker's blocks are in, anything
        # the repeat would have stored is too
        marker = {"model": vllm_pair.model_name, "prompt": fresh_prompt(), "max_tokens": 1}
        post_json(a.base_url, "/v1/completions", marker)
        count = len([e for e in stored if e["type"] == "BlockStored"])
        events = kv.wait_for(lambda evs: sum(e["type"] == "BlockStored" for e in evs) > count)
        after = [e for e in events if e["type"] == "BlockStored"][:-1]
        assert after == [e for e in stored if e["type"] == "BlockStored"], "a cache hit must not store blocks again"


def test_prefill_on_a_then_decode_on_b_loads_kv_from_shared_storage(vllm_pair):
    a, b = vllm_pair.a, vllm_pair.b
    prompt = fresh_prompt()
    s, pre = post_json(a.base_url, "/v1/completions", {"model": vllm_pair.model_name, "prompt": prompt,
                                                       "max_tokens": 1, "kv_transfer_params": PREFILL_LEG})
    assert s == 200 and pre["usage"]["completion_tokens"] == 1
    assert pre["kv_transfer_params"] is None  # ExampleConnector returns none
    local, external = counter(b, "vllm:prefix_cache_hits_total"), counter(b, "vllm:external_prefix_cache_hits_total")
    s, dec = post_json(b.base_url, "/v1/completions",
                       {"model": vllm_pair.model_name, "prompt": prompt, "max_tokens": 4})
    expect = (pre["usage"]["prompt_tokens"] - 1) // vllm_pair.block_size * vllm_pair.block_size
    assert s == 200 and dec["usage"]["prompt_tokens_details"]["cached_tokens"] == expect
    assert counter(b, "vllm:external_prefix_cache_hits_total") - external == expect
    assert counter(b, "vllm:prefix_cache_hits_total") == local  # loaded blocks are not local hits


def test_reset_prefix_cache_publishes_all_blocks_cleared_at_next_step(vllm_pair):
    b = vllm_pair.b
    with KvEventCollector(b.kv_events_endpoint) as kv:
        kv.joined()
        status, _, body = request(b.base_url, "POST", "/reset_prefix_cache")
        assert status == 200, body
        post_json(b.base_url, "/v1/completions", {"model": vllm_pair.model_name, "prompt": "x", "max_tokens": 1})
        kv.wait_for(lambda evs: any(e["type"] == "AllBlocksCleared" for e in evs))
