"""The precise prefix index: what each pod really holds, learned from its vLLM KV events.

vLLM's own block hashes cannot be recomputed outside the engine, so every ``BlockStored`` is re-hashed with
our chained hash over its ``token_ids``, chained from the own hash of ``parent_block_hash`` (``ROOT_HASH``
when null), and a bounded per-pod map engine hash -> own hash serves later ``BlockRemoved`` events and
parents. Requests are hashed with the same function, so the index answers "how many prefix blocks of this
prompt does each pod hold" exactly, as long as the picker tokenizes as the engine does.

Sequence numbers are checked per pod: a gap (lost messages) or a step back (pod restarted) drops that
pod's entries (they may be wrong now) and marks the pod degraded while it re-learns. Silence alone is no
evidence of loss: a pod serving full prefix hits with short outputs stores no new block and sends nothing
(real vLLM too). So a pod is degraded for silence only when a request that must have produced new full blocks
(at least one full prompt block it did not hold) reached its first token there, no event at all came from
the pod since that request was routed, and none followed within ``degraded_after_s`` of the first token
(``expect_events(slot, routed_at, first_token_at)``). The clock starts at the first token, not at routing:
the engine has committed the prompt's blocks by then, while a 100K-token prefill can take longer than
``degraded_after_s`` and a P/D decode pod stores its blocks only after the prefill leg and the transfer.
Degraded pods are scored with the approximate index instead; the state is exported as
``kvswitch_prefix_index_degraded{endpoint}`` and logged on every change.

Pending (speculative) blocks, as llm-d's speculative indexing: a pod announces a prompt's blocks only when its
prefill has computed them, seconds after we sent it the prompt. A second request with the same prefix in that
window would see a cold index and pay a second cold prefill elsewhere. So the scheduler records the prompt's
block hashes as *pending* on the pods it routed the request to (``add_pending``); a lookup counts a block as
held when the events say so OR it is pending there (one more medium column of the same index, weighted like the
best medium, so the union is exact per block). Pending blocks go at the request's first token or failure
(``clear_pending``: by then the events have them, or never will), after ``pending_ttl_s`` at the latest, and the
oldest go first beyond ``pending_max_blocks``. Clearing a request's blocks clears them for the pod even where
another in-flight request pended the same ones: the first request's prefill has stored them by then.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import repeat
from typing import Any, cast

import numpy as np

from engine.kvcache.events import AllBlocksCleared, BlockRemoved, BlockStored
from engine.kvcache.hashing import ROOT_HASH, hash_blocks
from engine.kvcache.hashing import warm_up as warm_up_hashing
from pickers.kvblocks.events import (
    EventError,
    KVEvent,
    decode_event,
    decode_payload,
    decode_seq,
)
from pickers.kvblocks.index import BlockIndex
from pickers.kvblocks.prefill_watch import PrefillWatch

log = logging.getLogger("kvswitch.pickers.precise")

DEFAULT_MEDIUM_WEIGHTS = {"GPU": 1.0, "CPU": 0.8}
# pod slot, block hashes, their rows, the rows' keys
_Pended = tuple[int, Sequence[int] | np.ndarray, np.ndarray, np.ndarray]
PENDING = "(pending)"  # the index's own medium column for speculative blocks; no event can name it


class PreciseIndex:
    """BlockIndex fed by KV events, with engine-hash maps, sequence checks and degradation tracking."""

    def __init__(
        self,
        resolve: Callable[[str], int | None],
        address_of: Callable[[int], str | None],
        max_blocks: int = 10_000_000,
        medium_weights: Mapping[str, float] | None = None,
        max_pods: int = 64,
        engine_map_cap: int = 2_000_000,
        degraded_after_s: float = 10.0,
        on_degraded: Callable[[str, bool, str], None] | None = None,
        pending_ttl_s: float = 5.0,
        pending_max_blocks: int = 1_000_000,
        resolve_rank: Callable[[int, int], int | None] | None = None,
    ) -> None:
        warm_up_hashing()  # requests and events are hashed with a compiled loop: load it before the first one
        weights = dict(medium_weights or DEFAULT_MEDIUM_WEIGHTS)
        media = [m.upper() for m in weights] + [PENDING]
        self.index = BlockIndex(max_blocks, media=media, weights=[*weights.values(), max(weights.values())],
                                max_pods=max_pods, hidden_media=1)
        self.pending_medium = len(media) - 1
        self.pending_ttl_s = pending_ttl_s
        self.pending_max_blocks = pending_max_blocks
        # request key -> (expiry, [(pod slot, block hashes, their index rows, the rows' keys)]), oldest first
        # (one TTL: expiry order = insertion); the rows let clearing skip a dict lookup per block
        self._pending: OrderedDict[Any, tuple[float, list[_Pended]]] = OrderedDict()
        self._pending_blocks = 0
        # prompts whose prefill end the director watches for (access-log mode): pickers/kvblocks/prefill_watch.py
        self.prefill_watch = PrefillWatch()
        self._resolve = resolve
        self._address_of = address_of
        # (slot, engine index in a batch) -> the slot of that data-parallel rank of the same pod, or None
        self._resolve_rank = resolve_rank
        self.engine_map_cap = engine_map_cap
        self.degraded_after_s = degraded_after_s
        self._on_degraded = on_degraded
        self._engine_maps: dict[int, dict[Any, int]] = {}
        self._last_seq: dict[tuple[int, int | None], int] = {}  # per publisher: (slot, batch's DP rank)
        n = max_pods
        self.has_events = np.zeros(n, dtype=bool)
        self.last_event = np.full(n, -math.inf)
        self.pending_since = np.full(n, math.inf)
        self.gap_until = np.full(n, -math.inf)
        self.degraded = np.zeros(n, dtype=bool)
        self.reasons: dict[int, str] = {}
        self.stats = {"messages": 0, "events": 0, "gaps": 0, "orphans": 0, "bad_messages": 0, "unknown": 0,
                      "rank_moved": 0, "rank_unknown": 0}

    # ---- pods ---------------------------------------------------------------------------------------
    def ensure_pods(self, n: int) -> None:
        self.index.ensure_pods(n)
        if n > self.has_events.size:
            grow = n - self.has_events.size
            self.has_events = np.concatenate([self.has_events, np.zeros(grow, dtype=bool)])
            self.last_event = np.concatenate([self.last_event, np.full(grow, -math.inf)])
            self.pending_since = np.concatenate([self.pending_since, np.full(grow, math.inf)])
            self.gap_until = np.concatenate([self.gap_until, np.full(grow, -math.inf)])
            self.degraded = np.concatenate([self.degraded, np.zeros(grow, dtype=bool)])

    def set_source(self, slot: int, has_events: bool) -> None:
        """Whether pod ``slot`` publishes events (only those can be precise, or degraded)."""
        self.ensure_pods(slot + 1)
        self.has_events[slot] = has_events

    def forget_pod(self, slot: int) -> None:
        """The pod left (or restarted): drop its blocks, engine map and sequence state."""
        self.index.drop_pod(slot)
        for _, parts in self._pending.values():  # its pending blocks went with drop_pod; a new pod may take the slot
            kept = [p for p in parts if p[0] != slot]
            if len(kept) != len(parts):
                self._pending_blocks -= sum(len(p[1]) for p in parts if p[0] == slot)
                parts[:] = kept
        self._engine_maps.pop(slot, None)
        for key in [k for k in self._last_seq if k[0] == slot]:
            del self._last_seq[key]
        self.has_events[slot] = False
        self.last_event[slot] = -math.inf
        self.pending_since[slot] = math.inf
        self.gap_until[slot] = -math.inf
        if self.degraded[slot]:
            self.degraded[slot] = False
            self.reasons.pop(slot, None)

    # ---- events -------------------------------------------------------------------------------------
    def apply_message(self, address: str, seq_frame: bytes | int | None, payload: bytes, now: float) -> int:
        """One ZMQ message (seq frame + msgpack payload) from pod ``address``; returns events applied."""
        slot = self._resolve(address)
        if slot is None:
            return 0
        try:
            seq = seq_frame if isinstance(seq_frame, int) or seq_frame is None else decode_seq(seq_frame)
            batch = decode_payload(payload)
        except EventError as e:
            self.stats["bad_messages"] += 1
            log.warning("kv events from %s: dropped a bad message: %s", address, e)
            return 0
        self.stats["unknown"] += batch.unknown
        rank = batch.dp_rank
        if rank is not None and self._resolve_rank is not None:
            # Attribute the batch to the rank that published it (vLLM tags each batch with its DP rank): the
            # endpoint of that rank of the same pod. A pod-level endpoint (no ranks) keeps every rank's events.
            owner = self._resolve_rank(slot, int(rank))
            if owner is None:
                self.stats["rank_unknown"] += 1
                return 0
            if owner != slot:
                self.stats["rank_moved"] += 1
                slot = owner
                address = self._address_of(slot) or address
        return self._apply(slot, address, batch.events, seq, now, rank)

    def apply_events(
        self, address: str, events: Iterable[KVEvent | Mapping[str, Any] | list[Any]], now: float = 0.0,
        seq: int | None = None,
    ) -> int:
        """Apply events from pod ``address`` directly (virtual time, tests): raw map/array (wire) forms, or
        records with the fields of ``events.BlockStored``/``BlockRemoved``/``AllBlocksCleared`` and those class
        names (ours, or the simulator's own, handed over without the wire-format round trip)."""
        slot = self._resolve(address)
        if slot is None:
            raise KeyError(f"unknown endpoint {address!r}")
        evs: list[Any] = []
        for e in events:
            if isinstance(e, (dict, list, tuple)):
                ev = decode_event(e)
                if ev is not None:
                    evs.append(ev)
            else:
                evs.append(e)
        return self._apply(slot, address, evs, seq, now)

    def _apply(self, slot: int, address: str, events: list[KVEvent], seq: int | None, now: float,
               rank: int | None = None) -> int:
        self.ensure_pods(slot + 1)
        self.stats["messages"] += 1
        if seq is not None:
            last = self._last_seq.get((slot, rank))
            if last is not None and seq != last + 1:
                self.stats["gaps"] += 1
                why = "sequence went back (pod restarted)" if seq <= last else f"sequence gap {last}->{seq}"
                dropped = self._drop(slot)
                self.gap_until[slot] = now + self.degraded_after_s
                log.warning("kv events from %s: %s; dropped its %d blocks and re-learns", address, why, dropped)
            self._last_seq[(slot, rank)] = seq
        self.last_event[slot] = now
        self.pending_since[slot] = math.inf
        index = self.index
        emap = self._engine_maps.setdefault(slot, {})
        pop = emap.pop
        # own hashes of consecutive BlockRemoved events of one medium: one batched remove (distinct: each engine
        # hash leaves the engine map once, and distinct engine hashes name distinct own hashes)
        gone: list[int] = []
        gone_medium = None
        self.stats["events"] += len(events)
        for ev in events:
            if isinstance(ev, BlockRemoved):
                if ev.medium != gone_medium and gone:
                    index.remove(slot, gone, index.medium_index(gone_medium), unique=True)
                    gone = []
                gone_medium = ev.medium
                popped: list[int | None] = list(map(pop, ev.block_hashes, repeat(None, len(ev.block_hashes))))
                if None in popped:  # the pops run in C; hashes we never mapped are skipped
                    gone += [o for o in popped if o is not None]
                else:
                    gone += cast(list[int], popped)
                continue
            if gone:  # keep the order: what was removed before this event is gone before it applies
                index.remove(slot, gone, index.medium_index(gone_medium), unique=True)
                gone = []
            if isinstance(ev, BlockStored):
                parent = ROOT_HASH if ev.parent_block_hash is None else emap.get(ev.parent_block_hash)
                if parent is None:
                    self.stats["orphans"] += 1  # parent unknown (evicted from our map or before a gap)
                    continue
                bs = ev.block_size or 16
                own = hash_blocks(ev.token_ids, bs, parent, limit=len(ev.block_hashes))
                n = len(own)
                if n == 0:
                    continue
                index.add(slot, own, index.medium_index(ev.medium))
                emap.update(zip(ev.block_hashes[:n], own))
                if self.prefill_watch:
                    self.prefill_watch.stored(slot, own, now)
                if len(emap) > self.engine_map_cap:
                    self._trim(emap)
            elif isinstance(ev, AllBlocksCleared):
                self._drop(slot)
                emap = self._engine_maps.setdefault(slot, {})
                pop = emap.pop
            else:
                self.stats["unknown"] += 1
        if gone:
            index.remove(slot, gone, index.medium_index(gone_medium), unique=True)
        return len(events)

    def _drop(self, slot: int) -> int:
        self._engine_maps.pop(slot, None)
        return self.index.drop_pod(slot)

    def _trim(self, emap: dict[Any, int]) -> None:
        n = len(emap) - self.engine_map_cap + self.engine_map_cap // 8
        for k in [k for _, k in zip(range(n), emap)]:
            del emap[k]

    # ---- pending (speculative) blocks -----------------------------------------------------------------
    def add_pending(self, key: Any, slot: int, hashes: Sequence[int] | np.ndarray, now: float) -> None:
        """Request ``key`` was sent to pod ``slot``: count its prompt blocks ``hashes`` as held there until
        ``clear_pending(key)`` or ``pending_ttl_s``."""
        if not len(hashes) or self.pending_ttl_s <= 0 or self.pending_max_blocks <= 0:
            return
        if len(hashes) > self.pending_max_blocks:
            hashes = hashes[: self.pending_max_blocks]
        self.expire_pending(now)
        while self._pending and self._pending_blocks + len(hashes) > self.pending_max_blocks:
            self._release_pending(self._pending.popitem(last=False)[1][1])
        entry = self._pending.get(key)
        if entry is None:
            entry = self._pending[key] = (now + self.pending_ttl_s, [])
        self._pending_blocks += len(hashes)
        _, rows = self.index.add_rows(slot, hashes, self.pending_medium, unique=True)
        entry[1].append((slot, hashes, rows, self.index.keys_of(rows)))

    def clear_pending(self, key: Any) -> None:
        """Request ``key`` reached its first token, failed or ended: its pods' events tell the rest."""
        entry = self._pending.pop(key, None)
        if entry is not None:
            self._release_pending(entry[1])

    def expire_pending(self, now: float) -> None:
        pending = self._pending
        while pending:
            key, (expiry, _) = next(iter(pending.items()))
            if expiry > now:
                break
            self._release_pending(pending.popitem(last=False)[1][1])

    def pending_count(self) -> int:
        """Pending block entries (a block pended on two pods counts twice)."""
        return self._pending_blocks

    def _release_pending(self, parts: list[_Pended]) -> None:
        for slot, hashes, rows, keys in parts:
            self._pending_blocks -= len(hashes)
            self.index.remove_rows(slot, hashes, rows, keys, self.pending_medium)

    # ---- degradation --------------------------------------------------------------------------------
    def expect_events(self, slot: int, routed_at: float, at: float) -> None:
        """A request routed to pod ``slot`` at ``routed_at`` with full blocks the pod did not hold reached its
        first token (or its end) at ``at``: its blocks are committed, so the pod has announced them. If no
        event came since ``routed_at`` and none follows within ``degraded_after_s`` of ``at``, events were
        lost and the pod is degraded. Requests that store nothing new (full prefix hits) never get here."""
        if slot >= self.pending_since.size or self.last_event[slot] >= routed_at:
            return
        if self.pending_since[slot] == math.inf:
            self.pending_since[slot] = at

    def degraded_mask(self, now: float) -> np.ndarray:
        """Per pod slot: True where precise scoring must not be trusted (no source, silent, or gap)."""
        stale = (now - self.pending_since) > self.degraded_after_s
        return ~self.has_events | stale | (now < self.gap_until)

    def refresh(self, now: float) -> None:
        """Expire pending blocks; publish state changes (metric + log line) for pods that publish events."""
        if self._pending:
            self.expire_pending(now)
        stale = (now - self.pending_since) > self.degraded_after_s
        gap = now < self.gap_until
        state = self.has_events & (stale | gap)
        changed = np.nonzero(state != self.degraded)[0]
        if changed.size == 0:
            return
        for slot in changed.tolist():
            addr = self._address_of(slot) or f"slot{slot}"
            on = bool(state[slot])
            if on:
                why = ("sequence gap: re-learning" if gap[slot]
                       else f"no KV events for {self.degraded_after_s:g}s after sending it prompts with "
                          "uncached full blocks")
                self.reasons[slot] = why
                log.warning("precise prefix index degraded for %s (%s): scoring it with the approximate index",
                            addr, why)
            else:
                why = self.reasons.pop(slot, "")
                log.info("precise prefix index recovered for %s", addr)
            if self._on_degraded is not None:
                self._on_degraded(addr, on, why)
        self.degraded = state

    # ---- views --------------------------------------------------------------------------------------
    def engine_map_size(self, slot: int | None = None) -> int:
        if slot is not None:
            return len(self._engine_maps.get(slot, ()))
        return sum(len(m) for m in self._engine_maps.values())

    def contents_by_address(self) -> dict[int, dict[str, tuple[str, ...]]]:
        """Index content with pod addresses instead of slots (replica comparison, tests)."""
        out = {}
        for h, media in self.index.contents().items():
            held = {m: tuple(sorted(self._address_of(p) or str(p) for p in pods))
                    for m, pods in media.items() if m != PENDING}
            if held:
                out[h] = held
        return out

    def check_invariants(self) -> None:
        self.index.check_invariants()
        for emap in self._engine_maps.values():
            assert len(emap) <= self.engine_map_cap, "engine map over its cap"
