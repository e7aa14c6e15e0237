"""Big bodies vs the picker's event loop (issue 14, "Why" 6): small-request and gRPC health-check latency while
30 bodies of 8 MB arrive at concurrency 3, through real Envoy, a ``kvswitch serve`` process and simulated pods
(each in its own process, so nothing here shares the measuring client's event loop).

    .venv/bin/python -m e2e.bench.bigbody                       # this checkout's picker
    .venv/bin/python -m e2e.bench.bigbody --picker-repo /tmp/old  # another checkout's picker (before/after)

Prints p50/p99/max of small-request latency and of the picker's gRPC health check (``Check`` on the ext_proc
service every 20 ms), first with no big bodies (quiet) then while they arrive (loaded); the big bodies'
statuses (a 400 context_length_exceeded from the picker, or from a pod, is expected: the prompt is far past the
context; a 5xx is a failure of the gateway path); small requests that failed; the picker's peak RSS.

To show where a small request's time goes, three small-request loops run side by side: through Envoy and the
picker (the real path), through the same Envoy on a route without ext_proc (``envoy alone``: a bench-only route
picked by an ``x-bench-bypass`` header, spliced into the generated config), and straight to a pod (``pod
alone``). The picker's own view comes from its metrics: the event loop's lag (``kvswitch_event_loop_lag_seconds``,
a timer every 20 ms inside the picker) and its decision time; and the CPU each process used (cores, from
/proc/PID/stat) beside the whole machine's busy share, so CPU saturation and a stalled picker read differently.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import grpc
import orjson
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

import extproc.localstack.envoy as envoy_child
from e2e.support.envoy import EnvoyProcess
from e2e.support.picker import wait_grpc_health
from e2e.support.ports import free_port
from extproc.contextcap import context_cap_bytes
from extproc.envoyconfig.builder import EnvoyConfigOptions, listener_hcm, to_dict

REPO = Path(__file__).resolve().parents[2]
MODEL = "sim-model"
EXT_PROC = "envoy.service.ext_proc.v3.ExternalProcessor"
BYPASS = "x-bench-bypass"  # the bench-only route past the picker (see render_with_bypass)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def render_with_bypass(opts: EnvoyConfigOptions, fmt: str = "yaml") -> str:
    """The generated bootstrap plus one route first: POST /v1/completions with an ``x-bench-bypass`` header goes
    to the pool like the API route but with ext_proc off (round robin), to time Envoy without the picker."""
    doc = to_dict(opts)
    hcm = listener_hcm(doc)
    routes = hcm["routeConfig"]["virtualHosts"][0]["routes"]
    api = next(r for r in routes if r.get("name") == "POST /v1/completions")
    bypass = copy.deepcopy(api)
    bypass.pop("typedPerFilterConfig", None)
    bypass["name"] = "bench bypass"
    bypass["match"]["headers"] = [*bypass["match"].get("headers", []), {"name": BYPASS, "presentMatch": True}]
    routes.insert(0, bypass)
    return yaml.safe_dump(doc, sort_keys=False)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (threads included)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot, every process on the machine included."""
    with open("/proc/stat", encoding="ascii") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + vals[4]
    return float(sum(vals) - idle), float(sum(vals))


async def scrape(s: aiohttp.ClientSession, url: str) -> dict[str, dict[str, float]]:
    """Histogram buckets (le -> cumulative count) and _sum/_count of the picker's lag and decision metrics."""
    async with s.get(url) as r:
        text = await r.text()
    out: dict[str, dict[str, float]] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name not in ("kvswitch_event_loop_lag_seconds", "kvswitch_decision_seconds"):
            continue
        d = out.setdefault(fam.name, {})
        for smp in fam.samples:
            if smp.name.endswith("_bucket"):
                d[smp.labels["le"]] = smp.value
            elif smp.name.endswith("_count"):
                d["count"] = smp.value
            elif smp.name.endswith("_sum"):
                d["sum"] = smp.value
    return out


