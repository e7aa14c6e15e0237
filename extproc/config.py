"""The picker's one YAML configuration file, validated at start (errors name the bad key).

    server: {grpc_port, metrics_port, host, body_limit_bytes, context_cap_bytes, debug_headers, model_rewrite,
             drain_seconds, move_away_seconds, move_away_quiet_seconds, offload_min_bytes, offload_budget_bytes,
             max_fallback, response_body, tls_cert, tls_key, tls_self_signed, prefill_signing_secret_file,
             decide_port, decide_timeout_s}
    endpoints: [{address, role, model, accelerator, model_profile, labels, kv_events, metrics_url,
                 dp_size, dp_start_rank, dp_rank}]
               # dp_size N: the pod runs N vLLM data-parallel ranks; one endpoint per rank (ip:port#r), rank r's
               # KV events on the kv_events port + start rank + r, as vLLM publishes them. dp_rank: one rank only.
    discovery: {kubernetes: {pool, namespace, kubeconfig, drain_seconds}}   # instead of endpoints
    scheduler: {...}   # passed as-is to pickers.config.build_scheduler when that module exists
    planner: {...}     # the live planner (pickers/planner/settings.py); absent: off

Every key has a default, so no file is needed; ``--endpoint`` flags add endpoints.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
import yaml

from pickers.framework import ConfigError  # one error type for every configuration mistake
from pickers.ranks import expand_ranks
from pickers.types import Endpoint, Role

# Envoy's ext_authz call timeout, the same default on both sides: `kvswitch envoy-config` writes it
# (EnvoyConfigOptions.decide_timeout_s) and the picker holds requests to it (server.decide_timeout_s), on the
# ext_proc front too, where Envoy's stream idle timeout (300 s, its default) would reset a stream held longer.
# Why this long: extproc/authz.py.
DECIDE_TIMEOUT_S = 290.0
DECIDE_TIMEOUT_RANGE_S = (1.0, 86_400.0)  # what either side accepts


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "0.0.0.0"
    grpc_port: int = 9002
    metrics_port: int = 9090  # 0 picks a free port; -1 turns the metrics server off
    body_limit_bytes: int = 8 * 1024 * 1024
    # A body longer than this cannot hold a prompt that fits the pool's largest context, so the picker refuses
    # it (400 context_length_exceeded) from its content-length, or as soon as that many bytes arrived, instead
    # of receiving, parsing and hashing it and sending it on to a pod that would refuse it after all the work.
    # None: derived (extproc.contextcap: the endpoints' largest max_model_len x 32 bytes per token + 64 KiB);
    # 0: off (only body_limit_bytes applies).
    context_cap_bytes: int | None = None
    debug_headers: bool = False
    model_rewrite: dict[str, str] = {}
    drain_seconds: float = 10.0
    # On stop: NOT_SERVING first, then keep accepting streams until none started for move_away_quiet_seconds
    # (Envoy's health check saw NOT_SERVING and sends new requests elsewhere), at most move_away_seconds;
    # only then stop accepting and drain. 0 stops accepting at once.
    # Bodies of at least offload_min_bytes are parsed, tokenized and hashed in worker threads, at most
    # offload_budget_bytes of them at once (the rest wait their turn), so the event loop keeps answering
    # health checks, scrapes and small requests while big prompts arrive. The default lets one body of the
    # largest accepted size through at a time: every extra CPU-bound thread takes GIL time from the loop.
    offload_min_bytes: int = 256 * 1024
    offload_budget_bytes: int = 8 * 1024 * 1024
    move_away_seconds: float = 5.0
    move_away_quiet_seconds: float = 1.0
    max_fallback: int = 0  # endpoints in the fallback list; 0 = all eligible, 1 = ORIGINAL_DST clusters
    # observe: Envoy streams every response body chunk through the picker (first token, usage, end).
    # skip: Envoy sends no response body (its ext_proc filter must say response_body_mode NONE; the stream
    # tells the picker so in protocol_config); first token = response headers, end = the stream's end.
    # detach: Envoy sends nothing of the response (headers and trailers SKIP too), so it closes the ext_proc
    # stream once the request is routed: a picker crash or restart can no longer cut a stream already placed.
    # The cost: the picker never sees the response; a request counts as ended when it is routed (in-flight
    # load comes from the pods' scraped metrics only; no first-token, usage or failure feedback).
    # access-log (default): as detach on the ext_proc stream; Envoy's access log brings each response's
    # outcome (first byte, status, usage with cached tokens, [DONE], the upstream that served) when it ends
    # (extproc/envoyconfig/responselog.py, extproc/responselog.py). Pair with the same Envoy mode.
    response_body: Literal["access-log", "observe", "skip", "detach"] = "access-log"
    # TLS on the gRPC port (several gateways connect to the picker over TLS): a PEM certificate chain and key,
    # or a self-signed pair made at start (GIE's picker does the same; gateways then skip verification).
    # A second, plaintext gRPC port serving only grpc.health.v1 (the same statuses): kubelet's gRPC probes cannot
    # speak TLS. -1: none.
    health_port: int = -1
    # The ext_authz front (extproc/authz.py): Envoy's ext_authz filter asks over plain HTTP/1.1 with the body,
    # one request and one answer per client request, instead of an ext_proc gRPC stream (about a tenth of the
    # picker CPU per request; `kvswitch envoy-config --picker-protocol ext-authz`). None: grpc_port + 1 (a free
    # port when grpc_port is 0), or off when TLS or model_rewrite is configured (the front has neither: it
    # cannot change a body); -1: off.
    decide_port: int | None = None
    # Envoy's ext_authz call timeout as its config sets it (`kvswitch envoy-config --decide-timeout`, the same
    # default): flow control decides a request held this long less 2 s at the latest (extproc/authz.py).
    decide_timeout_s: float = DECIDE_TIMEOUT_S
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
    dp_size: int | None = None
    dp_start_rank: int = 0
    dp_rank: int | None = None

    def to_endpoint(self) -> Endpoint:
        return Endpoint(address=self.address, role=Role(self.role), model=self.model,
                        accelerator=self.accelerator, model_profile=self.model_profile,
                        labels=dict(self.labels), kv_events=self.kv_events, metrics_url=self.metrics_url,
                        max_num_batched_tokens=self.max_num_batched_tokens, dp_rank=self.dp_rank,
                        dp_engine=None if self.dp_rank is None else self.dp_start_rank + self.dp_rank,
                        dp_size=self.dp_size if self.dp_rank is not None else None)

    def to_endpoints(self) -> list[Endpoint]:
        """One endpoint; one per data-parallel rank with ``dp_size`` alone; one rank of a pod with ``dp_rank``."""
        if self.dp_size is None or self.dp_rank is not None:
            return [self.to_endpoint()]
        return expand_ranks(self.to_endpoint(), self.dp_size, self.dp_start_rank)


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    endpoints: list[EndpointConfig] = []
    discovery: DiscoveryConfig = msgspec.field(default_factory=DiscoveryConfig)
    scheduler: dict[str, Any] | None = None
    planner: dict[str, Any] | None = None  # validated by pickers.planner.settings.planner_settings

    def decide_port(self) -> int:
        """The ext_authz front's port as configured or derived (see ServerConfig.decide_port); -1: off."""
        s = self.server
        if s.decide_port is not None:
            return s.decide_port
        if s.tls_cert is not None or s.tls_self_signed or s.model_rewrite:
            return -1
        return s.grpc_port + 1 if s.grpc_port > 0 else 0

    def endpoint_objects(self) -> list[Endpoint]:
        return [ep for e in self.endpoints for ep in e.to_endpoints()]


