"""Run the real Envoy binary (.venv/bin/envoy) on a generated bootstrap, and wait until it is usable."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp

from e2e.support.ports import free_port
from extproc.envoyconfig.builder import EnvoyConfigOptions, render

REPO = Path(__file__).resolve().parents[2]


def envoy_binary() -> str | None:
    for cand in (REPO / ".venv" / "bin" / "envoy", Path(sys.prefix) / "bin" / "envoy"):
        if cand.exists():
            return str(cand)
    return shutil.which("envoy")


class EnvoyProcess:
    """One Envoy with its own ports, temp dir and log; ``async with`` starts and always stops it."""

    def __init__(self, opts: EnvoyConfigOptions, concurrency: int = 2, log_level: str = "warning") -> None:
        if not opts.listen_port or opts.listen_port == 8081:
            opts.listen_port = free_port()
        if not opts.admin_port or opts.admin_port == 9901:
            opts.admin_port = free_port()
        opts.listen_host = "127.0.0.1"
        self.opts = opts
        self.concurrency = concurrency
        self.log_level = log_level
        self.dir = Path(tempfile.mkdtemp(prefix="kvswitch-envoy-"))
        self.config_path = self.dir / "envoy.yaml"
        self.log_path = self.dir / "envoy.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.opts.listen_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.opts.admin_port}"

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    async def start(self, timeout: float = 20.0, wait_picker: bool = True) -> None:
        binary = envoy_binary()
        if binary is None:
            raise RuntimeError("the envoy binary is not installed (.venv/bin/envoy)")
        self.config_path.write_text(render(self.opts))
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.config_path), "--disable-hot-restart", "--concurrency", str(self.concurrency),
             "-l", self.log_level, "--log-path", str(self.log_path), "--file-flush-interval-msec", "200"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        await self._wait_ready(timeout)
        if wait_picker and self.opts.ext_proc:
            await self.wait_picker_health(True, timeout)

    async def _wait_ready(self, timeout: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        async with aiohttp.ClientSession() as s:
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"envoy exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    async with s.get(f"{self.admin_url}/ready") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"envoy not ready after {timeout}s:\n{self.log_tail()}")
                await asyncio.sleep(0.05)

    async def wait_picker_health(self, healthy: bool, timeout: float = 20.0) -> None:
        """Wait until Envoy's health check sees the picker cluster healthy (or not)."""
        deadline = asyncio.get_running_loop().time() + timeout
        async with aiohttp.ClientSession() as s:
            while True:
                async with s.get(f"{self.admin_url}/clusters") as r:
                    text = await r.text()
                lines = [ln for ln in text.splitlines() if ln.startswith("kvswitch_picker::") and "::health_flags::" in ln]
                ok = bool(lines) and all(ln.endswith("::healthy") for ln in lines)
                if ok == healthy:
                    return
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"picker health never became {healthy}: {lines}\n{self.log_tail()}")
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    async def __aenter__(self) -> "EnvoyProcess":
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()


def envoy_available() -> bool:
    return envoy_binary() is not None and os.access(envoy_binary() or "", os.X_OK)
