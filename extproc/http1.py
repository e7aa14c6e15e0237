"""A small HTTP/1.1 server for the picker's decide front: httptools (llhttp, Node.js's parser) under an asyncio
protocol, no framework.

Why not aiohttp's server, which the front used before: Envoy's ext_authz filter asks once per client request,
and on the reference machine aiohttp's request and response machinery (a request object, multidicts, a payload
stream, the response's writer) cost ~70 us of CPU per request and ~100 us per round trip against ~30 us and
~65 us here: a twentieth of the picker's whole budget per request (DESIGN.md: 1 ms at 4 KB).

What it serves is narrow on purpose: requests from one Envoy, answered in order on keep-alive connections.
The parsing of the protocol (framing, chunked bodies, request smuggling's ambiguities: both content-length and
transfer-encoding, bad chunk sizes, obsolete line folding) is llhttp's, in its strict mode. Invariants:
- bounded: at most ``max_header_bytes`` of request line and headers (431 past it), ``body_limit`` bytes of a
  body kept (past it the rest is read and dropped: ``Request.body_dropped``; the connection stays usable), at
  most ``max_pipelined`` requests waiting per connection (past it the connection is closed) and
  ``max_connections`` connections (past it a new one is closed at once);
- answers go out in the order the requests came, one at a time per connection; a request the parser rejects
  gets ``on_bad_request``'s answer and the connection is closed;
- ``stop(grace)`` stops accepting, lets the requests being handled finish for up to ``grace`` seconds, then
  closes every connection; no task outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import cast

import httptools

log = logging.getLogger("kvswitch.extproc.http1")

MAX_HEADER_BYTES = 64 * 1024
MAX_PIPELINED = 8
MAX_CONNECTIONS = 4096


@dataclass(slots=True)
class Request:
    method: str
    target: str  # the request target as sent (path and query)
    headers: dict[str, str]  # lower-case names; a repeated header's values joined with ", "
    content_length: int | None  # as declared (None: chunked or no body)
    body: bytes | None  # None: no body (content-length absent or 0, not chunked), or it was dropped
    body_dropped: bool = False  # the body passed ``body_limit``: read and thrown away


@dataclass(slots=True)
class Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


Handler = Callable[[Request], Awaitable[Response]]
BadRequest = Callable[[int, str], Response]  # (status, why) -> the answer to a request the parser rejected

_REASONS = {s.value: s.phrase for s in HTTPStatus}
_UNSAFE = str.maketrans({"\r": " ", "\n": " ", "\0": " "})


def encode_response(resp: Response, keep_alive: bool) -> bytes:
    """The response's bytes. Header values never carry a line break (a debug header quoting a client's text
    could: it becomes a space) and are sent as Latin-1 (anything else as '?')."""
    out = [f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, 'Unknown')}\r\n"]
    for name, value in resp.headers:
        out.append(f"{name}: {value.translate(_UNSAFE)}\r\n")
    out.append(f"content-length: {len(resp.body)}\r\n")
    if not keep_alive:
        out.append("connection: close\r\n")
    out.append("\r\n")
    head = "".join(out).encode("latin-1", "replace")
    return head + resp.body if resp.body else head


class HttpServer:
    """Serves ``handler`` on ``host:port`` (see the module docstring)."""

    def __init__(self, handler: Handler, on_bad_request: BadRequest, body_limit: int,
                 max_header_bytes: int = MAX_HEADER_BYTES, max_pipelined: int = MAX_PIPELINED,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.handler = handler
        self.on_bad_request = on_bad_request
        self.body_limit = body_limit
        self.max_header_bytes = max_header_bytes
        self.max_pipelined = max_pipelined
        self.max_connections = max_connections
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the port (``port`` 0: one the system chose). The accept queue is as long as the
        connections allowed (the kernel caps it at net.core.somaxconn): Envoy opens one connection per decision
        in flight, and with asyncio's default of 100 a burst of them overflowed it, the connects were retried
        by the kernel after a second, and Envoy's 1-s connect timeout failed them (503; e2e/test_envoy_authz.py)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port, reuse_address=True,
                                                backlog=self.max_connections)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self, grace: float) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        busy = [c.worker for c in self.connections if c.worker is not None]
        if busy and grace > 0:
            await asyncio.wait(busy, timeout=grace)
        for c in list(self.connections):
            c.close()
        for c in list(self.connections):
            if c.worker is not None:
                c.worker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await c.worker
        await server.wait_closed()


class _Connection(asyncio.Protocol):
    """One client connection: parses requests as bytes arrive and answers them one after the other."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.queue: deque[tuple[Request, bool]] = deque()  # (request, keep-alive) parsed, not yet answered
        self.worker: asyncio.Task[None] | None = None
        self.closing = False
        self._reset()

    def _reset(self) -> None:
        self._target: list[bytes] = []
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._dropped = False
        self._head_bytes = 0
        self._too_big_head = False

    # ---- asyncio.Protocol ----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they have its methods
        self.transport = transport = cast(asyncio.Transport, transport)
        if len(self.server.connections) >= self.server.max_connections:
            log.warning("decide front: %d connections open, closing a new one", len(self.server.connections))
            transport.close()
            self.closing = True
            return
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        self.queue.clear()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not served here")
        except httptools.HttpParserError as exc:
            self._fail(400, f"malformed HTTP request: {exc}")
        else:
            if self._too_big_head:
                self._fail(431, f"request line and headers over {self.server.max_header_bytes} bytes")

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    # ---- httptools callbacks -------------------------------------------------------------------------------
    def _count_head(self, n: int) -> bool:
        self._head_bytes += n
        if self._head_bytes > self.server.max_header_bytes:
            self._too_big_head = True
        return not self._too_big_head

    def on_message_begin(self) -> None:
        self._reset()

    def on_url(self, url: bytes) -> None:
        if self._count_head(len(url)):
            self._target.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._count_head(len(name) + len(value)):
            return
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        got = self._headers.get(key)
        self._headers[key] = text if got is None else f"{got}, {text}"

    def on_body(self, chunk: bytes) -> None:
        self._body_bytes += len(chunk)
        if self._body_bytes > self.server.body_limit:
            self._dropped = True
            self._body.clear()
        elif not self._dropped:
            self._body.append(chunk)

    def on_message_complete(self) -> None:
        if self._too_big_head or self.closing:
            return
        headers = self._headers
        declared = headers.get("content-length")
        length = int(declared) if declared is not None else None  # llhttp let only digits through
        has_body = bool(length) or "transfer-encoding" in headers  # content-length 0: no body (as a GET's)
        req = Request(self.parser.get_method().decode("latin-1"), b"".join(self._target).decode("latin-1"),
                      headers, length, b"".join(self._body) if has_body and not self._dropped else None,
                      self._dropped)
        self._reset()
        if len(self.queue) >= self.server.max_pipelined:
            self._fail(400, f"more than {self.server.max_pipelined} pipelined requests")
            return
        self.queue.append((req, self.parser.should_keep_alive()))
        if self.worker is None:
            self.worker = asyncio.get_running_loop().create_task(self._answer())

    # ---- answers --------------------------------------------------------------------------------------------
    async def _answer(self) -> None:
        """Answer the queued requests in order (runs while there are any)."""
        try:
            while self.queue and not self.closing:
                req, keep_alive = self.queue.popleft()
                try:
                    resp = await self.server.handler(req)
                except Exception:
                    log.exception("decide front: the handler failed on %s %s", req.method, req.target)
                    resp = self.server.on_bad_request(500, "internal error in the picker")
                self._send(resp, keep_alive)
                if not keep_alive:
                    self.close()
        finally:
            self.worker = None

    def _send(self, resp: Response, keep_alive: bool) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode_response(resp, keep_alive))

    def _fail(self, status: int, why: str) -> None:
        """A request the parser rejected: answered at once (after nothing: what came before it was not yet
        answered is dropped with the connection), then the connection is closed."""
        if self.closing:
            return
        self.queue.clear()
        self._send(self.server.on_bad_request(status, why), keep_alive=False)
        self.close()
