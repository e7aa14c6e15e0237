"""Envoy's side of the picker's ext_authz front (extproc/authz.py): the filter, its per-route switch and the
cluster of the pickers' decide ports.

The answer may remove headers from the upstream request with ``x-envoy-auth-headers-to-remove`` (extproc.authz).
The ext_authz filter buffers the request body (``with_request_body``, up to the listener's buffer limit) and asks
``POST /decide<path>`` with the headers the picker reads; a 200 copies the routing headers onto the upstream
request (``allowed_upstream_headers``) and the debug headers onto the client's response; any other answer is
what the client gets (status, OpenAI error body, ``retry-after``), passed through the local-reply mappers
untouched (``hardening.picker_reply_filter`` matches ``ext_authz_denied``). A picker that cannot be reached is a
503 (``status_on_error``), or with fail-open the request goes on without a decision (round robin). The check
goes to one replica of the decide cluster (round robin over the healthy ones, HTTP/1.1 keep-alive).

The call is not retried. Past the knee flow control holds a request in the picker until a pod has room, and
the call waits for it up to ``EnvoyConfigOptions.decide_timeout_s`` (290 s; extproc/authz.py says why). A retry
policy on the call would cut that at 10 s: Envoy gives every try of a call with a retry policy a per-try
timeout of 10 s, which the policy's proto cannot change (``Http::Utility::convertCoreToRouteRetryPolicy``);
measured through the real Envoy, calls held past 10 s were reset, asked twice more and failed at 30 s. What
that costs: a picker replica that dies fails the calls it holds and, until Envoy ejects it (at its first
refused connection: outlier detection, or its health check within 2 s), the new calls sent to it; 503s, or with
fail-open requests sent unrouted. The ext_proc front keeps its retry policy: a held stream outlasts 10 s there
(measured the same way).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

import betterproto2
from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterCommonLbConfig, ClusterDiscoveryType
from envoy_data_plane.envoy.config.core.v3 import (
    ApiVersion,
    HealthCheck,
    HealthCheckHttpHealthCheck,
    HttpUri,
)
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment
from envoy_data_plane.envoy.config.route.v3 import FilterConfig
from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import (
    AuthorizationRequest,
    AuthorizationResponse,
    BufferSettings,
    CheckSettings,
    ExtAuthz,
    ExtAuthzPerRoute,
    HttpService,
)
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import HttpFilter
from envoy_data_plane.envoy.type.matcher.v3 import ListStringMatcher, StringMatcher
from envoy_data_plane.envoy.type.v3 import HttpStatus, Percent, StatusCode
from envoy_data_plane.google.protobuf import Any as AnyProto

from extproc import messages as msg
from extproc.authz import DECIDE_PREFIX, HEALTH_PATH
from extproc.envoyconfig import hardening
from extproc.parse import HEADERS_THAT_MATTER

EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
DECIDE_CLUSTER = "kvswitch_picker_decide"
# What the picker's 200 may set on the upstream request, and what its answers may show the client.
UPSTREAM_HEADERS = (msg.DESTINATION, msg.PREFILLER, msg.DP_RANK, msg.SIGNATURE, "x-request-id")
CLIENT_HEADERS_ON_SUCCESS_PREFIX = "x-kvswitch-"
CLIENT_HEADERS_ON_DENIAL = ("content-type", "retry-after")


def _pack(m: betterproto2.Message) -> AnyProto:
    return AnyProto.pack(m)


def _exact(names: Iterable[str]) -> ListStringMatcher:
    return ListStringMatcher(patterns=[StringMatcher(exact=n) for n in names])


def authz_filter(fail_open: bool, timeout_s: float, max_body_bytes: int) -> HttpFilter:
    """The ext_authz filter, off by default and turned on per API route (``per_route``), like ext_proc."""
    service = HttpService(
        server_uri=HttpUri(uri=f"http://{DECIDE_CLUSTER}", cluster=DECIDE_CLUSTER,
                           timeout=timedelta(seconds=timeout_s)),
        path_prefix=DECIDE_PREFIX,
        authorization_request=AuthorizationRequest(),
        authorization_response=AuthorizationResponse(
            allowed_upstream_headers=_exact(UPSTREAM_HEADERS),
            allowed_client_headers=ListStringMatcher(patterns=[
                *(StringMatcher(exact=n) for n in CLIENT_HEADERS_ON_DENIAL),
                StringMatcher(prefix=CLIENT_HEADERS_ON_SUCCESS_PREFIX)]),
            allowed_client_headers_on_success=ListStringMatcher(patterns=[
                StringMatcher(prefix=CLIENT_HEADERS_ON_SUCCESS_PREFIX)]),
        ),
    )
    config = ExtAuthz(
        http_service=service,
        transport_api_version=ApiVersion.V3,
        failure_mode_allow=fail_open,
        with_request_body=BufferSettings(max_request_bytes=max_body_bytes, allow_partial_message=False,
                                         pack_as_bytes=True),
        status_on_error=HttpStatus(code=StatusCode.ServiceUnavailable),
        allowed_headers=_exact(sorted(HEADERS_THAT_MATTER)),
    )
    return HttpFilter(name=EXT_AUTHZ_FILTER, typed_config=_pack(config), disabled=True)


def per_route() -> dict[str, AnyProto]:
    """Per-route switch that turns the ext_authz filter on (an empty CheckSettings: the filter's own)."""
    on = ExtAuthzPerRoute(check_settings=CheckSettings())
    return {EXT_AUTHZ_FILTER: _pack(FilterConfig(config=_pack(on), disabled=False))}


def decide_cluster(assignment: ClusterLoadAssignment, discovery: ClusterDiscoveryType,
                   health_interval_s: float) -> Cluster:
    """The pickers' decide ports (HTTP/1.1), health-checked on GET /health, a refused connection ejecting the
    replica at once (``hardening.picker_outlier_detection``), no panic routing (no healthy picker: 503 at once)."""
    return Cluster(
        name=DECIDE_CLUSTER,
        type=discovery,
        connect_timeout=timedelta(seconds=1),
        load_assignment=assignment,
        common_lb_config=ClusterCommonLbConfig(healthy_panic_threshold=Percent(value=0.0)),
        outlier_detection=hardening.picker_outlier_detection(),
        circuit_breakers=hardening.picker_circuit_breakers(),
        health_checks=[HealthCheck(
            timeout=timedelta(seconds=1),
            interval=timedelta(seconds=health_interval_s),
            no_traffic_interval=timedelta(seconds=health_interval_s),
            unhealthy_threshold=2,
            healthy_threshold=1,
            http_health_check=HealthCheckHttpHealthCheck(path=HEALTH_PATH),
        )],
    )
