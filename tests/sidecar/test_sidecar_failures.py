"""Refusals, retries and error mapping: nothing a client sends picks a destination."""

from __future__ import annotations

import os
import time

import aiohttp
import orjson
import pytest

from e2e.support.ports import free_port
from e2e.support.waits import connects_while_busy
from engine.sidecar import PrefillAllowList, normalize_address, sign
from engine.sidecar.allowlist import AddressError
from engine.sidecar.cli import main as cli_main
from tests.sidecar.sidecar_fakes import decode_json, json_response, prefill_ok

BODY = {"model": "m", "prompt": "hello", "max_tokens": 4}


async def post(url: str, headers: dict[str, str], body: bytes | None = None):
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/completions", data=body or orjson.dumps(BODY), headers=headers) as r:
            return r.status, await r.json(content_type=None)


def assert_openai_error(answer: dict, *words: str) -> None:
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    for w in words:
        assert w in answer["error"]["message"]


async def test_a_burst_of_connections_while_the_loop_is_busy_waits_in_the_engines_accept_queue(fakes, sidecars):
    """Envoy opens connections to the sidecar as requests come; 1,000 that arrive while its loop is busy all
    connect within Envoy's 1-s connect timeout, as they would reach vLLM (engine.VLLM_LISTEN_BACKLOG). With
    aiohttp's queue of 128, 184-307 of 1,000 did not (3 runs)."""
    sc = await sidecars(await fakes(decode_json))
    assert await connects_while_busy(sc.address, 1000) == 1000


async def test_target_outside_allow_list_reaches_nothing(fakes, sidecars):
    allowed, intruder, decode = await fakes(prefill_ok), await fakes(prefill_ok), await fakes(decode_json)
    sc = await sidecars(decode, prefill_pods=(allowed.address,))
    status, answer = await post(sc.url, {"x-prefiller-host-port": intruder.address})
    assert status == 403
    assert_openai_error(answer, intruder.address, "allow list")
    assert intruder.seen == [] and allowed.seen == [] and decode.seen == []


@pytest.mark.parametrize("value", ["http://10.0.0.1:80", "10.0.0.1", "10.0.0.1:0", "a@b:80", "h:80/x",
                                   "1.2.3.4:80,5.6.7.8:80"])
async def test_malformed_target_is_a_400(fakes, sidecars, value):
    decode = await fakes(decode_json)
    sc = await sidecars(decode)
    status, answer = await post(sc.url, {"x-prefiller-host-port": value})
    assert status == 400 and answer["error"]["param"] == "x-prefiller-host-port"
    assert decode.seen == []


async def test_picker_signature_vouches_for_an_unlisted_pod(fakes, sidecars):
    prefill, decode = await fakes(prefill_ok), await fakes(decode_json)
    secret = b"s3cret"
    sc = await sidecars(decode, picker_secret=secret)
    good = sign(secret, "rid-1", prefill.address)
    status, _ = await post(sc.url, {"x-prefiller-host-port": prefill.address, "X-Request-Id": "rid-1",
                                    "x-kvswitch-prefill-signature": good})
    assert status == 200 and len(prefill.seen) == 1
    # The same signature for another request id, a wrong key, or an old timestamp is refused.
    for rid, sig in [("rid-2", good), ("rid-1", sign(b"other", "rid-1", prefill.address)),
                     ("rid-1", sign(secret, "rid-1", prefill.address, now=time.time() - 3600)), ("rid-1", None)]:
        headers = {"x-prefiller-host-port": prefill.address, "X-Request-Id": rid}
        if sig:
            headers["x-kvswitch-prefill-signature"] = sig
        status, answer = await post(sc.url, headers)
        assert status == 403, (rid, sig)
    assert len(prefill.seen) == 1


