"""The picker's end of ``response_body: access-log``: Envoy's access-log entries become the director's hooks.

Envoy closes the ext_proc stream once a request is routed; the stream then parks itself here
(``PendingResponses.park``) under the request id Envoy generated (the hardened config strips a client's
``x-request-id``, so the id is the gateway's). When the request ends, Envoy's HTTP gRPC access logger sends one
entry (``AccessLogService.StreamAccessLogs``); ``logged_response`` reads it into a ``LoggedResponse`` and the
parked stream reports first token, served endpoint, usage, success or failure as if it had watched the
response itself (extproc/envoyconfig/responselog.py says what Envoy's Lua observer records and why).

Bounded: at most ``max_pending`` parked requests, none older than ``max_age_s`` (an entry that never comes,
e.g. Envoy dropped it or another replica got it, releases its request as "outcome unknown", which blames no
pod). Total: a malformed entry is counted and skipped; nothing in an entry can raise into the gRPC stream.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2 as al
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from prometheus_client import Counter

from extproc.observe import MALFORMED_USAGE
from pickers.types import Usage

log = logging.getLogger("kvswitch.extproc.responselog")

ENTRIES = Counter("kvswitch_access_log_entries_total", "Access-log entries received, by what became of them",
                  ["outcome"])

RESPONSE_NAMESPACE = "kvswitch.response"
# Outcome unknown or caused by the client: a 4xx-shaped reason, so it blames no pod (datalayer.health.pod_fault).
CLIENT_GONE = "http 499 the client closed the connection"
NO_ENTRY = "http 499 no access-log entry came for this request"
# Envoy replayed the request's ext_proc stream (its gRPC retry, after a reset before the routing reply reached
# it): the earlier decision never took effect and is released for the new one.
SUPERSEDED = "http 499 superseded: Envoy replayed this request's ext_proc stream"
_TRUNCATED = "truncated: the response stream ended without its final event ([DONE])"
_MAX_COUNT = 1 << 40


@dataclass(slots=True, frozen=True)
class LoggedResponse:
    """One request's outcome as Envoy logged it. Times are seconds from when Envoy got the request."""

    request_id: str
    status: int  # 0: no response came from upstream
    served: str | None  # ip:port of the upstream that answered
    first_byte_s: float | None  # first response body byte (a stream's first token); None when no body
    end_s: float  # last byte sent to the client (or the stream's duration)
    usage: Usage | None
    failure: str | None  # None: success; else a reason in the director's vocabulary (pod fault or not)
    # How long before the entry reached the picker the request ended: the access log's batching and delivery,
    # so the hooks get the times things happened, not the time the batch came (see ``log_lag``).
    lag_s: float = 0.0


def _flags_failure(flags: al.ResponseFlags) -> str | None:
    """What Envoy's response flags say went wrong, pod faults first; None when nothing did."""
    if flags.upstream_connection_failure or flags.no_healthy_upstream:
        return "upstream connection failure"
    if flags.upstream_request_timeout or flags.stream_idle_timeout:
        return "upstream timeout"
    if flags.upstream_remote_reset or flags.upstream_connection_termination or flags.upstream_overflow \
            or flags.upstream_retry_limit_exceeded or flags.upstream_protocol_error:
        return "upstream reset"
    if flags.local_reset:
        return "upstream reset"
    if flags.downstream_connection_termination:
        return CLIENT_GONE
    return None


def _number(fields, key: str) -> float | None:
    if key not in fields:
        return None
    v = fields[key]
    return v.number_value if v.WhichOneof("kind") == "number_value" else None


def _flag(fields, key: str) -> bool:
    if key not in fields:
        return False
    v = fields[key]
    return v.WhichOneof("kind") == "bool_value" and v.bool_value


def _count(value: float | None) -> int | None:
    if value is None or not 0 <= value < _MAX_COUNT or value != int(value):
        return None
    return int(value)


# The most an entry's delivery may have lagged its request's end: Envoy batches entries for
# ``access_log_flush_ms`` (extproc/envoyconfig/responselog.py, 10 ms by default); a larger difference between
# Envoy's wall clock and the picker's is clock skew between their hosts, not delay, and is not trusted.
MAX_LOG_LAG_S = 0.1


def log_lag(ended_wall_s: float, received_wall_s: float) -> float:
    """Seconds between a request's end on Envoy's wall clock and the entry's arrival on the picker's, within
    [0, MAX_LOG_LAG_S]: exact on one host (``kvswitch up``) or NTP-synchronised ones, bounded otherwise."""
    return min(max(received_wall_s - ended_wall_s, 0.0), MAX_LOG_LAG_S)


