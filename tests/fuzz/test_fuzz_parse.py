"""Fuzz the body parser and OpenAI request validation (issue 14, item 8): whatever the bytes, parsing either
gives a request or a 4xx ``RequestRejected`` whose body is an OpenAI error; nothing else escapes, and the
bytes sent upstream never carry an engine-internal field."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.internal_fields import ENGINE_INTERNAL_FIELDS
from extproc.errors import RequestRejected, body_for
from extproc.parse import parse_client_body

PATHS = ["/v1/completions", "/v1/chat/completions", "/v1/responses", "/other"]
COUNT = {"inputs": 0}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)
keys = st.sampled_from(["model", "prompt", "messages", "input", "instructions", "stream", "max_tokens",
                        "max_completion_tokens", "max_output_tokens", *ENGINE_INTERNAL_FIELDS]) | st.text(max_size=6)
requests = st.dictionaries(keys, json_values | st.lists(st.integers(0, 2**33), max_size=8), max_size=8)


def _escape_some(raw: bytes, data: st.DataObject) -> bytes:
    """Spell engine-internal keys with JSON escapes now and then (the bypass of issue 14, Why 1)."""
    for name in ENGINE_INTERNAL_FIELDS:
        key = f'"{name}"'.encode()
        if key in raw and data.draw(st.booleans()):
            i = data.draw(st.integers(0, len(name) - 1))
            escaped = name[:i] + f"\\u{ord(name[i]):04x}" + name[i + 1:]
            raw = raw.replace(key, f'"{escaped}"'.encode())
    return raw


def check(body: bytes, path: str) -> None:
    COUNT["inputs"] += 1
    try:
        parsed = parse_client_body(body, path, "fuzz", {}, 0.0, {"alias": "m2"})
    except RequestRejected as exc:
        assert 400 <= exc.status < 500, exc.status
        doc = orjson.loads(body_for(exc))
        assert set(doc["error"]) == {"message", "type", "param", "code"} and doc["error"]["message"]
        return
    assert parsed.request.model
    sent = orjson.loads(parsed.body)
    assert not any(name in sent for name in ENGINE_INTERNAL_FIELDS)
    ids = parsed.request.prompt_token_ids
    if ids is not None:
        assert all(0 <= t < 2**32 for t in ids)


@settings(settings.get_profile("kvswitch-fuzz"))
@given(st.binary(max_size=300), st.sampled_from(PATHS))
def test_fuzz_raw_bytes(body, path):
    check(body, path)


@settings(settings.get_profile("kvswitch-fuzz"))
@given(requests, st.sampled_from(PATHS), st.data())
def test_fuzz_openai_shaped(doc, path, data):
    if data.draw(st.booleans()):
        doc = {"model": data.draw(st.sampled_from(["m", "alias", ""])), **doc}
    check(_escape_some(orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS) if _dumpable(doc) else b"{}", data), path)


def _dumpable(doc: object) -> bool:
    try:
        orjson.dumps(doc)
        return True
    except TypeError:
        return False


def teardown_module(module: object) -> None:
    print(f"\nfuzz parse: {COUNT['inputs']} inputs")
