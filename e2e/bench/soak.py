"""Soak: a steady request rate through real Envoy and a ``kvswitch serve`` picker process over simulated pods,
for a long time, sampling the picker's resident memory; prints progress and the RSS slope (issue 14).

    .venv/bin/python -m e2e.bench.soak --minutes 30 --rate 20 --out /tmp/soak

Every ``--sample-s`` seconds a line: elapsed, requests ok/failed, picker RSS (MiB). At the end: the RSS slope
(least squares over the second half of the run, MiB per minute, after warm-up), the failures, and a CSV and a
plot under ``--out``. A mix of prompts (shared prefixes, unique tails, some streaming) keeps every index and
tracker busy; the load is open-loop (a fixed schedule), so a slow picker shows as latency, not as less load.

``--tracemalloc`` runs the picker under ``e2e.bench.traced_picker`` and takes heap snapshots at a quarter, half and
the end of the run; it prints what grew between the first and the last (by allocation site, with the traceback),
to find a leak. Its RSS is tracemalloc's too: quote slopes from a run without it.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import random
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import aiohttp

from e2e.conftest import SIM_MODEL
from e2e.support.envoy import EnvoyProcess
from e2e.support.picker import REPO, picker_process
from e2e.support.ports import free_port
from extproc.envoyconfig.builder import EnvoyConfigOptions


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) points, in MiB per minute."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    return 60.0 * sum((t - mx) * (v - my) for t, v in points) / var


async def _one(s: aiohttp.ClientSession, url: str, rng: random.Random, counts: dict[str, int],
               reasons: dict[str, int]) -> None:
    prefix = f"system prompt number {rng.randrange(8)} " * 40
    body = {"model": SIM_MODEL, "prompt": prefix + f"question {rng.random()}", "max_tokens": rng.randint(4, 32),
            "stream": rng.random() < 0.5}
    reason = ""
    try:
        async with s.post(url + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=60)) as r:
            await r.read()
            if r.status != 200:
                reason = f"HTTP {r.status}"
    except TimeoutError:
        reason = "client timeout (60 s)"
    except aiohttp.ClientError as exc:
        reason = type(exc).__name__
    counts["failed" if reason else "ok"] += 1
    if reason:
        reasons[reason] = reasons.get(reason, 0) + 1


async def take_snapshot(proc: subprocess.Popen, snapshots: Path, index: int) -> Path:
    """Ask the traced picker for heap snapshot ``index`` and wait (bounded) until it is written."""
    path = snapshots / f"snapshot-{index:03d}.tracemalloc"
    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 60
    while not path.with_suffix(".done").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"picker wrote no snapshot {path}")
        await asyncio.sleep(0.1)
    return path


def growth_report(first: Path, last: Path, top: int = 12) -> list[str]:
    """What grew between two snapshots, by allocation site (bytes, count), with the innermost project frames."""
    old = tracemalloc.Snapshot.load(str(first))
    new = tracemalloc.Snapshot.load(str(last))
    filters = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib*")]
    stats = new.filter_traces(filters).compare_to(old.filter_traces(filters), "traceback")
    total = sum(s.size_diff for s in stats)
    lines = [f"heap growth {first.name} -> {last.name}: {total / 1024:+.1f} KiB in all; top sites:"]
    for st in sorted(stats, key=lambda s: s.size_diff, reverse=True)[:top]:
        lines.append(f"  {st.size_diff / 1024:+9.1f} KiB {st.count_diff:+7d} blocks (now {st.size / 1024:.1f} KiB)")
        frames = [f for f in st.traceback if "site-packages" not in f.filename] or list(st.traceback)
        for f in frames[-4:]:
            lines.append(f"      {f.filename.replace(str(REPO) + '/', '')}:{f.lineno}")
    return lines


async def soak(minutes: float, rate: float, sample_s: float, out: Path, pods: int,
               trace: bool = False) -> dict[str, float]:
    from engine.sim.fleet import PodSpec, SimFleet

    out.mkdir(parents=True, exist_ok=True)
    specs = [PodSpec(name=f"pod-{i}", port=0, kv_events_port=None, model_name=SIM_MODEL) for i in range(pods)]
    port = free_port()
    snapshots = out / "snapshots"
    if trace:
        for old in snapshots.glob("snapshot-*"):
            old.unlink()
    snapshot_at = [minutes * 60 * f for f in (0.25, 0.5)] if trace else []
    snapshot_paths: list[Path] = []
    load_samples: list[float] = []
    async with SimFleet(specs, time_scale=0.05) as fleet:
        args = [a for p in fleet.pods for a in ("--endpoint", p.address)] + ["--metrics-port", "-1"]
        # under tracemalloc (e2e.bench.traced_picker) when tracing, else the plain CLI
        launcher = ("-m", "e2e.bench.traced_picker", str(snapshots)) if trace else ("-m", "extproc.cli")
        starter = picker_process(args, port, out / "picker.log", ready_timeout=120, launcher=launcher)
        async with starter as proc:
            opts = EnvoyConfigOptions(picker=f"127.0.0.1:{port}", endpoints=[p.address for p in fleet.pods])
            async with EnvoyProcess(opts) as envoy, aiohttp.ClientSession() as s:
                rng = random.Random(14)
                counts = {"ok": 0, "failed": 0}
                reasons: dict[str, int] = {}
                samples: list[tuple[float, float]] = []
                tasks: set[asyncio.Task] = set()
                t0 = time.perf_counter()
                end = t0 + minutes * 60
                next_sample = t0
                i = 0
                while time.perf_counter() < end:
                    now = time.perf_counter()
                    if now >= next_sample:
                        samples.append((now - t0, rss_mib(proc.pid)))
                        load_samples.append(os.getloadavg()[0])
                        print(f"[soak] {now - t0:7.0f}s ok={counts['ok']} failed={counts['failed']} "
                              f"in_flight={len(tasks)} picker_rss={samples[-1][1]:.1f}MiB "
                              f"load={load_samples[-1]:.1f}", flush=True)
                        next_sample += sample_s
                    if snapshot_at and now - t0 >= snapshot_at[0]:
                        snapshot_at.pop(0)
                        snapshot_paths.append(await take_snapshot(proc, snapshots, len(snapshot_paths)))
                    t = asyncio.create_task(_one(s, envoy.url, rng, counts, reasons))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                    i += 1
                    await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
                await asyncio.gather(*tasks)
                samples.append((time.perf_counter() - t0, rss_mib(proc.pid)))
                if trace:
                    snapshot_paths.append(await take_snapshot(proc, snapshots, len(snapshot_paths)))
    if len(snapshot_paths) >= 2:
        for line in growth_report(snapshot_paths[0], snapshot_paths[-1]):
            print(line)
        if len(snapshot_paths) >= 3:
            print("-- second half only:")
            for line in growth_report(snapshot_paths[1], snapshot_paths[-1], top=6):
                print(line)
    if reasons:
        print(f"failures by reason: {dict(sorted(reasons.items(), key=lambda kv: -kv[1]))}")
    half = [p for p in samples if p[0] >= samples[-1][0] / 2]
    result = {"seconds": samples[-1][0], "requests_ok": counts["ok"], "requests_failed": counts["failed"],
              "rss_start_mib": samples[0][1], "rss_end_mib": samples[-1][1],
              "rss_slope_mib_per_min_second_half": slope_per_minute(half),
              "rss_slope_mib_per_min_all": slope_per_minute(samples),
              "load_min": min(load_samples, default=float("nan")),
              "load_mean": sum(load_samples) / max(1, len(load_samples)),
              "load_max": max(load_samples, default=float("nan"))}
    with open(out / "soak_rss.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seconds", "rss_mib"])
        w.writerows(samples)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot([t / 60 for t, _ in samples], [v for _, v in samples], marker=".")
        ax.set_xlabel("minutes")
        ax.set_ylabel("picker RSS (MiB)")
        ax.set_title(f"soak at {rate:g} req/s: slope {result['rss_slope_mib_per_min_second_half']:.3f} MiB/min "
                     "(second half)")
        fig.tight_layout()
        fig.savefig(out / "soak_rss.png", dpi=100)
    except ImportError:
        pass
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--rate", type=float, default=20.0, help="requests per second (open loop)")
    p.add_argument("--sample-s", type=float, default=10.0)
    p.add_argument("--pods", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("/tmp/kvswitch-soak"))
    p.add_argument("--tracemalloc", action="store_true",
                   help="picker under tracemalloc; print the heap growth by allocation site (diagnosis only)")
    a = p.parse_args(argv)
    result = asyncio.run(soak(a.minutes, a.rate, a.sample_s, a.out, a.pods, a.tracemalloc))
    for k, v in result.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    return 1 if result["requests_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
