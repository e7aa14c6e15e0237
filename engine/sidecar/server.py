"""The decode pod's sidecar: an aiohttp reverse proxy that runs the prefill leg, then the decode leg.

    client/Envoy --> Sidecar --(x-prefiller-host-port?)--> prefill pod (max_tokens 1, keep KV)
                          \\--> local vLLM (original request + kv_transfer_params) --stream--> back

Requests without ``x-prefiller-host-port`` go straight to the local engine. Every other path (``/v1/models``,
``/health``, the engine's ``/metrics``) is proxied through; the sidecar's own metrics are at
``/sidecar/metrics``. One pooled ClientSession serves every leg (and may be shared by many sidecars).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from engine import VLLM_LISTEN_BACKLOG
from engine.sidecar.allowlist import SIGNATURE_HEADER, AddressError, PrefillAllowList, normalize_address
from engine.sidecar.config import SidecarConfig
from engine.sidecar.errors import as_openai_error, error_response
from engine.sidecar.metrics import SidecarMetrics
from engine.sidecar.protocol import (
    SSEUsageRewriter,
    cached_tokens_of,
    decode_body,
    prefill_body,
    rewrite_usage,
    strip_client_kv_params,
)

log = logging.getLogger(__name__)

PREFILLER_HEADER = "x-prefiller-host-port"
PREFILL_ENDPOINT_HEADER = "x-kvswitch-prefill-endpoint"
PREFILL_CACHED_HEADER = "x-kvswitch-prefill-cached-tokens"
REQUEST_ID_HEADER = "X-Request-Id"
COMPLETION_PATHS = ("/v1/completions", "/v1/chat/completions")
RETRY_STATUSES = frozenset({502, 503, 504})
_MAX_PREFILL_RESPONSE = 8 << 20
_MAX_JSON_RESPONSE = 64 << 20

# Not forwarded upstream: hop-by-hop headers, ones aiohttp recomputes, and the routing headers meant for us.
_DROP_REQUEST = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "host", "content-length", "accept-encoding", PREFILLER_HEADER,
    SIGNATURE_HEADER,
})
_DROP_RESPONSE = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "content-length", "content-encoding", "date", "server",
})


@dataclass(slots=True)
class PrefillResult:
    """What the prefill leg gave the decode leg."""

    kv_params: dict[str, Any] | None
    cached_tokens: int | None


class _LegFailed(Exception):
    """A leg ended in a response the client gets as is."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


