"""The planner: catalogue input, capacity and search with known answers, hysteresis, drain order."""

from __future__ import annotations

import math

import pytest

from engine.sim.cluster.autoscale import PlannerController, peak_rate
from engine.sim.cluster.trace import TraceRequest
from pickers.planner import (
    DEFAULT_PRICES,
    KvswitchPlanner,
    LoadShape,
    Observation,
    PodKind,
    PoolState,
    Slo,
    parse_accelerators,
    pod_capacity,
    pods_needed,
)
from pickers.planner.capacity import estimate
from pickers.planner.search import search


@pytest.mark.parametrize("text,why", [
    ("", "empty"), ("H100=abc", "must be a number"), ("H100=-1", "positive"), ("H100=0", "positive"),
    ("TPU9=1", "unknown kind"), ("H100=1,h100=2", "named twice"), ("H100=1,,L40S=1", "empty entry"),
    ("H100=nan", "positive"), ("H100=inf", "positive"),
])
def test_bad_catalogue_input_is_a_clear_error(text, why):
    with pytest.raises(ValueError, match=why):
        parse_accelerators(text)


def test_catalogue_prices_defaults_and_startup():
    c = parse_accelerators("h100=2.5, L40S", startup_s=120)
    assert c.prices == {"H100": 2.5, "L40S": DEFAULT_PRICES["L40S"]} and c.startup_s["L40S"] == 120
    with pytest.raises(ValueError, match="start-up"):
        parse_accelerators("H100", startup_s=-1)


def _shape(n_in: int = 1000, out: float = 100.0) -> LoadShape:
    return LoadShape.from_lengths([n_in] * 10, [out] * 10)


def test_capacity_is_zero_when_one_request_alone_misses_a_target():
    kind = PodKind("H100", "8b")
    prefill = kind.cost().prefill_time(1000)
    assert pod_capacity(kind, _shape(), ttft_s=prefill * 0.9, tpot_s=1.0) == 0.0
    step = kind.cost().decode_step_time(1, 1050)
    assert pod_capacity(kind, _shape(), ttft_s=10.0, tpot_s=step * 0.9) == 0.0
    assert pods_needed(1.0, kind, _shape(), ttft_s=prefill * 0.9, tpot_s=1.0) is None


def test_capacity_meets_its_targets_at_the_edge_and_grows_with_looser_ones():
    kind = PodKind("H100", "8b")
    tight = pod_capacity(kind, _shape(), 0.2, 1.0)  # TTFT binds
    loose = pod_capacity(kind, _shape(), 0.4, 1.0)
    assert 0 < tight < loose
    e = estimate(kind, _shape(), tight)
    assert e.ttft_q <= 0.2 + 1e-6 and e.tpot <= 1.0
    beyond = estimate(kind, _shape(), tight * 1.05)
    assert beyond.ttft_q > 0.2  # the capacity is the edge, not a safe guess
    tpot_bound = pod_capacity(kind, _shape(), 10.0, 0.012)  # TPOT binds
    assert 0 < tpot_bound and estimate(kind, _shape(), tpot_bound).tpot <= 0.012
    # a faster kind serves more; pods needed = rate / capacity, rounded up
    assert pod_capacity(PodKind("H200", "8b"), _shape(), 0.2, 1.0) >= tight
    assert pods_needed(3.5 * tight, kind, _shape(), 0.2, 1.0) == 4


