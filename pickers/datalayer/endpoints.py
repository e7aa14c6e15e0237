"""The endpoint registry: stable integer slots for pods, so every signal can live in a numpy array.

Scorers work on arrays indexed by slot (``candidates`` is an int array of slots), which keeps the hot path
free of per-pod Python objects. A slot is an endpoint id (``Endpoint.id``): a pod, or one data-parallel rank
of a pod (``ip:port#rank``), so every signal (load, queue, KV usage, prefix index) is per rank. Slots of
removed pods are reused after every listener has cleared them.
Endpoints come from a ``Discovery`` (a static list, or ``pickers.datalayer.k8s`` watching an InferencePool).

Draining: a pod that is leaving (deleted, unready, scaled down by the planner) must not lose the requests it is
serving. ``drain(address, deadline)`` takes it out of every new decision at once (``active`` is False, so it is
in no candidate set) but keeps its slot, so the hooks of requests already routed there still find it and its
in-flight load is released normally; ``reap(now)`` removes it once it is idle (the ``busy`` probe, wired by
the DataLayer to the in-flight tracker, says no request is open on it) or its deadline has passed. ``add`` of
the same address while it drains brings it back (a pod that flapped Ready). Draining is per endpoint id; a pod
address drains every rank of that pod.

Holding: the live planner removes a pod that is still Ready (it chose it for a scale-down). ``hold(address,
until)`` tells discovery not to add that pod back while it drains and until its deletion has gone through
(``KubernetesDiscovery`` skips held addresses); the planner lifts it, or it lapses at ``until``.
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
        self.by_id: dict[str, int] = {}  # endpoint id -> slot
        self.by_pod: dict[str, list[int]] = {}  # ip:port -> slots of that pod (its ranks)
        self._free: list[int] = []
        self.active = np.zeros(max_endpoints, dtype=bool)
        self.can_decode = np.zeros(max_endpoints, dtype=bool)
        self.can_prefill = np.zeros(max_endpoints, dtype=bool)
        self.block_size = np.full(max_endpoints, 16, dtype=np.int64)
        # data-parallel ranks: the pod group of each slot (one id per ip:port) and whether the slot is a rank
        self.pod_group = np.full(max_endpoints, -1, dtype=np.int64)
        self.is_rank = np.zeros(max_endpoints, dtype=bool)
        self._groups: dict[str, int] = {}
        self._listeners: list[Listener] = []
        self._active_cache: np.ndarray | None = None
        self.draining: dict[str, float] = {}  # address -> deadline (caller's clock) of endpoints being drained
        self.busy: BusyProbe = lambda slot: False
        self.held: dict[str, float] = {}  # pod address -> until (caller's clock): a planner is removing it

    def hold(self, address: str, until: float) -> None:
        """Discovery must not add ``address`` (a pod address) back before ``until`` (see the module doc)."""
        self.held[address] = until

    def unhold(self, address: str) -> None:
        self.held.pop(address, None)

    def is_held(self, address: str, now: float) -> bool:
        """Whether ``address`` is held at ``now``; a lapsed hold is forgotten here (the dict stays bounded by
        the pods a planner removes at once)."""
        until = self.held.get(address)
        if until is None:
            return False
        if now >= until:
            del self.held[address]
            return False
        return True

    @property
    def by_address(self) -> dict[str, int]:
        """Endpoint id -> slot: the address itself for a pod without data-parallel ranks (callers keyed by
        address, such as the Kubernetes discovery, see each rank of a DP pod under its ``ip:port#rank`` id)."""
        return self.by_id

    def set_busy_probe(self, busy: BusyProbe) -> None:
        """How ``reap`` tells a draining endpoint still serves requests (the DataLayer's in-flight tracker)."""
        self.busy = busy

    def listen(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def __len__(self) -> int:
        return len(self.by_id)

    def add(self, ep: Endpoint) -> int:
        """Add or replace an endpoint; returns its slot."""
        old = self.by_id.get(ep.id)
        if old is not None:
            if ep.id in self.draining and self.endpoints[old] == ep:
                return self._undrain(ep.id, old)
            self.remove(ep.id)
        if self._free:
            slot = self._free.pop()
        else:
            slot = len(self.endpoints)
            if slot >= self.max_endpoints:
                raise ValueError(f"too many endpoints (max_endpoints={self.max_endpoints})")
            self.endpoints.append(None)
        self.endpoints[slot] = ep
        self.by_id[ep.id] = slot
        self.by_pod.setdefault(ep.address, []).append(slot)
        self.active[slot] = True
        self.can_decode[slot] = ep.role.can_decode()
        self.can_prefill[slot] = ep.role.can_prefill()
        self.block_size[slot] = ep.block_size
        self.pod_group[slot] = self._groups.setdefault(ep.address, len(self._groups))
        self.is_rank[slot] = ep.dp_rank is not None
        self._active_cache = None
        for fn in self._listeners:
            fn("add", slot, ep)
        return slot

    def remove(self, endpoint_id: str) -> Endpoint | None:
        """Remove at once (requests still open on it lose their load accounting): prefer ``drain``."""
        self.draining.pop(endpoint_id, None)
        slot = self.by_id.pop(endpoint_id, None)
        if slot is None:
            return None
        ep = self.endpoints[slot]
        assert ep is not None
        pod = self.by_pod[ep.address]
        pod.remove(slot)
        if not pod:
            del self.by_pod[ep.address]
        self.is_rank[slot] = False
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
        ids = self._ids(address)
        if not ids:
            return False
        for key in ids:
            slot = self.by_id[key]
            self.draining[key] = min(deadline, self.draining.get(key, deadline))
            if self.active[slot]:
                self.active[slot] = False
                self._active_cache = None
        return True

    def _ids(self, key: str) -> list[str]:
        """The endpoint ids ``key`` names: itself, or every rank of a pod address."""
        if key in self.by_id:
            return [key]
        return [e.id for s in self.by_pod.get(key, ()) if (e := self.endpoints[s]) is not None]

    def _undrain(self, address: str, slot: int) -> int:
        del self.draining[address]
        self.active[slot] = True
        self._active_cache = None
        return slot

    def is_draining(self, address: str) -> bool:
        ids = self._ids(address)
        return bool(ids) and all(i in self.draining for i in ids)

    def reap(self, now: float, limit: int | None = None) -> list[str]:
        """Remove the draining endpoints that are idle or past their deadline; returns their addresses.

        The table has no clock or task of its own: whoever drains calls this periodically with the clock the
        deadlines were given in (``KubernetesDiscovery`` every ``reap_interval_s``; a planner in virtual time
        with its ManualClock). ``limit`` bounds the removals of one call (each runs every listener)."""
        gone = [a for a, deadline in self.draining.items()
                if now >= deadline or not self.busy(self.by_id[a])][:limit]
        for a in gone:
            self.remove(a)
        return gone

    def slot(self, endpoint_id: str) -> int | None:
        return self.by_id.get(endpoint_id)

    def address(self, slot: int) -> str | None:
        """The endpoint id of ``slot`` (``ip:port``, or ``ip:port#rank``): what a Decision names."""
        ep = self.endpoints[slot] if 0 <= slot < len(self.endpoints) else None
        return ep.id if ep is not None else None

    def rank_slot(self, slot: int, engine_index: int) -> int | None:
        """The slot of vLLM engine ``engine_index`` in the pod of ``slot``: ``slot`` itself when it is the whole
        pod (no ranks) or that rank, another rank's slot of the same pod, or None when the pod has no such rank."""
        ep = self.endpoints[slot] if 0 <= slot < len(self.endpoints) else None
        if ep is None:
            return None
        if ep.dp_rank is None:
            return slot
        want = str(engine_index)
        if ep.engine_label == want:
            return slot
        for s in self.by_pod.get(ep.address, ()):
            other = self.endpoints[s]
            if other is not None and other.engine_label == want:
                return s
        return None

    def pod_slots(self, address: str) -> list[int]:
        """Every slot of pod ``ip:port`` (one per data-parallel rank, or just the pod's)."""
        return self.by_pod.get(address, [])

    def addresses(self, slots: np.ndarray) -> list[str]:
        """The addresses of ``slots`` (active ones), in order."""
        eps = self.endpoints
        return [e.id for s in slots.tolist() if (e := eps[s]) is not None]

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
        want = {e.id: e for e in endpoints}
        for addr in list(self.by_id):
            if addr not in want:
                self.remove(addr)
        for addr, ep in want.items():
            cur = self.by_id.get(addr)
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
