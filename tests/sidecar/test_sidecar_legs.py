"""The prefill and decode legs against fake servers: bodies, headers, streaming, usage."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from tests.sidecar.sidecar_fakes import decode_json, decode_sse, prefill_ok

CHAT = {
    "model": "m", "messages": [{"role": "user", "content": "hi there"}], "stream": True,
    "max_tokens": 50, "max_completion_tokens": 60, "min_tokens": 5,
    "stream_options": {"include_usage": True}, "temperature": 0.2,
}


async def post(url: str, body: dict, headers: dict[str, str] | None = None, path: str = "/v1/chat/completions"):
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path, data=orjson.dumps(body), headers=headers or {}) as r:
            return r.status, CIMultiDict(r.headers), await r.read()


async def test_prefill_leg_body_is_exactly_the_protocol(fakes, sidecars):
    prefill, decode = await fakes(prefill_ok), await fakes(decode_sse)
    sc = await sidecars(decode, prefill_pods=(prefill.address,))
    status, headers, _ = await post(sc.url, CHAT, {"x-prefiller-host-port": prefill.address})
    assert status == 200
    assert len(prefill.seen) == 1 and prefill.seen[0].path == "/v1/chat/completions"
    assert prefill.seen[0].json == {
        "model": "m", "messages": [{"role": "user", "content": "hi there"}], "stream": False,
        "max_tokens": 1, "max_completion_tokens": 1, "temperature": 0.2,
        "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                               "remote_block_ids": None, "remote_host": None, "remote_port": None},
    }
    assert headers["x-kvswitch-prefill-endpoint"] == prefill.address
    # The client sent no content type (aiohttp: octet-stream); vLLM rejects anything but JSON.
    assert prefill.seen[0].headers["Content-Type"] == decode.seen[0].headers["Content-Type"] == "application/json"
    # The routing header itself never travels on.
    assert "x-prefiller-host-port" not in {k.lower() for k in prefill.seen[0].headers}
    assert "x-prefiller-host-port" not in {k.lower() for k in decode.seen[0].headers}


async def test_prefill_leg_adds_no_completion_token_limit_that_was_absent(fakes, sidecars):
    prefill, decode = await fakes(prefill_ok), await fakes(decode_json)
    sc = await sidecars(decode, prefill_pods=(prefill.address,))
    body = {"model": "m", "prompt": "abc", "max_tokens": 9}
    await post(sc.url, body, {"x-prefiller-host-port": prefill.address}, path="/v1/completions")
    sent = prefill.seen[0].json
    assert sent["max_tokens"] == 1 and "max_completion_tokens" not in sent and sent["stream"] is False
    assert prefill.seen[0].path == "/v1/completions"


async def test_decode_leg_gets_original_request_and_params_verbatim(fakes, sidecars):
    prefill, decode = await fakes(prefill_ok), await fakes(decode_sse)
    sc = await sidecars(decode, prefill_pods=(prefill.address,))
    await post(sc.url, CHAT, {"x-prefiller-host-port": prefill.address})
    assert len(decode.seen) == 1
    expected = dict(CHAT)
    expected["kv_transfer_params"] = {
        "do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [3, 4, 5],
        "remote_engine_id": "engine-p1", "remote_host": "10.1.2.3", "remote_port": 5600, "tp_size": 1,
    }
    assert decode.seen[0].json == expected


async def test_request_id_is_the_same_on_both_legs(fakes, sidecars):
    prefill, decode = await fakes(prefill_ok), await fakes(decode_json)
    sc = await sidecars(decode, prefill_pods=(prefill.address,))
    _, headers, _ = await post(sc.url, CHAT, {"x-prefiller-host-port": prefill.address, "X-Request-Id": "req-42"})
    assert prefill.seen[0].headers["X-Request-Id"] == "req-42" == decode.seen[0].headers["X-Request-Id"]
    assert headers["X-Request-Id"] == "req-42"
    # Without one from the client, one is made up and used on both legs.
    await post(sc.url, CHAT, {"x-prefiller-host-port": prefill.address})
    generated = prefill.seen[1].headers["X-Request-Id"]
    assert len(generated) >= 16 and generated == decode.seen[1].headers["X-Request-Id"]


async def test_stream_passes_through_unbuffered(fakes, sidecars):
    prefill, decode = await fakes(prefill_ok), await fakes(decode_sse)
    decode.state["release"] = release = asyncio.Event()
    sc = await sidecars(decode, prefill_pods=(prefill.address,))
    async with aiohttp.ClientSession() as s:
        async with s.post(sc.url + "/v1/chat/completions", data=orjson.dumps(CHAT),
                          headers={"x-prefiller-host-port": prefill.address}) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            # The engine holds its later chunks until we have seen the first: a buffering proxy deadlocks here.
            first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 3)
            assert b'"text":"a"' in first
            release.set()
            rest = await asyncio.wait_for(r.content.read(), 3)
    assert rest.endswith(b"data: [DONE]\n\n") and b'"text":"b"' in rest


async def test_usage_reports_prefill_side_cache_hit(fakes, sidecars):
    prefill, decode = await fakes(prefill_ok), await fakes(decode_sse)
    sc = await sidecars(decode, prefill_pods=(prefill.address,))
    _, headers, raw = await post(sc.url, CHAT, {"x-prefiller-host-port": prefill.address})
    assert headers["x-kvswitch-prefill-cached-tokens"] == "32"
    events = [e for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
    usage = orjson.loads(events[-1][6:])["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 32, "decode_cached_tokens": 40}
    assert usage["completion_tokens"] == 2
    # Non-streaming answers are rewritten the same way.
    body = dict(CHAT, stream=False)
    body.pop("stream_options")
    decode_j = await fakes(decode_json)
    sc2 = await sidecars(decode_j, prefill_pods=(prefill.address,))
    _, _, raw = await post(sc2.url, body, {"x-prefiller-host-port": prefill.address})
    assert orjson.loads(raw)["usage"]["prompt_tokens_details"] == {"cached_tokens": 32, "decode_cached_tokens": 40}


async def test_no_header_goes_straight_to_decode_untouched(fakes, sidecars):
    prefill, decode = await fakes(prefill_ok), await fakes(decode_json)
    sc = await sidecars(decode, prefill_pods=(prefill.address,))
    raw_body = b'{"model": "m",  "prompt": "x", "max_tokens": 3}'
    async with aiohttp.ClientSession() as s:
        async with s.post(sc.url + "/v1/completions", data=raw_body) as r:
            assert r.status == 200
            assert "x-kvswitch-prefill-endpoint" not in r.headers
            answer = await r.json()
    assert prefill.seen == []
    assert decode.seen[0].body == raw_body  # byte for byte: no parse, no re-serialisation
    assert answer["usage"]["prompt_tokens_details"] == {"cached_tokens": 40}


async def test_client_kv_transfer_params_never_reach_the_engine(fakes, sidecars):
    prefill, decode = await fakes(prefill_ok), await fakes(decode_json)
    sc = await sidecars(decode, prefill_pods=(prefill.address,))
    evil = {"model": "m", "prompt": "x", "kv_transfer_params": {"do_remote_prefill": True, "remote_host": "6.6.6.6"}}
    await post(sc.url, evil, path="/v1/completions")
    assert "kv_transfer_params" not in decode.seen[0].json


async def test_shared_storage_connector_sends_no_kv_params(fakes, sidecars):
    async def prefill_plain(request, server):
        return await decode_json(request, server)  # ExampleConnector: an ordinary answer, no kv params

    prefill, decode = await fakes(prefill_plain), await fakes(decode_json)
    sc = await sidecars(decode, prefill_pods=(prefill.address,), connector="shared-storage")
    body = {"model": "m", "prompt": "the same prompt", "max_tokens": 7, "stream": False}
    status, headers, _ = await post(sc.url, body, {"x-prefiller-host-port": prefill.address}, path="/v1/completions")
    assert status == 200 and headers["x-kvswitch-prefill-endpoint"] == prefill.address
    assert prefill.seen[0].json == {"model": "m", "prompt": "the same prompt", "max_tokens": 1, "stream": False}
    assert decode.seen[0].json == body  # matched by prompt: the decode leg is the original request


async def test_prefill_without_kv_params_still_decodes(fakes, sidecars):
    prefill, decode = await fakes(decode_json), await fakes(decode_json)
    sc = await sidecars(decode, prefill_pods=(prefill.address,))
    status, _, _ = await post(sc.url, {"model": "m", "prompt": "p"}, {"x-prefiller-host-port": prefill.address},
                              path="/v1/completions")
    assert status == 200 and "kv_transfer_params" not in decode.seen[0].json


async def test_other_paths_proxy_through_and_own_metrics(fakes, sidecars):
    async def models(request, server):
        if request.path == "/metrics":
            return web.Response(status=404, text="nope")
        return await decode_json(request, server)

    prefill, decode = await fakes(prefill_ok), await fakes(models)
    sc = await sidecars(decode, prefill_pods=(prefill.address,))
    async with aiohttp.ClientSession() as s:
        async with s.get(sc.url + "/v1/models?x=1") as r:
            assert r.status == 200 and (await r.json())["id"] == "cmpl-d"
        async with s.get(sc.url + "/metrics") as r:
            assert r.status == 404  # the engine's answer, not ours
        await post(sc.url, CHAT, {"x-prefiller-host-port": prefill.address})
        async with s.get(sc.url + "/sidecar/metrics") as r:
            text = await r.text()
    assert decode.seen[0].path == "/v1/models" and decode.seen[1].path == "/metrics"
    assert 'kvswitch_sidecar_legs_total{leg="prefill",outcome="ok"} 1.0' in text
    assert 'kvswitch_sidecar_legs_total{leg="decode",outcome="ok"} 1.0' in text
    assert "kvswitch_sidecar_prefill_leg_seconds_count 1.0" in text
    assert "kvswitch_sidecar_decode_first_byte_seconds_count 1.0" in text
