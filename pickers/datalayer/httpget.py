"""A keep-alive HTTP/1.1 GET of one URL, for the metrics scraper: one connection per pod, httptools' response
parser (llhttp) under an asyncio protocol.

Why not aiohttp's client, which the scraper used before: a picker scrapes every pod 20 times a second, and
aiohttp's request machinery cost ~115 us of CPU per GET of a 22 KB vLLM page against ~45 us here
(`/work/notes7/scrape_client_bench.py` in the session notes: the same server in a child process); at 100 pods that
difference alone is 14 % of a core.

Invariants: one request at a time on the connection (the scraper's loop per URL awaits each GET); at most
``max_bytes`` of body (more is an error); any error, a timeout included, closes the connection, and the next GET
opens a new one, so a half-read response never poisons the next; a response the server marks as the last
(``connection: close``) closes it too. Plain ``http://`` only: the scraper keeps aiohttp for ``https://``.
"""

from __future__ import annotations

import asyncio
from typing import cast
from urllib.parse import urlsplit

import httptools


class GetError(OSError):
    """The GET failed: refused or reset connection, a malformed or oversized response."""


class _Conn(asyncio.Protocol):
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, bytes, bool]] | None = None
        self.body: list[bytes] = []
        self.size = 0
        self.closed = False

    # ---- asyncio.Protocol ----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio's classes

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(GetError("the connection closed before the end of the response"))

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.waiter.done():
            self._fail(GetError("bytes arrived with no request outstanding"))
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(GetError(f"malformed HTTP response: {exc}"))

    # ---- httptools callbacks -------------------------------------------------------------------------------
    def on_body(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            self._fail(GetError(f"response body over {self.max_bytes} bytes"))
        else:
            self.body.append(chunk)

    def on_message_complete(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result((self.parser.get_status_code(), b"".join(self.body), self.parser.should_keep_alive()))

    # ---- the request -----------------------------------------------------------------------------------------
    async def request(self, raw: bytes) -> tuple[int, bytes, bool]:
        assert self.transport is not None and (self.waiter is None or self.waiter.done())
        self.body, self.size = [], 0
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter

    def _fail(self, exc: Exception) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_exception(exc)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class KeepAliveGet:
    """GET ``url`` over one kept-alive connection (see the module docstring)."""

    def __init__(self, url: str, max_bytes: int) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"not a plain http:// URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.max_bytes = max_bytes
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._request = (f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: text/plain\r\n"
                         "User-Agent: kvswitch-scraper\r\n\r\n").encode("latin-1")
        self._conn: _Conn | None = None

    async def get(self, timeout_s: float) -> tuple[int, bytes]:
        """(status, body) within ``timeout_s`` (TimeoutError past it), connecting when there is no connection."""
        try:
            async with asyncio.timeout(timeout_s):
                conn = self._conn
                if conn is None or conn.closed:
                    max_bytes = self.max_bytes
                    _, conn = await asyncio.get_running_loop().create_connection(
                        lambda: _Conn(max_bytes), self.host, self.port)
                    self._conn = conn
                status, body, keep_alive = await conn.request(self._request)
        except BaseException:
            self.close()  # whatever was half read, the next GET starts on a new connection
            raise
        if not keep_alive:
            self.close()
        return status, body

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
