"""The picker's one YAML configuration file, validated at start (errors name the bad key).

    server: {grpc_port, metrics_port, host, body_limit_bytes, debug_headers, model_rewrite, drain_seconds,
             max_fallback, response_body, tls_cert, tls_key, tls_self_signed, prefill_signing_secret_file}
    endpoints: [{address, role, model, accelerator, model_profile, labels, kv_events, metrics_url}]
    discovery: {kubernetes: {pool, namespace, kubeconfig, drain_seconds}}   # instead of endpoints
    scheduler: {...}   # passed as-is to pickers.config.build_scheduler when that module exists

Every key has a default, so no file is needed; ``--endpoint`` flags add endpoints.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
import yaml

from pickers.framework import ConfigError  # one error type for every configuration mistake
from pickers.types import Endpoint, Role


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "0.0.0.0"
    grpc_port: int = 9002
    metrics_port: int = 9090  # 0 picks a free port; -1 turns the metrics server off
    body_limit_bytes: int = 8 * 1024 * 1024
    debug_headers: bool = False
    model_rewrite: dict[str, str] = {}
    drain_seconds: float = 10.0
    max_fallback: int = 0  # endpoints in the fallback list; 0 = all eligible, 1 = ORIGINAL_DST clusters
    # observe: Envoy streams every response body chunk through the picker (first token, usage, end).
    # skip: Envoy sends no response body (its ext_proc filter must say response_body_mode NONE; the stream
    # tells the picker so in protocol_config); first token = response headers, end = the stream's end.
    response_body: Literal["observe", "skip"] = "observe"
    # TLS on the gRPC port (several gateways connect to the picker over TLS): a PEM certificate chain and key,
    # or a self-signed pair made at start (GIE's picker does the same; gateways then skip verification).
    # A second, plaintext gRPC port serving only grpc.health.v1 (the same statuses): kubelet's gRPC probes cannot
    # speak TLS. -1: none.
    health_port: int = -1
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_self_signed: bool = False
    # Sign every prefill target for the decode pods' sidecars (x-kvswitch-prefill-signature, HMAC-SHA256 with
    # this shared secret; the sidecar's --picker-secret-file): the sidecar then accepts prefill pods the picker
    # discovered that are not (yet) in its allow list.
    prefill_signing_secret_file: str | None = None


class KubernetesDiscoveryConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pool: str = ""  # the InferencePool's name (required; kvswitch serve --pool may give it)
    namespace: str = ""  # "": $POD_NAMESPACE, else the service account's namespace, else "default"
    kubeconfig: str | None = None  # None: in-cluster service account (else $KUBECONFIG / ~/.kube/config)
    drain_seconds: float = 30.0  # longest a leaving pod keeps the requests already routed to it


class DiscoveryConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    kubernetes: KubernetesDiscoveryConfig | None = None


class EndpointConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    address: str
    role: Literal["prefill", "decode", "both"] = "both"
    model: str = ""
    accelerator: str = "H100"
    model_profile: str = "llama-3.1-8b"
    labels: dict[str, str] = {}
    kv_events: str | None = None
    metrics_url: str | None = None
    max_num_batched_tokens: int | None = None  # the engine's step budget; default: its preset's

    def to_endpoint(self) -> Endpoint:
        return Endpoint(address=self.address, role=Role(self.role), model=self.model,
                        accelerator=self.accelerator, model_profile=self.model_profile,
                        labels=dict(self.labels), kv_events=self.kv_events, metrics_url=self.metrics_url,
                        max_num_batched_tokens=self.max_num_batched_tokens)


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    endpoints: list[EndpointConfig] = []
    discovery: DiscoveryConfig = msgspec.field(default_factory=DiscoveryConfig)
    scheduler: dict[str, Any] | None = None

    def endpoint_objects(self) -> list[Endpoint]:
        return [e.to_endpoint() for e in self.endpoints]


def _check(cfg: Config) -> Config:
    s = cfg.server
    for key in ("grpc_port", "metrics_port", "health_port"):
        port = getattr(s, key)
        if not -1 <= port <= 65535:
            raise ConfigError(f"server.{key}: {port} is not a port number (0-65535)")
    if s.body_limit_bytes <= 0:
        raise ConfigError(f"server.body_limit_bytes: must be positive, got {s.body_limit_bytes}")
    if s.max_fallback < 0:
        raise ConfigError(f"server.max_fallback: must be >= 0, got {s.max_fallback}")
    if s.drain_seconds < 0:
        raise ConfigError(f"server.drain_seconds: must be >= 0, got {s.drain_seconds}")
    if (s.tls_cert is None) != (s.tls_key is None):
        raise ConfigError("server.tls_cert and server.tls_key: give both (or neither)")
    if s.tls_cert is not None and s.tls_self_signed:
        raise ConfigError("server.tls_self_signed: not together with server.tls_cert/tls_key")
    k8s = cfg.discovery.kubernetes
    if k8s is not None:
        if k8s.drain_seconds < 0:
            raise ConfigError(f"discovery.kubernetes.drain_seconds: must be >= 0, got {k8s.drain_seconds}")
        if cfg.endpoints:
            raise ConfigError("endpoints: not together with discovery.kubernetes (the pool's pods are the endpoints)")
    seen: set[str] = set()
    for i, e in enumerate(cfg.endpoints):
        try:
            e.to_endpoint()
        except ValueError as exc:
            raise ConfigError(f"endpoints[{i}].address: {exc}") from None
        if e.address in seen:
            raise ConfigError(f"endpoints[{i}].address: {e.address} is listed twice")
        seen.add(e.address)
    return cfg


def config_from_dict(raw: dict[str, Any] | None) -> Config:
    try:
        cfg = msgspec.convert(raw or {}, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
    return _check(cfg)


def load_config(path: str | None) -> Config:
    if path is None:
        return config_from_dict(None)
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with server/endpoints/scheduler keys")
    try:
        return config_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse_endpoint_flag(value: str) -> EndpointConfig:
    """``ADDR[,role=decode,accelerator=H100,model=...,label.k=v]`` -> EndpointConfig."""
    address, *opts = value.split(",")
    fields: dict[str, Any] = {"address": address.strip()}
    labels: dict[str, str] = {}
    for opt in opts:
        key, sep, val = opt.partition("=")
        if not sep:
            raise ConfigError(f"--endpoint {value!r}: option {opt!r} must be key=value")
        key = key.strip()
        if key.startswith("label."):
            labels[key[6:]] = val
        else:
            fields[key] = val
    if labels:
        fields["labels"] = labels
    try:
        ep = msgspec.convert(fields, EndpointConfig)
        ep.to_endpoint()
    except (msgspec.ValidationError, ValueError) as exc:
        raise ConfigError(f"--endpoint {value!r}: {exc}") from None
    return ep
