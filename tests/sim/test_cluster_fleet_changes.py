"""Pods added and removed while a replay runs: start-up delay, drain-first removal, cost, SLO figures."""

from __future__ import annotations

import math

import pytest

from engine.sim.cluster import ClusterSim, TraceRequest, fleet_from_flags, make_router, trace_prompts
from engine.sim.cluster.fleet import PodSpec
from engine.sim.cluster.report import SloTargets, fleet_usage, slo_summary, summarize
from engine.sim.cluster.simulator import LOST, READY, RELEASED, RequestRecord


class Script:
    """A controller that runs given actions at given times: ("add", accelerator, startup) / ("drain", name)."""

    interval_s = 1.0

    def __init__(self, actions: list[tuple[float, tuple]]) -> None:
        self.actions = sorted(actions, key=lambda a: a[0])
        self.added: list[str] = []

    def tick(self, sim: ClusterSim, now: float) -> None:
        while self.actions and self.actions[0][0] <= now:
            _, act = self.actions.pop(0)
            sim.scaling_actions += 1
            if act[0] == "add":
                pod = sim.add_pod(PodSpec(sim.new_pod_name(), "both", act[1], "llama-3.1-8b"), now, act[2])
                self.added.append(pod.name)
            else:
                sim.drain_pod(act[1] if act[1] != "last-added" else self.added[-1], now)


def _reqs(n: int, every: float, n_in: int = 600, n_out: int = 40) -> list[TraceRequest]:
    return [TraceRequest(i, i * every, n_in, n_out, [10_000 + i * 4 + k for k in range(2)]) for i in range(n)]


def _sim(policy: str = "round-robin", pods: int = 1, actions=()) -> tuple[ClusterSim, Script]:
    sim = ClusterSim(fleet_from_flags(pods, "H100", "8b"), lambda eps, clock: make_router(policy, eps, clock))
    script = Script(list(actions))
    sim.controller = script
    return sim, script


@pytest.mark.parametrize("policy", ["round-robin", "default"])
def test_added_pod_is_paid_from_request_and_routed_only_once_ready(policy):
    sim, script = _sim(policy, actions=[(10.0, ("add", "H100", 30.0))])
    res = sim.run(trace_prompts(_reqs(120, 0.5)))
    new = sim.by_name[script.added[0]]
    assert new.requested_at == 10.0 and new.ready_at == pytest.approx(40.0, abs=1.0) and new.state == READY
    on_new = [r for r in res.records if r.decode_pod == new.name]
    assert on_new and min(r.arrival for r in on_new) >= new.ready_at
    use = fleet_usage(res, {"H100": 2.0})
    end = res.end_time
    assert use["gpu_hours"] == pytest.approx((end + (end - 10.0)) / 3600.0)
    assert use["cost"] == pytest.approx(2.0 * use["gpu_hours"])
    assert use["peak_pods"] == 2 and use["scaling_actions"] == 1 and use["lost_requests"] == 0


@pytest.mark.parametrize("policy", ["round-robin", "default"])
def test_drained_pod_takes_no_new_request_finishes_its_own_then_is_released(policy):
    # long answers, so the drained pod holds requests when the drain starts
    sim, _ = _sim(policy, pods=2, actions=[(20.0, ("drain", "10.0.0.1:8000"))])
    res = sim.run(trace_prompts(_reqs(80, 0.5, n_out=2000)))
    pod = sim.by_name["10.0.0.1:8000"]
    assert pod.state == RELEASED
    mine = [r for r in res.records if r.decode_pod == pod.name]
    assert mine and all(r.arrival < 20.0 for r in mine)  # nothing new after the drain began
    assert all(r.status == "ok" for r in res.records)  # every in-flight request finished: none lost
    assert pod.released_at == pytest.approx(max(r.finish for r in mine))
    assert pod.released_at > 20.0 + 5.0  # it really waited for them
    s = summarize(res, prices={"H100": 3.0})
    assert s["lost_requests"] == 0 and s["scaling_actions"] == 1
    if policy == "default":  # the picker's endpoint table drained the pod, then dropped it once released
        table = sim.router.director.dl.endpoints  # type: ignore[attr-defined]
        assert table.slot(pod.name) is None and not table.is_draining(pod.name)
    assert s["gpu_hours"] == pytest.approx((res.end_time + pod.released_at) / 3600.0)


def test_drain_timeout_loses_what_still_runs_and_counts_it():
    sim, _ = _sim(pods=2, actions=[(20.0, ("drain", "10.0.0.1:8000"))])
    sim.drain_timeout_s = 3.0
    res = sim.run(trace_prompts(_reqs(80, 0.5, n_out=2000)))
    pod = sim.by_name["10.0.0.1:8000"]
    lost = [r for r in res.records if r.reason == LOST]
    assert pod.state == RELEASED and pod.released_at == pytest.approx(23.0)
    assert lost and all(r.decode_pod == pod.name for r in lost)
    assert fleet_usage(res)["lost_requests"] == len(lost)


def test_pod_drained_while_starting_is_released_at_once_and_never_routed():
    sim, script = _sim(actions=[(5.0, ("add", "L40S", 60.0)), (10.0, ("drain", "last-added"))])
    res = sim.run(trace_prompts(_reqs(40, 0.5)))
    pod = sim.by_name[script.added[0]]
    assert pod.state == RELEASED and pod.released_at == 10.0
    assert not [r for r in res.records if r.decode_pod == pod.name]
    use = fleet_usage(res, {"H100": 1.0, "L40S": 1.0})
    assert use["gpu_hours_by_kind"]["L40S"] == pytest.approx(5.0 / 3600.0)
    assert use["scaling_actions"] == 2


def _rec(i: int, arrival: float, first: float, finish: float, out: int, status: str = "ok") -> RequestRecord:
    r = RequestRecord(f"r{i}", i, arrival, 100, out)
    r.first_token, r.finish, r.output_tokens, r.status = first, finish, out, status
    return r


def test_slo_summary_counts_both_targets_over_all_requests():
    recs = [
        _rec(0, 0.0, 0.1, 1.1, 11),   # TTFT 0.1, TPOT 0.1: meets 0.2 / 0.15
        _rec(1, 1.0, 1.5, 2.5, 11),   # TTFT 0.5: misses TTFT
        _rec(2, 2.0, 2.1, 5.1, 11),   # TPOT 0.3: misses TPOT
        _rec(3, 3.0, 3.05, 3.05, 1),  # one token: no TPOT to miss
        _rec(4, 4.0, -1.0, -1.0, 0, status="rejected"),
    ]
    s = slo_summary(recs, SloTargets(0.2, 0.15))
    assert s["slo_met"] == 2 and s["slo_attainment"] == pytest.approx(2 / 5)
    assert s["slo_ttft_attainment"] == pytest.approx(3 / 5) and s["slo_tpot_attainment"] == pytest.approx(3 / 5)
    assert s["goodput_req_s"] == pytest.approx(2 / 5.1)
    with pytest.raises(ValueError):
        SloTargets(0.0, 0.1)
    assert math.isnan(slo_summary([], SloTargets(1, 1))["slo_attainment"])
