"""Pod -> endpoints mapping, EndpointTable draining, and the scheduler's readiness with a discovery."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from pickers.datalayer.endpoints import EndpointTable
from pickers.datalayer.k8s_pods import PoolError, accelerator_from_product, is_ready, pod_endpoints, pool_spec
from pickers.types import Endpoint, Role, SchedulingError

from .helpers import request, scheduler

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "k8s"


def recorded_pool() -> dict:
    return json.loads((DATA / "inferencepool-get.json").read_text())


def ready_pod(**labels: str) -> dict:
    """The recorded pod vllm-1 after the status update that made it Ready (pods-watch-events.json)."""
    events = json.loads((DATA / "pods-watch-events.json").read_text())
    pod = copy.deepcopy(events[0]["object"])
    assert pod["metadata"]["name"] == "vllm-1" and is_ready(pod)
    pod["metadata"]["labels"].update(labels)
    return pod


def test_recorded_pool_and_pods():
    spec = pool_spec(recorded_pool())
    assert spec.label_selector == "app=vllm" and spec.target_ports == (8000, 8001)
    eps = pod_endpoints(ready_pod(), spec)
    assert [e.address for e in eps] == ["10.0.0.11:8000", "10.0.0.11:8001"]
    assert all(e.role is Role.DECODE for e in eps)  # llm-d.ai/role: decode in the recording
    # the recorded sequence: Ready False, then graceful deletion: neither gives endpoints
    events = json.loads((DATA / "pods-watch-events.json").read_text())
    assert [pod_endpoints(e["object"], spec) for e in events[1:4]] == [[], [], []]
    pending = json.loads((DATA / "pods-list.json").read_text())["items"]
    assert all(pod_endpoints(p, spec) == [] for p in pending)


def test_pool_errors_name_the_field():
    bad = recorded_pool()
    bad["spec"]["selector"] = {"matchLabels": {}}
    with pytest.raises(PoolError, match="matchLabels"):
        pool_spec(bad)
    bad = recorded_pool()
    bad["spec"]["targetPorts"] = [{"number": 0}]
    with pytest.raises(PoolError, match=r"targetPorts\[0\]"):
        pool_spec(bad)


@pytest.mark.parametrize("value,kind", [("NVIDIA-H100-80GB-HBM3", "H100"), ("nvidia-h200-141gb", "H200"),
                                        ("AMD_Instinct_MI300X", "MI300X"), ("NVIDIA-L40S", "L40S"),
                                        ("NVIDIA-A100-SXM4-80GB", "A100"), ("nvidia-l4", None)])
def test_gpu_product_labels(value, kind):
    assert accelerator_from_product(value) == kind


def test_labels_annotations_and_node_selector():
    spec = pool_spec(recorded_pool())
    pod = ready_pod(**{"kvswitch.io/role": "prefill"})  # kvswitch's own label wins over llm-d's
    pod["metadata"]["annotations"] = {"kvswitch.io/kv-events-port": "5557,5558", "kvswitch.io/block-size": "32",
                                      "kvswitch.io/metrics-port": "9100", "kvswitch.io/served-model": "llama",
                                      "kvswitch.io/model": "70b"}
    pod["spec"]["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "cloud.google.com/gke-accelerator", "operator": "In", "values": ["nvidia-h200-141gb"]}]}]}}}
    a, b = pod_endpoints(pod, spec)
    assert (a.role, a.accelerator, a.block_size, a.model) == (Role.PREFILL, "H200", 32, "llama")
    assert a.model_profile == "llama-3.1-70b"  # the cost model's name for the alias engine/presets accepts
    assert (a.kv_events, b.kv_events) == ("tcp://10.0.0.11:5557", "tcp://10.0.0.11:5558")
    assert a.scrape_url == b.scrape_url == "http://10.0.0.11:9100/metrics"
    pod["metadata"]["labels"].update({"kvswitch.io/accelerator": "TPU9", "kvswitch.io/model": "nope"})
    assert {(e.accelerator, e.model_profile) for e in pod_endpoints(pod, spec)} == {("H100", "llama-3.1-8b")}
    pod["metadata"]["annotations"]["kvswitch.io/kv-events-port"] = "1,2,3"
    with pytest.raises(ValueError, match="one per target port"):
        pod_endpoints(pod, spec)


@pytest.mark.parametrize("container, want", [
    ({"args": ["--model", "m", "--max-num-seqs", "128", "--max-num-batched-tokens=4096", "--block-size", "32"]},
     (32, 128, 4096)),
    # a shell command line; underscores as vLLM accepts them; the last of a repeated flag, as argparse takes it
    ({"command": ["/bin/sh", "-c"], "args": ["vllm serve m --max_num_seqs 64 --port 8000 --max-num-seqs 96"]},
     (16, 96, None)),
    ({"command": ["python3", "-m", "vllm.entrypoints.openai.api_server"], "args": ["--model", "m"]},
     (16, None, None)),  # nothing set: block 16, the presets decide the rest
    ({}, (16, None, None)),
])
def test_engine_flags_from_the_pods_command_line(container, want):
    spec = pool_spec(recorded_pool())
    pod = ready_pod()
    pod["spec"]["containers"][0].update(container)
    eps = pod_endpoints(pod, spec)
    assert {(e.block_size, e.max_num_seqs, e.max_num_batched_tokens) for e in eps} == {want}


def test_annotations_win_over_engine_flags_and_bad_values_leave_the_pod_out():
    spec = pool_spec(recorded_pool())
    pod = ready_pod()
    pod["spec"]["containers"][0]["args"] = ["--max-num-seqs", "128", "--block-size", "32"]
    pod["metadata"]["annotations"] = {"kvswitch.io/max-num-seqs": "48", "kvswitch.io/max-num-batched-tokens": "2048"}
    (a, _) = pod_endpoints(pod, spec)
    assert (a.block_size, a.max_num_seqs, a.max_num_batched_tokens) == (32, 48, 2048)
    for bad in (["--max-num-seqs", "lots"], ["--block-size=0"], ["--max-num-batched-tokens", "-5"]):
        pod["metadata"]["annotations"] = {}
        pod["spec"]["containers"][0]["args"] = bad
        with pytest.raises(ValueError, match="is not a positive integer"):
            pod_endpoints(pod, spec)


def test_drain_keeps_the_slot_until_idle_or_deadline():
    table = EndpointTable(8)
    busy: set[int] = set()
    table.set_busy_probe(lambda s: s in busy)
    events: list[tuple[str, str]] = []
    table.listen(lambda what, slot, ep: events.append((what, ep.address)))
    a, b = Endpoint("10.0.0.1:8000"), Endpoint("10.0.0.2:8000")
    sa, sb = table.add(a), table.add(b)
    busy.add(sa)
    assert table.drain("10.0.0.1:8000", deadline=100.0) and not table.drain("10.9.9.9:1", 100.0)
    assert table.active_slots().tolist() == [sb] and table.slot("10.0.0.1:8000") == sa
    assert table.reap(50.0) == []  # busy, before its deadline
    assert table.add(a) == sa and table.active_slots().tolist() == [sa, sb]  # came back: same slot
    assert events == [("add", a.address), ("add", b.address)]  # no remove/add churn for a flap
    table.drain(a.address, 100.0)
    table.drain(a.address, 200.0)  # a second drain keeps the earlier deadline
    assert table.reap(100.0) == [a.address] and table.slot(a.address) is None
    table.drain(b.address, 1e9)
    assert table.reap(0.0) == [b.address]  # idle: removed at once
    assert len(table) == 0 and not table.draining


class _Unsynced:
    synced = False

    async def run(self, table) -> None:  # pragma: no cover - never started here
        raise AssertionError


def test_scheduler_not_ready_until_discovery_synced_and_drained_pods_not_chosen():
    sched, _ = scheduler()
    assert sched.ready()
    real = sched.dl.discovery
    sched.dl.discovery = _Unsynced()
    assert not sched.ready()
    sched.dl.discovery = real
    table = sched.dl.endpoints
    for addr in ["10.0.0.1:8000", "10.0.0.2:8000"]:
        table.drain(addr, 1e9)
    for i in range(20):
        d = sched.decide(request(f"r{i}", prompt="hello"))
        assert d.endpoints == ["10.0.0.3:8000"]
    table.drain("10.0.0.3:8000", 1e9)
    assert not sched.ready()
    with pytest.raises(SchedulingError) as e:
        sched.decide(request("x", prompt="hello"))
    assert e.value.status == 503
