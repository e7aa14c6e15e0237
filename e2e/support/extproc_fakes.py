"""Fake ext_proc messages and a scriptable scheduler for state-machine tests."""

from __future__ import annotations

from dataclasses import dataclass, field

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from pickers.state import RequestState
from pickers.types import Decision, InferenceRequest, SchedulingError, Usage


def headers(hdrs: dict[str, str], end_of_stream: bool = False, subset: list[str] | None = None,
            response: bool = False, served: str | None = None) -> pb.ProcessingRequest:
    hm = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in hdrs.items()])
    h = pb.HttpHeaders(headers=hm, end_of_stream=end_of_stream)
    req = pb.ProcessingRequest(response_headers=h) if response else pb.ProcessingRequest(request_headers=h)
    if subset is not None:
        value = req.metadata_context.filter_metadata["envoy.lb.subset_hint"].fields[
            "x-gateway-destination-endpoint-subset"]
        value.list_value.SetInParent()  # present even when empty
        for a in subset:
            value.list_value.values.add().string_value = a
    if served is not None:
        req.metadata_context.filter_metadata["envoy.lb"].fields[
            "x-gateway-destination-endpoint-served"].string_value = served
    return req


def body(data: bytes, end_of_stream: bool, response: bool = False) -> pb.ProcessingRequest:
    b = pb.HttpBody(body=data, end_of_stream=end_of_stream)
    return pb.ProcessingRequest(response_body=b) if response else pb.ProcessingRequest(request_body=b)


REQUEST_HEADERS = {":method": "POST", ":path": "/v1/completions", "content-type": "application/json"}


@dataclass
class ScriptedScheduler:
    endpoints: list[str] = field(default_factory=lambda: ["10.0.0.1:8000", "10.0.0.2:8000"])
    prefill: str | None = None
    error: SchedulingError | None = None
    requests: list[InferenceRequest] = field(default_factory=list)
    events: list[tuple] = field(default_factory=list)

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def ready(self) -> bool:
        return True

    async def route(self, request: InferenceRequest) -> Decision:
        self.requests.append(request)
        if self.error:
            raise self.error
        eps = [e for e in self.endpoints if request.subset is None or e in request.subset] or self.endpoints
        return Decision(RequestState(request, request.request_id, 0.0), endpoints=eps, prefill=self.prefill,
                        explanation={eps[0]: {"load": 0.5, "total": 0.5}})

    def on_served(self, decision: Decision, served: str) -> None:
        self.events.append(("served", served))

    def on_first_token(self, decision: Decision, at: float) -> None:
        self.events.append(("first_token",))

    def on_finished(self, decision: Decision, usage: Usage | None, at: float) -> None:
        self.events.append(("finished", usage))

    def on_failed(self, decision: Decision, reason: str, at: float) -> None:
        self.events.append(("failed", reason))
