"""The picker as Envoy's ext_authz HTTP service: one plain HTTP request per client request, the decision in the
answer's headers.

Why a second front beside ext_proc: an ext_proc stream is a gRPC bidirectional stream per client request with
at least four messages (request headers, body, the headers reply, the body streamed back), and grpc-python pays
about 2 ms of CPU per such stream on this project's reference machine, most of it in gRPC's own machinery, not
in the decision. Envoy's ext_authz filter with ``with_request_body`` buffers the body and asks once over
HTTP/1.1 keep-alive connections; the body is not echoed back; the answer's headers go onto the upstream request
(``allowed_upstream_headers``). Served by a small HTTP/1.1 server (extproc/http1.py: httptools under an
asyncio protocol) on the picker's event loop, next to the gRPC port that still takes the access log (the
responses' outcomes) and ext_proc for gateways that speak only it
(Gateway API implementations).

The contract (extproc/envoyconfig/builder.py writes Envoy's side):
- ``GET /health``: 200 while the picker is ready, 503 while not ready or stopping (Envoy's active health check).
- ``<method> /decide<path>`` with the client's headers that matter (``parse.HEADERS_THAT_MATTER`` and the
  request id) and body: 200 routes (``x-gateway-destination-endpoint`` and the other routing headers, debug
  headers for the client); a 4xx is the answer the client gets (the OpenAI error body, ``retry-after`` on a
  429). A 5xx (no endpoint available, a director bug) Envoy takes for a failed check, as if the picker were
  unreachable: fail-closed, the client gets Envoy's own 503 (OpenAI-shaped by the local-reply mappers, without
  the picker's message); fail-open, the request goes on without a decision (round robin over the listed pool).
- It cannot change a body: a body the gateway would have to clean (engine-internal fields a client set) is a 400,
  and ``server.model_rewrite`` needs the ext_proc front (extproc/config.py refuses the combination).
"""

from __future__ import annotations

import asyncio
import logging

from extproc import messages as msg
from extproc import metrics
from extproc.errors import RequestRejected, body_for, body_too_large, over_context
from extproc.http1 import HttpServer, Request, Response
from extproc.outcome import RoutedOutcome
from extproc.responselog import PendingResponses
from extproc.routing import RouteSettings, count_rejection, route_request
from pickers.clock import Clock
from pickers.types import Scheduler, SchedulingError

log = logging.getLogger("kvswitch.extproc")

DECIDE_PREFIX = "/decide"
HEALTH_PATH = "/health"
REMOVE_HEADER = "x-envoy-auth-headers-to-remove"  # ext_authz: names the answer removes from the upstream request
_JSON = "application/json"
_TEXT = [("content-type", "text/plain")]
# Envoy's ext_authz call gives up after server.decide_timeout_s (extproc.config.DECIDE_TIMEOUT_S, 290 s, the
# timeout `kvswitch envoy-config` writes: EnvoyConfigOptions.decide_timeout_s), and a request the call gave up
# on is failed (or, fail-open, sent unrouted); flow control therefore decides a request it holds DECIDE_MARGIN_S
# before that at the latest. Past the knee flow control holds a request in the picker until some pod has room.
# With the earlier 10 s (a hold of 8 s) every request held longer went to a pod's first-come queue, which undid
# the release order (shortest prefill first): on the Mooncake trace at 3x the knee, in virtual time, a hold
# limit of 4 s took the median TTFT from 3.7 to 26 s and the p90 from 48 to 53 s (README "Flow control behind
# ext_authz"). Why 290 s: Envoy resets a stream with no bytes either way for 5 minutes (the connection
# manager's stream_idle_timeout, left at its default; per-try idle on the upstream side is 300 s too), held or
# not, so a longer call would end in that reset instead of a decision. What it costs: a picker that hangs
# (accepts and never answers) keeps its requests this long before Envoy gives up, fail-open included; one that
# is down is refused at once.
DECIDE_MARGIN_S = 2.0


