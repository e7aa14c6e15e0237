"""`kvswitch serve` flags for Kubernetes (--pool, TLS, health port) and the image's health check command."""

from __future__ import annotations

import asyncio

import pytest

from e2e.support.picker import LEAST_INFLIGHT, picker_config, running_picker
from e2e.support.ports import free_port
from extproc import healthcheck
from extproc.serve import main as serve_main


@pytest.mark.parametrize("argv,message", [
    (["--namespace", "llm"], "need --pool"),
    (["--pool", "p", "--endpoint", "10.0.0.1:8000"], "not together with discovery.kubernetes"),
    (["--tls-cert", "/x.crt"], "tls_cert and server.tls_key"),
])
def test_bad_flag_combinations_exit_2_with_a_message(argv, message, capsys):
    assert serve_main(argv) == 2
    assert message in capsys.readouterr().err


def test_config_discovery_without_pool_names_the_key(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("discovery: {kubernetes: {namespace: llm}}\n")
    assert serve_main(["--config", str(f)]) == 2
    assert "discovery.kubernetes.pool" in capsys.readouterr().err


async def test_healthcheck_follows_readiness_on_the_health_port():
    port = free_port()
    cfg = picker_config([], LEAST_INFLIGHT, health_port=port)  # no endpoint: alive, not ready
    async with running_picker(cfg):
        assert await asyncio.to_thread(healthcheck.main, [f"127.0.0.1:{port}", "liveness"]) == 0
        assert await asyncio.to_thread(healthcheck.main, [f"127.0.0.1:{port}", "readiness"]) == 1
    assert await asyncio.to_thread(healthcheck.main, [f"127.0.0.1:{port}"]) == 1  # gone
