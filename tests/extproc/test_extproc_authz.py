"""extproc.authz: the ext_authz front on its own (no Envoy): health, paths, the routing answer's headers, the
outcome's wait for its access-log entry, and refusals that leave no trace. Through Envoy: e2e/test_envoy_authz.py."""

from __future__ import annotations

import aiohttp
import orjson
import pytest
from prometheus_client import REGISTRY

from extproc.authz import DECIDE_PREFIX, AuthzFront
from extproc.config import config_from_dict
from extproc.responselog import LoggedResponse, PendingResponses
from extproc.routing import RouteSettings
from extproc.server import build_scheduler
from pickers.clock import MonotonicClock
from pickers.types import Usage

PODS = ["10.0.0.1:8000", "10.0.0.2:8000"]
DOC = {"model": "m", "prompt": "hello", "max_tokens": 2}


def _inflight() -> float:
    return sum(REGISTRY.get_sample_value("kvswitch_inflight_requests", {"endpoint": a}) or 0.0 for a in PODS)


@pytest.fixture
async def front():
    cfg = config_from_dict({"endpoints": [{"address": a} for a in PODS],
                            "scheduler": {"profile": "least-inflight", "admission": []}})
    director = build_scheduler(cfg)
    await director.start()
    settings = RouteSettings({}, 256 * 1024, None, None, can_rewrite=False)
    f = AuthzFront(director, settings, MonotonicClock(), PendingResponses(), body_limit_bytes=10_000,
                   context_cap_bytes=None)
    await f.start("127.0.0.1", 0)
    try:
        yield f
    finally:
        await f.stop(0)
        await director.stop()


async def test_health_follows_readiness_and_other_paths_are_404(front):
    url = f"http://127.0.0.1:{front.port}"
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/health") as r:
            assert r.status == 503  # not ready until the server says so
        front.ready = True
        async with s.get(url + "/health") as r:
            assert r.status == 200
        async with s.post(url + "/v1/completions", json=DOC) as r:  # not under /decide: not a check
            assert r.status == 404
            assert orjson.loads(await r.read())["error"]["code"] == "not_found"


async def test_a_decision_waits_for_its_access_log_entry(front):
    url = f"http://127.0.0.1:{front.port}{DECIDE_PREFIX}/v1/completions"
    director = front.director
    before = _inflight()
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json=DOC, headers={"x-request-id": "rid-1"}) as r:
            assert r.status == 200
            chosen = r.headers["x-gateway-destination-endpoint"].split(",")
        assert set(chosen) == set(PODS) and "x-envoy-auth-headers-to-remove" not in r.headers
        assert len(front.pending) == 1 and _inflight() == before + 1
        assert director.dl.inflight.requests.any()  # the director counts it until it ends
        front.pending.complete(LoggedResponse("rid-1", 200, chosen[0], 0.05, 0.2, Usage(5, 2, 0), None))
        assert len(front.pending) == 0 and _inflight() == before
        assert not director.dl.inflight.requests.any()
        # without a request id nothing can report the end: the request ends at routing
        async with s.post(url, json=DOC) as r:
            assert r.status == 200
        assert len(front.pending) == 0 and _inflight() == before


@pytest.mark.parametrize("doc,headers,status,code", [
    (b"{", {}, 400, "invalid_json"),
    (orjson.dumps({**DOC, "vllm_xargs": {"kv_transfer_params": {}}}), {}, 400, "invalid_request_field"),
    (orjson.dumps({**DOC, "prompt": "x" * 20_000}), {}, 413, "request_too_large"),
    (orjson.dumps(DOC), {"x-slo-ttft-ms": "soon"}, 400, "invalid_slo"),
])
async def test_refusals_are_openai_errors_and_leave_nothing_behind(front, doc, headers, status, code):
    url = f"http://127.0.0.1:{front.port}{DECIDE_PREFIX}/v1/completions"
    before = _inflight()
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=doc, headers={"content-type": "application/json", "x-request-id": "r",
                                                  **headers}) as r:
            assert r.status == status
            err = orjson.loads(await r.read())["error"]
        assert err["code"] == code and err["message"]
        assert len(front.pending) == 0 and _inflight() == before
        assert not front.director.dl.inflight.requests.any()


def test_the_ext_authz_front_refuses_what_it_cannot_do():
    from pickers.framework import ConfigError

    cfg = config_from_dict({"server": {"grpc_port": 9102}})
    assert cfg.decide_port() == 9103  # gRPC port + 1 by default
    assert config_from_dict({"server": {"grpc_port": 0}}).decide_port() == 0
    assert config_from_dict({"server": {"tls_self_signed": True}}).decide_port() == -1  # no TLS: off
    assert config_from_dict({"server": {"model_rewrite": {"a": "b"}}}).decide_port() == -1  # no body rewrite: off
    for server in ({"decide_port": 9003, "tls_self_signed": True}, {"decide_port": 9003, "model_rewrite": {"a": "b"}},
                   {"decide_port": 70000}):
        with pytest.raises(ConfigError, match="decide_port"):
            config_from_dict({"server": server})
    assert config_from_dict({"server": {"decide_port": -1}}).decide_port() == -1


def test_a_request_is_held_until_just_before_envoys_call_gives_up():
    """Flow control holds a request asked over ext_authz up to the call's timeout less 2 s, the timeout being
    what `kvswitch envoy-config` writes by default (past the knee a hold outlasts the old 10 s call: the
    request then went to a pod's first-come queue, undoing the release order)."""
    from extproc.envoyconfig.builder import EnvoyConfigOptions, listener_hcm, to_dict
    from extproc.server import Server

    def hold(server: dict) -> float | None:
        cfg = config_from_dict({"server": server, "endpoints": [{"address": a} for a in PODS]})
        s = Server(cfg, build_scheduler(cfg))
        assert s.authz is not None
        # the ext_proc front the same: Envoy resets a stream idle for 5 minutes, held or not
        assert s.processor.settings.routing().hold_limit_s == s.authz.settings.hold_limit_s
        return s.authz.settings.hold_limit_s

    envoy_default = EnvoyConfigOptions().decide_timeout_s
    # long, and below the 5-minute stream idle timeout that would reset a held stream in Envoy first
    assert hold({}) == envoy_default - 2.0 and 60.0 < envoy_default < 300.0
    assert hold({"decide_timeout_s": 30}) == 28.0
    doc = to_dict(EnvoyConfigOptions(endpoints=PODS, picker_protocol="ext-authz", decide_timeout_s=30))
    hcm = listener_hcm(doc)
    authz = next(f for f in hcm["httpFilters"] if f["name"] == "envoy.filters.http.ext_authz")
    assert authz["typedConfig"]["httpService"]["serverUri"]["timeout"] == "30s"


def test_a_call_timeout_that_cannot_hold_is_refused():
    from extproc.envoyconfig import cli
    from pickers.framework import ConfigError

    for bad in (0, 0.5, -3, 1e9):
        with pytest.raises(ConfigError, match=r"server\.decide_timeout_s"):
            config_from_dict({"server": {"decide_timeout_s": bad}})
    with pytest.raises(ConfigError, match=r"decide_timeout_s"):
        config_from_dict({"server": {"decide_timeout_s": "long"}})
    assert cli.main(["--picker-protocol", "ext-authz", "--endpoint", "10.0.0.1:8000", "--decide-timeout", "0"]) == 2
