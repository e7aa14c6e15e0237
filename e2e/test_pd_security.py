"""A client cannot pick a prefill pod: a client-sent ``x-prefiller-host-port`` naming a host outside the
pool reaches nothing, through the whole path (Envoy -> kvswitch prefill-decode -> decode sidecar -> sim
pods), whether or not the picker itself chooses a prefill leg."""

from __future__ import annotations

import aiohttp
import pytest

from e2e.support.ports import free_ports
from e2e.support.upstream import FakeUpstream
from extproc.localstack import LocalStack, StackOptions

pytestmark = [pytest.mark.envoy, pytest.mark.slow]


async def test_client_prefiller_header_reaches_no_outside_host():
    outsider = FakeUpstream(free_ports(1)[0])
    await outsider.start()
    try:
        async with LocalStack(StackOptions(pd=(1, 1), port=0, time_scale=0.05)) as stack, \
                aiohttp.ClientSession() as s:
            assert stack.pd_handler == "prefill-decode"
            prefill = {p.address for p in stack.pods if p.role == "prefill"}
            decode = {p.address for p in stack.pods if p.role == "decode"}
            hdrs = {"x-prefiller-host-port": outsider.address, "x-gateway-destination-endpoint": outsider.address}
            for prompt, leg in (("short prompt", False), ("a long shared document " * 600, True)):
                body = {"model": stack.options.model_name, "prompt": prompt, "max_tokens": 3}
                async with s.post(stack.url + "/completions", json=body, headers=hdrs) as r:
                    assert r.status == 200, await r.text()
                    assert r.headers["x-kvswitch-endpoint"] in decode
                    got = r.headers.get("x-kvswitch-prefill-endpoint")
                    assert (got in prefill) if leg else got is None, dict(r.headers)
            assert outsider.seen == []
    finally:
        await outsider.stop()
