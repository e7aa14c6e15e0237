"""Fixtures for end-to-end tests: pods (simulator when present, else a tiny OpenAI-like upstream)."""

from __future__ import annotations

import contextlib

import pytest

from e2e.support.envoy import envoy_available
from e2e.support.ports import free_ports
from e2e.support.upstream import FakeUpstream

SIM_MODEL = "llama-3.1-8b"  # the model name the simulated pods serve (and e2e requests name)


def pytest_collection_modifyitems(config, items):
    if envoy_available():
        return
    skip = pytest.mark.skip(reason="envoy binary not installed (.venv/bin/envoy)")
    for item in items:
        if "envoy" in item.keywords:
            item.add_marker(skip)


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
    """Two simulated vLLM pods (engine.sim) when it exists, else fake upstreams; yields addresses."""
    try:
        from engine.sim.fleet import PodSpec, SimFleet
    except ImportError:
        SimFleet = None
    async with contextlib.AsyncExitStack() as stack:
        if SimFleet is not None:
            fleet = await stack.enter_async_context(
                SimFleet([PodSpec(name=f"pod-{i}", port=0, kv_events_port=None, model_name=SIM_MODEL)
                          for i in range(2)],
                         time_scale=0.05))
            yield [pod.address for pod in fleet.pods]
        else:
            pods = [FakeUpstream(p) for p in free_ports(2)]
            for p in pods:
                await p.start()
                stack.push_async_callback(p.stop)
            yield [p.address for p in pods]
