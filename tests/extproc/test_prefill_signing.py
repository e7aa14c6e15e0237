"""The picker signs its prefill target for the decode pod's sidecar (server.prefill_signing_secret_file), and
the sidecar's allow list accepts exactly that: this request id, this target."""

from __future__ import annotations

import orjson

from e2e.support.extproc_fakes import REQUEST_HEADERS, ScriptedScheduler, body, headers
from engine.sidecar.allowlist import PrefillAllowList
from extproc import messages as msg
from extproc.stream import ExtProcStream, StreamSettings
from pickers.clock import ManualClock

BODY = orjson.dumps({"model": "m", "prompt": "hello", "max_tokens": 3})
SECRET = b"0123456789abcdef0123456789abcdef"


async def _route(prefill: str | None, hdrs: dict[str, str], secret: bytes | None = SECRET) -> dict[str, str]:
    s = ExtProcStream(ScriptedScheduler(prefill=prefill), StreamSettings(prefill_secret=secret), ManualClock(5.0))
    await s.handle(headers({**REQUEST_HEADERS, **hdrs}))
    out = await s.handle(body(BODY, True))
    mutation = out[0].request_headers.response.header_mutation
    got = {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}
    got["-removed"] = ",".join(mutation.remove_headers)
    return got


async def test_signature_verifies_in_the_sidecar_only_for_its_request_and_target():
    got = await _route("10.0.0.9:8000", {"x-request-id": "req-1", msg.SIGNATURE: "1.forged"})
    sig = got[msg.SIGNATURE]
    assert sig != "1.forged" and msg.SIGNATURE not in got["-removed"]  # ours replaces the client's
    sidecar = PrefillAllowList(secret=SECRET)
    assert sidecar.check("10.0.0.9:8000", "req-1", sig) is None
    assert sidecar.check("10.0.0.8:8000", "req-1", sig) is not None  # another target
    assert sidecar.check("10.0.0.9:8000", "req-2", sig) is not None  # another request
    assert PrefillAllowList(secret=b"other-secret-other-secret-000000").check("10.0.0.9:8000", "req-1", sig)


async def test_request_id_is_set_when_the_gateway_sent_none():
    got = await _route("10.0.0.9:8000", {})
    rid = got["x-request-id"]
    assert PrefillAllowList(secret=SECRET).check("10.0.0.9:8000", rid, got[msg.SIGNATURE]) is None


async def test_no_prefill_or_no_secret_no_signature_and_a_client_signature_is_stripped():
    got = await _route(None, {msg.SIGNATURE: "1.forged"})
    assert msg.SIGNATURE not in got and msg.SIGNATURE in got["-removed"].split(",")
    got = await _route("10.0.0.9:8000", {"x-request-id": "r", msg.SIGNATURE: "1.forged"}, secret=None)
    assert msg.SIGNATURE not in got and msg.SIGNATURE in got["-removed"].split(",")
