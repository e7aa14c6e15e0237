"""The real-time curve harness (`kvswitch bench curves`): its sizing, its traces and its verdicts.

The runs themselves go through Envoy and the real peers (tests/bench/test_bench_e2e.py covers that chain);
here: the plan stays within the wall rates and the budget, a curve run replays the virtual-time curves'
traces at the asked rate, and the summary's verdict applies the issue's bar.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest

from e2e.bench import bar, rtcurve, vcurve
from e2e.bench.runner import CompareConfig, build_workload


def test_time_scale_keeps_the_wall_request_and_token_rates_under_their_caps_at_every_load():
    b = rtcurve.Budget(max_wall_rate=16.0, max_wall_tokens=1200.0, min_time_scale=0.5)
    for knee, out in ((17.34, 128.0), (2.96, 182.0), (11.5, 196.0), (100.0, 10.0)):
        scales = [rtcurve.time_scale_for(knee, out, load, b) for load in rtcurve.LOADS]
        assert scales == sorted(scales)  # a heavier load never runs faster
        for load, ts in zip(rtcurve.LOADS, scales):
            assert ts >= 0.5
            assert load * knee / ts <= 16.0  # offered wall req/s
            assert min(load, rtcurve.PEAK_COMPLETION) * knee * out / ts <= 1200.0  # streamed wall tokens/s
    # the light loads run faster than the heaviest (the point of a scale per load), within the same caps
    assert rtcurve.time_scale_for(17.34, 128.0, 0.5, b) < 0.5 * rtcurve.time_scale_for(17.34, 128.0, 3.0, b)
    assert rtcurve.time_scale_for(0.1, 10.0, 3.0, b) == 0.5  # a slow workload is not slowed further


def test_each_rate_runs_at_its_own_time_scale():
    cfg = CompareConfig(rates=[5.0, 20.0], time_scale=2.0, time_scales=[0.6, 2.0])
    assert (cfg.scale_for(5.0), cfg.scale_for(20.0)) == (0.6, 2.0)
    assert CompareConfig(rates=[5.0, 20.0], time_scale=1.5).scale_for(5.0) == 1.5  # one scale for all


@pytest.mark.slow
def test_the_plan_fits_the_budget_and_grows_with_it():
    routers, loads = rtcurve.ROUTERS, rtcurve.LOADS
    small = rtcurve.plan(["shared-prefix"], routers, loads, 3, rtcurve.Budget(minutes=30.0), log=lambda _: None)
    large = rtcurve.plan(["shared-prefix"], routers, loads, 3, rtcurve.Budget(minutes=60.0), log=lambda _: None)
    assert small[0].knee_req_s == pytest.approx(vcurve.knee("shared-prefix", rtcurve.KNEE_REQUESTS))
    assert small[0].rates == [round(x * small[0].knee_req_s, 3) for x in loads]
    assert len(small[0].time_scales) == len(loads) and small[0].time_scales == sorted(small[0].time_scales)
    assert small[0].est_wall_s <= 30.0 * 60.0 * 1.05
    assert large[0].requests > small[0].requests
    assert large[0].est_wall_s <= 60.0 * 60.0 * 1.05


def test_a_curve_run_replays_the_virtual_time_trace_at_the_asked_rate():
    cfg = CompareConfig(workload="mooncake", curve_requests=40, seed=0)
    reference = vcurve.WORKLOADS["mooncake"].make(1, 40)  # repetition 1 = seed 1: the second window
    wl = build_workload(cfg, 3.0, 1)
    assert [r.hash_ids for r in wl.records] == [r.hash_ids for r in reference.records]
    assert vcurve.mean_rate(wl) == pytest.approx(3.0, rel=0.02)
    other = build_workload(cfg, 3.0, 0)
    assert [r.hash_ids for r in other.records] != [r.hash_ids for r in wl.records]
    # multi-turn: the rate is requests/s (the generator's own rate would be conversations/s)
    mt = build_workload(CompareConfig(workload="multi-turn", curve_requests=50), 10.0, 0)
    assert vcurve.mean_rate(mt) == pytest.approx(10.0, rel=0.02)


def test_the_verdict_applies_the_issues_bar():
    def m(req_s: float, p90: float, p99: float) -> dict[str, float]:
        return {"req_s": req_s, "p90": p90, "p99": p99}

    med = {("w", 1.0, "kvswitch"): m(10.0, 100.0, 200.0), ("w", 1.0, "envoy-rr"): m(9.9, 120.0, 190.0),
           ("w", 1.0, "sglang-router:cache_aware"): m(9.0, 100.0, 185.0)}
    assert rtcurve.verdict(med, "w", 1.0) == "met"  # p99 200 <= 1.1 x 185
    med[("w", 1.0, "envoy-rr")] = m(10.5, 90.0, 150.0)
    v = rtcurve.verdict(med, "w", 1.0)
    assert "req/s 10.000 < 10.500" in v and "p90 100 > 90 ms" in v and "p99 200 > 1.1 x 150 ms" in v
    assert rtcurve.verdict(med, "w", 2.0) == "(incomplete)"


def test_a_rerun_on_an_earlier_sets_plan_is_judged_against_that_sets_other_routers(tmp_path, capsys):
    """``--plan-from``: the committed set's own plans (knees, rates, time scales, requests), and the verdict of
    the new kvswitch rows against that set's peers, its own old kvswitch row left out."""
    base = rtcurve.RESULTS_DIR / "2026-12-02-curves-1000"
    plans, loads = rtcurve.plans_of(base, ["mooncake", "shared-prefix"])
    assert [p.workload for p in plans] == ["shared-prefix", "mooncake"] and loads == [0.5, 1.0, 2.0, 3.0]
    assert plans[1].knee_req_s == pytest.approx(2.959, abs=1e-3) and len(plans[1].time_scales) == 4
    with pytest.raises(ValueError, match="no plan for nope"):
        rtcurve.plans_of(base, ["mooncake", "nope"])
    old, _ = rtcurve.plans_of(rtcurve.RESULTS_DIR / "2026-12-02-curves", ["shared-prefix"])  # one time scale
    assert len(old[0].time_scales) == len(old[0].rates) > 1 and len(set(old[0].time_scales)) == 1
    assert rtcurve.main(["--plan-from", str(tmp_path), "--routers", "kvswitch"]) == 2
    assert f"--plan-from {tmp_path}" in capsys.readouterr().err

    def m(req_s: float) -> dict[str, float]:
        return {"req_s": req_s, "p90": 100.0, "p99": 200.0}

    old = {("w", 1.0, "kvswitch"): m(12.0), ("w", 1.0, "envoy-rr"): m(10.5), ("w", 2.0, "envoy-rr"): m(1.0)}
    new = {("w", 1.0, "kvswitch"): m(10.0)}
    both = rtcurve._beside(old, new, "w", 1.0)
    assert both == {("w", 1.0, "kvswitch"): m(10.0), ("w", 1.0, "envoy-rr"): m(10.5)}
    assert rtcurve.verdict(both, "w", 1.0) == "req/s 10.000 < 10.500"


