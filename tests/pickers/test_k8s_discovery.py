"""Kubernetes discovery against the in-process fake API server (e2e/support/fakekube.py), through the official
client (kubernetes_asyncio, configured from a kubeconfig that points at the fake)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest

from e2e.support.fakekube import FakeKubeApi
from pickers.datalayer.endpoints import EndpointTable
from pickers.datalayer.k8s import KubernetesDiscovery, KubernetesDiscoverySettings
from pickers.types import Role

APP = {"app": "vllm"}


async def until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not reached within {timeout}s: {what}")
        await asyncio.sleep(0.02)


class Busy:
    """The in-flight probe the DataLayer would wire: slots with open requests."""

    def __init__(self) -> None:
        self.slots: set[int] = set()

    def __call__(self, slot: int) -> bool:
        return slot in self.slots


@contextlib.asynccontextmanager
async def discovery(api: FakeKubeApi, tmp_path: Path, drain_seconds: float = 30.0, slots: int = 64,
                    ) -> AsyncIterator[tuple[KubernetesDiscovery, EndpointTable, Busy]]:
    table = EndpointTable(slots)
    busy = Busy()
    table.set_busy_probe(busy)
    d = KubernetesDiscovery(KubernetesDiscoverySettings(
        pool="llm-pool", namespace="default", kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")),
        drain_seconds=drain_seconds, reap_interval_s=0.02))
    task = asyncio.create_task(d.run(table))
    try:
        yield d, table, busy
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # the server notices a closed watch at its next write (a bookmark every 0.2 s)
    await until(lambda: not api.watches, timeout=5.0, what="discovery closed its watches")


def active(table: EndpointTable) -> set[str]:
    return {a for s in table.active_slots().tolist() if (a := table.address(s)) is not None}


@pytest.fixture
async def api() -> AsyncIterator[FakeKubeApi]:
    async with FakeKubeApi(bookmark_interval_s=0.2) as fake:
        yield fake


async def test_synced_only_after_the_pool_and_its_pods_were_listed(api, tmp_path):
    api.add_pod("vllm-0", {**APP, "llm-d.ai/role": "decode"}, ip="10.0.0.10", ready=True)
    async with discovery(api, tmp_path) as (d, table, _):
        await until(lambda: any("inferencepools" in r for r in api.requests), what="pool listed")
        await asyncio.sleep(0.3)
        assert not d.synced and len(table) == 0  # no pool yet: NOT_SERVING, nothing routed
        api.set_pool("llm-pool", APP, [8000, 8001])
        await until(lambda: d.synced, what="synced")
        # one endpoint per target port, role from llm-d's label
        assert active(table) == {"10.0.0.10:8000", "10.0.0.10:8001"}
        assert all(e is not None and e.role is Role.DECODE for e in table.endpoints)
        assert any("labelSelector=app%3Dvllm" in r for r in api.requests)


async def test_pod_flapping_ready_drains_then_comes_back_in_the_same_slot(api, tmp_path):
    api.set_pool("llm-pool", APP, [8000])
    api.add_pod("vllm-0", APP, ip="10.0.0.10", ready=True)
    async with discovery(api, tmp_path) as (_, table, busy):
        await until(lambda: active(table) == {"10.0.0.10:8000"}, what="ready pod listed")
        slot = table.slot("10.0.0.10:8000")
        assert slot is not None
        busy.slots.add(slot)  # a request is open on it
        for _ in range(3):
            api.set_ready("vllm-0", False)
            await until(lambda: not active(table), what="unready pod leaves the candidates")
            assert table.is_draining("10.0.0.10:8000") and table.slot("10.0.0.10:8000") == slot
            api.set_ready("vllm-0", True)
            await until(lambda: active(table) == {"10.0.0.10:8000"}, what="ready again")
            assert table.slot("10.0.0.10:8000") == slot and not table.draining
        api.set_ready("vllm-0", False)
        await until(lambda: not active(table))
        await asyncio.sleep(0.2)
        assert table.slot("10.0.0.10:8000") == slot, "removed while a request was still open"
        busy.slots.clear()  # the request ends
        await until(lambda: table.slot("10.0.0.10:8000") is None, what="idle drained pod removed")


async def test_drain_deadline_bounds_a_stuck_request(api, tmp_path):
    api.set_pool("llm-pool", APP, [8000])
    api.add_pod("vllm-0", APP, ip="10.0.0.10", ready=True)
    async with discovery(api, tmp_path, drain_seconds=0.5) as (_, table, busy):
        await until(lambda: len(table) == 1)
        busy.slots.add(table.slot("10.0.0.10:8000"))  # never finishes
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        api.delete_pod("vllm-0")
        await until(lambda: len(table) == 0, timeout=5.0, what="removed at the deadline")
        assert loop.time() - t0 >= 0.45


async def test_ip_reused_by_another_pod(api, tmp_path):
    api.set_pool("llm-pool", APP, [8000])
    api.add_pod("old", {**APP, "llm-d.ai/role": "prefill"}, ip="10.0.0.10", ready=True)
    async with discovery(api, tmp_path) as (_, table, _busy):
        await until(lambda: len(table) == 1)
        addr = "10.0.0.10:8000"
        # the new pod is Ready with the same IP before the old pod's deletion reaches the watch
        api.add_pod("new", {**APP, "llm-d.ai/role": "decode"}, ip="10.0.0.10", ready=True)
        await until(lambda: table.endpoints[table.slot(addr)].role is Role.DECODE, what="newest pod owns the IP")
        api.delete_pod("old")
        await asyncio.sleep(0.3)
        slot = table.slot(addr)
        assert slot is not None and not table.is_draining(addr) and addr in active(table)
        assert table.endpoints[slot].role is Role.DECODE
        api.delete_pod("new")
        await until(lambda: len(table) == 0, what="gone with its last owner")


async def test_selector_change_relists_and_follows(api, tmp_path):
    api.set_pool("llm-pool", APP, [8000])
    api.add_pod("a", APP, ip="10.0.0.1", ready=True)
    api.add_pod("b", {"app": "other"}, ip="10.0.0.2", ready=True)
    async with discovery(api, tmp_path) as (d, table, _):
        await until(lambda: active(table) == {"10.0.0.1:8000"})
        lists = d.pods_reflector.stats.lists
        api.set_pool("llm-pool", {"app": "other"}, [8000])
        await until(lambda: active(table) == {"10.0.0.2:8000"}, what="new selector's pods")
        assert any("labelSelector=app%3Dother" in r for r in api.requests)
        assert d.pods_reflector.stats.lists == 1 and lists == 1  # a fresh reflector listed once
        # a label change moves a pod into the selection (the watch shows it as ADDED)
        api.set_labels("a", {"app": "other"})
        await until(lambda: active(table) == {"10.0.0.1:8000", "10.0.0.2:8000"})
        # target ports change without a selector change: same pods, new endpoints
        api.set_pool("llm-pool", {"app": "other"}, [8000, 9000])
        await until(lambda: len(active(table)) == 4)


async def test_watch_drop_resumes_from_the_last_version_and_410_relists(api, tmp_path):
    api.set_pool("llm-pool", APP, [8000])
    api.add_pod("a", APP, ip="10.0.0.1", ready=True)
    async with discovery(api, tmp_path) as (d, table, _):
        await until(lambda: d.synced)
        r = d.pods_reflector
        await until(lambda: r.stats.watches >= 1 and len(api.watches) == 2, what="watches open")
        api.drop_watches()
        api.add_pod("b", APP, ip="10.0.0.2", ready=True)  # while no watch is open
        await until(lambda: active(table) == {"10.0.0.1:8000", "10.0.0.2:8000"}, what="change seen after drop")
        assert r.stats.lists == 1 and r.stats.watches >= 2  # resumed, not relisted
        resumed = [q for q in api.requests if "watch=1" in q and "pods" in q][1]
        assert "resourceVersion=" in resumed and "resourceVersion=0" not in resumed
        # compaction while disconnected: the resume gets 410 Gone, the reflector lists again
        await until(lambda: len(api.watches) == 2)
        api.drop_watches()
        api.compact()
        api.delete_pod("a", graceful=False)
        api.compact()
        await until(lambda: active(table) == {"10.0.0.2:8000"}, what="deletion seen through a relist")
        assert r.stats.gone >= 1 and r.stats.lists == 2


async def test_api_errors_back_off_and_recover(api, tmp_path):
    api.set_pool("llm-pool", APP, [8000])
    api.add_pod("a", APP, ip="10.0.0.1", ready=True)
    api.fail_next = [500, 503, 500]
    async with discovery(api, tmp_path) as (d, table, _):
        await until(lambda: d.synced, what="synced after errors")
        assert d.pool_reflector.stats.errors + d.pods_reflector.stats.errors == 3
        assert active(table) == {"10.0.0.1:8000"}


async def test_pool_deleted_drains_everything(api, tmp_path):
    api.set_pool("llm-pool", APP, [8000])
    api.add_pod("a", APP, ip="10.0.0.1", ready=True)
    async with discovery(api, tmp_path) as (d, table, _):
        await until(lambda: len(active(table)) == 1)
        api.delete_pool("llm-pool")
        await until(lambda: len(table) == 0 and not d.synced, what="pool gone")


async def test_bad_labels_exclude_only_that_pod(api, tmp_path):
    api.set_pool("llm-pool", APP, [8000])
    api.add_pod("bad", {**APP, "llm-d.ai/role": "prefil"}, ip="10.0.0.1", ready=True)
    api.add_pod("good", APP, ip="10.0.0.2", ready=True,
                annotations={"kvswitch.io/kv-events-port": "5557", "kvswitch.io/model": "llama-3.1-70b"},
                node_selector={"nvidia.com/gpu.product": "NVIDIA-H200"})
    async with discovery(api, tmp_path) as (d, table, _):
        await until(lambda: d.synced)
        assert active(table) == {"10.0.0.2:8000"}
        ep = table.endpoints[table.slot("10.0.0.2:8000")]
        assert (ep.accelerator, ep.model_profile, ep.kv_events) == ("H200", "llama-3.1-70b", "tcp://10.0.0.2:5557")
        assert np.count_nonzero(table.can_decode) == 1


async def test_status_subresource_update_is_seen(api, tmp_path):
    """A kubelet-style PUT of the pod's status subresource (as the recording did) makes it an endpoint."""
    import aiohttp

    api.set_pool("llm-pool", APP, [8000])
    api.add_pod("vllm-1", APP)  # Pending, no IP
    async with discovery(api, tmp_path) as (d, table, _):
        await until(lambda: d.synced)
        assert len(table) == 0
        status = {"phase": "Running", "podIP": "10.0.0.11", "podIPs": [{"ip": "10.0.0.11"}],
                  "conditions": [{"type": "Ready", "status": "True"}]}
        async with aiohttp.ClientSession() as s, s.put(f"{api.url}/api/v1/namespaces/default/pods/vllm-1/status",
                                                       json={"status": status}) as r:
            assert r.status == 200
        await until(lambda: active(table) == {"10.0.0.11:8000"}, what="status update routed")


