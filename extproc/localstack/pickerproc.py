"""One picker replica as its own ``kvswitch serve`` process (``kvswitch up --pickers N`` with N > 1).

Replicas in one process would share one event loop and one GIL with each other and with the simulated pods: under
load each replica's health check waits behind the others' work and Envoy marks them unhealthy together, which is
the failure replicas exist to avoid. Each replica here is a separate process with its own configuration file (the
stack's picker configuration, endpoints included), its own gRPC and metrics ports (bound by the process on port 0
and read back from the line ``kvswitch serve`` prints), and its own log under the stack's work directory.

Invariants: ``start`` returns only once the process answers its gRPC readiness check as SERVING (or raises with
the log's tail, the process stopped); ``stop`` always leaves no process behind (SIGTERM, a bounded drain, then
SIGKILL) and may be called more than once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
from pathlib import Path

import grpc
import msgspec
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.config import Config

# What ``kvswitch serve`` prints once its ports are bound (extproc/serve.py).
_READY_LINE = re.compile(rb"kvswitch serve: ext_proc on port (\d+), metrics on (-?\d+|None), ext_authz on port "
                         rb"(\d+|None)")


class PickerProcess:
    """``python -m extproc.cli serve --config FILE`` for one replica; ``address`` once started."""

    def __init__(self, config: Config, workdir: Path, name: str, log_level: str = "WARNING") -> None:
        self.name = name
        self.config_path = workdir / f"{name}.json"
        self.log_path = workdir / f"{name}.log"
        self.log_level = log_level
        raw = msgspec.to_builtins(config)
        raw["server"].update(host="127.0.0.1", grpc_port=0)
        self.config_path.write_text(json.dumps(raw, indent=1))  # JSON is YAML: ``serve --config`` reads it
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.metrics_port: int | None = None
        self.decide_port: int | None = None  # the ext_authz front (extproc/authz.py), when on

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    async def start(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "extproc.cli", "serve", "--config", str(self.config_path),
                 "--log-level", self.log_level],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            while True:
                m = _READY_LINE.search(self.log_path.read_bytes())
                if m:
                    self.port = int(m.group(1))
                    metrics = m.group(2).decode()
                    self.metrics_port = int(metrics) if metrics.lstrip("-").isdigit() and int(metrics) > 0 else None
                    decide = m.group(3).decode()
                    self.decide_port = int(decide) if decide.isdigit() else None
                    break
                self._check_alive()
                if loop.time() > deadline:
                    raise TimeoutError(f"picker {self.name} did not bind its port in {timeout:.0f}s")
                await asyncio.sleep(0.05)
            await self._wait_ready(deadline)
        except BaseException as exc:
            await self.stop()
            if isinstance(exc, (TimeoutError, RuntimeError)):
                raise type(exc)(f"{exc}\n{self.log_tail()}") from None
            raise

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"picker {self.name} exited with status {self.proc.returncode}")

    async def _wait_ready(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        async with grpc.aio.insecure_channel(self.address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                self._check_alive()
                with contextlib.suppress(grpc.aio.AioRpcError):
                    r = await stub.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=1)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                if loop.time() > deadline:
                    raise TimeoutError(f"picker {self.name} at {self.address} never became ready")
                await asyncio.sleep(0.05)

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (the picker reports NOT_SERVING, waits for quiet, drains), then SIGKILL after ``timeout``."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)
