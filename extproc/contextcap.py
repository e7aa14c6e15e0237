"""The body size past which no prompt can fit the pool's context: refuse such a body before doing its work.

A prompt of more tokens than an engine's ``max_model_len`` is refused by the engine (vLLM: 400, "maximum context
length"), but only after the gateway received it, the picker parsed, tokenized and hashed it and sent it back to
Envoy, Envoy forwarded it and the pod parsed it: for an 8 MB body that is seconds of CPU on a busy machine, taken
from every other request. The picker cannot count a prompt's tokens before it has the body, but it can bound them
from the body's size: no tokenizer averages more than ``BYTES_PER_TOKEN`` bytes of JSON per token over a prompt
(English averages about 4; JSON-escaped CJK, the worst common case, stays under 16: 6 bytes per \\uXXXX escape
and at most about 2.5 characters per token), so a body longer than ``largest context x BYTES_PER_TOKEN +
SLACK_BYTES`` (the slack covers the rest of the JSON: messages' roles, tools, parameters) holds no prompt any
endpoint accepts.

The one exception is pathological text (megabytes of one repeated character, which some vocabularies pack into
tokens of dozens of bytes): such a prompt is refused here though a pod might take it; an operator who needs it
sets ``server.context_cap_bytes`` (and Envoy's ``max_body_bytes``) higher.

The largest context is the largest ``max_model_len`` among the endpoints' cost-model profiles (the default profile
when endpoints come from discovery), so the cap never refuses what some endpoint of the pool could serve as
profiled. Operators set ``server.context_cap_bytes`` to pin it, or 0 to turn it off.
"""

from __future__ import annotations

from collections.abc import Iterable

from engine.costmodel.profiles import resolve_model

BYTES_PER_TOKEN = 32
SLACK_BYTES = 64 * 1024
DEFAULT_PROFILE = "llama-3.1-8b"  # EndpointConfig's default model_profile


def largest_context(model_profiles: Iterable[str]) -> int:
    """The largest ``max_model_len`` among these cost-model profiles (the default profile when there are none)."""
    profiles = set(model_profiles) or {DEFAULT_PROFILE}
    return max(resolve_model(name).max_model_len for name in profiles)


def context_cap_bytes(configured: int | None, model_profiles: Iterable[str]) -> int | None:
    """The body size past which the picker refuses a request as too long for any context; None: no cap."""
    if configured is not None:
        return configured or None
    return largest_context(model_profiles) * BYTES_PER_TOKEN + SLACK_BYTES
