"""The prefill-decode handler: decode pod first, then a prefill leg only when the decider says it pays."""

from __future__ import annotations

import pytest

from engine.kvcache.hashing import hash_blocks
from pickers.datalayer import PodMetrics
from pickers.framework import ConfigError, create
from pickers.types import Endpoint, Usage

from .helpers import BS, request, scheduler

P0, P1 = "10.0.1.1:8000", "10.0.1.2:8000"
D0, D1 = "10.0.2.1:8000", "10.0.2.2:8000"


def pd_fleet(prefill: int = 2, decode: int = 2) -> list[Endpoint]:
    return ([Endpoint(f"10.0.1.{i + 1}:8000", role="prefill") for i in range(prefill)]
            + [Endpoint(f"10.0.2.{i + 1}:8000", role="decode") for i in range(decode)])


def pd_scheduler(handler=None, eps=None, decider="threshold"):
    """The threshold decider unless told otherwise (the tests below it hold that rule; the slo decider's are in
    test_pd_slo.py)."""
    return scheduler({"handler": {"type": "prefill-decode", "decider": decider, **(handler or {})}},
                     eps if eps is not None else pd_fleet())


def toks(n: int, base: int = 0) -> list[int]:
    return [base + i for i in range(n)]


def test_builds_with_no_parameters_and_rejects_a_bad_link():
    h = create("handler", {"type": "prefill-decode"}, "scheduler.handler")
    assert (h.decider, h.threshold_tokens, h.min_uncached_ratio, h.link) == ("slo", 2048, 0.5, "rdma-400g")
    with pytest.raises(ConfigError, match=r"scheduler.handler.decider: must be one of slo, threshold"):
        pd_scheduler({"decider": "coin"})
    with pytest.raises(ConfigError, match=r"scheduler.handler: link: unknown link 'carrier-pigeon'"):
        pd_scheduler({"link": "carrier-pigeon"})
    with pytest.raises(ConfigError, match=r"scheduler.handler.min_uncached_ratio: must be <= 1"):
        pd_scheduler({"min_uncached_ratio": 2})


def test_short_prompt_has_no_leg():
    s, _ = pd_scheduler()
    d = s.decide(request("r", toks(1000)))
    assert d.prefill is None and d.primary in (D0, D1)
    assert d.state.pd.reason == "below-threshold"
    assert d.explanation["_pd"]["uncached"] == 1000 and d.explanation["_pd"]["leg"] == 0.0


def test_long_uncached_prompt_goes_to_the_least_loaded_prefill_pod_and_both_are_recorded():
    s, clock = pd_scheduler()
    dl = s.dl
    # a request already computing 6000 tokens on P0
    dl.inflight.add("busy", dl.endpoints.slot(D1), dl.endpoints.slot(P0), 6000, 10, clock.now())
    d = s.decide(request("r", toks(4096), max_tokens=20))
    assert d.prefill == P1 and d.primary == D0  # D1 has a running request, D0 is idle
    pdx = d.explanation["_pd"]
    assert pdx["leg"] == 1.0 and pdx["uncached"] == 4096 and pdx["ratio"] == 1.0 and pdx["saved-ms"] > 100
    assert d.explanation[P1]["total"] == 1.0 and d.explanation[P0]["total"] < 1.0
    assert d.explanation[P0]["pd-queue-ms"] > 200 and d.explanation[P1]["pd-queue-ms"] == 0.0
    assert 10 < d.explanation[P1]["pd-transfer-ms"] < 20  # 4096 tokens of 8B KV over RDMA: ~14 ms
    assert list(d.explanation)[0] == "_pd"
    # in-flight: prefill work on P1, the decode on D0
    p1, d0 = dl.endpoints.slot(P1), dl.endpoints.slot(D0)
    assert dl.inflight.prefill_tokens[p1] == 4096 and dl.inflight.prefill_tokens[d0] == 0
    assert dl.inflight.requests[d0] == 1 and dl.inflight.decode_tokens[d0] == 20
    # approximate index: both pods will hold the prompt's blocks
    blocks = dl.approx.match(d.state.block_hashes[BS])[0]
    assert blocks[p1] == 4096 // BS and blocks[d0] == 4096 // BS
    assert blocks[dl.endpoints.slot(P0)] == 0
    s.on_first_token(d, clock.now())
    assert dl.inflight.prefill_tokens[p1] == 0
    s.on_finished(d, Usage(4096, 20), clock.now())
    assert dl.inflight.requests[d0] == 0


