"""Fixtures: fake servers and sidecars on free ports, all stopped at the end of each test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict

from engine.sidecar import Sidecar, SidecarConfig
from tests.sidecar.sidecar_fakes import FakeServer, Handler, Seen


@pytest.fixture
async def fakes() -> AsyncIterator[Callable[[Handler], Awaitable[FakeServer]]]:
    """Start fake servers on free ports; all stop at the end of the test."""
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> FakeServer:
        server = FakeServer()

        async def record(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            server.seen.append(Seen(request.method, request.path, CIMultiDict(request.headers), body))
            return await handler(request, server)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", record)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        server.address = f"127.0.0.1:{runner.addresses[0][1]}"
        return server

    try:
        yield start
    finally:
        for runner in runners:
            await runner.cleanup()


@pytest.fixture
async def sidecars() -> AsyncIterator[Callable[..., Awaitable[Sidecar]]]:
    started: list[Sidecar] = []

    async def start(decode: FakeServer, **kw: Any) -> Sidecar:
        kw.setdefault("retry_backoff_s", 0.001)
        sc = Sidecar(SidecarConfig(decode_url=f"http://{decode.address}", **kw))
        await sc.start()
        started.append(sc)
        return sc

    try:
        yield start
    finally:
        for sc in started:
            await sc.stop()
