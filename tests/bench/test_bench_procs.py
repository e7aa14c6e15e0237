"""The benchmark's child processes end with it: SIGTERM (``kill``, a CI timeout) stops every child process group
it started, then ends the benchmark as Ctrl-C does; no child starts after that."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

DRIVER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from e2e.bench.procs import Proc, StartError, interrupt_on_sigterm

    tmp = Path(sys.argv[1])
    interrupt_on_sigterm()
    # each child is a shell whose own child (the grandchild) writes its pid: the group, not only the leader
    kids = [Proc(f"kid{i}", ["sh", "-c", f"sleep 300 & echo $! > {tmp}/kid{i}.pid; wait"], tmp / f"kid{i}.log")
            for i in range(2)]
    print("ready", flush=True)
    try:
        time.sleep(300)
    except KeyboardInterrupt as exc:
        print(f"interrupted: {exc}", flush=True)
        try:
            Proc("late", ["sleep", "300"], tmp / "late.log")
            print("late child started", flush=True)
        except StartError as why:
            print(f"refused: {why}", flush=True)
        sys.exit(130)
""")


def _gone(pid: int) -> bool:
    """No such process, or a zombie waiting for its reaper (it runs nothing)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"


def test_sigterm_stops_every_child_group_and_ends_like_ctrl_c(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, cwd=REPO, text=True)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(pids) < 2:
            pids = [int(f.read_text()) for f in sorted(tmp_path.glob("kid*.pid")) if f.read_text().strip()]
            time.sleep(0.05)
        assert len(pids) == 2, "the driver's children did not start"
        assert not any(_gone(p) for p in pids)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        for p in pids:  # never leave a sleeper behind, whatever the outcome
            if not _gone(p):
                os.kill(p, signal.SIGKILL)
    assert proc.returncode == 130, out
    assert "interrupted: signal 15: stopped 2 child process groups" in out
    assert "refused: late: not started: the benchmark is stopping" in out
    assert "late child started" not in out
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.05)
    assert all(_gone(p) for p in pids), "a grandchild outlived the benchmark"
