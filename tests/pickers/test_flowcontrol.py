"""Flow control (pickers/flowcontrol.py): requests held while no pod has room, and decided when one has."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from pickers.config import ConfigError
from pickers.datalayer import PodMetrics
from pickers.datalayer.inflight import InflightTracker
from pickers.types import Decision, SchedulingError, Usage

from .helpers import endpoints, request, scheduler

OBJECTIVES = {"urgent": {"priority": 5}, "batch": {"priority": -1}, "fast": {"ttft_ms": 5000}}


def _director(**flow):
    """Two pods; room counted in waiting requests only (``step_share`` 0) unless ``flow`` says otherwise: the
    step's room has its own tests (``test_step_room_*``)."""
    flow.setdefault("step_share", 0.0)
    s, clock = scheduler({"flow_control": flow, "objectives": OBJECTIVES}, eps=endpoints(2))
    return s, clock


def _scrape(s, clock, waiting: list[float], running: float = 4, kv_usage: float = 0.3) -> None:
    """Every pod scraped now, with these waiting counts (fresh metrics)."""
    for i, w in enumerate(waiting):
        s.dl.metrics.update(f"10.0.0.{i + 1}:8000", PodMetrics(waiting=w, running=running, kv_usage=kv_usage),
                            clock.now())


def _req(rid: str, objective: str | None = None):
    """A request with a prompt of its own (no prefix affinity pulls it anywhere)."""
    headers = {"x-gateway-inference-objective": objective} if objective else {}
    base = 1000 * (ord(rid[0]) + 1)
    return request(rid, list(range(base, base + 64)), max_tokens=8, headers=headers)


class Released:
    """A release callback that keeps what it was handed."""

    def __init__(self) -> None:
        self.got: list[Decision | SchedulingError] = []

    def __call__(self, result: Decision | SchedulingError) -> None:
        self.got.append(result)


def test_the_default_profile_holds_only_while_every_pod_is_full():
    s, clock = _director()
    assert s.flow is not None  # the default profile asks for it
    _scrape(s, clock, [0, 2])
    assert isinstance(s.decide_or_hold(_req("a"), Released()), Decision)  # a pod has room: decided at once
    _scrape(s, clock, [1, 2])
    rel = Released()
    assert s.decide_or_hold(_req("b"), rel) is None and s.flow.queued == 1
    assert s.dispatch_held() == 0 and not rel.got  # still no room
    _scrape(s, clock, [1, 0])  # pod 2's queue drained
    assert s.dispatch_held() == 1 and s.flow.queued == 0
    (d,) = rel.got
    assert isinstance(d, Decision) and d.primary == "10.0.0.2:8000"  # placed where the room is, when it is
    assert s.dl.inflight.requests[s.dl.endpoints.slot(d.primary)] == 1


def test_step_room_a_pod_whose_next_step_takes_its_queue_and_one_more_prompt_has_room():
    """Default ``step_share`` 0.75 of the 8,192-token budget: 6,144 tokens for the queued prompts (waiting x the
    mean prompt, 1,024 tokens before any request moves it), a mean prompt and the running decodes (4)."""
    s, clock = scheduler({"flow_control": {}}, eps=endpoints(2))
    assert s.flow is not None and s.flow.settings.step_share == 0.75
    _scrape(s, clock, [2, 6])  # 3,076 tokens fit; 7,172 do not
    d = s.decide_or_hold(_req("a"), Released())
    assert isinstance(d, Decision) and d.primary == "10.0.0.1:8000"
    assert s.dl.saturated_at == clock.now()  # every pod had a request waiting: the pool is past its knee
    _scrape(s, clock, [6, 6])
    rel = Released()
    assert s.decide_or_hold(_req("b"), rel) is None and s.flow.queued == 1
    _scrape(s, clock, [6, 1])
    assert s.dispatch_held() == 1 and rel.got[0].primary == "10.0.0.2:8000"


@pytest.mark.parametrize(("why", "waiting", "running", "kv_usage"), [
    ("KV cache full: no room for the queued prompts", 1, 4, 0.999),
    ("every sequence slot taken (max_num_seqs 256)", 1, 256, 0.3),
    ("the queue fills the step: 6 x 1,024 + 1,024 + 4 > 6,144", 6, 4, 0.3),
])
def test_step_room_needs_kv_a_sequence_slot_and_budget(why, waiting, running, kv_usage):
    s, clock = scheduler({"flow_control": {}}, eps=endpoints(2))
    _scrape(s, clock, [waiting, waiting], running=running, kv_usage=kv_usage)
    assert s.decide_or_hold(_req("a"), Released()) is None, why
    s, clock = scheduler({"flow_control": {}}, eps=endpoints(2))
    _scrape(s, clock, [1, 1])  # one waiting with KV, slots and budget to spare: decided at once
    assert isinstance(s.decide_or_hold(_req("a"), Released()), Decision)