def _check(cfg: Config) -> Config:
    s = cfg.server
    for key in ("grpc_port", "metrics_port", "health_port"):
        port = getattr(s, key)
        if not -1 <= port <= 65535:
            raise ConfigError(f"server.{key}: {port} is not a port number (0-65535)")
    if s.decide_port is not None and not -1 <= s.decide_port <= 65535:
        raise ConfigError(f"server.decide_port: {s.decide_port} is not a port number (0-65535, or -1 for off)")
    if s.decide_port is not None and s.decide_port >= 0:
        if s.tls_cert is not None or s.tls_self_signed:
            raise ConfigError("server.decide_port: the ext_authz front serves plain HTTP only; with TLS use the "
                              "ext_proc protocol (leave decide_port unset or -1)")
        if s.model_rewrite:
            raise ConfigError("server.decide_port: the ext_authz front cannot rewrite a request body, so it cannot "
                              "apply server.model_rewrite; use the ext_proc protocol (leave decide_port unset or -1)")
    lo, hi = DECIDE_TIMEOUT_RANGE_S
    if not lo <= s.decide_timeout_s <= hi:
        raise ConfigError(f"server.decide_timeout_s: Envoy's ext_authz call timeout in seconds, {lo:g}-{hi:g}, got "
                          f"{s.decide_timeout_s}")
    if s.context_cap_bytes is not None and s.context_cap_bytes < 0:
        raise ConfigError(f"server.context_cap_bytes: must be >= 0 (0 turns it off), got {s.context_cap_bytes}")
    if s.body_limit_bytes <= 0:
        raise ConfigError(f"server.body_limit_bytes: must be positive, got {s.body_limit_bytes}")
    if s.max_fallback < 0:
        raise ConfigError(f"server.max_fallback: must be >= 0, got {s.max_fallback}")
    if s.offload_min_bytes < 0 or s.offload_budget_bytes <= 0:
        raise ConfigError("server.offload_min_bytes must be >= 0 and server.offload_budget_bytes > 0")
    if s.move_away_seconds < 0 or s.move_away_quiet_seconds < 0:
        raise ConfigError("server.move_away_seconds and server.move_away_quiet_seconds must be >= 0")
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
    if cfg.planner is not None:
        from pickers.planner.settings import planner_settings

        planner_settings(cfg.planner)  # a bad planner section is one clear error at start
    seen: set[str] = set()
    for i, e in enumerate(cfg.endpoints):
        try:
            eps = e.to_endpoints()
        except ValueError as exc:
            raise ConfigError(f"endpoints[{i}].address: {exc}") from None
        for ep in eps:
            if ep.id in seen:
                raise ConfigError(f"endpoints[{i}].address: {ep.id} is listed twice")
            seen.add(ep.id)
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
        ep.to_endpoints()
    except (msgspec.ValidationError, ValueError) as exc:
        raise ConfigError(f"--endpoint {value!r}: {exc}") from None
    return ep
