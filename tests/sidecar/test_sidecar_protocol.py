"""Pure protocol helpers: body shapes and the SSE usage rewriter across arbitrary chunk splits."""

from __future__ import annotations

import orjson

from engine.sidecar.protocol import Connector, SSEUsageRewriter, decode_body, prefill_body, strip_client_kv_params

STREAM = (
    b'data: {"choices":[{"text":"a"}]}\n\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":1,"prompt_tokens_details":null}}\n\n'
    b"data: [DONE]\n\n"
)


def test_rewriter_gives_same_output_for_any_split():
    whole = SSEUsageRewriter(7)
    reference = whole.feed(STREAM) + whole.flush()
    assert b'"cached_tokens":7' in reference and reference.endswith(b"data: [DONE]\n\n")
    assert reference.count(b"\n\n") == 3
    for cut in range(1, len(STREAM)):
        r = SSEUsageRewriter(7)
        assert r.feed(STREAM[:cut]) + r.feed(STREAM[cut:]) + r.flush() == reference, cut


def test_rewriter_forwards_complete_events_at_once():
    r = SSEUsageRewriter(1)
    assert r.feed(b'data: {"choices":[{"text":"a"}]}\n\ndata: {"cho') == b'data: {"choices":[{"text":"a"}]}\n\n'
    assert r.feed(b'ices":[]}\n\n') == b'data: {"choices":[]}\n\n'


def test_rewriter_bounds_a_runaway_partial_event():
    r = SSEUsageRewriter(1, max_pending=10)
    assert r.feed(b"x" * 11) == b"x" * 11


def test_usage_null_details_are_filled_in():
    r = SSEUsageRewriter(5)
    out = r.feed(STREAM)
    usage = orjson.loads(out.split(b"\n\n")[1][6:])["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 5, "decode_cached_tokens": None}


def test_bodies_do_not_mutate_the_original():
    original = {"prompt": "p", "stream": True, "max_tokens": 5, "kv_transfer_params": {"x": 1}}
    prefill_body(original, Connector.NIXL)
    decode_body(original, {"remote_block_ids": [1]})
    assert original == {"prompt": "p", "stream": True, "max_tokens": 5, "kv_transfer_params": {"x": 1}}


def test_strip_client_kv_params_is_a_no_op_without_them():
    raw = b'{"prompt":"kv",  "x":1}'
    assert strip_client_kv_params(raw) is raw
    assert orjson.loads(strip_client_kv_params(b'{"a":1,"kv_transfer_params":{}}')) == {"a": 1}
