"""Scrapes every pod's /metrics on a fixed interval (default 50 ms, like the reference picker).

One task per metrics URL, so a slow pod delays only itself; a plain http:// page is fetched over one
kept-alive connection per pod (``httpget.KeepAliveGet``), an https:// one through aiohttp. A pod running
data-parallel ranks has one page for all of them, its series labelled ``engine="<rank>"``: it is scraped once
and each rank endpoint gets its own engine's figures (``watch(..., engine="3")``); an endpoint without a rank
gets the sum. A failed or unparsable scrape counts as a health failure of every endpoint on that URL; a good
one as a success (this is also how a pod that was taken out comes back). A rank whose engine label is missing
from a good page is a failure of that rank alone.

By default each GET names the families the picker reads (``promparse.restricted_url``): a pod whose server
honours prometheus_client's ``name[]`` filter renders those alone (0.18 against 2.2 ms of the simulator's CPU per
page), one that does not sends the whole page.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiohttp

from pickers.datalayer.health import HealthTracker
from pickers.datalayer.httpget import KeepAliveGet
from pickers.datalayer.metrics import MetricsStore
from pickers.datalayer.promparse import (
    MetricsParseError,
    parse_vllm_metrics,
    parse_vllm_metrics_by_engine,
    restricted_url,
)

log = logging.getLogger("kvswitch.pickers.scraper")

Target = tuple[int, str | None]  # (endpoint slot, engine label or None for the whole pod)


class MetricsScraper:
    def __init__(self, metrics: MetricsStore, health: HealthTracker, interval_s: float = 0.05,
                 timeout_s: float | None = None, max_bytes: int = 4 * 1024 * 1024,
                 on_engines: Callable[[str, list[str]], None] | None = None, keep_alive_get: bool = True,
                 read_families_only: bool = True) -> None:
        """``keep_alive_get``: plain http:// pages over ``KeepAliveGet``; False: every page through aiohttp (the
        baseline of ``e2e.bench.scrape``). ``read_families_only``: each GET names the families parsed (``name[]``);
        False: the URL as configured."""
        self.keep_alive_get = keep_alive_get
        self.read_families_only = read_families_only
        self.metrics = metrics
        self.health = health
        self.interval_s = interval_s
        self.timeout_s = timeout_s or max(0.5, 4 * interval_s)
        self.max_bytes = max_bytes
        # called with (url, engine labels) when a page shows several engines: rank count learned from metrics
        self.on_engines = on_engines
        self._session: aiohttp.ClientSession | None = None  # https:// pages (plain http: KeepAliveGet)
        self._clients: dict[str, KeepAliveGet] = {}  # url -> its kept-alive GET (http://)
        self._tasks: dict[str, asyncio.Task] = {}  # url -> its scrape loop
        self._targets: dict[str, dict[str, Target]] = {}  # url -> endpoint id -> target
        self._url_of: dict[str, str] = {}  # endpoint id -> url
        self._fetch: dict[str, str] = {}  # url -> what its GET asks for (fetch_url), built once per url
        self._engines_seen: dict[str, tuple[str, ...]] = {}

    def fetch_url(self, url: str) -> str:
        """What a GET of the page at ``url`` asks for (see ``read_families_only``)."""
        return restricted_url(url) if self.read_families_only else url

    def watch(self, slot: int, endpoint_id: str, url: str, engine: str | None = None) -> None:
        self.unwatch(endpoint_id)
        fetch = self._fetch.setdefault(url, self.fetch_url(url))
        if self.keep_alive_get and url.startswith("http://"):
            if url not in self._clients:
                self._clients[url] = KeepAliveGet(fetch, self.max_bytes)
        elif self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            )
        self._targets.setdefault(url, {})[endpoint_id] = (slot, engine)
        self._url_of[endpoint_id] = url
        if url not in self._tasks:
            self._tasks[url] = asyncio.get_running_loop().create_task(self._run(url), name=f"scrape {url}")

    def unwatch(self, endpoint_id: str) -> None:
        url = self._url_of.pop(endpoint_id, None)
        if url is None:
            return
        targets = self._targets.get(url, {})
        targets.pop(endpoint_id, None)
        if not targets:
            self._targets.pop(url, None)
            self._engines_seen.pop(url, None)
            self._fetch.pop(url, None)
            t = self._tasks.pop(url, None)
            if t is not None:
                t.cancel()
            client = self._clients.pop(url, None)
            if client is not None:
                client.close()

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        self._targets.clear()
        self._url_of.clear()
        self._fetch.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _get(self, url: str) -> bytes:
        client = self._clients.get(url)
        if client is not None:
            status, body = await client.get(self.timeout_s)
        else:
            assert self._session is not None
            async with self._session.get(self._fetch[url]) as resp:
                status = resp.status
                body = await resp.content.read(self.max_bytes)
        if status != 200:
            raise MetricsParseError(f"HTTP {status}")
        return body

    async def scrape_once(self, url: str) -> bool:
        targets = list(self._targets.get(url, {}).values())
        try:
            body = await self._get(url)
            text = body.decode("utf-8", "replace")
            ranked = any(engine is not None for _, engine in targets)
            # A page of several engines has a second engine label somewhere; one page, one engine is the common
            # case and keeps the single cheap scan.
            several = ranked or 'engine="1"' in text
            per_engine = parse_vllm_metrics_by_engine(text) if several else {}
            whole = parse_vllm_metrics(text) if not ranked else None
        except (TimeoutError, aiohttp.ClientError, OSError, MetricsParseError) as e:
            for slot, _ in targets:
                self.health.failure(slot, f"scrape {url}: {e.__class__.__name__} {e}".strip())
            return False
        engines = tuple(sorted(per_engine, key=lambda k: (len(k), k)))
        if len(engines) > 1 and self._engines_seen.get(url) != engines:
            self._engines_seen[url] = engines
            if self.on_engines is not None:
                self.on_engines(url, list(engines))
        for slot, engine in targets:
            if engine is None:
                if whole is None:
                    whole = parse_vllm_metrics(text)
                self.metrics.update_slot(slot, whole)
                self.health.success(slot)
            elif engine in per_engine:
                self.metrics.update_slot(slot, per_engine[engine])
                self.health.success(slot)
            else:
                self.health.failure(slot, f"scrape {url}: no series with engine=\"{engine}\"")
        return True

    async def _run(self, url: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                t0 = loop.time()
                await self.scrape_once(url)
                await asyncio.sleep(max(0.0, self.interval_s - (loop.time() - t0)))
        except asyncio.CancelledError:
            pass
