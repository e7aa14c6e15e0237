"""Speculative decoding in the simulator holds the cost model's TPOT prediction (engine.costmodel.speculative)."""

from __future__ import annotations

import pytest

from engine.costmodel import CostModel
from engine.costmodel.speculative import Speculative, tpot_seconds
from engine.sim.core import EngineConfig, EngineCore, SimRequest

BATCH, PROMPT, OUT = 16, 256, 400


def _decode(spec: Speculative | None) -> tuple[float, float]:
    """(mean TPOT over the requests, tokens per request per decode step) of one batch decoding together."""
    cost = CostModel("8b", "H100")
    core = EngineCore(cost, EngineConfig(num_blocks=4096, speculative=spec))
    for i in range(BATCH):
        core.add_request(SimRequest(f"r{i}", [(i * 7 + j) % 30000 + 1 for j in range(PROMPT)], OUT,
                                    ignore_eos=True, seed=i))
    now, first, done = 0.0, {}, {}
    steps: dict[str, int] = {}
    while core.has_work():
        res = core.step(now)
        now = res.end
        for o in res.outputs:
            if o.request_id in first:
                steps[o.request_id] = steps.get(o.request_id, 0) + 1  # a decode step of this request
            first.setdefault(o.request_id, o.time)
            if o.finished:
                done[o.request_id] = o.time
    tpot = sum((done[r] - first[r]) / (OUT - 1) for r in done) / len(done)
    return tpot, sum((OUT - 1) / steps[r] for r in done) / len(done)


def test_tpot_with_and_without_speculation_matches_the_cost_model():
    cost = CostModel("8b", "H100")
    kv = BATCH * (PROMPT + OUT / 2)  # the batch's mean context over the decode
    plain, _ = _decode(None)
    assert plain == pytest.approx(tpot_seconds(cost, BATCH, kv), rel=0.05)
    spec = Speculative("eagle3", 3, acceptance=0.7, draft_cost=1 / 32)
    fast, per_step = _decode(spec)
    assert per_step == pytest.approx(spec.tokens_per_step, rel=0.05)  # 1 + .7 + .49 + .343 = 2.53
    assert fast == pytest.approx(tpot_seconds(cost, BATCH, kv, spec), rel=0.07)
    assert fast < 0.6 * plain  # memory-bound decode: verifying 4 tokens costs about what 1 does


def test_no_acceptance_is_slower_than_no_speculation():
    cost = CostModel("8b", "H100")
    spec = Speculative("draft_model", 3, acceptance=0.0, draft_cost=0.2)
    assert tpot_seconds(cost, BATCH, BATCH * 400, spec) > tpot_seconds(cost, BATCH, BATCH * 400)
    slow, per_step = _decode(spec)
    assert per_step == pytest.approx(1.0) and slow > _decode(None)[0]
