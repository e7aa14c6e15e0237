"""Request fields only kvswitch may set on the way to an engine; a client's are removed wherever a body is parsed
(the picker in ``extproc.parse``, the sidecar in ``engine.sidecar.protocol``).

- ``kv_transfer_params``: tells vLLM's KV connector to pull KV from (``do_remote_prefill`` + ``remote_host``) or
  hold KV for (``do_remote_decode``) an address the sender names.
- ``vllm_xargs``: vLLM merges it into the sampling params' ``extra_args``, where ``kv_transfer_params`` live too.

Dependency-free on purpose: the picker imports it without the sidecar's server.
"""

from __future__ import annotations

from typing import Any

KV_TRANSFER_PARAMS = "kv_transfer_params"
ENGINE_INTERNAL_FIELDS: tuple[str, ...] = (KV_TRANSFER_PARAMS, "vllm_xargs")


def strip_engine_fields(doc: dict[str, Any]) -> bool:
    """Drop engine-internal fields from a parsed request body in place; True when something was dropped."""
    found = [name for name in ENGINE_INTERNAL_FIELDS if name in doc]
    for name in found:
        del doc[name]
    return bool(found)
