"""The picker's ext_authz front (extproc/authz.py) through the real Envoy (picker_protocol ext-authz): the chosen
pod gets the request byte for byte, bad input gets the picker's OpenAI error and changes nothing, a director bug
is a 503 (Envoy's: ext_authz counts a 5xx answer as a failed check) and the next request is served, a client
cannot steer, a request flow control holds is decided before Envoy's call gives up, and a picker that is gone
is a clean 503 (fail-closed) or round robin (fail-open). The 429s of
admission and bad SLO headers through this front are in test_envoy_slo.py, the outcomes from the access log in
test_envoy_response_body.py."""

from __future__ import annotations

import time

import aiohttp
import numpy as np
import orjson
import pytest

from e2e.support.picker import LEAST_INFLIGHT
from e2e.support.stack import envoy_stack
from e2e.support.waits import all_held_at_once, until
from pickers.flowcontrol import Room

pytestmark = pytest.mark.envoy
AUTHZ = {"picker_protocol": "ext-authz"}
DOC = {"model": "m", "prompt": "hello there", "max_tokens": 2}


async def _error(r: aiohttp.ClientResponse) -> dict:
    assert r.headers["content-type"].startswith("application/json"), r.headers
    doc = orjson.loads(await r.read())
    assert set(doc["error"]) == {"message", "type", "param", "code"}, doc
    return doc["error"]


async def test_routes_to_the_chosen_pod_with_the_body_untouched(fake_pods):
    pool = [p.address for p in fake_pods]
    async with envoy_stack(pool, envoy=AUTHZ) as stack, aiohttp.ClientSession() as s:
        body = orjson.dumps({**DOC, "prompt": "é ünïcode \u2028 " * 50})
        for _ in range(4):
            async with s.post(stack.url + "/v1/completions", data=body,
                              headers={"content-type": "application/json", "x-slo-ttft-ms": "5000"}) as r:
                assert r.status == 200, await r.text()
                chosen = r.headers["x-kvswitch-endpoint"]  # the picker's debug header, on success only
                await r.read()
            pod = next(p for p in fake_pods if p.address == chosen)
            seen = pod.seen[-1]
            assert seen.body == body  # not re-serialised: ext_authz never touches the body
            assert seen.headers["x-gateway-destination-endpoint"].split(",")[0] == chosen
        await stack.ended(4)
        assert len(stack.scheduler.finished) == 4 and stack.scheduler.failed == []


@pytest.mark.parametrize("data,status,code", [
    (b"{nope", 400, "invalid_json"),
    (orjson.dumps({**DOC, "kv_transfer_params": {"do_remote_prefill": True, "remote_host": "10.9.9.9"}}), 400,
     "invalid_request_field"),  # engine-internal: ext_authz cannot strip it, so it is refused
    (orjson.dumps({**DOC, "prompt": "x" * 300_000}), 413, "request_too_large"),
])
async def test_bad_input_is_the_pickers_error_and_changes_nothing(fake_pods, data, status, code):
    pool = [p.address for p in fake_pods]
    async with envoy_stack(pool, envoy=AUTHZ, server={"body_limit_bytes": 200_000}) as stack, \
            aiohttp.ClientSession() as s:
        async with s.post(stack.url + "/v1/completions", data=data,
                          headers={"content-type": "application/json"}) as r:
            assert r.status == status
            err = await _error(r)
        assert err["code"] == code
        assert all(p.seen == [] for p in fake_pods) and stack.scheduler.routed == []
        async with s.post(stack.url + "/v1/completions", json=DOC) as r:  # the picker keeps serving
            assert r.status == 200
            await r.read()


async def test_a_director_bug_is_a_503_and_the_next_request_is_served(fake_pods, monkeypatch):
    pool = [p.address for p in fake_pods]
    async with envoy_stack(pool, envoy=AUTHZ) as stack, aiohttp.ClientSession() as s:
        route = stack.scheduler.route
        calls = 0

        async def flaky(request):
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("a bug")
            return await route(request)

        monkeypatch.setattr(stack.scheduler, "route", flaky)
        async with s.post(stack.url + "/v1/completions", json=DOC) as r:
            # ext_authz takes a 5xx answer for a failed check: Envoy's own 503 (status_on_error), OpenAI-shaped
            # by the local-reply mappers, without the picker's message; with fail-open the request would pass
            assert r.status == 503
            err = await _error(r)
            assert (err["code"], err["type"]) == ("ext_authz_error", "service_unavailable")
        async with s.post(stack.url + "/v1/completions", json=DOC) as r:
            assert r.status == 200
            await r.read()


async def test_a_client_cannot_steer_or_claim_the_pickers_headers(fake_pods):
    pool = [p.address for p in fake_pods]
    async with envoy_stack(pool, envoy=AUTHZ, picker_endpoints=pool[:1]) as stack, aiohttp.ClientSession() as s:
        steer = {"x-gateway-destination-endpoint": pool[1], "x-prefiller-host-port": "10.9.9.9:1",
                 "x-data-parallel-rank": "3", "x-kvswitch-prefill-signature": "forged"}
        for _ in range(3):
            async with s.post(stack.url + "/v1/completions", json=DOC, headers=steer) as r:
                assert r.status == 200
                await r.read()
        assert fake_pods[1].seen == [] and len(fake_pods[0].seen) == 3  # the picker knows only pool[0]
        for seen in fake_pods[0].seen:
            assert "x-prefiller-host-port" not in seen.headers and "x-data-parallel-rank" not in seen.headers
            assert "x-kvswitch-prefill-signature" not in seen.headers


