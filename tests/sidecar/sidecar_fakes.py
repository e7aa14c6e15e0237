"""Small aiohttp fakes for the prefill pod and the local decode engine, bound to free ports."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

Handler = Callable[[web.Request, "FakeServer"], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    """One request a fake received."""

    method: str
    path: str
    headers: CIMultiDict[str]
    body: bytes

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class FakeServer:
    address: str = ""
    seen: list[Seen] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(obj), content_type="application/json")


async def prefill_ok(request: web.Request, server: FakeServer) -> web.Response:
    """A NIXL producer: answers one token and the params the decode side needs."""
    return json_response({
        "id": "cmpl-p", "object": "text_completion", "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 40, "completion_tokens": 1, "total_tokens": 41,
                  "prompt_tokens_details": {"cached_tokens": 32}},
        "kv_transfer_params": {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [3, 4, 5],
                               "remote_engine_id": "engine-p1", "remote_host": "10.1.2.3", "remote_port": 5600,
                               "tp_size": 1},
    })


async def decode_json(request: web.Request, server: FakeServer) -> web.Response:
    return json_response({
        "id": "cmpl-d", "object": "text_completion",
        "choices": [{"index": 0, "text": "hello", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 40, "completion_tokens": 5, "total_tokens": 45,
                  "prompt_tokens_details": {"cached_tokens": 40}},
    })


async def decode_sse(request: web.Request, server: FakeServer) -> web.StreamResponse:
    """Three SSE chunks; waits for ``state['release']`` (if set) between the first and the rest."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(b'data: {"choices":[{"index":0,"text":"a"}]}\n\n')
    release: asyncio.Event | None = server.state.get("release")
    if release is not None:
        await asyncio.wait_for(release.wait(), 5)
    await resp.write(b'data: {"choices":[{"index":0,"text":"b"}]}\n\n')
    await resp.write(b'data: {"choices":[],"usage":{"prompt_tokens":40,"completion_tokens":2,'
                     b'"total_tokens":42,"prompt_tokens_details":{"cached_tokens":40}}}\n\ndata: [DONE]\n\n')
    await resp.write_eof()
    return resp


