"""The SLO-aware P/D decider (pickers/plugins/pd_decider.py, ``decider: slo``) and SLO-aware routing
(pickers/plugins/score_slo.py) on hand-built fleets whose verdicts are known exactly."""

from __future__ import annotations

import math

import pytest

from engine.costmodel import CostModel
from pickers.datalayer import PodMetrics
from pickers.plugins.pd_decider import PrefillRate, slo_verdict, tpot_with_arrivals
from pickers.state import SLOTargets
from pickers.types import Endpoint

from .helpers import request, scheduler

P0 = "10.0.1.1:8000"
D0, D1 = "10.0.2.1:8000", "10.0.2.2:8000"


def pd_fleet() -> list[Endpoint]:
    return [Endpoint(P0, role="prefill"), Endpoint(D0, role="decode"), Endpoint(D1, role="decode")]


def slo_scheduler(**handler):
    return scheduler({"handler": {"type": "prefill-decode", **handler}, "predictor": {"correction": False}},
                     pd_fleet())


def toks(n: int, base: int = 0) -> list[int]:
    return [base + i for i in range(n)]


# ---- the rule on its inputs ------------------------------------------------------------------------------
NONE = SLOTargets()
TPOT = SLOTargets(tpot_s=0.040)
BOTH = SLOTargets(ttft_s=1.0, tpot_s=0.040)


@pytest.mark.parametrize("local,split,tpot,local_tpot,running,slo,want", [
    (0.30, 0.20, 0.010, 0.020, 10, NONE, (True, "split-faster")),  # no targets: the faster way
    (0.20, 0.30, 0.010, 0.020, 10, NONE, (False, "local-faster")),
    (0.20, 0.20, 0.010, 0.020, 10, NONE, (False, "local-faster")),  # a tie stays local (no second pod)
    (0.20, 0.30, 0.030, 0.039, 10, TPOT, (True, "protect-tpot")),  # local pushes d over 0.95 x 40 ms
    (0.20, 0.30, 0.030, 0.037, 10, TPOT, (False, "local-faster")),  # local keeps d under it
    (0.20, 0.30, 0.030, 0.039, 0, TPOT, (False, "local-faster")),  # nothing decodes on d: nothing to protect
    (0.20, 0.30, 0.045, 0.050, 10, TPOT, (False, "local-faster")),  # d misses anyway: a leg protects nothing
    (0.20, 1.50, 0.030, 0.039, 10, BOTH, (False, "local-faster")),  # the leg would miss the TTFT local meets
    (0.20, 0.90, 0.030, 0.039, 10, BOTH, (True, "protect-tpot")),  # the leg meets both targets
    (1.20, 1.50, 0.030, 0.039, 10, BOTH, (False, "local-faster")),  # both miss the TTFT: the faster way
    (1.50, 1.20, 0.030, 0.039, 10, BOTH, (True, "split-faster")),
])
def test_rule(local, split, tpot, local_tpot, running, slo, want):
    assert slo_verdict(local, split, tpot, local_tpot, running, slo, 0.05) == want


@pytest.mark.parametrize("local,split,ratio,want", [
    (0.20, 0.39, 2.0, (True, "protect-tpot")),  # the leg costs this request under 2x its local TTFT
    (0.20, 0.41, 2.0, (False, "local-faster")),  # over 2x: the faster way, whatever the TTFT target allows
    (0.20, 0.41, 3.0, (True, "protect-tpot")),
])
def test_a_protecting_leg_costs_at_most_the_ratio_of_local_ttft(local, split, ratio, want):
    assert slo_verdict(local, split, 0.030, 0.039, 10, BOTH, 0.05, ratio) == want


def test_prefill_rate_is_a_decayed_rate_per_slot():
    r = PrefillRate(5.0)
    assert r.at(0, 0.0) == 0.0 and r.at(9, 0.0) == 0.0
    r.observe(1, 0.5, 0.0)
    r.observe(1, 0.5, 0.0)
    assert r.at(1, 0.0) == pytest.approx(1.0 / 5.0)  # 1 s of prefill over a 5 s window
    assert r.at(1, 5.0) == pytest.approx(0.2 * math.exp(-1.0))
    assert r.at(0, 5.0) == 0.0 and r.at(2, 5.0) == 0.0
    r.observe(1, 1.0, 5.0)  # decayed, then the new prefill added
    assert r.at(1, 5.0) == pytest.approx(0.2 * math.exp(-1.0) + 0.2)
    r.observe(7, 1.0, 5.0)  # a slot past the table grows it
    assert r.at(7, 5.0) == pytest.approx(0.2) and r.at(7, 10.0) == pytest.approx(0.2 * math.exp(-1.0))
    r.observe(3, float("nan"), 5.0)
    r.observe(3, -1.0, 5.0)
    assert r.at(3, 5.0) == 0.0
    with pytest.raises(ValueError):
        PrefillRate(0.0)


