"""The predictor, vectorised over pods and with its steps stacked into one roofline evaluation, against the
scalar cost model pod by pod (``CostModel.time_to_first_token``, ``decode_step_time``, ``step_time``) and the
kvwait and slotwait formulas written out per pod, on many random fleets and pod states.

What would break it: a stacked argument out of place (a segment's partial last step evaluated with another
segment's tokens, the KV drain's step with the request's decode step), a memoised per-pod term not
refreshed after a scrape or a routed request, a fresh mask, budget or running count taken from the wrong
slot, the scatter into per-slot arrays when some slots are inactive.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from engine.costmodel import CostModel
from pickers.costs import preset_budget, preset_max_seqs
from pickers.datalayer import PodMetrics
from pickers.framework import CycleContext
from pickers.types import Endpoint
from tests.pickers.helpers import request, scheduler, state

KINDS = [("llama-3.1-8b", "H100"), ("llama-3.1-8b", "L40S"), ("llama-3.1-8b", "A100"),
         ("qwen3-30b-a3b", "H100"), ("llama-3.1-70b", "H200")]
ROLES = ["both", "prefill", "decode"]
REL = 1e-9  # the closed form against the step loop: equal up to rounding


def _reference(s, slot: int, ep: Endpoint, p: float, hit: float, now: float, ctx_tokens: float) -> dict[str, float]:
    """Every predicted figure of one pod from the scalar cost model (pickers/predictor.py's docstring)."""
    dl = s.dl
    cm = CostModel(ep.model_profile, ep.accelerator)
    budget = float(ep.max_num_batched_tokens or preset_budget(ep.model_profile, ep.accelerator, ep.role.value))
    fresh = (now - dl.metrics.updated_at[slot]) <= dl.metrics.stale_after_s
    waiting = float(dl.metrics.waiting[slot]) if fresh else 0.0
    per = dl.predictor.mean_prompt if ep.role.value != "decode" else 0.0
    inf = dl.inflight
    q = float(inf.prefill_tokens[slot]) + max(waiting - float(inf.prefill_requests[slot]), 0.0) * per
    running = max(float(dl.metrics.running[slot]) if fresh else 0.0,
                  float(inf.requests[slot] - inf.prefill_requests[slot]))
    r = min(running, 0.9 * budget)
    h = min(hit, p)
    u = max(p - h, 1.0)
    blocks = float(dl.metrics.num_gpu_blocks[slot]) * float(dl.endpoints.block_size[slot])
    cap = blocks if blocks > 0 else float(cm.kv_capacity_tokens)
    held = (float(dl.metrics.kv_usage[slot]) if fresh else 0.0) * cap
    if dl.predictor.settings.kv_from_metrics:  # the running decodes' mean context: what the pod holds
        ctx_tokens = held / r if held > 0 and r > 0 else ctx_tokens
    own = cm.time_to_first_token(p, h, budget=budget, running=r, decode_context=ctx_tokens)
    wait = cm.time_to_first_token(p, h, budget=budget, queued=q, running=r, decode_context=ctx_tokens) - own
    # kvwait.py, one pod
    need = q + u - (cap - held)
    b = max(r, 1.0)
    drain = float(inf.kv_steps[slot]) / max(cap, 1.0) * cm.decode_step_time(b, held)
    kv_wait = min(need / max(held, 1.0), 1.0) * drain if fresh and need > 0 else 0.0
    # slotwait.py, one pod
    seqs = float(ep.max_num_seqs or preset_max_seqs(ep.model_profile, ep.accelerator, ep.role.value))
    k = max(running + waiting, float(inf.requests[slot])) + 1.0 - seqs
    wait = wait + kv_wait
    if fresh and r > 0:  # the step in progress on a busy pod
        wait += (math.sqrt(2.0) - 1.0) * cm.decode_step_time(b, held)
    if k > 0 and ep.role.value != "prefill":
        own_n = float(inf.requests[slot])
        total = float(inf.requests.sum())
        dec = float(inf.decode_tokens[slot]) / own_n if own_n > 0 else (
            float(inf.decode_tokens.sum()) / total if total > 0 else 256.0)
        dec = max(dec, 1.0)
        bs = max(min(running, seqs), 1.0)
        kv = bs * (dl.predictor.mean_prompt + dec / 2.0)
        c = min(q * bs / (k * dec), max(budget - bs, 0.0))
        whole = dec * cm.step_time(bs + c, kv + c * (c + 1.0) / 2.0, kv)
        m = float(inf.decoding[slot])
        slot_wait = k / bs * whole
        if m > 0:
            age = 2.0 * (now - float(inf.decoding_since[slot]) / m) * (1.0 - (k - 0.5) / bs)
            slot_wait = max(slot_wait, whole - max(age, 0.0))
        wait = max(wait, slot_wait)
    alone = cm.time_to_first_token(p, h, budget=budget)
    return {"ttft": wait + own, "wait": wait,
            "prefill": max(alone - cm.step_time(1, 1.0, 0.0), 0.0),
            "tpot": cm.decode_step_time(r + 1.0, r * ctx_tokens + p),
            "uncached": u, "queued": q, "running": r}


def _fleet(rng: np.random.Generator, n: int):
    eps = []
    for i in range(n):
        model, acc = KINDS[int(rng.integers(len(KINDS)))]
        budget = int(rng.choice([0, 512, 2048, 8192]))
        eps.append(Endpoint(f"10.9.0.{i + 1}:8000", model_profile=model, accelerator=acc,
                            role=ROLES[int(rng.integers(3))], max_num_batched_tokens=budget or None))
    return eps


def _load(s, rng: np.random.Generator, eps: list[Endpoint], now: float, tag: str) -> None:
    """Random scrapes (some stale, some with a block count), routed requests, first tokens, finishes."""
    dl = s.dl
    for ep in eps:
        slot = dl.endpoints.slot(ep.id)
        assert slot is not None
        if rng.random() < 0.8:
            age = 0.0 if rng.random() < 0.8 else 10.0  # a stale scrape counts as nothing
            dl.metrics.update(ep.id, PodMetrics(waiting=int(rng.integers(0, 20)), running=int(rng.integers(0, 900)),
                                                kv_usage=float(rng.random()),
                                                num_gpu_blocks=int(rng.choice([0, 2000, 50_000]))), now - age)
        for j in range(int(rng.integers(0, 6))):
            rid = f"{tag}-{slot}-{j}"
            dl.inflight.add(rid, slot, None, float(rng.integers(1, 20_000)), float(rng.integers(1, 2000)), now)
            if rng.random() < 0.5:
                dl.inflight.first_token(rid)
            if rng.random() < 0.2:
                dl.inflight.finish(rid)


@pytest.mark.parametrize("seed", range(12))
def test_vector_predictor_equals_the_scalar_cost_model_pod_by_pod(seed):
    rng = np.random.default_rng(seed)
    eps = _fleet(rng, int(rng.integers(1, 12)))
    s, clock = scheduler({"profile": "default", "predictor": {"correction": False}}, eps)
    dl = s.dl
    if len(eps) > 2 and seed % 3 == 0:  # inactive slots: the per-slot arrays hold zeros there
        dl.endpoints.remove(eps[1].id)
        eps = [e for i, e in enumerate(eps) if i != 1]
    ctx_tokens = dl.predictor.settings.decode_context_tokens
    dl.predictor.settings.kv_from_metrics = seed % 2 == 1  # both ways of reading the running decodes' KV
    for step in range(6):  # the same fleet decided on again and again: nothing memoised may go stale
        _load(s, rng, eps, clock.now(), f"{seed}-{step}")
        p = int(rng.choice([1, 16, 1000, 8192, 8193, 30_000]))
        st = state(request(f"q{step}", list(range(p))))
        n = dl.endpoints.slot_count
        hits = np.zeros(n)
        hits[: n] = rng.integers(0, p + 500, size=n).astype(np.float64)  # more than the prompt: clipped
        st.hits["auto"] = hits
        pred = CycleContext(st, dl, clock.now()).prediction("auto")
        assert pred.ttft_raw_s is None  # no correction: the raw cost model
        for ep in eps:
            slot = dl.endpoints.slot(ep.id)
            ref = _reference(s, slot, ep, float(p), float(hits[slot]), clock.now(), ctx_tokens)
            got = {"ttft": pred.ttft_s[slot], "wait": pred.wait_s[slot], "prefill": pred.prefill_s[slot],
                   "tpot": pred.tpot_s[slot], "uncached": pred.uncached[slot], "queued": pred.queued[slot],
                   "running": pred.running[slot]}
            for key, want in ref.items():
                assert math.isclose(got[key], want, rel_tol=REL, abs_tol=1e-12), (seed, step, ep, key, got[key], want)
        for slot in set(range(n)) - {dl.endpoints.slot(e.id) for e in eps}:
            assert pred.ttft_s[slot] == 0.0 and pred.tpot_s[slot] == 0.0
        clock.advance(float(rng.choice([0.001, 1.0])))


def test_the_correction_is_applied_per_slot_on_top_of_the_raw_prediction():
    eps = [Endpoint(f"10.9.1.{i + 1}:8000", model_profile=m, accelerator=a)
           for i, (m, a) in enumerate(itertools.islice(itertools.cycle(KINDS), 4))]
    s, clock = scheduler({"profile": "default"}, eps)
    cr = s.dl.predictor.correction
    n = s.dl.endpoints.slot_count
    cr.ttft_a[:n], cr.ttft_b[:n] = [0.1, 0.0, 0.2, 0.0], [2.0, 1.0, 0.5, 3.0]
    cr.tpot_a[:n], cr.tpot_b[:n] = [0.0, 0.01, 0.0, 0.0], [1.5, 1.0, 1.0, 0.25]
    pred = CycleContext(state(request("c", list(range(3000)))), s.dl, clock.now()).prediction("auto")
    assert pred.ttft_raw_s is not None and pred.tpot_raw_s is not None
    np.testing.assert_array_equal(pred.ttft_s, cr.ttft_a[:n] + cr.ttft_b[:n] * pred.ttft_raw_s)
    np.testing.assert_array_equal(pred.tpot_s, cr.tpot_a[:n] + cr.tpot_b[:n] * pred.tpot_raw_s)
    assert pred.prefill_s[2] > 0 and pred.prefill_s[0] > 0


def test_memoised_kind_terms_follow_the_fleet():
    """Transfer coefficients (pd_decider) and slo-fit speeds are kept per cost-table version: equal to the
    per-pod values, and recomputed when an endpoint is replaced by one of another kind."""
    from pickers.plugins.pd_decider import transfer_coefficients, transfer_seconds
    from pickers.plugins.score_slo import SLOFitScorer

    eps = [Endpoint(f"10.9.2.{i + 1}:8000", model_profile=m, accelerator=a) for i, (m, a) in enumerate(KINDS)]
    s, _ = scheduler({"profile": "default"}, eps)
    dl = s.dl
    fit = SLOFitScorer()
    fit.bind(dl)
    slots = dl.endpoints.active_slots()

    def check(fleet: list[Endpoint]) -> None:
        got = transfer_seconds(dl, slots, 1000.0, "rdma-400g")
        for i, ep in enumerate(fleet):
            lat, per = transfer_coefficients(ep.model_profile, ep.accelerator, "rdma-400g")
            assert got[i] == lat + per * 1000.0
        np.testing.assert_array_equal(fit.speed(slots.copy()), fit._speeds(slots))

    check(eps)
    before = fit.speed(slots.copy())
    eps2 = [*eps[:-1], Endpoint(eps[-1].address, model_profile="llama-3.1-8b", accelerator="L40S")]
    dl.endpoints.sync(eps2)
    slots = dl.endpoints.active_slots()
    check([e for e in eps2 if dl.endpoints.slot(e.id) is not None])
    assert not np.array_equal(fit.speed(slots.copy()), before)


def test_per_cycle_memos_do_not_outlive_their_inputs():
    """slo-fit's lateness is kept for one cycle (state and candidates), the ledger's expected output until
    the next observed output: a new request, or a new output, gets new values."""
    from pickers.plugins.admission_slo import DecodeLedger
    from pickers.plugins.score_slo import SLOFitScorer
    from pickers.state import SLOTargets

    eps = [Endpoint(f"10.9.3.{i + 1}:8000", model_profile=m, accelerator=a) for i, (m, a) in enumerate(KINDS[:3])]
    s, clock = scheduler({"profile": "default"}, eps)
    fit = SLOFitScorer()
    fit.bind(s.dl)
    cands = s.dl.endpoints.active_slots()
    lates = []
    for n, ttft in ((500, 1.0), (20_000, 1.0), (20_000, 0.1)):
        st = state(request(f"m{n}-{ttft}", list(range(n))))
        st.slo = SLOTargets(ttft, None)
        ctx = CycleContext(st, s.dl, clock.now())
        late = fit.lateness(ctx, cands)
        assert late is fit.lateness(ctx, cands)  # the same cycle: computed once
        np.testing.assert_array_equal(late, fit._lateness(ctx, cands))
        lates.append(late)
    assert not np.array_equal(lates[0], lates[1]) and not np.array_equal(lates[1], lates[2])

    led = DecodeLedger(outputs_window=8)
    assert led.expected_output(100, 256.0) == 100.0
    led.observe_output(10)
    assert led.expected_output(100, 256.0) == 10.0 and led.expected_output(5, 256.0) == 5.0
    led.observe_output(30)
    assert led.expected_output(100, 256.0) == 20.0


@pytest.mark.parametrize("seed", range(4))
def test_a_time_scale_scales_every_predicted_latency_by_it(seed):
    """Simulated pods replaying at time scale k run k x slower than their cost model: with
    ``predictor.time_scale: k`` every step is k x longer, so TTFT, its queue wait, the prefill and the TPOT all
    are k x the unscaled prediction (pods with free sequence slots: the slot wait reads clock ages instead)."""
    rng = np.random.default_rng(100 + seed)
    eps = _fleet(rng, 5)
    preds = []
    for scale in (1.0, 2.5):
        s, clock = scheduler({"profile": "default", "predictor": {"correction": False, "time_scale": scale}}, eps)
        r = np.random.default_rng(seed)  # the same load on both
        for ep in eps:
            s.dl.metrics.update(ep.id, PodMetrics(waiting=int(r.integers(0, 20)), running=int(r.integers(0, 200)),
                                                  kv_usage=float(r.random())), clock.now())
            slot = s.dl.endpoints.slot(ep.id)
            s.dl.inflight.add(f"x{slot}", slot, None, float(r.integers(1, 20_000)), 100.0, clock.now())
        preds.append(CycleContext(state(request("q", list(range(5000)))), s.dl, clock.now()).prediction("auto"))
    one, scaled = preds
    assert one.ttft_s.max() > 0
    for key in ("ttft_s", "wait_s", "prefill_s", "tpot_s"):
        np.testing.assert_allclose(getattr(scaled, key), 2.5 * getattr(one, key), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(scaled.queued, one.queued)


def test_a_time_scale_scales_a_legs_kv_transfer_too():
    """The P/D decider weighs a leg's KV transfer against the predicted prefill: both are the pods' wall
    seconds, so at time scale k the transfer is k x the cost model's too (unscaled, a local stack whose pods run
    20x faster than their profile predicted every prefill 20x shorter and the same transfer, and never took a
    leg: e2e/test_pd_security.py)."""
    from pickers.plugins.pd_decider import transfer_seconds

    got = []
    for scale in (1.0, 0.05):
        s, _ = scheduler({"profile": "default", "predictor": {"time_scale": scale}})
        got.append(transfer_seconds(s.dl, s.dl.endpoints.active_slots(), 4096.0, "rdma-400g"))
    assert got[0].min() > 0
    np.testing.assert_allclose(got[1], 0.05 * got[0], rtol=1e-12)
