"""Fuzz the ext_proc stream state machine (issue 14, item 8): any order of request/response headers, body
chunks split anywhere, trailers, resets (a close at any point), over a real director. Nothing raises, every
rejection is a 4xx with an OpenAI error body, response chunks pass back byte for byte, and once the stream
closes nothing of it is left: no in-flight record in the director, no in-flight gauge held."""

from __future__ import annotations

import asyncio

import orjson
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from e2e.support.extproc_fakes import body, headers
from engine.internal_fields import ENGINE_INTERNAL_FIELDS
from extproc.stream import ExtProcStream, StreamSettings
from pickers.clock import ManualClock
from pickers.config import build_scheduler
from pickers.types import Endpoint

COUNT = {"streams": 0, "messages": 0}
_LOOP = asyncio.new_event_loop()
_CLOCK = ManualClock(100.0)
_DIRECTOR = build_scheduler({"profile": "least-inflight", "admission": []},
                            [Endpoint(address=f"10.0.0.{i}:8000", role="decode") for i in (1, 2)], _CLOCK,
                            network=False, registry=CollectorRegistry())

GOOD = [orjson.dumps({"model": "m", "prompt": "hello", "max_tokens": 3, "stream": True}),
        orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        orjson.dumps({"model": "m", "prompt": [1, 2, 3], "kv_transfer_params": {"remote_host": "6.6.6.6"}})]
SSE = [b'data: {"choices":[{"text":"x"}]}\n\n', b'data: {"choices":[],"usage":{"prompt_tokens":"x"}}\n\n',
       b"data: [DONE]\n\n", b'data: {"error": {"message": "boom"}}\n\n', b"\xff\xfe", b"data: {"]


@st.composite
def request_body(draw: st.DrawFn) -> bytes:
    return draw(st.sampled_from(GOOD) | st.binary(max_size=200) | st.just(b""))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return out


@st.composite
def message(draw: st.DrawFn) -> pb.ProcessingRequest:
    kind = draw(st.sampled_from(["rh", "rb", "rt", "sh", "sb", "st", "junk"]))
    if kind == "rh":
        path = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/x", ""]))
        hdrs = {":method": "POST", ":path": path, "x-request-id": draw(st.sampled_from(["a", "b", ""]))}
        return headers(hdrs, end_of_stream=draw(st.booleans()))
    if kind == "rb":
        return body(draw(request_body())[: draw(st.integers(0, 300))], draw(st.booleans()))
    if kind == "rt":
        return pb.ProcessingRequest(request_trailers=pb.HttpTrailers())
    if kind == "sh":
        status = draw(st.sampled_from(["200", "400", "500", "503", "abc", ""]))
        ctype = draw(st.sampled_from(["text/event-stream", "application/json", ""]))
        return headers({":status": status, "content-type": ctype}, end_of_stream=draw(st.booleans()),
                       response=True, served=draw(st.sampled_from([None, "10.0.0.2:8000", "1.2.3.4:5", ""])))
    if kind == "sb":
        chunk = b"".join(draw(st.lists(st.sampled_from(SSE), max_size=4))) + draw(st.binary(max_size=30))
        return body(chunk, draw(st.booleans()), response=True)
    if kind == "st":
        return pb.ProcessingRequest(response_trailers=pb.HttpTrailers())
    return pb.ProcessingRequest()


@st.composite
def plausible_stream(draw: st.DrawFn) -> list[pb.ProcessingRequest]:
    """Mostly in Envoy's order (headers, body split anywhere, response), then mutated: drop, swap, insert."""
    data = draw(request_body())
    msgs = [headers({":method": "POST", ":path": "/v1/completions"}, end_of_stream=not data)]
    if data:
        parts = split(data, draw(st.lists(st.integers(0, 10_000), max_size=4)))
        msgs += [body(p, i == len(parts) - 1) for i, p in enumerate(parts)]
    msgs.append(headers({":status": draw(st.sampled_from(["200", "500"])), "content-type": "text/event-stream"},
                        response=True, served=draw(st.sampled_from([None, "10.0.0.2:8000"]))))
    chunks = split(b"".join(draw(st.lists(st.sampled_from(SSE), max_size=5))),
                   draw(st.lists(st.integers(0, 10_000), max_size=4)))
    msgs += [body(c, i == len(chunks) - 1, response=True) for i, c in enumerate(chunks)]
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["drop", "swap", "insert", "cut"]))
        if not msgs:
            break
        i = draw(st.integers(0, len(msgs) - 1))
        if op == "drop":
            msgs.pop(i)
        elif op == "swap" and len(msgs) > 1:
            j = draw(st.integers(0, len(msgs) - 1))
            msgs[i], msgs[j] = msgs[j], msgs[i]
        elif op == "insert":
            msgs.insert(i, draw(message()))
        else:
            del msgs[i:]  # a reset: the stream closes here
    return msgs


async def drive(msgs: list[pb.ProcessingRequest], response_body: bool) -> None:
    s = ExtProcStream(_DIRECTOR, StreamSettings(body_limit_bytes=250, response_body=response_body), _CLOCK)
    forwarded: list[bytes] = []
    try:
        for m in msgs:
            COUNT["messages"] += 1
            replies = await s.handle(m)
            for r in replies:
                kind = r.WhichOneof("response")
                if kind == "immediate_response":
                    code = r.immediate_response.status.code
                    assert 400 <= code < 500, code
                    doc = orjson.loads(r.immediate_response.body)
                    assert set(doc["error"]) == {"message", "type", "param", "code"}
                elif kind == "response_body" and m.WhichOneof("request") == "response_body":
                    assert r.response_body.response.body_mutation.streamed_response.body == m.response_body.body
                elif kind == "request_headers" and m.WhichOneof("request") != "response_headers":
                    sent = [h.header.raw_value for h in r.request_headers.response.header_mutation.set_headers]
                    assert all(b"6.6.6.6" not in v for v in sent)
                elif kind == "request_body":
                    forwarded.append(r.request_body.response.body_mutation.streamed_response.body)
    finally:
        s.close()
        COUNT["streams"] += 1
    if forwarded:  # what goes upstream was parsed: it is JSON and holds no engine-internal field
        sent = orjson.loads(b"".join(forwarded))
        assert not any(name in sent for name in ENGINE_INTERNAL_FIELDS), sent
    assert s._counted is None  # the in-flight gauge this stream held is given back
    assert len(_DIRECTOR.dl.inflight) == 0, "an in-flight record outlived its stream"


@settings(settings.get_profile("kvswitch-fuzz"))
@given(plausible_stream(), st.booleans())
def test_fuzz_stream_plausible_orders(msgs, response_body):
    _LOOP.run_until_complete(drive(msgs, response_body))


@settings(settings.get_profile("kvswitch-fuzz"))
@given(st.lists(message(), max_size=12), st.booleans())
def test_fuzz_stream_any_order(msgs, response_body):
    _LOOP.run_until_complete(drive(msgs, response_body))


def teardown_module(module: object) -> None:
    print(f"\nfuzz stream: {COUNT['streams']} streams, {COUNT['messages']} messages")
    _LOOP.close()