def test_step_room_keeps_kv_for_what_the_requests_in_flight_will_still_write():
    """At 97 % KV use (12,345 tokens free of 411,529) the queued prompt and a mean one (2,048 tokens) fit; with a
    request in flight there that may still write 25,000 tokens (half of it counted, as the KV wait counts it)
    they do not: a full cache preempts."""
    s, clock = scheduler({"flow_control": {}}, eps=endpoints(2))
    _scrape(s, clock, [1, 1], kv_usage=0.97)
    assert isinstance(s.decide_or_hold(_req("a"), Released()), Decision)
    s, clock = scheduler({"flow_control": {}}, eps=endpoints(2))
    for slot in (0, 1):
        s.dl.inflight.add(f"long{slot}", slot, None, 0, 25_000, clock.now())
        s.dl.inflight.first_token(f"long{slot}")
    _scrape(s, clock, [1, 1], kv_usage=0.97)
    assert s.decide_or_hold(_req("a"), Released()) is None


def test_step_room_on_decode_role_pods_counts_waiting_requests_only():
    """A decode-role pod's waiting requests may be waiting for their KV from a prefill pod, or be local prompts;
    the predictor's queued tokens count neither, so the step's room would always be open there."""
    s, clock = scheduler({"flow_control": {"enabled": True}}, eps=endpoints(2, role="decode"))
    _scrape(s, clock, [1, 1])
    assert s.decide_or_hold(_req("a"), Released()) is None


def test_step_room_off_counts_waiting_requests_only():
    s, clock = _director()
    assert s.flow.settings.step_share == 0.0
    _scrape(s, clock, [1, 1])
    assert s.decide_or_hold(_req("a"), Released()) is None


def test_other_profiles_place_at_once_unless_configured():
    s, _ = scheduler({"profile": "least-inflight"}, eps=endpoints(2))
    assert s.flow is None
    s, _ = scheduler({"profile": "least-inflight", "flow_control": {"enabled": True}}, eps=endpoints(2))
    assert s.flow is not None
    s, _ = scheduler({"flow_control": {"enabled": False}}, eps=endpoints(2))
    assert s.flow is None


def test_room_counts_what_the_picker_sent_and_saw_start_since_the_scrape():
    s, clock = _director()
    _scrape(s, clock, [0, 0])
    first, second = Released(), Released()
    d1 = s.decide_or_hold(_req("a"), first)
    d2 = s.decide_or_hold(_req("b"), second)
    assert isinstance(d1, Decision) and isinstance(d2, Decision) and d1.primary != d2.primary
    # both pods now have one request of ours not started since their scrape: no room, the next one waits
    rel = Released()
    assert s.decide_or_hold(_req("c"), rel) is None
    s.on_first_token(d1, clock.now())  # d1 started: its pod has room again, and the held request goes there
    (d3,) = rel.got
    assert isinstance(d3, Decision) and d3.primary == d1.primary


def test_waiting_since_scrape_is_exact_through_scrapes_starts_and_ends():
    epoch = np.zeros(2, dtype=np.int64)
    t = InflightTracker(2, scrape_epoch=epoch)
    slots = np.array([0, 1])
    t.add("a", 0, None, 100, 10, 0.0)
    t.add("b", 0, None, 100, 10, 0.0)
    assert t.waiting_since_scrape(slots, np.array([3.0, 0.0])).tolist() == [5.0, 0.0]
    epoch[0] += 1  # a scrape of pod 0: it counted a and b (the scraped count has them)
    assert t.waiting_since_scrape(slots, np.array([2.0, 0.0])).tolist() == [2.0, 0.0]
    t.first_token("a")  # started since that scrape: one fewer waiting
    t.add("c", 0, None, 100, 10, 0.0)  # sent since: one more
    assert t.waiting_since_scrape(slots, np.array([2.0, 0.0])).tolist() == [2.0, 0.0]
    t.finish("c")  # ended before it started: it leaves the count it was in
    assert t.waiting_since_scrape(slots, np.array([2.0, 0.0])).tolist() == [1.0, 0.0]
    t.finish("b")
    assert t.waiting_since_scrape(slots, np.array([0.0, 0.0])).tolist() == [0.0, 0.0]  # never below 0
    t.reset(0)
    assert t.waiting_since_scrape(slots, np.array([0.0, 0.0])).tolist() == [0.0, 0.0]


