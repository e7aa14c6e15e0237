"""Three picker replicas (``kvswitch serve`` processes) behind one real Envoy, simulated pods, 15 streaming
clients; one replica is stopped (SIGTERM) or killed (SIGKILL) mid-run (issue 14, "Why" 7, and "Done when")."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from e2e.conftest import SIM_MODEL
from e2e.support.envoy import EnvoyProcess
from e2e.support.picker import picker_process
from e2e.support.ports import free_ports
from extproc.envoyconfig.builder import EnvoyConfigOptions

pytestmark = pytest.mark.envoy
CLIENTS = 15


async def _client(s: aiohttp.ClientSession, url: str, until: float, out: dict[str, list[float]],
                  why: list[str]) -> None:
    body = {"model": SIM_MODEL, "prompt": "a shared system prompt " * 20, "max_tokens": 24, "stream": True}
    while time.perf_counter() < until:
        t0 = time.perf_counter()
        try:
            async with s.post(url + "/v1/completions", json=body) as r:
                data = await r.read()
                ok = r.status == 200 and data.endswith(b"data: [DONE]\n\n")
                if not ok:
                    why.append(f"{r.status} {data[-160:]!r}")
        except aiohttp.ClientError as exc:
            ok = False
            why.append(repr(exc)[:160])
        out["ok" if ok else "failed"].append(t0)


async def run_replicas(sig: int, response_body: str, fail_open: bool, tmp: Path) -> dict[str, object]:
    from engine.sim.fleet import PodSpec, SimFleet

    specs = [PodSpec(name=f"pod-{i}", port=0, kv_events_port=None, model_name=SIM_MODEL) for i in range(3)]
    ports = free_ports(3)
    async with SimFleet(specs, time_scale=0.1) as fleet:
        args = [a for p in fleet.pods for a in ("--endpoint", p.address)]
        args += ["--metrics-port", "-1", "--response-body", response_body]
        async with picker_process(args, ports[0], tmp / "p0.log") as p0, \
                picker_process(args, ports[1], tmp / "p1.log"), picker_process(args, ports[2], tmp / "p2.log"):
            opts = EnvoyConfigOptions(picker=f"127.0.0.1:{ports[0]}", pickers=[f"127.0.0.1:{p}" for p in ports[1:]],
                                      endpoints=[p.address for p in fleet.pods], fail_open=fail_open,
                                      response_body=response_body)
            async with EnvoyProcess(opts) as envoy, aiohttp.ClientSession() as s:
                out: dict[str, list[float]] = {"ok": [], "failed": []}
                why: list[str] = []
                t0 = time.perf_counter()
                clients = [asyncio.create_task(_client(s, envoy.url, t0 + 8.0, out, why)) for _ in range(CLIENTS)]
                await asyncio.sleep(3.0)
                killed_at = time.perf_counter()
                os.kill(p0.pid, sig)
                await asyncio.gather(*clients)
                return {"ok": len(out["ok"]), "failed": len(out["failed"]),
                        "failed_started_after_kill": sum(t >= killed_at for t in out["failed"]),
                        "failed_offsets_s": sorted(round(t - killed_at, 3) for t in out["failed"]),
                        "why": why[:5]}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
@pytest.mark.parametrize("response_body", ["access-log", "observe", "detach"])
async def test_one_replica_of_three_goes_away_under_load(tmp_path, sig, response_body):
    """SIGTERM: no request fails (NOT_SERVING first, served until Envoy moved away, then drained).
    SIGKILL: no new request fails either: an ext_proc stream Envoy opens on the dead replica is replayed on
    another (the retry policy on the GrpcService, with Envoy buffering what it sent) and the dead one is
    ejected at its first refused connection. With access-log (the default) and detach Envoy closed the
    streams already placed once they were routed, so none is cut (only a request caught mid-routing at the
    kill can fail); with observe the streams in flight through the killed picker are cut (Envoy fails an
    ext_proc stream that breaks after the body was sent)."""
    r = await run_replicas(sig, response_body, False, tmp_path)
    print(f"\nreplicas {sig.name} response_body={response_body}: {r}")
    assert r["ok"] > 50
    if sig == signal.SIGTERM:
        assert r["failed"] == 0
        return
    assert r["failed_started_after_kill"] == 0  # every new request replayed on a live replica
    if response_body != "observe":
        # none placed before the kill is cut; one whose routing exchange was under way at that instant (the
        # dead picker had begun to answer, so Envoy cannot replay it) may fail: seen once, 6 ms before the kill
        assert all(-0.1 <= o < 0 for o in r["failed_offsets_s"]) and r["failed"] <= 2
