"""The precise prefix index: what each pod really holds, learned from its vLLM KV events.

vLLM's own block hashes cannot be recomputed outside the engine, so every ``BlockStored`` is re-hashed with
our chained hash over its ``token_ids``, chained from the own hash of ``parent_block_hash`` (``ROOT_HASH``
when null), and a bounded per-pod map engine hash -> own hash serves later ``BlockRemoved`` events and
parents. Requests are hashed with the same function, so the index answers "how many prefix blocks of this
prompt does each pod hold" exactly, as long as the picker tokenizes as the engine does.

Sequence numbers are checked per pod: a gap (lost messages) or a step back (pod restarted) drops that
pod's entries (they may be wrong now) and marks the pod degraded while it re-learns. Silence alone is no
evidence of loss: a pod serving full prefix hits with short outputs stores no new block and sends nothing
(real vLLM too). So a pod is degraded for silence only when it was sent traffic that must have produced new
full blocks (``note_routed(slot, now, new_blocks)`` with at least one full prompt block it did not hold) and
no event followed within ``degraded_after_s``. Degraded pods are scored with the
approximate index instead; the state is exported as ``kvswitch_prefix_index_degraded{endpoint}`` and logged
on every change.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from pickers.kvblocks.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventError,
    KVEvent,
    _event,
    decode_payload,
    decode_seq,
)
from pickers.kvblocks.hashing import ROOT_HASH, hash_blocks_unshared
from pickers.kvblocks.index import BlockIndex

log = logging.getLogger("kvswitch.pickers.precise")

DEFAULT_MEDIUM_WEIGHTS = {"GPU": 1.0, "CPU": 0.8}


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
    ) -> None:
        weights = dict(medium_weights or DEFAULT_MEDIUM_WEIGHTS)
        self.index = BlockIndex(max_blocks, media=[m.upper() for m in weights], weights=list(weights.values()),
                                max_pods=max_pods)
        self._resolve = resolve
        self._address_of = address_of
        self.engine_map_cap = engine_map_cap
        self.degraded_after_s = degraded_after_s
        self._on_degraded = on_degraded
        self._engine_maps: dict[int, dict[Any, int]] = {}
        self._last_seq: dict[int, int] = {}
        n = max_pods
        self.has_events = np.zeros(n, dtype=bool)
        self.last_event = np.full(n, -math.inf)
        self.pending_since = np.full(n, math.inf)
        self.gap_until = np.full(n, -math.inf)
        self.degraded = np.zeros(n, dtype=bool)
        self.reasons: dict[int, str] = {}
        self.stats = {"messages": 0, "events": 0, "gaps": 0, "orphans": 0, "bad_messages": 0, "unknown": 0}

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
        self._engine_maps.pop(slot, None)
        self._last_seq.pop(slot, None)
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
        return self._apply(slot, address, batch.events, seq, now)

    def apply_events(
        self, address: str, events: Iterable[KVEvent | Mapping[str, Any] | list[Any]], now: float = 0.0,
        seq: int | None = None,
    ) -> int:
        """Apply decoded (or raw map/array form) events from pod ``address`` directly (virtual time, tests)."""
        slot = self._resolve(address)
        if slot is None:
            raise KeyError(f"unknown endpoint {address!r}")
        evs: list[KVEvent] = []
        for e in events:
            if isinstance(e, (BlockStored, BlockRemoved, AllBlocksCleared)):
                evs.append(e)
            else:
                ev = _event(e)
                if ev is not None:
                    evs.append(ev)
        return self._apply(slot, address, evs, seq, now)

    def _apply(self, slot: int, address: str, events: list[KVEvent], seq: int | None, now: float) -> int:
        self.ensure_pods(slot + 1)
        self.stats["messages"] += 1
        if seq is not None:
            last = self._last_seq.get(slot)
            if last is not None and seq != last + 1:
                self.stats["gaps"] += 1
                why = "sequence went back (pod restarted)" if seq <= last else f"sequence gap {last}->{seq}"
                dropped = self._drop(slot)
                self.gap_until[slot] = now + self.degraded_after_s
                log.warning("kv events from %s: %s; dropped its %d blocks and re-learns", address, why, dropped)
            self._last_seq[slot] = seq
        self.last_event[slot] = now
        self.pending_since[slot] = math.inf
        index = self.index
        emap = self._engine_maps.setdefault(slot, {})
        for ev in events:
            self.stats["events"] += 1
            if type(ev) is BlockStored:
                if ev.parent_block_hash is None:
                    parent = ROOT_HASH
                else:
                    parent = emap.get(ev.parent_block_hash)
                    if parent is None:
                        self.stats["orphans"] += 1  # parent unknown (evicted from our map or before a gap)
                        continue
                bs = ev.block_size or 16
                own = hash_blocks_unshared(ev.token_ids, bs, parent, limit=len(ev.block_hashes))
                n = len(own)
                if n == 0:
                    continue
                index.add(slot, own, index.medium_index(ev.medium))
                emap.update(zip(ev.block_hashes[:n], own))
                if len(emap) > self.engine_map_cap:
                    self._trim(emap)
            elif type(ev) is BlockRemoved:
                pop = emap.pop
                own = [o for eh in ev.block_hashes if (o := pop(eh, None)) is not None]
                if own:
                    index.remove(slot, own, index.medium_index(ev.medium))
            elif type(ev) is AllBlocksCleared:
                self._drop(slot)
        return len(events)

    def _drop(self, slot: int) -> int:
        self._engine_maps.pop(slot, None)
        return self.index.drop_pod(slot)

    def _trim(self, emap: dict[Any, int]) -> None:
        n = len(emap) - self.engine_map_cap + self.engine_map_cap // 8
        for k in [k for _, k in zip(range(n), emap)]:
            del emap[k]

    # ---- degradation --------------------------------------------------------------------------------
    def note_routed(self, slot: int, now: float, new_blocks: int = 1) -> None:
        """The pod got traffic that makes it store ``new_blocks`` full blocks it did not hold: if no event
        follows within ``degraded_after_s``, events were lost and it is degraded. Traffic that stores nothing
        new (full prefix hits) proves nothing and is ignored."""
        if new_blocks <= 0:
            return
        if slot < self.pending_since.size and self.pending_since[slot] == math.inf:
            self.pending_since[slot] = now

    def degraded_mask(self, now: float) -> np.ndarray:
        """Per pod slot: True where precise scoring must not be trusted (no source, silent, or gap)."""
        stale = (now - self.pending_since) > self.degraded_after_s
        return ~self.has_events | stale | (now < self.gap_until)

    def refresh(self, now: float) -> None:
        """Publish state changes (metric + log line) for pods that publish events."""
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
            out[h] = {m: tuple(sorted(self._address_of(p) or str(p) for p in pods)) for m, pods in media.items()}
        return out

    def check_invariants(self) -> None:
        self.index.check_invariants()
        for slot, emap in self._engine_maps.items():
            assert len(emap) <= self.engine_map_cap, "engine map over its cap"
