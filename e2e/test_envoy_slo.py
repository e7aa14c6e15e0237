"""SLO targets and admission through the real Envoy: the picker's 429 (with Retry-After and an OpenAI error
body naming the target and the prediction) on a loaded fleet, requests without targets untouched by a
target rule, a saturation rule shedding them, and bad SLO headers as 400s."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from e2e.support.stack import envoy_stack
from e2e.support.upstream import FakeUpstream

pytestmark = pytest.mark.envoy


@pytest.fixture(params=["ext-proc", "ext-authz"])
def protocol(request) -> dict:
    """Both ways Envoy asks the picker give the client the same answers."""
    return {"picker_protocol": request.param}

# ~100K tokens by the picker's estimate: many seconds of prefill queued on an H100 8B pod. Long on purpose: in the
# access-log modes a routed prompt leaves the picker's in-flight prefill at its predicted first token, and a loaded
# machine can take a second or two to place the load and send the probe.
LONG = "x" * 400_000
SHORT = {"model": "m", "prompt": "y" * 4000, "max_tokens": 2}


async def _error(r: aiohttp.ClientResponse) -> dict:
    assert r.headers["content-type"].startswith("application/json")
    doc = orjson.loads(await r.read())
    assert set(doc["error"]) == {"message", "type", "param", "code"}
    return doc["error"]


async def _wait(cond, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)


def _slow(fake_pods: list[FakeUpstream], delay_s: float) -> None:
    for p in fake_pods:
        p.delay_s = delay_s


async def _load(s: aiohttp.ClientSession, url: str, fake_pods: list[FakeUpstream], per_pod: int) -> list[asyncio.Task]:
    """Long requests without targets, held by the pods: the picker counts their prefill as queued. Returns once
    every pod holds its share and has read each body (a pod counts a request as held before its long body is in,
    and records it as seen after)."""
    seen = sum(len(p.seen) for p in fake_pods)
    tasks = [asyncio.create_task(s.post(url + "/v1/completions", json={"model": "m", "prompt": LONG + str(i),
                                                                        "max_tokens": 2}))
             for i in range(per_pod * len(fake_pods))]
    await _wait(lambda: sum(p.holding for p in fake_pods) == len(tasks)
                and sum(len(p.seen) for p in fake_pods) == seen + len(tasks))
    assert all(p.holding == per_pod for p in fake_pods)  # spread evenly: every pod is loaded
    return tasks


async def _drain(tasks: list[asyncio.Task]) -> None:
    for resp in await asyncio.gather(*tasks):
        assert resp.status == 200  # the load itself was admitted (no targets) and served
        await resp.read()
        resp.release()


async def test_unmeetable_ttft_on_a_loaded_fleet_is_the_pickers_429_and_no_target_passes(fake_pods, protocol):
    sched = {"profile": "least-inflight", "admission": ["early"]}
    async with envoy_stack([p.address for p in fake_pods], scheduler=sched, envoy=protocol,
                           server={"body_limit_bytes": 1 << 20}) as stack, aiohttp.ClientSession() as s:
        probe = {"x-slo-ttft-ms": "300"}
        metric = stack.scheduler.inner.stats.rejections.labels("429", "slo_ttft_unattainable")
        before = metric._value.get()  # the process-wide registry: other tests count here too
        async with s.post(stack.url + "/v1/completions", json=SHORT, headers=probe) as r:
            assert r.status == 200  # idle fleet: a 1K-token prompt is predicted well under 300 ms
            await r.read()
        # its end reaches the picker in the next access-log batch: until then least-inflight counts it, and two
        # load requests sent meanwhile could both land on the other pod, leaving this one idle for the probe
        inflight = stack.scheduler.inner.dl.inflight
        await _wait(lambda: len(inflight) == 0)
        _slow(fake_pods, 2.0)
        load = await _load(s, stack.url, fake_pods, per_pod=1)
        seen = sum(len(p.seen) for p in fake_pods)
        async with s.post(stack.url + "/v1/completions", json=SHORT, headers=probe) as r:
            assert r.status == 429
            assert r.headers["retry-after"].isdigit() and 1 <= int(r.headers["retry-after"]) <= 60
            err = await _error(r)
        assert err["code"] == "slo_ttft_unattainable" and err["type"] == "rate_limit_exceeded"
        assert "TTFT target 300.0 ms cannot be met: predicted TTFT" in err["message"]
        assert sum(len(p.seen) for p in fake_pods) == seen  # no pod saw it
        # the same request without a target is not touched by a target rule, loaded fleet or not
        _slow(fake_pods, 0.0)
        async with s.post(stack.url + "/v1/completions", json=SHORT) as r:
            assert r.status == 200
            await r.read()
        await _drain(load)
        assert metric._value.get() - before == 1.0


async def test_a_saturation_rule_sheds_requests_without_targets(fake_pods, protocol):
    sched = {"profile": "least-inflight", "admission": [{"type": "stage-saturation", "queue_threshold": 1}],
             "datalayer": {"scrape_interval_ms": 20}}
    async with envoy_stack([p.address for p in fake_pods], scheduler=sched, envoy=protocol,
                           server={"body_limit_bytes": 1 << 20}) as stack, aiohttp.ClientSession() as s:
        _slow(fake_pods, 2.0)
        load = await _load(s, stack.url, fake_pods, per_pod=1)  # one waiting request per pod: S = 1
        waiting = stack.scheduler.inner.dl.metrics.waiting
        slots = stack.scheduler.inner.dl.endpoints.active_slots()
        await _wait(lambda: bool((waiting[slots] >= 1).all()))  # scraped
        async with s.post(stack.url + "/v1/completions", json=SHORT) as r:
            assert r.status == 429 and r.headers["retry-after"] == "1"
            err = await _error(r)
        assert err["code"] == "stage_saturated" and "saturated" in err["message"]
        await _drain(load)


@pytest.mark.parametrize("headers,param", [
    ({"x-slo-ttft-ms": "fast"}, "x-slo-ttft-ms"),
    ({"x-llm-d-slo-tpot-ms": "-1"}, "x-llm-d-slo-tpot-ms"),
    ({"x-llm-d-slo-ttft-ms": "100", "x-slo-ttft-ms": "200"}, "x-slo-ttft-ms"),
])
async def test_bad_slo_headers_are_400s_through_envoy(fake_pods, headers, param, protocol):
    async with envoy_stack([p.address for p in fake_pods], envoy=protocol) as stack, aiohttp.ClientSession() as s:
        async with s.post(stack.url + "/v1/completions", json=SHORT, headers=headers) as r:
            assert r.status == 400
            err = await _error(r)
        assert (err["code"], err["param"], err["type"]) == ("invalid_slo", param, "invalid_request_error")
        assert all(p.seen == [] for p in fake_pods)
        async with s.post(stack.url + "/v1/completions", json=SHORT, headers={"x-slo-ttft-ms": "5000"}) as r:
            assert r.status == 200
            await r.read()
