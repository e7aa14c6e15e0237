"""The report from a fabricated results set: table rows, medians with ranges, plots, failures."""

from __future__ import annotations

import json
import math
import re

import pytest

from e2e.bench.client import RunResult, parse_exports
from e2e.bench.report import aggregate, render
from e2e.bench.runner import engine_ttft_ms


def _run(router: str, rate: float, rep: int, ttft: float, hit: float) -> RunResult:
    return RunResult(router=router, rate=rate, repetition=rep, ttft_ms=[ttft] * 9 + [ttft * 10],
                     itl_ms=[5.0] * 10, e2e_ms=[ttft + 500] * 10, output_tokens=[100] * 10, requests_sent=10,
                     duration_s=5.0, request_throughput=2.0 + rep, output_tok_s=200.0 + 10 * rep, hit_rate=hit)


def _results(tmp_path, reps=3):
    runs = [_run(router, rate, rep, ttft=base * rate + rep, hit=h)
            for rep in range(reps) for rate in (2.0, 4.0)
            for router, base, h in (("kvswitch", 10.0, 0.8), ("envoy-rr", 50.0, 0.3))]
    meta = {"date": "2026-01-01T00:00:00", "workload": "shared-prefix", "workload_params": {"groups": 4},
            "workload_stats": {"requests": 10, "mean_input": 4352, "mean_output": 100,
                               "reusable_block_share": 0.7},
            "routers": ["kvswitch", "envoy-rr", "vllm-router:kv_aware"], "rates": [2.0, 4.0], "pods": 4,
            "time_scale": 0.5, "repetitions": reps, "seed": 0, "model_profile": "llama-3.1-8b",
            "accelerator": "H100", "machine": {"cpus": 2, "cpu_model": "Test CPU"},
            "versions": {"vllm-router": "0.1.17", "sglang-router": "0.3.2", "aiperf": "0.13.0", "envoy": "1.40.0"}}
    failures = [{"router": "vllm-router:kv_aware", "rate": 2.0, "repetition": 0, "error": "boom\nmore"}]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"meta": meta, "runs": [r.to_json() for r in runs], "failures": failures}))
    return path


def test_aggregate_median_min_max(tmp_path):
    runs = [_run("a", 1.0, rep, ttft=10.0 + rep, hit=0.5) for rep in range(3)]
    cell = aggregate(runs)[("a", 1.0)]
    assert cell["req_s"] == (3.0, 2.0, 4.0)
    assert cell["ttft_p50"] == (11.0, 10.0, 12.0)
    assert cell["n"][0] == 3


def test_report_structure(tmp_path):
    readme = render(_results(tmp_path)).read_text()
    for text in ("## Setup", "## Results", "## Plots", "## Failed runs", "Test CPU", "time scale 0.5",
                 "vllm-router 0.1.17", "sglang-router 0.3.2", "aiperf 0.13.0", "envoy 1.40.0"):
        assert text in readme, text
    rows = [line for line in readme.splitlines() if line.startswith("| ") and not line.startswith("| router")]
    assert len(rows) == 6  # 3 routers x 2 rates, the failed one marked
    assert sum("(failed)" in r for r in rows) == 2
    kv2 = next(r for r in rows if r.startswith("| kvswitch | 2 |"))
    cells = [c.strip() for c in kv2.strip("|").split("|")]
    assert cells[2] == "3.00 [2.00-4.00]"  # req/s: median [min-max] over 3 repetitions
    assert cells[-1] == "80%"
    assert cells[4] == "21 [20-22]"  # TTFT p90 within each run is the base value (9 of 10 samples)
    for name in ("throughput.png", "ttft_p90.png", "ttft_cdf_r2.png", "ttft_cdf_r4.png"):
        assert (tmp_path / name).stat().st_size > 1000
        assert f"]({name})" in readme


def test_single_repetition_has_no_ranges(tmp_path):
    readme = render(_results(tmp_path, reps=1), with_plots=False).read_text()
    assert not re.search(r"\[\d", readme.split("## Results")[1])
    assert "## Plots" not in readme


