"""Each plugin with exact expectations, through a scheduler built without network."""

from __future__ import annotations

import numpy as np
import pytest

from pickers.datalayer import PodMetrics
from pickers.framework import CycleContext, create
from pickers.types import SchedulingError

from .helpers import endpoints, request, scheduler, state

A, B, C = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"


def ctx_for(s, clock, req=None):
    return CycleContext(state(req or request("r", list(range(64)))), s.dl, clock.now())


def plugin(s, kind, spec):
    p = create(kind, spec, "t")
    p.bind(s.dl)
    return p


def feed(s, **per_addr):
    for addr, (w, r, kv) in per_addr.items():
        s.dl.metrics.update(addr, PodMetrics(waiting=w, running=r, kv_usage=kv))


def cands(s):
    return s.dl.endpoints.active_slots()


def test_queue_running_kv_scorers_exact():
    s, clock = scheduler()
    feed(s, **{A: (0, 10, 0.2), B: (4, 0, 0.5), C: (2, 5, 1.0)})
    ctx = ctx_for(s, clock)
    c = cands(s)
    assert plugin(s, "scorer", "queue").score(ctx, c).tolist() == [1.0, 0.0, 0.5]
    assert plugin(s, "scorer", "running").score(ctx, c).tolist() == [0.0, 1.0, 0.5]
    assert plugin(s, "scorer", "kv-usage").score(ctx, c).tolist() == pytest.approx([0.8, 0.5, 0.0])


def test_stale_metrics_fall_back_to_tracked_load():
    s, clock = scheduler()
    feed(s, **{A: (9, 0, 0.9), B: (0, 0, 0.0), C: (0, 0, 0.0)})
    clock.advance(1.0)  # 1 s > 4 x 50 ms: stale
    s.dl.inflight.add("x", 1, None, 100, 10, clock.now())  # one request tracked on B
    ctx = ctx_for(s, clock)
    c = cands(s)
    assert plugin(s, "scorer", "queue").score(ctx, c).tolist() == [1.0, 0.0, 1.0]
    assert plugin(s, "scorer", "kv-usage").score(ctx, c).tolist() == [0.5, 0.5, 0.5]


def test_inflight_tokens_scorer_and_hooks():
    s, clock = scheduler()
    dl = s.dl
    dl.inflight.add("a", 0, None, 1000, 100, clock.now())
    dl.inflight.add("b", 1, None, 200, 100, clock.now())
    sc = plugin(s, "scorer", {"type": "inflight-tokens", "decode_weight": 1.0})
    assert sc.score(ctx_for(s, clock), cands(s)).tolist() == pytest.approx([0.0, 1 - 300 / 1100, 1.0])
    dl.inflight.first_token("a")
    assert dl.inflight.prefill_tokens[0] == 0 and dl.inflight.decode_tokens[0] == 100
    dl.inflight.move("b", 2)
    assert dl.inflight.requests[1] == 0 and dl.inflight.prefill_tokens[2] == 200
    dl.inflight.finish("a"), dl.inflight.finish("b")
    assert not dl.inflight.requests.any() and not dl.inflight.prefill_tokens.any()


def test_prefix_scorer_modes_and_gate():
    s, clock = scheduler(eps=endpoints(3, kv=True))
    toks = list(range(64))  # 4 blocks of 16
    from engine.kvcache.hashing import hash_blocks

    h = hash_blocks(toks, 16)
    s.dl.approx.add(1, h[:2])
    s.dl.kv_index.index.add(0, h)
    s.dl.kv_index.set_source(0, True)
    ctx = ctx_for(s, clock, request("r", toks))
    c = cands(s)
    assert plugin(s, "scorer", {"type": "prefix", "mode": "precise"}).score(ctx, c).tolist() == [1.0, 0.0, 0.0]
    assert plugin(s, "scorer", {"type": "prefix", "mode": "approximate"}).score(ctx, c).tolist() == [0.0, 0.5, 0.0]
    # gate: pod 0 has the whole prompt cached but a huge queue -> its prefix score is gated to 0
    s.dl.inflight.add("q", 0, None, 500_000, 0, clock.now())
    ctx = ctx_for(s, clock, request("r2", toks))
    ttft = plugin(s, "scorer", "ttft")
    ttft.score(ctx, c)
    gated = plugin(s, "scorer", {"type": "prefix", "mode": "precise", "gate_ttft_ratio": 1.5})
    assert gated.score(ctx, c).tolist() == [0.0, 0.0, 0.0]