async def test_a_large_list_is_applied_in_batches_with_the_loop_free_between(api, tmp_path):
    """Adding an endpoint runs every listener (cost table, indexes): a relist of hundreds of pods must not hold
    the event loop (decisions) for the whole of it. Another task runs while the table is partly filled."""
    api.set_pool("llm-pool", APP, [8000])
    n = 200
    for i in range(n):
        api.add_pod(f"p{i}", APP, ip=f"10.1.{i // 250}.{i % 250 + 1}", ready=True)
    seen: list[int] = []
    async with discovery(api, tmp_path, slots=256) as (d, table, _):
        async def watch() -> None:
            while len(table) < n:
                seen.append(len(table))
                await asyncio.sleep(0)

        watcher = asyncio.create_task(watch())
        await until(lambda: len(active(table)) == n, what="every pod added")
        await watcher
        assert d.synced
    partial = [k for k in seen if 0 < k < n]
    assert partial, "the whole list was applied without yielding once"
    assert max(b - a for a, b in zip(partial, partial[1:]) or [(0, 0)]) <= d.settings.apply_batch


async def test_lists_are_paged_and_an_expired_continue_token_restarts_the_list(api, tmp_path):
    api.set_pool("llm-pool", APP, [8000])
    for i in range(250):
        api.add_pod(f"p{i}", APP, ip=f"10.3.{i // 250}.{i % 250 + 1}", ready=True)
    api.compact()  # so that tokens and old versions expire below
    async with discovery(api, tmp_path, slots=512) as (d, table, _):
        await until(lambda: d.synced and len(active(table)) == 250, what="every page applied")
        pages = [q for q in api.requests if "pods?" in q and "watch=1" not in q]
        assert len(pages) == 3 and all("limit=100" in q for q in pages) and "continue=" in pages[1]
        # the watch drops, history is compacted: the resume gets 410, the relist (paged again) sees a deletion
        await until(lambda: len(api.watches) == 2, what="watches open")
        api.drop_watches()
        api.delete_pod("p0", graceful=False)
        api.compact()
        await until(lambda: len(active(table)) == 249, what="deletion seen through a paged relist")
        assert d.pods_reflector.stats.lists == 2