def hist_delta(before: dict[str, float], after: dict[str, float]) -> str:
    """p50/p99 (upper bucket bounds), mean and the share above 100 ms of the observations between two scrapes."""
    n = after.get("count", 0) - before.get("count", 0)
    if n <= 0:
        return "n=0"
    bounds = sorted(((float(le), after[le] - before.get(le, 0)) for le in after if le not in ("count", "sum")),
                    key=lambda b: b[0])

    def q(frac: float) -> str:
        for le, c in bounds:
            if c >= frac * n:
                return f"<={le * 1000:g}ms" if le != float("inf") else f">{bounds[-2][0] * 1000:g}ms"
        return "?"

    over = n - next((c for le, c in bounds if le == 0.1), n)
    mean = (after.get("sum", 0) - before.get("sum", 0)) / n
    return f"n={n:.0f} p50{q(0.5)} p99{q(0.99)} mean={mean * 1000:.1f}ms >100ms={over / n:.1%}"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def summary(name: str, ms: list[float]) -> str:
    return (f"{name}: n={len(ms)} p50={pct(ms, 0.5):.1f}ms p99={pct(ms, 0.99):.1f}ms "
            f"max={max(ms) if ms else float('nan'):.1f}ms")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


async def _start(cmd: list[str], cwd: Path, env: dict[str, str], ready: str, log: Path) -> subprocess.Popen:
    out = open(log, "wb")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while ready not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{cmd[:4]} did not start:\n{log.read_text(errors='replace')[-2000:]}")
        await asyncio.sleep(0.1)
    return proc