def test_a_set_of_other_run_lengths_or_time_scales_is_not_judged_against_its_base(tmp_path):
    """Other requests per run are other traces, another time scale another load on the CPUs: the 240-request
    sets at time scale 4 were judged against the base's 48-request runs at 1.89 (and 'missed' by that)."""
    base_plan = {"requests": 64, "rates": [1.0, 2.0], "time_scales": [0.5, 0.65]}
    assert rtcurve.runs_differ(base_plan, {"requests": 64, "rates": [2.0], "time_scales": [0.65]}) is None
    assert rtcurve.runs_differ(base_plan, {"requests": 240, "rates": [2.0], "time_scales": [0.65]}) == (
        "64 requests per run there, 240 here")
    assert rtcurve.runs_differ(base_plan, {"requests": 64, "rates": [2.0], "time_scales": [4.0]}) == (
        "time scale 0.65 there at 2 req/s, 4 here")
    committed = rtcurve.RESULTS_DIR / "2026-12-05-curves-no-sharing-1x-240-ts4"
    out = tmp_path / "set"
    shutil.copytree(committed, out)
    text = rtcurve.render_summary(out, plots=False).read_text()
    assert "Not judged against e2e/bench/results/2026-12-02-curves-1000's other routers: 48 requests per run " \
           "there, 240 here." in text
    assert "this set's kvswitch against" not in text
    assert "| 1x | req/s 5.067 < 5.163; p90 370 > 340 ms |" in text  # its own peers still judge it


