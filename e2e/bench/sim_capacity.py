"""How many simulated pods and streamed tokens/s one core sustains in real time (time scale 1).

    .venv/bin/python -m e2e.bench.sim_capacity --pods 1 4 16 --clients-per-pod 16 --seconds 10

The fleet runs in this process (one event loop, one core); closed-loop streaming clients run in a
separate process (aiohttp, one loop). For each pod count it prints the streamed tokens/s the clients
saw, the same figure the cost model would allow (tokens the pods' simulated clocks account for), and
the lag: how far the pods' simulated clocks fell behind wall time (0 when the simulator keeps up).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import time

import aiohttp


def _client_proc(addresses: list[str], clients_per_pod: int, seconds: float, prompt_tokens: int,
                 max_tokens: int, out: mp.Queue) -> None:
    async def run() -> tuple[int, int, int]:
        stop = time.monotonic() + seconds
        tokens = requests = errors = 0
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as s:
            async def one(addr: str, k: int) -> None:
                nonlocal tokens, requests, errors
                i = 0
                while time.monotonic() < stop:
                    i += 1
                    # distinct prompts with a shared prefix per client, so the cache sees hits and misses
                    prompt = [1 + (k * 7919 + j) % 30000 for j in range(prompt_tokens // 2)]
                    prompt += [1 + (i * 104729 + j) % 30000 for j in range(prompt_tokens - len(prompt))]
                    body = {"model": "sim-model", "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                            "ignore_eos": True}
                    try:
                        async with s.post(f"http://{addr}/v1/completions", json=body) as r:
                            async for line in r.content:
                                if line.startswith(b"data: {"):
                                    tokens += 1
                        requests += 1
                    except aiohttp.ClientError:
                        errors += 1

            await asyncio.gather(*(one(a, k) for a in addresses for k in range(clients_per_pod)))
        return tokens, requests, errors

    out.put(asyncio.run(run()))


async def _measure(pods: int, clients_per_pod: int, seconds: float, prompt_tokens: int, max_tokens: int) -> dict:
    from engine.sim.fleet import SimFleet
    from engine.sim.spec import PodSpec

    specs = [PodSpec(name=f"pod-{i}", kv_events_port=0) for i in range(pods)]
    async with SimFleet(specs, time_scale=1.0) as fleet:
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        proc = ctx.Process(
            target=_client_proc,
            args=([p.address for p in fleet.pods], clients_per_pod, seconds, prompt_tokens, max_tokens, q),
        )
        gen0 = sum(p.core.stats().generation_tokens for p in fleet.pods)
        cpu0, t0 = time.process_time(), time.monotonic()
        proc.start()
        lags: list[float] = []
        while proc.is_alive():
            await asyncio.sleep(0.5)
            for p in fleet.pods:
                if p._busy:
                    lags.append((asyncio.get_running_loop().time() - p._t0) - p._sim)
        wall = time.monotonic() - t0
        cpu = time.process_time() - cpu0
        tokens, requests, errors = await asyncio.to_thread(q.get)
        proc.join()
        gen = sum(p.core.stats().generation_tokens for p in fleet.pods) - gen0
    return {
        "pods": pods, "clients": pods * clients_per_pod, "tokens_per_s": tokens / seconds,
        "engine_tokens_per_s": gen / wall, "requests": requests, "errors": errors,
        "lag_p50_ms": 1e3 * sorted(lags)[len(lags) // 2] if lags else 0.0,
        "lag_max_ms": 1e3 * max(lags) if lags else 0.0, "server_cpu": cpu / wall,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m e2e.bench.sim_capacity")
    ap.add_argument("--pods", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--clients-per-pod", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args(argv)
    print("pods clients  streamed_tok/s  engine_tok/s  requests errors  lag_p50_ms lag_max_ms  server_cpu")
    for n in args.pods:
        r = asyncio.run(_measure(n, args.clients_per_pod, args.seconds, args.prompt_tokens, args.max_tokens))
        print(f"{r['pods']:4d} {r['clients']:7d} {r['tokens_per_s']:15.0f} {r['engine_tokens_per_s']:13.0f} "
              f"{r['requests']:9d} {r['errors']:6d} {r['lag_p50_ms']:11.1f} {r['lag_max_ms']:10.1f} "
              f"{r['server_cpu']:10.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
