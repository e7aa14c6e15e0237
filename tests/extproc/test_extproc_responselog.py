"""extproc.responselog: Envoy's access-log entries read into outcomes, and the bounded wait for them."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2 as al
from prometheus_client import REGISTRY

from extproc.outcome import RoutedOutcome
from extproc.responselog import (
    CLIENT_GONE,
    MAX_LOG_LAG_S,
    NO_ENTRY,
    SUPERSEDED,
    AccessLogReceiver,
    LoggedResponse,
    PendingResponses,
    logged_response,
)
from pickers.clock import ManualClock
from pickers.datalayer.health import pod_fault
from pickers.datalayer.inflight import InflightTracker
from pickers.types import Decision, Usage

START_S = 1_800_000_000


def _entry(rid: str = "r1", status: int | None = 200, end_ms: int = 900, **md: object) -> al.HTTPAccessLogEntry:
    e = al.HTTPAccessLogEntry()
    e.request.request_id = rid
    if status is not None:
        e.response.response_code.value = status
    c = e.common_properties
    c.start_time.seconds = START_S
    c.time_to_last_downstream_tx_byte.nanos = end_ms * 1_000_000
    sock = c.upstream_remote_address.socket_address
    sock.address, sock.port_value = "10.0.0.7", 8000
    if md:
        fields = c.metadata.filter_metadata["kvswitch.response"].fields
        for k, v in md.items():
            if isinstance(v, bool):
                fields[k].bool_value = v
            elif isinstance(v, (int, float)):
                fields[k].number_value = v
            else:
                fields[k].string_value = str(v)
    return e


def _first_us(ms: float) -> float:
    return START_S * 1e6 + ms * 1000


def test_a_complete_stream_gives_first_byte_usage_and_success():
    r = logged_response(_entry(first_byte_us=_first_us(120), sse=True, done=True, events=5,
                               prompt_tokens=900, completion_tokens=5, cached_tokens=640))
    assert r == LoggedResponse("r1", 200, "10.0.0.7:8000", pytest.approx(0.12), pytest.approx(0.9),
                               Usage(900, 5, 640), None)


@pytest.mark.parametrize(("entry", "failure"), [
    (_entry(sse=True, done=False, events=3), "truncated: the response stream ended without its final event ([DONE])"),
    (_entry(sse=True, done=True, error_event=True), "stream error event"),
    (_entry(status=503), "http 503"),
    (_entry(status=404), "http 404"),
    (_entry(status=None), "no response"),
])
def test_failures_are_named_in_the_directors_vocabulary(entry, failure):
    assert logged_response(entry).failure == failure


@pytest.mark.parametrize(("flag", "failure", "blames_pod"), [
    ("upstream_connection_failure", "upstream connection failure", True),
    ("upstream_request_timeout", "upstream timeout", True),
    ("upstream_remote_reset", "upstream reset", True),
    ("downstream_connection_termination", CLIENT_GONE, False),
])
def test_response_flags_say_who_failed(flag, failure, blames_pod):
    e = _entry(sse=True, done=False)
    setattr(e.common_properties.response_flags, flag, True)
    r = logged_response(e)
    assert r.failure == failure and pod_fault(failure) is blames_pod


def test_counts_that_are_not_plain_integers_are_not_used():
    before = REGISTRY.get_sample_value("kvswitch_malformed_usage_total") or 0.0
    # a prompt count beyond any real prompt (the Lua observer passes any digits on) falls back to the events
    r = logged_response(_entry(sse=True, done=True, events=4, prompt_tokens=2.0 ** 64, completion_tokens=4))
    assert r.usage == Usage(completion_tokens=4) and r.failure is None
    r = logged_response(_entry(sse=True, done=True, events=2, usage_malformed=True))
    assert r.usage == Usage(completion_tokens=2)
    assert (REGISTRY.get_sample_value("kvswitch_malformed_usage_total") or 0.0) - before == 2
    # a string where a number belongs, a first byte before the request started: ignored
    r = logged_response(_entry(first_byte_us="soon", prompt_tokens="12", completion_tokens=3))
    assert r.first_byte_s is None and r.usage is None
    assert logged_response(_entry(first_byte_us=_first_us(-5))).first_byte_s is None
    assert logged_response(_entry(rid="")) is None  # not a request kvswitch routed


@dataclass
class _Parked:
    logged: list[LoggedResponse] = field(default_factory=list)
    abandoned: list[str] = field(default_factory=list)

    def finish_logged(self, response: LoggedResponse) -> None:
        self.logged.append(response)

    def abandon(self, reason: str) -> None:
        self.abandoned.append(reason)


def test_pending_is_bounded_in_count_and_age_and_each_entry_reaches_its_request():
    now = [0.0]
    pending = PendingResponses(max_pending=3, max_age_s=10.0, clock=lambda: now[0])
    parked = {f"r{i}": _Parked() for i in range(5)}
    for rid in ("r0", "r1", "r2", "r3"):
        pending.park(rid, parked[rid])
    assert len(pending) == 3 and parked["r0"].abandoned == [NO_ENTRY]  # the oldest makes room
    recv = AccessLogReceiver(pending)
    recv.receive(_entry("r2", sse=True, done=True))
    recv.receive(_entry("r2"))  # a second entry for the same id: nobody waits for it
    recv.receive(_entry("elsewhere"))  # routed by another replica
    assert [r.request_id for r in parked["r2"].logged] == ["r2"] and len(pending) == 2
    now[0] = 11.0
    pending.park("r4", parked["r4"])  # parking also expires what waited too long
    assert parked["r1"].abandoned == parked["r3"].abandoned == [NO_ENTRY] and len(pending) == 1
    pending.abandon_all()
    assert parked["r4"].abandoned == [NO_ENTRY] and len(pending) == 0
    assert pod_fault(NO_ENTRY) is False  # an outcome never heard of blames no pod
    first, replay = _Parked(), _Parked()
    pending.park("again", first)
    pending.park("again", replay)  # Envoy replayed the stream: the first decision is void, the replay waits
    assert first.abandoned == [SUPERSEDED] and pod_fault(SUPERSEDED) is False and len(pending) == 1


def test_a_malformed_entry_is_counted_and_the_stream_goes_on():
    before = REGISTRY.get_sample_value("kvswitch_access_log_entries_total", {"outcome": "malformed"}) or 0.0
    pending = PendingResponses()
    p = _Parked()
    pending.park("r1", p)
    recv = AccessLogReceiver(pending)
    recv.receive(object())  # type: ignore[arg-type]
    recv.receive(_entry("r1"))
    assert len(p.logged) == 1
    assert (REGISTRY.get_sample_value("kvswitch_access_log_entries_total", {"outcome": "malformed"}) or 0) - before == 1


def test_predicted_first_token_releases_prefill_work_when_due():
    t = InflightTracker(max_endpoints=4, max_records=10)
    t.add("a", 0, None, 500.0, 100.0, now=0.0, first_token_by=0.2)
    t.add("b", 0, None, 300.0, 100.0, now=0.0, first_token_by=1.0)
    t.add("c", 1, None, 100.0, 10.0, now=0.0)  # a live first token will come: never settled by time
    t.settle(0.5)
    assert t.prefill_tokens[0] == 300.0 and t.prefill_requests[0] == 1 and t.requests[0] == 2
    t.finish("b")
    t.settle(2.0)  # b's due entry finds no record: nothing happens twice
    assert t.prefill_tokens[0] == 0.0 and t.prefill_requests[0] == 0 and t.requests[0] == 1
    assert t.prefill_tokens[1] == 100.0
    for i in range(25):  # the heap stays bounded by the records even when nothing settles it
        t.add(f"x{i}", 2, None, 1.0, 1.0, now=0.0, first_token_by=1e9)
        t.settle(0.0)
    assert t.predicted_first_tokens <= 2 * t.max_records + 1


@pytest.mark.parametrize(("received_after_end_s", "lag"), [
    (0.007, 0.007),  # batched for 7 ms: the entry came 7 ms after the request ended
    (-0.5, 0.0),  # the picker's clock behind Envoy's: skew, not a negative delay
    (60.0, MAX_LOG_LAG_S),  # a minute late is skew between hosts: bounded
    (None, 0.0),  # no arrival time given: no lag assumed
])
def test_an_entrys_lag_is_read_from_envoys_clock_and_bounded(received_after_end_s, lag):
    end_s = 0.9  # _entry: the request ended 900 ms after START_S on Envoy's clock
    received = None if received_after_end_s is None else START_S + end_s + received_after_end_s
    assert logged_response(_entry(end_ms=900), received).lag_s == pytest.approx(lag, abs=1e-6)


@dataclass
class _Director:
    """The end hooks' times as a RoutedOutcome reports them."""

    first_token_at: list[float] = field(default_factory=list)
    finished_at: list[float] = field(default_factory=list)

    def on_first_token(self, decision: Decision, at: float) -> None:
        self.first_token_at.append(at)

    def on_finished(self, decision: Decision, usage: Usage | None, at: float) -> None:
        self.finished_at.append(at)

    def on_served(self, decision: Decision, served: str) -> None:
        pass


def test_a_batched_entry_dates_the_hooks_when_things_happened_not_when_the_batch_came():
    """Envoy batches access-log entries (10 ms by default): the first token and the end reach the director at
    the times they happened on the picker's clock, the batch's delay taken off; without it a batch would stretch
    every observed TTFT and bias the online correction."""
    clock = ManualClock(100.0)
    director = _Director()
    pending = PendingResponses(clock=clock.now)
    outcome = RoutedOutcome(director, clock, pending)  # type: ignore[arg-type]
    assert outcome.place(Decision(state=None, endpoints=["10.0.0.7:8000"]), "r1")  # type: ignore[arg-type]
    clock.advance(0.908)  # the entry comes 8 ms after the end (900 ms after the request started)
    AccessLogReceiver(pending, wall=lambda: START_S + 0.908).receive(
        _entry("r1", end_ms=900, first_byte_us=_first_us(120), sse=True, done=True, events=5,
               prompt_tokens=900, completion_tokens=5))
    assert director.finished_at == [pytest.approx(100.9)]
    assert director.first_token_at == [pytest.approx(100.12)]