def test_prompt_cached_on_the_decode_pod_skips_the_leg():
    s, clock = pd_scheduler()
    first = s.decide(request("a", toks(4096)))
    assert first.prefill is not None
    s.on_first_token(first, clock.now())
    s.on_finished(first, Usage(4096, 1), clock.now())
    second = s.decide(request("b", toks(4096) + toks(100, 50_000)))
    assert second.primary == first.primary and second.prefill is None
    assert second.state.pd.reason == "below-threshold"
    assert second.explanation["_pd"]["uncached"] == 100 + 4096 % BS


def test_mostly_cached_long_prompt_stays_local():
    s, clock = pd_scheduler()
    dl = s.dl
    prompt = toks(8192) + toks(3000, 90_000)  # 8192 of 11192 cached: 3000 uncached (>= 2048) but 27 %
    dl.learn({BS: hash_blocks(prompt[:8192], BS)}, [dl.endpoints.slot(D1)])
    d = s.decide(request("r", prompt))
    assert d.primary == D1 and d.prefill is None
    assert d.state.pd.reason == "mostly-cached-on-decode"
    assert d.explanation["_pd"]["uncached"] == 3000


def test_prefill_pod_holding_the_prefix_is_preferred():
    s, clock = pd_scheduler()
    dl = s.dl
    prompt = toks(8192)
    dl.learn({BS: hash_blocks(prompt, BS)}, [dl.endpoints.slot(P1)])
    # P1 even has some queued work; recomputing 8192 tokens on P0 still costs more
    dl.inflight.add("q", dl.endpoints.slot(D1), dl.endpoints.slot(P1), 1000, 10, clock.now())
    d = s.decide(request("r", prompt))
    assert d.prefill == P1
    assert d.explanation[P1]["pd-ttft-ms"] < d.explanation[P0]["pd-ttft-ms"]


def test_saturated_prefill_pool_and_idle_decode_pod_means_no_leg():
    s, clock = pd_scheduler()
    dl = s.dl
    for i, pod in enumerate((P0, P1)):  # 200K tokens queued on each prefill pod: seconds of waiting
        dl.inflight.add(f"q{i}", dl.endpoints.slot(D1), dl.endpoints.slot(pod), 200_000, 10, clock.now())
    d = s.decide(request("r", toks(4096)))
    assert d.prefill is None and d.primary == D0
    assert d.state.pd.reason == "prefill-saturated"
    pdx = d.explanation["_pd"]
    assert pdx["prefill-wait-ms"] > pdx["saved-ms"] > 0 and pdx["decode-room"] == 1.0
    # the same pool, but the decode pods are busy (requests waiting): the leg is taken anyway
    for pod in (D0, D1):
        dl.metrics.update(pod, PodMetrics(waiting=4, running=50, kv_usage=0.5), clock.now())
    d2 = s.decide(request("r2", toks(4096, 1_000_000)))
    assert d2.prefill in (P0, P1) and d2.explanation["_pd"]["decode-room"] == 0.0


def test_forced_on_with_threshold_zero():
    s, _ = pd_scheduler({"threshold_tokens": 0, "min_uncached_ratio": 0.0, "skip_when_saturated": False})
    d = s.decide(request("r", toks(20)))
    assert d.prefill in (P0, P1)


def test_no_prefill_pods_is_decode_only():
    s, _ = pd_scheduler(eps=pd_fleet(prefill=0, decode=2))
    d = s.decide(request("r", toks(8192)))
    assert d.prefill is None and d.primary in (D0, D1)
    assert d.state.pd.reason == "no-prefill-pods"


def test_unhealthy_prefill_pods_are_skipped():
    s, _ = pd_scheduler()
    dl = s.dl
    for _ in range(3):
        dl.health.failure(dl.endpoints.slot(P0), "connect refused")
    assert s.decide(request("r", toks(4096))).prefill == P1
    for _ in range(3):
        dl.health.failure(dl.endpoints.slot(P1), "connect refused")
    d = s.decide(request("r2", toks(4096, 10_000)))
    assert d.prefill is None and d.state.pd.reason == "no-prefill-pods"