def test_release_order_is_priority_then_arrival():
    s, clock = _director()
    _scrape(s, clock, [1, 1])
    order: list[str] = []

    def keep(result: Decision | SchedulingError) -> None:
        assert isinstance(result, Decision)
        order.append(result.state.key)

    for rid, obj in (("a", None), ("b", "batch"), ("c", None), ("d", "urgent")):
        assert s.decide_or_hold(_req(rid, obj), keep) is None
    # room for one request at a time: each decision fills it again until the next scrape shows it drained
    for _ in range(4):
        _scrape(s, clock, [0, 1])
        assert s.dispatch_held() == 1
    assert order == ["d", "a", "c", "b"]


def test_requests_with_targets_are_never_held():
    s, clock = _director()
    _scrape(s, clock, [3, 3])
    assert isinstance(s.decide_or_hold(_req("t", "fast"), Released()), Decision)
    assert s.flow is not None and s.flow.queued == 0


def test_a_full_queue_places_the_next_request_at_once():
    s, clock = _director(max_queued=2)
    _scrape(s, clock, [2, 2])
    assert s.decide_or_hold(_req("a"), Released()) is None
    assert s.decide_or_hold(_req("b"), Released()) is None
    assert isinstance(s.decide_or_hold(_req("c"), Released()), Decision)  # nothing rejected for want of room
    assert s.flow is not None and s.flow.queued == 2 and s.flow.overflowed == 1


def test_a_held_request_goes_by_its_deadline_room_or_not():
    s, clock = _director(max_wait_s=2.0)
    _scrape(s, clock, [2, 2])
    rel, short = Released(), Released()
    assert s.decide_or_hold(_req("a"), rel) is None
    limited = _req("b")
    limited.hold_limit_s = 0.5  # the gateway gives up sooner (ext_authz): its own deadline wins
    assert s.decide_or_hold(limited, short) is None
    clock.advance(0.5)
    _scrape(s, clock, [2, 2])
    assert s.dispatch_held() == 1 and isinstance(short.got[0], Decision) and not rel.got
    clock.advance(1.5)
    _scrape(s, clock, [2, 2])
    assert s.dispatch_held() == 1 and isinstance(rel.got[0], Decision)
    reg = s.test_registry
    assert reg.get_sample_value("kvswitch_flow_control_released_total", {"reason": "deadline"}) == 2
    assert reg.get_sample_value("kvswitch_flow_control_wait_seconds_count") == 2


def test_a_held_request_whose_pods_are_gone_gets_its_503_at_once():
    s, clock = _director()
    _scrape(s, clock, [2, 2])
    rel = Released()
    assert s.decide_or_hold(_req("a"), rel) is None
    s.remove_endpoint("10.0.0.1:8000")
    s.remove_endpoint("10.0.0.2:8000")
    assert s.dispatch_held() == 1
    (err,) = rel.got
    assert isinstance(err, SchedulingError) and err.status == 503
    assert s.flow is not None and s.flow.queued == 0


@pytest.mark.parametrize("flow, path", [
    ({"room": 0}, "scheduler.flow_control.room"),
    ({"max_queued": 0}, "scheduler.flow_control.max_queued"),
    ({"max_wait_s": -1}, "scheduler.flow_control.max_wait_s"),
    ({"enabled": "yes"}, "scheduler.flow_control.enabled"),
    ({"queue": 3}, "scheduler.flow_control.queue"),
    ({"cache_loss": 1.5}, "scheduler.flow_control.cache_loss"),
    ({"window": 0}, "scheduler.flow_control.window"),
    ({"pass_ratio": 0.5}, "scheduler.flow_control.pass_ratio"),
    ({"pass_slack": -0.1}, "scheduler.flow_control.pass_slack"),
    ({"pass_slack": "half"}, "scheduler.flow_control.pass_slack"),
    ({"step_share": 1.5}, "scheduler.flow_control.step_share"),
])
def test_bad_settings_name_their_path(flow, path):
    with pytest.raises(ConfigError, match=path.replace(".", r"\.")):
        scheduler({"flow_control": flow})


