"""The per-request ext_proc state machine: one instance per gRPC stream.

request headers -> request body chunks (FULL_DUPLEX_STREAMED: the headers reply waits for end_of_stream)
-> ``director.route(request)`` (pickers/director.py: everything between the parsed request and the header
mutations) -> headers reply (destination header + envoy.lb metadata) and the body as streamed chunks ->
response headers -> response body chunks passed straight back while observed -> end, reported to the
director's response hooks. ``handle`` returns the replies for one incoming message, in order; it never
blocks on anything but the director.

With ``response_body: access-log`` (the default) Envoy sends nothing of the response and closes the stream after
routing; the stream parks in ``PendingResponses`` until Envoy's access-log entry for the request arrives
(``finish_logged``), and debug headers travel as ``kvswitch.debug`` metadata that Envoy's Lua observer copies
onto the response.

When Envoy sends no response body (``response_body_mode: NONE``, said in the first message's
``protocol_config``; ``server.response_body: skip``), the response headers stand for the first token and the
end of the gRPC stream for the end of the request: Envoy keeps the stream open until the HTTP stream completes
as long as response trailers are SEND (with trailers SKIP it closes it right after the headers reply).
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc import messages as msg
from extproc import metrics
from extproc.budget import ByteBudget
from extproc.errors import body_for, body_too_large, over_context
from extproc.observe import ResponseObserver
from extproc.outcome import RoutedOutcome
from extproc.responselog import PendingResponses
from extproc.routing import RouteSettings, count_rejection, route_request
from pickers.clock import Clock
from pickers.ranks import served_id
from pickers.types import Scheduler, SchedulingError

log = logging.getLogger("kvswitch.extproc")

_BODY_NONE = 0  # ProcessingMode.BodySendMode.NONE


@dataclass(slots=True)
class StreamSettings:
    """What a stream needs from the server configuration."""

    body_limit_bytes: int = 8 * 1024 * 1024
    debug_headers: bool = False
    model_rewrite: dict[str, str] = field(default_factory=dict)
    response_body: bool = True  # Envoy sends response bodies (observe); the stream's protocol_config decides
    detached: bool = False  # Envoy sends nothing of the response: the stream's end after routing is the end
    # access-log mode: Envoy sends nothing of the response either; the routed request waits here for its
    # access-log entry (extproc/responselog.py), which reports the outcome.
    pending: PendingResponses | None = None
    # Bodies at least this large are parsed and routed off the event loop, within the shared byte budget.
    offload_min_bytes: int = 256 * 1024
    budget: ByteBudget | None = None
    prefill_secret: bytes | None = None  # sign prefill targets for the decode pods' sidecars (server config)
    # rel2 (issue 14): a body past this holds no prompt that fits the pool's context (extproc.contextcap):
    # refused from its content-length, or once that many bytes arrived, before it is parsed or sent on.
    context_cap_bytes: int | None = None
    # Flow control decides a request held on this stream by then at the latest (server.decide_timeout_s less
    # extproc.authz.DECIDE_MARGIN_S): Envoy resets a stream idle for 5 minutes, held or not. None: max_wait_s only.
    hold_limit_s: float | None = None

    _routing: RouteSettings | None = None

    def routing(self) -> RouteSettings:
        """The routing part (extproc.routing), made once."""
        if self._routing is None:
            self._routing = RouteSettings(self.model_rewrite, self.offload_min_bytes, self.budget,
                                          self.prefill_secret, hold_limit_s=self.hold_limit_s)
        return self._routing


class Phase(enum.Enum):
    HEADERS = "headers"  # waiting for request headers
    BODY = "body"  # buffering the request body
    ROUTED = "routed"  # decision sent, request on its way upstream
    REJECTED = "rejected"  # answered with an immediate response
    DONE = "done"  # response finished


def _headers_of(hdrs: pb.HttpHeaders) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in hdrs.headers.headers:
        out[h.key.lower()] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return out


def _status_and_type(hdrs: pb.HttpHeaders) -> tuple[str, str]:
    """(:status, content-type) of the response headers, the only two the response path reads."""
    status, ctype = "200", ""
    for h in hdrs.headers.headers:
        key = h.key.lower()
        if key == ":status" or key == "content-type":
            value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
            if key == ":status":
                status = value
            else:
                ctype = value
    return status, ctype


def _metadata_value(md, namespace: str, key: str):
    """A value from ProcessingRequest.metadata_context (filter_metadata first, typed ignored)."""
    fm = md.filter_metadata
    if namespace not in fm:
        return None
    fields = fm[namespace].fields
    if key not in fields:
        return None
    v = fields[key]
    kind = v.WhichOneof("kind")
    if kind == "string_value":
        return v.string_value
    if kind == "list_value":
        return [x.string_value for x in v.list_value.values if x.WhichOneof("kind") == "string_value"]
    return None


def _split_addresses(value) -> list[str]:
    if isinstance(value, str):
        return [a.strip() for a in value.split(",") if a.strip()]
    out: list[str] = []
    for item in value:
        out.extend(_split_addresses(item))
    return out


class ExtProcStream(RoutedOutcome):
    """State of one ext_proc stream (one HTTP request through Envoy)."""

    def __init__(self, director: Scheduler, settings: StreamSettings, clock: Clock) -> None:
        super().__init__(director, clock, settings.pending)
        self.settings = settings
        self.route_settings = settings.routing()
        self.phase = Phase.HEADERS
        self.started = time.perf_counter()
        self.headers: dict[str, str] = {}
        self.subset: list[str] | None = None
        self.observer: ResponseObserver | None = None
        self._chunks: list[bytes] = []
        self._size = 0
        self._body_expected = settings.response_body  # response body messages will come (observe)

    # ---- dispatch -------------------------------------------------------------------------------------
    async def handle(self, req: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        kind = req.WhichOneof("request")
        if kind == "request_body":
            return await self._on_request_body(req.request_body)
        if kind == "response_body":
            return self._on_response_body(req.response_body)
        if kind == "request_headers":
            return await self._on_request_headers(req)
        if kind == "response_headers":
            return self._on_response_headers(req)
        if kind == "request_trailers":
            return await self._on_request_trailers()
        if kind == "response_trailers":
            self._finish()
            return [msg.response_trailers_reply()]
        return []

    # ---- request path ---------------------------------------------------------------------------------
    async def _on_request_headers(self, req: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        if self.phase is not Phase.HEADERS:
            return []
        self.headers = _headers_of(req.request_headers)
        if req.HasField("protocol_config"):  # what Envoy's filter is configured to send, when it says
            self._body_expected = req.protocol_config.response_body_mode != _BODY_NONE
        if req.HasField("metadata_context"):
            hint = _metadata_value(req.metadata_context, msg.SUBSET_NAMESPACE, msg.SUBSET)
            if hint is not None:
                self.subset = _split_addresses(hint)
        if req.request_headers.end_of_stream:
            return await self._decide(None)
        length = self.headers.get("content-length", "")
        if length.isdigit() and self._over_context_cap(int(length)):  # rel2: refuse before any body byte
            return self._reject_over_context(int(length))
        self.phase = Phase.BODY
        return []

    def _over_context_cap(self, size: int) -> bool:
        cap = self.settings.context_cap_bytes
        return cap is not None and size > cap

    def _reject_over_context(self, size: int) -> list[pb.ProcessingResponse]:
        self._chunks = []
        assert self.settings.context_cap_bytes is not None
        return self._reject(over_context(size, self.settings.context_cap_bytes, self.phase is Phase.BODY))

    async def _on_request_body(self, body: pb.HttpBody) -> list[pb.ProcessingResponse]:
        if self.phase is not Phase.BODY:
            return []  # duplicate end_of_stream after the body ended, or chunks after a rejection
        chunk = body.body
        if chunk:
            self._size += len(chunk)
            if self._size > self.settings.body_limit_bytes:
                self._chunks = []
                return self._reject(body_too_large(self.settings.body_limit_bytes))
            if self._over_context_cap(self._size):  # rel2: chunked bodies, or a content-length that lied
                return self._reject_over_context(self._size)
            self._chunks.append(chunk)
        if not body.end_of_stream:
            return []
        return await self._decide(self._take_body())

    async def _on_request_trailers(self) -> list[pb.ProcessingResponse]:
        if self.phase is Phase.BODY:
            out = await self._decide(self._take_body())
            return out + [msg.request_trailers_reply()]
        return [msg.request_trailers_reply()]

    def _take_body(self) -> bytes:
        chunks, self._chunks = self._chunks, []
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

    async def _decide(self, body: bytes | None) -> list[pb.ProcessingResponse]:
        try:
            routed = await route_request(self.director, self.route_settings, self.clock, self.headers, body,
                                         self.subset)
        except SchedulingError as exc:
            return self._reject(exc)
        self.phase = Phase.ROUTED
        self.place(routed.decision, self.headers.get("x-request-id", ""))  # Envoy's id: its access-log entry has it
        debug = self.debug_headers() if self.settings.debug_headers and self.pending is not None else None
        out = [msg.destination_headers(routed.destination, routed.prefill, routed.remove, routed.extra or None,
                                       debug)]
        if routed.body is not None:
            out.extend(msg.body_chunks(routed.body))
        return out

    def _reject(self, exc: SchedulingError) -> list[pb.ProcessingResponse]:
        self.phase = Phase.REJECTED
        count_rejection(exc)
        return [msg.immediate(exc.status, body_for(exc), f"kvswitch_{exc.code}", exc.headers)]

    # ---- response path --------------------------------------------------------------------------------
    def _on_response_headers(self, req: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        status_text, content_type = _status_and_type(req.response_headers)
        status = int(status_text) if status_text.isdigit() else (200 if not status_text else 502)
        self.observer = ResponseObserver(status, content_type)
        if not self._body_expected and self.decision is not None and status < 400:
            # No body will be seen: the headers are the first sign of output (vLLM sends a streaming
            # response's headers when generation starts; a non-streaming one's when it is done).
            try:
                self.director.on_first_token(self.decision, self.clock.now())
            except Exception:
                log.exception("director.on_first_token failed")
        if self.decision is not None and not self._ended and req.HasField("metadata_context"):
            served = _metadata_value(req.metadata_context, msg.LB_NAMESPACE, msg.SERVED)
            if isinstance(served, str) and served:
                served = served_id(self.decision.primary, served)  # the rank that took it, on a DP pod
                self.served = served
                if served != self._counted:
                    self._count(served)
                try:
                    self.director.on_served(self.decision, served)
                except Exception:
                    log.exception("director.on_served failed")
        extra = self.debug_headers() if self.settings.debug_headers else None
        out = [msg.response_headers_reply(extra)]
        if req.response_headers.end_of_stream:
            self._finish()
        return out

    def _on_response_body(self, body: pb.HttpBody) -> list[pb.ProcessingResponse]:
        chunk = body.body
        obs = self.observer
        if obs is not None and self.decision is not None and not self._ended:
            if obs.feed(chunk) and obs.error is None:
                try:
                    self.director.on_first_token(self.decision, self.clock.now())
                except Exception:
                    log.exception("director.on_first_token failed")
        out = [msg.response_body_chunk(chunk, body.end_of_stream)]
        if body.end_of_stream:
            self._finish()
        return out

    # ---- end --------------------------------------------------------------------------------------------
    def _finish(self) -> None:
        """Response complete: report usage or the error once."""
        if self._ended or self.decision is None:
            self.phase = Phase.DONE
            return
        self._unpark()  # the response was seen here: no access-log entry needed
        self._ended = True
        self.phase = Phase.DONE
        self._uncount()
        obs = self.observer
        at = self.clock.now()
        try:
            usage = obs.finish() if obs is not None else None
            if obs is not None and obs.error is None and self._body_expected and obs.truncated:
                obs.error = "truncated: the response stream ended without its final event ([DONE])"
                metrics.ERRORS.labels("truncated").inc()
            if obs is not None and obs.error is None:
                self.director.on_finished(self.decision, usage, at)
            else:
                reason = obs.error if obs is not None else "no response"
                metrics.ERRORS.labels("upstream_error").inc()
                self.director.on_failed(self.decision, reason or "error", at)
        except Exception:
            log.exception("a director hook failed at the end of the request")

    def _ended_hook(self) -> None:
        self.phase = Phase.DONE

    def close(self) -> None:
        """The gRPC stream ended (normally or not): a request still in flight failed, unless no response
        body was to come, in which case the stream's end is the response's end (usage unknown), or its
        outcome comes from the access log (parked until then)."""
        # Parked (access-log) and the gateway sent nothing of the response: the entry reports the outcome.
        # A gateway that does send the response (a Gateway API implementation's own ext_proc settings) is
        # served by the paths below, whatever this mode says.
        if self._parked is not None and not self._ended and self.phase is Phase.ROUTED \
                and self.observer is None:
            metrics.STREAM_SECONDS.observe(time.perf_counter() - self.started)
            return
        if self.decision is not None and not self._ended and self.observer is not None \
                and not self._body_expected:
            self._finish()
        self._unpark()  # not waiting for an entry any more: the outcome is decided below
        if self.decision is not None and not self._ended and self.settings.detached:
            self._end(None, None, self.clock.now())  # the response is never seen: routing was the last news
        if self.decision is not None and not self._ended:
            metrics.ERRORS.labels("stream_aborted").inc()
            self._end("stream closed before the response ended", None, self.clock.now())
        self._uncount()  # whatever happened, a closed stream holds no in-flight gauge
        metrics.STREAM_SECONDS.observe(time.perf_counter() - self.started)
