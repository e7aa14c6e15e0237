"""The event loop's own lag, measured from inside the picker process.

A task asks to wake ``interval`` seconds later and records how late it woke: that lateness is the time every
callback on the loop (a health check, a small request's routing, a scrape) waited behind whatever held the loop
or the GIL. It is exported as ``kvswitch_event_loop_lag_seconds`` (a histogram), so a benchmark or an operator can
tell a picker that stalls from a machine that is saturated (the client's latency rises in both cases; only the
first shows here). One probe per process; it costs one wake-up per interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from prometheus_client import Histogram

LOOP_LAG_SECONDS = Histogram(
    "kvswitch_event_loop_lag_seconds",
    "How late the picker's event loop ran a timer due every 20 ms (callbacks waited this long behind other work)",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)


class LoopLagProbe:
    """``start()`` on the running loop, ``await stop()`` to end it; ``max_lag`` is the worst since start."""

    def __init__(self, interval: float = 0.02, histogram: Histogram = LOOP_LAG_SECONDS) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.interval = interval
        self.histogram = histogram
        self.max_lag = 0.0
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="kvswitch-loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            due = time.perf_counter() + self.interval
            await asyncio.sleep(self.interval)
            lag = max(0.0, time.perf_counter() - due)
            self.samples += 1
            self.max_lag = max(self.max_lag, lag)
            self.histogram.observe(lag)
