"""The parts of the generated Envoy config that keep clients from steering and keep errors readable.

Kept apart from ``builder.py`` (which assembles listeners and clusters) so each concern reads on its own:

- ``early_strip``: an HCM early header mutation that removes every routing header a client could send
  (``x-gateway-destination-endpoint*``, ``x-prefiller-host-port``, ``x-data-parallel-rank``, ``x-kvswitch-*``)
  and the client's ``x-request-id``, before routing, request-id generation and every HTTP filter. So with the
  picker down and fail-open nothing a client wrote can pick a pod, and the request id the picker keys its load
  tracking on is always one Envoy generated (a client reusing one id cannot merge its requests).
- ``api_routes``: only the API the pool serves is routed (POST completions / chat / responses, GET models);
  a wrong method is a 405 and any other path a 404, both answered by Envoy with an OpenAI-shaped body and
  without calling the picker (the ext_proc filter is off by default and turned on per API route).
  ``/metrics``, ``/reset_prefix_cache``,
  the simulator's ``/sim/*`` never reach a pod through the gateway.
- ``local_replies``: Envoy's own error replies (500 when the picker fails closed, 503 no healthy upstream,
  413, 431, 400, 426 for HTTP/1.0, 504) carry ``{"error": {message, type, param, code}}``. Replies the picker
  made itself (ImmediateResponse, already OpenAI-shaped) pass untouched: their details string starts with
  ``kvswitch_``, which a CEL filter on the first mapper matches.
- ``retry_policy``: a request that failed before any response byte reached the client (connect failure,
  reset, refused stream, a 5xx answer, a per-try timeout) is retried on the next endpoint of the picker's
  fallback list, a bounded number of times; a per-try idle timeout abandons a pod that stalls.
- ``pool_circuit_breakers`` / ``picker_circuit_breakers``: Envoy's per-cluster defaults (1,024 connections,
  requests and pending requests; 3 retries at once) would cap a fleet, and the requests flow control holds
  over ext_authz, at 1,024 in flight, and fail retries past the third.
"""

from __future__ import annotations

from datetime import timedelta

from envoy_data_plane.envoy.config.accesslog.v3 import (
    AccessLogFilter,
    ComparisonFilter,
    ComparisonFilterOp,
    ExtensionFilter,
    OrFilter,
    ResponseFlagFilter,
    StatusCodeFilter,
)
from envoy_data_plane.envoy.config.cluster.v3 import (
    CircuitBreakers,
    CircuitBreakersThresholds,
    CircuitBreakersThresholdsRetryBudget,
    OutlierDetection,
)
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import HeaderMutation as RuleHeaderMutation
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import HeaderMutationRemoveOnMatch
from envoy_data_plane.envoy.config.core.v3 import (
    DataSource,
    RetryPolicyRetryHostPredicate,
    RuntimeUInt32,
    SubstitutionFormatString,
    TypedExtensionConfig,
)
from envoy_data_plane.envoy.config.core.v3 import (
    RetryPolicy as CoreRetryPolicy,
)
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
    FilterConfig,
    HeaderMatcher,
    RetryPolicy,
    Route,
    RouteAction,
    RouteMatch,
)
from envoy_data_plane.envoy.extensions.access_loggers.filters.cel.v3 import ExpressionFilter
from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import ExtProcOverrides, ExtProcPerRoute
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    LocalReplyConfig,
    ResponseMapper,
)
from envoy_data_plane.envoy.extensions.http.early_header_mutation.header_mutation.v3 import (
    HeaderMutation as EarlyHeaderMutation,
)
from envoy_data_plane.envoy.extensions.retry.host.previous_hosts.v3 import PreviousHostsPredicate
from envoy_data_plane.envoy.type.matcher.v3 import StringMatcher
from envoy_data_plane.envoy.type.v3 import Int64Range, Percent
from envoy_data_plane.google.protobuf import Any as AnyProto
from envoy_data_plane.google.protobuf import Struct

from extproc.http1 import MAX_CONNECTIONS

EXT_PROC_FILTER = "envoy.filters.http.ext_proc"

# Header names a client must never set: every one of them steers a request or claims the picker's authority.
STRIPPED_EXACT = ("x-prefiller-host-port", "x-data-parallel-rank", "x-request-id")
STRIPPED_PREFIXES = ("x-gateway-destination-endpoint", "x-kvswitch-")

