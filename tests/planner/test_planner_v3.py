"""Planner v3: the robust forecast, burst and fall handling, Dynamo's headroom knob, planner specs, the miss
budget of split fleets, one-kind splits, and the day-matrix bench's parsing and table. Known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pickers.planner import (
    DynamoThroughputPlanner,
    KvswitchPlanner,
    LoadShape,
    Observation,
    PodKind,
    PoolState,
    Slo,
    make_planner,
    parse_accelerators,
    pod_capacity,
)
from pickers.planner.autoscale import PlannerSpec, parse_planner_spec, theil_sen
from pickers.planner.search import search, split_goals

SLO = Slo(1.0, 0.05, 0.95)


def _shape() -> LoadShape:
    return LoadShape.from_lengths([1000] * 10, [100] * 10)


def _cap() -> float:
    return pod_capacity(PodKind("H100", "8b"), _shape(), SLO.ttft_s, SLO.tpot_s)


def _obs(now: float, rate: float, pods: int, attainment: float = 1.0, waiting: float = 0.0,
         starting: int = 0) -> Observation:
    n = int(round(rate * 30))
    return Observation(now, 30.0, n, [1000] * n, [100] * n, 0.0, waiting, 0.2, attainment,
                       {"H100": PoolState(ready=pods, starting=starting)})


def test_theil_sen_keeps_the_line_through_a_burst_that_least_squares_follows():
    t = np.arange(12) * 30.0
    r = 2.0 + 0.01 * t
    r_burst = r.copy()
    r_burst[8:11] += 10.0  # three intervals of a burst, the last point back on the line
    tr = theil_sen(t.tolist(), r_burst.tolist())
    assert tr.slope == pytest.approx(0.01) and tr.level == pytest.approx(r[-1])
    ls_slope = float(np.polyfit(t, r_burst, 1)[0])
    assert abs(ls_slope - 0.01) > 0.01  # what the old least-squares fit would have extrapolated
    assert tr.falling < 0.1 and theil_sen(t.tolist(), r.tolist()).falling == 0.0
    fall = theil_sen(t.tolist(), (5.0 - 0.01 * t).tolist())
    assert fall.falling == 1.0 and fall.slope == pytest.approx(-0.01)


def _run(planner: KvswitchPlanner, rates: list[float], pods: int, t0: float = 0.0, carry: float = math.inf
         ) -> tuple[list[tuple[float, int]], int, float]:
    """Feed rates (req/s) one interval each to a fleet whose pods serve at once; it misses with queues while
    the rate is above pods x ``carry``; returns (actions, pods, next time)."""
    actions = []
    t = t0
    for rate in rates:
        missed = rate > pods * carry
        d = planner.decide(_obs(t, rate, pods, 0.5 if missed else 1.0, 5.0 if missed else 0.0))
        if d:
            actions.append((t, d["H100"]))
            pods = d["H100"]
        t += 30.0
    return actions, pods, t


def test_a_burst_shorter_than_the_startup_buys_nothing_but_with_a_short_startup_it_does():
    cap = _cap()
    base = [cap * 1.5] * 14  # 2 pods at 0.8 utilisation: ceil(1.5 / 0.8) = 2
    burst = [cap * 3.0] * 4  # two minutes at twice the rate, above what 2 pods carry: misses with queues
    long_start = KvswitchPlanner(parse_accelerators("H100=2", startup_s=300), "8b", SLO)
    acts, pods, t = _run(long_start, base, 2)
    assert acts == [] and pods == 2
    acts, pods, _ = _run(long_start, burst + base[:4], pods, t, carry=cap)
    assert acts == [] and pods == 2  # a pod bought now would serve 5 minutes later, after the burst
    short_start = KvswitchPlanner(parse_accelerators("H100=2", startup_s=60), "8b", SLO)
    acts, pods, t = _run(short_start, base, 2)
    assert acts == []
    acts, pods, _ = _run(short_start, burst, pods, t, carry=cap)
    assert acts and acts[0][1] >= 3  # serves within a minute: size for the burst (ceil(3 / 0.8) = 4) ...
    assert max(w for _, w in acts) == 4  # ... and not more: a step is not extrapolated as a ramp


def test_a_sustained_rise_is_bought_a_startup_ahead():
    cap = _cap()
    p = KvswitchPlanner(parse_accelerators("H100=2", startup_s=300), "8b", SLO)
    slope = cap * 0.8 / 600.0  # one pod's planned load more every 10 minutes
    rates = [cap * 0.4 + slope * 30.0 * i for i in range(40)]
    acts, _, _ = _run(p, rates, 1)
    assert acts
    for t, want in acts:  # each purchase covers the rate a start-up and an interval later
        level_then = cap * 0.4 + slope * (t + 330.0)
        assert want >= math.ceil(level_then / (cap * 0.8) - 1e-9)
        assert want <= math.ceil((level_then + slope * 60.0) / (cap * 0.8))  # and not much more


def test_a_steady_fall_scales_down_after_two_intervals_a_noisy_plateau_holds():
    cap = _cap()
    rng = np.random.default_rng(1)
    p = KvswitchPlanner(parse_accelerators("H100=2", startup_s=300), "8b", SLO, down_after_s=480, cooldown_s=0)
    # a plateau at 1.7 pods' planned load with noise that dips to 1.5 pods' now and then: no scale-down
    plateau = (cap * 0.8 * (1.6 + 0.15 * rng.standard_normal(30))).tolist()
    acts, pods, t = _run(p, plateau, 3)
    assert [a for a in acts if a[1] < 2] == []
    # a steady fall from 2.4 to 0.4 pods' planned load over 15 minutes: scale-downs come within 2 intervals of
    # the lower size fitting (not the 480 s hold), so the fleet tracks the fall
    p2 = KvswitchPlanner(parse_accelerators("H100=2", startup_s=300), "8b", SLO, down_after_s=480, cooldown_s=0)
    _run(p2, [cap * 0.8 * 2.4] * 12, 3)
    fall = [cap * 0.8 * (2.4 - 2.0 * i / 30) for i in range(30)]
    acts, pods, _ = _run(p2, fall, 3, t0=360.0)
    assert acts and pods == 1
    first_fit = next(360.0 + 30 * i for i, r in enumerate(fall) if math.ceil(r / (cap * 0.8)) < 3)
    assert acts[0][0] - first_fit <= 90.0  # two intervals after the lower size held (plus the one it appeared)


def test_the_reactive_pod_comes_only_at_a_load_the_ready_pods_should_carry():
    cap = _cap()
    p = KvswitchPlanner(parse_accelerators("H100=2", startup_s=60), "8b", SLO)
    for i in range(10):
        p.decide(_obs(30.0 * i, cap * 0.5, 2))
    assert p.decide(_obs(300.0, cap * 0.5, 2, attainment=0.5, waiting=3.0)) == {"H100": 3}  # model optimistic
    q = KvswitchPlanner(parse_accelerators("H100=2", startup_s=600), "8b", SLO)
    for i in range(10):
        q.decide(_obs(30.0 * i, cap * 0.5, 1))
    # one interval at 2.5 pods' capacity on one ready pod: a burst (the level over the start-up holds)
    assert q.decide(_obs(300.0, cap * 2.5, 1, attainment=0.2, waiting=9.0)) is None


def test_the_reactive_pod_waits_for_the_last_one_to_start():
    cap = _cap()
    p = KvswitchPlanner(parse_accelerators("H100=2", startup_s=300), "8b", SLO)
    for i in range(10):
        p.decide(_obs(30.0 * i, cap * 0.5, 2))
    assert p.decide(_obs(300.0, cap * 0.5, 2, attainment=0.5, waiting=3.0)) == {"H100": 3}
    # still missing while that pod starts: no second one (it would pile up one pod per interval)
    for i in range(1, 10):
        assert p.decide(_obs(300.0 + 30 * i, cap * 0.5, 2, attainment=0.5, waiting=3.0, starting=1)) is None
    assert p.decide(_obs(600.0, cap * 0.5, 3, attainment=0.5, waiting=3.0)) == {"H100": 4}  # it served: next


def test_dynamo_headroom_knob_divides_its_formula():
    slo = Slo(2.0, 0.06, 0.95)
    obs = _obs(0.0, 40.0, 0)
    full = DynamoThroughputPlanner("H100", "8b", slo).decide(obs)
    half = DynamoThroughputPlanner("H100", "8b", slo, utilization=0.5).decide(obs)
    assert full is not None and half is not None
    # the same pods' worth of work planned at half of each pod's throughput: ceil(2 x busy) against ceil(busy)
    p = DynamoThroughputPlanner("H100", "8b", slo)
    assert full["H100"] >= 2 and 2 * full["H100"] - 1 <= half["H100"] <= 2 * full["H100"]
    with pytest.raises(ValueError, match="utilization"):
        DynamoThroughputPlanner("H100", "8b", slo, utilization=1.5)
    assert p.utilization == 1.0


@pytest.mark.parametrize("text,label", [
    ("kvswitch", "kvswitch"),
    ("dynamo-throughput:utilization=0.5", "dynamo-throughput:utilization=0.5"),
    ("dynamo-throughput: utilization=0.5 , interval_s=60", "dynamo-throughput:interval_s=60,utilization=0.5"),
    ("kvswitch:utilization=0.9", "kvswitch:utilization=0.9"),
])
def test_planner_specs_parse_to_a_stable_label(text, label):
    assert parse_planner_spec(text).label == label


@pytest.mark.parametrize("text,why", [
    ("nope", "unknown planner"), ("dynamo-throughput:speed=2", "unknown option"),
    ("dynamo-throughput:utilization=0", r"\(0, 1\]"), ("dynamo-throughput:utilization=1.5", r"\(0, 1\]"),
    ("dynamo-throughput:interval_s=-3", "positive"), ("dynamo-throughput:utilization", r"\(0, 1\]"),
    ("queue-hpa:utilization=0.5", "unknown option"), ("kvswitch:", "empty option"),
    ("dynamo-throughput:interval_s=nan", "positive"),
])
def test_bad_planner_specs_are_clear_errors(text, why):
    with pytest.raises(ValueError, match=why):
        parse_planner_spec(text)


def test_make_planner_applies_the_spec_knobs():
    cat = parse_accelerators("H100=2")
    d = make_planner("dynamo-throughput:utilization=0.6,interval_s=60", cat, "8b", SLO)
    assert isinstance(d, DynamoThroughputPlanner) and d.utilization == 0.6 and d.interval_s == 60
    k = make_planner(PlannerSpec("kvswitch", (("utilization", 0.9),)), cat, "8b", SLO)
    assert isinstance(k, KvswitchPlanner) and k.utilization == 0.9


def test_cli_splits_planner_lists_with_knobs():
    from engine.sim.cluster.cli import _split_specs

    assert _split_specs("kvswitch,dynamo-throughput:utilization=0.6,interval_s=60,static-peak") == [
        "kvswitch", "dynamo-throughput:utilization=0.6,interval_s=60", "static-peak"]
    assert _split_specs("kvswitch, ,queue-hpa") == ["kvswitch", "queue-hpa"]


def test_split_goals_share_the_miss_budget_exactly():
    long_goal, short_goal = split_goals(0.99, 0.2, 0.8)
    assert long_goal == pytest.approx(0.96) and short_goal == pytest.approx(0.9975)
    assert 0.2 * long_goal + 0.8 * short_goal == pytest.approx(0.99)
    assert split_goals(0.99, 0.5, 0.5) == pytest.approx((0.99, 0.99))
    assert split_goals(0.5, 0.01, 1.0)[0] == 0.5  # clipped: a pool's goal never below 0.5
    with pytest.raises(ValueError):
        split_goals(0.99, 1.0, 0.5)


def test_a_split_of_one_kind_is_a_single_kind_candidate_and_mixing_must_beat_it():
    inputs = [500] * 80 + [20000] * 20
    outputs = [100] * 100
    cands = search(inputs, outputs, 4.0, parse_accelerators("H100=2,L40S=0.5"), "8b", 3.0, 0.05, 0.9,
                   tps=(1, 2))
    one_kind_splits = [c for c in cands if c.split_tokens is not None and not c.mixed]
    assert one_kind_splits and all(len(c.kinds) == 1 and c.pools[0].kind != c.pools[1].kind
                                   for c in one_kind_splits)
    assert all(c.mixed == (len(c.kinds) == 2) for c in cands)
    # the pools' goals come from the shared miss budget: each candidate's expected attainment is the goal
    for c in cands:
        if c.split_tokens is not None:
            s = c.notes["long_share"]
            assert s * c.notes["goal_long"] + (1 - s) * c.notes["goal_short"] == pytest.approx(0.9, abs=1e-6)


def test_length_split_router_by_pod_address():
    from engine.sim.cluster.routers import ClusterRequest, Endpoint, LengthSplitRouter, Role

    eps = [Endpoint(address=f"10.0.0.{i}:8000", role=Role.BOTH, accelerator="H100") for i in range(3)]
    r = LengthSplitRouter(eps, split_tokens=100, long_pods=frozenset({"10.0.0.0:8000"}))
    long_req = ClusterRequest("a", 0.0, np.arange(500), 10)
    short_req = ClusterRequest("b", 0.0, np.arange(50), 10)
    assert r.route(long_req, 0.0)[0] == "10.0.0.0:8000"
    assert r.route(short_req, 0.0)[0] in {"10.0.0.1:8000", "10.0.0.2:8000"}


def test_planner_day_bench_parses_runs_and_builds_the_table(tmp_path):
    import json

    from e2e.bench.planner_day import load_rows, parse_runs, table

    runs = parse_runs(["kvswitch@60,300", "dynamo-throughput:utilization=0.5@300"], "H100=2.49")
    assert [(r.spec, r.startup_s) for r in runs] == [("kvswitch", 60), ("kvswitch", 300),
                                                      ("dynamo-throughput:utilization=0.5", 300)]
    assert len({r.file for r in runs}) == 3
    for bad in (["kvswitch"], ["kvswitch@x"], ["@60"], ["kvswitch@-1"]):
        with pytest.raises(ValueError):
            parse_runs(bad, "H100=2.49")
    base = {"goodput_req_s": 3.0, "cost": 1.0, "scaling_actions_per_hour": 0.0, "lost_requests": 0,
            "peak_pods": 3, "accelerators": {"H100": 2.49}, "startup_s": 300.0, "slo_attainment": 0.99}
    (tmp_path / "a.json").write_text(json.dumps({"runs": [
        {**base, "planner": "static-peak", "gpu_hours": 3.0},
        {**base, "planner": "kvswitch", "gpu_hours": 2.25}]}))
    rows = load_rows(tmp_path)
    text = table(rows)
    assert "| H100=2.49 | 300 | kvswitch | 0.990 | 3.000 | 2.25 | 0.75 |" in text
