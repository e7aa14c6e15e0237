"""List-then-watch of one Kubernetes collection (a reflector), on the ``kubernetes_asyncio`` client.

The client gives configuration (in-cluster service account with token refresh, or a kubeconfig), TLS and
authentication; the objects are read as plain JSON (only a few fields are used, and the generated models would
cost a deserialisation per event). The protocol, as the API server speaks it:

- a list answers the items and ``metadata.resourceVersion`` (in pages: ``limit``, then ``continue`` with the
  token of the previous page, until none; an expired token answers 410 and the list starts over); a watch
  from that version streams one JSON
  object per line: ``ADDED`` / ``MODIFIED`` / ``DELETED`` with the object, ``BOOKMARK`` carrying only a newer
  resourceVersion, ``ERROR`` with a ``Status`` (code 410 Gone: the version was compacted away).
- A watch ends when ``timeoutSeconds`` passes or the connection drops; the reflector resumes from the last
  resourceVersion it saw (bookmarks included) without listing again. On 410 Gone it lists again. Any other
  error waits with exponential backoff (with jitter, capped) before retrying, so a broken API server is not
  hammered; the backoff resets after a watch delivered something.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

log = logging.getLogger("kvswitch.pickers.k8s")

MAX_EVENT_BYTES = 16 * 1024 * 1024  # one watch event (one object); more is a broken stream


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class Gone(ApiError):
    """410: the resourceVersion is too old; list again."""


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: str  # ADDED | MODIFIED | DELETED | BOOKMARK
    object: dict[str, Any]

    @property
    def resource_version(self) -> str:
        return str((self.object.get("metadata") or {}).get("resourceVersion", ""))


class KubeApi:
    """Access to the API server through a ``kubernetes_asyncio`` ApiClient: GET (list, watch) for discovery,
    and JSON merge PATCH for the live planner (a Deployment's ``scale`` subresource, a pod's annotations)."""

    def __init__(self, api_client: Any, request_timeout_s: float = 30.0) -> None:
        self.client = api_client
        self.request_timeout_s = request_timeout_s

    @classmethod
    async def connect(cls, kubeconfig: str | None = None, context: str | None = None) -> KubeApi:
        """In-cluster configuration when running in a pod (unless ``kubeconfig`` is given), else kubeconfig."""
        import os

        from kubernetes_asyncio import client, config

        cfg = client.Configuration()
        if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=cfg)
        else:
            await config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
        return cls(client.ApiClient(configuration=cfg))

    async def close(self) -> None:
        await self.client.close()

    async def _get(self, path: str, query: dict[str, str], timeout: aiohttp.ClientTimeout) -> Any:
        resp = await self.client.call_api(
            path, "GET", query_params=list(query.items()), header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"], _preload_content=False, _request_timeout=timeout)
        if resp.status != 200:
            body = await resp.read()
            resp.release()
            try:
                message = orjson.loads(body).get("message", "")
            except (orjson.JSONDecodeError, AttributeError):
                message = body[:200].decode("utf-8", "replace")
            raise (Gone if resp.status == 410 else ApiError)(resp.status, f"GET {path}: {message}")
        return resp

    async def get(self, path: str, query: dict[str, str] | None = None) -> dict[str, Any]:
        resp = await self._get(path, query or {}, aiohttp.ClientTimeout(total=self.request_timeout_s))
        try:
            return orjson.loads(await resp.read())
        finally:
            resp.release()

    async def patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A JSON merge patch (``application/merge-patch+json``); returns the object as the server stored it."""
        resp = await self.client.call_api(
            path, "PATCH", body=body,
            header_params={"Accept": "application/json", "Content-Type": "application/merge-patch+json"},
            auth_settings=["BearerToken"], _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(total=self.request_timeout_s))
        raw = await resp.read()
        resp.release()
        if resp.status != 200:
            try:
                message = orjson.loads(raw).get("message", "")
            except (orjson.JSONDecodeError, AttributeError):
                message = raw[:200].decode("utf-8", "replace")
            raise ApiError(resp.status, f"PATCH {path}: {message}")
        return orjson.loads(raw)

    async def watch(self, path: str, query: dict[str, str], timeout_s: int) -> AsyncIterator[WatchEvent]:
        """Events of one watch request until the server ends it (``timeoutSeconds``) or it breaks."""
        q = {**query, "watch": "1", "allowWatchBookmarks": "true", "timeoutSeconds": str(timeout_s)}
        # the server sends bookmarks about once a minute; nothing for much longer than the timeout is a dead link
        resp = await self._get(path, q, aiohttp.ClientTimeout(total=None, sock_connect=self.request_timeout_s,
                                                              sock_read=timeout_s + 30))
        buf = bytearray()
        try:
            async for chunk in resp.content.iter_any():
                buf += chunk
                while (nl := buf.find(b"\n")) >= 0:
                    line = bytes(buf[:nl])
                    del buf[: nl + 1]
                    if line.strip():
                        yield _event(orjson.loads(line))
                if len(buf) > MAX_EVENT_BYTES:
                    raise ApiError(0, f"watch {path}: an event larger than {MAX_EVENT_BYTES} bytes")
            if buf.strip():
                yield _event(orjson.loads(bytes(buf)))
        finally:
            resp.release()


