"""Bad requests get an OpenAI-format error from kvswitch through Envoy, and the server keeps serving."""

from __future__ import annotations

import io

import aiohttp
import orjson
import pytest

from e2e.support.stack import envoy_stack

pytestmark = pytest.mark.envoy
GOOD = {"model": "llama-3.1-8b", "prompt": "hi", "max_tokens": 2}


async def _error(r: aiohttp.ClientResponse) -> dict:
    assert r.headers["content-type"].startswith("application/json")
    doc = orjson.loads(await r.read())
    assert set(doc["error"]) == {"message", "type", "param", "code"}
    assert doc["error"]["message"]
    return doc["error"]


@pytest.mark.parametrize(
    "body, status, code, param",
    [
        (b"{not json", 400, "invalid_json", None),
        (b"[1, 2]", 400, "invalid_json", None),
        (b'{"prompt": "hi"}', 400, "model_missing", "model"),
        (b'{"model": "m", "prompt": 5}', 400, "invalid_request", "prompt"),
        (b'{"model": "m", "messages": "hi"}', 400, "invalid_request", "messages"),
        (b'{"model": "m", "prompt": "' + b"x" * 70_000 + b'"}', 413, "request_too_large", None),
    ],
)
async def test_bad_request_answered_and_server_keeps_serving(fake_pods, body, status, code, param):
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    async with envoy_stack([p.address for p in fake_pods], server={"body_limit_bytes": 64 * 1024}) as stack, \
            aiohttp.ClientSession() as s:
        async with s.post(stack.url + path, data=body, headers={"content-type": "application/json"}) as r:
            assert r.status == status
            err = await _error(r)
            assert err["code"] == code and err["param"] == param
        assert all(p.seen == [] for p in fake_pods)
        async with s.post(stack.url + "/v1/completions", json=GOOD) as r:
            assert r.status == 200
            await r.read()
        await stack.ended(1)
        assert stack.scheduler.finished and not stack.scheduler.failed


async def test_huge_body_over_limit_is_413_without_buffering_it_all(fake_pods):
    async with envoy_stack([p.address for p in fake_pods], server={"body_limit_bytes": 100_000}) as stack, \
            aiohttp.ClientSession() as s:
        body = b'{"model": "m", "prompt": "' + b"x" * 3_000_000 + b'"}'
        async with s.post(stack.url + "/v1/completions", data=io.BytesIO(body)) as r:
            assert r.status == 413
            assert "body_limit_bytes" in (await _error(r))["message"]
        async with s.post(stack.url + "/v1/completions", json=GOOD) as r:
            assert r.status == 200
