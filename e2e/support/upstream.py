"""A tiny OpenAI-like upstream (aiohttp) for tests that need exact bytes or when the simulator is absent.

Every request's raw body is recorded (except scrapes of ``/metrics``, which answer vLLM's gauges with the
requests it holds as ``num_requests_waiting``); responses name the pod that served them (``x-served-by`` header and
``system_fingerprint``), stream SSE when asked, and carry ``usage`` like vLLM.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from engine import VLLM_LISTEN_BACKLOG


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeUpstream:
    port: int
    host: str = "127.0.0.1"
    tokens: int = 3
    delay_s: float = 0.0
    fail_status: int | None = None  # answer every request with this status (a failing pod)
    stall: bool = False  # accept, read the request, then never answer (a stalled pod)
    usage_override: object = None  # put this as the final SSE event's "usage" (a pod with odd usage)
    skip_done: bool = False  # end a stream without the [DONE] event
    seen: list[Seen] = field(default_factory=list)
    max_seen: int = 1000
    holding: int = 0  # POSTs not yet answered (reported as vllm:num_requests_waiting)
    gate: asyncio.Event | None = None  # answer only once it is set (every request held in flight here until then)
    _runner: web.AppRunner | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        # a pod's accept queue, not aiohttp's 128: a burst of Envoy's connections is taken as a pod takes it
        await web.TCPSite(self._runner, self.host, self.port, backlog=VLLM_LISTEN_BACKLOG).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "GET" and request.path == "/metrics":
            text = (f'vllm:num_requests_running{{model_name="m"}} 0\n'
                    f'vllm:num_requests_waiting{{model_name="m"}} {self.holding}\n'
                    f'vllm:kv_cache_usage_perc{{model_name="m"}} 0.0\n')
            return web.Response(text=text, content_type="text/plain")
        self.holding += 1
        try:
            return await self._answer(request)
        finally:
            self.holding -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if len(self.seen) < self.max_seen:
            self.seen.append(Seen(request.path, {k.lower(): v for k, v in request.headers.items()}, body))
        if self.stall:
            await asyncio.Event().wait()  # cancelled when the client or Envoy gives up
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_status is not None:
            return web.json_response({"error": {"message": "pod failure", "type": "server_error", "param": None,
                                                "code": None}}, status=self.fail_status,
                                     headers={"x-served-by": self.address})
        if request.method == "GET":
            return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]},
                                     headers={"x-served-by": self.address})
        doc = orjson.loads(body) if body else {}
        n = min(int(doc.get("max_tokens") or doc.get("max_completion_tokens") or self.tokens), 64)
        chat = "chat" in request.path
        usage = {"prompt_tokens": len(body) // 4, "completion_tokens": n, "total_tokens": len(body) // 4 + n,
                 "prompt_tokens_details": {"cached_tokens": 0}}
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        base = {"id": "cmpl-1", "created": int(time.time()), "model": doc.get("model", ""),
                "system_fingerprint": self.address}
        if not doc.get("stream"):
            choice = ({"index": 0, "message": {"role": "assistant", "content": "x" * n}, "finish_reason": "length"}
                      if chat else {"index": 0, "text": "x" * n, "finish_reason": "length"})
            return web.Response(body=orjson.dumps({**base, "object": "chat.completion" if chat else
                                                   "text_completion", "choices": [choice], "usage": usage}),
                                content_type="application/json", headers={"x-served-by": self.address})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "x-served-by": self.address})
        await resp.prepare(request)
        for _ in range(n):
            choice = ({"index": 0, "delta": {"content": "x"}, "finish_reason": None} if chat
                      else {"index": 0, "text": "x", "finish_reason": None})
            await resp.write(b"data: " + orjson.dumps({**base, "choices": [choice]}) + b"\n\n")
        final_usage = usage if self.usage_override is None else self.usage_override
        await resp.write(b"data: " + orjson.dumps({**base, "choices": [], "usage": final_usage}) + b"\n\n")
        if not self.skip_done:
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
