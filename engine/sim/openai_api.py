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


def _int_field(body: dict[str, Any], name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise APIError(400, f"{name} must be an integer, got {v!r}", name)
    return v


def _prompt_ids(prompt: Any, tokenizer: Tokenizer) -> np.ndarray:
    """A completions prompt: a string, a list of token ids, or a batch of one of either."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer.encode_array(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(t < 0 or t >= 2**32 for t in prompt):
            raise APIError(400, "token ids must be non-negative 32-bit integers", "prompt")
        return np.asarray(prompt, dtype=np.uint32)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise APIError(400, "only one prompt per request is supported by this server", "prompt")
    raise APIError(400, "prompt must be a string, a list of token ids, or a list of one of either", "prompt")


def parse_request(
    raw: bytes, chat: bool, tokenizer: Tokenizer, served_models: tuple[str, ...], max_model_len: int
) -> ParsedRequest:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise APIError(400, f"JSON decode error: {exc}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is None:
        model = served_models[0]  # vLLM serves its default model when "model" is omitted
    elif not isinstance(model, str):
        raise APIError(400, "model must be a string", "model")
    elif model not in served_models:
        raise APIError(404, f"The model `{model}` does not exist.", "model")
    n = body.get("n", 1)
    if n != 1:
        raise APIError(400, "only n=1 is supported by this server", "n")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise APIError(400, "messages must be a non-empty list of message objects", "messages")
        try:
            text = tokenizer.render_chat(messages, add_generation_prompt=True)
        except (TypeError, ValueError) as exc:
            raise APIError(400, f"invalid messages: {exc}", "messages") from None
        ids = tokenizer.encode_array(text)
    else:
        if "prompt" not in body:
            raise APIError(400, "prompt is required", "prompt")
        ids = _prompt_ids(body["prompt"], tokenizer)
    if len(ids) == 0:
        raise APIError(400, "the prompt must not be empty", "prompt")
    max_tokens = _int_field(body, "max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = _int_field(body, "max_tokens")
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
    plen = len(ids)
    if plen >= max_model_len or (max_tokens is not None and plen + max_tokens > max_model_len):
        requested = plen + (max_tokens or 0)
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{requested} tokens ({plen} in the {'messages' if chat else 'prompt'}, {max_tokens or 0} in "
            f"the completion). Please reduce the length of the {'messages' if chat else 'prompt'} or "
            "completion.",
            "max_tokens" if plen < max_model_len else "prompt",
        )
    if max_tokens is None:
        max_tokens = max_model_len - plen
    min_tokens = _int_field(body, "min_tokens") or 0
    if min_tokens < 0 or min_tokens > max_tokens:
        raise APIError(400, f"min_tokens must be in [0, max_tokens={max_tokens}], got {min_tokens}", "min_tokens")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be a boolean", "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise APIError(400, "stream_options must be an object", "stream_options")
    if opts and not stream:
        raise APIError(400, "Stream options can only be defined when `stream=True`.", "stream_options")
    kvp = body.get("kv_transfer_params")
    if kvp is not None and not isinstance(kvp, dict):
        raise APIError(400, "kv_transfer_params must be an object", "kv_transfer_params")
    seed = _int_field(body, "seed")
    return ParsedRequest(
        chat=chat, model=model, prompt_ids=ids, max_tokens=max_tokens, min_tokens=min_tokens,
        ignore_eos=bool(body.get("ignore_eos", False)), stream=stream,
        include_usage=bool(opts and opts.get("include_usage")), kv_transfer_params=kvp, seed=seed,
    )


# ---- responses ---------------------------------------------------------------------------------------
def usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def now_s() -> int:
    return int(time.time())


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def completion_chunk(rid: str, created: int, model: str, text: str, finish: str | None) -> bytes:
    return sse({
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                     "stop_reason": None}],
    })


def chat_chunk(rid: str, created: int, model: str, delta: dict[str, Any], finish: str | None) -> bytes:
    return sse({
        "id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish,
                     "stop_reason": None}],
    })


def usage_chunk(rid: str, created: int, model: str, chat: bool, u: dict[str, Any]) -> bytes:
    return sse({
        "id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
        "model": model, "choices": [], "usage": u,
    })


def completion_response(
    rid: str, created: int, model: str, text: str, finish: str | None, u: dict[str, Any],
    kv_transfer_params: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                     "stop_reason": None, "prompt_logprobs": None}],
        "usage": u, "kv_transfer_params": kv_transfer_params,
    }


def chat_response(
    rid: str, created: int, model: str, text: str, finish: str | None, u: dict[str, Any],
    kv_transfer_params: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None,
                                             "tool_calls": [], "reasoning_content": None},
                     "logprobs": None, "finish_reason": finish, "stop_reason": None}],
        "usage": u, "prompt_logprobs": None, "kv_transfer_params": kv_transfer_params,
    }


__all__ = [
    "APIError", "ParsedRequest", "SSE_DONE", "chat_chunk", "chat_response", "completion_chunk",
    "completion_response", "error_body", "parse_request", "usage", "usage_chunk",
]
