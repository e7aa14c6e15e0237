"""The live planner's Kubernetes target: one Deployment per (role, accelerator kind), scaled through its
``scale`` subresource (``apps/v1``), the way ``kubectl scale`` and the HPA do it.

- ``requested``: GET ``.../deployments/NAME/scale`` -> ``spec.replicas``.
- ``scale``: JSON merge PATCH ``{"spec": {"replicas": N}}`` on the same path.
- ``release(address)`` (the planner drained that pod and waited for its requests): find the Deployment's pod
  with that IP (the scale's ``status.selector`` selects them), mark it the cheapest to delete
  (``controller.kubernetes.io/pod-deletion-cost``, honoured by the ReplicaSet controller since Kubernetes
  1.22), then lower ``spec.replicas`` by one. The ReplicaSet removes that pod, not one still serving.
  A pod the planner cannot find (deleted meanwhile) only lowers the count.

RBAC (namespaced Role), beyond discovery's: ``get, patch`` on ``deployments/scale`` (group ``apps``) and
``patch`` on ``pods``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from pickers.datalayer.kubeapi import KubeApi
from pickers.planner.settings import KubernetesTargetSettings

log = logging.getLogger("kvswitch.planner")

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
LOWEST_COST = str(-(2**31))  # the annotation is an int32; the lowest goes first

ApiFactory = Callable[[], Awaitable[KubeApi]]


class KubernetesTarget:
    """``ScaleTarget`` over named Deployments (pods of role both, one Deployment per accelerator kind)."""

    def __init__(self, settings: KubernetesTargetSettings, namespace: str,
                 api_factory: ApiFactory | None = None) -> None:
        self.namespace = namespace
        self.deployments = {d.accelerator.upper(): d.name for d in settings.deployments if d.role == "both"}
        self._api_factory = api_factory or (lambda: KubeApi.connect(settings.kubeconfig))
        self._api: KubeApi | None = None
        self._lock = asyncio.Lock()

    async def api(self) -> KubeApi:
        if self._api is None:
            self._api = await self._api_factory()
        return self._api

    def _scale_path(self, name: str) -> str:
        return f"/apis/apps/v1/namespaces/{self.namespace}/deployments/{name}/scale"

    def _name(self, kind: str) -> str:
        name = self.deployments.get(kind.upper())
        if name is None:
            raise LookupError(f"planner.target.kubernetes.deployments: no Deployment for accelerator {kind} "
                              f"(known: {', '.join(self.deployments) or 'none'})")
        return name

    async def requested(self, kind: str) -> int | None:
        name = self.deployments.get(kind.upper())
        if name is None:
            return None
        scale = await (await self.api()).get(self._scale_path(name))
        return int((scale.get("spec") or {}).get("replicas") or 0)

    async def scale(self, kind: str, replicas: int) -> None:
        name = self._name(kind)
        async with self._lock:
            await (await self.api()).patch(self._scale_path(name), {"spec": {"replicas": max(0, int(replicas))}})
        log.info("planner: deployment %s/%s scaled to %d", self.namespace, name, replicas)

    async def release(self, kind: str, address: str) -> None:
        name = self._name(kind)
        api = await self.api()
        ip = address.rpartition(":")[0].strip("[]")
        async with self._lock:
            scale = await api.get(self._scale_path(name))
            replicas = int((scale.get("spec") or {}).get("replicas") or 0)
            selector = str((scale.get("status") or {}).get("selector") or "")
            pod = None
            if selector:
                pods = await api.get(f"/api/v1/namespaces/{self.namespace}/pods", {"labelSelector": selector})
                pod = next((p for p in pods.get("items") or []
                            if (p.get("status") or {}).get("podIP") == ip
                            and not (p.get("metadata") or {}).get("deletionTimestamp")), None)
            if pod is not None:
                await api.patch(f"/api/v1/namespaces/{self.namespace}/pods/{pod['metadata']['name']}",
                                {"metadata": {"annotations": {DELETION_COST: LOWEST_COST}}})
            else:
                log.warning("planner: no pod of deployment %s has IP %s; lowering its replicas only", name, ip)
            await api.patch(self._scale_path(name), {"spec": {"replicas": max(0, replicas - 1)}})
        log.info("planner: released %s (deployment %s/%s to %d)", address, self.namespace, name,
                 max(0, replicas - 1))

    def describe(self) -> str:
        return f"Deployments {', '.join(self.deployments.values())} in namespace {self.namespace}"

    async def close(self) -> None:
        if self._api is not None:
            await self._api.close()
            self._api = None


__all__ = ["DELETION_COST", "KubernetesTarget"]
