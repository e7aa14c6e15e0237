"""ByteBudget: bodies parsed off the loop never exceed the budget together; FIFO; a cancelled wait frees nothing
it did not hold and leaks nothing it was granted."""

from __future__ import annotations

import asyncio

import pytest

from extproc.budget import ByteBudget


async def test_bytes_in_flight_never_exceed_the_budget_and_all_finish():
    budget = ByteBudget(20)
    peak = 0
    order: list[int] = []

    async def job(i: int, n: int) -> None:
        nonlocal peak
        async with budget.hold(n):
            peak = max(peak, budget.in_use)
            order.append(i)
            await asyncio.sleep(0.01)

    await asyncio.gather(*(job(i, n) for i, n in enumerate([8, 8, 8, 30, 1, 8])))
    assert peak <= 20 and budget.in_use == 0
    assert order == [0, 1, 2, 3, 4, 5]  # first come, first served (no small body jumps the queue)


async def test_cancelled_waiter_leaks_nothing():
    budget = ByteBudget(10)
    async with budget.hold(10):
        waiter = asyncio.create_task(budget.hold(5).__aenter__())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    assert budget.in_use == 0
    async with budget.hold(10):
        assert budget.in_use == 10
