"""Picker down: fail-open still serves (round robin over the pool), fail-closed fails fast."""

from __future__ import annotations

import time

import aiohttp
import pytest

from e2e.support.envoy import EnvoyProcess
from e2e.support.picker import LEAST_INFLIGHT, picker_config, running_picker
from extproc.envoyconfig.builder import EnvoyConfigOptions

pytestmark = pytest.mark.envoy
GOOD = {"model": "llama-3.1-8b", "prompt": "hi", "max_tokens": 2}


@pytest.mark.parametrize("fail_open", [True, False])
async def test_picker_down(fake_pods, fail_open):
    pool = [p.address for p in fake_pods]
    cfg = picker_config(pool, LEAST_INFLIGHT)
    async with running_picker(cfg) as picker:
        opts = EnvoyConfigOptions(picker=picker.address, endpoints=pool, fail_open=fail_open)
        envoy = EnvoyProcess(opts)
        await envoy.start()
    try:
        await envoy.wait_picker_health(False)
        async with aiohttp.ClientSession() as s:
            t0 = time.perf_counter()
            async with s.post(envoy.url + "/v1/completions", json=GOOD) as r:
                status = r.status
                served_by = r.headers.get("x-served-by")
            elapsed = time.perf_counter() - t0
        if fail_open:
            assert status == 200 and served_by in pool
        else:
            assert status >= 500 and served_by is None
            assert all(p.seen == [] for p in fake_pods)
        assert elapsed < 2.0
    finally:
        await envoy.stop()