# (path, method) pairs the pool serves. Anything else is answered by Envoy.
API_ROUTES: tuple[tuple[str, str], ...] = (
    ("/v1/completions", "POST"),
    ("/v1/chat/completions", "POST"),
    ("/v1/responses", "POST"),
    ("/v1/models", "GET"),
)

# The retry conditions: each fires only before Envoy forwarded any response byte downstream (Envoy cannot
# retry afterwards), so a retried request never shows the client two partial answers.
RETRY_ON = "connect-failure,refused-stream,reset,5xx"


def _pack(msg) -> AnyProto:
    return AnyProto.pack(msg)


def _error_json(message: str, err_type: str, code: str) -> Struct:
    return Struct.from_dict({"error": {"message": message, "type": err_type, "param": None, "code": code}})


def early_strip() -> TypedExtensionConfig:
    """HCM ``early_header_mutation_extensions`` entry: runs before routing and before any HTTP filter."""
    rules = [RuleHeaderMutation(remove_on_match=HeaderMutationRemoveOnMatch(
        key_matcher=StringMatcher(exact=name))) for name in STRIPPED_EXACT]
    rules += [RuleHeaderMutation(remove_on_match=HeaderMutationRemoveOnMatch(
        key_matcher=StringMatcher(prefix=prefix))) for prefix in STRIPPED_PREFIXES]
    return TypedExtensionConfig(name="envoy.http.early_header_mutation.header_mutation",
                                typed_config=_pack(EarlyHeaderMutation(mutations=rules)))


def retry_policy(retries: int, per_try_idle_timeout_s: float) -> RetryPolicy:
    """Bounded retries on the next endpoint of the fallback list; a stalled attempt is abandoned."""
    return RetryPolicy(
        retry_on=RETRY_ON,
        num_retries=max(0, retries),
        per_try_idle_timeout=timedelta(seconds=per_try_idle_timeout_s) if per_try_idle_timeout_s > 0 else None,
    )


def _direct(status: int, message: str, code: str) -> DirectResponseAction:
    import json

    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}})
    return DirectResponseAction(status=status, body=DataSource(inline_string=body))


def with_ext_proc(fail_open: bool) -> dict[str, AnyProto]:
    """Per-route switch that turns on the ext_proc filter, which is off by default (see builder): a reply
    Envoy makes before any route matched (a codec error: HTTP/1.0, too many headers, CL+chunked) must not wait
    on the picker, or the connection closes before the reply is written and the client sees no status."""
    # Envoy refuses an empty per-route config, so it restates the filter's own failure mode.
    same = ExtProcPerRoute(overrides=ExtProcOverrides(failure_mode_allow=fail_open))
    return {EXT_PROC_FILTER: _pack(FilterConfig(config=_pack(same), disabled=False))}


def too_long_for_context(max_body_bytes: int) -> Route:
    """rel2 (issue 14): a request whose content-length is past ``max_body_bytes`` (extproc.contextcap: no prompt
    that long fits the pool's context) gets a 400 from Envoy before any byte of it reaches the picker or a pod.
    A body without content-length (chunked) is counted by the picker as it streams in."""
    return Route(
        name="too long for any context",
        match=RouteMatch(prefix="/v1/", headers=[HeaderMatcher(
            name="content-length", range_match=Int64Range(start=max_body_bytes + 1, end=2**63 - 1))]),
        direct_response=_direct(400, f"request body is longer than any prompt that fits this pool's largest "
                                     f"context (at most {max_body_bytes} bytes); shorten the prompt",
                                "context_length_exceeded"),
    )


