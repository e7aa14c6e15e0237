"""The endpoint registry: stable integer slots for pods, so every signal can live in a numpy array.

Scorers work on arrays indexed by slot (``candidates`` is an int array of slots), which keeps the hot path
free of per-pod Python objects. Slots of removed pods are reused after every listener has cleared them.
Endpoints come from a ``Discovery`` (a static list, or ``pickers.datalayer.k8s`` watching an InferencePool).

Draining: a pod that is leaving (deleted, unready, scaled down by the planner) must not lose the requests it is
serving. ``drain(address, deadline)`` takes it out of every new decision at once (``active`` is False, so it is
in no candidate set) but keeps its slot, so the hooks of requests already routed there still find it and its
in-flight load is released normally; ``reap(now)`` removes it once it is idle (the ``busy`` probe, wired by
the DataLayer to the in-flight tracker, says no request is open on it) or its deadline has passed. ``add`` of
the same address while it drains brings it back (a pod that flapped Ready).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

import numpy as np

from pickers.types import Endpoint, Role

Listener = Callable[[str, int, Endpoint], None]  # ("add" | "remove", slot, endpoint)
BusyProbe = Callable[[int], bool]  # slot -> some request routed by this picker is still open on it


class EndpointTable:
    def __init__(self, max_endpoints: int = 1024) -> None:
        self.max_endpoints = max_endpoints
        self.endpoints: list[Endpoint | None] = []
        self.by_address: dict[str, int] = {}
        self._free: list[int] = []
        self.active = np.zeros(max_endpoints, dtype=bool)
        self.can_decode = np.zeros(max_endpoints, dtype=bool)
        self.can_prefill = np.zeros(max_endpoints, dtype=bool)
        self.block_size = np.full(max_endpoints, 16, dtype=np.int64)
        self._listeners: list[Listener] = []
        self._active_cache: np.ndarray | None = None
        self.draining: dict[str, float] = {}  # address -> deadline (caller's clock) of endpoints being drained
        self.busy: BusyProbe = lambda slot: False

    def set_busy_probe(self, busy: BusyProbe) -> None:
        """How ``reap`` tells a draining endpoint still serves requests (the DataLayer's in-flight tracker)."""
        self.busy = busy

    def listen(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def __len__(self) -> int:
        return len(self.by_address)

    def add(self, ep: Endpoint) -> int:
        """Add or replace an endpoint; returns its slot."""
        old = self.by_address.get(ep.address)
        if old is not None:
            if ep.address in self.draining and self.endpoints[old] == ep:
                return self._undrain(ep.address, old)
            self.remove(ep.address)
        if self._free:
            slot = self._free.pop()
        else:
            slot = len(self.endpoints)
            if slot >= self.max_endpoints:
                raise ValueError(f"too many endpoints (max_endpoints={self.max_endpoints})")
            self.endpoints.append(None)
        self.endpoints[slot] = ep
        self.by_address[ep.address] = slot
        self.active[slot] = True
        self.can_decode[slot] = ep.role.can_decode()
        self.can_prefill[slot] = ep.role.can_prefill()
        self.block_size[slot] = ep.block_size
        self._active_cache = None
        for fn in self._listeners:
            fn("add", slot, ep)
        return slot

    def remove(self, address: str) -> Endpoint | None:
        """Remove at once (requests still open on it lose their load accounting): prefer ``drain``."""
        self.draining.pop(address, None)
        slot = self.by_address.pop(address, None)
        if slot is None:
            return None
        ep = self.endpoints[slot]
        assert ep is not None
        self.active[slot] = False
        self.can_decode[slot] = False
        self.can_prefill[slot] = False
        self._active_cache = None
        for fn in self._listeners:
            fn("remove", slot, ep)
        self.endpoints[slot] = None
        self._free.append(slot)
        return ep

    def drain(self, address: str, deadline: float) -> bool:
        """Stop sending new requests to ``address``; ``reap`` removes it once idle or at ``deadline``.

        Returns False when the address is unknown. Draining twice keeps the earlier deadline. The endpoint
        keeps its slot (hooks of open requests resolve it, metrics are still scraped) but leaves
        ``active_slots()`` immediately, so no decision made after this call can choose it.
        """
        slot = self.by_address.get(address)
        if slot is None:
            return False
        self.draining[address] = min(deadline, self.draining.get(address, deadline))
        if self.active[slot]:
            self.active[slot] = False
            self._active_cache = None
        return True

    def _undrain(self, address: str, slot: int) -> int:
        del self.draining[address]
        self.active[slot] = True
        self._active_cache = None
        return slot

    def is_draining(self, address: str) -> bool:
        return address in self.draining

    def reap(self, now: float, limit: int | None = None) -> list[str]:
        """Remove the draining endpoints that are idle or past their deadline; returns their addresses.

        The table has no clock or task of its own: whoever drains calls this periodically with the clock the
        deadlines were given in (``KubernetesDiscovery`` every ``reap_interval_s``; a planner in virtual time
        with its ManualClock). ``limit`` bounds the removals of one call (each runs every listener)."""
        gone = [a for a, deadline in self.draining.items()
                if now >= deadline or not self.busy(self.by_address[a])][:limit]
        for a in gone:
            self.remove(a)
        return gone

    def slot(self, address: str) -> int | None:
        return self.by_address.get(address)

    def address(self, slot: int) -> str | None:
        ep = self.endpoints[slot] if 0 <= slot < len(self.endpoints) else None
        return ep.address if ep is not None else None

    def addresses(self, slots: np.ndarray) -> list[str]:
        """The addresses of ``slots`` (active ones), in order."""
        eps = self.endpoints
        return [e.address for s in slots.tolist() if (e := eps[s]) is not None]

    def active_slots(self) -> np.ndarray:
        if self._active_cache is None:
            self._active_cache = np.nonzero(self.active)[0]
        return self._active_cache

    @property
    def slot_count(self) -> int:
        """One past the highest slot ever used (array sizes for per-pod results)."""
        return len(self.endpoints)

    def sync(self, endpoints: list[Endpoint]) -> None:
        """Make the table hold exactly ``endpoints`` at once (a static list: nothing to drain)."""
        want = {e.address: e for e in endpoints}
        for addr in list(self.by_address):
            if addr not in want:
                self.remove(addr)
        for addr, ep in want.items():
            cur = self.by_address.get(addr)
            if cur is None or self.endpoints[cur] != ep or addr in self.draining:
                self.add(ep)


class Discovery(Protocol):
    """A source of endpoints. ``run`` keeps ``table`` in sync until cancelled (Kubernetes watches pods)."""

    async def run(self, table: EndpointTable) -> None: ...


class StaticDiscovery:
    """A fixed list (the config file's ``endpoints``); nothing to watch."""

    def __init__(self, endpoints: list[Endpoint]) -> None:
        self.endpoints = list(endpoints)

    async def run(self, table: EndpointTable) -> None:
        table.sync(self.endpoints)
        await asyncio.Event().wait()  # nothing changes; stay until cancelled


def roles_ok(role: Role, want: str) -> bool:
    return role.can_decode() if want == "decode" else role.can_prefill()
