"""The predictor's queue and KV-wait terms: what concentrated an overloaded fleet's requests on one pod.

Past the knee the queue estimate took max(own in-flight tokens, waiting x mean prompt): a pod holding many
short waiting requests looked as busy as one holding as many average ones, while a pod holding a few long
ones looked idle, so long prompts piled onto the pods whose queues were really longest.
"""

from __future__ import annotations

import pytest

from engine.costmodel import CostModel
from pickers.datalayer import PodMetrics
from pickers.framework import CycleContext
from tests.pickers.helpers import endpoints, request, scheduler, state

SHORT, LONG = "10.0.0.1:8000", "10.0.0.2:8000"


def _fleet():
    eps = endpoints(2, accelerator="L40S", model_profile="llama-3.1-8b")
    s, clock = scheduler({"profile": "default"}, eps)
    return s, clock


def _ctx(s, clock, tokens: int) -> CycleContext:
    return CycleContext(state(request("probe", list(range(tokens)))), s.dl, clock.now())


def _load(s, clock, short_n: int = 100, short_tokens: int = 100, long_n: int = 5, long_tokens: int = 20_000) -> None:
    dl = s.dl
    a, b = dl.endpoints.slot(SHORT), dl.endpoints.slot(LONG)
    for i in range(short_n):
        dl.inflight.add(f"s{i}", a, None, short_tokens, 64, clock.now())
    for i in range(long_n):
        dl.inflight.add(f"l{i}", b, None, long_tokens, 64, clock.now())
    dl.metrics.update(SHORT, PodMetrics(waiting=short_n, running=0, kv_usage=0.1), clock.now())
    dl.metrics.update(LONG, PodMetrics(waiting=long_n, running=0, kv_usage=0.1), clock.now())


def test_queue_counts_own_requests_by_their_tokens_not_the_mean_prompt():
    s, clock = _fleet()
    s.dl.predictor.mean_prompt = 15_000.0  # a pool whose average prompt is long
    _load(s, clock)  # 100 x 100 tokens queued on SHORT, 5 x 20,000 on LONG
    pred = _ctx(s, clock, 2048).prediction("auto")
    a, b = s.dl.endpoints.slot(SHORT), s.dl.endpoints.slot(LONG)
    assert pred.queued[a] < 11_000 and pred.queued[b] >= 100_000  # their own tokens, not 100 x 15,000
    assert pred.ttft_s[a] < pred.ttft_s[b] / 5


def test_waiting_requests_the_picker_did_not_send_count_at_the_mean_prompt():
    s, clock = _fleet()
    s.dl.predictor.mean_prompt = 1_000.0
    _load(s, clock, short_n=2, short_tokens=100, long_n=0)
    s.dl.metrics.update(SHORT, PodMetrics(waiting=12, running=0, kv_usage=0.1), clock.now())  # 10 from elsewhere
    pred = _ctx(s, clock, 64).prediction("auto")
    a = s.dl.endpoints.slot(SHORT)
    assert 10_000 <= pred.queued[a] <= 10_000 + 2 * 100 + 64  # 10 unknown x the mean + its own 2 x 100


def test_a_full_cache_adds_the_decode_drain_to_ttft_and_an_empty_one_does_not():
    s, clock = _fleet()
    dl = s.dl
    a, b = dl.endpoints.slot(SHORT), dl.endpoints.slot(LONG)
    cap = s.dl.costs.kv_capacity[b]
    for i in range(20):  # 20 running requests with 500 tokens left each on both pods, a full cache of them on b
        for slot in (a, b):
            dl.inflight.add(f"r{slot}-{i}", slot, None, cap / 20 - 250, 500, clock.now())
            dl.inflight.first_token(f"r{slot}-{i}")
    dl.metrics.update(SHORT, PodMetrics(waiting=0, running=20, kv_usage=0.2), clock.now())
    dl.metrics.update(LONG, PodMetrics(waiting=0, running=20, kv_usage=1.0), clock.now())
    pred = _ctx(s, clock, 4096).prediction("auto")
    extra = pred.ttft_s[b] - pred.ttft_s[a]
    # the full pod frees the 4096 tokens this prompt needs as its 20 requests (500 decode steps of a full
    # cache, ~35 s) end: 4096 / cap of that drain, a fraction of a second; the pod with room adds nothing
    assert 0.3 < extra < 3.0 and extra > 0.5 * 4096 / cap * 500 * 0.05
    # the pod with room: only the step in progress, (sqrt 2 - 1) x one decode step of its 20 requests
    step = CostModel("llama-3.1-8b", "L40S").decode_step_time(20, 0.2 * s.dl.costs.kv_capacity[a])
    assert pred.wait_s[a] == pytest.approx((2 ** 0.5 - 1.0) * step, rel=1e-9)


def test_the_kv_drain_follows_the_kv_the_requests_hold_not_their_count():
    """Two full pods with the same decode tokens in flight and the same queue: one runs short prompts, the
    other long ones. Long contexts leave room for fewer sequences at once, so the same decode tokens take
    longer to get through; a drain counted in decode tokens per running request saw the two pods alike
    (pickers/kvwait.py: on the Mooncake trace past the knee it was off 1.2-2.5x pod by pod)."""
    s, clock = _fleet()
    dl = s.dl
    short, long_ = dl.endpoints.slot(SHORT), dl.endpoints.slot(LONG)
    for i in range(40):
        for slot, prompt in ((short, 500), (long_, 8000)):
            dl.inflight.add(f"{slot}-{i}", slot, None, prompt, 400, clock.now())
            dl.inflight.first_token(f"{slot}-{i}")
    for addr in (SHORT, LONG):  # the same cache, full, the same batch running and the same queue
        dl.metrics.update(addr, PodMetrics(waiting=20, running=40, kv_usage=1.0), clock.now())
    assert dl.inflight.decode_tokens[short] == dl.inflight.decode_tokens[long_]
    kv_short, kv_long = 40 * (500 + 200) * 400, 40 * (8000 + 200) * 400
    assert dl.inflight.kv_steps[short] == kv_short and dl.inflight.kv_steps[long_] == kv_long
    pred = _ctx(s, clock, 1024).prediction("auto")
    # no free cache on either: each waits for the share of its drain that frees the queue and this prompt,
    # the same share on both (the same queue), so only the drains differ
    cap = dl.costs.kv_capacity[long_]
    share = (pred.queued[long_] + pred.uncached[long_]) / cap
    assert pred.queued[long_] == pred.queued[short] and 0 < share < 1
    step = CostModel("llama-3.1-8b", "L40S").decode_step_time(40, cap)
    assert pred.wait_s[long_] - pred.wait_s[short] == pytest.approx(share * (kv_long - kv_short) / cap * step,
                                                                    rel=1e-6)
