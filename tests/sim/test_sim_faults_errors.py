"""Faults changed at run time, and bad input answered like vLLM while the pod keeps serving."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from e2e.support.waits import until
from engine.sim.spec import PodSpec

OK = {"model": "sim-model", "prompt": "hello", "max_tokens": 2}


async def status_of(s: aiohttp.ClientSession, url: str, **kw) -> tuple[int, dict | None]:
    async with s.post(url, **kw) as r:
        try:
            return r.status, await r.json(content_type=None)
        except ValueError:
            return r.status, None


async def test_error_rate_latency_and_events_off(fleet_factory, subscribe):
    fleet = await fleet_factory([PodSpec(name="p", seed=5)], time_scale=0.05)
    pod = fleet.pods[0]
    url = f"http://{pod.address}"
    sub = subscribe(pod.kv_events_endpoint)
    await sub.joined()
    async with aiohttp.ClientSession() as s:
        st, body = await status_of(s, f"{url}/sim/faults", json={"error_rate": 0.5, "error_status": 503})
        assert st == 200 and body["error_rate"] == 0.5
        codes = [(await status_of(s, f"{url}/v1/completions", json=OK))[0] for _ in range(40)]
        assert set(codes) == {200, 503} and 8 <= codes.count(503) <= 32
        st, body = await status_of(s, f"{url}/sim/faults", json={"error_rate": 1.0, "error_message": "boom"})
        st, body = await status_of(s, f"{url}/v1/completions", json=OK)
        assert st == 503 and body["error"]["message"] == "boom" and body["error"]["code"] == 503
        # bad settings are refused and change nothing
        st, body = await status_of(s, f"{url}/sim/faults", json={"error_rate": 2})
        assert st == 400 and pod.faults.config.error_rate == 1.0
        st, body = await status_of(s, f"{url}/sim/faults", json={"nope": 1})
        assert st == 400 and "nope" in body["error"]["message"]
        await status_of(s, f"{url}/sim/faults", json={"reset": True, "latency_s": 4.0})  # 0.2 s wall
        t = time.perf_counter()
        st, _ = await status_of(s, f"{url}/v1/completions", json=OK)
        assert st == 200 and time.perf_counter() - t >= 0.2
        await sub.drain()
        pod.faults.update(latency_s=0.0, events_enabled=False)
        seq_before = pod.publisher.seq
        st, _ = await status_of(s, f"{url}/v1/completions", json={**OK, "prompt": "x" * 400})
        assert st == 200 and await sub.drain() == [] and pod.publisher.seq == seq_before
        pod.faults.update(events_enabled=True)
        st, _ = await status_of(s, f"{url}/v1/completions", json={**OK, "prompt": "y" * 400})
        assert [seq for seq, _ in await sub.drain()] == [seq_before]


async def _until(cond, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_crash_and_restart(fleet_factory, subscribe):
    fleet = await fleet_factory([PodSpec(name="p", seed=5)], time_scale=0.05)
    pod = fleet.pods[0]
    url = f"http://{pod.address}"
    sub = subscribe(pod.kv_events_endpoint)
    await sub.joined()
    prompt = "z" * 800
    async with aiohttp.ClientSession() as s:
        st, _ = await status_of(s, f"{url}/v1/completions", json={**OK, "prompt": prompt})
        assert st == 200 and [q for q, _ in await sub.drain()] == [0]
        # A crash window long enough that a busy test machine cannot skip past it; transitions are polled.
        st, _ = await status_of(s, f"{url}/sim/faults", json={"crash_for_s": 1.5})
        assert st == 200
        await _until(lambda: pod.crashed, 1.0)
        with pytest.raises(aiohttp.ClientConnectionError):
            await status_of(s, f"{url}/v1/completions", json=OK)
        await _until(lambda: not pod.crashed, 5.0)
        st, body = await status_of(s, f"{url}/v1/completions", json={**OK, "prompt": prompt})
        assert st == 200 and body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # cache gone
        assert [q for q, _ in await sub.drain()] == [0]  # sequence restarted
    await pod.crash()
    await pod.restart()
    assert pod.publisher.seq == 0 and pod.core.stats().prefix_queries == 0


async def test_crash_ends_inflight_streams(fleet_factory):
    fleet = await fleet_factory([PodSpec(name="p")], time_scale=0.2)
    pod = fleet.pods[0]
    async with aiohttp.ClientSession() as s:
        async def long_stream():
            async with s.post(f"http://{pod.address}/v1/completions",
                              json={**OK, "max_tokens": 500, "stream": True}) as r:
                return await r.read()

        task = asyncio.create_task(long_stream())
        await until(lambda: pod.core.stats().num_running == 1)  # the stream is being decoded
        await pod.crash()
        try:
            body = await asyncio.wait_for(task, 5)
            assert b"[DONE]" not in body
        except aiohttp.ClientError:
            pass
        assert pod.core.stats().num_running == 0
        await pod.restart()
        st, _ = await status_of(s, f"http://{pod.address}/v1/completions", json=OK)
        assert st == 200


BAD = [  # (body, status, error type, param) as vLLM 0.32 answers (e2e/vllm_facts.md)
    (b"not json", 400, "Bad Request", "body.1"),
    (b"[1, 2]", 400, "Bad Request", "body"),
    (b'{"model": "other", "prompt": "x"}', 404, "NotFoundError", "model"),
    (b'{"model": "sim-model"}', 400, "BadRequestError", "prompt"),
    (b'{"model": "sim-model", "prompt": "x", "max_tokens": 0}', 400, "BadRequestError", "max_tokens"),
    (b'{"model": "sim-model", "prompt": "x", "max_tokens": -3}', 400, "BadRequestError", "max_tokens"),
    (b'{"model": "sim-model", "prompt": "x", "max_tokens": "5"}', 400, "Bad Request", "body.max_tokens"),
    (b'{"model": "sim-model", "prompt": "x", "n": 2}', 400, "BadRequestError", "n"),
    (b'{"model": "sim-model", "prompt": ""}', 400, "BadRequestError", "prompt"),
    (b'{"model": "sim-model", "prompt": [1, -1]}', 400, "Bad Request", "body.prompt"),
    (b'{"model": "sim-model", "prompt": ["a", "b"]}', 400, "BadRequestError", "prompt"),
    (b'{"model": "sim-model", "prompt": "x", "stream": "yes"}', 400, "Bad Request", "body.stream"),
    (b'{"model": "sim-model", "prompt": "x", "stream_options": {"include_usage": true}}', 400, "Bad Request",
     "body.stream_options"),
    (b'{"model": "sim-model", "prompt": "x", "kv_transfer_params": 3}', 400, "Bad Request",
     "body.kv_transfer_params"),
]


@pytest.mark.parametrize("raw,status,etype,param", BAD)
async def test_bad_completions_input(fleet_factory, raw, status, etype, param):
    fleet = await fleet_factory([PodSpec(name="p", num_blocks=64)], time_scale=0.05)
    pod = fleet.pods[0]
    async with aiohttp.ClientSession() as s:
        st, body = await status_of(s, f"http://{pod.address}/v1/completions", data=raw,
                                   headers={"Content-Type": "application/json"})
        assert st == status
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
        assert (err["type"], err["param"]) == (etype, param)
        st, _ = await status_of(s, f"http://{pod.address}/v1/completions", json=OK)
        assert st == 200
    assert pod.core.stats().num_waiting == 0 and pod.core.stats().kv_usage == 0.0


async def test_too_long_prompt_and_bad_chat(fleet_factory):
    fleet = await fleet_factory([PodSpec(name="p", num_blocks=64)], time_scale=0.05)  # max_model_len 1024
    pod = fleet.pods[0]
    base = f"http://{pod.address}/v1"
    async with aiohttp.ClientSession() as s:
        st, body = await status_of(s, f"{base}/completions", json={**OK, "prompt": list(range(1, 1100))})
        assert st == 400 and "maximum context length is 1024" in body["error"]["message"]
        assert body["error"]["param"] == "input_tokens"
        # prompt fits, prompt + max_tokens does not: vLLM clamps max_tokens silently
        st, body = await status_of(s, f"{base}/completions", json={**OK, "prompt": list(range(1, 1015)),
                                                                  "max_tokens": 100})
        assert st == 200 and body["usage"]["completion_tokens"] == 10
        # completions default to 16 tokens
        st, body = await status_of(s, f"{base}/completions", json={"prompt": "x", "model": "sim-model"})
        assert st == 200 and body["usage"]["completion_tokens"] == 16
        for bad in ({"model": "sim-model"}, {"model": "sim-model", "messages": []},
                    {"model": "sim-model", "messages": ["hi"]}):
            st, body = await status_of(s, f"{base}/chat/completions", json=bad)
            assert st == 400 and body["error"]["param"] == "body.messages"
        st, body = await status_of(s, f"{base}/chat/completions",
                                   json={"model": "sim-model", "messages": [{"role": "user", "content": "hi"}],
                                         "max_completion_tokens": 2})
        assert st == 200 and body["usage"]["completion_tokens"] == 2
        # omitting "model" serves the default model, as vLLM does
        st, body = await status_of(s, f"{base}/completions", json={"prompt": "x", "max_tokens": 1})
        assert st == 200 and body["model"] == "sim-model"


async def test_overload_gets_503(fleet_factory):
    fleet = await fleet_factory([PodSpec(name="p", max_pending=2)], time_scale=0.5)
    pod = fleet.pods[0]
    async with aiohttp.ClientSession() as s:
        url = f"http://{pod.address}/v1/completions"
        long = asyncio.gather(*(status_of(s, url, json={**OK, "max_tokens": 40}) for _ in range(2)))
        task = asyncio.ensure_future(long)
        await until(lambda: pod.core.stats().num_running + pod.core.stats().num_waiting == 2)
        st, body = await status_of(s, url, json=OK)
        assert st == 503 and body["error"]["code"] == 503
        assert [c for c, _ in await task] == [200, 200]
