"""Flow control: past the knee a request waits in the picker for a pod with room, not in one pod's queue.

Without it a request is bound to a pod the moment it arrives. Past the knee it then waits in that pod's queue
behind requests whose output lengths, unknown when they were placed, decide how long; the pods' queues drift apart,
and a request that arrived later on a luckier pod starts first. With it, a request that finds no room on any of its
candidates waits here, and is decided the moment some pod has room. A pod has room while fewer than ``room``
requests wait in its queue (``DataLayer.waiting_now``), or while its next step would start what is queued there and
one more prompt (``step_share``, ``FlowControl._step_room``): late binding, the placement made with the fleet as it
is when the request can start (the flow control of Gateway API Inference Extension and llm-d). A request released
for room is placed among the pods with room (``room_first``), unless one without holds much more of its prompt
(``cache_loss``); the profile places it there. Room counts only on a pod whose requests succeed: one that fails
every request fast has an empty queue. Below the knee some pod always has room and nothing is held.

Invariants:

- At most ``max_queued`` requests are held. One more is decided at once and waits in a pod's queue as it
  would without flow control: nothing is rejected for want of room here.
- A held request is decided at the latest ``max_wait_s`` after it was held, or by its own
  ``InferenceRequest.hold_limit_s`` (the gateway's deadline for the routing answer), room or not.
- Release order: higher priority first, then arrival, except that within a band a request with under
  1/``pass_ratio`` of the oldest's prefill may go before it; no request is passed over more than ``window``
  times, nor by more prefill than ``pass_slack`` x (what was held ahead of it when it was held, in its band
  and the higher ones, + its own). A request whose candidates (the gateway's subset hint) have no room does
  not hold up one behind it whose candidates do; one whose candidates have no healthy decode pod left is
  released at once (its decision answers with the 503).
- Never held: requests with latency targets (admission and the slo-fit scorer weigh their wait on each pod,
  which a queue here would hide from them), and requests of a handler that runs prefill legs (room there is
  the prefill pool's; not modelled yet).

The queue is synchronous and owns no task: the director releases held requests when the fleet changes
(a first token, an end, a failure) and on a short tick (scrapes and predicted first tokens move the room
without a hook), and the virtual-time simulator calls the same ``Director.dispatch_held``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

from pickers.kvwait import kv_held
from pickers.state import RequestState
from pickers.types import Decision, SchedulingError

Released = Literal["room", "deadline", "unservable"]


class Room(NamedTuple):
    """Two masks over the endpoint table's slots (``FlowControl.usable``)."""

    usable: np.ndarray  # a healthy active decode endpoint
    roomy: np.ndarray  # one of those with room whose requests succeed


@dataclass(slots=True)
class FlowControlSettings:
    """``scheduler.flow_control`` (pickers/config.py)."""

    enabled: bool | None = None  # None: the running profile's choice (``flow_control`` in its definition)
    room: float = 1.0  # a pod has room while fewer requests than this wait in its queue
    max_queued: int = 4096
    max_wait_s: float = 600.0
    # a request released for room goes to a pod with room, unless that loses more than ``cache_loss`` of its
    # prompt in cached tokens against the warmest candidate (then the profile weighs the warm pod's queue)
    room_first: bool = True
    cache_loss: float = 0.25
    tick_s: float = 0.01  # how often a server re-checks the room while requests are held
    # released for room: the oldest held request, unless one of the next ``window - 1`` needs under 1/``pass_ratio``
    # of its prefill (the smallest such goes first); a request is passed over at most ``window`` times. 1: arrival order
    window: int = 256
    pass_ratio: float = 4.0
    # and only while what goes before a request stays within what was held ahead of it when it was held (in its
    # priority band and the higher ones: a lower band goes after it whatever is passed), plus
    # ``pass_slack`` x that and its own prefill (in prefill tokens): its wait stays near the one arrival order would
    # give it, in a burst that drains as in sustained overload (inf, or in effect 1e6: the ``window`` bound alone)
    pass_slack: float = 0.5
    # a pod also has room while its next step could start its queued prompts and a mean one beside its running
    # decodes within this share of its step budget, with KV for them and for what its requests in flight will
    # still write, and a free sequence slot (0: waiting requests only)
    step_share: float = 0.75


@dataclass(slots=True, eq=False)
class Held:
    """One request waiting for room. ``release`` receives its decision, or the error that answers it."""

    state: RequestState
    priority: int
    seq: int
    held_at: float
    deadline: float
    subset: np.ndarray | None  # its candidate slots when the gateway's hint narrowed them; None: every endpoint
    release: Callable[[Decision | SchedulingError], None]
    work: float  # its prefill when it was held: prompt tokens no candidate holds (the director's estimate)
    # the flow's released prefill (``FlowControl.released_work``) past which nothing more may go before it
    budget: float
    passed: int = 0  # how many requests that arrived after it went before it


