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