def test_search_finds_the_cheaper_kind_and_follows_prices():
    inputs, outputs = [800] * 50, [100] * 50
    cap_h = pod_capacity(PodKind("H100", "8b"), LoadShape.from_lengths(inputs, outputs), 1.0, 0.05)
    cands = search(inputs, outputs, 4 * cap_h, parse_accelerators("H100=2.0,L40S=100"), "8b", 1.0, 0.05, 0.95,
                   utilization=1.0, tps=(1,))
    best = cands[0]
    assert best.kinds == ("H100",) and best.pools[0].count == 4 and best.cost_per_hour == pytest.approx(8.0)
    flipped = search(inputs, outputs, 4 * cap_h, parse_accelerators("H100=100,L40S=0.5"), "8b", 1.0, 0.05,
                     0.95, utilization=1.0, tps=(1,))
    assert flipped[0].kinds == ("L40S",)
    assert all(a.cost_per_hour <= b.cost_per_hour for a, b in zip(cands, cands[1:]))
    # two kinds: split candidates route long prompts to the first pool
    mixed = [c for c in search([500] * 40 + [20000] * 10, [100] * 50, 2.0, parse_accelerators("H100=2,L40S=0.5"),
                               "8b", 3.0, 0.05, 0.9, tps=(1,)) if c.split_tokens is not None]
    assert mixed and all(c.pools[0].min_input == c.split_tokens == c.pools[1].max_input for c in mixed)


def _obs(now: float, rate: float, pods: int, attainment: float = 1.0, waiting: float = 0.0) -> Observation:
    n = int(rate * 30)
    return Observation(now, 30.0, n, [1000] * n, [100] * n, 0.0, waiting, 0.2, attainment,
                       {"H100": PoolState(ready=pods)})


def test_kvswitch_planner_scales_up_at_once_and_down_only_after_the_hold_and_cooldown():
    cat = parse_accelerators("H100=2.0", startup_s=60)
    p = KvswitchPlanner(cat, "8b", Slo(1.0, 0.05, 0.95), down_after_s=300, cooldown_s=300)
    cap = pod_capacity(PodKind("H100", "8b"), _shape(1000, 100), 1.0, 0.05)
    pods, t = 1, 0.0
    actions = []
    for rate in [cap * 0.5] * 4 + [cap * 4] * 6:  # a rise: wants ceil(4 / 0.8) = 5 pods soon after
        d = p.decide(_obs(t, rate, pods))
        if d:
            actions.append((t, d["H100"]))
            pods = d["H100"]
        t += 30
    assert actions and actions[0][0] <= 150 and pods >= 5
    high = pods
    # a short dip does not scale down
    for rate in [cap * 0.5] * 3 + [cap * 4] * 2:
        assert p.decide(_obs(t, rate, pods)) is None
        t += 30
    # a lasting fall scales down once, after the hold, in one step
    downs = []
    for _ in range(30):
        d = p.decide(_obs(t, cap * 0.5, pods))
        if d:
            downs.append((t, d["H100"]))
            pods = d["H100"]
        t += 30
    assert len(downs) == 1 and downs[0][1] < high
    assert downs[0][0] - actions[-1][0] >= 300  # the cooldown after the last scale-up held


def test_kvswitch_planner_adds_a_pod_when_attainment_falls_with_queues():
    cat = parse_accelerators("H100=2.0")
    p = KvswitchPlanner(cat, "8b", Slo(1.0, 0.05, 0.95))
    cap = pod_capacity(PodKind("H100", "8b"), _shape(1000, 100), 1.0, 0.05)
    assert p.decide(_obs(0.0, cap * 0.1, 3)) is None  # 3 pods are more than enough: no change yet
    d = p.decide(_obs(30.0, cap * 0.1, 3, attainment=0.5, waiting=4.0))
    assert d == {"H100": 4}  # the fleet says the model was optimistic: one more
    assert p.decide(_obs(60.0, cap * 0.1, 4, attainment=0.5, waiting=0.0)) is None  # misses without queues: no


def test_drain_order_starting_newest_first_then_ready_with_fewest_requests():
    class P:
        def __init__(self, i, state, assigned, at):
            self.index, self.state, self.assigned, self.requested_at, self.name = i, state, assigned, at, f"p{i}"

    pods = [P(0, "ready", 5, 0), P(1, "ready", 0, 0), P(2, "starting", 0, 10), P(3, "starting", 0, 20),
            P(4, "ready", 2, 0)]
    order = [p.index for p in PlannerController._drain_order(pods)]  # type: ignore[arg-type]
    assert order == [3, 2, 1, 4, 0]


