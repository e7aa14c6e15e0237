"""Waiting for a condition with a deadline, instead of sleeping a fixed time (CI machines are slow)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


async def until(predicate: Callable[[], object], timeout: float = 10.0, every: float = 0.01) -> None:
    """Poll ``predicate`` until it holds (raises TimeoutError after ``timeout`` seconds): no fixed sleeps."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        await asyncio.sleep(every)


async def all_held_at_once(send: Callable[[], Awaitable[T]], n: int, held: Callable[[], int],
                           release: Callable[[], None], where: str, wave: int | None = None,
                           timeout: float = 60.0) -> list[T]:
    """Start ``n`` sends and wait until ``held()`` counts all of them held ``where`` (the picker, the pods), then
    ``release()`` them and return what each send returned. ``wave``: start them that many at a time, each wave
    once the ones before are held (a limit on how many may be held, not how fast they come); None: all at once.
    Released and gathered whatever happens; if they never were all held, AssertionError says how many were (where
    a limit on the way stopped them) and what the sends already answered."""
    sent: list[asyncio.Future[T]] = []
    try:
        while len(sent) < n:
            sent += [asyncio.ensure_future(send()) for _ in range(min(wave or n, n - len(sent)))]
            await until(lambda started=len(sent): held() == started, timeout=timeout)
    except TimeoutError:
        answered = Counter(repr(f.exception() or f.result()) for f in sent if f.done() and not f.cancelled())
        raise AssertionError(f"{held()} of {n} requests held at once at {where}; answered before: "
                             f"{dict(answered)}") from None
    finally:
        release()
        got = await asyncio.gather(*sent)
    return got


async def beside_a_blocked_loop(work: Callable[[], T], blocked_s: float,
                                after: threading.Event | None = None) -> T:
    """Run ``work`` in a thread while the calling event loop (a server's, in-process) is blocked, so that the
    server takes nothing meanwhile: blocked until ``after`` is set, when given, then ``blocked_s`` more. Then the
    loop runs again until ``work`` ends; its result (or its exception)."""
    done: Future[T] = Future()

    def run() -> None:
        try:
            done.set_result(work())
        except BaseException as exc:  # handed to the caller below
            done.set_exception(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        if after is not None:
            after.wait(timeout=60.0)
        time.sleep(blocked_s)  # the loop is busy: nothing is accepted
    finally:
        while thread.is_alive():
            await asyncio.sleep(0.05)
    return done.result()


async def connects_while_busy(address: str, n: int, busy_s: float = 2.0, connect_timeout_s: float = 1.0) -> int:
    """Open ``n`` TCP connections to ``address`` at once (64 client threads, each connect given
    ``connect_timeout_s``, Envoy's cluster connect timeout) while the calling event loop, the server's, is
    blocked for ``busy_s`` and accepts nothing (``beside_a_blocked_loop``): they wait in the server's accept
    queue. How many connected; every socket is closed before it returns. A connect the kernel dropped from a
    full queue is retried after a second, so with a queue shorter than the burst some of them time out."""
    host, _, port = address.rpartition(":")
    opened: list[socket.socket] = []

    def one(_: int) -> bool:
        s = socket.socket()
        opened.append(s)
        s.settimeout(connect_timeout_s)
        try:
            s.connect((host, int(port)))
            return True
        except OSError:
            return False

    def burst() -> int:
        with ThreadPoolExecutor(64) as pool:
            return sum(pool.map(one, range(n)))

    try:
        return await beside_a_blocked_loop(burst, busy_s)
    finally:
        for s in opened:
            s.close()
