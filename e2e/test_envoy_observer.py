"""Through real Envoy: the response observer is total (issue 14, "Why" 5). Odd usage from a pod never cuts the
client's stream, and a stream that ends without its terminal event is recorded as failed (truncated)."""

from __future__ import annotations

import aiohttp
import pytest
from prometheus_client import REGISTRY

from e2e.support.stack import envoy_stack

pytestmark = pytest.mark.envoy
STREAM = {"model": "llama-3.1-8b", "prompt": "hi", "max_tokens": 3, "stream": True}


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": "12", "completion_tokens": 3},
    {"prompt_tokens": [1, 2], "completion_tokens": {"a": 1}},
    {"prompt_tokens": 5, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": "x"}},
    {"prompt_tokens": 5, "completion_tokens": -3},
    {"prompt_tokens": 2**64 - 1, "completion_tokens": 3},
    "usage as a string",
    [1, 2, 3],
])
async def test_malformed_usage_does_not_cut_the_stream(fake_pods, usage):
    for p in fake_pods:
        p.usage_override = usage
    before = REGISTRY.get_sample_value("kvswitch_malformed_usage_total") or 0.0
    async with envoy_stack([p.address for p in fake_pods]) as stack, aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.post(stack.url + "/v1/completions", json=STREAM) as r:
                assert r.status == 200
                body = await r.read()
            assert body.count(b"data: ") == 5 and body.endswith(b"data: [DONE]\n\n")
        await stack.ended(2)
        assert len(stack.scheduler.finished) == 2 and stack.scheduler.failed == []
        # the malformed counts are not used: output tokens come from the events seen, the prompt is unknown
        assert [(u.prompt_tokens, u.completion_tokens) for u in stack.scheduler.finished] == [(0, 3), (0, 3)]
    assert (REGISTRY.get_sample_value("kvswitch_malformed_usage_total") or 0.0) - before == 2


async def test_stream_without_done_is_truncated_not_success(fake_pods):
    for p in fake_pods:
        p.skip_done = True
    async with envoy_stack([p.address for p in fake_pods]) as stack, aiohttp.ClientSession() as s:
        async with s.post(stack.url + "/v1/completions", json=STREAM) as r:
            assert r.status == 200
            body = await r.read()
        assert b"[DONE]" not in body
        await stack.ended(1)
        assert stack.scheduler.finished == []
        assert len(stack.scheduler.failed) == 1 and "truncated" in stack.scheduler.failed[0]