def api_routes(action: RouteAction, picker_filter: dict[str, AnyProto],
               max_body_bytes: int | None = None) -> list[Route]:
    """The API routes to the pool (the only ones where the picker's filter runs: ``picker_filter`` is its
    per-route switch, ``with_ext_proc`` or extproc.envoyconfig.authz.per_route; empty for Envoy alone), then 405
    for a wrong method on an API path, then 404 for the rest; with ``max_body_bytes``, a 400 first for a body
    past it."""
    routes: list[Route] = [too_long_for_context(max_body_bytes)] if max_body_bytes else []
    for path, method in API_ROUTES:
        routes.append(Route(
            name=f"{method} {path}",
            match=RouteMatch(path=path, headers=[HeaderMatcher(name=":method",
                                                               string_match=StringMatcher(exact=method))]),
            route=action,
            typed_per_filter_config=picker_filter,
        ))
    for path, method in API_ROUTES:
        routes.append(Route(
            name=f"not {method} {path}",
            match=RouteMatch(path=path),
            direct_response=_direct(405, f"{path} accepts {method} only", "method_not_allowed"),
        ))
    paths = ", ".join(f"{m} {p}" for p, m in API_ROUTES)
    routes.append(Route(
        name="not found",
        match=RouteMatch(prefix="/"),
        direct_response=_direct(404, f"no such API on this gateway; it serves {paths}", "not_found"),
    ))
    return routes


_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
          408: "timeout", 413: "invalid_request_error", 426: "invalid_request_error", 429: "rate_limit_exceeded",
          431: "invalid_request_error", 500: "server_error", 502: "server_error", 503: "service_unavailable",
          504: "timeout"}
_MESSAGES = {
    400: "the gateway could not parse this HTTP request (%RESPONSE_CODE_DETAILS%)",
    408: "the request took too long to arrive",
    413: "the request is larger than the gateway accepts",
    426: "the gateway speaks HTTP/1.1 and HTTP/2 only; HTTP/1.0 is not accepted",
    431: "the request carries too many or too large headers",
    500: "the gateway failed to process the request (%RESPONSE_CODE_DETAILS%); retry the request",
    502: "the inference pod answered with an invalid response (%RESPONSE_CODE_DETAILS%); retry the request",
    503: "no inference pod could take the request (%RESPONSE_CODE_DETAILS%); retry the request",
    504: "the inference pod did not answer in time (%RESPONSE_CODE_DETAILS%)",
}


def _status_is(code: int) -> AccessLogFilter:
    return AccessLogFilter(status_code_filter=StatusCodeFilter(comparison=ComparisonFilter(
        op=ComparisonFilterOp.EQ, value=RuntimeUInt32(default_value=code, runtime_key=f"kvswitch.lr_{code}"))))


def _json(message: str, err_type: str) -> SubstitutionFormatString:
    return SubstitutionFormatString(
        json_format=_error_json(message, err_type, "%RESPONSE_CODE_DETAILS%"),
        content_type="application/json",
    )


def local_replies() -> LocalReplyConfig:
    """OpenAI-shaped bodies for Envoy's own replies; the picker's immediate responses pass as they are.

    The first mapper keeps any reply the picker made (an ext_proc ImmediateResponse) unchanged.
    """
    mappers = [ResponseMapper(filter=picker_reply_filter(),
                              body_format_override=SubstitutionFormatString(
                                  text_format_source=DataSource(inline_string="%LOCAL_REPLY_BODY%"),
                                  content_type="application/json"))]
    for code, message in _MESSAGES.items():
        mappers.append(ResponseMapper(filter=_status_is(code), body_format_override=_json(message, _TYPES[code])))
    # Anything else Envoy answers itself (a status not listed above) still gets the error shape.
    mappers.append(ResponseMapper(
        filter=AccessLogFilter(or_filter=OrFilter(filters=[
            AccessLogFilter(status_code_filter=StatusCodeFilter(comparison=ComparisonFilter(
                op=ComparisonFilterOp.GE, value=RuntimeUInt32(default_value=400, runtime_key="kvswitch.lr_ge")))),
            AccessLogFilter(response_flag_filter=ResponseFlagFilter()),
        ])),
        body_format_override=_json("the gateway could not complete the request (%RESPONSE_CODE_DETAILS%)",
                                   "server_error")))
    return LocalReplyConfig(mappers=mappers)


def picker_reply_filter() -> AccessLogFilter:
    """Matches replies the picker made (ImmediateResponse ``details`` are ``kvswitch_<code>``, which Envoy
    keeps as the response code details; an ext_authz answer other than 200 is ``ext_authz_denied``) and the
    404/405 direct responses above, so their OpenAI-shaped bodies are not wrapped a second time."""
    expr = ExpressionFilter(expression="response.code_details.startsWith('kvswitch_') || "
                                       "response.code_details == 'ext_authz_denied' || "
                                       "response.code_details == 'direct_response'")
    return AccessLogFilter(extension_filter=ExtensionFilter(
        name="envoy.access_loggers.extension_filters.cel", typed_config=_pack(expr)))


