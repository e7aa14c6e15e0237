"""OpenAI-format error responses: every refusal the sidecar makes looks like one from vLLM itself."""

from __future__ import annotations

import orjson
from aiohttp import web

_TYPES = {400: "BadRequestError", 403: "PermissionDeniedError", 404: "NotFoundError",
          413: "RequestTooLargeError", 502: "BadGatewayError", 503: "ServiceUnavailableError"}


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> bytes:
    """``{"error": {"message", "type", "param", "code"}}`` as bytes."""
    err = {"message": message, "type": _TYPES.get(status, "APIError"), "param": param, "code": code or status}
    return orjson.dumps({"error": err})


def error_response(
    status: int, message: str, *, param: str | None = None, code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.Response(
        status=status, body=error_body(status, message, param=param, code=code),
        content_type="application/json", headers=headers,
    )


def as_openai_error(status: int, body: bytes, fallback: str) -> bytes:
    """Pass an upstream error body through when it already is an OpenAI error; wrap it otherwise."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict) and "message" in parsed["error"]:
        return body
    if isinstance(parsed, dict) and isinstance(parsed.get("message"), str):  # vLLM's older flat ErrorResponse
        return error_body(status, parsed["message"], param=parsed.get("param"), code=parsed.get("code"))
    text = body[:500].decode("utf-8", "replace").strip()
    return error_body(status, f"{fallback}: {text}" if text else fallback)
