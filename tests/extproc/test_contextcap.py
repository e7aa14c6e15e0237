"""A body no prompt of the pool's context fits is refused before it is received, parsed or sent on."""

from __future__ import annotations

import orjson
import pytest

from e2e.support.extproc_fakes import REQUEST_HEADERS, ScriptedScheduler, body, headers
from extproc.config import ConfigError, config_from_dict
from extproc.contextcap import BYTES_PER_TOKEN, SLACK_BYTES, context_cap_bytes, largest_context
from extproc.stream import ExtProcStream, Phase, StreamSettings
from pickers.clock import ManualClock

CAP = 1000


def _stream(cap: int | None = CAP) -> tuple[ExtProcStream, ScriptedScheduler]:
    sched = ScriptedScheduler()
    return ExtProcStream(sched, StreamSettings(context_cap_bytes=cap), ManualClock(1.0)), sched


def _error(out) -> tuple[int, dict]:
    assert len(out) == 1 and out[0].HasField("immediate_response"), out
    ir = out[0].immediate_response
    return ir.status.code, orjson.loads(ir.body)["error"]


async def test_a_content_length_past_the_cap_is_refused_at_the_headers():
    s, sched = _stream()
    status, err = _error(await s.handle(headers({**REQUEST_HEADERS, "content-length": str(CAP + 1)})))
    assert status == 400 and err["code"] == "context_length_exceeded"
    assert str(CAP + 1) in err["message"] and str(CAP) in err["message"]
    assert s.phase is Phase.REJECTED and sched.requests == []
    assert await s.handle(body(b"x" * 600, False)) == []  # the rest of the body is dropped, not buffered
    assert await s.handle(body(b"x" * 600, True)) == [] and s._chunks == []


async def test_a_chunked_body_is_refused_once_past_the_cap_and_its_chunks_dropped():
    s, sched = _stream()
    assert await s.handle(headers(REQUEST_HEADERS)) == []  # no content-length
    assert await s.handle(body(b"x" * 600, False)) == []
    status, err = _error(await s.handle(body(b"x" * 600, False)))
    assert status == 400 and err["code"] == "context_length_exceeded" and "at least 1200" in err["message"]
    assert s._chunks == [] and sched.requests == []
    assert await s.handle(body(b"x" * 10, True)) == []


async def test_a_body_at_the_cap_is_routed_and_no_cap_routes_anything():
    doc = orjson.dumps({"model": "m", "prompt": "p" * (CAP - 40)})
    doc = doc[:-2] + b"p" * (CAP - len(doc)) + doc[-2:]
    assert len(doc) == CAP
    for cap in (CAP, None):
        s, sched = _stream(cap)
        await s.handle(headers({**REQUEST_HEADERS, "content-length": str(len(doc))}))
        out = await s.handle(body(doc, True))
        assert [r.WhichOneof("response") for r in out] == ["request_headers", "request_body"]
        assert len(sched.requests) == 1


def test_the_derived_cap_follows_the_largest_context_of_the_pool():
    assert largest_context([]) == 131072  # the default profile (llama-3.1-8b) when discovery lists endpoints
    assert largest_context(["qwen3-30b-a3b", "llama-3.1-8b"]) == 131072
    assert context_cap_bytes(None, ["llama-3.1-8b"]) == 131072 * BYTES_PER_TOKEN + SLACK_BYTES
    assert context_cap_bytes(None, ["qwen3-30b-a3b"]) == 40960 * BYTES_PER_TOKEN + SLACK_BYTES
    assert context_cap_bytes(5000, ["llama-3.1-8b"]) == 5000
    assert context_cap_bytes(0, ["llama-3.1-8b"]) is None


def test_a_negative_cap_is_a_configuration_error():
    with pytest.raises(ConfigError, match="context_cap_bytes"):
        config_from_dict({"server": {"context_cap_bytes": -1}})