def _event(doc: dict[str, Any]) -> WatchEvent:
    kind = str(doc.get("type", ""))
    obj = doc.get("object") or {}
    if kind == "ERROR":
        code = int(obj.get("code") or 0)
        raise (Gone if code == 410 else ApiError)(code, str(obj.get("message", "watch error")))
    if kind not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK"):
        raise ApiError(0, f"unknown watch event type {kind!r}")
    return WatchEvent(kind, obj)


class Backoff:
    """Exponential backoff with full jitter: 0.2 s, 0.4 s, ... capped at ``cap_s``."""

    def __init__(self, first_s: float = 0.2, cap_s: float = 10.0) -> None:
        self.first_s = first_s
        self.cap_s = cap_s
        self.failures = 0

    def reset(self) -> None:
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        return random.uniform(0.5, 1.0) * min(self.cap_s, self.first_s * 2 ** (self.failures - 1))


@dataclass(slots=True)
class ReflectorStats:
    lists: int = 0
    watches: int = 0
    gone: int = 0
    errors: int = 0
    events: int = 0


class Reflector:
    """Keeps a consumer in step with one collection: ``on_list(items)`` after every (re)list, ``on_event``
    for each change. Runs until cancelled; never raises out of ``run`` but for cancellation."""

    def __init__(self, api: KubeApi, path: str, query: dict[str, str],
                 on_list: Callable[[list[dict[str, Any]]], None], on_event: Callable[[WatchEvent], None],
                 watch_timeout_s: int = 300, backoff: Backoff | None = None, what: str = "",
                 on_error: Callable[[Exception], None] | None = None, page_size: int = 100) -> None:
        self.api = api
        self.path = path
        self.query = query
        self.on_list = on_list
        self.on_event = on_event
        self.watch_timeout_s = watch_timeout_s
        self.backoff = backoff or Backoff()
        self.what = what or path
        self.on_error = on_error
        self.page_size = page_size
        self.resource_version: str | None = None
        self.stats = ReflectorStats()

    async def _list(self) -> tuple[list[dict[str, Any]], str]:
        """All items, fetched ``page_size`` at a time (``limit``/``continue``: one consistent snapshot, and the
        event loop is free between pages instead of parsing one response of thousands of pods at once)."""
        items: list[dict[str, Any]] = []
        token = ""
        while True:
            query = {**self.query, "limit": str(self.page_size)}
            if token:
                query["continue"] = token
            doc = await self.api.get(self.path, query)
            items.extend(doc.get("items") or [])
            meta = doc.get("metadata") or {}
            token = str(meta.get("continue") or "")
            if not token:
                return items, str(meta.get("resourceVersion", ""))

    async def run(self) -> None:
        while True:
            try:
                if self.resource_version is None:
                    items, version = await self._list()
                    self.stats.lists += 1
                    self.on_list(items)
                    self.resource_version = version
                    self.backoff.reset()
                self.stats.watches += 1
                # jitter the timeout so that many replicas do not reconnect in step
                timeout = int(self.watch_timeout_s * random.uniform(1.0, 1.2))
                started = asyncio.get_running_loop().time()
                seen = 0
                async for ev in self.api.watch(self.path, {**self.query, "resourceVersion": self.resource_version},
                                               timeout):
                    if ev.resource_version:
                        self.resource_version = ev.resource_version
                    if ev.type != "BOOKMARK":
                        self.stats.events += 1
                        self.on_event(ev)
                    seen += 1
                    self.backoff.reset()
                if not seen and asyncio.get_running_loop().time() - started < 1.0:
                    await asyncio.sleep(self.backoff.next_delay())  # a server that ends every watch at once
            except asyncio.CancelledError:
                raise
            except Gone as exc:
                self.stats.gone += 1
                log.info("%s: %s; listing again", self.what, exc)
                self.resource_version = None
            except Exception as exc:  # API down, connection dropped, bad JSON: retry after a backoff
                self.stats.errors += 1
                if self.on_error is not None:
                    self.on_error(exc)
                delay = self.backoff.next_delay()
                log.warning("%s: %s: %s; retrying in %.2fs", self.what, type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
