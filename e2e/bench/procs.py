"""Child processes for the benchmark: own session, logs to a file, killed by process group, free ports.

Every router, fleet and client runs as a separate process in its own session, so stopping it kills
everything it started (Envoy workers, aiperf's services) and nothing else.

Invariant: every ``Proc`` not yet stopped is in one registry, so a benchmark that is told to end by a signal
stops them all (``stop_all``) at once, whichever thread started them: SIGTERM's default action ends the
interpreter without running a single ``finally`` block, and a job started in the background ignores SIGINT
(a ``kvswitch bench curves`` killed so left its fleet of simulated pods, a router and aiperf's eight services
running). Once ``stop_all`` has run, no ``Proc`` starts.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path


class StartError(RuntimeError):
    """A process did not become ready; the message carries the tail of its log."""


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


_live: set[Proc] = set()  # started and not stopped
_live_lock = threading.RLock()  # reentrant: the SIGTERM handler may run while the main thread holds it
_closing = threading.Event()


def stop_all(grace: float = 2.0) -> int:
    """Stop every child process group still running and refuse new ones; returns how many were running."""
    _closing.set()
    with _live_lock:
        procs = list(_live)
    for p in procs:  # every group told at once, then each waited for
        p.terminate()
    for p in procs:
        p.stop(grace)
    return len(procs)


def interrupt_on_sigterm() -> None:
    """From now on SIGTERM (``kill``, a CI job's timeout) stops every child at once (``stop_all``) and then raises
    KeyboardInterrupt in the main thread, so the benchmark ends as after Ctrl-C: no run starts after it, the
    results so far are saved, and nothing it started is left running. Only the main thread can set a signal
    handler: called from another (a test running a command in a thread) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: object) -> None:
        n = stop_all()
        raise KeyboardInterrupt(f"signal {signum}: stopped {n} child process groups")

    signal.signal(signal.SIGTERM, handler)


class Proc:
    """One child process (and its whole process group) with its log file."""

    def __init__(self, name: str, cmd: Sequence[str], log: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name, self.cmd, self.log = name, [str(c) for c in cmd], Path(log)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._logf = self.log.open("ab")
        full_env = {**os.environ, **(env or {})}
        with _live_lock:
            if _closing.is_set():
                self._logf.close()
                raise StartError(f"{name}: not started: the benchmark is stopping")
            self.popen = subprocess.Popen(self.cmd, stdout=self._logf, stderr=subprocess.STDOUT, env=full_env,
                                          cwd=cwd, start_new_session=True, stdin=subprocess.DEVNULL)
            _live.add(self)

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

    def terminate(self) -> None:
        """SIGTERM the process group (without waiting)."""
        if self.alive:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``grace`` seconds."""
        if self.alive:
            self.terminate()
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
        with _live_lock:
            _live.discard(self)
