"""The report from a fabricated results set: table rows, medians with ranges, plots, failures."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from e2e.bench.client import RunResult, parse_exports, percentile
from e2e.bench.report import add_send_times, aggregate, over_time, render
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


def _record(ttft_ms: float, start_ns: int | None) -> dict:
    meta = {} if start_ns is None else {"request_start_ns": start_ns}
    return {"metadata": meta, "metrics": {"request_latency": {"value": ttft_ms + 100.0},
                                          "time_to_first_token": {"value": ttft_ms}}}


def test_each_ttft_keeps_when_its_request_was_sent(tmp_path):
    """sent_s[i] is the send time of the request of ttft_ms[i], seconds after the run's first send (the export
    lists requests as they end, not as they were sent); a failed request has neither. An export without send
    times gives none rather than misaligned ones."""
    recs = [_record(20.0, 3_000_000_000), _record(40.0, 1_000_000_000),
            {"metadata": {"request_start_ns": 500}, "metrics": {}, "error": {"code": 503}},
            _record(30.0, 2_500_000_000)]
    (tmp_path / "profile_export.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    res = parse_exports(tmp_path, "r", 1.0, 0)
    assert res.ttft_ms == [20.0, 40.0, 30.0] and res.sent_s == [2.0, 0.0, 1.5]
    res.to_simulated(2.0)
    assert res.sent_s == [1.0, 0.0, 0.75] and RunResult.from_json(res.to_json()).sent_s == [1.0, 0.0, 0.75]
    (tmp_path / "profile_export.jsonl").write_text(json.dumps(_record(20.0, 10)) + "\n" +
                                                   json.dumps(_record(30.0, None)) + "\n")
    assert parse_exports(tmp_path, "r", 1.0, 0).sent_s == []


def test_the_late_p90_leaves_out_the_cold_start():
    """Twenty requests a second apart, the first ten slow (every cache cold), the last ten 100-109 ms: the run's
    p90 is a cold one; the late p90 is that of the requests sent from the span's midpoint (9.5 s) on."""
    run = RunResult("kvswitch", 1.0, 0, ttft_ms=[1000.0] * 10 + [100.0 + i for i in range(10)],
                    sent_s=[float(i) for i in range(20)])
    assert percentile(run.ttft_ms, 90) == 1000.0
    assert run.late_ttft_p90 == pytest.approx(float(np.percentile([100.0 + i for i in range(10)], 90)))
    assert math.isnan(RunResult("k", 1.0, 0, ttft_ms=[1.0, 2.0]).late_ttft_p90)  # recorded without send times
    assert math.isnan(RunResult("k", 1.0, 0, ttft_ms=[1.0, 2.0], sent_s=[0.0]).late_ttft_p90)  # not aligned


def test_ttft_over_time_pools_the_repetitions_per_window():
    a = RunResult("k", 1.0, 0, ttft_ms=[500.0, 100.0, 100.0, 120.0], sent_s=[0.0, 1.0, 3.0, 4.0])
    b = RunResult("k", 1.0, 1, ttft_ms=[700.0, 110.0], sent_s=[0.5, 3.5])
    x, p90 = over_time([a, b, RunResult("k", 1.0, 2, ttft_ms=[9999.0])], windows=2)
    assert list(x) == [1.0, 3.0]
    assert p90[0] == pytest.approx(float(np.percentile([500.0, 700.0, 100.0], 90)))
    assert p90[1] == pytest.approx(float(np.percentile([100.0, 110.0, 120.0], 90)))  # the run without: left out
    x, p90 = over_time([a], windows=8)
    assert x.size == 8 and np.isnan(p90).sum() == 4  # windows no request was sent in: no figure
    assert over_time([RunResult("k", 1.0, 0, ttft_ms=[1.0])])[0].size == 0


def test_send_times_are_added_to_runs_recorded_without_them_from_their_own_exports(tmp_path):
    """A set recorded before send times were kept gets them from each run's aiperf export under raw/ (wall
    samples at the run's time scale), only where the export's TTFTs are the stored ones; the column and the
    TTFT-over-time plot follow."""
    path = _results(tmp_path, reps=1)
    doc = json.loads(path.read_text())
    kv = next(r for r in doc["runs"] if r["router"] == "kvswitch" and r["rate"] == 2.0)
    rr = next(r for r in doc["runs"] if r["router"] == "envoy-rr" and r["rate"] == 2.0)
    for r in doc["runs"]:
        r["time_scale"] = 0.5
    path.write_text(json.dumps(doc))
    for run, shift in ((kv, 0.0), (rr, 1.0)):  # envoy-rr's export is another run's: its TTFTs differ
        art = tmp_path / "raw" / f"{run['router']}-r2-rep0" / "aiperf"
        art.mkdir(parents=True)
        # the export in the order requests ended: the slow one (stored last) was the first sent
        recs = [_record(t * 0.5 + shift, 10**9 + (9 - i) * 250_000_000) for i, t in enumerate(run["ttft_ms"])]
        (art / "profile_export.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert "ttft_time_r2.png" not in render(path).read_text()
    assert add_send_times(path) == 1
    runs = {(r["router"], r["rate"]): r for r in json.loads(path.read_text())["runs"]}
    assert runs[("kvswitch", 2.0)]["sent_s"] == pytest.approx([(9 - i) * 0.5 for i in range(10)])  # 0.25 s / 0.5
    assert not runs[("envoy-rr", 2.0)].get("sent_s") and not runs[("kvswitch", 4.0)].get("sent_s")
    assert add_send_times(path) == 0  # nothing left to add
    readme = render(path).read_text()
    assert "](ttft_time_r2.png)" in readme and "ttft_time_r4.png" not in readme
    assert (tmp_path / "ttft_time_r2.png").stat().st_size > 1000
    row = next(line for line in readme.splitlines() if line.startswith("| kvswitch | 2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]  # router, rate, req/s, tok/s, TTFT p50, p90, p99, late
    assert (cells[5], cells[7]) == ("38", "20")  # the run's one slow request (200 ms) was its first sent


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
