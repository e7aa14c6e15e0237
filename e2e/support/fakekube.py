"""An in-process fake of the Kubernetes API endpoints kvswitch's discovery uses (tests only, never the product).

Modelled on the responses recorded from a real kube-apiserver v1.36 in ``../shared/data/k8s/`` (see its
README): object shapes, list ``metadata.resourceVersion``, one JSON object per line on a watch, graceful pod
deletion (MODIFIED with ``deletionTimestamp``, then DELETED), BOOKMARK events carrying only a
resourceVersion, and, from the API documentation, an ERROR event with a 410 ``Status`` for a watch that
starts from a compacted resourceVersion.

Served (all GET unless said):
- ``/api/v1/namespaces/{ns}/pods`` with ``labelSelector`` (equality terms), ``fieldSelector``
  (``metadata.name=``), ``limit``/``continue`` (pages of one snapshot), ``watch``, ``resourceVersion``,
  ``allowWatchBookmarks``, ``timeoutSeconds``
- ``/api/v1/namespaces/{ns}/pods/{name}``; PUT ``.../pods/{name}/status`` (the status subresource)
- ``/apis/inference.networking.k8s.io/v1/namespaces/{ns}/inferencepools[/{name}]``, same query parameters
- GET and PATCH (JSON merge patch) ``/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale`` (an
  ``autoscaling/v1`` Scale, as the API documents it; no recorded response exists here), and PATCH
  ``/api/v1/namespaces/{ns}/pods/{name}`` (merge patch of labels/annotations). Lowering a Deployment's
  replicas deletes its surplus pods the way the ReplicaSet controller ranks them (not Ready first, then the
  lowest ``controller.kubernetes.io/pod-deletion-cost``, then the newest); raising them calls
  ``on_scale_up(deployment, how_many)`` so the test creates the pods (there is no kubelet).

Tests drive it with methods (``add_pod``, ``set_ready``, ``delete_pod``, ``set_pool``, ``compact``,
``drop_watches``) that change the store exactly as the API server would and notify the open watches. Like
the real server, a watch with a label selector sees an object that stops matching as DELETED and one that
starts matching as ADDED.
"""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "k8s"
POOLS = "/apis/inference.networking.k8s.io/v1/namespaces/{ns}/inferencepools"
PODS = "/api/v1/namespaces/{ns}/pods"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _matches(selector: str | None, labels: dict[str, str]) -> bool:
    if not selector:
        return True
    for term in selector.split(","):
        key, sep, value = term.partition("=")
        if not sep:  # "key" alone: exists
            if key.strip() not in labels:
                return False
            continue
        neg = key.endswith("!")
        key = key.rstrip("!").strip()
        value = value.lstrip("=").strip()
        if (labels.get(key) == value) == neg:
            return False
    return True


def _field_ok(selector: str | None, obj: dict[str, Any]) -> bool:
    if not selector:
        return True
    key, _, value = selector.partition("=")
    if key != "metadata.name":
        raise web.HTTPBadRequest(text=f"field selector {key!r} not supported by the fake")
    return obj["metadata"]["name"] == value


@dataclass
class _Watch:
    kind: str  # "pods" | "pools"
    ns: str
    labels: str | None
    fields: str | None
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=10_000))
    closed: bool = False

    def selects(self, obj: dict[str, Any] | None) -> bool:
        if obj is None or obj["metadata"].get("namespace") != self.ns:
            return False
        return _matches(self.labels, obj["metadata"].get("labels") or {}) and _field_ok(self.fields, obj)


@dataclass
class _Event:
    rv: int
    kind: str
    old: dict[str, Any] | None
    new: dict[str, Any] | None  # None: deleted (old is the last state)


