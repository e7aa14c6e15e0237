"""Kubernetes discovery: the pods an InferencePool selects, kept in the EndpointTable (``kvswitch serve --pool``).

Two reflectors (``kubeapi.Reflector``) run in the picker's event loop: one on the InferencePool itself
(``inference.networking.k8s.io/v1``, by name), one on the pods its ``spec.selector`` selects (a server-side
label selector; restarted with a fresh list whenever the selector or the target ports change). Every event
updates a per-pod cache of the endpoints that pod gives (``k8s_pods.pod_endpoints``) and then reconciles the
table: new or changed endpoints are added at once; endpoints no ready pod gives any more are *drained*
(``EndpointTable.drain``): no new decision picks them, requests already routed there finish, and the reaper
removes them once idle or after ``drain_seconds``. When two pods claim one address (an IP reused while the
old pod's deletion is still on its way), the pod seen taking the IP last wins.

Nothing here is on the decision path: events only update the per-pod cache and mark the table out of date; one
applier coroutine brings the table in line, at most ``apply_batch`` endpoint changes at a time with the event
loop free between batches (a relist of a thousand pods must not stall decisions for the half second the table
changes take), and it coalesces bursts of events. A slow or broken API server only delays changes (the
reflectors retry with backoff). ``synced`` turns True once
the pool was read and its pods listed; until then the picker reports NOT_SERVING (``DataLayer.ready``).

RBAC (namespaced Role): ``get, list, watch`` on ``pods`` and on ``inferencepools.inference.networking.k8s.io``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge

from pickers.datalayer.endpoints import EndpointTable
from pickers.datalayer.k8s_pods import PoolError, PoolSpec, pod_endpoints, pool_spec
from pickers.datalayer.kubeapi import KubeApi, Reflector, WatchEvent
from pickers.types import Endpoint

log = logging.getLogger("kvswitch.pickers.k8s")

POOL_GROUP = "inference.networking.k8s.io"
POOL_VERSION = "v1"

SYNCED = Gauge("kvswitch_discovery_synced", "1 once the InferencePool and its pods were listed")
DISCOVERED = Gauge("kvswitch_discovery_endpoints", "endpoints from Kubernetes discovery", ["state"])
WATCH_ERRORS = Counter("kvswitch_discovery_watch_errors_total",
                       "list/watch failures of Kubernetes discovery (retried with backoff)", ["resource"])


@dataclass(slots=True)
class KubernetesDiscoverySettings:
    pool: str
    namespace: str = "default"
    kubeconfig: str | None = None  # None: in-cluster service account, else ~/.kube/config or $KUBECONFIG
    drain_seconds: float = 30.0  # longest a leaving pod keeps serving the requests it already has
    watch_timeout_s: int = 300
    reap_interval_s: float = 0.1  # drained endpoints are checked for idleness this often
    apply_batch: int = 32  # endpoint adds/drains/removals between two yields to the event loop


ApiFactory = Callable[[], Awaitable[KubeApi]]


class KubernetesDiscovery:
    """A ``Discovery`` (pickers.datalayer.endpoints) over one InferencePool; ``run`` until cancelled."""

    def __init__(self, settings: KubernetesDiscoverySettings, api_factory: ApiFactory | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._api_factory = api_factory or (lambda: KubeApi.connect(settings.kubeconfig))
        self.clock = clock
        self.pool: PoolSpec | None = None
        self._synced = False  # a pod list of the current pool was applied to the table
        self._list_pending = False  # a pod list arrived and is not applied yet
        self._dirty = asyncio.Event()
        self._stale: set[str] = set()  # pods listed whose endpoints are not worked out yet
        self._refused: set[str] = set()  # addresses the full table refused (logged once)
        self._recheck_at: float | None = None  # when the earliest planner hold on a wanted pod lapses
        self._pods: dict[str, dict[str, Any]] = {}  # uid -> pod
        self._given: dict[str, list[Endpoint]] = {}  # uid -> endpoints it gives now
        self._ip_seen: dict[str, tuple[str, int]] = {}  # uid -> (pod IP, order in which we saw it assigned)
        self._ip_seq = 0
        self._table: EndpointTable | None = None
        self._pods_task: asyncio.Task | None = None
        self._api: KubeApi | None = None
        self.pool_reflector: Reflector | None = None
        self.pods_reflector: Reflector | None = None

    @property
    def synced(self) -> bool:
        """The pool was read and a list of its pods applied (the table is what the cluster says, not empty by
        default). A relist or a selector change keeps it True: the table holds the last known pods meanwhile."""
        return self.pool is not None and self._synced

    async def run(self, table: EndpointTable) -> None:
        self._table = table
        s = self.settings
        while self._api is None:
            try:
                self._api = await self._api_factory()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # no kubeconfig yet, API unreachable: keep trying, stay NOT_SERVING
                log.error("kubernetes discovery: cannot configure the API client: %s", exc)
                WATCH_ERRORS.labels("client").inc()
                await asyncio.sleep(2.0)
        path = f"/apis/{POOL_GROUP}/{POOL_VERSION}/namespaces/{s.namespace}/inferencepools"
        self.pool_reflector = Reflector(self._api, path, {"fieldSelector": f"metadata.name={s.pool}"},
                                        self._pool_list, self._pool_event, s.watch_timeout_s,
                                        what=f"InferencePool {s.namespace}/{s.pool}",
                                        on_error=lambda exc: WATCH_ERRORS.labels("inferencepools").inc())
        pool_task = asyncio.create_task(self.pool_reflector.run(), name="k8s pool watch")
        try:
            while True:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._dirty.wait(), s.reap_interval_s)
                if self._recheck_at is not None and self.clock() >= self._recheck_at:
                    self._recheck_at = None
                    self._dirty.set()
                if self._dirty.is_set():
                    self._dirty.clear()
                    await self._apply()
                await self._reap()
        finally:
            pool_task.cancel()
            await self._stop_pods()
            with contextlib.suppress(asyncio.CancelledError):
                await pool_task
            await self._api.close()
            self._api = None
            SYNCED.set(0)

    # ---- the pool ---------------------------------------------------------------------------------------
    def _pool_list(self, items: list[dict[str, Any]]) -> None:
        self._set_pool(items[0] if items else None)

    def _pool_event(self, ev: WatchEvent) -> None:
        self._set_pool(None if ev.type == "DELETED" else ev.object)

    def _set_pool(self, obj: dict[str, Any] | None) -> None:
        s = self.settings
        spec: PoolSpec | None = None
        if obj is None:
            log.error("InferencePool %s/%s does not exist: no endpoints (readiness NOT_SERVING until it does)",
                      s.namespace, s.pool)
        else:
            try:
                spec = pool_spec(obj)
            except PoolError as exc:
                log.error("%s: no endpoints until it is fixed", exc)
        if spec == self.pool:
            return
        log.info("InferencePool %s/%s: selector %s, target ports %s", s.namespace, s.pool,
                 spec.label_selector if spec else "-", list(spec.target_ports) if spec else "-")
        old = self.pool
        self.pool = spec
        if spec is None:
            self._restart_pods(None)
        elif old is None or old.selector != spec.selector:
            self._restart_pods(spec)  # another selector: list the pods it selects
        else:  # the same pods, other target ports
            self._stale = set(self._pods)  # the same pods, other target ports
            self._dirty.set()

    # ---- the pods ---------------------------------------------------------------------------------------
    def _restart_pods(self, spec: PoolSpec | None) -> None:
        old = self._pods_task
        if old is not None:
            old.cancel()
        self._pods_task = None
        if spec is None:
            self._synced = False
            SYNCED.set(0)
            self._pods.clear()
            self._given.clear()
            self._ip_seen.clear()
            self._stale.clear()
            self._dirty.set()
            return
        assert self._api is not None
        s = self.settings
        self.pods_reflector = Reflector(self._api, f"/api/v1/namespaces/{s.namespace}/pods",
                                        {"labelSelector": spec.label_selector}, self._pods_list, self._pod_event,
                                        s.watch_timeout_s, what=f"pods of InferencePool {s.namespace}/{s.pool}",
                                        on_error=lambda exc: WATCH_ERRORS.labels("pods").inc())
        self._pods_task = asyncio.create_task(self.pods_reflector.run(), name="k8s pods watch")

    async def _stop_pods(self) -> None:
        task, self._pods_task = self._pods_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _pods_list(self, items: list[dict[str, Any]]) -> None:
        self._pods = {self._uid(p): p for p in items}
        self._ip_seen = {uid: v for uid, v in self._ip_seen.items() if uid in self._pods}
        for uid, p in sorted(self._pods.items(), key=lambda kv: str(kv[1]["metadata"].get("creationTimestamp"))):
            self._note_ip(uid, p)
        # what each pod gives is worked out by the applier, in batches (a thousand pods take tens of ms)
        self._given = {uid: v for uid, v in self._given.items() if uid in self._pods}
        self._stale = set(self._pods)
        self._list_pending = True
        self._dirty.set()

    def _pod_event(self, ev: WatchEvent) -> None:
        uid = self._uid(ev.object)
        if ev.type == "DELETED":
            self._pods.pop(uid, None)
            self._given.pop(uid, None)
            self._ip_seen.pop(uid, None)
            self._stale.discard(uid)
        else:
            self._pods[uid] = ev.object
            self._note_ip(uid, ev.object)
            self._given[uid] = self._endpoints_of(ev.object)
            self._stale.discard(uid)
        self._dirty.set()

    @staticmethod
    def _uid(pod: dict[str, Any]) -> str:
        meta = pod.get("metadata") or {}
        return str(meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}")

    def _endpoints_of(self, pod: dict[str, Any]) -> list[Endpoint]:
        if self.pool is None:
            return []
        try:
            return pod_endpoints(pod, self.pool)
        except ValueError as exc:
            log.warning("%s: not an endpoint until its labels are fixed", exc)
            return []

    # ---- the table --------------------------------------------------------------------------------------
    def _note_ip(self, uid: str, pod: dict[str, Any]) -> None:
        ip = (pod.get("status") or {}).get("podIP")
        seen = self._ip_seen.get(uid)
        if ip and (seen is None or seen[0] != ip):
            self._ip_seq += 1
            self._ip_seen[uid] = (ip, self._ip_seq)

    def desired(self) -> dict[str, Endpoint]:
        """Address -> endpoint from every ready pod. Of two pods with one address, the one that got the IP
        last wins (the other's deletion has not reached us yet: an IP is reused only once it was released)."""
        def order(uid: str) -> int:
            return self._ip_seen.get(uid, ("", 0))[1]

        out: dict[str, Endpoint] = {}
        for uid in sorted(self._given, key=order):
            for ep in self._given[uid]:
                out[ep.address] = ep
        return out

    async def _apply(self) -> None:
        """Bring the table in line with ``desired()``: adds and drains, ``apply_batch`` at a time."""
        table = self._table
        if table is None:
            return
        listed = self._list_pending
        self._list_pending = False
        batch = self.settings.apply_batch
        while self._stale:  # events arriving meanwhile replace entries directly (and leave the stale set)
            for uid in [self._stale.pop() for _ in range(min(batch, len(self._stale)))]:
                self._given[uid] = self._endpoints_of(self._pods[uid])
            await asyncio.sleep(0)
        now = self.clock()
        # a pod the live planner is removing stays out even while Kubernetes still lists it Ready (looked at
        # again when the hold lapses: a new pod may have been given that IP meanwhile)
        want: dict[str, Endpoint] = {}
        for a, ep in self.desired().items():
            if table.is_held(ep.address, now):
                until = table.held[ep.address]
                self._recheck_at = until if self._recheck_at is None else min(self._recheck_at, until)
            else:
                want[a] = ep
        self._refused &= want.keys()
        deadline = now + self.settings.drain_seconds
        done = 0
        for addr in list(table.by_address):
            if addr not in want and not table.is_draining(addr):
                table.drain(addr, deadline)
                log.info("endpoint %s draining (pod gone, unready or unselected)", addr)
                done += 1
                if done % batch == 0:
                    await asyncio.sleep(0)
        for addr, ep in want.items():
            slot = table.slot(addr)
            if slot is None or table.is_draining(addr) or table.endpoints[slot] != ep:
                try:
                    table.add(ep)
                except ValueError as exc:  # the table is full (max_endpoints): say so once, keep the others
                    if addr not in self._refused:
                        self._refused.add(addr)
                        log.error("endpoint %s not added: %s", addr, exc)
                    continue
                self._refused.discard(addr)
                log.info("endpoint %s ready (%s, %s)", addr, ep.role.value, ep.accelerator)
                done += 1
                if done % batch == 0:
                    await asyncio.sleep(0)
        if listed and self.pool is not None:
            self._synced = True
            SYNCED.set(1)

    async def _reap(self) -> None:
        table = self._table
        if table is None:
            return
        while True:
            gone = table.reap(self.clock(), limit=self.settings.apply_batch)
            for addr in gone:
                log.info("endpoint %s removed (drained)", addr)
            if len(gone) < self.settings.apply_batch:
                break
            await asyncio.sleep(0)
        DISCOVERED.labels("draining").set(len(table.draining))
        DISCOVERED.labels("active").set(len(table) - len(table.draining))