@pytest.mark.parametrize("fail_open", [False, True])
async def test_a_picker_that_is_gone(fake_pods, fail_open):
    pool = [p.address for p in fake_pods]
    async with envoy_stack(pool, envoy=AUTHZ, fail_open=fail_open) as stack, aiohttp.ClientSession() as s:
        await stack.picker.stop(0)
        async with s.post(stack.url + "/v1/completions", json=DOC) as r:
            if fail_open:  # no decision: Envoy's own round robin over the listed pool
                assert r.status == 200
                await r.read()
            else:
                assert r.status == 503
                err = await _error(r)
                assert err["type"] == "service_unavailable"
        assert sum(len(p.seen) for p in fake_pods) == (1 if fail_open else 0)


@pytest.mark.parametrize("envoy_timeout_s,picker_timeout_s,status", [(13.0, 13.0, 200), (3.0, 10.0, 503)])
async def test_a_held_request_is_decided_before_envoys_call_gives_up(fake_pods, envoy_timeout_s, picker_timeout_s,
                                                                     status):
    """Flow control holds a request while no pod has room (here: never) and decides it by its deadline, the
    call's timeout less 2 s; Envoy waits for the answer as long as its config says: 13 s, past the 10 s that a
    retry policy on the call would impose on each try. A picker told a longer timeout than Envoy's (10 s against
    3) holds past it: Envoy gives up, the client gets a 503, nothing reaches a pod and the picker drops the
    request when the call goes (why both sides take one setting, server.decide_timeout_s and envoy-config
    --decide-timeout)."""
    pool = [p.address for p in fake_pods]
    scheduler = {**LEAST_INFLIGHT, "flow_control": {"enabled": True, "tick_ms": 5}}
    async with envoy_stack(pool, envoy={**AUTHZ, "decide_timeout_s": envoy_timeout_s}, scheduler=scheduler,
                           server={"decide_timeout_s": picker_timeout_s}) as stack, aiohttp.ClientSession() as s:
        flow = stack.scheduler.inner.flow
        assert flow is not None
        room = flow.usable
        flow.usable = lambda: Room(room().usable, np.zeros_like(room().roomy))  # no pod ever has room
        t0 = time.monotonic()
        async with s.post(stack.url + "/v1/completions", json=DOC) as r:
            assert r.status == status, await r.text()
            await r.read()
        waited = time.monotonic() - t0
        await until(lambda: flow.queued == 0)
        assert flow.held_total == 1
        # (bounds with room for the two processes' clocks: Envoy's 3-s timer once fired 2 ms early by ours)
        if status == 200:  # decided by its deadline, 11 s after it was held (past 10 s), asked once and served
            assert 10.5 < waited < 13.0
            assert sum(len(p.seen) for p in fake_pods) == 1
        else:  # Envoy gave up at its 3 s; the picker's 8 s were never reached
            assert 2.5 < waited < 8.0
            assert sum(len(p.seen) for p in fake_pods) == 0


async def test_more_requests_than_envoys_default_pool_can_be_held_by_the_picker_at_once(fake_pods):
    """Each decision in flight over ext_authz holds one HTTP/1.1 connection from Envoy to the picker's decide
    port. Past the knee flow control holds requests by the thousand, so Envoy must open as many connections as
    the picker's front accepts (extproc.http1.MAX_CONNECTIONS), and the front must take a burst of them. With
    Envoy's default circuit breaker (1,024 connections) 1,022 of 1,100 reached the picker, the rest waited in
    Envoy's pool, unseen by flow control, and 78 failed there; with the connections allowed but asyncio's accept
    queue of 100, 32 connects outlived Envoy's 1-s connect timeout (503). Here 1,100 requests are held at once,
    all of them in the picker, then served."""
    n = 1100
    pool = [p.address for p in fake_pods]
    scheduler = {**LEAST_INFLIGHT, "flow_control": {"enabled": True, "tick_ms": 5}}
    async with envoy_stack(pool, envoy=AUTHZ, scheduler=scheduler) as stack, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        flow = stack.scheduler.inner.flow
        assert flow is not None
        room = flow.usable
        flow.usable = lambda: Room(room().usable, np.zeros_like(room().roomy))  # no pod has room: all held

        async def one() -> int:
            async with s.post(stack.url + "/v1/completions", json=DOC) as r:
                await r.read()
                return r.status

        def room_again() -> None:  # every held request is released
            flow.usable = room

        assert await all_held_at_once(one, n, lambda: flow.queued, room_again, "the picker") == [200] * n
        assert flow.held_total == n and sum(len(p.seen) for p in fake_pods) == n