def test_ttft_scorer_prefers_cache_until_queue_outweighs_it():
    s, clock = scheduler()
    toks = list(range(8192))
    from engine.kvcache.hashing import hash_blocks

    s.dl.approx.add(0, hash_blocks(toks, 16))
    sc = plugin(s, "scorer", {"type": "ttft", "mode": "approximate"})
    c = cands(s)
    v = sc.score(ctx_for(s, clock, request("r", toks)), c)
    assert v[0] == 1.0 and v[1] == v[2] and v[1] < 0.1  # 1 uncached token vs 8192
    s.dl.inflight.add("q", 0, None, 3 * 8192, 0, clock.now())  # 3 full prefills queued on pod 0
    v = sc.score(ctx_for(s, clock, request("r2", toks)), c)
    assert v[0] < 1.0 and v[1] == 1.0


def test_session_and_lora_scorers():
    s, clock = scheduler()
    sess = plugin(s, "scorer", "session-affinity")
    req = request("r", list(range(16)), headers={"x-session-id": "abc"})
    from pickers.types import Decision

    sess.on_routed(Decision(state(req), endpoints=[B]))
    assert sess.score(ctx_for(s, clock, req), cands(s)).tolist() == [0.0, 1.0, 0.0]
    sess.on_served(Decision(state(req), endpoints=[B]), C)
    assert sess.score(ctx_for(s, clock, req), cands(s)).tolist() == [0.0, 0.0, 1.0]

    m = s.dl.metrics
    m.update(A, PodMetrics(running_lora_adapters=("sql",), max_lora=2))
    m.update(B, PodMetrics(running_lora_adapters=("x", "y"), waiting_lora_adapters=(), max_lora=2))
    m.update(C, PodMetrics(running_lora_adapters=("x",), waiting_lora_adapters=("sql",), max_lora=1))
    lora = plugin(s, "scorer", "lora-affinity")
    assert lora.score(ctx_for(s, clock, request("r", model="sql")), cands(s)).tolist() == [1.0, 0.0, 0.8]
    m.update(C, PodMetrics(running_lora_adapters=("x",), max_lora=4))
    assert lora.score(ctx_for(s, clock, request("r", model="sql")), cands(s)).tolist() == [1.0, 0.0, 0.5]


def test_filters_health_and_role():
    from pickers.types import Endpoint, Role

    eps = [Endpoint(A, role=Role.PREFILL), Endpoint(B, role=Role.DECODE), Endpoint(C)]
    s, clock = scheduler(eps=eps)
    c = cands(s)
    ctx = ctx_for(s, clock)
    assert plugin(s, "filter", {"type": "role", "role": "decode"}).filter(ctx, c).tolist() == [1, 2]
    assert plugin(s, "filter", {"type": "role", "role": "prefill"}).filter(ctx, c).tolist() == [0, 2]
    for _ in range(3):
        s.dl.health.failure(2, "boom")
    assert plugin(s, "filter", "health").filter(ctx, c).tolist() == [0, 1]
    s.dl.health.success(2)
    assert plugin(s, "filter", "health").filter(ctx, c).tolist() == [0, 1, 2]


def test_pickers():
    s, clock = scheduler(eps=endpoints(4))
    c = cands(s)
    ctx = ctx_for(s, clock)
    totals = np.array([1.0, 3.0, 3.0, 2.0])
    mx = plugin(s, "picker", {"type": "max-score", "max_endpoints": 3, "seed": 1})
    firsts = set()
    for _ in range(40):
        order = mx.pick(ctx, c, totals).tolist()
        assert sorted(order[:2]) == [1, 2] and order[2] == 3
        firsts.add(order[0])
    assert firsts == {1, 2}  # ties broken at random
    rr = plugin(s, "picker", {"type": "round-robin", "max_endpoints": 2})
    assert [rr.pick(ctx, c, totals).tolist() for _ in range(5)] == [[0, 1], [1, 2], [2, 3], [3, 0], [0, 1]]
    wr = plugin(s, "picker", {"type": "weighted-random", "seed": 3})
    counts = np.zeros(4)
    for _ in range(2000):
        order = wr.pick(ctx, c, np.array([0.0, 1.0, 3.0, 0.0]))
        counts[order[0]] += 1
        assert len(set(order.tolist())) == len(order) == 3
    assert counts[0] == 0 and counts[3] == 0 and 0.65 < counts[2] / 2000 < 0.85


