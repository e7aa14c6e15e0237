"""Flow control in virtual time: past the knee the default profile holds requests in the picker and places each
when a pod has room (pickers/flowcontrol.py); the simulator hands them back through ``take_released``."""

from __future__ import annotations

import numpy as np

import engine.sim.cluster.cli as cli
from e2e.bench import vcurve
from e2e.bench import workloads as W
from engine.sim.cluster import routers as R
from engine.sim.cluster.cli import replay
from engine.sim.cluster.fleet import fleet_from_flags
from engine.sim.cluster.trace import BlockTokens


def _no_sharing(load: float, n: int = 300, seed: int = 0):
    """vcurve's no-sharing workload (no prefix reuse, varied prompt and output lengths) at ``load`` x the knee of
    its 4-pod fleet (the knee the committed curves measured)."""
    wl = vcurve.WORKLOADS["no-sharing"].make(seed, n)
    wl = W.scale_rate(wl, load * 11.4987 / vcurve.mean_rate(wl))
    f = vcurve.CurveFleet()
    return vcurve._to_requests(wl), fleet_from_flags(f.pods, f.accelerator, f.model_profile,
                                                     max_model_len=f.max_model_len)


def _run(reqs, fleet, enabled: bool):
    routers: list[R.Router] = []
    orig = cli.make_router

    def keep(*a, **kw):  # the router the replay builds, to read its director afterwards
        routers.append(orig(*a, **kw))
        return routers[-1]

    cli_saved, cli.make_router = cli.make_router, keep
    try:
        res, _ = replay(reqs, fleet, "default", blocks=BlockTokens(),
                        picker_config={"flow_control": {"enabled": enabled}})
    finally:
        cli.make_router = cli_saved
    return res, routers[0]


def _ttft(res) -> np.ndarray:
    return np.array([r.first_token - r.arrival for r in res.records if r.status == "ok"])


def test_past_the_knee_requests_wait_in_the_picker_and_all_complete():
    reqs, fleet = _no_sharing(2.0, n=1000)
    held, router = _run(reqs, fleet, True)
    placed, _ = _run(reqs, fleet, False)
    assert all(r.status == "ok" for r in held.records) and len(held.records) == len(reqs)
    reg_flow = router.director.flow
    assert reg_flow is not None and reg_flow.queued == 0  # nothing left behind
    assert reg_flow.held_total > 0.2 * len(reqs)  # past the knee a good share of the requests waited for room
    # the time held counts in the TTFT (from the request's arrival), and late binding evens the waits out:
    # the tail is shorter than when each request is bound to a pod at arrival
    a, b = _ttft(held), _ttft(placed)
    assert np.percentile(a, 90) < np.percentile(b, 90) and np.percentile(a, 99) < np.percentile(b, 99)


def test_below_the_knee_nothing_is_held_and_decisions_match_placing_at_once():
    reqs, fleet = _no_sharing(0.5, n=150)
    held, router = _run(reqs, fleet, True)
    placed, _ = _run(reqs, fleet, False)
    assert router.director.flow is not None and router.director.flow.held_total == 0
    assert [r.decode_pod for r in held.records] == [r.decode_pod for r in placed.records]
    assert [r.first_token for r in held.records] == [r.first_token for r in placed.records]