def test_every_run_gets_its_virtual_time_twin_on_the_same_trace(tmp_path):
    """``twins``: each (workload, rate, router) of a set replayed through the router's emulation, one run per
    repetition on that repetition's trace, medians stored in curves.json and set beside the real medians."""
    import json

    plan = {"workload": "mooncake", "knee_req_s": 2.0, "rates": [1.0, 4.0], "time_scales": [0.5, 0.5],
            "time_scale": 0.5, "requests": 20, "est_wall_s": 1.0}
    meta = {"plans": [plan], "routers": ["envoy-rr", "not-a-router"], "repetitions": 2}
    (tmp_path / "curves.json").write_text(json.dumps({"meta": meta, "workloads": {"mooncake": "x"}}))
    lines: list[str] = []
    rtcurve.twins(tmp_path, log=lines.append)
    rows = json.loads((tmp_path / "curves.json").read_text())["twins"]
    assert [(r["load"], r["router"], r["twin"]) for r in rows] == [(0.5, "envoy-rr", "envoy:round_robin"),
                                                                  (2.0, "envoy-rr", "envoy:round_robin")]
    runs = [vcurve.run_point("mooncake", "envoy:round_robin", rep, 4.0, 20, as_aiperf_sends=True) for rep in (0, 1)]
    assert rows[1]["req_s"] == pytest.approx(sum(r["throughput_req_s"] for r in runs) / 2)  # median of two
    assert lines and lines[0].startswith("twins: mooncake")
    med = {("mooncake", 2.0, "envoy-rr"): {"req_s": 1.5, "p90": 900.0, "p99": 1200.0, "hit": 0.0}}
    got = rtcurve._twin_lines(json.loads((tmp_path / "curves.json").read_text()), med, "mooncake")
    assert any(line.startswith(f"| 2x | envoy-rr | 1.50 / {rows[1]['req_s']:.2f} | 900 / ") for line in got)
    assert not any("| 0.5x |" in line for line in got)  # no real run there: no row
    late = 1e3 * (runs[0]["ttft_p90_late_s"] + runs[1]["ttft_p90_late_s"]) / 2
    assert rows[1]["late"] == pytest.approx(late)  # the second half's p90, as the real runs' late column
    assert any(f"| - / {late:.0f} |" in line for line in got)  # a real set recorded without send times: "-"


def test_a_twin_sends_the_blocks_aiperf_sends():
    """aiperf's trace loader gives a partial last block an id of its own, so a chat turn shares only the previous
    turn's full blocks: the twin's requests carry the same ids, and reuse less than the simulator's own."""
    wl = vcurve.WORKLOADS["multi-turn"].make(0, 10)
    plain, sent = vcurve._to_requests(wl), vcurve._to_requests(wl, as_aiperf_sends=True)
    first = next(i for i, r in enumerate(wl.records) if r.input_length % 512)  # a turn with a partial last block
    later = next(i for i, r in enumerate(wl.records) if i > first and r.session_id == wl.records[first].session_id)
    assert plain[first].hash_ids[-1] in plain[later].hash_ids
    assert sent[first].hash_ids[-1] not in sent[later].hash_ids
    assert sent[first].hash_ids[:-1] == plain[first].hash_ids[:-1]


def test_the_virtual_curves_judge_the_default_against_the_four_peers_only_on_the_seeds_all_ran():
    """``vcurve.verdicts`` applies the same bar as the real-time summary (``e2e.bench.bar``): no allowance on
    req/s, a baseline or a variant run beside the peers is not a peer, and a seed that only a peer ran is left out
    of the medians (another trace)."""
    def run(router: str, seed: int, tp: float, p90: float = 0.1, p99: float = 0.2, load: float = 1.0) -> dict:
        return {"workload": "no-sharing", "load": load, "router": router, "seed": seed,
                "throughput_req_s": tp, "ttft_p90_s": p90, "ttft_p99_s": p99}

    runs = [run("default", s, 10.0) for s in (0, 1, 2)]
    runs += [run("vllm:kv_aware", s, 9.99) for s in (0, 1, 2)] + [run("vllm:kv_aware", 3, 50.0)]
    runs += [run("least-loaded", s, 20.0, p90=0.01, p99=0.01) for s in (0, 1, 2)]  # a baseline
    runs += [run("variant", s, 30.0, p90=0.01) for s in (0, 1, 2)]  # a profile under test
    runs += [run("default", 0, 5.0, load=3.0)]  # no peer ran 3x: no row
    assert vcurve.verdicts({"runs": runs}) == ["| no-sharing | 1x | 3 | met |"]
    # 0.3 % behind the best peer: missed (the old table allowed 0.5 %)
    runs.append(run("envoy:round_robin", 0, 10.03))
    runs += [run("envoy:round_robin", s, 10.03, p90=0.09, p99=0.15) for s in (1, 2)]
    assert vcurve.verdicts({"runs": runs}) == ["| no-sharing | 1x | 3 | req/s 10.000 < 10.030; p90 100 > 90 ms; "
                                              "p99 200 > 1.1 x 150 ms |"]
    # the peers that ran the point set the seeds: without seed 2 for one of them, the medians are over 0 and 1
    assert vcurve.verdicts({"runs": [r for r in runs if (r["router"], r["seed"]) != ("vllm:kv_aware", 2)]})[0] \
        .startswith("| no-sharing | 1x | 2 |")
    with pytest.raises(ValueError, match="at least one peer"):
        bar.misses(bar.Figures(1.0, 1.0, 1.0), [])
    # runs without figures (nothing completed): a miss on kvswitch's side, never a pass; no peer's best
    nan = float("nan")
    assert len(bar.misses(bar.Figures(nan, nan, nan), [bar.Figures(1.0, 100.0, 200.0)])) == 3
    mine, empty, peer = bar.Figures(1.0, 100.0, 200.0), bar.Figures(nan, nan, nan), bar.Figures(0.9, 110.0, 190.0)
    assert bar.misses(mine, [empty, peer]) == []
    blank = [{**r, "ttft_p90_s": None} if r["router"] == "default" else r for r in runs]
    assert "p90 nan > 90 ms" in vcurve.verdicts({"runs": blank})[0]


