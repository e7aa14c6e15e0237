"""The picker's background cost: CPU per /metrics scrape, the kept-alive GET against aiohttp's client.

    .venv/bin/python -m e2e.bench.scrape [--pods 20] [--seconds 5] [--rounds 2] [--interval-ms 50]

A child process serves ``--pods`` ports with a 22 KB vLLM page (the simulator's, histograms and all); this process
runs the picker's ``MetricsScraper`` on them at ``--interval-ms`` for ``--seconds``, alternating the two clients
(``keep_alive_get`` on and off) for ``--rounds`` rounds, and prints the CPU per scrape of each (parse included) and
their ratio, with the machine's load. A scrape is one GET and one parse of one pod's page. Not part of
``make test``: timings belong in benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import time

import uvloop
from aiohttp import web

from e2e.support.ports import free_ports
from engine.sim.metrics import PodMetrics
from pickers.clock import MonotonicClock
from pickers.datalayer.health import HealthTracker
from pickers.datalayer.metrics import MetricsStore
from pickers.datalayer.scraper import MetricsScraper

PAGE = PodMetrics("m", {"block_size": "16", "num_gpu_blocks": "10000"}).render()


def _serve(ports: list[int]) -> None:
    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=PAGE, content_type="text/plain")

    async def go() -> None:
        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        for p in ports:
            await web.TCPSite(runner, "127.0.0.1", p).start()
        await asyncio.Event().wait()

    uvloop.run(go())


async def _round(ports: list[int], keep_alive: bool, seconds: float, interval_s: float) -> tuple[float, int]:
    """(CPU seconds, scrapes) of one scraper over ``seconds``."""
    n = len(ports)
    metrics = MetricsStore(MonotonicClock(), lambda _id: None, max_endpoints=n)
    health = HealthTracker(lambda slot: f"pod-{slot}", max_endpoints=n)
    scraper = MetricsScraper(metrics, health, interval_s=interval_s, keep_alive_get=keep_alive)
    count = 0
    scrape_once = scraper.scrape_once

    async def counted(url: str) -> bool:
        nonlocal count
        ok = await scrape_once(url)
        count += ok
        return ok

    scraper.scrape_once = counted  # type: ignore[method-assign]
    for slot, p in enumerate(ports):
        scraper.watch(slot, f"pod-{slot}", f"http://127.0.0.1:{p}/metrics")
    await asyncio.sleep(1.0)  # connections made, warmed
    count = 0
    c0 = time.process_time()
    await asyncio.sleep(seconds)
    cpu, scrapes = time.process_time() - c0, count
    await scraper.stop()
    return cpu, scrapes


async def _main(args: argparse.Namespace, ports: list[int]) -> None:
    await asyncio.sleep(1.5)  # the server child is up
    got: dict[bool, list[float]] = {True: [], False: []}
    runs = [ka for _ in range(args.rounds) for ka in (True, False)]
    for i, keep_alive in enumerate(runs, 1):
        cpu, scrapes = await _round(ports, keep_alive, args.seconds, args.interval_ms / 1e3)
        per = cpu / max(scrapes, 1) * 1e6
        got[keep_alive].append(per)
        name = "kept-alive GET" if keep_alive else "aiohttp"
        print(f"[{i}/{len(runs)}] {name:15s} {scrapes} scrapes in {args.seconds:g} s: {per:.0f} us of CPU each "
              f"(load {os.getloadavg()[0]:.2f})", flush=True)
    ka, aio = statistics.median(got[True]), statistics.median(got[False])
    per_s = len(ports) * 1e3 / args.interval_ms
    print(f"\n{len(ports)} pods, a {len(PAGE) // 1024} KB page every {args.interval_ms:g} ms ({per_s:.0f} scrapes/s):")
    print(f"  kept-alive GET {ka:6.0f} us/scrape  -> {ka * per_s / 1e3:5.1f} ms of CPU per second")
    print(f"  aiohttp        {aio:6.0f} us/scrape  -> {aio * per_s / 1e3:5.1f} ms of CPU per second")
    print(f"  ratio (aiohttp / kept-alive): {aio / ka:.2f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pods", type=int, default=20)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--interval-ms", type=float, default=50.0)
    args = p.parse_args(argv)
    if args.pods < 1 or args.seconds <= 0 or args.rounds < 1 or args.interval_ms <= 0:
        p.error("--pods, --seconds, --rounds and --interval-ms must be positive")
    ports = free_ports(args.pods)
    child = os.fork()
    if child == 0:
        _serve(ports)
        os._exit(0)
    try:
        uvloop.run(_main(args, ports))
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