class Sidecar:
    """One decode pod's sidecar. ``await start()``, use ``.address``, ``await stop()`` (or ``async with``)."""

    def __init__(self, config: SidecarConfig, session: aiohttp.ClientSession | None = None) -> None:
        self.config = config
        self.metrics = SidecarMetrics()
        self.allow_list = PrefillAllowList(
            config.prefill_pods, config.prefill_pods_file, secret=config.picker_secret,
            reload_interval_s=config.prefill_pods_reload_s,
        )
        self._session = session
        self._own_session = session is None
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    # ---- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("sidecar already started")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.config.max_connections, limit_per_host=0),
                auto_decompress=False,
            )
        app = web.Application(client_max_size=self.config.max_body_bytes)
        app.router.add_get("/sidecar/metrics", self._metrics)
        for path in COMPLETION_PATHS:
            app.router.add_post(path, self._completions)
        app.router.add_route("*", "/{tail:.*}", self._passthrough)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
        await runner.setup()
        # the engine's own accept queue: Envoy's connections reach the sidecar as they would reach vLLM
        site = web.TCPSite(runner, self.config.host, self.config.port, reuse_address=True, backlog=VLLM_LISTEN_BACKLOG)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Sidecar:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("sidecar not started")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` the sidecar listens on (what the picker names as the decode endpoint)."""
        return f"{self.config.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    # ---- handlers -------------------------------------------------------------------------------
    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(), content_type="text/plain", charset="utf-8")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        arrived = time.perf_counter()
        raw = await self._read_body(request)
        if isinstance(raw, web.Response):
            return raw
        raw = strip_client_kv_params(raw)
        headers = _upstream_headers(request.headers)
        target_header = request.headers.get(PREFILLER_HEADER, "").strip()
        if not target_header:
            self.metrics.legs.labels("direct", "sent").inc()
            return await self._decode(request, raw, headers, arrived, prefill=None, target=None)

        try:
            target = normalize_address(target_header)
        except AddressError as exc:
            self.metrics.refused.labels("bad_address").inc()
            return error_response(400, f"{PREFILLER_HEADER}: {exc}", param=PREFILLER_HEADER,
                                  code="invalid_prefill_address")
        request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        headers[REQUEST_ID_HEADER] = request_id
        headers["Content-Type"] = "application/json"  # both legs carry bodies we serialise (vLLM insists)
        why = self.allow_list.check(target, request_id, request.headers.get(SIGNATURE_HEADER))
        if why is not None:
            self.metrics.refused.labels("not_allowed").inc()
            log.warning("refused prefill pod %s for request %s: %s", target, request_id, why)
            return error_response(403, f"prefill pod {target} refused: {why}", param=PREFILLER_HEADER,
                                  code="prefill_pod_not_allowed")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            self.metrics.refused.labels("bad_json").inc()
            return error_response(400, f"request body is not valid JSON: {exc}", code="invalid_json")
        if not isinstance(body, dict):
            self.metrics.refused.labels("bad_json").inc()
            return error_response(400, "request body must be a JSON object", code="invalid_request")

        try:
            result = await self._prefill(target, request.path, body, headers)
        except _LegFailed as failed:
            failed.response.headers[PREFILL_ENDPOINT_HEADER] = target
            failed.response.headers[REQUEST_ID_HEADER] = request_id
            return failed.response
        decode_raw = orjson.dumps(decode_body(body, result.kv_params))
        return await self._decode(request, decode_raw, headers, arrived, prefill=result, target=target)

    async def _passthrough(self, request: web.Request) -> web.StreamResponse:
        raw = await self._read_body(request)
        if isinstance(raw, web.Response):
            return raw
        raw = strip_client_kv_params(raw) if raw else raw  # any path the engine serves reads the same fields
        assert self._session is not None
        url = self.config.decode_url + request.path_qs
        try:
            upstream = await self._session.request(
                request.method, url, data=raw if raw else None, headers=_upstream_headers(request.headers),
                timeout=self._stream_timeout(), allow_redirects=False,
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            return error_response(502, f"local engine at {self.config.decode_url} unreachable: {exc!r}",
                                  code="decode_unreachable")
        return await self._relay(request, upstream, {}, None, None)

    # ---- legs -----------------------------------------------------------------------------------
    async def _prefill(
        self, target: str, path: str, body: dict[str, Any], headers: CIMultiDict[str],
    ) -> PrefillResult:
        """Run the prefill leg with bounded retries; raise _LegFailed with the client's answer otherwise."""
        assert self._session is not None
        cfg = self.config
        url = f"http://{target}{path}"
        data = orjson.dumps(prefill_body(body, cfg.connector))
        timeout = aiohttp.ClientTimeout(total=cfg.prefill_timeout_s, sock_connect=cfg.connect_timeout_s)
        started = time.perf_counter()
        last_problem = ""
        for attempt in range(cfg.max_retries + 1):
            if attempt:
                self.metrics.prefill_retries.inc()
                await asyncio.sleep(cfg.retry_backoff_s * (2 ** (attempt - 1)))
            try:
                async with self._session.post(url, data=data, headers=headers, timeout=timeout) as resp:
                    payload = await _read_limited(resp, _MAX_PREFILL_RESPONSE)
                    status = resp.status
            except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
                last_problem = f"connection failed ({exc.__class__.__name__}: {exc})"
                continue
            except TimeoutError:
                self.metrics.legs.labels("prefill", "timeout").inc()
                raise _LegFailed(error_response(
                    504, f"prefill pod {target} did not answer within {cfg.prefill_timeout_s:g} s",
                    code="prefill_timeout")) from None
            except (aiohttp.ClientError, ValueError) as exc:
                self.metrics.legs.labels("prefill", "failed").inc()
                raise _LegFailed(error_response(
                    502, f"prefill pod {target} failed: {exc}", code="prefill_failed")) from None
            if status in RETRY_STATUSES:
                last_problem = f"status {status}"
                continue
            if 400 <= status < 500:
                self.metrics.legs.labels("prefill", "client_error").inc()
                raise _LegFailed(web.Response(
                    status=status, content_type="application/json",
                    body=as_openai_error(status, payload, f"prefill pod {target} rejected the request")))
            if status >= 300:
                self.metrics.legs.labels("prefill", "failed").inc()
                raise _LegFailed(error_response(
                    502, f"prefill pod {target} failed with status {status}", code="prefill_failed"))
            try:
                answer = orjson.loads(payload)
            except orjson.JSONDecodeError:
                answer = None
            if not isinstance(answer, dict):
                self.metrics.legs.labels("prefill", "failed").inc()
                raise _LegFailed(error_response(
                    502, f"prefill pod {target} answered with a body that is not a JSON object",
                    code="prefill_failed"))
            self.metrics.prefill_seconds.observe(time.perf_counter() - started)
            kv = answer.get("kv_transfer_params")
            kv_params = kv if isinstance(kv, dict) and kv else None
            if cfg.connector.value == "nixl" and kv_params is None:
                # The decode engine then computes the prompt itself: correct, only slower.
                log.warning("prefill pod %s returned no kv_transfer_params; decode computes the prompt", target)
                self.metrics.legs.labels("prefill", "no_kv_params").inc()
            else:
                self.metrics.legs.labels("prefill", "ok").inc()
            return PrefillResult(kv_params, cached_tokens_of(answer))
        self.metrics.legs.labels("prefill", "failed").inc()
        raise _LegFailed(error_response(
            502, f"prefill pod {target} failed after {cfg.max_retries + 1} attempts: {last_problem}",
            code="prefill_unavailable"))

    async def _decode(
        self, request: web.Request, raw: bytes, headers: CIMultiDict[str], arrived: float,
        prefill: PrefillResult | None, target: str | None,
    ) -> web.StreamResponse:
        assert self._session is not None
        url = self.config.decode_url + request.path_qs
        sent = time.perf_counter()
        try:
            upstream = await self._session.post(url, data=raw, headers=headers, timeout=self._stream_timeout())
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.metrics.legs.labels("decode", "unreachable").inc()
            return error_response(502, f"local decode engine at {self.config.decode_url} unreachable: {exc!r}",
                                  code="decode_unreachable")
        extra: dict[str, str] = {}
        if target is not None:
            extra[PREFILL_ENDPOINT_HEADER] = target
            extra[REQUEST_ID_HEADER] = headers[REQUEST_ID_HEADER]
        cached = prefill.cached_tokens if prefill is not None else None
        if cached is not None:
            extra[PREFILL_CACHED_HEADER] = str(cached)
        return await self._relay(request, upstream, extra, cached, (sent, arrived))

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse, extra: dict[str, str],
        prefill_cached: int | None, timing: tuple[float, float] | None,
    ) -> web.StreamResponse:
        """Send the engine's answer back, chunk by chunk; rewrite usage when a prefill leg ran."""
        headers = CIMultiDict((k, v) for k, v in upstream.headers.items() if k.lower() not in _DROP_RESPONSE)
        headers.update(extra)
        headers.update(self.config.extra_response_headers)
        ctype = upstream.headers.get("Content-Type", "")
        outcome = "ok" if upstream.status < 400 else "error"
        try:
            if prefill_cached is not None and ctype.startswith("application/json") and upstream.status < 400:
                try:
                    payload = await _read_limited(upstream, _MAX_JSON_RESPONSE)
                except ValueError as exc:
                    self._count_decode(timing, "upstream_broken")
                    return error_response(502, f"local engine answer too large: {exc}", code="decode_failed")
                self._observe_first_byte(timing)
                try:
                    answer = orjson.loads(payload)
                    if isinstance(answer, dict) and rewrite_usage(answer, prefill_cached):
                        payload = orjson.dumps(answer)
                except orjson.JSONDecodeError:
                    pass
                self._count_decode(timing, outcome)
                return web.Response(status=upstream.status, body=payload, headers=headers)
            rewriter = None
            if prefill_cached is not None and ctype.startswith("text/event-stream"):
                rewriter = SSEUsageRewriter(prefill_cached)
            out = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
            await out.prepare(request)
            first = True
            async for chunk in upstream.content.iter_any():
                if first:
                    self._observe_first_byte(timing)
                    first = False
                if rewriter is not None:
                    chunk = rewriter.feed(chunk)
                    if not chunk:
                        continue
                await out.write(chunk)
            if rewriter is not None and (rest := rewriter.flush()):
                await out.write(rest)
            await out.write_eof()
            self._count_decode(timing, outcome)
            return out
        except (ConnectionResetError, asyncio.CancelledError):
            self._count_decode(timing, "client_gone")
            upstream.close()  # closing the engine connection aborts the generation there
            raise
        except (TimeoutError, aiohttp.ClientError) as exc:
            self._count_decode(timing, "upstream_broken")
            upstream.close()
            log.warning("engine stream broke: %r", exc)
            raise
        finally:
            upstream.release()

    # ---- helpers --------------------------------------------------------------------------------
    async def _read_body(self, request: web.Request) -> bytes | web.Response:
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            self.metrics.refused.labels("too_large").inc()
            return error_response(413, f"request body exceeds {self.config.max_body_bytes} bytes",
                                  code="body_too_large")

    def _stream_timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout_s)

    def _observe_first_byte(self, timing: tuple[float, float] | None) -> None:
        if timing is None:
            return
        now = time.perf_counter()
        self.metrics.decode_ttft_seconds.observe(now - timing[0])
        self.metrics.request_ttft_seconds.observe(now - timing[1])

    def _count_decode(self, timing: tuple[float, float] | None, outcome: str) -> None:
        if timing is not None:
            self.metrics.legs.labels("decode", outcome).inc()


def _upstream_headers(incoming: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    headers = CIMultiDict((k, v) for k, v in incoming.items() if k.lower() not in _DROP_REQUEST)
    headers["Accept-Encoding"] = "identity"
    return headers


async def _read_limited(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, or ValueError past ``limit`` bytes (an upstream cannot make us hold unbounded data)."""
    parts: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise ValueError(f"response body over {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)