def logged_response(entry: al.HTTPAccessLogEntry, received_wall_s: float | None = None) -> LoggedResponse | None:
    """Read one entry; None when it names no request (not one kvswitch routed). ``received_wall_s``: the
    picker's wall clock when the entry came (gives ``lag_s``; None: no lag assumed)."""
    rid = entry.request.request_id
    if not rid:
        return None
    common = entry.common_properties
    status = entry.response.response_code.value if entry.response.HasField("response_code") else 0
    sock = common.upstream_remote_address.socket_address
    served = f"{sock.address}:{sock.port_value}" if sock.address and sock.port_value else None
    start_us = common.start_time.seconds * 1_000_000 + common.start_time.nanos // 1000
    end = common.time_to_last_downstream_tx_byte if common.HasField("time_to_last_downstream_tx_byte") \
        else common.duration
    end_s = end.seconds + end.nanos / 1e9
    md = common.metadata.filter_metadata
    fields = md[RESPONSE_NAMESPACE].fields if RESPONSE_NAMESPACE in md else None
    first_byte_s = usage = None
    failure = _flags_failure(common.response_flags)
    if fields is not None:
        first_us = _number(fields, "first_byte_us")
        if first_us is not None and first_us >= start_us:
            first_byte_s = min((first_us - start_us) / 1e6, end_s)
        prompt = _count(_number(fields, "prompt_tokens"))
        completion = _count(_number(fields, "completion_tokens"))
        cached = _count(_number(fields, "cached_tokens"))
        if prompt is not None and completion is not None:
            usage = Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=min(cached or 0, prompt))
        else:
            if _flag(fields, "usage_malformed") or "prompt_tokens" in fields:
                MALFORMED_USAGE.inc()  # present but not counts we can use (as extproc.observe counts it)
            if (events := _count(_number(fields, "events"))):
                usage = Usage(completion_tokens=events)  # no usable usage block: the SSE data events counted
        if failure is None and status < 400:
            if _flag(fields, "error_event"):
                failure = "stream error event"
            elif _flag(fields, "sse") and not _flag(fields, "done"):
                failure = _TRUNCATED
    if failure is None and status >= 400:
        failure = f"http {status}"
    if failure is None and status == 0:
        failure = "no response"
    lag = 0.0 if received_wall_s is None else log_lag(start_us / 1e6 + end_s, received_wall_s)
    return LoggedResponse(rid, status, served, first_byte_s, end_s, usage, failure, lag)


class Parked(Protocol):
    """A routed request waiting for its access-log entry (extproc.outcome.RoutedOutcome: either front)."""

    def finish_logged(self, response: LoggedResponse) -> None: ...

    def abandon(self, reason: str) -> None: ...


class PendingResponses:
    """Routed requests by request id until their entry comes; bounded in count and age (oldest first)."""

    def __init__(self, max_pending: int = 100_000, max_age_s: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_pending = max_pending
        self.max_age_s = max_age_s
        self._clock = clock
        self._parked: OrderedDict[str, tuple[float, Parked]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._parked)

    def park(self, request_id: str, stream: Parked) -> None:
        now = self._clock()
        old = self._parked.pop(request_id, None)
        if old is not None and old[1] is not stream:  # the same request routed again: the first is void
            ENTRIES.labels("superseded").inc()
            old[1].abandon(SUPERSEDED)
        self._parked[request_id] = (now, stream)
        self._expire(now)

    def discard(self, request_id: str, stream: Parked) -> None:
        """``stream`` learned its outcome another way: stop waiting (if it is still the one parked there)."""
        item = self._parked.get(request_id)
        if item is not None and item[1] is stream:
            del self._parked[request_id]

    def complete(self, response: LoggedResponse) -> bool:
        """Report the entry to its parked request; False when no request here waits for it."""
        item = self._parked.pop(response.request_id, None)
        if item is None:
            return False
        item[1].finish_logged(response)
        return True

    def _expire(self, now: float) -> None:
        parked = self._parked
        while parked:
            rid, (at, stream) = next(iter(parked.items()))
            if len(parked) <= self.max_pending and now - at <= self.max_age_s:
                return
            del parked[rid]
            ENTRIES.labels("expired").inc()
            stream.abandon(NO_ENTRY)

    def abandon_all(self) -> None:
        """The picker stops: every parked request is released (outcome unknown)."""
        while self._parked:
            _, (_, stream) = self._parked.popitem(last=False)
            stream.abandon(NO_ENTRY)


class AccessLogReceiver(als_pb2_grpc.AccessLogServiceServicer):
    """Envoy's access-log stream into ``PendingResponses``; entries of requests another replica routed are
    counted and dropped."""

    def __init__(self, pending: PendingResponses, wall: Callable[[], float] = time.time) -> None:
        self.pending = pending
        self.wall = wall  # the wall clock Envoy's entry times are read against (the lag of a batch)

    async def StreamAccessLogs(  # noqa: N802 (the gRPC method's name)
        self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage], context: grpc.aio.ServicerContext
    ) -> als_pb2.StreamAccessLogsResponse:
        async for message in request_iterator:
            received = self.wall()
            for entry in message.http_logs.log_entry:
                self.receive(entry, received)
        return als_pb2.StreamAccessLogsResponse()

    def receive(self, entry: al.HTTPAccessLogEntry, received_wall_s: float | None = None) -> None:
        """One entry, which came at ``received_wall_s`` on the wall clock (None: now)."""
        try:
            response = logged_response(entry, self.wall() if received_wall_s is None else received_wall_s)
        except Exception:  # total: a strange entry must not end Envoy's log stream
            log.warning("skipping an access-log entry that could not be read", exc_info=True)
            ENTRIES.labels("malformed").inc()
            return
        if response is None:
            ENTRIES.labels("unrouted").inc()
        elif self.pending.complete(response):
            ENTRIES.labels("matched").inc()
        else:
            ENTRIES.labels("unmatched").inc()
