"""A tiny real comparison: sim fleet, Envoy (alone and with kvswitch), a Rust peer, aiperf, the report."""

from __future__ import annotations

import json

import pytest

from e2e.bench.report import render
from e2e.bench.runner import Comparison, config_from_preset

pytestmark = [pytest.mark.slow, pytest.mark.envoy, pytest.mark.timeout(240)]


def test_tiny_comparison_every_router_serves(tmp_path, peers):
    routers = ["envoy-rr", "vllm-router:cache_aware", "kvswitch"]
    cfg = config_from_preset("tiny", routers=routers, out=tmp_path, cache_dir=tmp_path / "cache")
    lines: list[str] = []
    comparison = Comparison(cfg, log=lines.append)
    results = comparison.run()
    assert comparison.failures == [], comparison.failures
    assert len(lines) == 3 and all("ETA" in line for line in lines)
    doc = json.loads(results.read_text())
    assert {r["router"] for r in doc["runs"]} == set(routers)
    for run in doc["runs"]:
        assert run["errors"] == 0, run
        assert len(run["e2e_ms"]) == cfg.workload_params["num_requests"], run["router"]
        assert all(t > 0 for t in run["ttft_ms"])
        assert 0.0 < run["hit_rate"] < 1.0  # two groups share a prefix: some hits, never all
    readme = render(results, with_plots=False).read_text()
    for router in routers:
        assert f"| {router} | 10 |" in readme
    assert "aiperf 0.13.0" in readme and "envoy" in readme


def test_tiny_pd_comparison_runs_kvswitch_through_its_sidecars_and_splits_only_where_it_pays(tmp_path, peers):
    routers = ["kvswitch", "vllm-router:round_robin"]
    cfg = config_from_preset("tiny", routers=routers, out=tmp_path, cache_dir=tmp_path / "cache",
                             roles=["prefill", "decode"], pods=2)
    cfg.workload_params = {**cfg.workload_params, "num_requests": 10, "prefix_tokens": 3072}
    comparison = Comparison(cfg, log=lambda line: None)
    doc = json.loads(comparison.run().read_text())
    assert comparison.failures == [], comparison.failures
    runs = {r["router"]: r for r in doc["runs"]}
    assert set(runs) == set(routers)
    for run in runs.values():  # kvswitch's requests all went through the decode pod's sidecar
        assert run["errors"] == 0 and len(run["e2e_ms"]) == 10, run["router"]
    # vllm-router sends every request's prefill to the prefill pod (pod 0); kvswitch's default decider takes
    # a leg only when the pair's predicted TTFT beats a local prefill, which an idle pair never does here
    assert runs["vllm-router:round_robin"]["pod_query_tokens"][0] > 0
    assert runs["kvswitch"]["pod_query_tokens"][0] < runs["vllm-router:round_robin"]["pod_query_tokens"][0]
    assert runs["kvswitch"]["pod_query_tokens"][1] > 0  # prefilled on the decode pod instead
