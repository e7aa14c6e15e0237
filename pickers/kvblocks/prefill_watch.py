"""The end of a prompt's prefill, read from its pod's KV events: for pickers that see no first token while a
request runs (the gateway reports a response only once it has ended, extproc's ``access-log`` mode).

vLLM stores a prompt's blocks in its prefix cache as the steps that compute them end, and announces each in a
``BlockStored`` event; the prompt's last full block is stored by the step that ends its prefill, the step
that also samples its first token. So the picker can watch, per request, the (pod, own hash) of the prompt's
last full block and take that event as the request's prefill end, instead of its predicted first token: a
prediction that runs short releases the pod's queued prefill early and more prompts pile there; one that runs
long keeps it busy in the picker's eyes after it is free (shared-prefix traffic at the knee, virtual time:
TTFT p90 0.80 s with live first tokens against 1.25 s with predicted ones).

Invariants: at most ``max_watched`` requests are watched (the oldest is dropped first, and falls back to its
predicted first token); one watch per request; a watch fires at most once, and ``take`` hands each fired
request out once, oldest first, at most ``max_watched`` of them. A prompt without a full block not already on
the pod stores nothing new and is not watched (the caller checks).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any


class PrefillWatch:
    def __init__(self, max_watched: int = 65_536) -> None:
        self.max_watched = max_watched
        self._by_block: dict[tuple[int, int], Any] = {}  # (pod slot, own block hash) -> request key
        self._by_key: OrderedDict[Any, tuple[int, int]] = OrderedDict()  # request key -> its block, oldest first
        self._fired: list[tuple[Any, float]] = []

    def __len__(self) -> int:
        return len(self._by_key)

    def __bool__(self) -> bool:
        return bool(self._by_key)

    def watch(self, key: Any, slot: int, block_hash: int) -> bool:
        """Request ``key``'s prefill on pod ``slot`` ends when that pod stores block ``block_hash``; False (not
        watched) when another request in flight ends in that block on that pod: only the first stores it."""
        self.unwatch(key)
        block = (slot, int(block_hash))
        if block in self._by_block:
            return False
        while len(self._by_key) >= self.max_watched:
            _, old = self._by_key.popitem(last=False)
            self._by_block.pop(old, None)
        self._by_block[block] = key
        self._by_key[key] = block
        return True

    def unwatch(self, key: Any) -> bool:
        """Stop watching ``key``; whether it was still watched (its event had not come)."""
        block = self._by_key.pop(key, None)
        if block is None:
            return False
        self._by_block.pop(block, None)
        return True

    def stored(self, slot: int, hashes: Iterable[int], now: float) -> None:
        """Pod ``slot`` stored ``hashes`` (own hashes) at ``now``: the watches they end fire."""
        by_block = self._by_block
        for h in hashes:
            key = by_block.pop((slot, int(h)), None)
            if key is not None:
                self._by_key.pop(key, None)
                if len(self._fired) < self.max_watched:
                    self._fired.append((key, now))

    def take(self) -> list[tuple[Any, float]]:
        """The requests whose prefill ended since the last call, with when (each once)."""
        fired, self._fired = self._fired, []
        return fired


__all__ = ["PrefillWatch"]
