"""The sequence-slot wait (pickers/slotwait.py): a pod running max_num_seqs sequences with free KV.

What it guards: the shared-prefix curve at 3x the knee (virtual time, 4 L40S pods, 1,000 requests) sent the
last second's arrivals to a pod that ran its 256 sequences with free KV, because it held their prefix and
the KV wait saw room; they waited ~25 s for a slot while the other pods had free ones.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.costmodel import CostModel
from pickers.datalayer import PodMetrics
from pickers.datalayer.inflight import InflightTracker
from pickers.framework import CycleContext
from pickers.types import Endpoint, Role
from tests.pickers.helpers import endpoints, request, scheduler, state

FULL, FREE = "10.0.0.1:8000", "10.0.0.2:8000"
PROMPT, PREFIX, OUTPUT = 4608, 4096, 128


def _fleet(**kw):
    eps = endpoints(2, accelerator="L40S", model_profile="llama-3.1-8b", **kw)
    s, clock = scheduler({"profile": "default", "predictor": {"correction": False}}, eps)
    s.dl.predictor.mean_prompt = float(PROMPT)
    return s, clock


def _decoding(s, clock, addr: str, n: int, waiting: int = 0) -> None:
    """``n`` requests of this picker start decoding on ``addr`` now, ``waiting`` more are queued."""
    dl = s.dl
    slot = dl.endpoints.slot(addr)
    for i in range(n):
        dl.inflight.add(f"{addr}-r{i}", slot, None, PROMPT - PREFIX, OUTPUT, clock.now())
        dl.inflight.first_token(f"{addr}-r{i}")
    for i in range(waiting):
        dl.inflight.add(f"{addr}-w{i}", slot, None, PROMPT - PREFIX, OUTPUT, clock.now())


def _scrape(s, clock, addr: str, running: int, waiting: int = 0) -> None:
    s.dl.metrics.update(addr, PodMetrics(waiting=waiting, running=running, kv_usage=0.5), clock.now())


def _predict(s, clock, hit_on: str | None = FULL):
    st = state(request("probe", list(range(PROMPT))))
    hits = np.zeros(s.dl.endpoints.slot_count)
    if hit_on is not None:
        hits[s.dl.endpoints.slot(hit_on)] = PREFIX
    st.hits["auto"] = hits
    return CycleContext(st, s.dl, clock.now()).prediction("auto")


def test_a_pod_at_max_num_seqs_with_free_kv_is_slower_than_one_with_free_slots():
    """FULL holds the prompt's prefix and has free KV but runs 256 sequences (2 more waiting) that started
    2 s ago: the new request starts only when one of them ends, most of a 128-token output away at ~0.27 s a
    step. FREE has 56 free slots and no prefix. Without the slot wait FULL looked faster (prefix cached)."""
    s, clock = _fleet()
    _decoding(s, clock, FULL, 256, waiting=2)
    _decoding(s, clock, FREE, 200)
    clock.advance(2.0)
    _scrape(s, clock, FULL, 256, 2)
    _scrape(s, clock, FREE, 200)
    pred = _predict(s, clock)
    a, b = s.dl.endpoints.slot(FULL), s.dl.endpoints.slot(FREE)
    step = CostModel("llama-3.1-8b", "L40S").decode_step_time(256, int(256 * (PROMPT + OUTPUT / 2)))
    assert 0.2 < step < 0.4
    # the 3rd oldest of 256 sequences that started 2 s ago (their ages taken as spread evenly up to twice
    # the mean): its whole output at this pace, less up to 4 s
    assert OUTPUT * step - 4.0 < pred.wait_s[a] < OUTPUT * step * 1.1
    assert pred.wait_s[b] < 1.0
    assert pred.ttft_s[a] > 10 * pred.ttft_s[b]


def test_old_sequences_free_their_slots_sooner_than_young_ones():
    young, clock = _fleet()
    _decoding(young, clock, FULL, 256)  # all started 1 s ago: the first ends most of an output away
    clock.advance(1.0)
    _scrape(young, clock, FULL, 256)
    old, clock2 = _fleet()
    for i in range(256):  # one started every 30 / 256 s: the oldest is 30 s into its ~35 s output
        old.dl.inflight.add(f"o{i}", old.dl.endpoints.slot(FULL), None, 512, OUTPUT, clock2.now())
        old.dl.inflight.first_token(f"o{i}")
        clock2.advance(30.0 / 256)
    _scrape(old, clock2, FULL, 256)
    a = young.dl.endpoints.slot(FULL)
    w_young, w_old = _predict(young, clock).wait_s[a], _predict(old, clock2).wait_s[a]
    whole = OUTPUT * CostModel("llama-3.1-8b", "L40S").decode_step_time(256, int(256 * (PROMPT + OUTPUT / 2)))
    assert whole - 2.0 < w_young < whole
    assert whole - 30.0 - 0.5 < w_old < whole - 30.0 + 1.0


def test_a_free_slot_means_no_slot_wait_and_the_endpoint_sets_the_limit():
    s, clock = _fleet()
    _decoding(s, clock, FULL, 255)  # one slot free
    clock.advance(1.0)
    _scrape(s, clock, FULL, 255)
    assert _predict(s, clock).wait_s[s.dl.endpoints.slot(FULL)] < 1.0
    big, clock2 = _fleet(max_num_seqs=512)  # vLLM --max-num-seqs 512: 256 running leave room
    _decoding(big, clock2, FULL, 300)
    clock2.advance(1.0)
    _scrape(big, clock2, FULL, 300)
    assert _predict(big, clock2).wait_s[big.dl.endpoints.slot(FULL)] < 1.0
    assert big.dl.costs.max_seqs[big.dl.endpoints.slot(FULL)] == 512.0
    assert s.dl.costs.max_seqs[s.dl.endpoints.slot(FULL)] == 256.0  # the preset's


def test_waiting_beyond_the_batch_waits_for_the_drain_in_steady_state():
    """Without ages (other routers' sequences: none of this picker's decoding there) the steady state: k
    sequences of b end in k / b of an output."""
    s, clock = _fleet()
    s.dl.predictor.settings.waiting_prompt_tokens = 1.0  # short queued prompts: the slots bind, not the queue
    s.dl.metrics.update(FULL, PodMetrics(waiting=127, running=256, kv_usage=0.5), clock.now())
    s.dl.metrics.update(FREE, PodMetrics(waiting=0, running=10, kv_usage=0.5), clock.now())
    w = _predict(s, clock).wait_s[s.dl.endpoints.slot(FULL)]
    step = CostModel("llama-3.1-8b", "L40S").decode_step_time(256, int(256 * (PROMPT + 128)))
    # 128 of 256 sequences to end, each with the default 256-token output: half an output at >= that step
    assert 0.5 * 256 * step * 0.99 < w < 0.5 * 256 * step * 1.5


def test_a_prefill_only_pod_has_no_slot_wait():
    eps = [Endpoint(FULL, role=Role.PREFILL, accelerator="L40S", model_profile="llama-3.1-8b"),
           Endpoint(FREE, accelerator="L40S", model_profile="llama-3.1-8b")]
    s, clock = scheduler({"profile": "default", "predictor": {"correction": False}}, eps)
    s.dl.metrics.update(FULL, PodMetrics(waiting=0, running=64, kv_usage=0.5), clock.now())  # its preset: 64
    assert _predict(s, clock).wait_s[s.dl.endpoints.slot(FULL)] < 1.0


@pytest.mark.parametrize("bad", [0, -1])
def test_an_endpoint_with_no_sequence_slot_is_refused(bad):
    with pytest.raises(ValueError, match="max_num_seqs"):
        Endpoint(FULL, max_num_seqs=bad)


def test_the_tracker_counts_decoding_requests_and_their_first_token_times():
    t = InflightTracker(max_endpoints=4)
    t.add("a", 0, None, 100, 10, now=10.0)
    t.add("b", 0, None, 100, 10, now=11.0)
    t.first_token("a")  # stamped with the latest time told: 11
    assert t.decoding[0] == 1 and t.decoding_since[0] == 11.0
    t.settle(12.5)
    t.first_token("b")
    t.first_token("b")  # once
    assert t.decoding[0] == 2 and t.decoding_since[0] == 23.5
    t.move("b", 1)
    assert (t.decoding[0], t.decoding_since[0], t.decoding[1], t.decoding_since[1]) == (1, 11.0, 1, 12.5)
    t.finish("a")
    t.finish("b")
    assert not t.decoding.any() and not t.decoding_since.any()  # exactly 0: no rounding left behind
    t.add("c", 2, None, 100, 10, now=20.0, first_token_by=20.4)  # no first-token report (access log)
    t.settle(21.0)
    assert t.decoding[2] == 1 and t.decoding_since[2] == 20.4  # its predicted first token
    t.finish("d")  # unknown: nothing
    t.reset(2)
    assert not t.decoding.any() and not t.decoding_since.any()


def test_the_tracker_sums_the_kv_steps_of_its_requests_exactly_back_to_zero():
    t = InflightTracker(max_endpoints=3)
    t.add("a", 0, None, 1000, 100, now=0.0)  # (1000 + 50) x 100
    t.add("b", 0, 2, 333.3, 7, now=0.0)  # a prefill leg elsewhere: the KV is held where it decodes
    assert t.kv_steps[0] == 105_000 + (333.3 + 3.5) * 7 and t.kv_steps[2] == 0.0
    t.first_token("a")  # a first token changes nothing: the request holds its KV until it ends
    t.move("b", 1)
    assert t.kv_steps[0] == 105_000 and t.kv_steps[1] == (333.3 + 3.5) * 7
    t.finish("a")
    t.finish("b")
    assert not t.kv_steps.any()  # exactly 0 once a slot is empty, whatever the rounding
    t.add("c", 1, None, 10, 10, now=1.0)
    t.reset(1)
    assert not t.kv_steps.any()
