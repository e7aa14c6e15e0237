"""extproc.http1: the decide front's HTTP/1.1 server over raw sockets: answers in order on keep-alive and pipelined
connections, bodies past the limit dropped with the connection kept, what the parser rejects (smuggling's
ambiguities, oversized heads) answered and closed, a failing handler a 500 while the server keeps serving, the
bounds on pipelining and connections, header values that cannot break a line, and a stop that waits for the
requests in hand and leaves no task behind. Every test runs on asyncio's loop and on uvloop's (the picker's, whose
transports are not asyncio's classes)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import uvloop

from extproc.http1 import HttpServer, Request, Response, encode_response

LIMIT = 1000
LOOPS = {"asyncio": asyncio.run, "uvloop": uvloop.run}


def _bad(status: int, why: str) -> Response:
    return Response(status, [("x-why", why)])


class _Echo:
    """Answers with what it got; ``gate`` holds answers back while cleared."""

    def __init__(self) -> None:
        self.seen: list[Request] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, req: Request) -> Response:
        self.seen.append(req)
        await self.gate.wait()
        if req.target == "/boom":
            raise RuntimeError("handler bug")
        body = b"dropped" if req.body_dropped else (req.body if req.body is not None else b"none")
        return Response(200, [("x-target", req.target), ("x-method", req.method),
                              ("x-echo", req.headers.get("x-echo", ""))], body)


@dataclass
class _Served:
    server: HttpServer
    handler: _Echo
    port: int
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers.append(writer)
        return reader, writer


@contextlib.asynccontextmanager
async def _serving(**kw) -> AsyncIterator[_Served]:
    """A server on a free port; its client connections and the server closed after."""
    handler = _Echo()
    server = HttpServer(handler, _bad, LIMIT, **kw)
    s = _Served(server, handler, await server.start("127.0.0.1", 0))
    try:
        yield s
    finally:
        await server.stop(0)
        for w in s.writers:
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()


def _run(loop: str, body: Callable[[_Served], Awaitable[None]], **kw) -> None:
    async def main() -> None:
        async with _serving(**kw) as s:
            await body(s)

    LOOPS[loop](main())


BOUNDED = {"max_header_bytes": 2048, "max_pipelined": 3, "max_connections": 4}
on_both_loops = pytest.mark.parametrize("loop", list(LOOPS))


def _post(target: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {target} HTTP/1.1\r\nhost: p\r\ncontent-length: {len(body)}\r\n{extra}\r\n").encode() + body


async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    headers = dict(line.split(": ", 1) for line in head[1:] if line)
    body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


async def _closed(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(), 5) == b""


@on_both_loops
def test_keep_alive_and_pipelined_requests_are_answered_in_order(loop):
    async def body(s: _Served) -> None:
        reader, writer = await s.connect()
        writer.write(_post("/a", b"one"))
        assert await _answer(reader) == (200, {"x-target": "/a", "x-method": "POST", "x-echo": "",
                                               "content-length": "3"}, b"one")
        s.handler.gate.clear()  # three in one write, answered only once all are parsed
        writer.write(_post("/b?q=1", b"two") + b"GET /c HTTP/1.1\r\nhost: p\r\nx-echo: 3\r\n\r\n" + _post("/d", b""))
        await asyncio.sleep(0.05)
        s.handler.gate.set()
        got = [await _answer(reader) for _ in range(3)]
        assert [(h["x-target"], b) for _, h, b in got] == [("/b?q=1", b"two"), ("/c", b"none"), ("/d", b"none")]
        assert got[1][1]["x-echo"] == "3" and got[1][1]["x-method"] == "GET"

    _run(loop, body)


@on_both_loops
def test_bodies_past_the_limit_are_dropped_and_the_connection_still_serves(loop):
    async def body(s: _Served) -> None:
        reader, writer = await s.connect()
        writer.write(_post("/big", b"x" * (LIMIT + 1)))
        assert (await _answer(reader))[2] == b"dropped"
        chunked = b"".join(b"%x\r\n%s\r\n" % (400, b"y" * 400) for _ in range(3)) + b"0\r\n\r\n"
        writer.write(b"POST /chunked HTTP/1.1\r\nhost: p\r\ntransfer-encoding: chunked\r\n\r\n" + chunked)
        assert (await _answer(reader))[2] == b"dropped"
        writer.write(_post("/small", b"ok"))
        assert (await _answer(reader))[2] == b"ok"
        assert s.handler.seen[0].content_length == LIMIT + 1 and s.handler.seen[1].content_length is None

    _run(loop, body)


@on_both_loops
@pytest.mark.parametrize(("raw", "status"), [
    # request smuggling's ambiguities: both framings, two lengths, a negative one
    (b"POST /a HTTP/1.1\r\nhost: p\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST /a HTTP/1.1\r\nhost: p\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd", 400),
    (b"POST /a HTTP/1.1\r\nhost: p\r\ncontent-length: -1\r\n\r\n", 400),
    (b"NOT HTTP AT ALL\r\n\r\n", 400),
    (b"GET /a HTTP/1.1\r\nhost: p\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n", 400),
    (b"GET /a HTTP/1.1\r\nhost: p\r\nx-big: " + b"z" * 3000 + b"\r\n\r\n", 431),  # over max_header_bytes
], ids=["cl-and-te", "two-lengths", "negative-length", "not-http", "upgrade", "head-too-big"])
def test_what_the_parser_rejects_is_answered_and_the_connection_closed(loop, raw, status):
    async def body(s: _Served) -> None:
        reader, writer = await s.connect()
        writer.write(raw)
        got, headers, _ = await _answer(reader)
        assert got == status and headers["connection"] == "close" and headers["x-why"]
        assert await _closed(reader) and s.handler.seen == []
        reader, writer = await s.connect()  # the server itself keeps serving
        writer.write(_post("/ok", b"1"))
        assert (await _answer(reader))[0] == 200

    _run(loop, body, **BOUNDED)


@on_both_loops
def test_a_failing_handler_is_a_500_and_the_connection_goes_on(loop):
    async def body(s: _Served) -> None:
        reader, writer = await s.connect()
        writer.write(_post("/boom", b""))
        assert (await _answer(reader))[0] == 500
        writer.write(_post("/after", b"2"))
        assert (await _answer(reader))[2] == b"2"

    _run(loop, body)


@on_both_loops
def test_connection_close_is_honoured(loop):
    async def body(s: _Served) -> None:
        reader, writer = await s.connect()
        writer.write(_post("/a", b"1", "connection: close\r\n"))
        status, headers, _ = await _answer(reader)
        assert status == 200 and headers["connection"] == "close" and await _closed(reader)

    _run(loop, body)


@on_both_loops
def test_pipelining_and_connections_are_bounded(loop):
    async def body(s: _Served) -> None:
        s.handler.gate.clear()
        reader, writer = await s.connect()
        writer.write(b"".join(_post(f"/{i}", b"") for i in range(6)))  # 1 in hand + 3 queued: the 5th is too many
        status, headers, _ = await _answer(reader)
        assert status == 400 and "pipelined" in headers["x-why"] and await _closed(reader)
        s.handler.gate.set()
        opened = [await s.connect() for _ in range(5)]
        await asyncio.sleep(0.05)
        assert len(s.server.connections) == 4  # the fifth was closed at once
        assert await _closed(opened[-1][0])

    _run(loop, body, **BOUNDED)


def test_header_values_cannot_break_a_line():
    raw = encode_response(Response(200, [("x-debug", "a\r\nset-cookie: evil"), ("x-name", "caf\u00e9\u2603")]),
                          keep_alive=True)
    assert raw.split(b"\r\n")[1:4] == [b"x-debug: a  set-cookie: evil", b"x-name: caf\xe9?", b"content-length: 0"]


@on_both_loops
def test_stop_waits_for_requests_in_hand_then_closes_everything(loop):
    async def body(s: _Served) -> None:
        s.handler.gate.clear()
        reader, writer = await s.connect()
        idle_reader, _ = await s.connect()
        writer.write(_post("/slow", b"s"))
        await asyncio.sleep(0.05)
        asyncio.get_running_loop().call_later(0.1, s.handler.gate.set)
        await s.server.stop(grace=5)
        assert (await _answer(reader))[2] == b"s"  # answered within the grace
        assert await _closed(reader) and await _closed(idle_reader)
        assert not s.server.connections
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", s.port)

    _run(loop, body)


@on_both_loops
def test_stop_past_the_grace_cancels_what_is_left(loop):
    async def body(s: _Served) -> None:
        s.handler.gate.clear()
        reader, writer = await s.connect()
        writer.write(_post("/never", b""))
        await asyncio.sleep(0.05)
        await s.server.stop(grace=0.05)
        assert await _closed(reader)
        assert [t for t in asyncio.all_tasks() if "_answer" in repr(t.get_coro())] == []

    _run(loop, body)
