"""server.response_body access-log, skip and observe through real Envoy: which messages reach the picker, and
whether every request still ends (in-flight released, on_finished once) with first token and usage where the
mode brings them (observe: from the chunks; access-log: from Envoy's Lua observer and access log)."""

from __future__ import annotations

import asyncio
import collections

import aiohttp
import orjson
import pytest
from prometheus_client import REGISTRY

from e2e.support.envoy import EnvoyProcess
from e2e.support.picker import LEAST_INFLIGHT, picker_config, running_picker
from e2e.support.ports import dead_address
from e2e.support.stack import RecordingScheduler
from extproc.envoyconfig.builder import EnvoyConfigOptions
from extproc.server import build_scheduler
from extproc.stream import ExtProcStream

pytestmark = pytest.mark.envoy
MODEL = "llama-3.1-8b"


@pytest.fixture
def message_counts(monkeypatch):
    """Count every ext_proc message the picker receives, by kind."""
    counts: collections.Counter[str] = collections.Counter()
    handle = ExtProcStream.handle

    async def counting(self, req):
        counts[req.WhichOneof("request")] += 1
        return await handle(self, req)

    monkeypatch.setattr(ExtProcStream, "handle", counting)
    return counts


async def _stack(pool: list[str], mode: str, stack):
    """``mode``: an ext_proc response mode, or ext-authz (Envoy's ext_authz filter, outcomes from the access log)."""
    authz = mode == "ext-authz"
    body_mode = "access-log" if authz else mode
    cfg = picker_config(pool, LEAST_INFLIGHT, response_body=body_mode, debug_headers=True)
    sched = RecordingScheduler(build_scheduler(cfg))
    picker = await stack.enter_async_context(running_picker(cfg, sched))
    envoy = await stack.enter_async_context(EnvoyProcess(EnvoyConfigOptions(
        picker=picker.address, endpoints=pool, response_body=body_mode,
        picker_protocol="ext-authz" if authz else "ext-proc",
        picker_decide=[f"127.0.0.1:{picker.decide_port}"] if authz else [])))
    return envoy, sched


def _inflight(pool: list[str]) -> float:
    return sum(REGISTRY.get_sample_value("kvswitch_inflight_requests", {"endpoint": a}) or 0.0 for a in pool)


async def _settled(sched: RecordingScheduler, n: int, pool: list[str]) -> None:
    """The picker learns the end when the ext_proc stream closes, just after the client has its last byte."""
    for _ in range(200):
        if len(sched.finished) + len(sched.failed) >= n and _inflight(pool) == 0:
            return
        await asyncio.sleep(0.01)


def _body(stream: bool, chat: bool) -> dict:
    doc = {"model": MODEL, "stream": stream, "max_tokens": 8}
    if chat:
        doc["messages"] = [{"role": "user", "content": "hello there"}]
    else:
        doc["prompt"] = "hello there"
    if stream:
        doc["stream_options"] = {"include_usage": True}
    return doc


@pytest.mark.parametrize("mode", ["ext-authz", "access-log", "skip", "observe"])
async def test_requests_end_and_release_load_in_every_mode(sim_pods, message_counts, mode):
    import contextlib

    async with contextlib.AsyncExitStack() as stack:
        envoy, sched = await _stack(sim_pods, mode, stack)
        cases = [(False, False), (True, False), (False, True), (True, True)]
        async with aiohttp.ClientSession() as s:
            for i, (stream, chat) in enumerate(cases, 1):
                path = "/v1/chat/completions" if chat else "/v1/completions"
                async with s.post(envoy.url + path, json=_body(stream, chat)) as r:
                    text = await r.text()
                    assert r.status == 200, text
                    assert r.headers["x-kvswitch-endpoint"] in sim_pods
                if stream:
                    assert text.rstrip().endswith("data: [DONE]")
                else:
                    assert orjson.loads(text)["usage"]["completion_tokens"] > 0
                await _settled(sched, i, sim_pods)
                assert len(sched.finished) == i and sched.failed == []
                assert _inflight(sim_pods) == 0
                assert not sched.inner.dl.inflight.requests.any()  # the picker's own load released too
        assert sched.first_tokens == len(cases)
        if mode == "ext-authz":  # no ext_proc stream at all; first token and usage from the access log
            assert sum(message_counts.values()) == 0
            assert all(u is not None and u.completion_tokens == 8 and u.prompt_tokens > 0 for u in sched.finished)
        elif mode == "access-log":  # nothing of the response on the ext_proc stream; first token and usage
            # from the access log
            assert set(message_counts) == {"request_headers", "request_body"}
            assert message_counts["request_headers"] == len(cases)
            assert all(u is not None and u.completion_tokens == 8 and u.prompt_tokens > 0 for u in sched.finished)
        elif mode == "skip":
            assert message_counts["request_headers"] == len(cases)
            assert message_counts["response_body"] == 0
            assert sched.finished == [None] * len(cases)  # usage is not observed
        else:
            assert message_counts["request_headers"] == len(cases)
            assert message_counts["response_body"] >= len(cases)
            assert all(u is not None and u.completion_tokens > 0 for u in sched.finished)


