"""Turn an OpenAI-style request body into an ``InferenceRequest``: one JSON decode per request.

Completions (prompt as string, list of strings or token ids), chat completions (messages whose content is a
string or a list of parts) and the Responses API (``input`` string or items, ``instructions``) are accepted.
Anything else that is not a JSON object with a ``model`` is a 400 with a message that says what to fix.

Engine-internal fields (``kv_transfer_params``, ``vllm_xargs``: see ``engine.internal_fields``) a client sent
are removed from the parsed document, so escaped spellings of their names cannot slip past, and the body is
re-serialised (``parse_client_body``); only kvswitch itself may set them. Token ids must fit the u32 the
tokenizer and block hashes use, else a 400 names the offending value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from engine.internal_fields import ENGINE_INTERNAL_FIELDS, strip_engine_fields
from extproc.errors import RequestRejected
from pickers.slo import SLO_HEADERS
from pickers.types import Api, InferenceRequest

MAX_TOKEN_ID = 2**32 - 1  # token ids are hashed as u32 (pickers.tokenize); vLLM rejects ids past its vocab

# Request headers the picker may look at (objective and SLO targets, session affinity, tracing); everything
# else is ignored. SLO header values are validated by pickers.slo when the director resolves the targets.
HEADERS_THAT_MATTER = frozenset(
    {"x-request-id", "x-session-id", "x-gateway-inference-fairness-id", "x-llm-d-inference-fairness-id",
     *SLO_HEADERS}
)

_PATH_API: dict[str, Api] = {
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat",
    "/v1/responses": "responses",
}


def api_for_path(path: str) -> Api | None:
    """The API a request path names, ignoring the query string; None for paths we do not know."""
    return _PATH_API.get(path.split("?", 1)[0].rstrip("/"))


def _bad(message: str, param: str | None = None, code: str = "invalid_request") -> RequestRejected:
    return RequestRejected(400, message, code, param)


def _max_tokens(doc: dict[str, Any]) -> int | None:
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = doc.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _bad(f"'{key}' must be a non-negative integer, got {value!r}", key)
        return value
    return None


def _completions_prompt(req: InferenceRequest, prompt: Any) -> None:
    if isinstance(prompt, str):
        req.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        req.prompt = "".join(prompt)  # batched prompts: routed together, matched as one text
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        _check_ids(prompt)
        req.prompt_token_ids = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        ids: list[int] = []
        for part in prompt:
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in part):
                raise _bad("'prompt' token id lists must hold integers only", "prompt")
            ids.extend(part)
        if not ids:
            raise _bad("'prompt' token id lists must not all be empty", "prompt")
        _check_ids(ids)
        req.prompt_token_ids = ids
    else:
        raise _bad(
            "'prompt' must be a non-empty string, a list of strings, or a list of token ids", "prompt"
        )


def _check_ids(ids: list[int]) -> None:
    lo, hi = min(ids), max(ids)
    if lo < 0 or hi > MAX_TOKEN_ID:
        bad = lo if lo < 0 else hi
        raise _bad(f"'prompt' token ids must be between 0 and {MAX_TOKEN_ID}, got {bad}", "prompt")


def _check_messages(messages: Any, param: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise _bad(f"'{param}' must be a non-empty list of messages", param)
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"'{param}[{i}]' must be an object with 'role' and 'content'", f"{param}[{i}]")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise _bad(f"'{param}[{i}].content' must be a string or a list of content parts", f"{param}[{i}]")
    return messages


def _responses_input(req: InferenceRequest, doc: dict[str, Any]) -> None:
    inp = doc.get("input")
    instructions = doc.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _bad("'instructions' must be a string", "instructions")
    if isinstance(inp, str):
        if instructions:
            req.messages = [{"role": "system", "content": instructions}, {"role": "user", "content": inp}]
        else:
            req.prompt = inp
    elif isinstance(inp, list):
        items = _check_messages(inp, "input")
        req.messages = ([{"role": "system", "content": instructions}] if instructions else []) + items
    else:
        raise _bad("'input' must be a string or a list of input items", "input")


def parse_request(
    body: bytes,
    path: str,
    request_id: str,
    headers: dict[str, str] | None = None,
    arrival: float = 0.0,
) -> tuple[InferenceRequest, dict[str, Any]]:
    """Decode ``body`` once and return the request plus the decoded document (for a model rewrite)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _bad(f"request body is not valid JSON ({exc.msg} at byte {exc.pos})", None, "invalid_json") from None
    if not isinstance(doc, dict):
        raise _bad("request body must be a JSON object", None, "invalid_json")
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required: name the model to run, e.g. \"model\": \"llama-3.1-8b\"", "model",
                   "model_missing")
    api = api_for_path(path)
    if api is None:
        api = "chat" if "messages" in doc else "responses" if "input" in doc else "completions"
    stream = doc.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be true or false", "stream")
    req = InferenceRequest(
        request_id=request_id,
        model=model,
        api=api,
        stream=stream,
        max_tokens=_max_tokens(doc),
        headers=headers or {},
        body_size=len(body),
        arrival=arrival,
    )
    if api == "completions":
        _completions_prompt(req, doc.get("prompt"))
    elif api == "chat":
        req.messages = _check_messages(doc.get("messages"), "messages")
    else:
        _responses_input(req, doc)
    return req, doc


def rewrite_model(doc: dict[str, Any], new_model: str) -> bytes:
    """Re-encode the body with another model name (only when a rewrite is configured)."""
    doc["model"] = new_model
    return orjson.dumps(doc)


@dataclass(slots=True)
class ParsedBody:
    """A client body after parsing: the request, the decoded document and the bytes to send upstream
    (re-serialised when something was removed or rewritten, else the client's own bytes)."""

    request: InferenceRequest
    doc: dict[str, Any]
    body: bytes
    changed: bool
    stripped: tuple[str, ...] = ()  # engine-internal fields the client set, removed from ``doc`` and ``body``


def parse_client_body(
    body: bytes,
    path: str,
    request_id: str,
    headers: dict[str, str] | None = None,
    arrival: float = 0.0,
    model_rewrite: dict[str, str] | None = None,
) -> ParsedBody:
    """``parse_request`` plus what the gateway changes: engine-internal fields removed, model renamed."""
    request, doc = parse_request(body, path, request_id, headers, arrival)
    stripped = tuple(name for name in ENGINE_INTERNAL_FIELDS if name in doc)
    changed = strip_engine_fields(doc)
    new_model = (model_rewrite or {}).get(request.model)
    if new_model:
        doc["model"] = new_model
        request.model = new_model
        changed = True
    return ParsedBody(request, doc, orjson.dumps(doc) if changed else body, changed, stripped)
