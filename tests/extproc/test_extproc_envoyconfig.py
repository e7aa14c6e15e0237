"""Generated Envoy bootstraps: every variant passes `envoy --mode validate`; examples in envoy/ are current."""

from __future__ import annotations

import subprocess

import pytest

from e2e.support.envoy import envoy_binary
from extproc.envoyconfig import cli
from extproc.envoyconfig.builder import EnvoyConfigOptions, render, to_dict
from extproc.envoyconfig.examples import ENVOY_DIR, rendered


def _validate(path) -> subprocess.CompletedProcess:
    return subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.envoy
@pytest.mark.parametrize("lb", ["override-host", "original-dst"])
@pytest.mark.parametrize("fail_open", [True, False])
@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_every_variant_validates(tmp_path, lb, fail_open, fmt):
    if envoy_binary() is None:
        pytest.skip("no envoy binary")
    opts = EnvoyConfigOptions(lb=lb, fail_open=fail_open, endpoints=["10.0.0.1:8000", "10.0.0.2:8000"])
    if lb == "original-dst" and fail_open:  # refused: a request passing a dead picker would go where it says
        with pytest.raises(ValueError, match="original-dst"):
            render(opts, fmt)
        return
    path = tmp_path / f"envoy.{fmt}"
    path.write_text(render(opts, fmt))
    r = _validate(path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cli_writes_config_with_chosen_options(tmp_path):
    out = tmp_path / "e.yaml"
    assert cli.main(["--listen-port", "18081", "--picker", "10.1.1.1:9002", "--fail-open", "--endpoint",
                     "10.0.0.1:8000", "--admin-port", "19901", "--out", str(out)]) == 0
    text = out.read_text()
    assert "portValue: 18081" in text and "10.1.1.1" in text and "failureModeAllow: true" in text
    assert cli.main(["--lb", "override-host"]) == 2  # the override-host cluster needs the pool


def test_ext_proc_filter_contract():
    doc = to_dict(EnvoyConfigOptions(endpoints=["10.0.0.1:8000"]))
    hcm = doc["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]
    ext = hcm["httpFilters"][0]["typedConfig"]
    assert ext["processingMode"] == {
        "requestHeaderMode": "SEND", "responseHeaderMode": "SEND",
        "requestBodyMode": "FULL_DUPLEX_STREAMED", "responseBodyMode": "FULL_DUPLEX_STREAMED",
        "requestTrailerMode": "SEND", "responseTrailerMode": "SEND",
    }
    assert ext["messageTimeout"] == "1000s" and "failureModeAllow" not in ext
    assert ext["metadataOptions"]["receivingNamespaces"]["untyped"] == ["envoy.lb"]
    assert "envoy.lb" in ext["metadataOptions"]["forwardingNamespaces"]["untyped"]
    pool = doc["staticResources"]["clusters"][0]
    lb = pool["loadBalancingPolicy"]["policies"][0]["typedExtensionConfig"]
    assert lb["name"] == "envoy.load_balancing_policies.override_host"
    assert lb["typedConfig"]["selectedHostKey"]["path"] == [{"key": "x-gateway-destination-endpoint-served"}]
    picker = doc["staticResources"]["clusters"][1]
    assert picker["healthChecks"][0]["grpcHealthCheck"]["serviceName"] == "envoy.service.ext_proc.v3.ExternalProcessor"


def test_checked_in_examples_are_up_to_date():
    for name, text in rendered().items():
        path = ENVOY_DIR / name
        assert path.exists(), f"envoy/{name} missing: run python -m extproc.envoyconfig.examples"
        assert path.read_text() == text, f"envoy/{name} is stale: run python -m extproc.envoyconfig.examples"
