"""Child processes for the benchmark: own session, logs to a file, killed by process group, free ports.

Every router, fleet and client runs as a separate process in its own session, so stopping it kills
everything it started (Envoy workers, aiperf's services) and nothing else.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path


class StartError(RuntimeError):
    """A process did not become ready; the message carries the tail of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_range(n: int, attempts: int = 50) -> int:
    """The first of ``n`` consecutive ports that are free now (for tools that take a base port)."""
    import random

    for _ in range(attempts):
        base = random.randint(20000, 60000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports found")


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Proc:
    """One child process (and its whole process group) with its log file."""

    def __init__(self, name: str, cmd: Sequence[str], log: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name, self.cmd, self.log = name, [str(c) for c in cmd], Path(log)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._logf = self.log.open("ab")
        full_env = {**os.environ, **(env or {})}
        self.popen = subprocess.Popen(self.cmd, stdout=self._logf, stderr=subprocess.STDOUT, env=full_env,
                                      cwd=cwd, start_new_session=True, stdin=subprocess.DEVNULL)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def fail(self, why: str) -> StartError:
        return StartError(f"{self.name}: {why}\ncommand: {' '.join(self.cmd)}\n--- log {self.log} ---\n"
                          f"{tail(self.log)}")

    def wait_until(self, check: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
        """Poll ``check`` until true; fail with the log tail on timeout or if the process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise self.fail(f"exited with {self.popen.returncode} before {what}")
            try:
                if check():
                    return
            except Exception:  # noqa: BLE001 - not ready yet
                pass
            time.sleep(interval)
        raise self.fail(f"not {what} after {timeout:.0f} s")

    def wait_http(self, url: str, timeout: float = 60.0, ok: Callable[[int, bytes], bool] | None = None) -> None:
        def check() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    body = r.read()
                    return ok(r.status, body) if ok else 200 <= r.status < 300
            except urllib.error.HTTPError as e:
                return bool(ok and ok(e.code, b""))

        self.wait_until(check, timeout, f"answering {url}")

    def wait_log(self, text: str, timeout: float = 60.0) -> None:
        self.wait_until(lambda: text in self.log.read_text(errors="replace"), timeout, f"printing {text!r}")

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``grace`` seconds."""
        if self.alive:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # The leader may be gone while children of its group live on: kill the group regardless.
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._logf.close()