def test_parse_aiperf_exports(tmp_path):
    recs = [
        {"metadata": {}, "metrics": {"request_latency": {"value": 100.0}, "time_to_first_token": {"value": 20.0},
                                     "inter_token_latency": {"value": 4.0}, "output_sequence_length": {"value": 21},
                                     "usage_prompt_tokens": {"value": 4608},
                                     "usage_prompt_cache_read_tokens": {"value": 4096}}},
        {"metadata": {}, "metrics": {}, "error": {"code": 503, "type": "ServiceUnavailable", "message": "x"}},
        {"metadata": {}, "metrics": {"request_latency": {"value": 300.0}, "time_to_first_token": {"value": 40.0},
                                     "output_sequence_length": {"value": 1}}},
    ]
    (tmp_path / "profile_export.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (tmp_path / "profile_export_aiperf.json").write_text(json.dumps({
        "benchmark_duration": {"avg": 2.0}, "request_throughput": {"avg": 1.0},
        "output_token_throughput": {"avg": 11.0}}))
    res = parse_exports(tmp_path, "r", 1.0, 0)
    assert res.ok == 2 and res.errors == 1 and res.requests_sent == 3
    assert res.error_kinds == {"ServiceUnavailable": 1}
    assert res.ttft_ms == [20.0, 40.0] and res.itl_ms == [4.0] and res.e2e_ms == [100.0, 300.0]
    assert res.request_throughput == 1.0 and res.output_tok_s == 11.0
    assert res.input_tokens == [4608, 0] and res.cached_tokens == [4096, 0]  # usage absent: 0


def test_to_simulated_converts_wall_samples_by_the_time_scale():
    run = _run("kvswitch", 4.0, 0, ttft=100.0, hit=0.5)
    run.to_simulated(2.0)
    assert run.ttft_ms[0] == 50.0 and run.itl_ms[0] == 2.5 and run.e2e_ms[0] == 300.0
    assert run.request_throughput == 4.0 and run.output_tok_s == 400.0 and run.duration_s == 2.5
    assert RunResult.from_json(run.to_json()).time_scale == 2.0


def test_the_pods_ttft_leaves_out_the_prompts_the_router_sent_itself():
    """300 client requests of 100 ms at the pods and 20 warm-up pieces of 50 ms (the picker timed them in wall
    seconds, 0.1 s each at time scale 2): the pods' histogram averages 96.9 ms over all 320; the client's own
    requests averaged 100."""
    before, after = (10.0, 100.0), (10.0 + 30.0 + 20 * 0.05, 100.0 + 320)
    assert engine_ttft_ms(before, after, (0.0, 0.0), (0.0, 0.0), 2.0) == pytest.approx(1000 * 31 / 320)
    assert engine_ttft_ms(before, after, (5.0, 7.0), (5.0 + 20 * 0.1, 27.0), 2.0) == pytest.approx(100.0)
    assert engine_ttft_ms(before, before, (0.0, 0.0), (0.0, 0.0), 1.0) is None  # nothing counted: unknown


def test_a_router_reads_its_own_prefills_off_its_metrics(tmp_path):
    """kvswitch's warm-up pieces from its kvswitch_warmup_piece_seconds (served as Prometheus text); routers that
    send the pods nothing of their own report (0, 0)."""
    from prometheus_client import CollectorRegistry, Histogram, start_http_server

    from e2e.bench.routers import make_router
    from e2e.support.ports import free_port

    reg = CollectorRegistry()
    h = Histogram("kvswitch_warmup_piece_seconds", "pieces", registry=reg)
    for t in (0.25, 0.5):
        h.observe(t)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=reg)
    try:
        kv = make_router("kvswitch", tmp_path)
        assert kv.own_prefills() == (0.0, 0.0)  # not launched: nothing sent
        kv.metrics_url = f"http://127.0.0.1:{port}/metrics"
        assert kv.own_prefills() == (0.75, 2.0)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert make_router("sglang-router:cache_aware", tmp_path).own_prefills() == (0.0, 0.0)


def test_path_is_client_ttft_minus_pod_ttft_and_shows_in_the_table(tmp_path):
    run = _run("kvswitch", 4.0, 0, ttft=10.0, hit=0.5)  # client mean TTFT (9 x 10 + 100) / 10 = 19 ms
    assert math.isnan(run.path_ms)  # no pod TTFT scraped: unknown, not zero
    run.engine_ttft_ms = 15.0
    assert run.path_ms == 4.0
    meta = {"routers": ["kvswitch"], "rates": [4.0], "repetitions": 1}
    (tmp_path / "results.json").write_text(json.dumps({"meta": meta, "runs": [run.to_json()], "failures": []}))
    row = next(line for line in render(tmp_path / "results.json", with_plots=False).read_text().splitlines()
               if line.startswith("| kvswitch | 4 |"))
    assert "| 19 | 15 | 4.0 |" in row


def test_cold_prompts_count_requests_with_less_than_half_cached():
    run = _run("kvswitch", 4.0, 0, ttft=10.0, hit=0.5)
    assert math.isnan(run.cold_prompts)  # no usage parsed: unknown
    run.input_tokens, run.cached_tokens = [4608, 4608, 4608, 100], [4096, 0, 2000, 0]
    assert run.cold_prompts == 3.0
