"""The outcome side of one routed request, shared by the picker's two fronts (ext_proc stream, ext_authz).

A routed request holds its endpoint's in-flight gauge until it ends, may wait in ``PendingResponses`` for Envoy's
access-log entry (its outcome), and reports its end to the director exactly once: ``on_finished`` with the usage,
or ``on_failed`` with a reason. Invariants: ``_ended`` becomes True once and never goes back; after it, no hook
is called again and no gauge is held; a request is parked under at most one id and unparked when it ends another
way.
"""

from __future__ import annotations

import logging

from extproc import metrics
from extproc.responselog import LoggedResponse, PendingResponses
from pickers.clock import Clock
from pickers.explain import explain_header
from pickers.ranks import served_id, split_endpoint_id
from pickers.types import Decision, Scheduler, Usage

log = logging.getLogger("kvswitch.extproc")


class RoutedOutcome:
    """In-flight gauge, access-log wait and end hooks of one request (see the module docstring)."""

    def __init__(self, director: Scheduler, clock: Clock, pending: PendingResponses | None) -> None:
        self.director = director
        self.clock = clock
        self.pending = pending
        self.decision: Decision | None = None
        self.served: str | None = None
        self._counted: str | None = None  # endpoint whose in-flight gauge this request holds
        self._ended = False  # on_finished/on_failed called
        self._parked: str | None = None  # the request id it waits under in ``pending`` (access-log)

    def place(self, decision: Decision, request_id: str) -> bool:
        """The request is routed: hold its endpoint's in-flight gauge and wait for Envoy's access-log entry of
        ``request_id`` (True), or, with no log to wait for, nothing will report the end (False; the caller decides
        when it ends)."""
        self.decision = decision
        self._count(decision.primary)
        if self.pending is None or not request_id:
            return False
        self._park(request_id)
        return True

    def debug_headers(self) -> list[tuple[str, str]]:
        """The x-kvswitch-* response headers: the endpoint (the rank that served, when known), the prefill pod, the
        explanation."""
        d = self.decision
        if d is None:
            return []
        served = self.served or d.primary
        out = [("x-kvswitch-endpoint", served)]
        rank = split_endpoint_id(served)[1]
        if rank is not None:
            out.append(("x-kvswitch-dp-rank", str(rank)))
        if d.prefill:
            out.append(("x-kvswitch-prefill-endpoint", d.prefill))
        if d.explanation:
            out.append(("x-kvswitch-explanation", explain_header(d, 1024)))
        return out

    def _count(self, endpoint: str) -> None:
        if self._counted is not None:
            metrics.inflight(self._counted).dec()
        self._counted = endpoint
        metrics.inflight(endpoint).inc()

    def _uncount(self) -> None:
        if self._counted is not None:
            metrics.inflight(self._counted).dec()
            self._counted = None

    def _park(self, request_id: str) -> None:
        """Wait for the access-log entry of Envoy's request ``request_id`` (it can come before anything else)."""
        assert self.pending is not None
        self._parked = request_id
        self.pending.park(request_id, self)

    def _unpark(self) -> None:
        if self._parked is not None and self.pending is not None:
            self.pending.discard(self._parked, self)
            self._parked = None

    def finish_logged(self, response: LoggedResponse) -> None:
        """Envoy's access-log entry for this (parked) request: report what the response did, once."""
        decision = self.decision
        if self._ended or decision is None:
            return
        self._parked = None  # PendingResponses popped it
        at = self.clock.now() - response.lag_s  # when the request ended, not when its (batched) entry came
        director = self.director
        try:
            if response.served:
                served = served_id(decision.primary, response.served)
                self.served = served
                if served != self._counted:
                    self._count(served)
                director.on_served(decision, served)
            if response.first_byte_s is not None and response.status < 400:
                director.on_first_token(decision, at - max(0.0, response.end_s - response.first_byte_s))
        except Exception:
            log.exception("a director hook failed on an access-log entry")
        if response.failure is not None:
            metrics.ERRORS.labels("truncated" if response.failure.startswith("truncated") else "upstream_error").inc()
        self._end(response.failure, response.usage, at)

    def abandon(self, reason: str) -> None:
        """No access-log entry will come (expired, or the picker stops): release the request."""
        self._parked = None
        if not self._ended and self.decision is not None:
            self._end(reason, None, self.clock.now())

    def _end(self, failure: str | None, usage: Usage | None, at: float) -> None:
        """Report the end once: load released, then on_finished (``failure`` None) or on_failed."""
        decision = self.decision
        assert decision is not None
        self._ended = True
        self._ended_hook()
        self._uncount()
        try:
            if failure is None:
                self.director.on_finished(decision, usage, at)
            else:
                self.director.on_failed(decision, failure, at)
        except Exception:
            log.exception("a director hook failed at the end of the request")

    def _ended_hook(self) -> None:
        """Subclasses note the end in their own state (the ext_proc stream's phase)."""
