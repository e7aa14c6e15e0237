"""Response feedback off the critical path: a Lua observer in Envoy and a gRPC access log to the picker.

``response_body: access-log`` (the default). The picker sees a request's headers and body, routes it, and
Envoy then closes the ext_proc stream (response headers, body and trailers SKIP, as ``detach``): no response
byte waits on Python, a picker crash cannot cut a stream already placed, and a 300-token stream costs the picker
no message per chunk. What the scheduler learns from responses comes back another way:

- a Lua filter (LuaJIT in Envoy's worker, a few string searches per chunk, nothing buffered) records in the
  ``kvswitch.response`` dynamic metadata: the time of the first response body byte (the first token of a
  stream; all tokens of a non-streamed answer), whether the SSE terminal event (``[DONE]``, or the Responses
  API's ``response.completed``) came, the count of data events, an error event, and the usage counts of the
  last ``usage`` block (prompt, completion and cached tokens);
- Envoy's HTTP gRPC access logger sends each request's entry to the picker's ``AccessLogService`` when the
  request ends, batched (``access_log_flush_ms``, 10 ms by default: one message per 16 KiB or per interval;
  0: one message per entry), carrying that metadata with the status, the
  response flags (upstream reset, timeout, connection failure, client gone), the upstream that answered and
  the timings. ``extproc/responselog.py`` turns an entry into the director's hooks.

With debug headers on, the picker puts them in the ``kvswitch.debug`` metadata when it routes and the Lua
filter copies them onto the response (the picker no longer sees the response headers).

With several picker replicas listed (``--picker`` repeated: IPs, or names that each resolve to one replica)
every replica gets its own logger (each handles the entries of the requests it routed and ignores the rest);
behind one DNS name for several replicas (a Kubernetes Service) the entries would reach one replica only, so
run replicas there with ``response_body: skip`` (gateway-api/overlays/plain-envoy does).
"""

from __future__ import annotations

from datetime import timedelta

from envoy_data_plane.envoy.config.accesslog.v3 import AccessLog
from envoy_data_plane.envoy.config.core.v3 import ApiVersion, DataSource, GrpcService, GrpcServiceEnvoyGrpc
from envoy_data_plane.envoy.extensions.access_loggers.grpc.v3 import (
    CommonGrpcAccessLogConfig,
    HttpGrpcAccessLogConfig,
)
from envoy_data_plane.envoy.extensions.filters.http.lua.v3 import Lua
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import HttpFilter
from envoy_data_plane.google.protobuf import Any as AnyProto

RESPONSE_NAMESPACE = "kvswitch.response"  # what the Lua observer learned of the response
DEBUG_NAMESPACE = "kvswitch.debug"  # debug headers the picker wants on the response
LOG_NAME = "kvswitch"
LUA_FILTER = "kvswitch.response_observer"

# Runs per response in Envoy's worker thread. Invariants: it never changes a byte of the response, never
# buffers (bodyChunks streams), copies at most 4 KiB of a chunk (usage and [DONE] sit at the end of a body) and
# keeps a 256-byte tail so a marker split across two chunks is still seen. Objects from the handle are
# re-fetched after every yield (Envoy invalidates them across chunks).
OBSERVER_LUA = r"""
local NS = "kvswitch.response"
local DEBUG = "kvswitch.debug"

function envoy_on_response(handle)
  local headers = handle:headers()
  local debug = handle:streamInfo():dynamicMetadata():get(DEBUG)
  if debug ~= nil then
    for k, v in pairs(debug) do
      if type(v) == "string" then headers:replace(k, v) end
    end
  end
  local sse = string.find(headers:get("content-type") or "", "text/event-stream", 1, true) ~= nil
  local first, tail, done, events, err = nil, "", false, 0, false
  local p, c, k, bad = nil, nil, nil, false
  for chunk in handle:bodyChunks() do
    local n = chunk:length()
    if n > 0 then
      if first == nil then
        first = tonumber(handle:timestampString(EnvoyTimestampResolution.MICROSECOND))
      end
      local take = n
      if take > 4096 then take = 4096 end
      local s = chunk:getBytes(n - take, take)
      if sse then
        local _, m = string.gsub(s, '"choices":%[{', "")
        events = events + m
        if not err and string.find(s, '"error"', 1, true) and not string.find(s, '"choices"', 1, true) then
          err = true
        end
      end
      local w = tail .. s
      if not done and (string.find(w, "[DONE]", 1, true) or string.find(w, "response.completed", 1, true)) then
        done = true
      end
      if string.find(w, '"usage"%s*:%s*[^%sn]') then
        -- a usage block: all of it or none (a count that is not a plain integer makes it malformed)
        local pp = string.match(w, '"prompt_tokens"%s*:%s*(%d+)%s*[,}]')
                   or string.match(w, '"input_tokens"%s*:%s*(%d+)%s*[,}]')
        local cc = string.match(w, '"completion_tokens"%s*:%s*(%d+)%s*[,}]')
                   or string.match(w, '"output_tokens"%s*:%s*(%d+)%s*[,}]')
        local kk = string.match(w, '"cached_tokens"%s*:%s*(%d+)%s*[,}]')
        if pp ~= nil and cc ~= nil and (kk ~= nil or not string.find(w, '"cached_tokens"', 1, true)) then
          p, c, k, bad = pp, cc, kk, false
        elseif p == nil then
          bad = true
        end
      end
      tail = string.sub(w, -256)
    end
  end
  local md = handle:streamInfo():dynamicMetadata()
  if first ~= nil then md:set(NS, "first_byte_us", first) end
  md:set(NS, "sse", sse)
  md:set(NS, "done", done)
  md:set(NS, "events", events)
  md:set(NS, "error_event", err)
  md:set(NS, "usage_malformed", bad)
  if p ~= nil then
    md:set(NS, "prompt_tokens", tonumber(p))
    md:set(NS, "completion_tokens", tonumber(c))
    if k ~= nil then md:set(NS, "cached_tokens", tonumber(k)) end
  end
end
"""


def observer_filter() -> HttpFilter:
    """The Lua response observer (placed before the router: on the response side it runs first)."""
    return HttpFilter(name=LUA_FILTER, typed_config=AnyProto.pack(
        Lua(default_source_code=DataSource(inline_string=OBSERVER_LUA))))


BATCH_BYTES = 16 * 1024  # a batch leaves when it holds this much, or flush_ms after its first entry


def access_logs(clusters: list[str], flush_ms: float = 0.0) -> list[AccessLog]:
    """One HTTP gRPC access logger per picker cluster: unbatched (an entry leaves as its request ends) when
    ``flush_ms`` is 0, else entries batched into one message up to ``BATCH_BYTES`` or ``flush_ms``."""
    if flush_ms < 0:
        raise ValueError(f"access_log_flush_ms must be >= 0, got {flush_ms}")
    batched = flush_ms > 0
    return [AccessLog(name="envoy.access_loggers.http_grpc", typed_config=AnyProto.pack(HttpGrpcAccessLogConfig(
        common_config=CommonGrpcAccessLogConfig(
            log_name=LOG_NAME,
            grpc_service=GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=cluster),
                                     timeout=timedelta(seconds=5)),
            transport_api_version=ApiVersion.V3,
            buffer_size_bytes=BATCH_BYTES if batched else 0,
            buffer_flush_interval=timedelta(milliseconds=flush_ms if batched else 100),
        ),
        additional_response_headers_to_log=["content-type"],
    ))) for cluster in clusters]
