"""Shared builders for pickers tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
from aiohttp import web
from prometheus_client import CollectorRegistry

from pickers.clock import ManualClock
from pickers.config import build_scheduler
from pickers.state import RequestState
from pickers.types import Endpoint, InferenceRequest

BS = 16


@contextlib.asynccontextmanager
async def metrics_page(handler: Callable[[web.Request], Awaitable[web.Response]]) -> AsyncIterator[int]:
    """A real HTTP server on 127.0.0.1 answering GET /metrics with ``handler``; yields its port."""
    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


def endpoints(n: int, kv: bool = False, **kw: Any) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i + 1}:8000", kv_events=f"tcp://127.0.0.1:{9 + i}" if kv else None, **kw)
            for i in range(n)]


def scheduler(raw=None, eps=None, clock=None, **kw):
    clock = clock or ManualClock(1000.0)
    reg = CollectorRegistry()
    s = build_scheduler(raw, eps if eps is not None else endpoints(3), clock, network=False, registry=reg, **kw)
    s.test_registry = reg
    return s, clock


def request(rid: str, tokens: list[int] | np.ndarray | None = None, **kw: Any) -> InferenceRequest:
    if tokens is not None:
        kw["prompt_token_ids"] = [int(t) for t in tokens]
    kw.setdefault("model", "m")
    return InferenceRequest(request_id=rid, **kw)


def state(req: InferenceRequest) -> RequestState:
    """A fresh typed state for ``req``, as the director creates one."""
    return RequestState(req, req.request_id, req.arrival)


def stored(ehashes, tokens, parent=None, medium="GPU", positional=False):
    tokens = [int(t) for t in tokens]
    if positional:
        return ["BlockStored", list(ehashes), parent, tokens, BS, None, medium]
    return {"type": "BlockStored", "block_hashes": list(ehashes), "parent_block_hash": parent,
            "token_ids": tokens, "block_size": BS, "lora_id": None, "medium": medium}


def removed(ehashes, medium="GPU", positional=False):
    if positional:
        return ["BlockRemoved", list(ehashes), medium]
    return {"type": "BlockRemoved", "block_hashes": list(ehashes), "medium": medium}


def cleared(positional=False):
    return ["AllBlocksCleared"] if positional else {"type": "AllBlocksCleared"}