def test_tpot_with_arrivals():
    # n x tpot + stall + rate x T = T over the decode
    assert tpot_with_arrivals(0.020, 0.5, 100.0, 0.25) == pytest.approx((0.020 + 0.005) / 0.75)
    assert tpot_with_arrivals(0.020, 0.5, 100.0, 0.0) == pytest.approx(0.025)
    assert tpot_with_arrivals(0.020, 0.0, 100.0, 5.0) == pytest.approx(0.2)  # share capped at 0.9


# ---- the handler on hand-built fleets --------------------------------------------------------------------
def test_idle_fleet_keeps_a_long_prompt_local_and_explains_both_ways():
    s, _ = slo_scheduler()
    d = s.decide(request("r", toks(8192)))
    assert d.prefill is None and d.state.pd.reason == "local-faster"
    pdx = d.explanation["_pd"]
    # local = the cost model's TTFT of the prompt alone on an idle H100 (8B), within 2 %
    alone = CostModel("llama-3.1-8b", "H100").time_to_first_token(8192)
    assert pdx["local-ttft-ms"] == pytest.approx(alone * 1e3, rel=0.02)
    # split = the same prefill on the (idle, same kind) prefill pod + KV transfer + hop + a decode step
    v = d.state.pd
    assert v.split_ttft_s > v.local_ttft_s
    assert v.split_ttft_s - v.local_ttft_s == pytest.approx(
        d.explanation[P0]["pd-transfer-ms"] / 1e3 + 0.002 + v.local_tpot_s, rel=0.15)


def test_decode_pods_full_of_decodes_send_a_long_prompt_to_the_idle_prefill_pod():
    s, clock = slo_scheduler()
    dl = s.dl
    for pod in (D0, D1):  # batches so large that a local prefill gets a small share of each step
        dl.metrics.update(pod, PodMetrics(waiting=0, running=2000, kv_usage=0.3), clock.now())
    d = s.decide(request("r", toks(8192)))
    assert d.prefill == P0 and d.state.pd.reason == "split-faster"
    v = d.state.pd
    assert v.split_ttft_s < v.local_ttft_s


def test_a_queue_on_the_decode_pod_counts_on_both_ways():
    s, clock = slo_scheduler()
    dl = s.dl
    for i, pod in enumerate((D0, D1)):  # 30K tokens of local prefill queued on each decode pod
        dl.inflight.add(f"q{i}", dl.endpoints.slot(pod), None, 30_000, 10, clock.now())
    d = s.decide(request("r", toks(8192)))
    v = d.state.pd
    wait_d = float(d.state.predictions["auto"].wait_s[dl.endpoints.slot(d.primary)])
    assert wait_d > 0.5 and v.split_ttft_s > wait_d + 0.3  # the leg waits for d's queue after its prefill
    assert d.prefill is None and v.reason == "local-faster"


def test_saturated_prefill_pod_keeps_a_long_prompt_local():
    s, clock = slo_scheduler()
    dl = s.dl
    dl.inflight.add("q", dl.endpoints.slot(D1), dl.endpoints.slot(P0), 300_000, 10, clock.now())
    d = s.decide(request("r", toks(8192)))
    assert d.prefill is None and d.state.pd.reason == "local-faster"
    assert d.state.pd.split_ttft_s > 5.0 > d.state.pd.local_ttft_s


def test_short_new_turn_cached_on_the_decode_pod_stays_local_whatever_its_length():
    s, clock = slo_scheduler()
    first = s.decide(request("a", toks(8192)))
    s.on_first_token(first, clock.now())
    turn = s.decide(request("b", toks(8192) + toks(300, 50_000)))
    assert turn.primary == first.primary and turn.prefill is None
    assert turn.state.pd.reason == "local-faster" and turn.state.pd.uncached < 400