def test_paired_differences_are_per_seed_and_count_the_seeds_that_changed():
    def run(seed: int, tp: float, p99: float, load: float = 3.0) -> dict:
        return {"workload": "shared-prefix", "load": load, "router": "default", "seed": seed,
                "throughput_req_s": tp, "ttft_p90_s": 1.0, "ttft_p99_s": p99}

    base = {"runs": [run(0, 19.0, 25.0), run(1, 20.0, 3.0), run(2, 21.0, 24.0), run(0, 8.0, 0.5, load=1.0)]}
    new = {"runs": [run(0, 20.5, 3.0), run(1, 20.0, 3.0), run(2, 22.0, 3.5), run(0, 8.0, 0.5, load=1.0),
                    {**run(1, 30.0, 1.0), "router": "sglang:cache_aware"}]}  # another router: not paired
    rows = vcurve.paired(new, base)
    assert rows == ["| shared-prefix | 1x | 1 | +0.000 [+0.000, +0.000] | +0.000 [+0.000, +0.000] "
                    "| +0.000 [+0.000, +0.000] | 0 |",
                    "| shared-prefix | 3x | 3 | +1.000 [+0.000, +1.500] | +0.000 [+0.000, +0.000] "
                    "| -20.500 [-22.000, +0.000] | 2 |"]


def test_kvswitch_is_told_the_pods_time_scale_and_the_picker_accepts_it(tmp_path):
    """A run at time scale k: the pods' steps take k x their cost model in wall time, and kvswitch (the only
    router that predicts times) is configured with it; at scale 1 nothing is added."""
    from types import SimpleNamespace

    from e2e.bench.routers import make_router
    from pickers.config import build_scheduler
    from pickers.types import Endpoint

    fleet = SimpleNamespace(addresses=["127.0.0.1:9001"], urls=["http://127.0.0.1:9001"],
                            kv_event_endpoints=["tcp://127.0.0.1:9101"], roles=["both"], model="m",
                            accelerator="L40S", model_profile="llama-3.1-8b", time_scale=2.6)
    router = make_router("kvswitch", tmp_path)
    cfg = router.picker_config(fleet, 1, 2)
    assert cfg["scheduler"]["predictor"] == {"time_scale": 2.6}
    director = build_scheduler(cfg["scheduler"], [Endpoint("127.0.0.1:9001")], network=False)
    assert director.dl.predictor.settings.time_scale == 2.6
    fleet.time_scale = 1.0
    assert "predictor" not in router.picker_config(fleet, 1, 2)["scheduler"]


