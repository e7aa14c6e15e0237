"""A bound on the request-body bytes being parsed off the event loop at once.

Large bodies are decoded in worker threads (``extproc.stream``); without a bound, thirty 8 MB prompts arriving
together would each hold a decoded copy and a thread, and the picker's memory and CPU would go to them while
health checks and small requests wait. ``ByteBudget`` hands out byte allowances first come, first served: an
acquire waits until its bytes fit (a body larger than the whole budget waits until the budget is empty, then
runs alone). Small bodies never touch it: they are parsed inline, which costs less than a thread hop.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class ByteBudget:
    """FIFO byte semaphore: ``async with budget.hold(n):`` runs once ``n`` bytes (capped at the capacity) fit."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.in_use = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        n = min(max(0, nbytes), self.capacity)
        if self._waiters or self.in_use + n > self.capacity:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (n, fut)
            self._waiters.append(entry)
            try:
                await fut
            except BaseException:
                if entry in self._waiters:
                    self._waiters.remove(entry)
                elif fut.done() and not fut.cancelled():
                    self._release(n)  # granted just as we were cancelled: give it back
                raise
        else:
            self.in_use += n
        try:
            yield
        finally:
            self._release(n)

    def _release(self, n: int) -> None:
        self.in_use -= n
        while self._waiters:
            need, fut = self._waiters[0]
            if fut.cancelled():
                self._waiters.popleft()
                continue
            if self.in_use + need > self.capacity:
                break
            self._waiters.popleft()
            self.in_use += need
            fut.set_result(None)
