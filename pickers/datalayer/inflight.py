"""Load the picker puts on each pod itself, known the moment it decides (metrics lag by a scrape).

Per pod slot: requests routed and not finished, those still before their first token (queued or in
prefill), their uncached prompt tokens (prefill work ahead of a new request), the decode tokens they may
still produce, the KV they hold times the steps they hold it for (the KV drain: pickers/kvwait.py), and
those past their first token (decoding) with the sum of their first-token times (how long the pod's running
decodes have been at it: pickers/slotwait.py). Fed by the scheduler's hooks; records
expire after ``ttl_s`` so a lost "finished" report cannot leak load forever, and at most ``max_records`` are
kept.

When the gateway reports a response only once it has ended (``response_body: access-log``), no first token
arrives while a request runs: ``add`` then takes the predicted first-token time and ``settle`` moves the
request out of the prefill counts when that time has passed (the real first token, reported at the end,
corrects the predictor instead).

Against the pod's own scraped queue, each slot also counts, since its last scrape (``MetricsStore.epoch``),
the requests sent to it that have not started and the requests sent before that scrape that have started
since: ``waiting_since_scrape`` turns the scraped waiting count into one as of now (pickers/flowcontrol.py).

A first token is stamped with the latest time the tracker was told (``add``, ``settle``: every decision),
not the moment it arrived, which the hook does not carry; it is late by at most the gap between two
decisions, and nothing reads it in between. The sum of first-token times goes back to exactly 0 whenever a
slot has no decoding request, so rounding cannot accumulate.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class _Rec:
    slot: int
    prefill_slot: int  # where the prompt is computed (== slot without a prefill leg)
    uncached: float
    decode: float
    at: float
    started: bool = False
    started_at: float = 0.0  # the tracker's time when its first token was counted
    epoch: int = 0  # its prefill slot's scrape epoch when it was sent there

    @property
    def kv_steps(self) -> float:
        """The KV it holds while it decodes (its uncached prompt and, on average, half its output: a cached
        prefix is held once for every request that shares it) times the steps it holds it for."""
        return (self.uncached + self.decode / 2.0) * self.decode


class InflightTracker:
    def __init__(self, max_endpoints: int = 1024, ttl_s: float = 600.0, max_records: int = 100_000,
                 scrape_epoch: np.ndarray | None = None) -> None:
        n = max_endpoints
        self.requests = np.zeros(n)
        self.prefill_requests = np.zeros(n)
        self.prefill_tokens = np.zeros(n)
        self.decode_tokens = np.zeros(n)
        self.kv_steps = np.zeros(n)  # the sum of the requests' KV x steps (_Rec.kv_steps): pickers/kvwait.py
        self.decoding = np.zeros(n)  # requests past their first token (on the decode slot)
        self.decoding_since = np.zeros(n)  # the sum of their first-token times
        # per prefill slot, since its last scrape (``scrape_epoch``, MetricsStore.epoch; the counts belong to
        # ``_counted_epoch`` and read as 0 once a newer scrape has come): requests sent there and not started,
        # and requests sent before that scrape that started since
        self.scrape_epoch = np.zeros(n, dtype=np.int64) if scrape_epoch is None else scrape_epoch
        self._counted_epoch = np.full(n, -1, dtype=np.int64)
        self._sent_since = np.zeros(n)
        self._started_since = np.zeros(n)
        self._now = 0.0  # the latest time the tracker was told (stamps first tokens)
        self.ttl_s = ttl_s
        self.max_records = max_records
        self._recs: dict[str, _Rec] = {}
        self._due: list[tuple[float, str]] = []  # (predicted first token, rid), a heap; see settle

    def __len__(self) -> int:
        return len(self._recs)

    def add(self, rid: str, slot: int, prefill_slot: int | None, uncached: float, decode: float, now: float,
            first_token_by: float | None = None) -> None:
        """Count a routed request; ``first_token_by``: when no first-token report will come while it runs,
        the predicted time after which its prompt no longer counts as prefill work ahead (``settle``)."""
        self._now = now
        self._expire(now)
        if rid in self._recs:
            self.finish(rid)
        p = slot if prefill_slot is None else prefill_slot
        r = self._recs[rid] = _Rec(slot, p, float(uncached), float(decode), now)
        self._sent(r)
        if first_token_by is not None:
            heapq.heappush(self._due, (first_token_by, rid))
        self.requests[slot] += 1
        self.decode_tokens[slot] += decode
        self.kv_steps[slot] += r.kv_steps
        self.prefill_requests[p] += 1
        self.prefill_tokens[p] += uncached

    def move(self, rid: str, slot: int) -> None:
        """The gateway used another endpoint of the fallback list."""
        r = self._recs.get(rid)
        if r is None or r.slot == slot:
            return
        same = r.prefill_slot == r.slot
        self.requests[r.slot] -= 1
        self.decode_tokens[r.slot] -= r.decode
        self._release_kv(r)
        self.requests[slot] += 1
        self.decode_tokens[slot] += r.decode
        self.kv_steps[slot] += r.kv_steps
        if r.started:
            self._undecode(r)
            self.decoding[slot] += 1
            self.decoding_since[slot] += r.started_at
        if same and not r.started:
            self.prefill_requests[r.slot] -= 1
            self.prefill_tokens[r.slot] -= r.uncached
            self.prefill_requests[slot] += 1
            self.prefill_tokens[slot] += r.uncached
            if self._counting(r.slot) and r.epoch == self._counted_epoch[r.slot]:
                self._sent_since[r.slot] -= 1  # it never waited there (the gateway passed it over)
        if same:
            r.prefill_slot = slot
        r.slot = slot
        if same and not r.started:
            self._sent(r)

    def first_token(self, rid: str, at: float | None = None) -> None:
        r = self._recs.get(rid)
        if r is not None:
            self.first_token_rec(r, at)

    def finish(self, rid: str) -> _Rec | None:
        r = self._recs.pop(rid, None)
        if r is None:
            return None
        self.first_token_rec(r)
        self._undecode(r)
        self.requests[r.slot] -= 1
        self.decode_tokens[r.slot] -= r.decode
        self._release_kv(r)
        return r

    @property
    def predicted_first_tokens(self) -> int:
        """Entries waiting in the predicted-first-token heap (bounded: see ``settle``)."""
        return len(self._due)

    def settle(self, now: float) -> None:
        """Requests whose predicted first token is due leave the prefill counts. The heap holds at most one
        entry per ``add`` with a prediction; entries of finished requests are dropped when due, and the heap
        is rebuilt from live records if it ever holds twice ``max_records``."""
        self._now = now
        due = self._due
        while due and due[0][0] <= now:
            at, rid = heapq.heappop(due)
            r = self._recs.get(rid)
            if r is not None:
                self.first_token_rec(r, at)
        if len(due) > 2 * self.max_records:
            self._due = [(t, rid) for t, rid in due if rid in self._recs and not self._recs[rid].started]
            heapq.heapify(self._due)

    def first_token_rec(self, r: _Rec, at: float | None = None) -> None:
        """``r`` is past its first token (at ``at``; default: the tracker's latest time)."""
        if not r.started:
            r.started = True
            r.started_at = self._now if at is None else at
            p = r.prefill_slot
            self._sync(p)
            if r.epoch == self._counted_epoch[p]:
                self._sent_since[p] -= 1
            else:
                self._started_since[p] += 1
            self.prefill_requests[r.prefill_slot] -= 1
            self.prefill_tokens[r.prefill_slot] -= r.uncached
            self.decoding[r.slot] += 1
            self.decoding_since[r.slot] += r.started_at

    # ---- since the last scrape -------------------------------------------------------------------------
    def _counting(self, p: int) -> bool:
        return bool(self._counted_epoch[p] == self.scrape_epoch[p])

    def _sync(self, p: int) -> None:
        """Start slot ``p``'s counts afresh when a scrape came since they were last touched."""
        e = self.scrape_epoch[p]
        if self._counted_epoch[p] != e:
            self._counted_epoch[p] = e
            self._sent_since[p] = self._started_since[p] = 0.0

    def _sent(self, r: _Rec) -> None:
        p = r.prefill_slot
        self._sync(p)
        self._sent_since[p] += 1
        r.epoch = int(self.scrape_epoch[p])

    def waiting_since_scrape(self, slots: np.ndarray, scraped: np.ndarray) -> np.ndarray:
        """The pods' waiting counts now, from ``scraped`` (their last scrape's, per slot of ``slots``): less the
        requests this picker sent before that scrape that have started since (they may have been among them),
        plus those it sent since that have not started."""
        current = self._counted_epoch[slots] == self.scrape_epoch[slots]
        started = np.where(current, self._started_since[slots], 0.0)
        sent = np.where(current, self._sent_since[slots], 0.0)
        return np.maximum(scraped - started, 0.0) + sent

    def _release_kv(self, r: _Rec) -> None:
        """Take ``r``'s KV x steps off its slot (after its request count; exactly 0 once the last one leaves)."""
        s = r.slot
        self.kv_steps[s] = self.kv_steps[s] - r.kv_steps if self.requests[s] > 0 else 0.0

    def _undecode(self, r: _Rec) -> None:
        """Take a started ``r`` out of its slot's decoding counts (exactly 0 once the last one leaves)."""
        if r.started:
            s = r.slot
            self.decoding[s] -= 1
            self.decoding_since[s] = self.decoding_since[s] - r.started_at if self.decoding[s] > 0 else 0.0

    def reset(self, slot: int) -> None:
        for rid in [k for k, r in self._recs.items() if r.slot == slot or r.prefill_slot == slot]:
            self.finish(rid)
        self.requests[slot] = self.prefill_requests[slot] = 0.0
        self.prefill_tokens[slot] = self.decode_tokens[slot] = self.kv_steps[slot] = 0.0
        self.decoding[slot] = self.decoding_since[slot] = 0.0
        self._sent_since[slot] = self._started_since[slot] = 0.0
        self._counted_epoch[slot] = -1

    def _expire(self, now: float) -> None:
        recs = self._recs
        while recs:
            rid, r = next(iter(recs.items()))
            if now - r.at <= self.ttl_s and len(recs) < self.max_records:
                break
            self.finish(rid)
