"""The real Envoy binary for end-to-end tests: ``extproc.localstack.envoy.EnvoyChild`` (what ``kvswitch up``
runs) on free ports in a temp dir, as an ``async with`` that always stops it, plus picker-health waits."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import aiohttp

from e2e.support.ports import free_port
from extproc.envoyconfig.builder import PICKER_CLUSTER, EnvoyConfigOptions
from extproc.localstack.envoy import EnvoyChild, envoy_binary

__all__ = ["EnvoyProcess", "envoy_available", "envoy_binary"]


class EnvoyProcess:
    """One Envoy with its own ports, temp dir and log; ``async with`` starts and always stops it."""

    def __init__(self, opts: EnvoyConfigOptions, concurrency: int = 2, log_level: str = "warning") -> None:
        # Ports left at their defaults are picked here (and again by EnvoyChild.start if another process binds
        # one before Envoy does: the machine is shared); ports a test names are kept.
        picks = {"listen_port": not opts.listen_port or opts.listen_port == 8081,
                 "admin_port": not opts.admin_port or opts.admin_port == 9901}
        self._picked = tuple(f for f, picked in picks.items() if picked)
        for f in self._picked:
            setattr(opts, f, free_port())
        opts.listen_host = "127.0.0.1"
        self.opts = opts
        self.dir = Path(tempfile.mkdtemp(prefix="kvswitch-envoy-"))
        self.child = EnvoyChild(opts, self.dir, concurrency=concurrency, log_level=log_level)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.opts.listen_port}"

    @property
    def admin_url(self) -> str:
        return self.child.admin_url

    def log_tail(self, n: int = 40) -> str:
        return self.child.log_tail(n)

    async def start(self, timeout: float = 20.0) -> None:
        """Until Envoy is ready and, with ext_proc, its health check sees the picker (EnvoyChild's wait)."""
        await self.child.start(timeout, repick=self._picked)

    async def wait_picker_health(self, healthy: bool, timeout: float = 20.0) -> None:
        """Wait until Envoy's health check sees the picker cluster healthy (or not)."""
        deadline = asyncio.get_running_loop().time() + timeout
        async with aiohttp.ClientSession() as s:
            while True:
                async with s.get(f"{self.admin_url}/clusters") as r:
                    text = await r.text()
                lines = [ln for ln in text.splitlines()
                         if ln.startswith(f"{PICKER_CLUSTER}::") and "::health_flags::" in ln]
                ok = bool(lines) and all(ln.endswith("::healthy") for ln in lines)
                if ok == healthy:
                    return
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"picker health never became {healthy}: {lines}\n{self.log_tail()}")
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        await self.child.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    async def __aenter__(self) -> EnvoyProcess:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()


def envoy_available() -> bool:
    return envoy_binary() is not None
