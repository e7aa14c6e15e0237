"""One request's way from Envoy's headers and body to a routing answer, whatever protocol brought them.

Both of the picker's fronts use it: the ext_proc stream (extproc/stream.py, which answers with protobuf header
mutations and the body streamed back) and the ext_authz service (extproc/authz.py, which answers with HTTP
response headers Envoy copies onto the upstream request). ``route_request`` parses the body once, asks the
director, and returns a ``Routed`` that says everything the gateway must change on the request; any refusal is a
``SchedulingError`` (``RequestRejected`` for bad input) raised before the director saw the request, or the
director's own (admission). A bug in the director is a 503 ``picker_error``, never an exception out of here.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from dataclasses import dataclass

from engine.sidecar.allowlist import sign
from extproc import messages as msg
from extproc import metrics
from extproc.budget import ByteBudget
from extproc.errors import RequestRejected
from extproc.parse import HEADERS_THAT_MATTER, ParsedBody, api_for_path, parse_client_body
from pickers.clock import Clock
from pickers.ranks import destinations, endpoint_address
from pickers.types import Decision, InferenceRequest, Scheduler, SchedulingError

log = logging.getLogger("kvswitch.extproc")

_ids = itertools.count(1)
_ID_PREFIX = os.urandom(4).hex()


@dataclass(slots=True)
class Routed:
    """What the gateway does with a routed request.

    ``destination`` is the comma-separated fallback list of pod addresses (Envoy's override-host / original-dst
    header); ``prefill`` the prefill pod's address for a disaggregated request; ``extra`` further headers to set
    (data-parallel rank, the prefill signature, the request id the upstream must see, a rewritten body's
    content-length); ``remove`` the client's own copies of headers only the picker may set. ``body`` is what goes
    upstream: the received body, or the rewritten one when ``rewritten``.
    """

    decision: Decision
    request: InferenceRequest
    destination: str
    prefill: str | None
    extra: list[tuple[str, str]]
    remove: list[str]
    body: bytes | None
    rewritten: bool


@dataclass(slots=True)
class RouteSettings:
    """What routing needs from the server configuration (a subset of StreamSettings, shared by both fronts)."""

    model_rewrite: dict[str, str]
    offload_min_bytes: int
    budget: ByteBudget | None  # bodies of at least offload_min_bytes are parsed off the loop, bounded
    prefill_secret: bytes | None
    # False for a front that cannot change the body (ext_authz): a body the gateway would have to rewrite
    # (engine-internal fields a client set) is refused with a 400 instead of being cleaned.
    can_rewrite: bool = True
    # A front whose caller gives up sooner than flow control's max_wait_s (ext_authz: Envoy's call timeout;
    # ext_proc: Envoy's 5-minute stream idle timeout) has its held requests decided before then
    # (InferenceRequest.hold_limit_s; pickers/flowcontrol.py).
    hold_limit_s: float | None = None


async def route_request(director: Scheduler, settings: RouteSettings, clock: Clock, headers: dict[str, str],
                        body: bytes | None, subset: list[str] | None = None) -> Routed:
    """Parse, decide and say what to change; raises SchedulingError for every refusal (counted in metrics)."""
    t0 = time.perf_counter()
    try:
        routed = await _route(director, settings, clock, headers, body, subset)
    except SchedulingError:
        raise
    except Exception:  # a picker bug must not take the request down silently
        log.exception("the director failed for request %s", headers.get("x-request-id"))
        raise SchedulingError(503, "the endpoint picker failed to choose an endpoint; retry the request",
                              "picker_error") from None
    finally:
        metrics.DECISION_SECONDS.observe(time.perf_counter() - t0)
    metrics.ROUTED.inc()
    return routed


def count_rejection(exc: SchedulingError) -> None:
    """The metrics of a request the picker answered itself (either front)."""
    metrics.DECISIONS.labels(str(exc.status)).inc()
    metrics.ERRORS.labels(exc.code).inc()


def _refuse_rewrite(parsed: ParsedBody, settings: RouteSettings) -> None:
    """A front that cannot change the body refuses one that would need it (before the director sees it)."""
    if parsed.stripped and not settings.can_rewrite:
        names = ", ".join(parsed.stripped)
        raise RequestRejected(400, f"request field(s) {names} are set by the gateway only; remove them from the "
                              "request", "invalid_request_field", param=parsed.stripped[0])


async def _route(director: Scheduler, settings: RouteSettings, clock: Clock, headers: dict[str, str],
                 body: bytes | None, subset: list[str] | None) -> Routed:
    path = headers.get(":path", "/")
    request_id = headers.get("x-request-id") or f"{_ID_PREFIX}-{next(_ids)}"
    wanted = {k: v for k, v in headers.items() if k in HEADERS_THAT_MATTER}
    now = clock.now()
    rewrite = settings.model_rewrite if settings.can_rewrite else None
    budget = settings.budget
    if body is not None and budget is not None and len(body) >= settings.offload_min_bytes:
        # parse in a worker thread, with a bound on the bytes being parsed at once (not held while flow control
        # holds the request: a held request must not keep others from being parsed)
        async with budget.hold(len(body)):
            parsed = await asyncio.to_thread(parse_client_body, body, path, request_id, wanted, now, rewrite)
            _refuse_rewrite(parsed, settings)
        parsed.request.subset = subset
        parsed.request.hold_limit_s = settings.hold_limit_s
        decision = await director.route(parsed.request)
        request, body, rewritten = parsed.request, parsed.body, parsed.changed
    else:
        if body:
            parsed = parse_client_body(body, path, request_id, wanted, now, rewrite)
            _refuse_rewrite(parsed, settings)
            request, body, rewritten = parsed.request, parsed.body, parsed.changed
        elif body is not None:
            raise RequestRejected(400, "request body is empty: send a JSON object with a 'model'", "invalid_json")
        else:
            request = InferenceRequest(request_id=request_id, model="", api=api_for_path(path) or "other",
                                       headers=wanted, arrival=now)
            rewritten = False
        request.subset = subset
        request.hold_limit_s = settings.hold_limit_s
        decision = await director.route(request)
    return _answer(decision, request, request_id, headers, body, rewritten, settings.prefill_secret)


def _answer(decision: Decision, request: InferenceRequest, request_id: str, headers: dict[str, str],
            body: bytes | None, rewritten: bool, secret: bytes | None) -> Routed:
    # Data-parallel ranks: the gateway gets pods (ip:port), the chosen rank goes to the pod in a header.
    addresses, rank = destinations(decision.endpoints)
    prefill = endpoint_address(decision.prefill) if decision.prefill else None  # a pod, never a rank id
    signed = bool(decision.prefill and secret)
    remove = [h for h in msg.CONTROLLED_HEADERS if h in headers and h != msg.DESTINATION
              and not (h == msg.PREFILLER and decision.prefill) and not (h == msg.SIGNATURE and signed)
              and not (h == msg.DP_RANK and rank is not None)]
    extra: list[tuple[str, str]] = [("content-length", str(len(body)))] if rewritten and body is not None else []
    if rank is not None:
        extra.append((msg.DP_RANK, str(rank)))
    if signed:  # the sidecar checks the signature against the request id the upstream sees
        assert prefill is not None and secret is not None
        extra.append((msg.SIGNATURE, sign(secret, request_id, prefill)))
        if "x-request-id" not in headers:
            extra.append(("x-request-id", request_id))
    return Routed(decision, request, ",".join(addresses), prefill, extra, remove, body, rewritten)