def test_points_run_at_once_are_merged_into_the_serial_sets_comparison(tmp_path, monkeypatch):
    """``--jobs``: each (workload, router, load) runs as a comparison of its own, several at once; their runs
    are merged into one results.json per workload in the order ``run`` would have written them, and the
    summary judges the set as usual. No run starts after the deadline. (Each run here is a stand-in: the
    chain through Envoy and the peers is tests/bench/test_bench_e2e.py's.)"""
    import json
    import threading
    import time

    from e2e.bench.client import RunResult
    from e2e.bench.runner import Comparison

    running, peak = [0], [0]
    lock = threading.Lock()

    def one(self, fleet, name, rate, rep):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        fast = name == "kvswitch"
        return RunResult(name, rate, rep, ttft_ms=[100.0 if fast else 200.0] * 10, request_throughput=rate / 2,
                         hit_rate=0.5, engine_ttft_ms=90.0)

    monkeypatch.setattr(Comparison, "one", one)
    plan = rtcurve.WorkloadPlan("no-sharing", 10.0, 128.0, [1.0, 1.0], 16, [5.0, 10.0], 60.0)
    routers = ["kvswitch", "envoy-rr"]
    readme = rtcurve.run_parallel([plan], routers, 2, tmp_path, [0.5, 1.0], jobs=3, log=lambda _: None,
                                  with_twins=False)
    doc = json.loads((tmp_path / "no-sharing" / "results.json").read_text())
    order = [(r["repetition"], r["rate"], r["router"]) for r in doc["runs"]]
    assert order == [(rep, rate, r) for rep in range(2) for rate in (5.0, 10.0) for r in routers]
    assert doc["meta"]["routers"] == routers and doc["meta"]["rates"] == [5.0, 10.0] and doc["meta"]["jobs"] == 3
    assert peak[0] >= 2  # points ran at once
    assert "| 1x | met |" in readme.read_text()
    late = rtcurve.run_parallel([plan], routers, 2, tmp_path / "late", [0.5, 1.0], jobs=2, log=lambda _: None,
                                with_twins=False, deadline_s=0.0)
    assert json.loads((tmp_path / "late" / "no-sharing" / "results.json").read_text())["runs"] == []
    assert "| 0.5x | kvswitch" not in late.read_text()  # no run, no row (and the report still renders)


def test_a_rerun_takes_some_of_the_plans_loads_at_a_time_scale_of_its_own(capsys):
    base = rtcurve.RESULTS_DIR / "2026-12-02-curves-1000"
    plans, loads = rtcurve.plans_of(base, ["shared-prefix"])
    sub = rtcurve.subset(plans[0], loads, [1.0, 3.0])
    assert sub.rates == [plans[0].rates[1], plans[0].rates[3]]
    assert sub.time_scales == [plans[0].time_scales[1], plans[0].time_scales[3]]
    assert 0.3 * plans[0].est_wall_s < sub.est_wall_s < 0.6 * plans[0].est_wall_s  # two loads' share of the wall
    with pytest.raises(ValueError, match="loads 1.5 not in the plan"):
        rtcurve.subset(plans[0], loads, [1.5])
    assert rtcurve.main(["--plan-from", str(base), "--loads", "1.5", "--plan"]) == 2
    assert rtcurve.main(["--time-scale", "0.5", "--plan"]) == 2  # a new plan sizes its own time scales
    assert rtcurve.main(["--jobs", "0", "--plan"]) == 2
    assert rtcurve.main(["--plan-from", str(base), "--requests", "1", "--plan"]) == 2
    err = capsys.readouterr().err
    assert "loads 1.5 not in the plan" in err and "needs --plan-from" in err and "--jobs >= 1" in err
    assert "--requests >= 2" in err
    # longer runs of the plan's traces: its rates and time scales, the requests asked for
    assert rtcurve.main(["--plan-from", str(base), "--workloads", "shared-prefix", "--loads", "1", "--requests",
                         "240", "--time-scale", "1.5", "--plan"]) == 0
    out = capsys.readouterr().out
    assert f"time scales 1.5, 240 requests per run, rates {plans[0].rates[1]:g}," in out


def test_a_retimed_or_lengthened_plan_is_estimated_again_from_virtual_time(capsys):
    """The stored estimate is for the stored time scales and requests; scaling it was off by up to 6x (a set at
    time scale 4 printed the 16 min of its plan's 0.65)."""
    plans, loads = rtcurve.plans_of(rtcurve.RESULTS_DIR / "2026-12-02-curves-1000", ["no-sharing"])
    one = replace(rtcurve.subset(plans[0], loads, [1.0]), time_scales=[1.0], requests=48)
    runs, overhead = 15, 10.0
    fixed = runs * overhead
    base = rtcurve.estimate_wall_s(one, runs, overhead) - fixed
    assert base > 0
    slower = rtcurve.estimate_wall_s(replace(one, time_scales=[2.0]), runs, overhead) - fixed
    assert slower == pytest.approx(2 * base)  # the wall grows with the time scale
    longer = rtcurve.estimate_wall_s(replace(one, requests=4 * one.requests), runs, overhead) - fixed
    assert base < longer < 4 * base  # the drain does not grow with the requests
    assert rtcurve.main(["--plan-from", str(rtcurve.RESULTS_DIR / "2026-12-02-curves-1000"), "--workloads",
                         "no-sharing", "--loads", "1", "--requests", "48", "--time-scale", "2", "--plan"]) == 0
    est_min = float(capsys.readouterr().out.split("estimated wall ")[1].split(" min")[0])
    assert est_min == pytest.approx((slower + fixed) / 60, abs=0.5)


