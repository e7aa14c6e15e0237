"""Decisions end to end through the scheduler: hooks, errors, explanations, affinity without hot spots."""

from __future__ import annotations

import pytest

from pickers.datalayer import PodMetrics
from pickers.explain import explain_header
from pickers.types import Endpoint, Role, SchedulingError, Usage

from .helpers import endpoints, request, scheduler


def test_decision_has_explanation_fallbacks_and_tracks_load():
    s, clock = scheduler(eps=endpoints(8))
    d = s.decide(request("r1", list(range(2048)), max_tokens=50))
    assert len(d.endpoints) == 3 and len(set(d.endpoints)) == 3
    assert d.primary in d.explanation
    assert set(d.explanation[d.primary]) == {"ttft", "tpot", "spread", "prefix", "kv-usage", "slo-fit",
                                             "rank-balance", "replicate", "total"}
    assert len([a for a in d.explanation if not a.startswith("_")]) == 5  # explain_top (plus "_slo")
    dl = s.dl
    slot = dl.endpoints.slot(d.primary)
    assert dl.inflight.prefill_tokens[slot] == 2048 and dl.inflight.decode_tokens[slot] == 50
    s.on_first_token(d, clock.now())
    assert dl.inflight.prefill_tokens[slot] == 0
    s.on_finished(d, Usage(2048, 50), clock.now())
    assert dl.inflight.requests[slot] == 0
    assert explain_header(d).startswith("profile=default; ")


def test_no_endpoint_503_names_the_cause():
    s, clock = scheduler(eps=endpoints(2), raw={"profile": "round-robin"})
    for slot in (0, 1):
        for _ in range(3):
            s.dl.health.failure(slot, "connect refused")
    # every scrape failing at once: panic, route on the last known metrics instead of a 503 for all
    assert s.decide(request("r0", list(range(16)))).primary in {"10.0.0.1:8000", "10.0.0.2:8000"}
    s.dl.health.failure(0, "connect refused")
    s.dl.health.success(1)  # one answers again: only it is routed to
    assert {s.decide(request(f"r{i}", list(range(16)))).primary for i in range(1, 5)} \
        == {s.dl.endpoints.address(1)}
    s.dl.health.failure(1, "connect refused")
    s.dl.health.failure(1, "connect refused")
    s.dl.health.failure(1, "connect refused")
    prefill_only = {"profile": "p", "profiles": {"p": {"filters": ["health", {"type": "role", "role": "prefill"}],
                                                       "scorers": [], "picker": {"type": "max-score"}}}}
    with pytest.raises(SchedulingError) as e:  # a filter that leaves nothing: the 503 says which one
        scheduler(eps=endpoints(2, role=Role.DECODE), raw=prefill_only)[0].decide(request("r", list(range(16))))
    assert e.value.status == 503 and "removed 2" in e.value.message
    s2, _ = scheduler(eps=[])
    with pytest.raises(SchedulingError) as e:
        s2.decide(request("r", list(range(16))))
    assert e.value.status == 503 and "0 endpoints known" in e.value.message


def test_request_failures_eject_a_pod_a_scrape_cannot_bring_it_back_a_probe_does():
    """Issue 14, Why 4: pod faults eject a pod; a good scrape does not undo it; after the ejection one probe
    request is let through (never two at once) and its success re-admits the pod; a failed probe ejects it
    for twice as long. Client 4xx never count."""
    s, clock = scheduler(eps=endpoints(2), raw={"profile": "round-robin"})
    health = s.dl.health
    ds = [s.decide(request(f"r{i}", list(range(16)))) for i in range(6)]
    bad = ds[0].primary
    slot = s.dl.endpoints.slot(bad)
    for d in ds:
        if d.primary == bad:
            s.on_failed(d, "http 404", clock.now())  # a client error: the pod is fine
    assert health.ejection_count == 0
    for d in ds:
        if d.primary == bad:
            s.on_failed(d, "reset", clock.now())
    assert health.ejection_count == 1
    health.success(slot)  # a good metrics scrape
    assert all(s.decide(request(f"x{i}", list(range(16)))).primary != bad for i in range(4))
    clock.advance(1.01)  # first ejection: 1 s
    later = [s.decide(request(f"z{i}", list(range(16)))) for i in range(6)]
    probes = [d for d in later if d.primary == bad]
    assert len(probes) == 1  # on probation: one request at a time
    s.on_failed(probes[0], "http 500", clock.now())  # the probe fails: out again, for 2 s
    clock.advance(1.5)
    assert all(s.decide(request(f"w{i}", list(range(16)))).primary != bad for i in range(4))
    clock.advance(0.6)
    later = [s.decide(request(f"v{i}", list(range(16)))) for i in range(6)]
    probes = [d for d in later if d.primary == bad]
    assert len(probes) == 1
    s.on_finished(probes[0], Usage(16, 1), clock.now())
    assert {s.decide(request(f"y{i}", list(range(16)))).primary for i in range(4)} == {a.address for a in endpoints(2)}


def test_gateway_passing_over_an_endpoint_counts_against_it():
    """The served endpoint is the second of the fallback list: the first failed the request before any byte."""
    s, clock = scheduler(eps=endpoints(3))
    health = s.dl.health
    d = s.decide(request("r0", list(range(16))))
    first, second = d.endpoints[0], d.endpoints[1]
    s.on_served(d, second)
    s.on_finished(d, Usage(16, 1), clock.now())
    assert health.request_failures[s.dl.endpoints.slot(first)] == 1
    assert health.request_failures[s.dl.endpoints.slot(second)] == 0