class FakeKubeApi:
    """``async with FakeKubeApi() as api``: listens on 127.0.0.1 (free port); ``api.url`` for the client."""

    def __init__(self, history: int = 1000, bookmark_interval_s: float = 1.0) -> None:
        self.rv = 200  # the recorded server was at ~200 when the pool was created
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {"pods": {}, "pools": {}}
        self.log: list[_Event] = []
        self.history = history
        self.compacted = 0  # watches from a resourceVersion below this get 410 Gone
        self.bookmark_interval_s = bookmark_interval_s
        self.watches: list[_Watch] = []
        self.requests: list[str] = []  # "GET path?query" of every request, for assertions
        self._runner: web.AppRunner | None = None
        self._conns: set[web.StreamResponse] = set()
        self.port = 0
        self.pod_template = json.loads((DATA / "pods-list.json").read_text())["items"][0]
        self.pool_template = json.loads((DATA / "inferencepool-get.json").read_text())
        self.fail_next: list[int] = []  # statuses the next requests answer with (errors injection)
        self._snapshots: dict[str, tuple[int, list[dict[str, Any]]]] = {}  # continue token -> rest of a list
        self.pages_served = 0  # list responses that had a next page
        self.deployments: dict[tuple[str, str], dict[str, Any]] = {}  # (ns, name) -> {selector, replicas, uid}
        self.on_scale_up: Callable[[str, int], None] | None = None
        self.patches: list[tuple[str, dict[str, Any]]] = []  # (path, body) of every PATCH, in order

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- lifecycle ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._list_or_watch("pods"))
        app.router.add_get("/api/v1/namespaces/{ns}/pods/{name}", self._get("pods"))
        app.router.add_put("/api/v1/namespaces/{ns}/pods/{name}/status", self._put_status)
        app.router.add_patch("/api/v1/namespaces/{ns}/pods/{name}", self._patch_pod)
        app.router.add_get("/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale", self._get_scale)
        app.router.add_patch("/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale", self._patch_scale)
        app.router.add_get(POOLS.replace("{ns}", "{ns}"), self._list_or_watch("pools"))
        app.router.add_get(POOLS + "/{name}", self._get("pools"))
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeKubeApi:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """A kubeconfig that points the official client at this server (plain HTTP, no credentials)."""
        doc = {
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "test-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}],
        }
        path.write_text(json.dumps(doc))
        return path

    # ---- store changes (what controllers and the kubelet would do) ----------------------------------------
    def _commit(self, kind: str, key: tuple[str, str], new: dict[str, Any] | None) -> dict[str, Any] | None:
        store = self.objects[kind]
        old = store.get(key)
        self.rv += 1
        if new is not None:
            new["metadata"]["resourceVersion"] = str(self.rv)
            store[key] = new
        else:
            store.pop(key, None)
            if old is not None:
                old = copy.deepcopy(old)
                old["metadata"]["resourceVersion"] = str(self.rv)
        ev = _Event(self.rv, kind, copy.deepcopy(old) if new is not None and old is not None else old,
                    copy.deepcopy(new))
        self.log.append(ev)
        if len(self.log) > self.history:
            drop = self.log[: len(self.log) - self.history]
            del self.log[: len(drop)]
            self.compacted = max(self.compacted, drop[-1].rv)
        for w in list(self.watches):
            if w.kind == kind:
                self._notify(w, ev)
        return new

    def _notify(self, w: _Watch, ev: _Event) -> None:
        was, now = w.selects(ev.old), w.selects(ev.new)
        if ev.new is None:
            typ, obj = ("DELETED", ev.old) if was else (None, None)
        elif now and not was:
            typ, obj = "ADDED", ev.new
        elif now:
            typ, obj = "MODIFIED", ev.new
        elif was:  # stopped matching the selector: the watcher sees it go
            typ, obj = "DELETED", ev.new
        else:
            typ, obj = None, None
        if typ is not None and not w.closed:
            try:
                w.queue.put_nowait({"type": typ, "object": obj})
            except asyncio.QueueFull:
                w.closed = True  # a watcher too slow to keep up is cut off, as the real server does

    def add_pod(self, name: str, labels: dict[str, str], ns: str = "default", ip: str | None = None,
                ready: bool = False, annotations: dict[str, str] | None = None,
                node_selector: dict[str, str] | None = None) -> dict[str, Any]:
        pod = copy.deepcopy(self.pod_template)
        meta = pod["metadata"]
        meta.update(name=name, namespace=ns, uid=str(uuid.uuid4()), labels=dict(labels), creationTimestamp=_now())
        meta.pop("managedFields", None)
        if annotations:
            meta["annotations"] = dict(annotations)
        if node_selector:
            pod["spec"]["nodeSelector"] = dict(node_selector)
        pod["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
        self._commit("pods", (ns, name), pod)
        if ip is not None:
            self.set_ready(name, ready, ip=ip, ns=ns)
        return pod

    def set_ready(self, name: str, ready: bool, ip: str | None = None, ns: str = "default") -> None:
        """What the kubelet writes through the status subresource (recorded shape)."""
        pod = copy.deepcopy(self.objects["pods"][(ns, name)])
        status = pod["status"]
        ip = ip or status.get("podIP")
        status.update(phase="Running", podIP=ip, podIPs=[{"ip": ip}],
                      conditions=[{"type": "Ready", "status": "True" if ready else "False",
                                   "lastProbeTime": None, "lastTransitionTime": None}])
        self._commit("pods", (ns, name), pod)

    def set_labels(self, name: str, labels: dict[str, str], ns: str = "default") -> None:
        pod = copy.deepcopy(self.objects["pods"][(ns, name)])
        pod["metadata"]["labels"] = dict(labels)
        self._commit("pods", (ns, name), pod)

    def delete_pod(self, name: str, ns: str = "default", graceful: bool = True) -> None:
        """Graceful deletion as recorded: MODIFIED with deletionTimestamp, then DELETED."""
        key = (ns, name)
        if graceful:
            pod = copy.deepcopy(self.objects["pods"][key])
            pod["metadata"]["deletionTimestamp"] = _now()
            pod["metadata"]["deletionGracePeriodSeconds"] = 30
            self._commit("pods", key, pod)
        self._commit("pods", key, None)

    def set_pool(self, name: str, selector: dict[str, str], ports: list[int], ns: str = "default") -> None:
        pool = copy.deepcopy(self.objects["pools"].get((ns, name)) or self.pool_template)
        meta = pool["metadata"]
        if (ns, name) not in self.objects["pools"]:
            meta.update(name=name, namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=0)
            meta.pop("managedFields", None)
        meta["generation"] = int(meta.get("generation", 0)) + 1
        pool["spec"]["selector"] = {"matchLabels": dict(selector)}
        pool["spec"]["targetPorts"] = [{"number": p} for p in ports]
        self._commit("pools", (ns, name), pool)

    def delete_pool(self, name: str, ns: str = "default") -> None:
        self._commit("pools", (ns, name), None)

    def compact(self) -> None:
        """Forget all history (etcd compaction): watches from an older version and list continue tokens now get
        410 Gone."""
        self.log.clear()
        self.compacted = self.rv
        self._snapshots.clear()

    def drop_watches(self) -> None:
        """Cut every open watch connection (an API server restart, a load balancer timeout)."""
        for w in self.watches:
            w.closed = True
            w.queue.put_nowait(None) if not w.queue.full() else None
        for resp in list(self._conns):
            transport = resp._req.transport if resp._req is not None else None  # type: ignore[attr-defined]
            if transport is not None:
                transport.close()

    def add_deployment(self, name: str, selector: dict[str, str], replicas: int, ns: str = "default") -> None:
        """A Deployment whose pods the test creates (with ``selector``'s labels); only its scale is served."""
        self.deployments[(ns, name)] = {"selector": dict(selector), "replicas": replicas, "uid": str(uuid.uuid4()),
                                        "created": _now()}

    def _deployment_pods(self, ns: str, d: dict[str, Any]) -> list[dict[str, Any]]:
        return [p for (pns, _), p in self.objects["pods"].items() if pns == ns
                and not p["metadata"].get("deletionTimestamp")
                and all((p["metadata"].get("labels") or {}).get(k) == v for k, v in d["selector"].items())]

    def _scale(self, ns: str, name: str) -> dict[str, Any]:
        d = self.deployments[(ns, name)]
        return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {"name": name, "namespace": ns, "uid": d["uid"], "resourceVersion": str(self.rv),
                             "creationTimestamp": d["created"]},
                "spec": {"replicas": d["replicas"]},
                "status": {"replicas": len(self._deployment_pods(ns, d)),
                           "selector": ",".join(f"{k}={v}" for k, v in sorted(d["selector"].items()))}}

    async def _get_scale(self, req: web.Request) -> web.Response:
        self.requests.append(f"GET {req.path_qs}")
        if (err := self._injected()) is not None:
            return err
        ns, name = req.match_info["ns"], req.match_info["name"]
        if (ns, name) not in self.deployments:
            return web.json_response(_status(404, f'deployments.apps "{name}" not found'), status=404)
        return web.json_response(self._scale(ns, name))

    async def _patch_scale(self, req: web.Request) -> web.Response:
        self.requests.append(f"PATCH {req.path_qs}")
        if (err := self._injected()) is not None:
            return err
        ns, name = req.match_info["ns"], req.match_info["name"]
        d = self.deployments.get((ns, name))
        if d is None:
            return web.json_response(_status(404, f'deployments.apps "{name}" not found'), status=404)
        if req.content_type != "application/merge-patch+json":
            return web.json_response(_status(415, f"unsupported patch type {req.content_type}"), status=415)
        body = await req.json()
        self.patches.append((req.path, body))
        replicas = (body.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or replicas < 0:
            return web.json_response(_status(422, f"spec.replicas: Invalid value: {replicas!r}", "Invalid"),
                                     status=422)
        d["replicas"] = replicas
        pods = self._deployment_pods(ns, d)
        if len(pods) > replicas:  # the ReplicaSet controller's ranking, in short

            def rank(p: dict[str, Any]) -> tuple[int, int, str]:
                ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                            for c in (p.get("status") or {}).get("conditions") or [])
                cost = int((p["metadata"].get("annotations") or {}).get(
                    "controller.kubernetes.io/pod-deletion-cost", 0))
                return (int(ready), cost, "~" + str(p["metadata"].get("creationTimestamp")))

            for p in sorted(pods, key=rank)[: len(pods) - replicas]:
                self.delete_pod(p["metadata"]["name"], ns)
        elif len(pods) < replicas and self.on_scale_up is not None:
            self.on_scale_up(name, replicas - len(pods))
        return web.json_response(self._scale(ns, name))

    async def _patch_pod(self, req: web.Request) -> web.Response:
        self.requests.append(f"PATCH {req.path_qs}")
        key = (req.match_info["ns"], req.match_info["name"])
        if key not in self.objects["pods"]:
            return web.json_response(_status(404, f'pods "{key[1]}" not found'), status=404)
        if req.content_type != "application/merge-patch+json":
            return web.json_response(_status(415, f"unsupported patch type {req.content_type}"), status=415)
        body = await req.json()
        self.patches.append((req.path, body))
        pod = _merge_patch(copy.deepcopy(self.objects["pods"][key]), body)
        return web.json_response(self._commit("pods", key, pod))

    # ---- HTTP ---------------------------------------------------------------------------------------------
    def _injected(self) -> web.Response | None:
        if self.fail_next:
            code = self.fail_next.pop(0)
            return web.json_response(_status(code, "injected failure"), status=code)
        return None

    def _list_or_watch(self, kind: str) -> Callable:
        async def handler(req: web.Request) -> web.StreamResponse:
            self.requests.append(f"GET {req.path_qs}")
            if (err := self._injected()) is not None:
                return err
            ns = req.match_info["ns"]
            labels = req.query.get("labelSelector")
            fields = req.query.get("fieldSelector")
            if req.query.get("watch") in ("1", "true"):
                return await self._watch(req, _Watch(kind, ns, labels, fields))
            list_kind = "PodList" if kind == "pods" else "InferencePoolList"
            api = "v1" if kind == "pods" else "inference.networking.k8s.io/v1"
            token = req.query.get("continue")
            if token:  # the next page of an earlier list's snapshot (410 once it expired)
                snap = self._snapshots.get(token)
                if snap is None:
                    return web.json_response(_status(410, "The provided continue parameter is too old", "Expired"),
                                             status=410)
                rv, items = snap
            else:
                w = _Watch(kind, ns, labels, fields)
                rv, items = self.rv, [copy.deepcopy(o) for o in self.objects[kind].values() if w.selects(o)]
            limit = int(req.query.get("limit") or 0)
            meta: dict[str, Any] = {"resourceVersion": str(rv)}
            if limit and len(items) > limit:
                self.pages_served += 1
                nxt = f"{rv}-{uuid.uuid4().hex}"
                self._snapshots[nxt] = (rv, items[limit:])
                meta.update({"continue": nxt, "remainingItemCount": len(items) - limit})
                items = items[:limit]
            return web.json_response({"kind": list_kind, "apiVersion": api, "metadata": meta, "items": items})
        return handler

    def _get(self, kind: str) -> Callable:
        async def handler(req: web.Request) -> web.Response:
            self.requests.append(f"GET {req.path_qs}")
            obj = self.objects[kind].get((req.match_info["ns"], req.match_info["name"]))
            if obj is None:
                return web.json_response(_status(404, f"{kind} \"{req.match_info['name']}\" not found"), status=404)
            return web.json_response(obj)
        return handler

    async def _put_status(self, req: web.Request) -> web.Response:
        key = (req.match_info["ns"], req.match_info["name"])
        if key not in self.objects["pods"]:
            return web.json_response(_status(404, "not found"), status=404)
        body = await req.json()
        pod = copy.deepcopy(self.objects["pods"][key])
        pod["status"] = body.get("status", {})
        return web.json_response(self._commit("pods", key, pod))

    async def _watch(self, req: web.Request, w: _Watch) -> web.StreamResponse:
        rv_text = req.query.get("resourceVersion") or ""
        timeout = float(req.query.get("timeoutSeconds") or 1800)
        bookmarks = req.query.get("allowWatchBookmarks") in ("true", "1")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(req)
        self._conns.add(resp)
        try:
            if rv_text and rv_text != "0":
                since = int(rv_text)
                if since < self.compacted:
                    gone = _status(410, f"too old resource version: {since} ({self.compacted})", "Expired")
                    await resp.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
                    return resp
                for ev in self.log:
                    if ev.rv > since and ev.kind == w.kind:
                        self._notify(w, ev)
            else:  # no version: synthetic ADDED for everything, as the real server does
                for o in self.objects[w.kind].values():
                    if w.selects(o):
                        w.queue.put_nowait({"type": "ADDED", "object": o})
            self.watches.append(w)
            loop = asyncio.get_running_loop()
            end = loop.time() + timeout
            while not w.closed:
                left = end - loop.time()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(w.queue.get(), min(left, self.bookmark_interval_s))
                except TimeoutError:
                    if bookmarks:
                        item = {"type": "BOOKMARK", "object": {
                            "kind": "Pod" if w.kind == "pods" else "InferencePool",
                            "apiVersion": "v1" if w.kind == "pods" else "inference.networking.k8s.io/v1",
                            "metadata": {"resourceVersion": str(self.rv)}, "spec": {"containers": None},
                            "status": {}}}
                    else:
                        continue
                if item is None:
                    break
                await resp.write(json.dumps(item).encode() + b"\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            w.closed = True
            if w in self.watches:
                self.watches.remove(w)
            self._conns.discard(resp)
        return resp


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge_patch(out.get(k), v)
    return out


def _status(code: int, message: str, reason: str = "") -> dict[str, Any]:
    reasons = {404: "NotFound", 410: "Expired", 415: "UnsupportedMediaType", 422: "Invalid",
               500: "InternalError", 503: "ServiceUnavailable"}
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason or reasons.get(code, ""), "code": code}