def test_saturation_admission_sheds_only_sheddable():
    s, clock = scheduler(raw={"admission": [{"type": "saturation", "objectives": {"batch": -1, "chat": 0}}]})
    feed(s, **{A: (5, 0, 0.1), B: (10, 0, 0.1), C: (0, 0, 0.9)})  # max(1, 2, 1.125) -> mean 1.375
    batch = request("b", list(range(32)), headers={"x-gateway-inference-objective": "batch"})
    with pytest.raises(SchedulingError) as e:
        s.decide(batch)
    assert e.value.status == 429 and "saturated" in e.value.message and "batch" in e.value.message
    s.decide(request("c", list(range(32)), headers={"x-gateway-inference-objective": "chat"}))
    s.decide(request("n", list(range(32))))
    feed(s, **{A: (0, 0, 0.1), B: (1, 0, 0.1), C: (0, 0, 0.1)})
    s.decide(request("b2", list(range(32)), headers={"x-gateway-inference-objective": "batch"}))


def test_saturation_admission_ignores_stale_metrics_by_default():
    raw = {"admission": [{"type": "saturation", "objectives": {"batch": -1}}]}
    s, clock = scheduler(raw=raw)
    batch = lambda rid: request(rid, list(range(32)), headers={"x-gateway-inference-objective": "batch"})
    s.decide(batch("never-scraped"))  # no metrics at all: stale, not saturated
    assert s.test_registry.get_sample_value("kvswitch_saturation_stale_endpoints") == 3.0
    feed(s, **{A: (10, 0, 0.1), B: (0, 0, 0.1), C: (0, 0, 0.1)})  # mean(2, 0.125, 0.125) < 1
    s.decide(batch("fresh"))
    clock.advance(1.0)  # all stale now
    feed(s, **{A: (10, 0, 0.1)})  # only A fresh, and saturated: mean over fresh pods = 2
    with pytest.raises(SchedulingError):
        s.decide(batch("a-saturated"))
    assert s.test_registry.get_sample_value("kvswitch_saturation_stale_endpoints") == 2.0
    strict, clock2 = scheduler(raw={"admission": [{"type": "saturation", "objectives": {"batch": -1},
                                                   "stale_counts_as_saturated": True}]})
    with pytest.raises(SchedulingError):
        strict.decide(batch("strict"))


def test_ttft_stall_weight_keeps_a_group_on_its_warm_pod_when_the_spill_would_stall_decodes():
    s, clock = scheduler()
    toks = list(range(4608))
    from engine.kvcache.hashing import hash_blocks

    s.dl.approx.add(0, hash_blocks(toks[:4096], 16))  # the group's shared context is warm on pod 0
    s.dl.inflight.add("q", 0, None, 6 * 1024, 0, clock.now())  # a queue on the warm pod
    feed(s, **{A: (0, 4, 0.1), B: (0, 24, 0.1), C: (0, 24, 0.1)})  # the cold pods run many decodes
    c = cands(s)
    plain = plugin(s, "scorer", {"type": "ttft", "mode": "approximate"})
    stall = plugin(s, "scorer", {"type": "ttft", "mode": "approximate", "stall_weight": 0.5})
    v = plain.score(ctx_for(s, clock, request("r", toks)), c)
    assert v[1] == 1.0 and v[0] < 1.0  # TTFT alone: the queue costs more than recomputing 4096 tokens
    w = stall.score(ctx_for(s, clock, request("r2", toks)), c)
    assert w[0] == 1.0 and w[1] < 1.0  # recomputing them would stall 24 decodes: stay warm
    # without running decodes the stall term is zero and the scores are TTFT's alone
    feed(s, **{A: (0, 0, 0.1), B: (0, 0, 0.1), C: (0, 0, 0.1)})
    ctx = ctx_for(s, clock, request("r3", toks))
    assert np.allclose(stall.score(ctx, c), plain.score(ctx_for(s, clock, request("r4", toks)), c))


