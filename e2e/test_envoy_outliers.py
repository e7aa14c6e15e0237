"""Through real Envoy with simulated pods: a pod that answers 500 to everything (while its /metrics stays
good) leaves rotation and stays out; clients see no error (issue 14, "Why" 4)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from e2e.conftest import SIM_MODEL
from e2e.support.stack import envoy_stack

pytestmark = pytest.mark.envoy


async def _client(s: aiohttp.ClientSession, url: str, until: float, out: dict[str, int]) -> None:
    body = {"model": SIM_MODEL, "prompt": "tell me a story", "max_tokens": 4, "stream": True}
    while time.perf_counter() < until:
        try:
            async with s.post(url + "/v1/completions", json=body) as r:
                data = await r.read()
                ok = r.status == 200 and data.endswith(b"data: [DONE]\n\n")
        except aiohttp.ClientError:
            ok = False
        out["ok" if ok else "failed"] += 1


async def test_pod_failing_every_request_is_ejected_and_clients_see_no_error():
    from engine.sim.fleet import PodSpec, SimFleet

    specs = [PodSpec(name=f"pod-{i}", port=0, kv_events_port=None, model_name=SIM_MODEL) for i in range(3)]
    async with SimFleet(specs, time_scale=0.05) as fleet:
        bad = fleet.pods[0]
        bad.faults.update(error_rate=1.0, error_status=500)
        pool = [p.address for p in fleet.pods]
        async with envoy_stack(pool, simple=False) as stack, aiohttp.ClientSession() as s:
            t0 = time.perf_counter()
            counts = {"ok": 0, "failed": 0}
            await asyncio.gather(*(_client(s, stack.url, t0 + 6.0, counts) for _ in range(6)))
            after = [e for t, e in stack.scheduler.routed if t >= t0 + 2.0]
            share = sum(e == bad.address for e in after) / max(1, len(after))
            print(f"\n500-pod figure: {len(after)} decisions after 2 s, {share:.2%} to the failing pod; "
                  f"client requests ok={counts['ok']} failed={counts['failed']}")
            assert len(after) >= 50
            assert share <= 0.01
            assert counts["failed"] == 0