class FlowControl:
    """The held requests (bands by priority, each in arrival order) and the room test. See the module docstring."""

    def __init__(self, dl, settings: FlowControlSettings, on_count: Callable[[int], None] | None = None) -> None:
        self.dl = dl
        self.settings = settings
        self._on_count = on_count  # told the held count whenever it changes (the director's gauge)
        self._bands: dict[int, dict[int, Held]] = {}
        self._deadlines: list[tuple[float, int, int]] = []  # (deadline, priority, seq); stale entries skipped
        self._seq = 0
        self._count = 0
        self.overflowed = 0  # requests decided at once because ``max_queued`` were held
        self._band_work: dict[int, float] = {}  # the prefill held now, per priority band (absent once empty)
        self.released_work = 0.0  # the prefill of every request released so far (cancelled ones left out)
        self.held_total = 0  # requests ever held

    @property
    def queued(self) -> int:
        return self._count

    @property
    def held_work(self) -> float:
        """The prefill of the requests held now (exactly 0 once none is: an emptied band's sum is dropped)."""
        return sum(self._band_work.values())

    def _counted(self, delta: int) -> None:
        """Held count; the data layer carries it (``held_requests``) for the saturation rules, for which the
        requests held here are queued as surely as those in the pods' queues."""
        self._count += delta
        self.dl.held_requests = self._count
        if self._on_count is not None:
            self._on_count(self._count)

    def usable(self) -> Room:
        """Two masks over the endpoint table's slots: a healthy active decode endpoint; and one of those with room
        whose requests succeed (none failed since its last success, not on probation)."""
        dl = self.dl
        ep = dl.endpoints
        active = ep.active_slots()
        usable = np.zeros(ep.slot_count, dtype=bool)
        roomy = np.zeros(ep.slot_count, dtype=bool)
        health = dl.health
        ok = active[ep.can_decode[active] & health.healthy[active]]
        usable[ok] = True
        # room only on a pod whose last request of ours did not fail and that is not on probation: a pod that
        # fails every request fast always has an empty queue, and would draw every released request to it
        proven = ok[(health.request_failures[ok] == 0) & ~health.probation[ok]]
        if proven.size:
            now = dl.clock.now()
            room = dl.waiting_now(proven, now) < self.settings.room
            if not room.any():
                dl.saturated_at = now  # a queue on every pod: past the knee (pickers/plugins/score_replicate.py)
            if self.settings.step_share > 0.0:
                room |= self._step_room(proven, now)
            roomy[proven] = room
        return Room(usable, roomy)

    def _step_room(self, slots: np.ndarray, now: float) -> np.ndarray:
        """Per slot of ``slots``: the pod's next step would start what is queued there and a mean prompt (the
        predictor's Q_p + P) beside its running decodes within ``step_share`` of its token budget, its KV cache
        has room for those prompts and for what its requests in flight will still write, it has a free sequence
        slot, and it prefills (a decode-role pod's room is counted in waiting requests only). A request sent
        there then starts in that step, as one sent to an empty queue would; counting waiting requests alone
        caps the pool's admissions at about one per pod per scrape (a request sent counts as waiting until its
        first token)."""
        dl = self.dl
        fresh = dl.fresh(slots, now)
        queued = dl.predictor.queued_tokens(slots, dl.scraped_waiting(slots, now, fresh)) + dl.predictor.mean_prompt
        running = dl.running(slots, now, fresh)
        cap, held, _ = kv_held(dl, slots, fresh, running)
        costs = dl.costs
        # KV for the queued prompts, a mean one and what the requests in flight will still write (half their
        # expected outputs, as pickers/kvwait.py counts them): a full cache preempts
        kv = queued + 0.5 * dl.inflight.decode_tokens[slots] <= cap - held
        # a decode-role pod's waiting count mixes requests waiting for their KV from a prefill pod with local
        # prompts, and Q_p counts neither: its room stays in waiting requests
        return (dl.endpoints.can_prefill[slots] & (queued + running <= self.settings.step_share * costs.budget[slots])
                & kv & (running < costs.max_seqs[slots]))

    def should_hold(self, state: RequestState, runs_prefill_legs: bool) -> bool:
        """Whether this admitted request waits: requests of its priority or higher are held already, or none of
        its candidates has room (and some could serve it)."""
        if state.slo.any or runs_prefill_legs:
            return False
        if self._count >= self.settings.max_queued:
            self.overflowed += 1
            return False
        cands = state.candidates
        usable, roomy = self.usable()
        if cands is None or not usable[cands].any():
            return False  # nothing could serve it: decided now, it gets its 503 now
        if any(self._bands.get(p) for p in self._bands if p >= state.slo.priority):
            return True
        return not bool(roomy[cands].any())

    def hold(self, state: RequestState, now: float, release: Callable[[Decision | SchedulingError], None],
             work: float) -> Held:
        limit = self.settings.max_wait_s
        own = state.request.hold_limit_s
        if own is not None:
            limit = min(limit, max(0.0, own))
        self._seq += 1
        prio = state.slo.priority
        subset = state.candidates if state.request.subset is not None else None
        h = Held(state, prio, self._seq, now, now + limit, subset, release, work, self._budget(work, prio))
        self._band_work[prio] = self._band_work.get(prio, 0.0) + work
        self._bands.setdefault(prio, {})[h.seq] = h
        self._counted(1)
        self.held_total += 1
        heapq.heappush(self._deadlines, (h.deadline, prio, h.seq))
        return h

    def _budget(self, work: float, priority: int) -> float:
        """A request of ``priority`` held now with ``work`` prefill: the released prefill past which none may pass
        it. Arrival order would release what is held now in its band and the higher ones before it (a lower band
        only after it), and start it in about the time that takes plus its own prefill; passing may add
        ``pass_slack`` of both (so a long prompt at the head of an empty queue can still be passed by a few much
        shorter ones, which is where shortest-first gains most)."""
        slack = self.settings.pass_slack
        if math.isinf(slack):
            return math.inf
        ahead = sum(w for p, w in self._band_work.items() if p >= priority)
        return self.released_work + ahead + slack * (ahead + work)

    def cancel(self, h: Held) -> bool:
        """Take ``h`` out (its client went away); False when it was already released. Its prefill leaves the held
        work without counting as released: it went before no one."""
        return self._pop(h.priority, h.seq, released=False) is not None

    def next_ready(self, now: float) -> tuple[Held, Released, Room | None] | None:
        """The next request to decide now, if any, taken out of the queue, with the room it was released on (for
        room; None otherwise). The caller decides it before asking again: the decision's load is what closes the
        room it used."""
        if not self._count:
            return None
        dl = self._deadlines
        while dl and dl[0][0] <= now:
            _, prio, seq = heapq.heappop(dl)
            h = self._pop(prio, seq)
            if h is not None:
                return h, "deadline", None
        if len(dl) > 2 * max(self._count, self.settings.max_queued):  # released entries linger until due
            self._deadlines = [(h.deadline, h.priority, h.seq) for b in self._bands.values() for h in b.values()]
            heapq.heapify(self._deadlines)
        room = self.usable()
        active = None
        for prio in sorted(self._bands, reverse=True):
            for seq, h in self._bands[prio].items():
                if h.subset is None:
                    if active is None:
                        active = self.dl.endpoints.active_slots()
                    slots = active
                else:
                    slots = h.subset
                if not room.usable[slots].any():
                    self._pop(prio, seq)
                    return h, "unservable", None
                if room.roomy[slots].any():
                    if self.settings.window > 1 and h.subset is None:
                        h = self._overtaker(self._bands[prio], h)
                    self._pop(prio, h.seq)
                    return h, "room", room
                if h.subset is None:
                    break  # everyone behind it in this band wants the same pods
        return None

    def _overtaker(self, band: dict[int, Held], head: Held) -> Held:
        """Which request goes for room: ``head`` (the oldest of its band that may go), or the one with the least
        prefill among the next ``window - 1`` if it needs under 1/``pass_ratio`` of the head's. Past the knee a
        long prompt in front holds up every short one behind it for the length of its prefill; letting the much
        shorter ones go first shortens most waits by more than it lengthens the long one's (shortest job first,
        which lowers the mean and the p90 of the queueing delay). The ratio keeps requests of about the same size
        in arrival order (a turn of a conversation does not pass its peers for a few cached tokens), and two
        bounds keep the long ones from starving: no request is passed over more than ``window`` times, and none
        by more prefill than its ``budget`` allows. The second is what holds the tail in a burst that drains:
        there the last short arrivals would otherwise keep passing a long prompt held early, which then goes
        last, its wait the whole drain where arrival order would have started it early."""
        settings = self.settings
        if head.passed >= settings.window:  # the oldest has been passed over most: every pass passes it too
            return head
        best = head
        seen = 0
        released = self.released_work
        tightest = head.budget  # the least budget of the requests a candidate would pass (``pass_slack``)
        for h in band.values():
            if h.seq <= head.seq or h.subset is not None:
                continue  # older ones are not ready (subset without room); a subset's room is its own
            if h.work < best.work and released + h.work <= tightest:
                best = h
            tightest = min(tightest, h.budget)
            seen += 1
            if seen >= settings.window - 1:
                break
        if best is head or best.work * settings.pass_ratio > head.work:
            return head
        for h in band.values():
            if h.seq >= best.seq:
                break
            if h.seq >= head.seq and h.subset is None:
                h.passed += 1
        return best

    def next_deadline(self) -> float:
        return self._deadlines[0][0] if self._deadlines else math.inf

    def take_all(self) -> list[Held]:
        """Every held request, in release order, taken out (the picker is stopping)."""
        out = [h for p in sorted(self._bands, reverse=True) for h in self._bands[p].values()]
        self._bands.clear()
        self._deadlines.clear()
        self._counted(-self._count)
        self._band_work.clear()
        return out

    def _pop(self, prio: int, seq: int, released: bool = True) -> Held | None:
        band = self._bands.get(prio)
        h = band.pop(seq, None) if band is not None else None
        if h is not None:
            self._counted(-1)
            self._band_work[prio] -= h.work
            if released:
                self.released_work += h.work
            if not band:
                del self._bands[prio]
                del self._band_work[prio]  # no drift once a band is empty
        return h


__all__ = ["FlowControl", "FlowControlSettings", "Held", "Released"]