async def _request_to_a_dead_pod(mode: str, stack):
    """One streamed request to a pool whose only pod is gone (Envoy answers 503 itself after its connect
    retries); returns once the picker recorded its end and released its load."""
    pool = [dead_address()]
    envoy, sched = await _stack(pool, mode, stack)
    async with aiohttp.ClientSession() as s:
        async with s.post(envoy.url + "/v1/completions", json=_body(True, False)) as r:
            assert r.status == 503
            await r.read()
    await _settled(sched, 1, pool)
    assert _inflight(pool) == 0
    return envoy, sched


async def test_skip_error_status_is_a_failure_and_rejections_still_work(message_counts):
    """An error status is known from the response headers alone: on_failed, load released, no body read."""
    import contextlib

    async with contextlib.AsyncExitStack() as stack:
        envoy, sched = await _request_to_a_dead_pod("skip", stack)
        assert sched.failed == ["http 503"] and sched.finished == [] and sched.first_tokens == 0
        async with aiohttp.ClientSession() as s:
            async with s.post(envoy.url + "/v1/completions", data=b"{nope",
                              headers={"content-type": "application/json"}) as r:
                assert r.status == 400
                assert (await r.json())["error"]["code"] == "invalid_json"
        assert message_counts["response_body"] == 0


@pytest.mark.parametrize("mode", ["access-log", "ext-authz"])
async def test_access_log_brings_cached_tokens_failures_and_truncation(sim_pods, message_counts, mode):
    """access-log mode (ext_proc or ext_authz): a repeated prompt's usage carries the cached tokens the pod
    reported; a pod that is gone is a failure that blames it; load is released every time; no response message
    reaches the picker."""
    import contextlib

    prompt = "the same long shared prefix " * 40
    async with contextlib.AsyncExitStack() as stack:
        envoy, sched = await _stack(sim_pods[:1], mode, stack)
        async with aiohttp.ClientSession() as s:
            for i in (1, 2):
                doc = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "stream": True,
                       "stream_options": {"include_usage": True}}
                async with s.post(envoy.url + "/v1/completions", json=doc) as r:
                    assert r.status == 200
                    assert r.headers["x-kvswitch-endpoint"] == sim_pods[0]  # debug headers via Lua
                    await r.read()
                await _settled(sched, i, sim_pods[:1])
        first, second = sched.finished
        assert first is not None and second is not None
        assert first.cached_tokens < second.cached_tokens  # the second found the first's blocks
        assert second.cached_tokens >= 16 and second.prompt_tokens == first.prompt_tokens
        assert sched.failed == [] and _inflight(sim_pods[:1]) == 0
    async with contextlib.AsyncExitStack() as stack:
        envoy, sched = await _request_to_a_dead_pod(mode, stack)
        assert sched.finished == [] and sched.first_tokens == 0
        assert sched.failed == ["upstream connection failure"]  # from the access log's response flags
    # nothing of the responses (and with ext_authz no ext_proc message at all)
    assert set(message_counts) == ({"request_headers", "request_body"} if mode == "access-log" else set())
