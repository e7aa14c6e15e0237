"""Through real Envoy: nothing a client sends steers a request, only the API is routed, Envoy's own errors are
OpenAI-shaped, the request id is the gateway's, and a failing or stalled pod costs the client nothing when the
picker named a fallback (issue 14, "Why" 2, 3, 4, 7 and 8)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
import pytest

from e2e.support.envoy import EnvoyProcess
from e2e.support.picker import LEAST_INFLIGHT, picker_config, running_picker
from e2e.support.stack import envoy_stack
from e2e.support.waits import all_held_at_once
from extproc.envoyconfig.builder import EnvoyConfigOptions

pytestmark = pytest.mark.envoy
GOOD = {"model": "llama-3.1-8b", "prompt": "hi", "max_tokens": 2}
STEERING = ("x-gateway-destination-endpoint", "x-gateway-destination-endpoint-served", "x-prefiller-host-port",
            "x-data-parallel-rank", "x-kvswitch-prefill-signature")


def _openai_error(raw: bytes) -> dict:
    doc = orjson.loads(raw)
    assert set(doc["error"]) == {"message", "type", "param", "code"}, doc
    assert doc["error"]["message"]
    return doc["error"]


async def _dead_picker_envoy(pool: list[str], fail_open: bool) -> EnvoyProcess:
    """An Envoy whose picker has gone away (started, then stopped), once its health check saw it go."""
    cfg = picker_config(pool, LEAST_INFLIGHT)
    async with running_picker(cfg) as picker:
        envoy = EnvoyProcess(EnvoyConfigOptions(picker=picker.address, endpoints=pool, fail_open=fail_open))
        await envoy.start()
    try:
        await envoy.wait_picker_health(False)
    except BaseException:
        await envoy.stop()
        raise
    return envoy


async def test_fail_open_ignores_client_destination_headers(fake_pods):
    """Why 2: with the picker down and fail-open, a client naming a pod does not get it (round robin)."""
    a, b = fake_pods
    envoy = await _dead_picker_envoy([a.address, b.address], fail_open=True)
    try:
        hdrs = {"x-gateway-destination-endpoint": b.address, "x-prefiller-host-port": "10.9.9.9:1",
                "x-data-parallel-rank": "3", "x-kvswitch-prefill-signature": "1.ab"}
        async with aiohttp.ClientSession() as s:
            for _ in range(10):
                async with s.post(envoy.url + "/v1/completions", json=GOOD, headers=hdrs) as r:
                    assert r.status == 200
                    await r.read()
        assert len(a.seen) >= 3 and len(b.seen) >= 3, (len(a.seen), len(b.seen))
        for seen in a.seen + b.seen:
            assert not any(h in seen.headers for h in STEERING), seen.headers
    finally:
        await envoy.stop()


def test_original_dst_with_fail_open_is_refused():
    """Why 2: original-dst + fail-open would let a request go where it says; the builder refuses it."""
    from extproc.envoyconfig.builder import render
    from extproc.envoyconfig.cli import main

    with pytest.raises(ValueError, match="original-dst"):
        render(EnvoyConfigOptions(lb="original-dst", fail_open=True))
    assert main(["--lb", "original-dst", "--fail-open"]) == 2
    assert "ORIGINAL_DST" in render(EnvoyConfigOptions(lb="original-dst", fail_open=False))


@pytest.mark.parametrize("method, path, status", [
    ("POST", "/reset_prefix_cache", 404),
    ("GET", "/metrics", 404),
    ("POST", "/sim/faults", 404),
    ("GET", "/health", 404),
    ("GET", "/v1/completions", 405),
    ("DELETE", "/v1/chat/completions", 405),
    ("POST", "/v1/models", 405),
    ("POST", "/v1/completions/../../reset_prefix_cache", 404),
])
async def test_only_api_paths_and_methods_reach_pods(fake_pods, method, path, status):
    """Why 3: admin and simulator paths, and wrong methods, get an OpenAI-shaped 404/405 from Envoy."""
    async with envoy_stack([p.address for p in fake_pods]) as stack, aiohttp.ClientSession() as s:
        async with s.request(method, stack.url + path, data=b"{}", headers={"content-type": "application/json"},
                             skip_auto_headers=()) as r:
            assert r.status == status
            assert r.headers["content-type"].startswith("application/json")
            err = _openai_error(await r.read())
            assert err["code"] == ("not_found" if status == 404 else "method_not_allowed")
        assert all(p.seen == [] for p in fake_pods)
        assert stack.scheduler.requests == []  # the picker was not asked either
        async with s.post(stack.url + "/v1/completions", json=GOOD) as r:
            assert r.status == 200


async def test_fail_closed_500_is_openai_shaped(fake_pods):
    """Why 8: Envoy's own 500 (picker down, fail-closed) carries an OpenAI error body."""
    envoy = await _dead_picker_envoy([p.address for p in fake_pods], fail_open=False)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(envoy.url + "/v1/completions", json=GOOD) as r:
                assert r.status >= 500
                assert r.headers["content-type"].startswith("application/json")
                err = _openai_error(await r.read())
                assert err["type"] in ("server_error", "service_unavailable")
    finally:
        await envoy.stop()


async def _raw(url: str, request: bytes) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head, "connection closed without a status line"
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    return status, body