def test_tpot_target_protects_the_decode_pods_running_requests():
    s, clock = slo_scheduler()
    dl = s.dl
    for pod in (D0, D1):
        dl.metrics.update(pod, PodMetrics(waiting=0, running=64, kv_usage=0.3), clock.now())
    prompt = toks(8192)
    free = s.decide(request("r0", prompt))  # no target: the faster way, local
    v = free.state.pd
    assert not v.leg and v.local_tpot_s > 0
    tpot_d = float(free.state.predictions["auto"].tpot_s[dl.endpoints.slot(free.primary)])
    assert v.local_tpot_s > tpot_d  # the local prefill's stall, spread over a mean decode
    # a TPOT target between the two: local prefill would break it, a leg keeps it
    target_ms = (tpot_d + v.local_tpot_s) / 2 / 0.95 * 1e3
    hdr = {"x-slo-tpot-ms": f"{target_ms:.3f}"}
    d = s.decide(request("r1", toks(8192, 10**6), headers=hdr))
    assert d.prefill == P0 and d.state.pd.reason == "protect-tpot"
    # the same, but the leg would miss a TTFT target that local prefill meets: local
    ttft_ms = (v.local_ttft_s + v.split_ttft_s) / 2 * 1e3
    d2 = s.decide(request("r2", toks(8192, 2 * 10**6), headers={**hdr, "x-slo-ttft-ms": f"{ttft_ms:.1f}"}))
    assert d2.prefill is None and d2.state.pd.reason == "local-faster"


def _warm_prefill_pod(s, clock, prompt):
    """A first request through the prefill pod (both decode pods so busy that the leg is faster): the prompt
    is then cached on the prefill pod and on the leg's decode pod; returns that decode pod."""
    dl = s.dl
    for pod in (D0, D1):
        dl.metrics.update(pod, PodMetrics(waiting=0, running=2000, kv_usage=0.3), clock.now())
    first = s.decide(request("a", prompt))
    assert first.prefill == P0
    s.on_first_token(first, clock.now())
    s.on_finished(first, None, clock.now())
    for pod in (D0, D1):
        dl.metrics.update(pod, PodMetrics(waiting=0, running=0, kv_usage=0.0), clock.now())
    return first.primary


@pytest.mark.parametrize("pair", [True, False])
def test_a_leg_decodes_on_the_quiet_pod_when_the_warm_one_has_a_queue(pair):
    s, clock = slo_scheduler(pair=pair)
    dl = s.dl
    prompt = toks(8192)
    warm = _warm_prefill_pod(s, clock, prompt)
    quiet = D1 if warm == D0 else D0
    dl.inflight.add("q", dl.endpoints.slot(warm), None, 6000, 10, clock.now())  # ~0.2 s of prefill queued
    d = s.decide(request("b", prompt + toks(256, 50_000)))
    v = d.state.pd
    pred = d.state.predictions["auto"]
    assert d.explanation[P0]["pd-ttft-ms"] < 100  # the prefill pod holds the prompt: only the new turn
    if pair:
        # a leg to the warm pod would wait for its queue after the prefill (slower than local), one to the
        # quiet pod moves the whole KV there and is the fastest way: the conversation moves with it
        assert d.prefill == P0 and d.primary == quiet and d.endpoints[1] == warm
        assert v.reason == "split-faster" and v.split_ttft_s < v.local_ttft_s
        assert v.split_ttft_s < float(pred.wait_s[dl.endpoints.slot(warm)])
    else:
        assert d.prefill is None and d.primary == warm and v.reason == "local-faster"


def test_local_prefills_arriving_on_the_decode_pod_count_against_its_tpot():
    def fleet_after_one_local_prefill():
        s, clock = scheduler({"handler": {"type": "prefill-decode"}, "predictor": {"correction": False}},
                             [Endpoint(P0, role="prefill"), Endpoint(D0, role="decode")])
        s.dl.metrics.update(D0, PodMetrics(waiting=0, running=64, kv_usage=0.3), clock.now())
        base = s.decide(request("r0", toks(8192)))  # no target: local, and counted in the pod's rate
        assert base.prefill is None
        return s, clock, base

    s, clock, base = fleet_after_one_local_prefill()
    slot = s.dl.endpoints.slot(D0)
    rate = s.handler.local_prefill.at(slot, clock.now())
    assert rate == pytest.approx(float(base.state.predictions["auto"].prefill_s[slot]) / s.handler.arrival_window_s)
    probe = s.decide(request("r1", toks(4096, 10**6)))  # no target: local
    v = probe.state.pd
    assert not v.leg
    without = v.local_tpot_s * (1.0 - min(rate, 0.9))  # the queue and this prefill spread over the decode, no arrivals
    assert without < v.local_tpot_s
    # the same request with a TPOT target between the two, on the same fleet: the arrivals break it
    target_ms = (without + v.local_tpot_s) / 2 / 0.95 * 1e3
    s, clock, _ = fleet_after_one_local_prefill()
    d = s.decide(request("r1", toks(4096, 10**6), headers={"x-slo-tpot-ms": f"{target_ms:.3f}"}))
    assert d.state.pd.local_tpot_s == pytest.approx(v.local_tpot_s)
    assert d.state.pd.reason == "protect-tpot" and d.prefill == P0


