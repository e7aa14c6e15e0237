"""The prefill/decode protocol as pure functions over request and response bodies.

Follows shared/reference/vllm-signals.md ("Prefill/decode disaggregation"), which is also what vLLM's own
disaggregated proxy examples and llm-d's sidecar do:

* prefill leg: the original request with ``stream: false``, ``max_tokens`` (and ``max_completion_tokens``
  when present) set to 1, ``stream_options`` and ``min_tokens`` dropped, and (NIXL only) the
  ``kv_transfer_params`` that ask the prefill engine to keep the KV for a remote decode;
* decode leg: the original request untouched (stream flag, token limits) plus the prefill answer's
  ``kv_transfer_params`` verbatim (NIXL), or nothing extra (shared storage: matching is by prompt).
"""

from __future__ import annotations

import enum
from typing import Any

import orjson

from engine.internal_fields import ENGINE_INTERNAL_FIELDS, KV_TRANSFER_PARAMS, strip_engine_fields

__all__ = ["ENGINE_INTERNAL_FIELDS", "KV_TRANSFER_PARAMS", "strip_engine_fields"]

# What the prefill leg asks of a NixlConnector producer (vLLM's toy_proxy_server / llm-d's sidecar).
PREFILL_KV_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


class Connector(str, enum.Enum):
    """How KV moves from the prefill pod to this decode pod."""

    NIXL = "nixl"  # vLLM NixlConnector: the prefill answer names the blocks to pull
    SHARED_STORAGE = "shared-storage"  # vLLM ExampleConnector: KV through a shared folder, keyed by prompt


def prefill_body(request: dict[str, Any], connector: Connector) -> dict[str, Any]:
    """The prefill leg's body: compute the prompt's KV, generate one token, keep the KV for the decode pod."""
    body = dict(request)
    body["stream"] = False
    body["max_tokens"] = 1
    if "max_completion_tokens" in body:
        body["max_completion_tokens"] = 1
    body.pop("stream_options", None)
    body.pop("min_tokens", None)
    if connector is Connector.NIXL:
        body[KV_TRANSFER_PARAMS] = dict(PREFILL_KV_PARAMS)
    else:
        body.pop(KV_TRANSFER_PARAMS, None)
    return body


def decode_body(request: dict[str, Any], kv_params: dict[str, Any] | None) -> dict[str, Any]:
    """The decode leg's body: the original request with the prefill side's params attached verbatim."""
    body = dict(request)
    if kv_params:
        body[KV_TRANSFER_PARAMS] = kv_params
    else:
        body.pop(KV_TRANSFER_PARAMS, None)
    return body


def strip_client_kv_params(raw: bytes) -> bytes:
    """Remove every engine-internal field (``ENGINE_INTERNAL_FIELDS``) a client sent, at the JSON level:
    ``kv_transfer_params`` would let it make the engine pull KV from, or hold KV for, anywhere it names, and
    ``vllm_xargs`` reaches the same place (vLLM merges it into the sampling params' ``extra_args``, where
    ``kv_transfer_params`` live).

    The body is parsed whenever a field name appears literally or any ``\\u`` escape does: a JSON key can only
    spell a field without its literal bytes through an escape (``"kv_transfer_param\\u0073"``), so bodies
    with neither pass through unparsed and unchanged.
    """
    if b"\\u" not in raw and not any(name.encode() in raw for name in ENGINE_INTERNAL_FIELDS):
        return raw
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw  # not JSON: the engine rejects it with its own 400
    if isinstance(parsed, dict) and strip_engine_fields(parsed):
        return orjson.dumps(parsed)
    return raw


def cached_tokens_of(response: dict[str, Any]) -> int | None:
    """``usage.prompt_tokens_details.cached_tokens`` of an OpenAI response, or None when absent."""
    usage = response.get("usage")
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    if not isinstance(details, dict):
        return None
    value = details.get("cached_tokens")
    return value if isinstance(value, int) else None


def rewrite_usage(response: dict[str, Any], prefill_cached: int) -> bool:
    """Report the prefill pod's prefix-cache hit as the request's ``cached_tokens``.

    The decode engine's own figure counts the transferred KV as "cached" (or nothing at all), which says
    nothing about reuse; the prompt was computed on the prefill pod, so its hit is what the client and the
    picker want to see. The decode engine's figure is kept beside it as ``decode_cached_tokens``.
    Returns whether the body changed.
    """
    usage = response.get("usage")
    if not isinstance(usage, dict):
        return False
    details = usage.get("prompt_tokens_details")
    if not isinstance(details, dict):
        details = {}
        usage["prompt_tokens_details"] = details
    details["decode_cached_tokens"] = details.get("cached_tokens")
    details["cached_tokens"] = prefill_cached
    return True


class SSEUsageRewriter:
    """Rewrites ``usage`` in SSE events as they pass, forwarding every complete event at once.

    Only whole events (ending in a blank line) are parsed, and only those that mention ``usage``; a
    partial event waits for its end, bounded by ``max_pending`` bytes after which it goes out untouched.
    """

    __slots__ = ("_prefill_cached", "_pending", "_max_pending")

    def __init__(self, prefill_cached: int, max_pending: int = 1 << 20) -> None:
        self._prefill_cached = prefill_cached
        self._pending = b""
        self._max_pending = max_pending

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to send now for this chunk: every event completed by it, rewritten where needed."""
        data = self._pending + chunk
        cut = _last_event_end(data)
        if cut < 0:
            if len(data) > self._max_pending:
                self._pending = b""
                return data
            self._pending = data
            return b""
        self._pending = data[cut:]
        done = data[:cut]
        if b'"usage"' not in done:
            return done
        return b"".join(self._rewrite_event(e) for e in _split_events(done))

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest

    def _rewrite_event(self, event: bytes) -> bytes:
        if b'"usage"' not in event:
            return event
        lines = event.split(b"\n")
        for i, line in enumerate(lines):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if not payload.startswith(b"{"):
                continue
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue
            if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                rewrite_usage(obj, self._prefill_cached)
                lines[i] = b"data: " + orjson.dumps(obj)
        return b"\n".join(lines)


def _last_event_end(data: bytes) -> int:
    """Index just past the last blank line that ends an SSE event (``\\n\\n`` or ``\\r\\n\\r\\n``), or -1."""
    a = data.rfind(b"\n\n")
    b = data.rfind(b"\r\n\r\n")
    if a < 0 and b < 0:
        return -1
    return max(a + 2 if a >= 0 else -1, b + 4 if b >= 0 else -1)


def _split_events(data: bytes) -> list[bytes]:
    """Split complete events keeping their terminators, so joining the parts gives ``data`` back."""
    parts = data.split(b"\n\n")
    out = [p + b"\n\n" for p in parts[:-1]]
    if parts[-1]:
        out.append(parts[-1])
    return out