def hold_limit_s(decide_timeout_s: float) -> float:
    """How long flow control may hold a request asked over ext_authz whose call times out after
    ``decide_timeout_s``: that less DECIDE_MARGIN_S, so the answer reaches Envoy before it gives up."""
    return max(0.0, decide_timeout_s - DECIDE_MARGIN_S)


class AuthzFront:
    """The ext_authz HTTP service (see the module docstring). ``ready`` is set by the server's readiness loop."""

    def __init__(self, director: Scheduler, settings: RouteSettings, clock: Clock,
                 pending: PendingResponses | None, body_limit_bytes: int, context_cap_bytes: int | None,
                 debug_headers: bool = False) -> None:
        self.director = director
        self.settings = settings
        self.clock = clock
        self.pending = pending
        self.body_limit_bytes = body_limit_bytes
        self.context_cap_bytes = context_cap_bytes
        self.debug_headers = debug_headers
        self.ready = False
        self.last_request_at = 0.0  # loop time of the newest decision request (the server's move-away wait)
        self._server: HttpServer | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        server = HttpServer(self._handle, _bad_request, self.body_limit_bytes)
        try:
            self.port = await server.start(host, port)
        except OSError as exc:
            raise OSError(f"cannot serve the ext_authz front on {host}:{port}: {exc.strerror}") from None
        self._server = server
        return self.port

    async def stop(self, grace: float) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace)

    async def _handle(self, request: Request) -> Response:
        target = request.target
        path = target.partition("?")[0]
        if path == HEALTH_PATH:
            return Response(200 if self.ready else 503, _TEXT, b"ok" if self.ready else b"not ready")
        if not path.startswith(DECIDE_PREFIX):
            return _error(RequestRejected(404, f"no such path on the picker: {path}", "not_found"))
        self.last_request_at = asyncio.get_running_loop().time()
        metrics.STREAMS.inc()
        try:
            return await self._decide(request, target[len(DECIDE_PREFIX):] or "/")
        finally:
            metrics.STREAMS.dec()

    async def _decide(self, request: Request, path: str) -> Response:
        size = request.content_length
        cap = self.context_cap_bytes
        if request.body_dropped or (size is not None and size > self.body_limit_bytes):
            return _reject(body_too_large(self.body_limit_bytes))
        if size is not None and cap is not None and size > cap:
            return _reject(over_context(size, cap))
        body = request.body
        headers = request.headers  # the request's own dict (http1 builds one per request): no copy
        headers[":path"] = path
        headers[":method"] = request.method
        outcome = RoutedOutcome(self.director, self.clock, self.pending)
        try:
            routed = await route_request(self.director, self.settings, self.clock, headers, body)
        except SchedulingError as exc:
            return _reject(exc)
        if not outcome.place(routed.decision, headers.get("x-request-id", "")):
            # nothing will report the end: routing is the last news (the ext_proc front's detach mode)
            outcome._end(None, None, self.clock.now())
        out = [(msg.DESTINATION, routed.destination)]
        if routed.prefill:
            out.append((msg.PREFILLER, routed.prefill))
        out.extend(routed.extra)
        if routed.remove:
            out.append((REMOVE_HEADER, ",".join(routed.remove)))
        if self.debug_headers:
            out.extend(outcome.debug_headers())
        return Response(200, out)


def _reject(exc: SchedulingError) -> Response:
    count_rejection(exc)
    return _error(exc)


def _error(exc: SchedulingError) -> Response:
    return Response(exc.status, [("content-type", _JSON), *exc.headers], body_for(exc))


def _bad_request(status: int, why: str) -> Response:
    """The answer to what the HTTP parser rejected (or a failure of the handler itself: 500)."""
    code = {400: "invalid_http", 431: "headers_too_large"}.get(status, "picker_error")
    return _error(RequestRejected(status, why, code))