async def test_allow_list_file_is_reread(fakes, sidecars, tmp_path):
    prefill, decode = await fakes(prefill_ok), await fakes(decode_json)
    listing = tmp_path / "pods"
    listing.write_text("# pool\n10.9.9.9:8000\n")
    sc = await sidecars(decode, prefill_pods_file=str(listing), prefill_pods_reload_s=0.0)
    assert (await post(sc.url, {"x-prefiller-host-port": prefill.address}))[0] == 403
    listing.write_text(f"10.9.9.9:8000\n{prefill.address}  # new pod\n")
    os.utime(listing, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert (await post(sc.url, {"x-prefiller-host-port": prefill.address}))[0] == 200


async def test_retries_503_then_succeeds(fakes, sidecars):
    async def flaky(request, server):
        server.state["n"] = server.state.get("n", 0) + 1
        if server.state["n"] <= 2:
            return json_response({"error": {"message": "busy"}}, status=503)
        return await prefill_ok(request, server)

    prefill, decode = await fakes(flaky), await fakes(decode_json)
    sc = await sidecars(decode, prefill_pods=(prefill.address,), max_retries=2)
    status, _ = await post(sc.url, {"x-prefiller-host-port": prefill.address})
    assert status == 200 and len(prefill.seen) == 3 and len(decode.seen) == 1
    assert decode.seen[0].json["kv_transfer_params"]["remote_engine_id"] == "engine-p1"


async def test_persistent_503_becomes_502_naming_the_pod(fakes, sidecars):
    async def down(request, server):
        return json_response({"error": {"message": "busy"}}, status=503)

    prefill, decode = await fakes(down), await fakes(decode_json)
    sc = await sidecars(decode, prefill_pods=(prefill.address,), max_retries=1)
    status, answer = await post(sc.url, {"x-prefiller-host-port": prefill.address})
    assert status == 502 and len(prefill.seen) == 2 and decode.seen == []
    assert_openai_error(answer, prefill.address, "2 attempts")


async def test_connect_errors_are_retried_then_502(fakes, sidecars):
    decode = await fakes(decode_json)
    dead = f"127.0.0.1:{free_port()}"
    sc = await sidecars(decode, prefill_pods=(dead,), max_retries=2)
    status, answer = await post(sc.url, {"x-prefiller-host-port": dead})
    assert status == 502 and decode.seen == []
    assert_openai_error(answer, dead, "3 attempts", "connection failed")


async def test_prefill_400_is_passed_through(fakes, sidecars):
    err = {"error": {"message": "prompt too long", "type": "BadRequestError", "param": None, "code": 400}}

    async def reject(request, server):
        return json_response(err, status=400)

    prefill, decode = await fakes(reject), await fakes(decode_json)
    sc = await sidecars(decode, prefill_pods=(prefill.address,))
    status, answer = await post(sc.url, {"x-prefiller-host-port": prefill.address})
    assert status == 400 and answer == err
    assert len(prefill.seen) == 1 and decode.seen == []  # a 4xx is not retried


async def test_prefill_500_is_not_retried_and_maps_to_502(fakes, sidecars):
    async def broken(request, server):
        from aiohttp import web
        return web.Response(status=500, text="boom")

    prefill, decode = await fakes(broken), await fakes(decode_json)
    sc = await sidecars(decode, prefill_pods=(prefill.address,))
    status, answer = await post(sc.url, {"x-prefiller-host-port": prefill.address})
    assert status == 502 and len(prefill.seen) == 1
    assert_openai_error(answer, prefill.address, "500")


async def test_bad_json_and_oversized_bodies(fakes, sidecars):
    prefill, decode = await fakes(prefill_ok), await fakes(decode_json)
    sc = await sidecars(decode, prefill_pods=(prefill.address,), max_body_bytes=1000)
    status, answer = await post(sc.url, {"x-prefiller-host-port": prefill.address}, body=b"{nope")
    assert status == 400 and "JSON" in answer["error"]["message"]
    status, answer = await post(sc.url, {}, body=b'{"prompt": "' + b"x" * 2000 + b'"}')
    assert status == 413 and "1000" in answer["error"]["message"]
    assert prefill.seen == [] and decode.seen == []


async def test_decode_engine_down_is_a_502(fakes, sidecars):
    prefill = await fakes(prefill_ok)

    class Dead:
        address = f"127.0.0.1:{free_port()}"

    sc = await sidecars(Dead, prefill_pods=(prefill.address,))
    status, answer = await post(sc.url, {"x-prefiller-host-port": prefill.address})
    assert status == 502 and "local decode engine" in answer["error"]["message"]


def test_normalize_address():
    assert normalize_address("10.0.0.1:8000") == "10.0.0.1:8000"
    assert normalize_address(" Pod-A.ns.svc:080 ") == "pod-a.ns.svc:80"
    assert normalize_address("[::1]:9") == "[::1]:9"
    for bad in ["", ":80", "x:", "x:99999", "[::1]", "x y:1", "-a:1"]:
        with pytest.raises(AddressError):
            normalize_address(bad)


def test_allow_list_file_errors_name_the_line(tmp_path):
    f = tmp_path / "pods"
    f.write_text("10.0.0.1:80\nnot an address\n")
    with pytest.raises(ValueError, match=r"pods:2"):
        PrefillAllowList(file=f)


def test_cli_rejects_bad_allow_list_entry(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["--prefill-pod", "http://x:1", "--port", "0"])
    assert exc.value.code == 2
    assert "http://x:1" in capsys.readouterr().err
