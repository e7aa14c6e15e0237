"""pickers.datalayer.httpget: the scraper's kept-alive GET against raw servers: one connection for many GETs,
chunked bodies, the size bound, a server that closes, stalls, refuses or sends garbage (each an error that
leaves the next GET a fresh connection), on asyncio's loop and on uvloop's."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from pickers.datalayer.httpget import GetError, KeepAliveGet

LOOPS = {"asyncio": asyncio.run, "uvloop": uvloop.run}
on_both_loops = pytest.mark.parametrize("loop", list(LOOPS))
Reply = Callable[[int, bytes], bytes | None]  # (connection's request number, request) -> raw answer, None: silence


def _ok(body: bytes, extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\n{extra}\r\n".encode() + body


def _run(loop: str, reply: Reply, body: Callable[[KeepAliveGet, list[int]], Awaitable[None]],
         max_bytes: int = 1000) -> None:
    """Serve ``reply`` on a free port; ``body(client, connections)`` gets the client and the connections count."""

    async def main() -> None:
        opened: list[int] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            opened.append(1)
            n = 0
            try:
                while True:
                    req = await reader.readuntil(b"\r\n\r\n")
                    raw = reply(n, req)
                    n += 1
                    if raw is None:
                        await asyncio.sleep(3600)
                    writer.write(raw)
                    await writer.drain()
                    if b"connection: close" in raw:
                        break
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = KeepAliveGet(f"http://127.0.0.1:{port}/metrics?x=1", max_bytes)
        try:
            await body(client, opened)
        finally:
            client.close()
            server.close()
            await server.wait_closed()

    LOOPS[loop](main())


@on_both_loops
def test_many_gets_share_one_connection_and_chunked_bodies_are_read(loop):
    seen: list[bytes] = []

    def reply(n: int, req: bytes) -> bytes:
        seen.append(req)
        if n % 2:
            return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        return _ok(b"page %d" % n)

    async def body(client: KeepAliveGet, opened: list[int]) -> None:
        got = [await client.get(1.0) for _ in range(4)]
        assert got == [(200, b"page 0"), (200, b"abcde"), (200, b"page 2"), (200, b"abcde")]
        assert len(opened) == 1
        assert seen[0].startswith(b"GET /metrics?x=1 HTTP/1.1\r\nHost: 127.0.0.1:")

    _run(loop, reply, body)


@on_both_loops
def test_a_server_that_closes_after_its_answer_gets_a_new_connection_next_time(loop):
    async def body(client: KeepAliveGet, opened: list[int]) -> None:
        assert await client.get(1.0) == (200, b"bye")
        assert await client.get(1.0) == (200, b"bye")
        assert len(opened) == 2

    _run(loop, lambda n, req: _ok(b"bye", "connection: close\r\n"), body)


@on_both_loops
def test_oversized_stalled_and_malformed_answers_are_errors_and_the_next_get_starts_afresh(loop):
    script = {0: _ok(b"x" * 2000), 1: None, 2: b"NOT HTTP\r\n\r\n", 3: _ok(b"fine")}
    calls = []

    def reply(n: int, req: bytes) -> bytes | None:
        calls.append(n)
        return script[len(calls) - 1]

    async def body(client: KeepAliveGet, opened: list[int]) -> None:
        with pytest.raises(GetError, match="over 1000 bytes"):
            await client.get(1.0)
        with pytest.raises(TimeoutError):
            await client.get(0.2)
        with pytest.raises(GetError, match="malformed"):
            await client.get(1.0)
        assert await client.get(1.0) == (200, b"fine")
        assert len(opened) == 4  # every failure closed its connection

    _run(loop, reply, body)


@on_both_loops
def test_a_refused_connection_is_an_oserror_and_other_schemes_are_refused(loop):
    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        client = KeepAliveGet(f"http://127.0.0.1:{port}/metrics", 100)
        with pytest.raises(OSError):
            await client.get(1.0)

    LOOPS[loop](main())
    with pytest.raises(ValueError, match="plain http"):
        KeepAliveGet("https://10.0.0.1/metrics", 100)