async def small_loop(s: aiohttp.ClientSession, url: str, stop: asyncio.Event, ms: list[float],
                     failed: list[int], headers: dict[str, str] | None = None) -> None:
    body = {"model": MODEL, "prompt": "a short question", "max_tokens": 1}
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            async with s.post(url + "/v1/completions", json=body, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    failed.append(r.status)
        except aiohttp.ClientError:
            failed.append(0)
        ms.append((time.perf_counter() - t0) * 1000)
        await asyncio.sleep(0.02)


async def health_loop(address: str, stop: asyncio.Event, ms: list[float], not_serving: list[int]) -> None:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                r = await stub.Check(health_pb2.HealthCheckRequest(service=EXT_PROC), timeout=5)
                if r.status != health_pb2.HealthCheckResponse.SERVING:
                    not_serving.append(1)
            except grpc.aio.AioRpcError:
                not_serving.append(1)
            ms.append((time.perf_counter() - t0) * 1000)
            await asyncio.sleep(0.02)


async def big_body(s: aiohttp.ClientSession, url: str, i: int, tail: bytes, sem: asyncio.Semaphore,
                   statuses: list[int], total: int) -> None:
    body = b'{"model": "%s", "max_tokens": 1, "prompt": "%08d ' % (MODEL.encode(), i) + tail  # one memcpy
    async with sem:
        try:
            async with s.post(url + "/v1/completions", data=body, headers={"content-type": "application/json"},
                              timeout=aiohttp.ClientTimeout(total=300)) as r:
                await r.read()
                statuses.append(r.status)
        except aiohttp.ClientError:
            statuses.append(0)
        if len(statuses) % 10 == 0:
            print(f"[bigbody] {len(statuses)}/{total} done (last status {statuses[-1]})", flush=True)


async def send_waves(url: str, bodies: int, body_mb: int, concurrency: int, min_s: float) -> list[int]:
    """Waves of ``bodies`` big bodies at ``concurrency`` until at least ``min_s`` seconds passed (one wave at
    least); the statuses. Runs in its own process (``--sender``), so building and writing 8 MB bodies does not
    stall the measuring loops."""
    text = ("lorem ipsum dolor sit amet " * (body_mb * 1_000_000 // 27 + 1))[: body_mb * 1_000_000 - 60]
    tail = text.encode() + b'"}'
    statuses: list[int] = []
    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as s:
        wave = 0
        while wave == 0 or time.perf_counter() - t0 < min_s:
            sem = asyncio.Semaphore(concurrency)
            await asyncio.gather(*(big_body(s, url, wave * bodies + i, tail, sem, statuses, bodies * (wave + 1))
                                   for i in range(bodies)))
            wave += 1
    return statuses


async def run_sender(url: str, args: argparse.Namespace) -> list[int]:
    """The big-body sender as a child process (``--sender URL``); its statuses from its last output line."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "e2e.bench.bigbody", "--sender", url, "--bodies", str(args.bodies),
        "--body-mb", str(args.body_mb), "--concurrency", str(args.concurrency), "--min-loaded-s",
        str(args.min_loaded_s), cwd=REPO, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    last = b""
    async for line in proc.stdout:
        if line.startswith(b"STATUSES "):
            last = line
        else:
            print(line.decode().rstrip(), flush=True)
    if await proc.wait() != 0 or not last:
        raise RuntimeError("the big-body sender failed")
    return list(orjson.loads(last[len(b"STATUSES "):]))


async def rss_loop(pid: int, stop: asyncio.Event, peak: list[float]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], rss_mib(pid))
        await asyncio.sleep(0.1)


async def run(args: argparse.Namespace) -> None:
    tmp = Path(args.out)
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    picker_repo = Path(args.picker_repo).resolve()
    env_picker = {**env, "PYTHONPATH": str(picker_repo)}
    procs: list[subprocess.Popen] = []
    try:
        pods = []
        for i in range(3):
            port = free_port()
            procs.append(await _start([sys.executable, "-m", "engine.sim", "--pods", "1", "--base-port", str(port),
                                       "--no-kv-events", "--model-name", MODEL, "--time-scale", "0.02"],
                                      REPO, env, "ready", tmp / f"pod{i}.log"))
            pods.append(f"127.0.0.1:{port}")
        gport = free_port()
        mport = free_port()
        metrics_url = f"http://127.0.0.1:{mport}/metrics"
        picker = subprocess.Popen(
            [sys.executable, "-m", "extproc.cli", "serve", "--host", "127.0.0.1", "--port", str(gport),
             "--metrics-port", str(mport), "--decide-port", "-1", "--response-body", args.response_body,
             *[a for p in pods for a in ("--endpoint", p)]],
            cwd=picker_repo, env=env_picker, stdout=open(tmp / "picker.log", "wb"), stderr=subprocess.STDOUT)
        procs.append(picker)
        await wait_grpc_health(f"127.0.0.1:{gport}", timeout=60)
        cap = context_cap_bytes(None, ["llama-3.1-8b"]) if args.envoy_cap else None  # the sim pods' profile
        opts = EnvoyConfigOptions(picker=f"127.0.0.1:{gport}", endpoints=pods, max_body_bytes=cap,
                                  response_body=args.response_body)
        envoy_child.render = render_with_bypass  # bench-only: the extra route past the picker
        async with EnvoyProcess(opts) as envoy, aiohttp.ClientSession() as s:
            results = {}
            splits = {}
            for phase in ("quiet", "loaded"):
                stop = asyncio.Event()
                small: list[float] = []
                small_failed: list[int] = []
                alone: list[float] = []
                alone_failed: list[int] = []
                pod: list[float] = []
                pod_failed: list[int] = []
                health: list[float] = []
                not_serving: list[int] = []
                peak = [0.0]
                watched = {"picker": [picker.pid], "envoy": [envoy.child.pid or 0],
                           "pods": [p.pid for p in procs if p is not picker], "bench client": [os.getpid()]}
                m0 = await scrape(s, metrics_url)
                cpu0 = {k: sum(cpu_seconds(p) for p in pids) for k, pids in watched.items()}
                busy0, t0_all = machine_busy()
                w0 = time.perf_counter()
                bg = [asyncio.create_task(small_loop(s, envoy.url, stop, small, small_failed)),
                      asyncio.create_task(small_loop(s, envoy.url, stop, alone, alone_failed, {BYPASS: "1"})),
                      asyncio.create_task(small_loop(s, f"http://{pods[0]}", stop, pod, pod_failed)),
                      asyncio.create_task(health_loop(f"127.0.0.1:{gport}", stop, health, not_serving)),
                      asyncio.create_task(rss_loop(picker.pid, stop, peak))]
                statuses: list[int] = []
                if phase == "quiet":
                    await asyncio.sleep(args.quiet_s)
                else:
                    statuses = await run_sender(envoy.url, args)
                stop.set()
                await asyncio.gather(*bg)
                wall = time.perf_counter() - w0
                busy1, t1_all = machine_busy()
                cpu = {k: (sum(cpu_seconds(p) for p in pids) - cpu0[k]) / wall for k, pids in watched.items()}
                m1 = await scrape(s, metrics_url)
                lag = hist_delta(m0.get("kvswitch_event_loop_lag_seconds", {}),
                                 m1.get("kvswitch_event_loop_lag_seconds", {}))
                decision = hist_delta(m0.get("kvswitch_decision_seconds", {}), m1.get("kvswitch_decision_seconds", {}))
                cores = " ".join(f"{k}={v:.2f}" for k, v in cpu.items())
                busy = (busy1 - busy0) / max(1.0, t1_all - t0_all)
                splits[phase] = [
                    f"[{phase}] {summary('  envoy alone (no picker)', alone)} failed={len(alone_failed)}",
                    f"[{phase}] {summary('  pod alone (direct)', pod)} failed={len(pod_failed)}",
                    f"[{phase}] picker event-loop lag: {lag}",
                    f"[{phase}] picker decision time: {decision}",
                    f"[{phase}] CPU cores used over {wall:.1f}s: {cores}; whole machine busy {busy:.0%} of "
                    f"{os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f}",
                ]
                results[phase] = (small, small_failed, health, not_serving, peak[0], statuses)
            print(f"\n== picker from {picker_repo}, Envoy content-length cap {cap}, response body "
                  f"{args.response_body} | load: {os.getloadavg()}")
            for phase, (small, small_failed, health, not_serving, peak, statuses) in results.items():
                print(f"[{phase}] {summary('small requests', small)} failed={len(small_failed)} {small_failed[:5]}")
                for line in splits[phase]:
                    print(line)
                print(f"[{phase}] {summary('grpc health', health)} not_serving_or_error={len(not_serving)}")
                print(f"[{phase}] picker peak RSS {peak:.0f} MiB")
                if statuses:
                    hist: dict[int, int] = {}
                    for st in statuses:
                        hist[st] = hist.get(st, 0) + 1
                    print(f"[{phase}] big bodies by status: {dict(sorted(hist.items()))}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_bigbody", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--picker-repo", default=str(REPO), help="checkout whose picker to run (before/after)")
    p.add_argument("--bodies", type=int, default=30)
    p.add_argument("--body-mb", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=3)
    p.add_argument("--quiet-s", type=float, default=5.0)
    p.add_argument("--min-loaded-s", type=float, default=20.0,
                   help="repeat the wave of bodies until the loaded phase lasted this long (enough samples for a "
                        "p99 when the gateway refuses big bodies fast)")
    p.add_argument("--response-body", default="observe",
                   help="the picker's and Envoy's response mode (observe: what pickers before access-log support)")
    p.add_argument("--no-envoy-cap", dest="envoy_cap", action="store_false",
                   help="leave out Envoy's content-length cap (max_body_bytes): the picker alone refuses big bodies")
    p.add_argument("--out", default="/tmp/kvswitch-bigbody")
    p.add_argument("--sender", metavar="URL", help=argparse.SUPPRESS)  # internal: the big-body sender process
    a = p.parse_args(argv)
    if a.sender:
        statuses = asyncio.run(send_waves(a.sender, a.bodies, a.body_mb, a.concurrency, a.min_loaded_s))
        print("STATUSES " + orjson.dumps(statuses).decode(), flush=True)
        return 0
    print(f"uptime load: {os.getloadavg()}", flush=True)
    asyncio.run(run(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
