"""The running decodes' KV and the step in progress (pickers/predictor.py's docstring).

One configured mean context for every pod over-predicted the steps of pods that serve short prompts (the
mixed fleet: A100 pods with ~40-token prompts, H100 pods with ~16K, 15.4K configured): with
``kv_from_metrics`` the predictor reads what each pod holds from its kv_usage (off by default: predictive
admission's calibration depends on the configured one). A request reaching a busy pod waits for the end of
the step in progress; on an idle pod it does not.
"""

from __future__ import annotations

import math

import pytest

from engine.costmodel import CostModel
from pickers.datalayer import PodMetrics
from pickers.framework import CycleContext
from tests.pickers.helpers import endpoints, request, scheduler, state

A, B = "10.0.0.1:8000", "10.0.0.2:8000"
PROMPT = 64


def _fleet(ctx_tokens: float = 15_400.0, kv_from_metrics: bool = True):
    eps = endpoints(2, accelerator="A100", model_profile="llama-3.1-8b")
    s, clock = scheduler({"profile": "default", "predictor": {"decode_context_tokens": ctx_tokens}}, eps)
    s.dl.predictor.settings.kv_from_metrics = kv_from_metrics
    return s, clock


def _two_mixes(s, clock) -> float:
    """Both pods run 8 decodes; A holds 8 x 300 tokens of context, B 8 x 15,000. Returns the capacity."""
    dl = s.dl
    cap = float(dl.costs.kv_capacity[dl.endpoints.slot(A)])
    dl.metrics.update(A, PodMetrics(waiting=0, running=8, kv_usage=8 * 300 / cap), clock.now())
    dl.metrics.update(B, PodMetrics(waiting=0, running=8, kv_usage=8 * 15_000 / cap), clock.now())
    return cap


def _predict(s, clock):
    return CycleContext(state(request("probe", list(range(PROMPT)))), s.dl, clock.now()).prediction("auto")


def test_tpot_reads_the_kv_each_pod_holds_not_one_configured_mean():
    s, clock = _fleet()
    dl = s.dl
    _two_mixes(s, clock)
    pred = _predict(s, clock)
    cm = CostModel("llama-3.1-8b", "A100")
    a, b = dl.endpoints.slot(A), dl.endpoints.slot(B)
    assert pred.tpot_s[a] == pytest.approx(cm.decode_step_time(9, 8 * 300 + PROMPT), rel=1e-9)
    assert pred.tpot_s[b] == pytest.approx(cm.decode_step_time(9, 8 * 15_000 + PROMPT), rel=1e-9)
    assert pred.tpot_s[a] < 0.95 * pred.tpot_s[b]  # the same batch, far less KV to read


def test_by_default_the_configured_context_stands_whatever_the_pods_hold():
    s, clock = _fleet(kv_from_metrics=False)
    _two_mixes(s, clock)
    pred = _predict(s, clock)
    cm = CostModel("llama-3.1-8b", "A100")
    want = cm.decode_step_time(9, 8 * 15_400 + PROMPT)
    assert pred.tpot_s[s.dl.endpoints.slot(A)] == pytest.approx(want, rel=1e-9)
    assert pred.tpot_s[s.dl.endpoints.slot(B)] == pytest.approx(want, rel=1e-9)


def test_without_a_usage_the_configured_context_stands():
    s, clock = _fleet(ctx_tokens=4_000.0)
    dl = s.dl
    dl.metrics.update(A, PodMetrics(waiting=0, running=8, kv_usage=0.0), clock.now())
    pred = _predict(s, clock)
    cm = CostModel("llama-3.1-8b", "A100")
    assert pred.tpot_s[dl.endpoints.slot(A)] == pytest.approx(cm.decode_step_time(9, 8 * 4_000 + PROMPT), rel=1e-9)


def test_a_busy_pod_adds_the_step_in_progress_and_an_idle_one_does_not():
    s, clock = _fleet(kv_from_metrics=False)  # the default: the step is the one of the KV the pod holds anyway
    dl = s.dl
    cap = float(dl.costs.kv_capacity[dl.endpoints.slot(A)])
    held = 4 * 500.0
    dl.metrics.update(A, PodMetrics(waiting=0, running=4, kv_usage=held / cap), clock.now())
    dl.metrics.update(B, PodMetrics(waiting=0, running=0, kv_usage=0.0), clock.now())
    pred = _predict(s, clock)
    cm = CostModel("llama-3.1-8b", "A100")
    a, b = dl.endpoints.slot(A), dl.endpoints.slot(B)
    step = cm.decode_step_time(4, held)
    assert pred.wait_s[a] == pytest.approx((math.sqrt(2.0) - 1.0) * step, rel=1e-9)
    assert pred.wait_s[b] == 0.0
    # the one-step latency of a short prompt on the busy pod: the residual minimises the expected relative
    # error of base + U[0, step] (the 1/y-weighted median), which predicting no wait does not
    own = pred.ttft_s[a] - pred.wait_s[a]
    u = [i / 1000.0 for i in range(1001)]

    def mape(pred_s: float) -> float:
        return sum(abs(pred_s - (own + x * step)) / (own + x * step) for x in u) / len(u)

    assert mape(pred.ttft_s[a]) < mape(own)
