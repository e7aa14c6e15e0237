"""Generated Envoy bootstraps: every variant passes `envoy --mode validate`; examples in envoy/ are current."""

from __future__ import annotations

import subprocess

import pytest

from e2e.support.envoy import envoy_binary
from extproc.envoyconfig import cli
from extproc.envoyconfig.builder import EnvoyConfigOptions, listener_hcm, render, to_dict
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
    doc = to_dict(EnvoyConfigOptions(endpoints=["10.0.0.1:8000"]))  # the default: access-log
    hcm = listener_hcm(doc)
    ext = hcm["httpFilters"][0]["typedConfig"]
    assert ext["processingMode"] == {  # nothing of the response: Envoy ends the stream once routed
        "requestHeaderMode": "SEND", "responseHeaderMode": "SKIP",
        "requestBodyMode": "FULL_DUPLEX_STREAMED",
        "requestTrailerMode": "SEND", "responseTrailerMode": "SKIP",
    }
    # the outcome comes back through the Lua observer and one gRPC access logger to the picker (batched)
    assert [f["name"] for f in hcm["httpFilters"]] == ["envoy.filters.http.ext_proc", "kvswitch.response_observer",
                                                        "envoy.filters.http.router"]
    (logger,) = hcm["accessLog"]
    common = logger["typedConfig"]["commonConfig"]
    assert common["grpcService"]["envoyGrpc"]["clusterName"] == "kvswitch_picker"
    assert common["bufferSizeBytes"] == 16 * 1024 and common["transportApiVersion"] == "V3"
    observe = to_dict(EnvoyConfigOptions(endpoints=["10.0.0.1:8000"], response_body="observe"))
    ohcm = listener_hcm(observe)
    assert ohcm["httpFilters"][0]["typedConfig"]["processingMode"] == {
        "requestHeaderMode": "SEND", "responseHeaderMode": "SEND",
        "requestBodyMode": "FULL_DUPLEX_STREAMED", "responseBodyMode": "FULL_DUPLEX_STREAMED",
        "requestTrailerMode": "SEND", "responseTrailerMode": "SEND",
    }
    assert "accessLog" not in ohcm and len(ohcm["httpFilters"]) == 2
    assert ext["messageTimeout"] == "1000s" and "failureModeAllow" not in ext
    assert ext["metadataOptions"]["receivingNamespaces"]["untyped"] == ["envoy.lb", "kvswitch.debug"]
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


def test_access_log_goes_to_every_listed_replica_and_to_the_service_otherwise():
    """Each replica must get the entries of the requests it routed: with fixed addresses one logger (and one
    cluster) per replica; behind one DNS name a single logger to the picker cluster."""
    doc = to_dict(EnvoyConfigOptions(endpoints=["10.0.0.1:8000"], picker="10.1.1.1:9002",
                                     pickers=["10.1.1.2:9002", "10.1.1.3:9002"]))
    hcm = listener_hcm(doc)
    targets = [a["typedConfig"]["commonConfig"]["grpcService"]["envoyGrpc"]["clusterName"] for a in hcm["accessLog"]]
    clusters = {c["name"]: c for c in doc["staticResources"]["clusters"]}
    assert targets == ["kvswitch_picker_log_0", "kvswitch_picker_log_1", "kvswitch_picker_log_2"]
    hosts = [clusters[t]["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]["socketAddress"]
             ["address"] for t in targets]
    assert hosts == ["10.1.1.1", "10.1.1.2", "10.1.1.3"]
    dns = to_dict(EnvoyConfigOptions(endpoints=["10.0.0.1:8000"], picker="kvswitch-picker.ns.svc:9002"))
    dhcm = listener_hcm(dns)
    assert [a["typedConfig"]["commonConfig"]["grpcService"]["envoyGrpc"]["clusterName"]
            for a in dhcm["accessLog"]] == ["kvswitch_picker"]


@pytest.mark.envoy
def test_access_log_is_batched_by_default_and_unbatched_when_asked(tmp_path):
    """Batched by default (entries leave in one message per 16 KiB or 10 ms); --access-log-flush-ms N sets the
    interval, 0 sends each entry as its request ends, and the results are configs Envoy accepts; a negative
    interval is refused."""
    def common(opts):
        hcm = listener_hcm(to_dict(opts))
        return [a["typedConfig"]["commonConfig"] for a in hcm["accessLog"]]

    base = dict(endpoints=["10.0.0.1:8000"])
    (c,) = common(EnvoyConfigOptions(**base))
    assert c["bufferSizeBytes"] == 16 * 1024 and c["bufferFlushInterval"] == "0.010s"
    (c,) = common(EnvoyConfigOptions(**base, access_log_flush_ms=0))
    assert c.get("bufferSizeBytes", 0) == 0
    (c,) = common(EnvoyConfigOptions(**base, access_log_flush_ms=20))
    assert c["bufferSizeBytes"] == 16 * 1024 and c["bufferFlushInterval"] == "0.020s"
    with pytest.raises(ValueError, match="access_log_flush_ms"):
        to_dict(EnvoyConfigOptions(**base, access_log_flush_ms=-1))
    out = tmp_path / "e.yaml"
    assert cli.main(["--endpoint", "10.0.0.1:8000", "--access-log-flush-ms", "50", "--out", str(out)]) == 0
    assert "0.050s" in out.read_text()
    r = _validate(out)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("opts", [
    EnvoyConfigOptions(endpoints=["10.0.0.1:8000"]),
    EnvoyConfigOptions(endpoints=["10.0.0.1:8000"], lb="original-dst"),
    EnvoyConfigOptions(endpoints=["10.0.0.1:8000"], picker_protocol="ext-authz", picker_decide=["10.1.1.1:9003"]),
], ids=["override-host", "original-dst", "ext-authz"])
def test_no_cluster_keeps_envoys_default_circuit_breakers(opts):
    """Envoy's per-cluster defaults (1,024 connections, requests and pending; 3 retries at once) would cap the
    fleet's requests in flight and the decisions flow control holds (e2e/test_envoy_hardening.py and
    test_envoy_authz.py measure both through the real Envoy). The pool's retries get a budget; each picker
    replica takes as many decide connections as its HTTP/1.1 front accepts."""
    from extproc.http1 import MAX_CONNECTIONS

    clusters = {c["name"]: c for c in to_dict(opts)["staticResources"]["clusters"]}
    for name, cluster in clusters.items():
        (limits,) = cluster["circuitBreakers"]["thresholds"]
        assert limits["maxConnections"] >= 100_000 and limits["maxRequests"] >= 100_000, name
        assert limits["maxPendingRequests"] >= 100_000, name
        if name == "inference_pool":
            assert "maxRetries" not in limits  # the budget decides: a fifth of what is active, at least 64
            assert limits["retryBudget"] == {"budgetPercent": {"value": 20.0}, "minRetryConcurrency": 64}
        else:
            assert limits["maxRetries"] >= 100_000, name
            assert cluster["circuitBreakers"]["perHostThresholds"] == [{"maxConnections": MAX_CONNECTIONS}]
    assert ("kvswitch_picker_decide" in clusters) == (opts.picker_protocol == "ext-authz")
