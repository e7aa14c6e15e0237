"""`kvswitch serve --pool` against an API server: Ready once the pool's pods are listed, routes through real
Envoy to exactly the Ready pods, follows add / unready / delete within 2 s of the API event, and drains leaving
pods without failing a request.

The API server is the in-process fake (e2e/support/fakekube.py; no real one is installable here); the picker
is the `kvswitch serve` command in its own process, configured by a kubeconfig that points at the fake; the
pods are simulated vLLM pods, one per loopback IP (127.0.0.2, .3, .4) on one port, as a pool's pods share their
target port; Envoy reaches them with an ORIGINAL_DST cluster, as the plain-envoy overlay does.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from e2e.conftest import SIM_MODEL
from e2e.support.envoy import EnvoyProcess
from e2e.support.fakekube import FakeKubeApi
from e2e.support.picker import REPO
from e2e.support.ports import free_port
from extproc.envoyconfig.builder import EnvoyConfigOptions

pytestmark = [pytest.mark.envoy, pytest.mark.slow]
IPS = {"a": "127.0.0.2", "b": "127.0.0.3", "c": "127.0.0.4"}
FOLLOW_S = 2.0  # the bound from API event to routing


def common_free_port(hosts: list[str]) -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
        ok = True
        for h in hosts[1:]:
            with socket.socket() as s:
                try:
                    s.bind((h, port))
                except OSError:
                    ok = False
        if ok:
            return port
    raise RuntimeError("no port free on every loopback address")


async def health(address: str, service: str, creds: grpc.ChannelCredentials | None = None) -> int | None:
    async with (grpc.aio.secure_channel(address, creds) if creds else grpc.aio.insecure_channel(address)) as ch:
        try:
            r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
            return r.status
        except grpc.aio.AioRpcError:
            return None


async def until(cond, timeout: float, what: str, interval: float = 0.02):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await cond()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def serve_pool(kubeconfig: Path, workdir: Path, grpc_port: int, metrics_port: int,
                     ) -> AsyncIterator[subprocess.Popen]:
    cfg = workdir / "kvswitch.yaml"
    cfg.write_text(yaml.safe_dump({
        "server": {"max_fallback": 1, "debug_headers": True, "drain_seconds": 1.0},
        "discovery": {"kubernetes": {"drain_seconds": 30}},
        "scheduler": {"profile": "round-robin"},
    }))
    log = open(workdir / "picker.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc.cli", "serve", "--config", str(cfg), "--pool", "llm-pool",
         "--namespace", "default", "--kubeconfig", str(kubeconfig), "--host", "127.0.0.1",
         "--port", str(grpc_port), "--metrics-port", str(metrics_port),
         "--decide-port", "-1"],  # port + 1 (the default) may be taken
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, 15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        print("---- picker log (tail) ----\n" + "\n".join(
            (workdir / "picker.log").read_text(errors="replace").splitlines()[-25:]))


async def metric(session: aiohttp.ClientSession, port: int, line_prefix: str) -> float | None:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(line_prefix + " "):
                return float(line.split()[-1])
    return None


async def test_picker_follows_the_pool(tmp_path):
    from engine.sim.fleet import PodSpec, SimFleet

    port = common_free_port(list(IPS.values()))
    specs = [PodSpec(name=n, host=ip, port=port, kv_events_port=None, model_name=SIM_MODEL)
             for n, ip in IPS.items()]
    addr = {n: f"{ip}:{port}" for n, ip in IPS.items()}
    grpc_port, metrics_port = free_port(), free_port()
    picker = f"127.0.0.1:{grpc_port}"
    failures: list[str] = []
    routed: list[tuple[float, str]] = []  # (time sent, endpoint) of every request

    async with contextlib.AsyncExitStack() as stack:
        fleet = await stack.enter_async_context(SimFleet(specs, time_scale=1.0))
        api = await stack.enter_async_context(FakeKubeApi())
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
        proc = await stack.enter_async_context(serve_pool(kubeconfig, tmp_path, grpc_port, metrics_port))
        session = await stack.enter_async_context(aiohttp.ClientSession())

        # 1. no pool yet: alive but NOT_SERVING (FailClose gateways keep traffic away)
        await until(lambda: health(picker, "liveness"), 30, "picker process up")
        await asyncio.sleep(0.5)
        assert await health(picker, "readiness") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert proc.poll() is None

        # 2. the pool and two Ready pods (a third exists but is not Ready): SERVING once listed
        api.set_pool("llm-pool", {"app": "vllm"}, [port])
        api.add_pod("vllm-a", {"app": "vllm", "llm-d.ai/role": "decode"}, ip=IPS["a"], ready=True)
        api.add_pod("vllm-b", {"app": "vllm", "llm-d.ai/role": "decode"}, ip=IPS["b"], ready=True)
        api.add_pod("vllm-c", {"app": "vllm", "llm-d.ai/role": "decode"}, ip=IPS["c"], ready=False)
        t0 = time.monotonic()
        serving = health_pb2.HealthCheckResponse.SERVING
        await until(lambda: _is(health(picker, "readiness"), serving), 10, "readiness SERVING")
        ready_after = time.monotonic() - t0

        envoy = await stack.enter_async_context(EnvoyProcess(EnvoyConfigOptions(picker=picker, lb="original-dst")))

        async def one(max_tokens: int = 1, stream: bool = False) -> str:
            t = time.monotonic()
            body = {"model": SIM_MODEL, "prompt": f"hello {t}", "max_tokens": max_tokens, "stream": stream}
            async with session.post(envoy.url + "/v1/completions", json=body) as r:
                text = await r.text()
                if r.status != 200 or (stream and "[DONE]" not in text):
                    failures.append(f"{r.status} {text[:200]}")
                    return ""
                ep = r.headers["x-kvswitch-endpoint"]
            routed.append((t, ep))
            return ep

        seen = {await one() for _ in range(12)}
        assert seen == {addr["a"], addr["b"]}, seen  # exactly the Ready pods

        # 3. c becomes Ready: routed to within 2 s of the event
        t_event = time.monotonic()
        api.set_ready("vllm-c", True)
        await until(lambda: _eq(one(), addr["c"]), FOLLOW_S, "new Ready pod routed to", interval=0.0)
        add_lag = time.monotonic() - t_event

        # 4. b loses readiness while long streams run on it: nothing new goes to b after 2 s, and its open
        #    requests finish (drained, not dropped); once they end it is removed, well before the deadline
        streams = [asyncio.create_task(one(max_tokens=450, stream=True)) for _ in range(6)]
        await until(lambda: running_on(fleet["b"]), 10, "streams running on b")
        t_event = time.monotonic()
        api.set_ready("vllm-b", False)
        gauge = 'kvswitch_discovery_endpoints{state="draining"}'
        await until(lambda: _eq(metric(session, metrics_port, gauge), 1.0), FOLLOW_S, "b draining")
        assert await running_on(fleet["b"]), "streams on b ended before the check: make them longer"
        end = t_event + FOLLOW_S + 1.0
        while time.monotonic() < end:
            await one()
        late_b = [t - t_event for t, ep in routed if ep == addr["b"] and t > t_event]
        assert not late_b or max(late_b) < FOLLOW_S, late_b
        await asyncio.gather(*streams)
        await until(lambda: _eq(metric(session, metrics_port, gauge), 0.0), 10, "drained pod removed once idle")
        unready_lag = max(late_b, default=0.0)

        # 5. a is deleted (graceful: deletionTimestamp, then DELETED): only c remains
        t_event = time.monotonic()
        api.delete_pod("vllm-a")
        end = time.monotonic() + FOLLOW_S + 1.0
        while time.monotonic() < end:
            await one()
        late_a = [t - t_event for t, ep in routed if ep == addr["a"] and t > t_event]
        assert not late_a or max(late_a) < FOLLOW_S, late_a
        assert {ep for t, ep in routed if t > t_event + FOLLOW_S} == {addr["c"]}
        delete_lag = max(late_a, default=0.0)

        assert failures == [], failures[:5]
        print(f"\nready after pool+pods created: {ready_after * 1000:.0f} ms; add followed in {add_lag * 1000:.0f} ms;"
              f" last request to the unready pod {unready_lag * 1000:.0f} ms after the event; to the deleted pod"
              f" {delete_lag * 1000:.0f} ms; {len(routed)} requests, 0 failed")


async def running_on(pod) -> bool:
    """The simulated pod is decoding something (its engine core's own count)."""
    return pod.core.stats().num_running > 0


async def _is(coro, value) -> bool:
    return (await coro) == value


async def _eq(coro, value) -> bool:
    return (await coro) == value

