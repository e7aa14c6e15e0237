"""`kvswitch up` with the live planner on, as a person runs it: a rising then falling load through real Envoy.

The stack is the `kvswitch up` command in its own process (simulated L40S pods, real Envoy, the picker with a
`planner:` section). The client sends streaming completions with unique 4,000-token prompts at a rate that
rises from 0.5 to 3 requests/s and then falls to 1.5; the planner (1 s intervals, short hysteresis) must raise
`kvswitch_planner_desired_replicas` and start pods, then lower it and remove pods drain-first. Asserted:
desired replicas rise and fall in the picker's /metrics; pods were drained while they held requests; no
drain hit its deadline; and every client request succeeded, the ones on the removed pods included.
Sized for a shared 2-core machine: about 50 s (52 s at load 13), a few requests in flight at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.envoy, pytest.mark.slow]
_UP = re.compile(r"kvswitch is up: (http://127\.0\.0\.1:\d+/v1) .*metrics (http://127\.0\.0\.1:\d+/metrics);")
PLANNER = """planner:
  interval_s: 1
  accelerators: L40S
  startup_s: 0.5
  down_after_s: 4
  cooldown_s: 4
  min_replicas: 1
  max_replicas: 4
  drain_timeout_s: 30
  slo: {ttft_ms: 2000, tpot_ms: 60}
"""
# (seconds, requests/s at the end of the phase): linear ramps between the points
LOAD = [(0.0, 0.5), (10.0, 3.0), (17.0, 3.0), (19.0, 1.5), (34.0, 1.5)]


@contextlib.contextmanager
def up(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, str, str]]:
    cfg = tmp_path / "planner.yaml"
    cfg.write_text(PLANNER)
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc.cli", "up", "--pods", "1", "--accelerator", "L40S", "--port", "0",
         "--config", str(cfg), "--log-level", "INFO"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 60
        m = None
        assert proc.stdout is not None
        while m is None:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError("kvswitch up exited:\n" + "".join(lines))
            lines.append(line)
            m = _UP.search(line)
            if time.monotonic() > deadline:
                raise AssertionError("kvswitch up did not come up in 60 s:\n" + "".join(lines))
        yield proc, m.group(1), m.group(2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.stdout is not None:
            lines += proc.stdout.readlines()
            proc.stdout.close()
        print("".join(line for line in lines if "planner" in line))


def _rate_at(t: float) -> float:
    for (t0, r0), (t1, r1) in zip(LOAD, LOAD[1:], strict=False):
        if t <= t1:
            return r0 + (r1 - r0) * (t - t0) / (t1 - t0)
    return LOAD[-1][1]


def _metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}(?:\{{{labels}[^}}]*\}})? ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def test_planner_scales_up_and_down_with_zero_errors_through_drain(tmp_path):
    with up(tmp_path) as (proc, url, metrics_url):
        results: list[tuple[int, str]] = []  # (status, error or "") per request
        desired: list[tuple[float, float]] = []
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        rng = random.Random(7)

        async def one(session: aiohttp.ClientSession, i: int) -> None:
            prompt = f"{i} {rng.getrandbits(64):x} " + "".join(rng.choice("abcdefgh ") for _ in range(16000))
            body = {"model": "sim-model", "prompt": prompt, "max_tokens": 160, "stream": True}
            try:
                async with session.post(f"{url}/completions", json=body) as r:
                    text = await r.text()
                    ok = r.status == 200 and text.rstrip().endswith("data: [DONE]")
                    results.append((r.status, "" if ok else text[-300:]))
            except (aiohttp.ClientError, TimeoutError) as exc:
                results.append((0, repr(exc)))

        async def watch(session: aiohttp.ClientSession, stop: asyncio.Event) -> str:
            text = ""
            while not stop.is_set():
                async with session.get(metrics_url) as r:
                    text = await r.text()
                desired.append((loop.time() - t0, _metric(text, "kvswitch_planner_desired_replicas")))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
            return text

        stop = asyncio.Event()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            watcher = asyncio.create_task(watch(session, stop))
            sent: list[asyncio.Task[None]] = []
            next_at = 0.0
            while next_at < LOAD[-1][0]:
                await asyncio.sleep(max(0.0, t0 + next_at - loop.time()))
                sent.append(asyncio.create_task(one(session, len(sent))))
                next_at += 1.0 / _rate_at(next_at)
            await asyncio.gather(*sent)
            # the last drains finish (bounded): the desired size stays down and drains end
            deadline = loop.time() + 15
            while loop.time() < deadline:
                async with session.get(metrics_url) as r:
                    text = await r.text()
                draining = _metric(text, "kvswitch_planner_replicas", 'accelerator="L40S",role="both",state="draining"')
                if _metric(text, "kvswitch_planner_drains_total", 'outcome="idle"') >= 1 and draining == 0:
                    break
                await asyncio.sleep(0.5)
            stop.set()
            final = await watcher
        assert proc.poll() is None, "kvswitch up died during the test"

    errors = [r for r in results if r[0] != 200 or r[1]]
    peak = max(d for _, d in desired)
    print(f"\n{len(results)} requests, {len(errors)} errors; desired over time: "
          + " ".join(f"{t:.0f}s:{d:.0f}" for t, d in desired[::4]))
    print("\n".join(line for line in final.splitlines() if line.startswith("kvswitch_planner_")))
    assert not errors, f"{len(errors)} of {len(results)} client requests failed: {errors[:3]}"
    assert desired[0][1] <= 2 and peak >= 3, f"desired replicas did not rise: {desired}"
    assert desired[-1][1] < peak, f"desired replicas did not fall: {desired}"
    assert _metric(final, "kvswitch_planner_drains_total", 'outcome="idle"') >= 1, "no pod was drained and released"
    assert _metric(final, "kvswitch_planner_drains_total", 'outcome="timeout"') == 0, "a drain hit its deadline"
    assert _metric(final, "kvswitch_planner_drained_inflight_requests_total") >= 1, \
        "the drained pods held no request when drained: the test did not exercise drain-first"
