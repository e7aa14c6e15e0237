"""The per-stream state machine, driven message by message with exact expectations on its replies."""

from __future__ import annotations

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from e2e.support.extproc_fakes import REQUEST_HEADERS, ScriptedScheduler, body, headers
from extproc import messages as msg
from extproc.stream import ExtProcStream, Phase, StreamSettings
from pickers.clock import ManualClock
from pickers.types import SchedulingError, Usage

BODY = orjson.dumps({"model": "m", "prompt": "hello", "max_tokens": 3, "stream": True})


def _stream(sched=None, **settings) -> tuple[ExtProcStream, ScriptedScheduler]:
    sched = sched or ScriptedScheduler()
    return ExtProcStream(sched, StreamSettings(**settings), ManualClock(5.0)), sched


def _set_headers(reply: pb.ProcessingResponse) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode()
            for h in reply.request_headers.response.header_mutation.set_headers}


async def test_headers_reply_waits_for_body_end_then_routes_and_streams_body_back():
    s, sched = _stream()
    assert await s.handle(headers(REQUEST_HEADERS)) == []
    assert await s.handle(body(BODY[:10], False)) == []
    out = await s.handle(body(BODY[10:], True))
    assert [r.WhichOneof("response") for r in out] == ["request_headers", "request_body"]
    h = out[0]
    assert _set_headers(h) == {msg.DESTINATION: "10.0.0.1:8000,10.0.0.2:8000"}
    assert h.request_headers.response.clear_route_cache is True
    assert list(h.request_headers.response.header_mutation.remove_headers) == []
    assert h.dynamic_metadata.fields["envoy.lb"].struct_value.fields[msg.DESTINATION].string_value == \
        "10.0.0.1:8000,10.0.0.2:8000"
    sr = out[1].request_body.response.body_mutation.streamed_response
    assert sr.body == BODY and sr.end_of_stream is True
    req = sched.requests[0]
    assert (req.model, req.prompt, req.max_tokens, req.stream, req.body_size, req.arrival) == \
        ("m", "hello", 3, True, len(BODY), 5.0)
    assert s.phase is Phase.ROUTED


async def test_duplicate_end_of_stream_is_ignored():
    s, _ = _stream()
    await s.handle(headers(REQUEST_HEADERS))
    assert len(await s.handle(body(BODY, True))) == 2
    assert await s.handle(body(b"", True)) == []
    assert await s.handle(body(BODY, True)) == []


async def test_large_body_is_chunked_at_62000_with_end_of_stream_on_last():
    big = orjson.dumps({"model": "m", "prompt": "x" * 150_000})
    s, _ = _stream()
    await s.handle(headers(REQUEST_HEADERS))
    out = await s.handle(body(big[:70_000], False)) + await s.handle(body(big[70_000:], True))
    chunks = [r.request_body.response.body_mutation.streamed_response for r in out[1:]]
    assert [len(c.body) for c in chunks] == [62_000, 62_000, len(big) - 124_000]
    assert [c.end_of_stream for c in chunks] == [False, False, True]
    assert b"".join(c.body for c in chunks) == big


async def test_prefill_header_and_client_controlled_headers_removed():
    sched = ScriptedScheduler(prefill="10.0.0.9:8000")
    s, _ = _stream(sched)
    hdrs = {**REQUEST_HEADERS, msg.DESTINATION: "6.6.6.6:1", msg.SUBSET: "6.6.6.6:1", msg.SERVED: "x",
            msg.PREFILLER: "6.6.6.6:2"}
    await s.handle(headers(hdrs))
    out = await s.handle(body(BODY, True))
    assert _set_headers(out[0]) == {msg.DESTINATION: "10.0.0.1:8000,10.0.0.2:8000", msg.PREFILLER: "10.0.0.9:8000"}
    assert sorted(out[0].request_headers.response.header_mutation.remove_headers) == sorted([msg.SUBSET, msg.SERVED])


async def test_client_prefill_header_removed_when_no_prefill():
    s, _ = _stream()
    await s.handle(headers({**REQUEST_HEADERS, msg.PREFILLER: "6.6.6.6:2"}))
    out = await s.handle(body(BODY, True))
    assert list(out[0].request_headers.response.header_mutation.remove_headers) == [msg.PREFILLER]


async def test_bodiless_request_answered_at_headers():
    s, sched = _stream()
    out = await s.handle(headers({":method": "GET", ":path": "/v1/models"}, end_of_stream=True))
    assert [r.WhichOneof("response") for r in out] == ["request_headers"]
    assert sched.requests[0].api == "other" and sched.requests[0].model == ""


@pytest.mark.parametrize("payload, status, code", [
    (b"{bad", 400, "invalid_json"),
    (b'{"prompt": "x"}', 400, "model_missing"),
    (b'{"model": "m", "messages": [1]}', 400, "invalid_request"),
])
async def test_bad_body_gets_immediate_openai_error(payload, status, code):
    s, sched = _stream()
    await s.handle(headers({**REQUEST_HEADERS, ":path": "/v1/chat/completions"}))
    out = await s.handle(body(payload, True))
    assert len(out) == 1
    ir = out[0].immediate_response
    assert ir.status.code == status
    assert {h.header.key: h.header.raw_value for h in ir.headers.set_headers} == {"content-type": b"application/json"}
    err = orjson.loads(ir.body)["error"]
    assert err["code"] == code and err["type"] == "invalid_request_error" and err["message"]
    assert sched.requests == [] and s.phase is Phase.REJECTED
    assert await s.handle(body(b"more", True)) == []


