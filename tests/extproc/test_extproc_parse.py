"""Body parsing: one decode, every OpenAI request shape, clear 400s naming the param."""

from __future__ import annotations

import orjson
import pytest

from extproc.errors import RequestRejected
from extproc.parse import parse_request


def _parse(doc, path="/v1/completions"):
    return parse_request(orjson.dumps(doc), path, "r1")[0]


def test_completions_shapes():
    assert _parse({"model": "m", "prompt": "hi"}).prompt == "hi"
    assert _parse({"model": "m", "prompt": ["a", "b"]}).prompt == "ab"
    assert _parse({"model": "m", "prompt": [1, 2, 3]}).prompt_token_ids == [1, 2, 3]
    assert _parse({"model": "m", "prompt": [[1, 2], [3]]}).prompt_token_ids == [1, 2, 3]


def test_chat_with_content_parts_and_token_limits():
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    r = _parse({"model": "m", "messages": msgs, "max_completion_tokens": 7, "stream": True},
               "/v1/chat/completions")
    assert r.api == "chat" and r.messages == msgs and r.max_tokens == 7 and r.stream


def test_responses_api():
    r = _parse({"model": "m", "input": "hi", "max_output_tokens": 5}, "/v1/responses")
    assert r.api == "responses" and r.prompt == "hi" and r.max_tokens == 5
    r = _parse({"model": "m", "input": "hi", "instructions": "be brief"}, "/v1/responses")
    assert r.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = _parse({"model": "m", "input": [{"role": "user", "content": "x"}]}, "/v1/responses")
    assert r.messages == [{"role": "user", "content": "x"}]


def test_api_inferred_when_path_unknown():
    assert _parse({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "/other").api == "chat"


@pytest.mark.parametrize("doc, param", [
    ({"prompt": "x"}, "model"),
    ({"model": "", "prompt": "x"}, "model"),
    ({"model": "m", "prompt": 3}, "prompt"),
    ({"model": "m", "prompt": []}, "prompt"),
    ({"model": "m", "prompt": "x", "stream": "yes"}, "stream"),
    ({"model": "m", "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": "m", "prompt": [[1, "a"]]}, "prompt"),
])
def test_bad_shapes_name_the_param(doc, param):
    with pytest.raises(RequestRejected) as e:
        _parse(doc)
    assert e.value.status == 400 and e.value.param == param and param in e.value.message


def test_chat_bad_messages():
    with pytest.raises(RequestRejected) as e:
        _parse({"model": "m", "messages": [{"role": "user", "content": 5}]}, "/v1/chat/completions")
    assert e.value.param == "messages[0]"


def test_not_json():
    with pytest.raises(RequestRejected) as e:
        parse_request(b"\xff{", "/v1/completions", "r")
    assert e.value.code == "invalid_json"
