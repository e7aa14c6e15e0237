"""TLS between the gateway and the picker, through real Envoy: `kvswitch serve --tls-self-signed` (Envoy encrypts
without verifying, as gateways do with GIE's self-signed picker), `--tls-cert/--tls-key` verified against a CA
(`kvswitch envoy-config --picker-tls-ca`), a wrong CA refused; the plaintext health port answers kubelet-style
probes meanwhile."""

from __future__ import annotations

import aiohttp
import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from e2e.support.envoy import EnvoyProcess
from e2e.support.picker import LEAST_INFLIGHT, picker_config, running_picker
from e2e.support.ports import free_port
from extproc.envoyconfig.builder import EnvoyConfigOptions

pytestmark = pytest.mark.envoy
BODY = {"model": "llama-3.1-8b", "prompt": "hello over tls", "max_tokens": 2}


async def _post(url: str) -> tuple[int, str | None]:
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/completions", json=BODY) as r:
        await r.read()
        return r.status, r.headers.get("x-kvswitch-endpoint")


async def _plaintext_health(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=2)
        return r.status


async def test_self_signed_picker_through_envoy(sim_pods):
    cfg = picker_config(sim_pods, LEAST_INFLIGHT, debug_headers=True, tls_self_signed=True,
                        health_port=free_port())
    async with running_picker(cfg) as picker:
        assert picker.transport == "tls-self-signed"
        # a plaintext client cannot talk to the TLS port; the health port stays plaintext for kubelet
        async with grpc.aio.insecure_channel(picker.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert await _plaintext_health(cfg.server.health_port) == health_pb2.HealthCheckResponse.SERVING
        opts = EnvoyConfigOptions(picker=picker.address, endpoints=sim_pods, picker_tls=True)
        async with EnvoyProcess(opts) as envoy:
            for _ in range(4):
                status, served = await _post(envoy.url)
                assert status == 200 and served in sim_pods


async def test_verified_certificate_and_a_wrong_ca(sim_pods, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("kvswitch.llm.svc", "127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "tls.crt")
    for blob in cert.cert_chain_pems[1:]:
        blob.write_to_path(tmp_path / "tls.crt", append=True)
    cert.private_key_pem.write_to_path(tmp_path / "tls.key")
    ca.cert_pem.write_to_path(tmp_path / "ca.crt")
    trustme.CA().cert_pem.write_to_path(tmp_path / "other-ca.crt")
    cfg = picker_config(sim_pods, LEAST_INFLIGHT, debug_headers=True, tls_cert=str(tmp_path / "tls.crt"),
                        tls_key=str(tmp_path / "tls.key"))
    async with running_picker(cfg) as picker:
        assert picker.transport == "tls"
        good = EnvoyConfigOptions(picker=picker.address, endpoints=sim_pods, picker_tls=True,
                                  picker_tls_ca=str(tmp_path / "ca.crt"), picker_tls_sni="kvswitch.llm.svc")
        async with EnvoyProcess(good) as envoy:
            status, served = await _post(envoy.url)
            assert status == 200 and served in sim_pods
        bad = EnvoyConfigOptions(picker=picker.address, endpoints=sim_pods, picker_tls=True,
                                 picker_tls_ca=str(tmp_path / "other-ca.crt"), picker_tls_sni="kvswitch.llm.svc")
        envoy = EnvoyProcess(bad)
        try:
            with pytest.raises(TimeoutError):  # Envoy never sees the picker healthy: the handshake fails
                await envoy.start(timeout=4.0)
            status, served = await _post(envoy.url)
            assert status >= 500 and served is None  # fail-closed: nothing reached a pod
        finally:
            await envoy.stop()


def test_config_rejects_half_a_pair():
    from extproc.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="tls_cert and server.tls_key"):
        config_from_dict({"server": {"tls_cert": "/x.crt"}})
    with pytest.raises(ConfigError, match="tls_self_signed"):
        config_from_dict({"server": {"tls_cert": "/x.crt", "tls_key": "/x.key", "tls_self_signed": True}})