async def test_body_over_limit_is_413_and_stops_buffering():
    s, _ = _stream(body_limit_bytes=100)
    await s.handle(headers(REQUEST_HEADERS))
    assert await s.handle(body(b"x" * 60, False)) == []
    out = await s.handle(body(b"x" * 60, False))
    assert out[0].immediate_response.status.code == 413
    assert "body_limit_bytes" in orjson.loads(out[0].immediate_response.body)["error"]["message"]
    assert s._chunks == []
    assert await s.handle(body(b"x" * 10_000, True)) == []
    assert s._chunks == []


@pytest.mark.parametrize("status, code", [(429, "shed"), (503, "no_endpoints")])
async def test_scheduling_error_maps_to_status(status, code):
    s, _ = _stream(ScriptedScheduler(error=SchedulingError(status, "busy, retry later", code)))
    await s.handle(headers(REQUEST_HEADERS))
    out = await s.handle(body(BODY, True))
    ir = out[0].immediate_response
    assert ir.status.code == status and orjson.loads(ir.body)["error"]["code"] == code


@pytest.mark.parametrize("subset", [["10.0.0.2:8000"], []])
async def test_subset_hint_reaches_the_director_as_sent(subset):
    """The stream reads envoy.lb.subset_hint (present even when empty) and hands it on; the director owns
    the rule (its 503s: tests/pickers/test_scheduler.py, and through Envoy: e2e/test_envoy_routing.py)."""
    s, sched = _stream()
    await s.handle(headers(REQUEST_HEADERS, subset=subset))
    await s.handle(body(BODY, True))
    assert sched.requests[0].subset == subset


async def test_model_rewrite_sets_content_length():
    s, sched = _stream(model_rewrite={"m": "real-model"})
    await s.handle(headers(REQUEST_HEADERS))
    out = await s.handle(body(BODY, True))
    new = out[1].request_body.response.body_mutation.streamed_response.body
    assert orjson.loads(new)["model"] == "real-model"
    assert _set_headers(out[0])["content-length"] == str(len(new))
    assert sched.requests[0].model == "real-model"


async def test_response_path_sse_passthrough_first_token_usage_and_served():
    s, sched = _stream(debug_headers=True)
    await s.handle(headers(REQUEST_HEADERS))
    await s.handle(body(BODY, True))
    out = await s.handle(headers({":status": "200", "content-type": "text/event-stream"}, response=True,
                                 served="10.0.0.2:8000"))
    assert [r.WhichOneof("response") for r in out] == ["response_headers"]
    dbg = {h.header.key: h.header.raw_value.decode()
           for h in out[0].response_headers.response.header_mutation.set_headers}
    assert dbg["x-kvswitch-endpoint"] == "10.0.0.2:8000"
    assert "x-kvswitch-explanation" in dbg and "x-kvswitch-prefill-endpoint" not in dbg
    assert sched.events == [("served", "10.0.0.2:8000")]
    c1 = b'data: {"choices":[{"text":"a"}]}\n\ndata: {"choi'
    c2 = b'ces":[{"text":"b"}]}\n\n'
    c3 = (b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2,'
          b'"prompt_tokens_details":{"cached_tokens":4}}}\n\ndata: [DONE]\n\n')
    for chunk, eos in ((c1, False), (c2, False), (c3, True)):
        out = await s.handle(body(chunk, eos, response=True))
        sr = out[0].response_body.response.body_mutation.streamed_response
        assert (sr.body, sr.end_of_stream) == (chunk, eos)
    assert sched.events[1:] == [("first_token",), ("finished", Usage(7, 2, 4))]
    s.close()
    assert len(sched.events) == 3


async def test_json_response_usage_read_at_end():
    s, sched = _stream()
    await s.handle(headers(REQUEST_HEADERS))
    await s.handle(body(BODY, True))
    await s.handle(headers({":status": "200", "content-type": "application/json"}, response=True))
    doc = orjson.dumps({"choices": [{"text": "x"}], "usage": {"prompt_tokens": 3, "completion_tokens": 1}})
    await s.handle(body(doc[:5], False, response=True))
    await s.handle(body(doc[5:], True, response=True))
    assert sched.events == [("first_token",), ("finished", Usage(3, 1, 0))]


async def test_upstream_error_and_aborted_stream_reported_as_failed():
    s, sched = _stream()
    await s.handle(headers(REQUEST_HEADERS))
    await s.handle(body(BODY, True))
    await s.handle(headers({":status": "503"}, response=True))
    await s.handle(body(b'{"error": {}}', True, response=True))
    assert sched.events == [("failed", "http 503")]
    s2, sched2 = _stream()
    await s2.handle(headers(REQUEST_HEADERS))
    await s2.handle(body(BODY, True))
    s2.close()
    assert sched2.events == [("failed", "stream closed before the response ended")]


async def test_the_request_carries_the_fronts_hold_limit_to_the_scheduler():
    """Flow control decides a request held on an ext_proc stream by the server's deadline (decide_timeout_s less
    2 s): Envoy resets a stream idle for 5 minutes, held or not. Without one, only max_wait_s bounds the hold."""
    for limit in (288.0, None):
        s, sched = _stream(hold_limit_s=limit)
        await s.handle(headers(REQUEST_HEADERS))
        await s.handle(body(BODY, True))
        (req,) = sched.requests
        assert req.hold_limit_s == limit
