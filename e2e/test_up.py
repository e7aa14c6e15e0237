"""`kvswitch up` and `kvswitch demo` as a person runs them: subprocesses, real Envoy, simulated pods."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from e2e.support.ports import free_port
from extproc.envoyconfig.authz import DECIDE_CLUSTER
from extproc.envoyconfig.builder import PICKER_CLUSTER

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.envoy, pytest.mark.slow]

_UP = re.compile(r"kvswitch is up: (http://127\.0\.0\.1:(\d+)/v1) .*envoy admin http://127\.0\.0\.1:(\d+)\)")
_POD = re.compile(r"^\s+(\S+)\s+(both|prefill|decode)\s+(\d+\.\d+\.\d+\.\d+:\d+)(?: via sidecar (\S+))?")


@dataclass
class Up:
    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    url: str = ""
    port: int = 0
    admin_port: int = 0
    routable: dict[str, str] = field(default_factory=dict)  # address the picker routes to -> pod name

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def envoy_pids(self) -> list[int]:
        return _children(self.proc.pid, "envoy")


def _children(pid: int, name: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == pid and name in comm:
            out.append(int(entry.name))
    return out


def _picker_children(pid: int) -> list[int]:
    """Child processes of ``pid`` running ``kvswitch serve`` (the picker replicas of ``kvswitch up``)."""
    out = []
    for child in _children(pid, ""):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"extproc.cli" in argv and b"serve" in argv:
            out.append(child)
    return out


def _picker_hosts(admin_port: int, cluster: str = DECIDE_CLUSTER) -> dict[str, dict[str, str]]:
    """Envoy's view of a picker cluster (by default the decide ports `kvswitch up` routes through, ext-authz):
    host -> {stat or flag name: value} (admin /clusters)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/clusters", timeout=5) as r:
        text = r.read().decode()
    hosts: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == cluster and parts[1].startswith("127.0.0.1:"):
            hosts.setdefault(parts[1], {})[parts[2]] = parts[3]
    return hosts


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@contextlib.contextmanager
def kvswitch_up(*args: str, timeout: float = 40.0) -> Iterator[Up]:
    """`python -m extproc.cli up ARGS` until its URL line; SIGKILL at exit if the test did not stop it."""
    proc = subprocess.Popen([sys.executable, "-m", "extproc.cli", "up", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    up = Up(proc)
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            up.lines.append(line.rstrip("\n"))
            if (m := _UP.search(line)) is not None:
                up.url, up.port, up.admin_port = m.group(1), int(m.group(2)), int(m.group(3))
            elif (m := _POD.match(line)) is not None:
                up.routable[m.group(4) or m.group(3)] = m.group(1)
            if line.startswith("Ctrl-C to stop"):
                ready.set()
        ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not ready.wait(timeout) or not up.url:
            raise AssertionError(f"kvswitch up did not come up in {timeout}s:\n{up.output}")
        yield up
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        reader.join(5)
        if proc.stdout is not None:
            proc.stdout.close()


@dataclass
class Reply:
    status_code: int
    headers: dict[str, str]
    text: str

    def json(self):
        return json.loads(self.text)


def _http(url: str, body: dict | None = None) -> Reply:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return Reply(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode())
    except urllib.error.HTTPError as e:
        return Reply(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode())


def _complete(url: str, prompt: str, max_tokens: int = 4) -> Reply:
    return _http(f"{url}/completions", {"model": "sim-model", "prompt": prompt, "max_tokens": max_tokens})


def test_up_serves_through_envoy_and_stops_cleanly_on_sigterm():
    port = free_port()
    with kvswitch_up("--pods", "2", "--port", str(port)) as up:
        assert up.port == port and len(up.routable) == 2, up.output
        envoys = up.envoy_pids()
        assert len(envoys) == 1, up.output

        models = _http(f"{up.url}/models")
        assert models.status_code == 200
        assert [m["id"] for m in models.json()["data"]] == ["sim-model"]

        seen = set()
        for i in range(4):
            r = _complete(up.url, f"hello {i}")
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"]
            assert r.headers["x-kvswitch-endpoint"] in up.routable, (r.headers, up.routable)
            seen.add(r.headers["x-kvswitch-endpoint"])
        assert seen

        bad = _http(f"{up.url}/completions", {"model": "sim-model"})
        assert bad.status_code == 400 and "error" in bad.json()

        t0 = time.monotonic()
        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(10) == 0, up.output
        assert time.monotonic() - t0 < 8
        assert not any(_alive(pid) for pid in envoys)
        assert _port_free(up.port) and _port_free(up.admin_port)
        assert "kvswitch: stopped" in up.output


def test_up_with_pickers_runs_each_in_its_own_process_health_checked_by_envoy():
    """--pickers 2: two `kvswitch serve` processes (not two servers on one loop), both listed and health-checked
    by Envoy and both taking requests; one killed is taken out and the other serves; SIGTERM stops them all."""
    with kvswitch_up("--pods", "2", "--pickers", "2", "--port", "0", timeout=90) as up:
        pickers = _picker_children(up.proc.pid)
        assert len(pickers) == 2, up.output
        for cluster in (DECIDE_CLUSTER, PICKER_CLUSTER):  # decisions, and the access log on the gRPC ports
            hosts = _picker_hosts(up.admin_port, cluster)
            assert len(hosts) == 2 and all(h["health_flags"] == "healthy" for h in hosts.values()), (cluster, hosts)
        for i in range(12):
            r = _complete(up.url, f"replica question {i}")
            assert r.status_code == 200, r.text
        hosts = _picker_hosts(up.admin_port)
        assert all(int(h["rq_total"]) > 0 for h in hosts.values()), hosts  # Envoy balances over both

        os.kill(pickers[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not any(h["health_flags"] != "healthy" for h in _picker_hosts(up.admin_port).values()):
            assert time.monotonic() < deadline, _picker_hosts(up.admin_port)
            time.sleep(0.1)
        for i in range(6):
            r = _complete(up.url, f"after the kill {i}")
            assert r.status_code == 200, r.text

        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(30) == 0, up.output
        assert not any(_alive(pid) for pid in pickers)


def test_up_refuses_a_busy_port_with_a_clear_message():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "extproc.cli", "up", "--pods", "1", "--port", str(port)],
                              cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert f"port {port} is in use" in proc.stderr


def test_up_pd_fronts_decode_pods_with_sidecars():
    with kvswitch_up("--pd", "1:1", "--port", "0") as up:
        decode = {a for a, name in up.routable.items() if name.startswith("decode")}
        assert len(decode) == 1 and "via sidecar" in up.output, up.output
        r = _complete(up.url, "short prompt")
        assert r.status_code == 200, r.text
        assert r.headers["x-kvswitch-endpoint"] in decode

        long = _complete(up.url, "a long shared document " * 600)
        assert long.status_code == 200, long.text
        assert long.headers["x-kvswitch-endpoint"] in decode
        prefill = {a for a, name in up.routable.items() if name.startswith("prefill")}
        assert long.headers.get("x-kvswitch-prefill-endpoint") in prefill, long.headers

        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(10) == 0, up.output


def test_demo_runs_a_workload_and_prints_the_summary():
    proc = subprocess.run([sys.executable, "-m", "extproc.cli", "demo", "--requests", "20", "--rate", "6",
                           "--pods", "2"], cwd=REPO, capture_output=True, text=True, timeout=90)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    for section in ("== workload ==", "== latency", "== prefix cache", "== requests per pod", "== picker"):
        assert section in out, out
    assert "20 requests" in out and "errors 0" in out
    assert re.search(r"TTFT\s+p50\s+[\d,]+ ms", out), out
    assert re.search(r"hit rate\s+\d+\.\d%", out), out
    assert re.search(r"decisions\s+routed 20\b", out), out
    assert "stack stopped." in out


async def test_localstack_api_serves_and_stops():
    import aiohttp

    from extproc.localstack import LocalStack, StackOptions

    stack = LocalStack(StackOptions(pods=2, port=0, time_scale=0.2))
    async with stack:
        assert stack.url.endswith("/v1") and len(stack.pods) == 2
        assert all(p.kv_events and p.kv_events.startswith("tcp://127.0.0.1:") for p in stack.pods)
        workdir = stack.workdir
        assert workdir is not None and (workdir / "envoy.yaml").exists()
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{stack.url}/chat/completions", json={
                    "model": "sim-model", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}) as r:
                assert r.status == 200
                assert r.headers["x-kvswitch-endpoint"] in {p.address for p in stack.pods}
        envoy_pid = stack.envoy.pid
        port = stack.port
    assert envoy_pid is not None and not _alive(envoy_pid)
    assert not workdir.exists() and _port_free(port)
    await stack.stop()  # a second stop is a no-op


@pytest.mark.parametrize("named", [False, True])
async def test_up_loses_its_listen_port_before_envoy_binds_it(named: bool):
    """`kvswitch up` picks its listen port before the pods and the picker start, and Envoy binds it only after:
    another process on this shared machine may take it in between. A picked port is picked again and the
    stack's URL follows it; a port the operator named (``--port``) is kept, and its clash fails the start
    with Envoy's log and stops everything the start began."""
    import aiohttp

    from extproc.localstack import LocalStack, StackOptions

    stack = LocalStack(StackOptions(pods=1, port=free_port() if named else 0, time_scale=0.2))
    start_picker = stack._start_picker
    taker = socket.socket()
    workdirs: list[Path] = []

    async def start_picker_then_lose_the_port() -> None:
        await start_picker()
        assert stack.workdir is not None
        workdirs.append(stack.workdir)
        taker.bind(("127.0.0.1", stack.port))  # as another process would, between the pick and Envoy's bind
        taker.listen()

    stack._start_picker = start_picker_then_lose_the_port  # type: ignore[method-assign]
    with taker:
        try:
            if named:
                port = stack.options.port
                with pytest.raises(RuntimeError, match="Address already in use"):
                    await stack.start()
                assert stack.port == port and workdirs and not workdirs[0].exists()
                # nothing the start began outlives it: the pods were up (the picker had started) and are gone
                assert stack.pods and all(_port_free(int(p.address.rsplit(":", 1)[1])) for p in stack.pods)
                return
            await stack.start()
            lost = taker.getsockname()[1]
            assert stack.port != lost and stack.url == f"http://127.0.0.1:{stack.port}/v1"
            async with aiohttp.ClientSession() as s, s.get(f"{stack.url}/models") as r:
                assert r.status == 200
        finally:
            await stack.stop()  # idempotent; a start that should have failed but did not leaves nothing running


async def test_access_log_mode_learns_prefill_ends_from_the_pods_kv_events(tmp_path):
    """Through real Envoy (access-log mode: no first token while a request runs), ZMQ KV events from the
    simulated pods end each watched prefill in the picker's accounting (pickers/kvblocks/prefill_watch.py;
    opt-in: ``scheduler.prefill_end_from_kv_events``)."""
    import aiohttp

    from extproc.localstack import LocalStack, StackOptions

    cfg = tmp_path / "picker.yaml"
    cfg.write_text("scheduler: {prefill_end_from_kv_events: true}\n")

    def ends(director, source: str) -> float:
        return sum(s.value for m in director.stats.prefill_ends.collect() for s in m.samples
                   if s.name.endswith("_total") and s.labels.get("source") == source)

    async with LocalStack(StackOptions(pods=2, port=0, time_scale=0.2, config_file=str(cfg))) as stack:
        director = stack.server.scheduler
        before = ends(director, "kv_event")
        async with aiohttp.ClientSession() as s:
            for i in range(8):  # distinct long prompts: new full blocks on whichever pod computes them
                body = {"model": "sim-model", "max_tokens": 4, "prompt": f"document {i}: " + "lorem ipsum " * 200}
                async with s.post(f"{stack.url}/completions", json=body) as r:
                    assert r.status == 200, await r.text()
                    await r.read()
        assert ends(director, "kv_event") > before
        for _ in range(200):  # each request's end comes with Envoy's access-log entry, just after its response
            if not director.dl.inflight.requests.any():
                break
            await asyncio.sleep(0.01)
        assert not director.dl.inflight.requests.any()
        assert len(director.dl.kv_index.prefill_watch) == 0  # no watch outlives its request
