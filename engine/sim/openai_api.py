"""The OpenAI-compatible surface of a simulated pod: request parsing, errors and response shapes as vLLM.

Kept apart from the HTTP server so the shapes can be checked against real vLLM (e2e/vllm_facts.md) in
one place. Errors use vLLM's ErrorResponse: ``{"error": {"message", "type", "param", "code"}}`` with
the HTTP status also in ``code``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from engine.tokens.tokenizer import Tokenizer

ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    413: "BadRequestError",
    429: "RateLimitError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type_ or ERROR_TYPES.get(status, "BadRequestError" if status < 500 else "InternalServerError")

    def body(self) -> bytes:
        return error_body(self.status, self.message, self.param, self.type)


def error_body(status: int, message: str, param: str | None = None, type_: str | None = None) -> bytes:
    t = type_ or ERROR_TYPES.get(status, "BadRequestError" if status < 500 else "InternalServerError")
    return orjson.dumps({"error": {"message": message, "type": t, "param": param, "code": status}})


@dataclass(slots=True)
class ParsedRequest:
    chat: bool
    model: str
    prompt_ids: np.ndarray
    max_tokens: int
    min_tokens: int
    ignore_eos: bool
    stream: bool
    include_usage: bool
    kv_transfer_params: dict[str, Any] | None
    seed: int | None


def invalid(name: str, message: str) -> APIError:
    """A request-validation error as vLLM's FastAPI/pydantic layer reports it (type, param body.<field>)."""
    return APIError(400, f"1 validation error: {message}", f"body.{name}", "Bad Request")


