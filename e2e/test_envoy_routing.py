"""Requests through real Envoy + kvswitch reach a pod, stream back, and follow the picker's choice only."""

from __future__ import annotations

import io

import aiohttp
import orjson
import pytest
from envoy_data_plane.envoy.extensions.filters.http.header_to_metadata.v3 import (
    Config as HeaderToMetadata,
)
from envoy_data_plane.envoy.extensions.filters.http.header_to_metadata.v3 import (
    ConfigKeyValuePair,
    ConfigRule,
    ConfigValueType,
)
from envoy_data_plane.google.protobuf import Any as AnyProto

from e2e.support.ports import dead_address
from e2e.support.stack import envoy_stack

pytestmark = pytest.mark.envoy
MODEL = "llama-3.1-8b"


def _body(api: str, stream: bool, **extra) -> dict:
    if api == "chat":
        return {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "stream": stream,
                "max_tokens": 4, **extra}
    return {"model": MODEL, "prompt": "hello there", "stream": stream, "max_tokens": 4, **extra}


@pytest.mark.parametrize("api", ["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True])
async def test_request_reaches_a_pod_and_comes_back(sim_pods, api, stream):
    path = "/v1/chat/completions" if api == "chat" else "/v1/completions"
    async with envoy_stack(sim_pods, simple=False) as stack, aiohttp.ClientSession() as s:
        body = _body(api, stream, **({"stream_options": {"include_usage": True}} if stream else {}))
        async with s.post(stack.url + path, json=body) as r:
            text = await r.text()
            assert r.status == 200, text
            assert r.headers["x-kvswitch-endpoint"] in sim_pods
        if stream:
            events = [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]
            assert events[-1] == "[DONE]"
            assert len(events) >= 3
        else:
            doc = orjson.loads(text)
            assert doc["choices"] and doc["usage"]["completion_tokens"] > 0
        sched = stack.scheduler
        await stack.ended(1)
        assert len(sched.requests) == 1
        req = sched.requests[0]
        assert req.model == MODEL and req.api == api and req.stream is stream
        assert sched.first_tokens == 1
        assert len(sched.finished) == 1 and sched.finished[0] is not None
        assert sched.finished[0].completion_tokens > 0
        assert sched.served == [r.headers["x-kvswitch-endpoint"]]


async def test_fallback_list_skips_a_dead_first_endpoint(fake_pods):
    dead = dead_address()
    live = fake_pods[0].address
    async with envoy_stack([dead, live], order=[dead, live]) as stack, aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.post(stack.url + "/v1/completions", json=_body("completions", False)) as r:
                assert r.status == 200, await r.text()
                assert r.headers["x-served-by"] == live
        assert len(fake_pods[0].seen) == 3
        await stack.ended(3)
        assert stack.scheduler.served == [live] * 3


async def test_client_destination_headers_are_ignored(fake_pods):
    chosen, other = fake_pods[0], fake_pods[1]
    async with envoy_stack([chosen.address, other.address], picker_endpoints=[chosen.address]) as stack, \
            aiohttp.ClientSession() as s:
        hdrs = {"x-gateway-destination-endpoint": other.address, "x-prefiller-host-port": "10.9.9.9:1",
                "x-gateway-destination-endpoint-subset": other.address}
        for _ in range(3):
            async with s.post(stack.url + "/v1/completions", json=_body("completions", False), headers=hdrs) as r:
                assert r.status == 200
                assert r.headers["x-served-by"] == chosen.address
        assert other.seen == []
        for seen in chosen.seen:
            assert seen.headers["x-gateway-destination-endpoint"] == chosen.address
            assert "x-prefiller-host-port" not in seen.headers
            assert "x-gateway-destination-endpoint-subset" not in seen.headers


def _subset_filter() -> dict:
    """Test-only: copy header x-test-subset into envoy.lb.subset_hint metadata, as a gateway would."""
    cfg = HeaderToMetadata(request_rules=[ConfigRule(
        header="x-test-subset",
        on_header_present=ConfigKeyValuePair(metadata_namespace="envoy.lb.subset_hint",
                                             key="x-gateway-destination-endpoint-subset",
                                             type=ConfigValueType.STRING),
        remove=True,
    )])
    return {"name": "envoy.filters.http.header_to_metadata", "typedConfig": AnyProto.pack(cfg).to_dict()}


async def test_subset_hint_is_honoured_and_empty_subset_is_503(fake_pods):
    a, b = fake_pods
    async with envoy_stack([a.address, b.address], extra_http_filters=[_subset_filter()]) as stack, \
            aiohttp.ClientSession() as s:
        for _ in range(4):
            async with s.post(stack.url + "/v1/completions", json=_body("completions", False),
                              headers={"x-test-subset": b.address}) as r:
                assert r.status == 200
                assert r.headers["x-served-by"] == b.address
        assert a.seen == [] and len(b.seen) == 4
        assert stack.scheduler.requests[0].subset == [b.address]
        async with s.post(stack.url + "/v1/completions", json=_body("completions", False),
                          headers={"x-test-subset": ","}) as r:
            assert r.status == 503
            err = (await r.json())["error"]
            assert err["code"] == "subset_empty" and err["type"] == "service_unavailable"
        async with s.post(stack.url + "/v1/completions", json=_body("completions", False),
                          headers={"x-test-subset": dead_address()}) as r:
            assert r.status == 503
            assert "subset" in (await r.json())["error"]["message"]


async def test_large_body_passes_through_byte_for_byte(fake_pods):
    big = orjson.dumps({"model": MODEL, "prompt": "ab\u00e9" * 500_000, "max_tokens": 1})
    assert len(big) > 1_500_000
    async with envoy_stack([p.address for p in fake_pods]) as stack, aiohttp.ClientSession() as s:
        async with s.post(stack.url + "/v1/completions", data=io.BytesIO(big),
                          headers={"content-type": "application/json"}) as r:
            assert r.status == 200, await r.text()
        seen = [x for p in fake_pods for x in p.seen]
        assert len(seen) == 1 and seen[0].body == big
        assert stack.scheduler.requests[0].body_size == len(big)


async def test_model_rewrite_changes_body_and_length(fake_pods):
    async with envoy_stack([fake_pods[0].address], server={"model_rewrite": {"alias": MODEL}}) as stack, \
            aiohttp.ClientSession() as s:
        async with s.post(stack.url + "/v1/completions", json={"model": "alias", "prompt": "x" * 1000}) as r:
            assert r.status == 200
        seen = fake_pods[0].seen[0]
        assert orjson.loads(seen.body)["model"] == MODEL
        assert "content-length" not in seen.headers or int(seen.headers["content-length"]) == len(seen.body)


async def test_bodiless_request_is_routed(fake_pods):
    async with envoy_stack([p.address for p in fake_pods]) as stack, aiohttp.ClientSession() as s:
        async with s.get(stack.url + "/v1/models") as r:
            assert r.status == 200
            assert r.headers["x-served-by"] in {p.address for p in fake_pods}
        assert stack.scheduler.requests[0].api == "other"
