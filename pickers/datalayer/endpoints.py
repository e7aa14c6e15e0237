"""The endpoint registry: stable integer slots for pods, so every signal can live in a numpy array.

Scorers work on arrays indexed by slot (``candidates`` is an int array of slots), which keeps the hot path
free of per-pod Python objects. Slots of removed pods are reused after every listener has cleared them.
Endpoints come from a ``Discovery`` (static list now; Kubernetes later implements the same interface).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

import numpy as np

from pickers.types import Endpoint, Role

Listener = Callable[[str, int, Endpoint], None]  # ("add" | "remove", slot, endpoint)


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

    def listen(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def __len__(self) -> int:
        return len(self.by_address)

    def add(self, ep: Endpoint) -> int:
        """Add or replace an endpoint; returns its slot."""
        old = self.by_address.get(ep.address)
        if old is not None:
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
        """Make the table hold exactly ``endpoints`` (what a discovery source reports)."""
        want = {e.address: e for e in endpoints}
        for addr in list(self.by_address):
            if addr not in want:
                self.remove(addr)
        for addr, ep in want.items():
            cur = self.by_address.get(addr)
            if cur is None or self.endpoints[cur] != ep:
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
