"""Picker replicas vs one picker on a shared-prefix workload (issue 14, item 6): prefix hit rate (cached prompt
tokens / prompt tokens, from the pods' own usage reports) and load spread (coefficient of variation of
requests per pod): simulated pods publishing KV events (one ``engine.sim`` process), N ``kvswitch serve``
processes each subscribed to every pod, one Envoy listing them all; the client is the demo's workload.

    .venv/bin/python -m e2e.bench.replicas --requests 240 --replicas 1 3

Each N runs the same seeded workload on a fresh stack (fresh caches), one after the other.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from e2e.support.envoy import EnvoyProcess
from e2e.support.picker import picker_process
from e2e.support.ports import free_ports
from engine.tokens.tokenizer import load_tokenizer
from extproc.envoyconfig.builder import EnvoyConfigOptions
from extproc.localstack.workload import WorkloadSpec, build_workload, run_workload

REPO = Path(__file__).resolve().parents[2]
MODEL = "sim-model"


async def _pods(n: int, time_scale: float, log: Path) -> tuple[subprocess.Popen, list[tuple[str, str]]]:
    """``engine.sim`` with n pods publishing KV events, in its own process: [(address, kv_events)]."""
    out = open(log, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "engine.sim", "--pods", str(n), "--base-port", "0",
                             "--kv-events-base-port", "0", "--time-scale", str(time_scale), "--seed", "1",
                             "--model-name", MODEL], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while "ready" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(log.read_text(errors="replace")[-2000:])
        await asyncio.sleep(0.1)
    pods = re.findall(r"http://(\S+) .*kv_events=(\S+)", log.read_text())
    return proc, pods


async def one(n: int, spec: WorkloadSpec, pods_n: int, time_scale: float, tmp: Path) -> dict[str, object]:
    """A fresh fleet (empty caches), n ``kvswitch serve`` processes, Envoy; the seeded workload once."""
    wl = build_workload(spec, load_tokenizer(None))
    sim, pods = await _pods(pods_n, time_scale, tmp / f"sim-{n}.log")
    try:
        args = [a for addr, kv in pods for a in ("--endpoint", f"{addr},kv_events={kv}")]
        args += ["--metrics-port", "-1", "--debug-headers"]
        ports = free_ports(n)
        async with contextlib.AsyncExitStack() as stack:
            for i, port in enumerate(ports):
                await stack.enter_async_context(picker_process(args, port, tmp / f"picker-{n}-{i}.log"))
            opts = EnvoyConfigOptions(picker=f"127.0.0.1:{ports[0]}", pickers=[f"127.0.0.1:{p}" for p in ports[1:]],
                                      endpoints=[addr for addr, _ in pods])
            envoy = await stack.enter_async_context(EnvoyProcess(opts))
            await run_workload(envoy.url + "/v1", MODEL, wl, progress=False)
    finally:
        sim.terminate()
        sim.wait(10)
    ok = [r for r in wl.results if not r.error]
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    cached = sum(r.cached_tokens or 0 for r in ok)
    per_pod: dict[str, int] = {}
    for r in ok:
        if r.endpoint:
            per_pod[r.endpoint] = per_pod.get(r.endpoint, 0) + 1
    counts = list(per_pod.values()) + [0] * (pods_n - len(per_pod))
    cv = statistics.pstdev(counts) / statistics.mean(counts) if counts and statistics.mean(counts) else 0.0
    errors: dict[str, int] = {}
    for r in wl.results:
        if r.error:
            errors[r.error[:300]] = errors.get(r.error[:300], 0) + 1
    if errors:
        print(f"[replicas] errors with {n} picker(s): {errors}", flush=True)
    return {"pickers": n, "requests": len(wl.results), "failed": len(wl.results) - len(ok),
            "hit_rate": cached / prompt if prompt else 0.0, "load_cv": cv, "per_pod": sorted(counts)}


async def main_async(a: argparse.Namespace) -> None:
    spec = WorkloadSpec(requests=a.requests, groups=a.groups, system_tokens=a.system_tokens, rate=a.rate,
                        concurrency=a.concurrency, seed=7)
    rows = []
    for n in a.replicas:
        print(f"[replicas] running {a.requests} requests with {n} picker(s)... load {os.getloadavg()}", flush=True)
        rows.append(await one(n, spec, a.pods, a.time_scale, Path(tempfile.mkdtemp(prefix="kvswitch-replicas-"))))
        print(f"[replicas] {rows[-1]}", flush=True)
    base = rows[0]["hit_rate"]
    print("\npickers  requests  failed  hit_rate  vs_first  load_cv  requests_per_pod")
    for r in rows:
        ratio = r["hit_rate"] / base if base else float("nan")
        print(f"{r['pickers']:>7}  {r['requests']:>8}  {r['failed']:>6}  {r['hit_rate']:>8.3f}  {ratio:>8.3f}  "
              f"{r['load_cv']:>7.3f}  {r['per_pod']}")
    print(f"uptime load after: {os.getloadavg()}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_replicas", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 3])
    p.add_argument("--requests", type=int, default=240)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--system-tokens", type=int, default=2048)
    p.add_argument("--rate", type=float, default=8.0)
    p.add_argument("--concurrency", type=int, default=15)
    p.add_argument("--pods", type=int, default=4)
    p.add_argument("--time-scale", type=float, default=0.2)
    asyncio.run(main_async(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
