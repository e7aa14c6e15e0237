"""The decode pod's sidecar: runs the prefill leg on a prefill pod, then the decode leg on the local engine.

Python API (many sidecars can run in one event loop, e.g. for the local stack)::

    from engine.sidecar import Sidecar, SidecarConfig
    async with Sidecar(SidecarConfig(decode_url="http://127.0.0.1:8200", prefill_pods=("10.0.0.5:8000",))) as sc:
        print(sc.address)
"""

from engine.sidecar.allowlist import SIGNATURE_HEADER, PrefillAllowList, normalize_address, sign
from engine.sidecar.config import SidecarConfig
from engine.sidecar.protocol import PREFILL_KV_PARAMS, Connector, decode_body, prefill_body
from engine.sidecar.server import (
    PREFILL_CACHED_HEADER,
    PREFILL_ENDPOINT_HEADER,
    PREFILLER_HEADER,
    Sidecar,
)

__all__ = [
    "PREFILLER_HEADER", "PREFILL_CACHED_HEADER", "PREFILL_ENDPOINT_HEADER", "PREFILL_KV_PARAMS",
    "SIGNATURE_HEADER", "Connector", "PrefillAllowList", "Sidecar", "SidecarConfig", "decode_body",
    "normalize_address", "prefill_body", "sign",
]