def test_route_waits_for_room_and_a_client_that_leaves_takes_nothing_with_it():
    async def main() -> None:
        s, clock = _director(tick_ms=1)
        _scrape(s, clock, [0, 0])
        a = await s.route(_req("a"))
        b = await s.route(_req("b"))
        held = asyncio.create_task(s.route(_req("c")))
        gone = asyncio.create_task(s.route(_req("d")))
        await asyncio.sleep(0.01)
        assert not held.done() and s.flow is not None and s.flow.queued == 2
        gone.cancel()  # its client went away while it waited
        await asyncio.gather(gone, return_exceptions=True)
        assert s.flow.queued == 1
        s.on_first_token(a, clock.now())
        s.on_finished(a, Usage(64, 8), clock.now())
        c = await asyncio.wait_for(held, 1.0)
        assert c.primary == a.primary
        inflight = s.dl.inflight
        assert len(inflight) == 2  # b and c: nothing of d
        s.on_finished(b, Usage(64, 8), clock.now())
        s.on_finished(c, Usage(64, 8), clock.now())
        assert len(inflight) == 0
        # released while its client was leaving: the decision's load goes back
        _scrape(s, clock, [1, 1])
        late = asyncio.create_task(s.route(_req("e")))
        await asyncio.sleep(0.01)
        _scrape(s, clock, [0, 1])
        s.dispatch_held()
        late.cancel()
        await asyncio.gather(late, return_exceptions=True)
        assert len(inflight) == 0
        # stopping answers what is still held with a 503
        _scrape(s, clock, [1, 1])
        last = asyncio.create_task(s.route(_req("f")))
        await asyncio.sleep(0.01)
        await s.stop()
        with pytest.raises(SchedulingError) as e:
            await last
        assert e.value.status == 503 and e.value.code == "picker_stopping"

    asyncio.run(main())


def test_held_requests_count_as_queued_for_the_saturation_rule():
    s, clock = _director()
    _scrape(s, clock, [2, 2])
    assert s.decide_or_hold(_req("b0", "batch"), Released()) is None  # sheddable, the pool not saturated yet
    for i in range(7):
        assert s.decide_or_hold(_req(f"r{i}"), Released()) is None
    # 8 held over 2 pods: (2 + 4) / 5 >= 1 by the default saturation rule: sheddable requests are refused now
    with pytest.raises(SchedulingError) as e:
        s.decide_or_hold(_req("b1", "batch"), Released())
    assert e.value.status == 429 and e.value.code == "pool_saturated"
    assert s.dl.held_requests == 8


def test_room_first_sends_a_request_released_for_room_to_room_unless_that_loses_its_cache():
    prompt = list(range(5000, 5256))  # 256 tokens: 16 blocks

    def weighed(cache_loss: float, cached: bool) -> tuple[str, int]:
        """(where a request released for room on pod 2 went, how many pods its profile weighed)."""
        s, clock = _director(room_first=True, cache_loss=cache_loss)
        if cached:
            _scrape(s, clock, [0, 5])
            warm = s.decide(request("warm", prompt, max_tokens=8))  # pod 1 now holds the whole prompt
            assert warm.primary == "10.0.0.1:8000"
            s.on_first_token(warm, clock.now())
            s.on_finished(warm, Usage(256, 8), clock.now())
        _scrape(s, clock, [1, 1])
        rel = Released()
        assert s.decide_or_hold(request("again", prompt, max_tokens=8), rel) is None
        _scrape(s, clock, [1, 0])  # room on pod 2, which holds none of it
        assert s.dispatch_held() == 1
        (d,) = rel.got
        assert isinstance(d, Decision)
        assert d.endpoints == ["10.0.0.2:8000", "10.0.0.1:8000"]  # the full pod stays a fallback either way
        return d.primary, int(d.state.results[0].cands.size)

    assert weighed(0.25, cached=False) == ("10.0.0.2:8000", 1)  # no cache anywhere: only the pod with room
    assert weighed(1.0, cached=True) == ("10.0.0.2:8000", 1)  # any loss allowed: only the pod with room
    assert weighed(0.25, cached=True)[1] == 2  # the whole prompt cached on the full pod: the profile weighs both


def test_without_room_first_the_profile_weighs_every_pod_for_a_released_request():
    s, clock = _director(room_first=False)
    _scrape(s, clock, [1, 1])
    rel = Released()
    assert s.decide_or_hold(_req("a"), rel) is None
    _scrape(s, clock, [1, 0])
    assert s.dispatch_held() == 1
    (d,) = rel.got
    assert isinstance(d, Decision) and d.state.results[0].cands.size == 2