def test_a_mooncake_window_past_the_traces_end_is_refused_before_any_run(tmp_path, capsys):
    """Seed s replays the trace from s x 120 s: at 1,000 requests seeds 7-9 held 755, 251 and 0, and the empty
    run joined the medians as a run with no figures. Each bad set gets exit 2 and says which seeds work."""
    assert len(vcurve.WORKLOADS["mooncake"].make(6, 1000).records) == 1000
    assert len(vcurve.WORKLOADS["mooncake"].make(8, 240).records) == 240  # a shorter run fits a late window
    with pytest.raises(ValueError, match="seed 7's window .* holds 755 of the 1000 requests asked; seeds 0-6 give"):
        vcurve.WORKLOADS["mooncake"].make(7, 1000)
    assert vcurve.check_seeds(["shared-prefix", "mooncake"], [0, 6], 1000) is None
    out = tmp_path / "never"
    assert vcurve.main(["--workloads", "shared-prefix,mooncake", "--seeds", "0,9", "--requests", "1000",
                        "--out", str(out)]) == 2
    assert "seed 9's window" in capsys.readouterr().err and not out.exists()
    base = rtcurve.RESULTS_DIR / "2026-12-02-curves-1000"  # repetition r replays seed r
    assert rtcurve.main(["--plan-from", str(base), "--workloads", "mooncake", "--loads", "1", "--requests", "1000",
                         "--repetitions", "8", "--plan"]) == 2
    assert "seed 7's window" in capsys.readouterr().err