def test_kv_usage_with_queue_counts_the_queued_prompt_tokens_as_used():
    """The default profile's kv-usage: a pod whose cache is emptier but whose queue would fill it is not
    preferred (past the knee the plain score pulled requests onto such pods)."""
    s, clock = scheduler()
    feed(s, **{A: (0, 4, 0.2), B: (0, 4, 0.5), C: (0, 4, 0.5)})
    cap = float(s.dl.costs.kv_capacity[s.dl.endpoints.slot(A)])
    s.dl.inflight.add("q", s.dl.endpoints.slot(A), None, int(0.6 * cap), 10, clock.now())  # queued on A
    ctx = ctx_for(s, clock)
    c = cands(s)
    plain = plugin(s, "scorer", "kv-usage").score(ctx, c)
    queued = plugin(s, "scorer", {"type": "kv-usage", "with_queue": True}).score(ctx, c)
    assert plain.tolist() == pytest.approx([0.8, 0.5, 0.5])
    assert queued[0] == pytest.approx(0.2, abs=0.02) and queued[1:].tolist() == pytest.approx([0.5, 0.5])
    # a queue beyond the capacity scores 0 (full), never below
    s.dl.inflight.add("q2", s.dl.endpoints.slot(A), None, int(2 * cap), 10, clock.now())
    ctx2 = ctx_for(s, clock)
    assert plugin(s, "scorer", {"type": "kv-usage", "with_queue": True}).score(ctx2, c)[0] == 0.0


def test_tpot_scorer_prefers_the_pod_whose_batch_runs_fastest_and_is_level_when_batches_are_alike():
    s, clock = scheduler()
    sc = plugin(s, "scorer", {"type": "tpot", "mode": "approximate"})
    c = cands(s)
    feed(s, **{A: (0, 200, 0.6), B: (0, 2, 0.05), C: (0, 2, 0.05)})
    v = sc.score(ctx_for(s, clock), c)
    assert v[1] == v[2] == 1.0 and v[0] < 0.95  # 200 decodes read far more KV per step than 2
    feed(s, **{A: (0, 8, 0.1), B: (0, 8, 0.1), C: (0, 8, 0.1)})
    assert sc.score(ctx_for(s, clock, request("r2", list(range(64)))), c).tolist() == [1.0, 1.0, 1.0]


def _new_conversation_goes_to(profile: dict, cached: int, busy: dict[str, tuple[int, float]], own: bool) -> str:
    """Where ``profile`` starts a 2048-token conversation whose first ``cached`` tokens (a system prompt) A and
    B hold, each running ``busy[pod][0]`` decodes at KV usage ``busy[pod][1]`` (its metrics; ``own``: the
    picker's own requests too), C idle."""
    from engine.kvcache.hashing import hash_blocks

    s, clock = scheduler({"profile": "p", "profiles": {"p": profile}})
    toks = list(range(2048))
    for pod in (0, 1):
        s.dl.approx.add(pod, hash_blocks(toks[:cached], 16))
    if own:
        for addr, (n, _) in busy.items():
            _in_flight(s, clock, addr, n, decoding=True)
    feed(s, **{addr: (0, n, kv) for addr, (n, kv) in busy.items()}, **{C: (0, 0, 0.0)})
    return s.decide(request("r", toks)).endpoints[0]


def _default_without(scorer: str) -> dict:
    from pickers.profiles import BUILTIN_PROFILES

    default = BUILTIN_PROFILES["default"]
    return {**default, "scorers": [x for x in default["scorers"] if x.get("type") != scorer]}


def test_default_profile_starts_a_new_conversation_on_an_idle_pod_not_on_a_busy_warm_one():
    """Below the knee a new conversation whose system prompt (a quarter of it) is cached on two pods running
    64 decodes each, and an idle cold third pod: the warm pods' TTFT is a little lower, but the request's decode
    and every other one there run slower; the default profile starts it on the idle pod (without its TPOT
    term it took a warm one, which is how 2 of 4 pods came to take a whole multi-turn workload)."""
    from pickers.profiles import BUILTIN_PROFILES

    busy = {A: (64, 0.3), B: (64, 0.3)}
    assert _new_conversation_goes_to(BUILTIN_PROFILES["default"], 512, busy, own=False) == C
    assert _new_conversation_goes_to(_default_without("tpot"), 512, busy, own=False) in (A, B)


