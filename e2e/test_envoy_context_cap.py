"""Through real Envoy: a body too long for any prompt of the pool's context is refused before the work, by Envoy
from its content-length (the picker never sees it) and by the picker as a chunked body streams in; a body under
the cap is served (issue 14, "Why" 6: big bodies must not take the gateway's CPU from other requests)."""

from __future__ import annotations

import aiohttp
import orjson
import pytest

from e2e.support.stack import envoy_stack

pytestmark = pytest.mark.envoy
CAP = 200_000


def _body(size: int) -> bytes:
    head = b'{"model": "llama-3.1-8b", "max_tokens": 2, "prompt": "'
    return head + b"w" * (size - len(head) - 2) + b'"}'


async def _chunked(data: bytes):
    for i in range(0, len(data), 16_384):
        yield data[i:i + 16_384]


async def test_a_body_past_the_context_cap_is_refused_before_the_picker_and_the_pods(fake_pods):
    a, b = fake_pods
    async with envoy_stack([a.address, b.address], server={"context_cap_bytes": CAP},
                           envoy={"max_body_bytes": CAP}) as stack, aiohttp.ClientSession() as s:
        hdrs = {"content-type": "application/json"}
        async with s.post(stack.url + "/v1/completions", data=_body(CAP + 1), headers=hdrs) as r:
            assert r.status == 400
            err = orjson.loads(await r.read())["error"]
        assert err["code"] == "context_length_exceeded" and f"at most {CAP} bytes" in err["message"]
        assert "request body is longer" in err["message"]  # Envoy's words, not the picker's ("is N bytes")
        assert stack.scheduler.requests == [] and a.seen == [] and b.seen == []

        async with s.post(stack.url + "/v1/completions", data=_chunked(_body(3 * CAP)), headers=hdrs) as r:
            assert r.status == 400  # no content-length: the picker counts the bytes as they arrive
            err = orjson.loads(await r.read())["error"]
        assert err["code"] == "context_length_exceeded" and "request body is at least" in err["message"]
        assert stack.scheduler.requests == [] and a.seen == [] and b.seen == []

        async with s.post(stack.url + "/v1/completions", data=_body(CAP), headers=hdrs) as r:
            assert r.status == 200, await r.text()
            await r.read()
        assert len(stack.scheduler.requests) == 1 and len(a.seen) + len(b.seen) == 1