def test_a_pod_whose_last_request_failed_has_no_room_until_one_succeeds_there():
    """A pod that fails every request fast always has an empty queue: its room must not draw held requests."""
    s, clock = _director()
    _scrape(s, clock, [5, 0])
    bad = s.decide(_req("a"))
    assert bad.primary == "10.0.0.2:8000"
    s.on_failed(bad, "http 500", clock.now())  # one pod fault: not ejected yet (threshold 3), but unproven
    _scrape(s, clock, [1, 0])
    rel = Released()
    assert s.decide_or_hold(_req("b"), rel) is None  # pod 2's empty queue is no room while it fails
    assert s.dispatch_held() == 0 and not rel.got
    good = s.decide(_req("c"))  # decided whatever the room; pod 2 serves it
    assert good.primary == "10.0.0.2:8000"
    s.on_first_token(good, clock.now())
    assert not rel.got
    s.on_finished(good, Usage(64, 8), clock.now())  # a success there: its room counts again, and an end
    (d,) = rel.got  # releases what is held (the director's hooks dispatch)
    assert isinstance(d, Decision) and d.primary == "10.0.0.2:8000"


def test_a_pod_on_probation_has_no_room():
    s, clock = _director()
    slot = s.dl.endpoints.slot("10.0.0.2:8000")
    s.dl.health.probation[slot] = True  # its ejection ran out: eligible for one probe, not for the room test
    _scrape(s, clock, [1, 0])
    usable, roomy = s.flow.usable()
    assert usable[slot] and not roomy[slot]
    assert s.decide_or_hold(_req("a"), Released()) is None


def _sized(rid: str, tokens: int, objective: str | None = None):
    """A request with a prompt of ``tokens`` tokens of its own (nothing cached anywhere)."""
    base = 100_000 * (ord(rid[0]) - ord("a") + 1)
    headers = {"x-gateway-inference-objective": objective} if objective else {}
    return request(rid, list(range(base, base + tokens)), max_tokens=8, headers=headers)


def _shorts(s, rel: Released, n: int) -> list[str]:
    """Hold ``n`` requests of 64 prompt tokens each, none sharing a block with another; their ids."""
    rids = [f"s{i:02d}" for i in range(n)]
    for i, rid in enumerate(rids):
        base = 10_000_000 + 1000 * i
        assert s.decide_or_hold(request(rid, list(range(base, base + 64)), max_tokens=8), rel) is None
    return rids


def _release_order(s, clock, rids: list[str], rel: Released) -> list[str]:
    """Open room on pod 2 once per held request (a fresh scrape each time); the order they went in."""
    for _ in rids:
        _scrape(s, clock, [1, 0])
        assert s.dispatch_held() == 1
    return [d.state.request.request_id for d in rel.got]


def test_a_much_shorter_prefill_passes_the_oldest_held_one_and_a_similar_one_does_not():
    s, clock = _director()
    _scrape(s, clock, [1, 1])
    rel = Released()
    sizes = {"a": 2048, "b": 1024, "c": 256, "d": 128}  # b is half of a: not short enough to pass it
    for rid, n in sizes.items():
        assert s.decide_or_hold(_sized(rid, n), rel) is None
    # d (1/16 of a) goes first, then c; b stays behind a (1/2 of it); with a gone, b is alone
    assert _release_order(s, clock, list(sizes), rel) == ["d", "c", "a", "b"]


def test_arrival_order_with_a_window_of_one():
    s, clock = _director(window=1)
    _scrape(s, clock, [1, 1])
    rel = Released()
    for rid, n in {"a": 2048, "b": 64}.items():
        assert s.decide_or_hold(_sized(rid, n), rel) is None
    assert _release_order(s, clock, ["a", "b"], rel) == ["a", "b"]


def test_a_long_prefill_is_passed_over_at_most_window_times():
    s, clock = _director(window=3)
    _scrape(s, clock, [1, 1])
    rel = Released()
    rids = ["a", "b", "c", "d", "e", "f"]
    for rid in rids:
        assert s.decide_or_hold(_sized(rid, 4096 if rid == "a" else 64), rel) is None
    # every short one is 1/64 of a: b, c and d pass it; passed three times, a goes before e and f
    assert _release_order(s, clock, rids, rel) == ["b", "c", "d", "a", "e", "f"]


