"""Build an Envoy bootstrap that routes through the kvswitch picker.

The configuration is assembled from envoy-data-plane's typed dataclasses (betterproto2), so a misspelt field
fails here, then serialised to proto3 JSON (or YAML). Two ways to reach the chosen pod:

- ``override-host`` (default): a STATIC/EDS cluster with ``envoy.load_balancing_policies.override_host``
  reading the fallback list from the ``x-gateway-destination-endpoint`` header and the ``envoy.lb`` metadata,
  walking it on retries, and reporting the served host in ``envoy.lb`` / ``x-gateway-destination-endpoint-served``.
  The cluster must list the pods (``endpoints``); a request that reaches it without a decision (fail-open)
  goes round robin.
- ``original-dst``: an ORIGINAL_DST cluster that connects to whatever single ``ip:port`` the header names;
  no endpoint list needed, but no fallback list (run the picker with ``server.max_fallback: 1``). Refused with
  fail-open: a request that passes a dead picker would go wherever its own header says (a full SSRF), and with
  the header stripped (see ``hardening``) it has nowhere to go.

Client steering, allowed paths, Envoy's own error bodies and retries live in ``hardening.py``.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import yaml
from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
from envoy_data_plane.envoy.config.cluster.v3 import (
    Cluster,
    ClusterCommonLbConfig,
    ClusterDiscoveryType,
    ClusterLbPolicy,
    ClusterOriginalDstLbConfig,
    LoadBalancingPolicy,
    LoadBalancingPolicyPolicy,
)
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    DataSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HealthCheck,
    HealthCheckGrpcHealthCheck,
    Http2ProtocolOptions,
    SocketAddress,
    TransportSocket,
    TypedExtensionConfig,
)
from envoy_data_plane.envoy.config.endpoint.v3 import (
    ClusterLoadAssignment,
    Endpoint,
    LbEndpoint,
    LocalityLbEndpoints,
)
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.route.v3 import (
    RouteAction,
    RouteConfiguration,
    VirtualHost,
)
from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import (
    ExternalProcessor,
    MetadataOptions,
    MetadataOptionsMetadataNamespaces,
    ProcessingMode,
    ProcessingModeBodySendMode,
    ProcessingModeHeaderSendMode,
)
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpFilter,
)
from envoy_data_plane.envoy.extensions.load_balancing_policies.override_host.v3 import (
    OverrideHost,
    OverrideHostOverrideHostSource,
)
from envoy_data_plane.envoy.extensions.load_balancing_policies.round_robin.v3 import RoundRobin
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    UpstreamTlsContext,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.metadata.v3 import MetadataKey, MetadataKeyPathSegment
from envoy_data_plane.envoy.type.v3 import Percent
from envoy_data_plane.google.protobuf import Any as AnyProto

from extproc.config import DECIDE_TIMEOUT_RANGE_S, DECIDE_TIMEOUT_S
from extproc.envoyconfig import authz, hardening, responselog

DESTINATION = "x-gateway-destination-endpoint"
SERVED = "x-gateway-destination-endpoint-served"
LB_NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
PICKER_CLUSTER = "kvswitch_picker"
PICKER_LOG_CLUSTER = "kvswitch_picker_log_{}"  # access-log mode with replicas at fixed addresses: one each
RESPONSE_MODES = ("access-log", "observe", "skip", "detach")
PICKER_PROTOCOLS = ("ext-proc", "ext-authz")
POOL_CLUSTER = "inference_pool"


@dataclass
class EnvoyConfigOptions:
    """Everything the generated bootstrap depends on."""

    listen_port: int = 8081
    listen_host: str = "0.0.0.0"
    picker: str = "127.0.0.1:9002"
    pickers: list[str] = field(default_factory=list)  # more picker replicas, health-checked like the first
    fail_open: bool = False
    lb: str = "override-host"  # or "original-dst"
    admin_port: int = 9901
    endpoints: list[str] = field(default_factory=list)  # pool pods (override-host)
    route_timeout_s: float = 3600.0
    retries: int = 3  # bounded retries on the next endpoint of the fallback list (before any response byte)
    # An attempt with no byte either way for this long is abandoned (and retried if nothing reached the
    # client yet). vLLM sends a non-streaming response only when generation is done, so keep it above the
    # longest non-streaming generation; 0 turns it off.
    per_try_idle_timeout_s: float = 300.0
    picker_grpc_timeout_s: float = 10.0
    # ext_authz only: how long Envoy waits for the picker's answer. Past the knee flow control holds a request
    # in the picker until a pod has room, so this is long (below the connection manager's 5-minute stream idle
    # timeout); the picker is told the same value (server.decide_timeout_s, the same default). Why:
    # extproc/authz.py.
    decide_timeout_s: float = DECIDE_TIMEOUT_S
    message_timeout_s: float = 1000.0
    buffer_limit_bytes: int = 32 * 1024 * 1024  # large prompts pass through Envoy's buffers
    picker_health_interval_s: float = 1.0
    # "observe": every response body chunk goes through the picker (FULL_DUPLEX_STREAMED). "skip": none does
    # (response_body_mode NONE); run the picker with server.response_body: skip. Response trailers stay SEND
    # on purpose: it keeps the ext_proc stream open until the HTTP stream ends, which is how the picker learns
    # the end (with SKIP Envoy 1.40 closes the stream right after the response headers reply). A per-request
    # mode_override cannot do this instead: Envoy ignores mode_override when the filter's request or response
    # body mode is FULL_DUPLEX_STREAMED (checked with Envoy 1.40).
    # "detach": nothing of the response (headers, body, trailers) goes to the picker, so Envoy closes the
    # ext_proc stream once the request is routed and a picker crash cannot cut it; run the picker with
    # server.response_body: detach (it then counts a request as ended when routed, and gets no feedback).
    # "access-log" (default): as detach on the ext_proc side, and the feedback comes off the critical path:
    # a Lua filter notes first byte, [DONE], usage; the gRPC access log brings them with status, flags and
    # the upstream to the picker when the request ends (extproc/envoyconfig/responselog.py).
    response_body: str = "access-log"
    # access-log only: Envoy batches entries into one gRPC message (up to 16 KiB, or this many ms after the
    # first; 0: each entry as its request ends). Batched, the picker handles one message per batch instead of one
    # per request (its CPU per 4 KB request 0.92 -> 0.76 ms, added p50 1.10 -> 0.93 ms: README, "The request
    # path"); the price is that a request's load is released up to this long after its end. The picker dates
    # each outcome from Envoy's own timestamps (extproc/responselog.py: log_lag), so observed latencies are not
    # stretched by the batching.
    access_log_flush_ms: float = 10.0
    # How Envoy asks the picker. "ext-proc": a gRPC ext_proc stream per request (the Gateway API Inference
    # Extension's protocol; every response mode). "ext-authz": Envoy's ext_authz filter asks the picker's decide
    # port over HTTP/1.1 with the buffered body, one request and one answer (extproc/authz.py: about a tenth of
    # the picker's CPU per request); response_body access-log or detach only, no model_rewrite. The decide
    # addresses (``picker_decide``, one per picker replica in the order of picker + pickers) default to each
    # picker's host with its gRPC port + 1 (kvswitch serve's default).
    picker_protocol: str = "ext-proc"
    picker_decide: list[str] = field(default_factory=list)
    # TLS to the picker (kvswitch serve --tls-cert/--tls-key or --tls-self-signed): verify its certificate
    # against picker_tls_ca (a PEM file path) when given, else encrypt without verifying (GIE's self-signed
    # picker convention); picker_tls_sni names the server (default: none).
    picker_tls: bool = False
    picker_tls_ca: str | None = None
    picker_tls_sni: str = ""
    ext_proc: bool = True  # False: Envoy alone, round robin over ``endpoints`` (the benchmark baseline)
    # rel2 (issue 14): a content-length past this gets a 400 context_length_exceeded from Envoy, before the picker
    # or a pod sees a byte (extproc.contextcap.context_cap_bytes gives the picker's own cap); None: no such route.
    max_body_bytes: int | None = None
    # Extra HTTP filters (already-serialised proto3 JSON dicts with "name"/"typedConfig") placed before
    # ext_proc; tests use it to inject a subset hint. Plain dicts on purpose: they are test-only.
    extra_http_filters: list[dict[str, Any]] = field(default_factory=list)


def _addr(hostport: str) -> Address:
    host, _, port = hostport.rpartition(":")
    return Address(socket_address=SocketAddress(address=host.strip("[]"), port_value=int(port)))


def _pack(msg) -> AnyProto:
    return AnyProto.pack(msg)


def _seconds(s: float) -> timedelta:
    return timedelta(seconds=s)


def _load_assignment(name: str, addresses: list[str]) -> ClusterLoadAssignment:
    return ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[LocalityLbEndpoints(lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=_addr(a)))
                                                     for a in addresses])],
    )


def _ext_proc(opts: EnvoyConfigOptions) -> ExternalProcessor:
    send = ProcessingModeHeaderSendMode.SEND
    duplex = ProcessingModeBodySendMode.FULL_DUPLEX_STREAMED
    if opts.response_body not in RESPONSE_MODES:
        raise ValueError(f"response_body must be one of {', '.join(RESPONSE_MODES)}, got {opts.response_body!r}")
    response_body = duplex if opts.response_body == "observe" else ProcessingModeBodySendMode.NONE
    # detach: nothing of the response goes to the picker, so Envoy ends the ext_proc stream after the request
    # phase and a picker crash cannot cut a stream already placed (see EnvoyConfigOptions.response_body).
    # access-log: the same, the response's outcome reaches the picker through the access log instead.
    detached = opts.response_body in ("detach", "access-log")
    response_side = ProcessingModeHeaderSendMode.SKIP if detached else send
    return ExternalProcessor(
        # The retry policy on the GrpcService itself: the one ext_proc reads (with it Envoy also buffers the
        # messages it sent, so a stream refused by a dead replica is replayed on another); the EnvoyGrpc one is
        # for re-establishing long-lived streams and ext_proc ignores it.
        grpc_service=GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=PICKER_CLUSTER),
                                 retry_policy=hardening.picker_grpc_retry(),
                                 timeout=_seconds(opts.picker_grpc_timeout_s)),
        failure_mode_allow=opts.fail_open,
        processing_mode=ProcessingMode(
            request_header_mode=send, response_header_mode=response_side,
            request_body_mode=duplex, response_body_mode=response_body,
            request_trailer_mode=send, response_trailer_mode=response_side,
        ),
        message_timeout=_seconds(opts.message_timeout_s),
        metadata_options=MetadataOptions(
            forwarding_namespaces=MetadataOptionsMetadataNamespaces(untyped=[LB_NAMESPACE, SUBSET_NAMESPACE]),
            receiving_namespaces=MetadataOptionsMetadataNamespaces(
                untyped=[LB_NAMESPACE, responselog.DEBUG_NAMESPACE]),
        ),
    )


def _listener(opts: EnvoyConfigOptions) -> Listener:
    action = RouteAction(
        cluster=POOL_CLUSTER,
        timeout=_seconds(opts.route_timeout_s),
        retry_policy=hardening.retry_policy(opts.retries, opts.per_try_idle_timeout_s),
    )
    filters = [HttpFilter(name="envoy.filters.http.router", typed_config=_pack(Router()))]
    per_route: dict[str, AnyProto] = {}
    if opts.ext_proc:
        # Off by default, on for the API routes only (hardening.api_routes): see hardening.with_ext_proc.
        if opts.picker_protocol == "ext-authz":
            filters.insert(0, authz.authz_filter(opts.fail_open, opts.decide_timeout_s,
                                                 opts.buffer_limit_bytes))
            per_route = authz.per_route()
        else:
            filters.insert(0, HttpFilter(name=hardening.EXT_PROC_FILTER, typed_config=_pack(_ext_proc(opts)),
                                         disabled=True))
            per_route = hardening.with_ext_proc(opts.fail_open)
        if opts.response_body == "access-log":
            filters.insert(1, responselog.observer_filter())
    hcm = HttpConnectionManager(
        stat_prefix="kvswitch_ingress",
        route_config=RouteConfiguration(
            name="inference",
            virtual_hosts=[VirtualHost(name="inference", domains=["*"],
                                       routes=hardening.api_routes(action, per_route, opts.max_body_bytes))],
        ),
        http_filters=filters,
        early_header_mutation_extensions=[hardening.early_strip()],
        local_reply_config=hardening.local_replies(),
        access_log=responselog.access_logs(_log_clusters(opts), opts.access_log_flush_ms) if _logs(opts) else [],
    )
    return Listener(
        name="inference",
        address=_addr(f"{opts.listen_host}:{opts.listen_port}"),
        per_connection_buffer_limit_bytes=opts.buffer_limit_bytes,
        filter_chains=[FilterChain(filters=[
            Filter(name="envoy.filters.network.http_connection_manager", typed_config=_pack(hcm))
        ])],
    )


def _pool_cluster(opts: EnvoyConfigOptions) -> Cluster:
    if opts.lb == "original-dst" and opts.fail_open and opts.ext_proc:
        raise ValueError("--lb original-dst cannot be combined with --fail-open: with the picker down a request "
                         "would go wherever it names itself; use --lb override-host (fail-open goes round robin "
                         "over the listed pool) or --fail-closed")
    if opts.lb == "original-dst":
        return _pool(opts, type=ClusterDiscoveryType.ORIGINAL_DST, lb_policy=ClusterLbPolicy.CLUSTER_PROVIDED,
                     original_dst_lb_config=ClusterOriginalDstLbConfig(use_http_header=True,
                                                                       http_header_name=DESTINATION))
    if not opts.ext_proc:
        return _pool(opts, type=ClusterDiscoveryType.STATIC,
                     load_assignment=_load_assignment(POOL_CLUSTER, opts.endpoints))
    if opts.lb != "override-host":
        raise ValueError(f"lb must be override-host or original-dst, got {opts.lb!r}")
    if not opts.endpoints:
        raise ValueError("the override-host cluster needs the pool's endpoints (--endpoint ip:port, repeatable)")
    policy = OverrideHost(
        override_host_sources=[OverrideHostOverrideHostSource(header=DESTINATION),
                               OverrideHostOverrideHostSource(metadata=MetadataKey(
                                   key=LB_NAMESPACE, path=[MetadataKeyPathSegment(key=DESTINATION)]))],
        selected_host_key=MetadataKey(key=LB_NAMESPACE, path=[MetadataKeyPathSegment(key=SERVED)]),
        fallback_policy=LoadBalancingPolicy(policies=[LoadBalancingPolicyPolicy(
            typed_extension_config=TypedExtensionConfig(
                name="envoy.load_balancing_policies.round_robin", typed_config=_pack(RoundRobin())))]),
    )
    return _pool(opts, type=ClusterDiscoveryType.STATIC,
                 load_assignment=_load_assignment(POOL_CLUSTER, opts.endpoints),
                 load_balancing_policy=LoadBalancingPolicy(policies=[LoadBalancingPolicyPolicy(
                     typed_extension_config=TypedExtensionConfig(
                         name="envoy.load_balancing_policies.override_host", typed_config=_pack(policy)))]))


def _pool(opts: EnvoyConfigOptions, **how: Any) -> Cluster:
    """The pool cluster, whichever way it finds its pods (``how``): what every way shares (its name, the
    connect timeout, the per-connection buffer and the circuit breakers, hardening.pool_circuit_breakers)."""
    return Cluster(name=POOL_CLUSTER, connect_timeout=_seconds(1),
                   per_connection_buffer_limit_bytes=opts.buffer_limit_bytes,
                   circuit_breakers=hardening.pool_circuit_breakers(), **how)


def _picker_cluster(opts: EnvoyConfigOptions) -> Cluster:
    h2 = HttpProtocolOptions(explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
        http2_protocol_options=Http2ProtocolOptions()))
    return Cluster(
        name=PICKER_CLUSTER,
        type=_static_or_dns(opts.picker),
        connect_timeout=_seconds(1),
        load_assignment=_load_assignment(PICKER_CLUSTER, _replicas(opts)),
        # No panic routing to an unhealthy picker: with no healthy host the ext_proc stream fails at once,
        # before any body chunk is sent, which is when Envoy still honours failure_mode_allow (fail-open)
        # under FULL_DUPLEX_STREAMED; it also makes fail-closed answer fast.
        common_lb_config=ClusterCommonLbConfig(healthy_panic_threshold=Percent(value=0.0)),
        typed_extension_protocol_options={"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _pack(h2)},
        outlier_detection=hardening.picker_outlier_detection(),
        circuit_breakers=hardening.picker_circuit_breakers(),
        transport_socket=_picker_tls(opts),
        health_checks=[HealthCheck(
            timeout=_seconds(1),
            interval=_seconds(opts.picker_health_interval_s),
            # Without this Envoy checks an idle cluster only once a minute, and a dead picker goes unnoticed.
            no_traffic_interval=_seconds(opts.picker_health_interval_s),
            unhealthy_threshold=2,
            healthy_threshold=1,
            grpc_health_check=HealthCheckGrpcHealthCheck(service_name=EXT_PROC_SERVICE),
        )],
    )


def _logs(opts: EnvoyConfigOptions) -> bool:
    return opts.ext_proc and opts.response_body == "access-log"


def _replicas(opts: EnvoyConfigOptions) -> list[str]:
    return [opts.picker] + [p for p in opts.pickers if p != opts.picker]


def _log_clusters(opts: EnvoyConfigOptions) -> list[str]:
    """Where access-log entries go: the picker cluster, or with several replicas listed one cluster per
    replica (each a fixed IP or a name resolving to that replica alone, e.g. a StatefulSet pod's DNS name):
    every replica gets every entry and keeps those of the requests it routed. One name for several replicas
    (a Service) cannot work: the entries would reach one replica; use response_body skip there."""
    replicas = _replicas(opts)
    if len(replicas) == 1:
        return [PICKER_CLUSTER]
    return [PICKER_LOG_CLUSTER.format(i) for i in range(len(replicas))]


def _picker_log_clusters(opts: EnvoyConfigOptions) -> list[Cluster]:
    names = _log_clusters(opts) if _logs(opts) else []
    if names == [PICKER_CLUSTER] or not names:
        return []
    h2 = HttpProtocolOptions(explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
        http2_protocol_options=Http2ProtocolOptions()))
    return [Cluster(name=name, type=_static_or_dns(replica), connect_timeout=_seconds(1),
                    load_assignment=_load_assignment(name, [replica]),
                    typed_extension_protocol_options={
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _pack(h2)},
                    transport_socket=_picker_tls(opts))
            for name, replica in zip(names, _replicas(opts), strict=True)]


def decide_addresses(opts: EnvoyConfigOptions) -> list[str]:
    """The pickers' ext_authz addresses: as given, or each replica's host with its gRPC port + 1."""
    if opts.picker_decide:
        return list(opts.picker_decide)
    out = []
    for replica in _replicas(opts):
        host, _, port = replica.rpartition(":")
        out.append(f"{host}:{int(port) + 1}")
    return out


def _decide_cluster(opts: EnvoyConfigOptions) -> list[Cluster]:
    if not opts.ext_proc or opts.picker_protocol != "ext-authz":
        return []
    if opts.response_body not in ("access-log", "detach"):
        raise ValueError(f"picker protocol ext-authz sends nothing of the response to the picker: response_body "
                         f"must be access-log or detach, got {opts.response_body!r}")
    if opts.picker_tls:
        raise ValueError("picker protocol ext-authz speaks plain HTTP to the picker: no TLS (use ext-proc)")
    replicas = decide_addresses(opts)
    if len(replicas) != len(_replicas(opts)):
        raise ValueError(f"give one decide address per picker replica: {len(replicas)} for "
                         f"{len(_replicas(opts))} replicas")
    return [authz.decide_cluster(_load_assignment(authz.DECIDE_CLUSTER, replicas), _static_or_dns(replicas[0]),
                                 opts.picker_health_interval_s)]


def _static_or_dns(hostport: str) -> ClusterDiscoveryType:
    """STATIC for an IP; STRICT_DNS for a name (in a cluster: the picker's headless Service, so Envoy sees, health
    checks and balances over every replica)."""
    try:
        ipaddress.ip_address(hostport.rpartition(":")[0].strip("[]"))
    except ValueError:
        return ClusterDiscoveryType.STRICT_DNS
    return ClusterDiscoveryType.STATIC


def _picker_tls(opts: EnvoyConfigOptions) -> TransportSocket | None:
    """The picker cluster's TLS transport socket (gRPC needs ALPN h2), or None for plaintext h2c."""
    if not opts.picker_tls:
        return None
    validation = (CertificateValidationContext(trusted_ca=DataSource(filename=opts.picker_tls_ca))
                  if opts.picker_tls_ca else None)
    ctx = UpstreamTlsContext(sni=opts.picker_tls_sni, common_tls_context=CommonTlsContext(
        alpn_protocols=["h2"], validation_context=validation))
    return TransportSocket(name="envoy.transport_sockets.tls", typed_config=_pack(ctx))


def build_bootstrap(opts: EnvoyConfigOptions) -> Bootstrap:
    if opts.picker_protocol not in PICKER_PROTOCOLS:
        raise ValueError(f"picker_protocol must be one of {', '.join(PICKER_PROTOCOLS)}, got {opts.picker_protocol!r}")
    lo, hi = DECIDE_TIMEOUT_RANGE_S  # the range the picker's server.decide_timeout_s accepts: both sides agree
    if not lo <= opts.decide_timeout_s <= hi:
        raise ValueError(f"decide_timeout_s: seconds Envoy waits for the picker's ext_authz answer, {lo:g}-{hi:g}, "
                         f"got {opts.decide_timeout_s}")
    return Bootstrap(
        static_resources=BootstrapStaticResources(
            listeners=[_listener(opts)],
            clusters=[_pool_cluster(opts)] + ([_picker_cluster(opts), *_picker_log_clusters(opts),
                                               *_decide_cluster(opts)] if opts.ext_proc else []),
        ),
        admin=Admin(address=_addr(f"127.0.0.1:{opts.admin_port}")),
    )


def to_dict(opts: EnvoyConfigOptions) -> dict[str, Any]:
    """The bootstrap as proto3 JSON (camelCase), with any test-only filters spliced in before ext_proc."""
    doc = build_bootstrap(opts).to_dict()
    if opts.extra_http_filters:  # the client's headers are stripped earlier
        listener_hcm(doc)["httpFilters"][0:0] = list(opts.extra_http_filters)
    return doc


def listener_hcm(doc: dict[str, Any]) -> dict[str, Any]:
    """The HTTP connection manager's typed config in a ``to_dict`` bootstrap: its one listener's one filter."""
    hcm: dict[str, Any] = doc["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]
    return hcm


def render(opts: EnvoyConfigOptions, fmt: str = "yaml") -> str:
    doc = to_dict(opts)
    if fmt == "json":
        return json.dumps(doc, indent=2) + "\n"
    header = "# Generated by `kvswitch envoy-config` (extproc/envoyconfig). Do not edit by hand.\n"
    return header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
