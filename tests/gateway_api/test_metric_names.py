"""Every metric an alert or the Grafana dashboard uses is one the picker or the (simulated) vLLM pods really
export: checked against a live /metrics of `kvswitch serve --pool` (against the fake API server, so the
discovery metrics are there too) and of a simulated vLLM pod (whose names tests/sim checks against real vLLM)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml

from e2e.support.fakekube import FakeKubeApi
from e2e.support.picker import REPO
from e2e.support.ports import free_port

MONITORING = REPO / "gateway-api" / "components" / "monitoring"
PROMETHEUS_OWN = {"up"}  # series Prometheus makes itself
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
             "offset", "le", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords or label names."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        after = text[m.end():].lstrip()
        if after.startswith("(") or m.group(0).lower() in _KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def test_promql_name_extraction():
    assert promql_metric_names('histogram_quantile(0.95, sum by (le) (rate(vllm:ttft_bucket{a="b"}[5m]))) > 2'
                               ) == {"vllm:ttft_bucket"}
    assert promql_metric_names('sum(rate(x_total{r!="ok"}[5m])) / sum(rate(x_total[5m])) or max(y) == 0'
                               ) == {"x_total", "y"}


def used_metric_names() -> dict[str, set[str]]:
    """metric name -> where it is used."""
    used: dict[str, set[str]] = {}
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    for g in rule["spec"]["groups"]:
        for r in g["rules"]:
            for n in promql_metric_names(r["expr"]):
                used.setdefault(n, set()).add(f"alert {r.get('alert') or r.get('record')}")
    dash = json.loads((MONITORING / "kvswitch-dashboard.json").read_text())
    for p in dash["panels"]:
        for t in p.get("targets", []):
            for n in promql_metric_names(t["expr"]):
                used.setdefault(n, set()).add(f"panel {p['title']}")
    return used


def exported_names(exposition: str) -> set[str]:
    """Series names an exposition produces: samples, plus the suffixes of every declared family (a labelled
    family with no sample yet still declares its TYPE)."""
    out = set()
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",)}
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            if kind == "counter":
                name = name.removesuffix("_total")  # prometheus_client writes the family name either way
            out.update(name + s for s in suffixes.get(kind, ("",)))
        elif line and not line.startswith("#"):
            out.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return out


async def _metrics(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 200
        return await r.text()


@pytest.mark.slow
async def test_every_alert_and_dashboard_metric_is_exported(tmp_path: Path):
    from engine.sim.fleet import PodSpec, SimFleet

    used = used_metric_names()
    assert any(n.startswith("vllm:") for n in used) and any(n.startswith("kvswitch_") for n in used)
    async with SimFleet([PodSpec(name="p0", port=0, kv_events_port=None)], time_scale=0.05) as fleet, \
            FakeKubeApi() as api:
        pod = fleet.pods[0]
        host, port = pod.address.rsplit(":", 1)
        api.set_pool("llm-pool", {"app": "vllm"}, [int(port)])
        api.add_pod("vllm-0", {"app": "vllm"}, ip=host, ready=True)
        metrics_port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "extproc.cli", "serve", "--pool", "llm-pool", "--namespace", "default",
             "--kubeconfig", str(api.kubeconfig(tmp_path / "kubeconfig")), "--host", "127.0.0.1",
             "--port", str(free_port()), "--metrics-port", str(metrics_port),
             "--decide-port", "-1"],  # port + 1 (the default) may be taken
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            picker_text = ""
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while "kvswitch_discovery_synced 1.0" not in picker_text:
                assert loop.time() < deadline, "picker never synced"
                assert proc.poll() is None, "picker exited"
                try:
                    picker_text = await _metrics(f"http://127.0.0.1:{metrics_port}/metrics")
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            pod_text = await _metrics(f"http://{pod.address}/metrics")
        finally:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 15)
    exported = exported_names(picker_text) | exported_names(pod_text) | PROMETHEUS_OWN
    assert {"kvswitch_discovery_endpoints", "vllm:num_requests_waiting"} <= exported
    assert "kvswitch_inference_pool_ready" not in exported  # a made-up name is caught
    missing = {n: sorted(w) for n, w in used.items() if n not in exported}
    assert not missing, f"used but not exported: {missing}"