def test_the_virtual_curves_take_an_earlier_reports_folder_to_pair_with_and_refuse_a_missing_one(tmp_path, capsys):
    """``kvswitch bench curve --against``: a folder means its results.json; one that is not there is refused
    before any run (it used to fail after the whole set, when the report was rendered)."""
    import shutil

    base = tmp_path / "base"
    base.mkdir()
    for name in ("results.json", "shared-prefix.png"):
        shutil.copy(rtcurve.RESULTS_DIR / "2026-12-04-vcurve1000-warmup" / name, base / name)
    assert vcurve.main(["--report", str(base / "results.json"), "--against", str(base), "--no-plots"]) == 0
    readme = (base / "README.md").read_text()
    assert "## Paired by seed against" in readme
    # a re-render without plots links the plots drawn before, and only those
    assert "![shared-prefix](shared-prefix.png)" in readme and "![no-sharing]" not in readme
    assert vcurve.main(["--requests", "10", "--against", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "no such results.json" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_a_rerun_of_the_default_takes_the_peers_runs_of_an_earlier_set_on_the_same_traces(tmp_path, capsys):
    """``kvswitch bench curve --routers default --peers-from SET``: SET's runs of the other routers join the
    report as they were (the same traces: requests, knees and access-log mode checked); a set of other traces is
    refused, and the new runs stay on disk."""
    base, new, other = tmp_path / "base", tmp_path / "new", tmp_path / "other"
    common = ["--workloads", "shared-prefix", "--loads", "1", "--seeds", "0", "--no-plots"]
    assert vcurve.main([*common, "--requests", "24", "--routers", "default,envoy:round_robin", "--out", str(base)]) == 0
    assert vcurve.main([*common, "--requests", "24", "--routers", "default", "--peers-from", str(base),
                        "--out", str(new)]) == 0
    doc, before = (json.loads((d / "results.json").read_text()) for d in (new, base))
    assert doc["meta"]["routers"] == ["default", "envoy:round_robin"]
    assert [r for r in doc["runs"] if r["router"] != "default"] == [r for r in before["runs"]
                                                                   if r["router"] == "envoy:round_robin"]
    assert "from " + str(base / "results.json") in (new / "README.md").read_text()
    assert "| shared-prefix | 1x |" in (new / "README.md").read_text()  # judged against the adopted peer
    capsys.readouterr()
    assert vcurve.main([*common, "--requests", "20", "--routers", "default", "--peers-from", str(base),
                        "--out", str(other)]) == 2  # 20 requests per run: other traces
    assert "requests 24, this set 20" in capsys.readouterr().err
    assert [r["router"] for r in json.loads((other / "results.json").read_text())["runs"]] == ["default"]


def test_the_summary_shows_how_often_a_peers_own_kv_index_hit(tmp_path):
    """vllm-router kv_aware's lookups of its own KV index (Router.kv_lookups, per run) are listed per load: an
    index that never hits is a peer that never took the pods' KV events. Sets from before the record list none."""
    out = tmp_path / "set"
    shutil.copytree(rtcurve.RESULTS_DIR / "2026-12-05-curves-mooncake-2x-240-ts4", out)
    assert "own KV index" not in rtcurve.render_summary(out, plots=False).read_text()
    results = out / "mooncake" / "results.json"
    doc = json.loads(results.read_text())
    kv_runs = [r for r in doc["runs"] if r["router"] == "vllm-router:kv_aware"]
    assert len(kv_runs) == 3
    for rep, run in enumerate(kv_runs):
        run["router_kv_lookups"] = {"hit": 5.0 + rep, "miss": 235.0, "missing_tokens": 1.0}
    results.write_text(json.dumps(doc))
    text = rtcurve.render_summary(out, plots=False).read_text()
    assert "- vllm-router:kv_aware at 2x: 5 / 241, 6 / 242, 7 / 243" in text
    assert "sglang-router:cache_aware at" not in text  # a router without an index of its own: no line


def test_send_times_are_added_to_a_recorded_set_without_touching_its_readme(tmp_path, capsys):
    """``--report DIR --send-times``: each run recorded before send times were kept gets them from its aiperf
    export (here one run's, made from its stored samples at its time scale), each workload's report is rendered
    again with the TTFT-over-time plot, and the set's README (hand-written sections below the summary) is left
    as it is; the summary's late column shows the medians once there are any."""
    out = tmp_path / "set"
    shutil.copytree(rtcurve.RESULTS_DIR / "2026-12-05-curves-mooncake-2x-240-ts4", out,
                    ignore=shutil.ignore_patterns("raw"))  # raw/ is not committed: a clean clone has none
    assert "| 2x | kvswitch | 2.696 | 23918 | 30774 | - |" in rtcurve.render_summary(out, plots=False).read_text()
    (out / "README.md").write_text("hand-written")
    results = out / "mooncake" / "results.json"
    run = next(r for r in json.loads(results.read_text())["runs"] if r["router"] == "kvswitch")
    art = out / "mooncake" / "raw" / f"kvswitch-r{run['rate']:g}-rep{run['repetition']}" / "aiperf"
    art.mkdir(parents=True)
    n = len(run["ttft_ms"])
    art.joinpath("profile_export.jsonl").write_text("".join(
        json.dumps({"metadata": {"request_start_ns": i * 10**8},
                    "metrics": {"request_latency": {"value": 1.0}, "time_to_first_token": {"value": 4.0 * t}}}) + "\n"
        for i, t in enumerate(run["ttft_ms"])))
    assert rtcurve.main(["--report", str(out), "--send-times"]) == 0
    assert "send times added to 1 runs" in capsys.readouterr().out
    assert (out / "README.md").read_text() == "hand-written"
    assert "](ttft_time_r5.919.png)" in (out / "mooncake" / "README.md").read_text()
    stored = next(r for r in json.loads(results.read_text())["runs"] if r["router"] == "kvswitch")
    assert stored["sent_s"] == pytest.approx([i * 0.025 for i in range(n)])  # 0.1 s wall at time scale 4
    late = float(np.percentile([t for i, t in enumerate(run["ttft_ms"]) if i * 0.025 >= (n - 1) * 0.025 / 2], 90))
    text = rtcurve.render_summary(out, plots=False).read_text()
    assert f"| 2x | kvswitch | 2.696 | 23918 | 30774 | {late:.0f} |" in text


def test_a_variants_twins_are_judged_against_a_sets_real_peers_and_nothing_is_written(tmp_path, capsys):
    """``--report DIR --variants V.json``: each variant replayed on the set's traces as its twins are, its medians
    judged by the bar with the set's real peers; the set's own kvswitch row keeps the set's verdict."""
    out = tmp_path / "set"
    shutil.copytree(rtcurve.RESULTS_DIR / "2026-12-05-curves-no-sharing-1x-240-ts4", out)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    logs: list[str] = []
    variants = {"same": {"profile": "default"}, "li": {"profile": "least-inflight"}}
    lines = rtcurve.variant_twins(out, variants, log=logs.append)
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert logs == [logs[0]] and logs[0].startswith("variant twins: no-sharing 1x in ")
    rows = {cells[3].strip(): cells for line in lines if (cells := line.split("|")) and len(cells) > 8
            and cells[1].strip() == "no-sharing"}
    assert rows["kvswitch (real)"][7].strip() == "req/s 5.067 < 5.163; p90 370 > 340 ms"
    # the variant of the default profile with nothing changed is the default's twin, run for run
    doc = json.loads((out / "curves.json").read_text())
    plan = doc["meta"]["plans"][0]
    got = [vcurve.run_point("no-sharing", "default", rep, plan["rates"][0], plan["requests"], as_aiperf_sends=True,
                            access_log=True) for rep in range(3)]
    req_s = float(np.median([g["throughput_req_s"] for g in got]))
    p90 = 1e3 * float(np.median([g["ttft_p90_s"] for g in got]))
    assert rows["same"][4].strip() == f"{req_s:.3f}" and rows["same"][5].strip() == f"{p90:.0f}"
    med = rtcurve.medians(out, doc)
    mine = {k: v for k, v in med.items() if k[2] != "kvswitch"}
    mine[("no-sharing", 1.0, "kvswitch")] = {"req_s": req_s, "p90": p90,
                                             "p99": 1e3 * float(np.median([g["ttft_p99_s"] for g in got]))}
    assert rows["same"][7].strip() == rtcurve.verdict(mine, "no-sharing", 1.0)
    assert rows["same"][8].strip() != "-"  # the set has its peers' twins: judged against them too
    # a variant's config is the one built: "li" routes as the least-inflight profile does, not as the default
    li = [vcurve.run_point("no-sharing", "least-inflight", rep, plan["rates"][0], plan["requests"],
                           as_aiperf_sends=True, access_log=True) for rep in range(3)]
    assert rows["li"][4].strip() == f"{np.median([g['throughput_req_s'] for g in li]):.3f}"
    assert rows["li"][5].strip() == f"{1e3 * np.median([g['ttft_p90_s'] for g in li]):.0f}" != rows["same"][5].strip()
    # through the command line: the table on stdout, progress on stderr; --variants needs a set
    assert rtcurve.main(["--report", str(out), "--variants", str(_write(tmp_path / "v.json", variants))]) == 0
    cap = capsys.readouterr()
    assert "| no-sharing | 1x | same |" in cap.out and "variant twins: no-sharing 1x" in cap.err
    assert rtcurve.main(["--variants", str(tmp_path / "v.json")]) == 2
    assert "--variants goes with --report DIR" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "says"), [
    ("{", "cannot read it"),
    ("[]", "expected a JSON object"),
    ("{}", "expected a JSON object"),
    ('{"a": 3}', "'a': expected a picker config (an object), got int"),
    ('{"a": {"profile": "nope"}}', "'a': scheduler.profile: unknown profile 'nope'"),
    ('{"a": {"profiles": {"default": {"scorers": [{"type": "ttft", "weight": "x"}]}}}}',
     "'a': scheduler.profiles.default.scorers[0].weight: expected a number, got 'x'"),
])
def test_a_bad_variants_file_is_refused_before_any_replay(tmp_path, capsys, text, says):
    """Each variant is built once, over no pods, when the file is read: a typo fails in a second, not after an
    hour of replays. Both curve commands refuse it with status 2 and say which variant and why."""
    path = tmp_path / "v.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(says)):
        vcurve.read_variants(path)
    assert vcurve.main(["--variants", str(path), "--workloads", "no-sharing"]) == 2
    assert says in capsys.readouterr().err
    assert rtcurve.main(["--report", str(rtcurve.RESULTS_DIR / "2026-12-05-curves-no-sharing-1x-240-ts4"),
                         "--variants", str(path)]) == 2
    assert says in capsys.readouterr().err
    assert vcurve.read_variants(_write(tmp_path / "ok.json", {"a": {"profile": "least-inflight"}})) == {
        "a": {"profile": "least-inflight"}}


def _write(path, doc):
    path.write_text(json.dumps(doc))
    return path