@pytest.mark.parametrize("name, request_bytes, status", [
    ("http/1.0", b"POST /v1/completions HTTP/1.0\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", 426),
    ("101 headers", (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     + b"".join(b"x-h%d: v\r\n" % i for i in range(101))
                     + b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"), 431),
    ("cl+chunked", (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                    b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n"), 400),
])
async def test_envoy_protocol_errors_are_openai_shaped(fake_pods, name, request_bytes, status):
    """Why 8: HTTP/1.0, too many headers, CL+chunked get a status and an OpenAI error body, not a bare close."""
    async with envoy_stack([p.address for p in fake_pods]) as stack:
        got, body = await _raw(stack.url, request_bytes)
        assert got == status, (name, got, body)
        _openai_error(body)
        assert all(p.seen == [] for p in fake_pods)


async def test_client_request_id_does_not_key_load_tracking(fake_pods):
    """Why 8: two requests reusing one x-request-id are tracked as two (the gateway makes the id)."""
    async with envoy_stack([p.address for p in fake_pods]) as stack, aiohttp.ClientSession() as s:
        async def one() -> None:
            async with s.post(stack.url + "/v1/completions", json=GOOD, headers={"x-request-id": "same"}) as r:
                assert r.status == 200
                await r.read()
        await asyncio.gather(one(), one())
        ids = [r.request_id for r in stack.scheduler.requests]
        assert len(ids) == 2 and len(set(ids)) == 2 and "same" not in ids, ids


async def test_pod_answering_500_is_retried_on_the_next_fallback(fake_pods):
    """Why 4: a 5xx before any response byte is retried on the next endpoint of the picker's list."""
    bad, good = fake_pods
    bad.fail_status = 500
    async with envoy_stack([bad.address, good.address], order=[bad.address, good.address]) as stack, \
            aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.post(stack.url + "/v1/completions", json={**GOOD, "stream": True}) as r:
                assert r.status == 200
                assert r.headers["x-served-by"] == good.address
                assert b"[DONE]" in await r.read()
        assert len(bad.seen) == 3 and len(good.seen) == 3


async def test_stalled_pod_is_abandoned_by_the_per_try_idle_timeout(fake_pods):
    """Why 7: a pod that accepts and never answers is given up after the per-try idle timeout and the request
    goes to the next endpoint, instead of holding the client until it gives up."""
    stalled, good = fake_pods
    stalled.stall = True
    async with envoy_stack([stalled.address, good.address], order=[stalled.address, good.address],
                           envoy={"per_try_idle_timeout_s": 1.0}) as stack, aiohttp.ClientSession() as s:
        t0 = time.perf_counter()
        async with s.post(stack.url + "/v1/completions", json=GOOD, timeout=aiohttp.ClientTimeout(total=20)) as r:
            assert r.status == 200
            assert r.headers["x-served-by"] == good.address
            await r.read()
        assert time.perf_counter() - t0 < 10
        assert len(stalled.seen) == 1


@pytest.mark.parametrize("key", [b'"kv_transfer_params"', b'"kv_transfer_param\\u0073"', b'"vllm_xargs"'])
async def test_client_engine_fields_never_reach_a_pod(fake_pods, key):
    """Why 1: the picker removes engine-internal fields at the JSON level and re-sends a correct body."""
    evil = (b'{"model": "llama-3.1-8b", "prompt": "hi", "max_tokens": 2, ' + key
            + b': {"do_remote_prefill": true, "do_remote_decode": true, "remote_host": "6.6.6.6", "remote_port": 1}}')
    async with envoy_stack([p.address for p in fake_pods]) as stack, aiohttp.ClientSession() as s:
        async with s.post(stack.url + "/v1/completions", data=evil,
                          headers={"content-type": "application/json"}) as r:
            assert r.status == 200, await r.text()
        seen = [x for p in fake_pods for x in p.seen]
        assert len(seen) == 1
        doc = orjson.loads(seen[0].body)
        assert doc == {"model": "llama-3.1-8b", "prompt": "hi", "max_tokens": 2}
        assert b"6.6.6.6" not in seen[0].body
        assert "content-length" not in seen[0].headers or int(seen[0].headers["content-length"]) == len(seen[0].body)


async def test_token_ids_out_of_range_are_a_400_that_says_why(fake_pods):
    """Why 6: token ids holding 2^64-1 get a 400 naming the value, not a 503 picker_error."""
    async with envoy_stack([p.address for p in fake_pods]) as stack, aiohttp.ClientSession() as s:
        for prompt in ([1, 2, 2**64 - 1], [[5, 6], [-1]]):
            async with s.post(stack.url + "/v1/completions", json={"model": "m", "prompt": prompt}) as r:
                assert r.status == 400
                err = _openai_error(await r.read())
                assert err["param"] == "prompt" and "token ids" in err["message"]
        assert all(p.seen == [] for p in fake_pods)


async def test_more_requests_than_envoys_default_circuit_breaker_are_in_flight_at_the_pods_at_once(fake_pods):
    """A fleet of a few dozen pods runs thousands of streams at once; Envoy's default circuit breaker let the
    pool cluster hold 1,024 requests in flight (the next 1,024 waited, then 503) and retry 3 at once. The pool
    takes what the pods take (vLLM's scheduler and the picker's flow control bound the load): here 1,100
    requests are in flight at the two pods at once, then all answered. They arrive 100 at a time: a burst of
    1,100 new ext_proc streams at once is the picker's question (tests/extproc/test_extproc_server.py, the
    burst that arrives while its loop is busy; all at once here, 4 of 10 runs with both cores busy lost 1-2
    requests to it before extproc/server.py's MAX_PENDING_CALLS, 0 of 10 after)."""
    n = 1100
    gate = asyncio.Event()
    for pod in fake_pods:
        pod.gate = gate
    async with envoy_stack([p.address for p in fake_pods]) as stack, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def one() -> int:
            async with s.post(stack.url + "/v1/completions", json=GOOD) as r:
                await r.read()
                return r.status

        statuses = await all_held_at_once(one, n, lambda: sum(p.holding for p in fake_pods), gate.set, "the pods",
                                          wave=100)
        assert statuses == [200] * n