def _in_flight(s, clock, addr: str, n: int, *, decoding: bool) -> None:
    """``n`` requests of the picker's own on ``addr``: past their first token, or still queued for prefill."""
    slot = s.dl.endpoints.slot(addr)
    for i in range(n):
        rid = f"{addr}-{i}"
        s.dl.inflight.add(rid, slot, None, 512, 128, clock.now())
        if decoding:
            s.dl.inflight.first_token(rid)


def test_spread_scorer_ranks_by_requests_in_flight_and_is_level_once_every_pod_has_a_queue():
    s, clock = scheduler()
    sc = plugin(s, "scorer", {"type": "spread", "offset": 1.0})
    c = cands(s)
    _in_flight(s, clock, A, 20, decoding=True)
    _in_flight(s, clock, B, 24, decoding=True)
    assert sc.score(ctx_for(s, clock), c) == pytest.approx([1 / 21, 1 / 25, 1.0])
    gentle = plugin(s, "scorer", {"type": "spread"})  # offset 4: (0 + 4) / (n + 4)
    assert gentle.score(ctx_for(s, clock), c) == pytest.approx([4 / 24, 4 / 28, 1.0])
    _in_flight(s, clock, C, 1, decoding=False)  # C has a prompt queued; A and B have none: still spreading
    assert sc.score(ctx_for(s, clock, request("r2", list(range(64)))), c) == pytest.approx([2 / 21, 2 / 25, 1.0])
    for addr in (A, B):  # now every pod has a prompt queued: past the knee, level
        _in_flight(s, clock, addr, 1, decoding=False)
    assert sc.score(ctx_for(s, clock, request("r3", list(range(64)))), c).tolist() == [1.0, 1.0, 1.0]


def test_default_profile_warms_an_idle_pod_rather_than_leave_it_idle():
    """Below the knee, a new conversation whose system prompt (half of it) is cached on two pods running 20 and
    24 decodes and not on an idle third pod: the warm pods' TTFT is lower, and without the spread term the
    profile sent every new conversation to them, so the third pod never held the prompt and stayed idle (multi-
    turn at 0.5x the knee, README "The default profile"). With it the idle pod takes the conversation."""
    from pickers.profiles import BUILTIN_PROFILES

    busy = {A: (20, 0.2), B: (24, 0.25)}
    assert _new_conversation_goes_to(BUILTIN_PROFILES["default"], 1024, busy, own=True) == C
    assert _new_conversation_goes_to(_default_without("spread"), 1024, busy, own=True) in (A, B)


def _group_request(rid: str, question: int) -> object:
    """A 4,608-token prompt: the group's 4,096-token shared prefix, then a question of its own."""
    return request(rid, list(range(4096)) + [100_000 + 512 * question + i for i in range(512)])


def _group_held_by(s, *pods: str) -> None:
    from engine.kvcache.hashing import hash_blocks

    for addr in pods:
        s.dl.approx.add(s.dl.endpoints.slot(addr), hash_blocks(list(range(4096)), 16))


def test_replicate_scorer_copies_a_hot_group_held_by_one_busy_pod_to_a_quiet_one():
    s, clock = scheduler()
    sc = plugin(s, "scorer", "replicate")
    c = cands(s)
    _group_held_by(s, A)
    _in_flight(s, clock, A, 5, decoding=True)
    _in_flight(s, clock, B, 1, decoding=True)  # 5 >= 1 + 3: quiet enough
    _in_flight(s, clock, C, 3, decoding=True)  # 5 < 3 + 3: not
    # the first two requests of the group make it hot (2 seen); until then the term is level
    assert sc.score(ctx_for(s, clock, _group_request("g0", 0)), c).tolist() == [1.0, 1.0, 1.0]
    assert sc.score(ctx_for(s, clock, _group_request("g1", 1)), c).tolist() == [1.0, 1.0, 1.0]
    assert sc.score(ctx_for(s, clock, _group_request("g2", 2)), c).tolist() == [0.0, 1.0, 0.0]
    # with a prompt queued on B (its Q > 0) no pod has room for the copy: level
    _in_flight(s, clock, B, 1, decoding=False)
    assert sc.score(ctx_for(s, clock, _group_request("g3", 3)), c).tolist() == [1.0, 1.0, 1.0]


