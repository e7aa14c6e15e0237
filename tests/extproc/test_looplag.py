"""The loop-lag probe sees a blocked loop and nothing on an idle one."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Histogram

from extproc.looplag import LoopLagProbe


def _histogram() -> Histogram:
    return Histogram("lag_seconds", "test", buckets=(0.01, 0.1, 1.0), registry=CollectorRegistry())


async def _wait_samples(probe: LoopLagProbe, n: int) -> None:
    deadline = time.monotonic() + 10
    while probe.samples < n:
        assert time.monotonic() < deadline, "probe took no samples"
        await asyncio.sleep(0.005)


async def test_a_blocked_loop_shows_as_lag_of_about_the_block() -> None:
    probe = LoopLagProbe(interval=0.005, histogram=_histogram())
    probe.start()
    try:
        await _wait_samples(probe, 2)
        time.sleep(0.3)  # hold the loop, as a parse on the loop thread would
        await _wait_samples(probe, probe.samples + 2)
    finally:
        await probe.stop()
    assert 0.25 <= probe.max_lag < 5.0
    samples = probe.histogram.collect()[0].samples
    over = [s.value for s in samples if s.name.endswith("_bucket") and s.labels["le"] == "0.1"][0]
    count = [s.value for s in samples if s.name.endswith("_count")][0]
    assert count - over >= 1  # at least one observation above 100 ms


async def test_stop_ends_the_task_and_a_second_stop_is_harmless() -> None:
    probe = LoopLagProbe(interval=0.005, histogram=_histogram())
    probe.start()
    await _wait_samples(probe, 1)
    await probe.stop()
    n = probe.samples
    await asyncio.sleep(0.03)
    assert probe.samples == n
    await probe.stop()
