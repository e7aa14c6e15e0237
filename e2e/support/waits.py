"""Waiting for a condition with a deadline, instead of sleeping a fixed time (CI machines are slow)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(predicate: Callable[[], object], timeout: float = 10.0, every: float = 0.01) -> None:
    """Poll ``predicate`` until it holds (raises TimeoutError after ``timeout`` seconds): no fixed sleeps."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        await asyncio.sleep(every)
