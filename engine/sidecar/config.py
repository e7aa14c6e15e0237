"""Settings of one sidecar (flags of ``kvswitch sidecar``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.sidecar.protocol import Connector


@dataclass(slots=True)
class SidecarConfig:
    """What one decode pod's sidecar needs: where to listen, its engine, and whom it may call."""

    decode_url: str = "http://127.0.0.1:8200"  # the local vLLM engine
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port (tests, many sidecars in one process)
    connector: Connector = Connector.NIXL
    prefill_pods: tuple[str, ...] = ()  # the static allow list, host:port each
    prefill_pods_file: str | None = None  # more allowed pods, one per line, re-read on change
    prefill_pods_reload_s: float = 1.0  # how often the file's mtime is checked
    picker_secret: bytes | None = None  # enables picker-signed targets (see allowlist.py)
    max_retries: int = 2  # extra prefill attempts on 502/503/504 and connect errors
    retry_backoff_s: float = 0.05  # first backoff; doubles per attempt
    max_body_bytes: int = 32 << 20  # request bodies larger than this get 413
    connect_timeout_s: float = 5.0
    prefill_timeout_s: float = 600.0  # one prefill attempt, end to end
    max_connections: int = 1024  # pooled connections to engine + prefill pods
    extra_response_headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.connector = Connector(self.connector)
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.max_body_bytes <= 0:
            raise ValueError("max_body_bytes must be > 0")
        if not self.decode_url.startswith(("http://", "https://")):
            raise ValueError(f"decode_url {self.decode_url!r} must start with http:// or https://")
        self.decode_url = self.decode_url.rstrip("/")