def picker_grpc_retry() -> CoreRetryPolicy:
    """Retry opening an ext_proc stream on another picker replica when the chosen one refuses the connection
    (killed, restarting): no request has reached the picker yet, so nothing is repeated."""
    return CoreRetryPolicy(
        retry_on="connect-failure,refused-stream,reset,unavailable",
        num_retries=2,
        retry_host_predicate=[RetryPolicyRetryHostPredicate(
            name="envoy.retry_host_predicates.previous_hosts", typed_config=_pack(PreviousHostsPredicate()))],
        host_selection_retry_max_attempts=5,
    )


UNCAPPED = 100_000  # a circuit-breaker threshold no gateway replica reaches: Envoy does not cap, what is behind it does
POOL_RETRY_BUDGET_PERCENT = 20.0  # Envoy's own default budget, of the requests active and pending on the pool
POOL_MIN_RETRY_CONCURRENCY = 64  # a pod that dies with its batch queued: each request before its first byte


def pool_circuit_breakers() -> CircuitBreakers:
    """No cap on the pool's connections and requests from Envoy: what a pod takes is bounded by its own
    scheduler (vLLM's max_num_seqs and its queue) and by the picker's flow control, which hold requests in
    priority order, not by a FIFO in Envoy's pool. With Envoy's default of 1,024 requests in flight per cluster,
    a fleet of a few dozen pods running more streams than that had the next ones wait in the pool and then
    fail (503 overflow; measured through the real Envoy: 1,024 of 1,100 in flight at once,
    e2e/test_envoy_hardening.py). Retries get a budget instead of Envoy's 3 at once: a pod that dies with its
    queued requests has each of them retried on its fallback: a fifth of the active requests at once, at least 64."""
    return CircuitBreakers(thresholds=[CircuitBreakersThresholds(
        max_connections=UNCAPPED, max_pending_requests=UNCAPPED, max_requests=UNCAPPED,
        retry_budget=CircuitBreakersThresholdsRetryBudget(
            budget_percent=Percent(value=POOL_RETRY_BUDGET_PERCENT),
            min_retry_concurrency=POOL_MIN_RETRY_CONCURRENCY))])


def picker_circuit_breakers() -> CircuitBreakers:
    """Envoy's defaults (3 retries, 1,024 connections, pending and requests per cluster) sized for the picker:

    - retries: when a replica dies, each ext_proc stream Envoy was opening on it needs its retry, and 3 at once
      per cluster would fail the rest (500);
    - connections: over ext_authz every decision in flight holds one HTTP/1.1 connection to a decide port, and
      past the knee flow control holds requests by the thousand. At 1,024 connections the next requests waited
      in Envoy's pool, unseen by the picker, and failed with the pool's connection errors (measured through the
      real Envoy: 1,022 of 1,100 held requests reached the picker, 78 failed; e2e/test_envoy_authz.py). Each
      replica now takes as many as its front accepts (``extproc.http1.MAX_CONNECTIONS``, per host), the cluster
      as many as its replicas do; over gRPC the streams share a connection and this changes nothing."""
    return CircuitBreakers(
        thresholds=[CircuitBreakersThresholds(max_retries=UNCAPPED, max_pending_requests=UNCAPPED,
                                              max_requests=UNCAPPED, max_connections=UNCAPPED)],
        per_host_thresholds=[CircuitBreakersThresholds(max_connections=MAX_CONNECTIONS)])


def picker_outlier_detection() -> OutlierDetection:
    """Take a picker replica out at its first refused connection (SIGKILL, crash), long before the active
    health check (interval x unhealthy_threshold) would. At most half the replicas, and never a lone picker
    (``always_eject_one_host`` stays off), so one transient failure cannot empty the cluster."""
    return OutlierDetection(
        split_external_local_origin_errors=True,
        consecutive_local_origin_failure=1,
        enforcing_consecutive_local_origin_failure=100,
        consecutive_gateway_failure=1000, enforcing_consecutive_gateway_failure=0,
        enforcing_success_rate=0,
        interval=timedelta(seconds=1),
        base_ejection_time=timedelta(seconds=2),
        max_ejection_percent=50,
    )