def test_a_long_prefill_is_passed_by_at_most_pass_slack_of_its_own_at_the_head_of_the_queue():
    """Held first (nothing ahead of it), a 2048-token prompt may be passed by 0.5 x 2048 = 1024 tokens of shorter
    prefill: 16 prompts of 64 go first, the other 14 after it, although the window (256) allows all 30."""
    s, clock = _director()
    _scrape(s, clock, [1, 1])
    rel = Released()
    assert s.decide_or_hold(_sized("a", 2048), rel) is None
    shorts = _shorts(s, rel, 30)
    assert _release_order(s, clock, ["a", *shorts], rel) == [*shorts[:16], "a", *shorts[16:]]


def test_the_prefill_held_ahead_of_a_request_widens_what_may_pass_it():
    """A request held behind more prefill may be passed by more: b, held first, by 0.5 x 1024 = 512 tokens; c,
    behind b's 1024, by 1024 + 0.5 x (1024 + 1024) = 2048 of release. Passing c passes b too, so each budget
    binds in turn: the shorts stop at b's, and after b at what is left of c's."""
    s, clock = _director()
    _scrape(s, clock, [1, 1])
    rel = Released()
    for rid in "bc":  # held first: budgets 0.5 x 1024 = 512 (b) and 1024 + 0.5 x 2048 = 2048 (c) of release
        assert s.decide_or_hold(_sized(rid, 1024), rel) is None
    flow = s.flow
    assert flow is not None
    budgets = [h.budget for b in flow._bands.values() for h in b.values()]
    assert budgets == [512.0, 2048.0]
    shorts = _shorts(s, rel, 40)
    # b's budget: 8 shorts (512 tokens) pass it; then b goes (1024 released more), and c's budget 2048 leaves
    # room for 2048 - 512 - 1024 = 512: 8 more; then c, and the rest in arrival order among themselves
    assert _release_order(s, clock, ["b", "c", *shorts], rel) == [*shorts[:8], "b", *shorts[8:16], "c", *shorts[16:]]
    assert flow.released_work == 2 * 1024 + 40 * 64 and flow.held_work == 0.0


def test_only_the_prefill_held_in_its_own_band_and_higher_ones_widens_what_may_pass_a_request():
    """A lower band goes after a request whatever passes it, so its prefill is not ahead of it: b (priority 0),
    held behind a batch request's 8,192 tokens (priority -1), may be passed by 0.5 x 1024 = 512 tokens, as if
    nothing were held, not by 8,192 + 0.5 x (8,192 + 1,024); a goes last, after every request of the band above."""
    s, clock = _director()
    _scrape(s, clock, [1, 1])
    rel = Released()
    assert s.decide_or_hold(_sized("a", 8192, "batch"), rel) is None
    assert s.decide_or_hold(_sized("b", 1024), rel) is None
    flow = s.flow
    assert flow is not None
    budgets = {h.state.key: h.budget for b in flow._bands.values() for h in b.values()}
    assert budgets == {"a": 4096.0, "b": 512.0}
    shorts = _shorts(s, rel, 20)
    assert _release_order(s, clock, ["a", "b", *shorts], rel) == [*shorts[:8], "b", *shorts[8:], "a"]
    assert flow.held_work == 0.0 and not flow._band_work


def test_a_cancelled_request_went_before_no_one():
    """Its prefill leaves the held work but is not counted released: it uses up no one's budget."""
    s, clock = _director()
    _scrape(s, clock, [1, 1])
    rel = Released()
    assert s.decide_or_hold(_sized("a", 1024), rel) is None
    flow = s.flow
    assert flow is not None
    (held,) = [h for b in flow._bands.values() for h in b.values()]
    assert flow.cancel(held) and flow.queued == 0
    assert flow.released_work == 0.0 and flow.held_work == 0.0


def test_no_request_is_passed_over_more_than_window_times():
    rng = np.random.default_rng(7)
    sizes = {f"r{i:02d}": int(rng.choice([64, 512, 4096, 16384])) for i in range(40)}
    s, clock = _director(window=4)
    _scrape(s, clock, [1, 1])
    rel = Released()
    for rid, n in sizes.items():
        req = request(rid, list(range(1_000_000 * int(rid[1:]) + 1, 1_000_000 * int(rid[1:]) + 1 + n)), max_tokens=8)
        assert s.decide_or_hold(req, rel) is None
    order = _release_order(s, clock, list(sizes), rel)
    assert sorted(order) == sorted(sizes)
    went = {rid: i for i, rid in enumerate(order)}
    passed = {rid: sum(went[o] < went[rid] for o in sizes if o > rid) for rid in sizes}  # later ones gone first
    assert max(passed.values()) == 4  # the bound is reached (the 16K prompts) and never exceeded
