"""Start the kvswitch picker for a test: in-process (same event loop) or as a `kvswitch serve` subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from e2e.support.ports import free_port
from extproc.config import Config, config_from_dict
from extproc.server import Server, build_scheduler, build_server

REPO = Path(__file__).resolve().parents[2]


# The picker at its simplest: least in-flight, no admission; it reads no pod metrics, so it fronts any upstream
# (the fake pods of these tests serve no vLLM /metrics, and see no request but the ones Envoy sends).
LEAST_INFLIGHT: dict[str, object] = {"profile": "least-inflight", "admission": []}


def picker_config(endpoints: list[str], scheduler: dict[str, object] | None = None, **server: object) -> Config:
    """A picker configuration on free ports (gRPC, the ext_authz front) with metrics off, for the given endpoint
    addresses."""
    # the ext_authz front on a free port (not gRPC + 1, which may be taken), unless the config rules it out
    no_front = server.get("model_rewrite") or server.get("tls_cert") or server.get("tls_self_signed")
    srv = {"host": "127.0.0.1", "grpc_port": free_port(), "metrics_port": -1, "decide_port": -1 if no_front else 0,
           "drain_seconds": 1.0, "move_away_seconds": 1.0, "move_away_quiet_seconds": 0.2, **server}
    return config_from_dict({"server": srv, "endpoints": [{"address": a, "role": "decode"} for a in endpoints],
                             "scheduler": scheduler})


@contextlib.asynccontextmanager
async def running_picker(config: Config, scheduler=None) -> AsyncIterator[Server]:
    server = build_server(config, scheduler or build_scheduler(config))
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0.5)


async def wait_grpc_health(address: str, service: str = "readiness", timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    async with grpc.aio.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                r = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"picker at {address} not {service} after {timeout}s")
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def picker_process(args: list[str], port: int, log_path: Path | None = None,
                         ready_timeout: float = 60.0,
                         launcher: tuple[str, ...] = ("-m", "extproc.cli")) -> AsyncIterator[subprocess.Popen]:
    """`python -m extproc.cli serve ARGS --port PORT` as a subprocess, stopped with SIGTERM at exit (its start
    may take long on a loaded machine: ``ready_timeout``). ``launcher``: what runs the CLI (e.g. the soak's
    tracemalloc wrapper)."""
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL
    if "--decide-port" not in args:  # port + 1 (the default) may be taken: on only when a test asks for it
        args = [*args, "--decide-port", "-1"]
    proc = subprocess.Popen([sys.executable, *launcher, "serve", "--host", "127.0.0.1", "--port",
                             str(port), *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        await wait_grpc_health(f"127.0.0.1:{port}", timeout=ready_timeout)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if log_path:
            out.close()