def test_prefix_affinity_without_hot_spot():
    """Same 8K-token prefix, requests never finish: the first few stick to the pod with the cache, then
    the queue there outweighs the saved prefill and traffic spreads over every pod."""
    s, clock = scheduler(eps=endpoints(4))
    shared = list(range(6000))
    primaries = []
    for i in range(40):
        toks = shared + [100_000 + i] * 2000
        primaries.append(s.decide(request(f"r{i}", toks)).primary)
    assert primaries[1] == primaries[0]  # affinity: the second request follows the cache
    counts = {a: primaries.count(a) for a in set(primaries)}
    assert len(counts) == 4 and max(counts.values()) <= 20, counts


def test_served_elsewhere_moves_load_and_learns():
    s, clock = scheduler(eps=endpoints(3))
    d = s.decide(request("r", list(range(320))))
    other = next(e.address for e in endpoints(3) if e.address != d.primary)
    s.on_served(d, other)
    dl = s.dl
    assert dl.inflight.requests[dl.endpoints.slot(other)] == 1
    assert dl.inflight.requests[dl.endpoints.slot(d.primary)] == 0
    blocks = dl.approx.match(d.state.block_hashes[16])[0]
    assert blocks[dl.endpoints.slot(other)] == 20


def test_endpoints_added_and_removed_at_run_time():
    s, clock = scheduler(eps=endpoints(1), raw={"profile": "round-robin"})
    s.add_endpoint(Endpoint("10.9.9.9:8000"))
    assert {s.decide(request(f"r{i}", list(range(16)))).primary for i in range(2)} == {"10.0.0.1:8000",
                                                                                       "10.9.9.9:8000"}
    s.remove_endpoint("10.0.0.1:8000")
    assert {s.decide(request(f"x{i}", list(range(16)))).primary for i in range(3)} == {"10.9.9.9:8000"}
    with pytest.raises(KeyError):
        s.dl.metrics.update("10.0.0.1:8000", PodMetrics())


async def test_schedule_uses_prompt_and_chat_and_token_ids():
    s, clock = scheduler()
    d = await s.route(request("p", prompt="hello " * 100))
    assert d.state.tokens.size == 150
    d = await s.route(request("c", messages=[{"role": "user", "content": "hi there"}], api="chat"))
    assert d.state.tokens.size > 0
    d = await s.route(request("t", [5, 6, 7]))
    assert d.state.tokens.tolist() == [5, 6, 7]


def test_ready_follows_decode_capable_endpoints_not_pod_health():
    from pickers.config import build_scheduler
    from pickers.types import Endpoint

    s = build_scheduler(None, [Endpoint("10.0.0.1:8000", role="prefill")], network=False)
    assert not s.ready()  # a prefill pod alone cannot serve a request
    s.add_endpoint(Endpoint("10.0.0.2:8000", role="decode"))
    assert s.ready()
    slot = s.dl.endpoints.slot("10.0.0.2:8000")
    for _ in range(10):
        s.dl.health.failure(slot, "test")
    assert s.ready()  # unhealthy pods give 503s from the picker, not an unready picker
    s.remove_endpoint("10.0.0.2:8000")
    assert not s.ready()


def test_subset_hint_is_applied_once_by_the_director_for_every_profile():
    a, b, c = (e.address for e in endpoints(3))
    for profile in ("default", "round-robin", "least-inflight"):
        s, _ = scheduler(raw={"profile": profile})
        assert s.decide(request("r", list(range(64)), subset=[c, "9.9.9.9:1"])).endpoints == [c]
        assert set(s.decide(request("r2", list(range(64)), subset=[a, b])).endpoints) == {a, b}
        for subset, code in (([], "subset_empty"), (["9.9.9.9:1"], "subset_no_match")):
            with pytest.raises(SchedulingError) as e:
                s.decide(request("x", list(range(64)), subset=subset))
            assert (e.value.status, e.value.code) == (503, code), profile


def test_least_inflight_profile_balances_requests_and_releases_them():
    eps = [Endpoint("10.0.0.1:1", role="decode"), Endpoint("10.0.0.2:1"), Endpoint("10.0.0.3:1", role="prefill")]
    s, clock = scheduler(raw={"profile": "least-inflight"}, eps=eps)
    d1 = s.decide(request("r1", list(range(16))))
    d2 = s.decide(request("r2", list(range(16))))
    assert sorted([d1.primary, d2.primary]) == ["10.0.0.1:1", "10.0.0.2:1"]  # never the prefill-only pod
    assert set(d1.endpoints) == {"10.0.0.1:1", "10.0.0.2:1"}
    s.on_finished(d1, None, clock.now())
    assert s.decide(request("r3", list(range(16)))).primary == d1.primary
    s.on_served(d2, d1.primary)  # the gateway's fallback moved r2: its load moves with it
    dl = s.dl
    assert dl.inflight.requests[dl.endpoints.slot(d2.primary)] == 0
    s.on_failed(d2, "x", clock.now())
    assert dl.inflight.requests[dl.endpoints.slot(d1.primary)] == 1  # r3 only


def test_max_fallback_cuts_the_list_the_gateway_gets():
    s, _ = scheduler(eps=endpoints(5), max_fallback=2)
    assert len(s.decide(request("r", list(range(64)))).endpoints) == 2
