"""Prefills the picker sends on its own: a copy of a hot group prefix made by a one-token request that no user
request waits for.

Below the knee a group whose shared prefix one pod holds queues its bursts there; a second warm pod halves
that (pickers/plugins/score_replicate.py). Made by routing a user request to a pod without the prefix, the
copy costs that request a cold prefill (4.6K tokens: ~0.49 s against ~0.08 s warm on an L40S 8B) and the
requests behind it on that pod their wait: on 400-request shared-prefix runs at the knee that took TTFT p90
from ~0.23 s to ~0.49 s. Made by a warm-up, the user request goes where it is fastest and the copy is a
background prefill of the prefix alone (``max_tokens`` 1) on a pod with nothing queued, sent in pieces (the
prefix's first 512 tokens, then its first 1,024, ...), each when the one before has ended: the pod's own
requests that arrive meanwhile wait for one piece, not the whole prefix (at the knee, 400 requests, TTFT p90
348 -> 199 ms against one piece).

The picker counts a warm-up as its own request in flight on that pod (``InflightTracker``: the prefix's
tokens as queued prefill) until the transport reports it ended, so the predictor routes around the pod while
it computes the copy; the prefix index learns the copy from the pod's KV events like any other prefill.

Transports: the simulator submits each warm-up to its pod (engine/sim/cluster); ``kvswitch serve`` posts it
to the pod's OpenAI completions endpoint with the prompt as token ids (pickers/datalayer/warmupsender.py).
Without one, ``DataLayer.warmups`` is None and the replicate scorer makes its copy with the user request.

Invariants (bounded): at most ``max_in_flight`` warm-ups between ``offer`` and ``done`` (taken or not), at
most one per endpoint and one per group prefix; one that the transport has not reported after ``timeout_s``
is dropped (``expire``) and its in-flight count released. Each warm-up is handed out by ``take`` once.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pickers.datalayer.inflight import InflightTracker
    from pickers.types import Endpoint


@dataclass(frozen=True, slots=True, eq=False)
class Warmup:
    """One warm-up prefill: ``token_ids`` (the group prefix, whole KV blocks) to ``address`` for ``model``, in
    pieces."""

    request_id: str
    slot: int
    endpoint_id: str  # what a Decision names (``Endpoint.id``: ip:port, #rank for a data-parallel rank)
    address: str  # ip:port
    scheme: str  # http, or https where the pod's metrics are served over TLS
    dp_rank: int | None  # sent as X-data-parallel-rank
    model: str
    token_ids: np.ndarray
    key: int  # the hash of the prefix's last block: one warm-up per group prefix
    issued_at: float
    # the pieces, sent one after another: piece k is the prompt ``token_ids[:ends[k]]`` (each a whole number of
    # blocks but the last, which ends at ``token_ids.size``; the pod's prefix cache holds the pieces before it)
    ends: tuple[int, ...]

    def piece(self, k: int) -> np.ndarray:
        return self.token_ids[: self.ends[k]]


@dataclass(frozen=True, slots=True)
class WarmupSettings:
    max_in_flight: int = 8
    timeout_s: float = 30.0
    # a warm-up counts as prefill queued ahead on its pod until its predicted end (the transport's report
    # ends it sooner): this many times the predicted prefill, at least ``min_hold_s``
    hold_factor: float = 2.0
    min_hold_s: float = 0.5


def piece_ends(size: int, piece_tokens: int, block_size: int) -> tuple[int, ...]:
    """The prefix lengths of a warm-up's pieces: multiples of ``piece_tokens`` rounded down to whole blocks (at
    least one block), then ``size``; ``piece_tokens`` 0: one piece."""
    if piece_tokens <= 0 or piece_tokens >= size:
        return (size,)
    step = max(block_size, piece_tokens // block_size * block_size)
    return (*range(step, size, step), size)


class Warmups:
    def __init__(self, inflight: InflightTracker, settings: WarmupSettings | None = None,
                 on_offer: Callable[[], None] | None = None) -> None:
        self.settings = settings or WarmupSettings()
        self.inflight = inflight
        self.on_offer = on_offer  # the transport's wake-up
        self._in_flight: dict[str, Warmup] = {}  # request id -> warm-up, oldest first
        self._slots: set[int] = set()
        self._keys: set[int] = set()
        self._new: list[Warmup] = []
        self._ids = itertools.count()
        self.offered = self.ok = self.failed = self.expired = 0
        self.count: Callable[[str], None] | None = None  # outcome -> a metric (kvswitch_warmups)
        # an answered piece's latency in seconds, as its transport saw it -> a metric
        # (kvswitch_warmup_piece_seconds): the pods' own TTFT histograms count these prefills too, and whoever
        # reads those for the users' requests (e2e/bench/runner.py) takes them out
        self.piece_time: Callable[[float], None] | None = None

    def __len__(self) -> int:
        return len(self._in_flight)

    def offer(self, slot: int, endpoint: Endpoint, model: str, key: int, token_ids: np.ndarray, now: float,
              prefill_s: float, block_size: int = 16, piece_tokens: int = 0) -> bool:
        """Ask for a copy of ``token_ids`` (whole blocks of ``block_size``) on ``slot``, sent in pieces of about
        ``piece_tokens`` (0: one); False (nothing sent) while that pod or that prefix has a warm-up in flight,
        or ``max_in_flight`` are.

        Pieces: each is sent when the one before has ended, so a request the pod gets meanwhile waits for one
        piece's prefill, not the whole prefix's (vLLM admits its waiting requests in arrival order)."""
        self.expire(now)
        if (slot in self._slots or key in self._keys or len(self._in_flight) >= self.settings.max_in_flight
                or token_ids.size == 0):
            return False
        scheme = "https" if (endpoint.metrics_url or "").startswith("https://") else "http"
        ids = np.array(token_ids, dtype=np.int64)
        w = Warmup(f"kvswitch-warmup-{next(self._ids)}", slot, endpoint.id, endpoint.address, scheme,
                   endpoint.dp_rank, model, ids, key, now, piece_ends(ids.size, piece_tokens, block_size))
        self._in_flight[w.request_id] = w
        self._slots.add(slot)
        self._keys.add(key)
        self._new.append(w)
        hold = max(self.settings.hold_factor * prefill_s, self.settings.min_hold_s)
        self.inflight.add(w.request_id, slot, None, float(w.token_ids.size), 1.0, now, first_token_by=now + hold)
        self.offered += 1
        self._count("offered")
        if self.on_offer is not None:
            self.on_offer()
        return True

    def take(self) -> list[Warmup]:
        """The warm-ups offered since the last call, oldest first (each once)."""
        new, self._new = self._new, []
        return new

    def done(self, request_id: str, ok: bool) -> None:
        """The transport's report: the warm-up ended (``ok``: its prefill ran). Unknown ids are ignored."""
        w = self._in_flight.pop(request_id, None)
        if w is None:
            return
        self._release(w)
        if ok:
            self.ok += 1
        else:
            self.failed += 1
        self._count("ok" if ok else "failed")

    def expire(self, now: float) -> None:
        """Drop the warm-ups older than ``timeout_s`` (a transport that lost them)."""
        limit = now - self.settings.timeout_s
        while self._in_flight:
            w = next(iter(self._in_flight.values()))
            if w.issued_at > limit:
                return
            del self._in_flight[w.request_id]
            self._release(w)
            self.expired += 1
            self._count("expired")

    def _count(self, outcome: str) -> None:
        if self.count is not None:
            self.count(outcome)

    def _release(self, w: Warmup) -> None:
        self._slots.discard(w.slot)
        self._keys.discard(w.key)
        self.inflight.finish(w.request_id)
        if self._new:
            self._new = [x for x in self._new if x is not w]


__all__ = ["Warmup", "WarmupSettings", "Warmups", "piece_ends"]
