"""Scrapes every pod's /metrics on a fixed interval (default 50 ms, like the reference picker).

One task per pod, so a slow pod delays only itself. A failed or unparsable scrape counts as a health
failure; a good one as a success (this is also how a pod that was taken out comes back).
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from pickers.datalayer.health import HealthTracker
from pickers.datalayer.metrics import MetricsStore
from pickers.datalayer.promparse import MetricsParseError, parse_vllm_metrics

log = logging.getLogger("kvswitch.pickers.scraper")


class MetricsScraper:
    def __init__(self, metrics: MetricsStore, health: HealthTracker, interval_s: float = 0.05,
                 timeout_s: float | None = None, max_bytes: int = 4 * 1024 * 1024) -> None:
        self.metrics = metrics
        self.health = health
        self.interval_s = interval_s
        self.timeout_s = timeout_s or max(0.5, 4 * interval_s)
        self.max_bytes = max_bytes
        self._session: aiohttp.ClientSession | None = None
        self._tasks: dict[str, asyncio.Task] = {}

    def watch(self, slot: int, address: str, url: str) -> None:
        self.unwatch(address)
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            )
        self._tasks[address] = asyncio.get_running_loop().create_task(
            self._run(slot, address, url), name=f"scrape {address}")

    def unwatch(self, address: str) -> None:
        t = self._tasks.pop(address, None)
        if t is not None:
            t.cancel()

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def scrape_once(self, slot: int, address: str, url: str) -> bool:
        assert self._session is not None
        try:
            async with self._session.get(url) as resp:
                if resp.status != 200:
                    raise MetricsParseError(f"HTTP {resp.status}")
                body = await resp.content.read(self.max_bytes)
            m = parse_vllm_metrics(body.decode("utf-8", "replace"))
        except (TimeoutError, aiohttp.ClientError, OSError, MetricsParseError) as e:
            self.health.failure(slot, f"scrape {url}: {e.__class__.__name__} {e}".strip())
            return False
        self.metrics.update_slot(slot, m)
        self.health.success(slot)
        return True

    async def _run(self, slot: int, address: str, url: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                t0 = loop.time()
                await self.scrape_once(slot, address, url)
                await asyncio.sleep(max(0.0, self.interval_s - (loop.time() - t0)))
        except asyncio.CancelledError:
            pass
