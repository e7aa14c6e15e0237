"""Watch a response as it streams back (SSE or JSON) without holding any chunk back.

It learns what the scheduler's hooks need: when the first token came, how many output tokens were produced,
the final ``usage`` (with ``prompt_tokens_details.cached_tokens``) and whether the response was an error.
Work per chunk is a few byte searches; JSON is decoded only for the SSE event that carries ``usage`` and, for
non-streaming responses, once at the end over a bounded buffer.
"""

from __future__ import annotations

from typing import Any

import orjson

from pickers.types import Usage

MAX_JSON_BUFFER = 4 * 1024 * 1024  # a non-streaming response larger than this is passed on unread
MAX_LINE = 1024 * 1024  # an SSE line longer than this is skipped


def usage_from(doc: Any) -> Usage | None:
    if not isinstance(doc, dict):
        return None
    u = doc.get("usage")
    if not isinstance(u, dict):
        return None
    details = u.get("prompt_tokens_details") or u.get("input_tokens_details") or {}
    cached = details.get("cached_tokens", 0) if isinstance(details, dict) else 0
    return Usage(
        prompt_tokens=int(u.get("prompt_tokens", u.get("input_tokens", 0)) or 0),
        completion_tokens=int(u.get("completion_tokens", u.get("output_tokens", 0)) or 0),
        cached_tokens=int(cached or 0),
    )


class ResponseObserver:
    """Feeds on response body chunks; ``first_token`` flips once, ``usage`` fills in at the end."""

    __slots__ = ("sse", "status", "first_token", "events", "usage", "error", "_partial", "_json", "_json_size",
                 "_overflow")

    def __init__(self, status: int, content_type: str) -> None:
        self.status = status
        self.sse = "text/event-stream" in content_type
        self.first_token = False
        self.events = 0  # SSE data events with output (a token count when usage never comes)
        self.usage: Usage | None = None
        self.error: str | None = f"http {status}" if status >= 400 else None
        self._partial = b""
        self._json: list[bytes] = []
        self._json_size = 0
        self._overflow = False

    def feed(self, chunk: bytes) -> bool:
        """Observe one chunk; returns True when this chunk carried the first token."""
        if not chunk:
            return False
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
            if not payload or payload == b"[DONE]":
                continue
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
        """End of body: decode a buffered JSON response once; fall back to counted events."""
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
