"""Watch a response as it streams back (SSE or JSON) without holding any chunk back.

It learns what the scheduler's hooks need: when the first token came, how many output tokens were produced,
the final ``usage`` (with ``prompt_tokens_details.cached_tokens``) and whether the response was an error.
Work per chunk is a few byte searches; JSON is decoded only for the SSE event that carries ``usage`` and, for
non-streaming responses, once at the end over a bounded buffer.

Total by design: nothing a pod sends can make ``feed`` or ``finish`` raise (the client's stream is passed on
whatever the observer thinks of it). A ``usage`` whose counts are not non-negative integers is ignored and
counted (``kvswitch_malformed_usage_total``); any other surprise stops observation of that response and is
counted (``kvswitch_observer_errors_total``). An SSE stream that ends without its terminal event (``[DONE]``,
or ``response.completed`` for the Responses API) is ``truncated``: the request failed, it is not a success.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from prometheus_client import Counter

from pickers.types import Usage

log = logging.getLogger("kvswitch.extproc.observe")
MALFORMED_USAGE = Counter("kvswitch_malformed_usage_total", "Responses whose usage block was malformed (ignored)")
OBSERVER_ERRORS = Counter("kvswitch_observer_errors_total",
                          "Responses the observer stopped reading after an unexpected error (passed on unread)")

MAX_JSON_BUFFER = 4 * 1024 * 1024  # a non-streaming response larger than this is passed on unread
MAX_LINE = 1024 * 1024  # an SSE line longer than this is skipped


def _count(value: Any) -> int | None:
    """A token count: a non-negative int (not bool), or None when it is anything else."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62:
        return value
    return None


def usage_from(doc: Any) -> Usage | None:
    """The ``usage`` of a response document, or None when absent or malformed (malformed is counted)."""
    if not isinstance(doc, dict):
        return None
    u = doc.get("usage")
    if u is None:
        return None
    if not isinstance(u, dict):
        MALFORMED_USAGE.inc()
        return None
    details = u.get("prompt_tokens_details") or u.get("input_tokens_details") or {}
    if not isinstance(details, dict):
        MALFORMED_USAGE.inc()
        return None
    raw = (u.get("prompt_tokens", u.get("input_tokens", 0)), u.get("completion_tokens", u.get("output_tokens", 0)),
           details.get("cached_tokens", 0))
    counts = [_count(0 if v is None else v) for v in raw]
    if any(c is None for c in counts):
        MALFORMED_USAGE.inc()
        return None
    prompt, completion, cached = counts
    assert prompt is not None and completion is not None and cached is not None
    return Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=min(cached, prompt or cached))


class ResponseObserver:
    """Feeds on response body chunks; ``first_token`` flips once, ``usage`` fills in at the end."""

    __slots__ = (
        "_json",
        "_json_size",
        "_overflow",
        "_partial",
        "broken",
        "done",
        "error",
        "events",
        "first_token",
        "sse",
        "status",
        "usage",
    )

    def __init__(self, status: int, content_type: str) -> None:
        self.status = status
        self.sse = "text/event-stream" in content_type
        self.first_token = False
        self.events = 0  # SSE data events with output (a token count when usage never comes)
        self.usage: Usage | None = None
        self.error: str | None = f"http {status}" if status >= 400 else None
        self.done = False  # the SSE terminal event was seen
        self.broken = False  # an unexpected error stopped observation (the response still passes)
        self._partial = b""
        self._json: list[bytes] = []
        self._json_size = 0
        self._overflow = False

    @property
    def truncated(self) -> bool:
        """An SSE response that ended without its terminal event (only meaningful after the end)."""
        return self.sse and self.status < 400 and not self.done and not self.broken

    def feed(self, chunk: bytes) -> bool:
        """Observe one chunk; returns True when this chunk carried the first token. Never raises."""
        if not chunk or self.broken:
            return False
        try:
            return self._feed(chunk)
        except Exception:  # total on purpose: a pod's bytes must never reach the client as an error
            log.warning("response observer stopped after an unexpected error", exc_info=True)
            self._break()
            return False

    def _break(self) -> None:
        self.broken = True
        self._partial, self._json = b"", []
        OBSERVER_ERRORS.inc()

    def _feed(self, chunk: bytes) -> bool:
        if not self.sse:
            if not self._overflow:
                self._json_size += len(chunk)
                if self._json_size > MAX_JSON_BUFFER:
                    self._overflow, self._json = True, []
                else:
                    self._json.append(chunk)
            if not self.first_token and self.status < 400:
                self.first_token = True  # a non-streaming response's first byte carries every token
                return True
            return False
        return self._feed_sse(chunk)

    def _feed_sse(self, chunk: bytes) -> bool:
        data = self._partial + chunk if self._partial else chunk
        cut = data.rfind(b"\n")
        if cut < 0:
            self._partial = data if len(data) <= MAX_LINE else b""
            return False
        self._partial = data[cut + 1 :] if cut + 1 < len(data) else b""
        if len(self._partial) > MAX_LINE:
            self._partial = b""
        first = False
        for line in data[:cut].split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                continue
            if not payload:
                continue
            if b"response.completed" in payload:  # the Responses API's terminal event (it sends no [DONE])
                self.done = True
            if b'"usage"' in payload:
                try:
                    doc = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    doc = None
                usage = usage_from(doc)
                if usage is not None:
                    self.usage = usage
                if isinstance(doc, dict) and doc.get("error"):
                    self.error = "stream error event"
                if isinstance(doc, dict) and not doc.get("choices"):
                    continue  # the usage-only final event carries no token
            elif b'"error"' in payload and b'"choices"' not in payload:
                self.error = "stream error event"
                continue
            self.events += 1
            if not self.first_token:
                self.first_token = first = True
        return first

    def finish(self) -> Usage | None:
        """End of body: decode a buffered JSON response once; fall back to counted events. Never raises."""
        if self.broken:
            return None
        try:
            return self._finish()
        except Exception:  # total on purpose, as in feed
            log.warning("response observer stopped after an unexpected error", exc_info=True)
            self._break()
            return None

    def _finish(self) -> Usage | None:
        if self._partial and self.sse:  # a last line without its newline
            self._feed_sse(b"\n")
        if not self.sse and self._json and not self._overflow:
            try:
                doc = orjson.loads(b"".join(self._json))
            except orjson.JSONDecodeError:
                doc = None
            self.usage = usage_from(doc) or self.usage
            if isinstance(doc, dict) and doc.get("error") and self.error is None:
                self.error = "error body"
            self._json = []
        if self.usage is None and self.sse and self.events:
            self.usage = Usage(completion_tokens=self.events)
        return self.usage