def test_replicate_scorer_makes_no_copy_while_the_pool_is_past_its_knee():
    """A copy is one more cold prefill; past the knee every pod's time is the pool's throughput. While flow control
    holds requests, and for ``quiet_s`` after it last found a queue on every pod, the term is level."""
    s, clock = scheduler()
    sc = plugin(s, "scorer", {"type": "replicate", "quiet_s": 5.0})
    c = cands(s)
    _group_held_by(s, A)
    _in_flight(s, clock, A, 5, decoding=True)
    for i in range(2):  # hot from here on
        sc.score(ctx_for(s, clock, _group_request(f"h{i}", i)), c)
    copy = [0.0, 1.0, 1.0]
    assert sc.score(ctx_for(s, clock, _group_request("g0", 10)), c).tolist() == copy
    s.dl.saturated_at = clock.now()
    clock.advance(4.9)
    assert sc.score(ctx_for(s, clock, _group_request("g1", 11)), c).tolist() == [1.0, 1.0, 1.0]
    clock.advance(0.2)
    assert sc.score(ctx_for(s, clock, _group_request("g2", 12)), c).tolist() == copy
    s.dl.held_requests = 1
    assert sc.score(ctx_for(s, clock, _group_request("g3", 13)), c).tolist() == [1.0, 1.0, 1.0]
    s.dl.held_requests = 0
    s.dl.saturated_at = clock.now()
    eager = plugin(s, "scorer", {"type": "replicate", "quiet_s": 0.0})  # 0: copies whatever the pool's load
    for i in range(2):
        eager.score(ctx_for(s, clock, _group_request(f"e{i}", 20 + i)), c)
    assert eager.score(ctx_for(s, clock, _group_request("g4", 14)), c).tolist() == copy


def test_replicate_scorer_leaves_a_conversation_and_a_prefix_with_two_copies_alone():
    s, clock = scheduler()
    sc = plugin(s, "scorer", "replicate")
    c = cands(s)
    from engine.kvcache.hashing import hash_blocks

    _in_flight(s, clock, A, 8, decoding=True)
    # a conversation: each turn's history (held by A) ends at a new block, so no prefix end is ever seen twice
    history = list(range(2048))
    for turn in range(6):
        s.dl.approx.add(s.dl.endpoints.slot(A), hash_blocks(history, 16))
        ctx = ctx_for(s, clock, request(f"t{turn}", history + [200_000 + 64 * turn + i for i in range(64)]))
        assert sc.score(ctx, c).tolist() == [1.0, 1.0, 1.0]
        history = history + [300_000 + 384 * turn + i for i in range(384)]
    # a hot group held by two pods already has its copy
    _group_held_by(s, A, B)
    for i in range(4):
        assert sc.score(ctx_for(s, clock, _group_request(f"g{i}", i)), c).tolist() == [1.0, 1.0, 1.0]


def test_replicate_scorer_remembers_a_bounded_number_of_prefix_ends():
    s, _ = scheduler()
    sc = plugin(s, "scorer", {"type": "replicate", "recent": 4})
    assert [sc.heat(k) for k in (1, 1, 2, 3, 4, 1, 5, 6, 7)] == [0, 1, 0, 0, 0, 1, 0, 0, 0]
    assert len(sc._ring) == 4 and sum(sc._count.values()) == 4 and set(sc._count) == {1, 5, 6, 7}


def test_default_profile_gives_a_hot_group_a_second_warm_pod_while_the_fleet_has_room():
    """Below the knee a group whose 4K-token prefix one pod holds stays there: its TTFT is lowest there for
    every request, and the group's bursts queue on that pod while the others idle. The default profile puts
    the third request of the group in a row on the quietest pod (one cold prefill there, then two warm pods to
    choose from); without the replicate term it stays on the holder."""
    from pickers.profiles import BUILTIN_PROFILES

    def third_request_goes_to(profile: dict) -> str:
        s, clock = scheduler({"profile": "p", "profiles": {"p": profile}})
        _group_held_by(s, A)
        _in_flight(s, clock, A, 6, decoding=True)
        _in_flight(s, clock, B, 2, decoding=True)
        feed(s, **{A: (0, 6, 0.1), B: (0, 2, 0.1), C: (0, 0, 0.0)})
        for i in range(2):
            s.decide(_group_request(f"g{i}", i))
        return s.decide(_group_request("g2", 2)).endpoints[0]

    assert third_request_goes_to(BUILTIN_PROFILES["default"]) == C
    assert third_request_goes_to(_default_without("replicate")) == A