def test_peak_rate_is_the_busiest_window():
    reqs = [TraceRequest(i, float(i), 10, 1, []) for i in range(100)] + \
           [TraceRequest(100 + i, 200 + i * 0.1, 10, 1, []) for i in range(300)]
    assert peak_rate(reqs, window_s=30.0) == pytest.approx(300 / 30.0)
    assert math.isclose(peak_rate(reqs[:1], 30.0), 1 / 30.0)


def _trace_file(tmp_path, n=60, every_ms=250):
    import json

    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"timestamp": i * every_ms, "input_length": 800 if i % 3 else 6000,
                                          "output_length": 20, "hash_ids": [i * 20 + k for k in range(12)]})
                              for i in range(n)) + "\n")
    return path


def test_plan_cli_writes_a_fleet_the_simulators_accept_and_rejects_bad_input(tmp_path, capsys):
    from engine.sim.cluster.fleet import load_fleet
    from engine.sim.cluster.plan import main as plan_main

    trace = _trace_file(tmp_path)
    out, js = tmp_path / "fleet.yaml", tmp_path / "plan.json"
    rc = plan_main([str(trace), "--accelerators", "H100=2.49,L40S=0.86", "--slo-ttft-ms", "3000",
                    "--slo-tpot-ms", "100", "--attainment", "0.9", "--confirm", "1", "--out", str(out),
                    "--json", str(js), "--quiet"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "<- winner" in table and "$/hour" in table
    fleet = load_fleet(out)
    import json

    plan = json.loads(js.read_text())
    win = next(c for c in plan["candidates"] if c["fleet"] == plan["winner"])
    assert fleet.pods and {p.role for p in fleet.pods} == ({"prefill", "decode"} if win["pd"] else {"both"})
    assert fleet.disaggregated == win["pd"]
    assert win["slo_attainment"] >= 0.9 and win["cost_per_hour"] == min(
        c["cost_per_hour"] for c in plan["candidates"] if c["slo_attainment"] >= 0.9)
    for bad in (["--accelerators", "H100=x"], ["--accelerators", "B200=3"], ["--attainment", "2"]):
        assert plan_main([str(trace), "--slo-ttft-ms", "3000", "--slo-tpot-ms", "100", *bad]) == 2
        assert "kvswitch plan:" in capsys.readouterr().err


def test_replay_autoscale_cli_one_summary_per_planner(tmp_path, capsys):
    import json

    from engine.sim.cluster.cli import main as replay_main

    trace = _trace_file(tmp_path, n=200, every_ms=200)
    out = tmp_path / "out.json"
    rc = replay_main([str(trace), "--autoscale", "kvswitch,static-peak,queue-hpa,dynamo-throughput",
                      "--startup-s", "10", "--accelerators", "H100=2.0", "--slo-ttft-ms", "3000",
                      "--slo-tpot-ms", "100", "--json", str(out), "--quiet"])
    assert rc == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["planner"] for r in runs] == ["kvswitch", "static-peak", "queue-hpa", "dynamo-throughput"]
    for r in runs:
        for key in ("slo_attainment", "goodput_req_s", "gpu_hours", "cost", "scaling_actions_per_hour",
                    "lost_requests", "peak_pods"):
            assert key in r
        assert r["cost"] == pytest.approx(2.0 * r["gpu_hours"]) and r["lost_requests"] == 0
    assert runs[1]["scaling_actions_per_hour"] == 0
    assert replay_main([str(trace), "--autoscale", "nope", "--slo-ttft-ms", "1", "--slo-tpot-ms", "1"]) == 2
    assert replay_main([str(trace), "--autoscale", "kvswitch"]) == 2
    assert "unknown planner" in capsys.readouterr().err