def test_always_and_never():
    s, _ = slo_scheduler(decider="always")
    d = s.decide(request("r", toks(20)))
    assert d.prefill == P0 and d.state.pd.reason == "always"
    s2, _ = slo_scheduler(decider="never")
    d2 = s2.decide(request("r", toks(20_000)))
    assert d2.prefill is None and d2.state.pd.reason == "never"


# ---- SLO-aware routing (slo-fit, in the default profile) ---------------------------------------------------
H1, H2, A1 = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"


def mixed() -> list[Endpoint]:
    return [Endpoint(H1, accelerator="H100"), Endpoint(H2, accelerator="H100"), Endpoint(A1, accelerator="A100")]


def test_without_targets_the_scorer_is_inert():
    s, _ = scheduler({"predictor": {"correction": False}}, mixed())
    d = s.decide(request("r", toks(4096)))
    assert d.primary in (H1, H2)  # the fastest TTFT
    assert all(row.get("slo-fit", 0.0) == 0.0 for k, row in d.explanation.items() if not k.startswith("_"))


def test_a_request_with_slack_prefers_the_slower_kind_that_meets_it():
    s, _ = scheduler({"predictor": {"correction": False}}, mixed())
    d = s.decide(request("r", toks(4096), headers={"x-slo-ttft-ms": "5000"}))
    assert d.explanation[A1]["slo-fit"] == 1.0 and 0 < d.explanation[H1]["slo-fit"] < 1.0
    # a preference by score (weight 2), not a tier: every pod meets the target, none is lifted above the rest
    for a in (H1, H2, A1):
        row = d.explanation[a]
        assert row["total"] == pytest.approx(
            3 * row["ttft"] + 2 * row["tpot"] + 2 * row["spread"] + 2 * row["prefix"] + row["kv-usage"]
            + 2 * row["slo-fit"] + 5 * row["rank-balance"] + 5 * row["replicate"],
            abs=1e-3)
    # a target only the H100s meet: an H100
    h = CostModel("llama-3.1-8b", "H100").time_to_first_token(4096)
    a = CostModel("llama-3.1-8b", "A100").time_to_first_token(4096)
    assert h < a
    tight = f"{(h + a) / 2 * 1e3:.1f}"
    d2 = s.decide(request("r2", toks(4096, 10**6), headers={"x-slo-ttft-ms": tight}))
    assert d2.primary in (H1, H2) and d2.explanation[A1]["slo-fit"] == 0.0


def test_a_pod_predicted_to_miss_the_tpot_target_loses_to_one_that_meets_it_whatever_its_prefix():
    eps = [Endpoint(H1), Endpoint(H2)]
    s, clock = scheduler({"predictor": {"correction": False}}, eps)
    dl = s.dl
    prompt = toks(8192)
    warm = s.decide(request("w", prompt))
    s.on_first_token(warm, clock.now())
    hot = warm.primary
    cold = H2 if hot == H1 else H1
    dl.metrics.update(hot, PodMetrics(waiting=0, running=200, kv_usage=0.5), clock.now())
    dl.metrics.update(cold, PodMetrics(waiting=0, running=0, kv_usage=0.0), clock.now())
    follow = prompt + toks(64, 70_000)
    free = s.decide(request("f", follow))
    assert free.primary == hot  # no target: the prefix wins (TTFT and prefix)
    pred = free.state.predictions["auto"]
    tp_hot, tp_cold = (float(pred.tpot_s[dl.endpoints.slot(x)]) for x in (hot, cold))
    assert tp_hot > tp_cold
    target = f"{(tp_hot + tp_cold) / 2 * 1e3:.3f}"
    d = s.decide(request("t", follow, headers={"x-slo-tpot-ms": target}))
    assert d.primary == cold and d.endpoints[1] == hot  # the one that misses stays a fallback, after it
    # none meets a target below both: the least late (the idle pod)
    d2 = s.decide(request("t2", follow, headers={"x-slo-tpot-ms": f"{tp_cold * 0.5 * 1e3:.3f}"}))
    assert d2.primary == cold and d2.explanation[cold]["slo-fit"] == 1.0
