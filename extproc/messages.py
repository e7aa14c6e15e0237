"""Builders for the ext_proc ProcessingResponse messages kvswitch sends (xds-protos, upb-backed)."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

DESTINATION = "x-gateway-destination-endpoint"
SERVED = "x-gateway-destination-endpoint-served"
SUBSET = "x-gateway-destination-endpoint-subset"
PREFILLER = "x-prefiller-host-port"
LB_NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
# Headers a client must never be able to set: removed from every request before it goes upstream.
CONTROLLED_HEADERS = (DESTINATION, PREFILLER, SUBSET, SERVED)
MAX_CHUNK = 62_000  # bytes per streamed_response chunk (Envoy's ext_proc message limit, with headroom)


def header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def destination_headers(
    endpoints: str, prefill: str | None, remove: list[str], extra: list[tuple[str, str]] | None = None
) -> pb.ProcessingResponse:
    """The request-headers reply that routes: header + envoy.lb metadata with the same fallback list."""
    sets = [header(DESTINATION, endpoints)]
    if prefill:
        sets.append(header(PREFILLER, prefill))
    if extra:
        sets.extend(header(k, v) for k, v in extra)
    mutation = pb.HeaderMutation(set_headers=sets, remove_headers=remove)
    meta = struct_pb2.Struct()
    meta.fields[LB_NAMESPACE].struct_value.fields[DESTINATION].string_value = endpoints
    return pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(
            response=pb.CommonResponse(header_mutation=mutation, clear_route_cache=True)
        ),
        dynamic_metadata=meta,
    )


def request_body_chunk(body: bytes | memoryview, end_of_stream: bool) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(
        request_body=pb.BodyResponse(
            response=pb.CommonResponse(
                body_mutation=pb.BodyMutation(
                    streamed_response=pb.StreamedBodyResponse(body=bytes(body), end_of_stream=end_of_stream)
                )
            )
        )
    )


def response_body_chunk(body: bytes, end_of_stream: bool) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(
        response_body=pb.BodyResponse(
            response=pb.CommonResponse(
                body_mutation=pb.BodyMutation(
                    streamed_response=pb.StreamedBodyResponse(body=body, end_of_stream=end_of_stream)
                )
            )
        )
    )


def body_chunks(body: bytes, factory=request_body_chunk) -> list[pb.ProcessingResponse]:
    """Split a body into <= MAX_CHUNK streamed chunks with end_of_stream on the last (one for empty)."""
    if len(body) <= MAX_CHUNK:
        return [factory(body, True)]
    view = memoryview(body)
    last = len(body)
    return [factory(view[i : i + MAX_CHUNK], i + MAX_CHUNK >= last) for i in range(0, last, MAX_CHUNK)]


def response_headers_reply(extra: list[tuple[str, str]] | None = None) -> pb.ProcessingResponse:
    common = pb.CommonResponse()
    if extra:
        common.header_mutation.set_headers.extend(header(k, v) for k, v in extra)
    return pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=common))


def request_trailers_reply() -> pb.ProcessingResponse:
    return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())


def response_trailers_reply() -> pb.ProcessingResponse:
    return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())


def immediate(status: int, body: bytes, details: str) -> pb.ProcessingResponse:
    """An answer from kvswitch itself (4xx/5xx) with a JSON error body."""
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=pb.HeaderMutation(set_headers=[header("content-type", "application/json")]),
            body=body,
            details=details,
        )
    )
