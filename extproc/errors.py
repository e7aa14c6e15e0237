"""OpenAI-format error bodies: what a client sees when kvswitch answers a request itself."""

from __future__ import annotations

import orjson

from pickers.types import SchedulingError

_DEFAULT_TYPES = {
    400: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "service_unavailable",
}


def error_body(message: str, err_type: str, code: str, param: str | None = None) -> bytes:
    """The JSON body OpenAI clients know how to show: {"error": {message, type, param, code}}."""
    return orjson.dumps({"error": {"message": message, "type": err_type, "param": param, "code": code}})


class RequestRejected(SchedulingError):
    """A request extproc refuses before scheduling (bad body, too large); carries the offending param."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(status, message, code, _DEFAULT_TYPES.get(status, "server_error"), param=param)


def body_for(exc: SchedulingError) -> bytes:
    return error_body(exc.message, exc.err_type, exc.code, exc.param)


def body_too_large(limit: int) -> RequestRejected:
    """413 for a body past ``server.body_limit_bytes``."""
    return RequestRejected(413, f"request body is larger than this gateway accepts ({limit} bytes); send a shorter "
                           "prompt or ask the operator to raise server.body_limit_bytes", "request_too_large")


def over_context(size: int, cap: int, at_least: bool = False) -> RequestRejected:
    """400 for a body past the context cap (extproc.contextcap): no prompt that long fits the pool's context."""
    return RequestRejected(400, f"request body is {'at least ' if at_least else ''}{size} bytes: longer than any "
                           f"prompt that fits this pool's largest context (at most {cap} bytes); shorten the prompt",
                           "context_length_exceeded")