def _int_field(body: dict[str, Any], name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise invalid(name, f"{name}: Input should be a valid integer, got {v!r}")
    return v


def _prompt_ids(prompt: Any, tokenizer: Tokenizer) -> np.ndarray:
    """A completions prompt: a string, a list of token ids, or a batch of one of either."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer.encode_array(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(t < 0 or t >= 2**32 for t in prompt):
            raise invalid("prompt", "prompt: token ids must be non-negative 32-bit integers")
        return np.asarray(prompt, dtype=np.uint32)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise APIError(400, "only one prompt per request is supported by the simulator", "prompt")
    raise invalid("prompt", "prompt: must be a string, a list of token ids, or a list of one of either")


def parse_request(
    raw: bytes, chat: bool, tokenizer: Tokenizer, served_models: tuple[str, ...], max_model_len: int
) -> ParsedRequest:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise APIError(400, f"1 validation error: json_invalid: JSON decode error: {exc}", "body.1",
                       "Bad Request") from None
    if not isinstance(body, dict):
        raise APIError(400, "1 validation error: model_attributes_type: Input should be a valid dictionary",
                       "body", "Bad Request")
    model = body.get("model")
    if model is None:
        model = served_models[0]  # vLLM serves its default model when "model" is omitted
    elif not isinstance(model, str):
        raise invalid("model", "model: Input should be a valid string")
    elif model not in served_models:
        raise APIError(404, f"The model `{model}` does not exist. Valid aliases: {', '.join(served_models)}.",
                       "model", "NotFoundError")
    n = body.get("n", 1)
    if n != 1:
        raise APIError(400, "only n=1 is supported by the simulator", "n")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise invalid("messages", "messages: Field required (a non-empty list of message objects)")
        try:
            ids = tokenizer.encode_chat(messages)
        except (TypeError, ValueError) as exc:
            raise invalid("messages", f"messages: {exc}") from None
    else:
        if body.get("prompt") in (None, "", []):
            raise APIError(400, "Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
        ids = _prompt_ids(body["prompt"], tokenizer)
    if len(ids) == 0:
        raise APIError(400, "Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
    max_tokens = _int_field(body, "max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = _int_field(body, "max_tokens")
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}. "
                       f"(parameter=max_tokens, value={max_tokens})", "max_tokens")
    plen = len(ids)
    if plen > max_model_len - 1:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt contains at "
            f"least {plen} input tokens, which exceeds the limit. Please reduce the length of the input. "
            f"(parameter=input_tokens, value={plen})",
            "input_tokens",
        )
    room = max_model_len - plen
    if max_tokens is None:
        max_tokens = room if chat else min(16, room)  # vLLM's defaults
    max_tokens = min(max_tokens, room)  # vLLM clamps silently when the prompt fits
    min_tokens = _int_field(body, "min_tokens") or 0
    if min_tokens < 0:
        raise APIError(400, f"min_tokens must be greater than or equal to 0, got {min_tokens}.", "min_tokens")
    min_tokens = min(min_tokens, max_tokens)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("stream", "stream: Input should be a valid boolean")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise invalid("stream_options", "stream_options: Input should be a valid dictionary")
    if opts and not stream:
        raise invalid("stream_options", "Value error, Stream options can only be defined when `stream=True`.")
    kvp = body.get("kv_transfer_params")
    if kvp is not None and not isinstance(kvp, dict):
        raise invalid("kv_transfer_params", "kv_transfer_params: Input should be a valid dictionary")
    seed = _int_field(body, "seed")
    return ParsedRequest(
        chat=chat, model=model, prompt_ids=ids, max_tokens=max_tokens, min_tokens=min_tokens,
        ignore_eos=bool(body.get("ignore_eos", False)), stream=stream,
        include_usage=bool(opts and opts.get("include_usage")), kv_transfer_params=kvp, seed=seed,
    )


# ---- responses ---------------------------------------------------------------------------------------
# Key sets and nulls as vLLM 0.32 sends them (e2e/vllm_facts.md, "Responses").
def usage(prompt: int, completion: int, cached: int, chat: bool, stream: bool) -> dict[str, Any]:
    if stream:
        details: dict[str, Any] = {"cached_tokens": cached}
        if chat:
            details["created_cache_tokens"] = 0
    else:
        details = {"cached_tokens": cached, "created_cache_tokens": 0 if chat else None, "multimodal_tokens": None}
    out: dict[str, Any] = {"prompt_tokens": prompt, "total_tokens": prompt + completion,
                           "completion_tokens": completion, "prompt_tokens_details": details}
    if not stream:
        out["completion_tokens_details"] = None
    return out


def now_s() -> int:
    return int(time.time())


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def completion_chunk(rid: str, created: int, model: str, text: str, finish: str | None,
                     fingerprint: str | None = None) -> bytes:
    out: dict[str, Any] = {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                     "stop_reason": None, "prompt_token_ids": None, "token_ids": None}],
    }
    if fingerprint:
        out["system_fingerprint"] = fingerprint
    return sse(out)


def chat_role_chunk(rid: str, created: int, model: str) -> bytes:
    return sse({
        "id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}],
        "prompt_token_ids": None, "prompt_text": None,
    })


def chat_chunk(rid: str, created: int, model: str, text: str, finish: str | None,
               fingerprint: str | None = None) -> bytes:
    choice: dict[str, Any] = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}
    if finish is not None:
        choice["stop_reason"] = None
    choice["token_ids"] = None
    out: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [choice]}
    if fingerprint:
        out["system_fingerprint"] = fingerprint
    return sse(out)


def usage_chunk(rid: str, created: int, model: str, chat: bool, u: dict[str, Any], fingerprint: str) -> bytes:
    return sse({
        "id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
        "model": model, "choices": [], "usage": u, "system_fingerprint": fingerprint,
    })


def completion_response(
    rid: str, created: int, model: str, text: str, finish: str | None, u: dict[str, Any],
    kv_transfer_params: dict[str, Any] | None, fingerprint: str,
) -> dict[str, Any]:
    return {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                     "stop_reason": None, "token_ids": None, "prompt_logprobs": None,
                     "prompt_token_ids": None, "routed_experts": None}],
        "service_tier": None, "system_fingerprint": fingerprint, "usage": u,
        "kv_transfer_params": kv_transfer_params, "ec_transfer_params": None, "metrics": None,
    }


def chat_response(
    rid: str, created: int, model: str, text: str, finish: str | None, u: dict[str, Any],
    kv_transfer_params: dict[str, Any] | None, fingerprint: str,
) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None,
                                             "annotations": None, "audio": None, "function_call": None,
                                             "reasoning": None},
                     "logprobs": None, "finish_reason": finish, "stop_reason": None, "token_ids": None,
                     "routed_experts": None}],
        "service_tier": None, "system_fingerprint": fingerprint, "usage": u,
        "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None,
        "kv_transfer_params": kv_transfer_params, "ec_transfer_params": None, "metrics": None,
    }


__all__ = [
    "APIError", "ParsedRequest", "SSE_DONE", "chat_chunk", "chat_role_chunk", "invalid", "chat_response",
    "completion_chunk",
    "completion_response", "error_body", "parse_request", "usage", "usage_chunk",
]
