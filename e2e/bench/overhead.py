"""Latency kvswitch adds to Envoy: Envoy alone -> one sim pod vs Envoy + kvswitch -> the same pod.

    .venv/bin/python -m e2e.bench.overhead [--requests-scale 1.0] [--upstream fast|sim] [--pods 4]
        [--scheduler framework|simple] [--sizes 4KB,200KB] [--concurrency 1,32,150]
        [--paths ext-authz,access-log,observe] [--stream-tokens 64]

Non-streaming completions with max_tokens 1, 4 KB and 200 KB prompts, concurrency 1, 32 and 150. The
upstream is by default a fast fake vLLM (``--upstream fast``: aiohttp, fixed JSON reply with ``usage``, a
vLLM-shaped /metrics page so the framework's scraper finds it healthy) on ``--pods`` ports in one process, so
the upstream keeps up at 200 KB and concurrency 150 (one sim pod saturates near 140 req/s there);
``--upstream sim`` uses the simulator (time scale 0.001) instead. Envoy alone round-robins over the same pods.
Runs alternate between the two paths in halves to cancel drift. Prints
p50/p99 per path, the added latency and its ratio to DESIGN.md's budgets, throughput, the picker process's CPU
per request, and an in-process decisions/s figure (parse + schedule + reply messages, 64 pods, 8K-token
prompts) on one core. Not part of `make test`: timings belong in benchmarks.

``--realistic`` gives the rows that matter for serving (4 KB, 40 KB and 200 KB prompts, concurrency 1, 32 and
150, 300-token streamed responses 20 ms per token), and every row also reports the added time to the first
response byte (the client's TTFT). ``--json FILE`` writes the rows: added_p50_ms, added_p99_ms,
added_ttft_p50_ms, added_ttft_p99_ms, picker_cpu_ms_per_req, throughput_ratio (kvswitch / Envoy alone),
response_body mode and the machine's load. At concurrency > 1 the latency columns are the steady state of that
many requests in flight: the start burst of each run (every client's first request, sent in one instant) is
kept out of them and reported apart (start_burst_requests, start_burst_added_p99_ms); throughput and CPU per
request count every request.

``--paths ext-authz,access-log,observe`` runs one picker + Envoy pair per path (ext-authz: Envoy's ext_authz filter
asks the picker over HTTP, the default of ``kvswitch up``; the others are ext_proc response modes; skip: Envoy sends
no response body to
the picker) and interleaves them with Envoy alone in every row. ``--stream-tokens N`` adds rows with streamed
responses (``stream: true``, N SSE events from the fast upstream, ``--token-interval-ms`` apart so Envoy sees
them as separate body chunks): that is where skip saves picker CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
import uvloop

from e2e.support.envoy import EnvoyProcess
from e2e.support.picker import wait_grpc_health
from e2e.support.ports import free_port
from extproc.envoyconfig.builder import RESPONSE_MODES, EnvoyConfigOptions

REPO = Path(__file__).resolve().parents[2]
_FAST_METRICS = (b"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name=\"m\"} 0.0\n"
                 b"vllm:num_requests_waiting{model_name=\"m\"} 0.0\nvllm:kv_cache_usage_perc{model_name=\"m\"} 0.1\n"
                 b"vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"100000\"} 1.0\n")


def serve_fast_upstream(ports: list[int], host: str = "127.0.0.1") -> None:
    """A fake vLLM that costs almost nothing per request: read the body, answer a fixed completion."""
    from aiohttp import web

    reply = orjson.dumps({"id": "cmpl-1", "object": "text_completion", "model": MODEL,
                          "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
                          "usage": {"prompt_tokens": 1024, "completion_tokens": 1, "total_tokens": 1025,
                                    "prompt_tokens_details": {"cached_tokens": 0}}})

    interval = float(os.environ.get("KVSWITCH_BENCH_TOKEN_INTERVAL_MS", "1")) / 1000
    event = b'data: {"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":"x"}]}\n\n'
    last = (b"data: " + orjson.dumps({"id": "cmpl-1", "object": "text_completion", "choices": [],
                                      "usage": {"prompt_tokens": 1024, "completion_tokens": 1,
                                                "prompt_tokens_details": {"cached_tokens": 0}}})
            + b"\n\ndata: [DONE]\n\n")

    async def complete(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if b'"stream":true' not in body:
            return web.Response(body=reply, content_type="application/json")
        n = int(orjson.loads(body).get("max_tokens") or 1)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(n):
            await resp.write(event)
            await asyncio.sleep(interval)
        await resp.write(last)
        await resp.write_eof()
        return resp

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=_FAST_METRICS, content_type="text/plain")

    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def go() -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", complete)
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/health", health)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        for port in ports:
            await web.TCPSite(runner, host, port).start()
        await asyncio.Event().wait()

    asyncio.run(go())


def serve_picker(port: int, endpoints: list[str], simple: bool, response_body: str = "access-log",
                 decide_port: int = -1) -> None:
    """The picker as ``kvswitch serve`` runs it; ``simple``: the least-inflight profile without admission
    (no metrics read: the request path alone); ``decide_port``: the ext_authz front's port (-1: off)."""
    from extproc.config import config_from_dict
    from extproc.serve import freeze_startup_objects
    from extproc.server import build_scheduler, build_server

    cfg = config_from_dict({"server": {"host": "127.0.0.1", "grpc_port": port, "metrics_port": -1,
                                       "response_body": response_body, "decide_port": decide_port},
                            "endpoints": [{"address": a} for a in endpoints],
                            "scheduler": SIMPLE if simple else None})
    sched = build_scheduler(cfg)

    async def go() -> None:
        server = build_server(cfg, sched)
        await server.start()
        freeze_startup_objects()  # as kvswitch serve does once it is up
        await server.wait_for_termination()

    asyncio.run(go())
MODEL = "bench-model"
SIMPLE = {"profile": "least-inflight", "admission": []}  # the ext_proc path with the cheapest useful decision
# DESIGN.md budgets for the added latency (ms): (prompt size, concurrency, percentile) -> budget
BUDGETS = {("4KB", 1, "p50"): 1.0, ("4KB", 1, "p99"): 3.0, ("200KB", 1, "p50"): 2.0, ("200KB", 150, "p99"): 20.0}
SIZES = {"4KB": 4 * 1024, "40KB": 40 * 1024, "200KB": 200 * 1024}


# Issue 16's budgets for the client's added TTFT on the streamed (realistic) rows (ms)
TTFT_BUDGETS = {("4KB", 1, "p50"): 1.0, ("200KB", 1, "p50"): 2.0, ("4KB", 32, "p99"): 10.0}


def plot_runs(runs: dict[str, str], png: Path) -> None:
    """One bar group per (row, path) of the ``--json`` files ``runs`` (label -> file): added p50 and p99 (of the
    client's TTFT on streamed rows, where the whole request is the stream) and the picker's CPU per request, net
    of its idle background, each run a colour. The budgets (``BUDGETS``, ``TTFT_BUDGETS``) are drawn where a row
    has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = {label: orjson.loads(Path(f).read_bytes())["rows"] for label, f in runs.items()}

    def key(r: dict) -> tuple[str, int, int, str]:
        return r["prompt"], r["stream_tokens"], r["concurrency"], r["path"]

    keys = list(dict.fromkeys(key(r) for rows in docs.values() for r in rows))
    panels = (("added p50 (ms)", "p50", "added_p50_ms", "added_ttft_p50_ms"),
              ("added p99 (ms)", "p99", "added_p99_ms", "added_ttft_p99_ms"),
              ("picker CPU per request, net (ms)", None, "picker_cpu_net_ms_per_req", "picker_cpu_net_ms_per_req"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8.0, 1.1 * len(keys)), 10), sharex=True)
    width = 0.8 / max(1, len(docs))
    for ax, (title, pct, plain, streamed) in zip(axes, panels, strict=True):
        for i, (label, rows) in enumerate(docs.items()):
            by = {key(r): r for r in rows}
            xs = [k + i * width for k, name in enumerate(keys) if name in by]
            ys = [by[name][streamed if name[1] else plain] for name in keys if name in by]
            ax.bar(xs, ys, width, label=label)
        for k, (prompt, stream, conc, _) in enumerate(keys):
            budget = (TTFT_BUDGETS if stream else BUDGETS).get((prompt, conc, pct)) if pct else None
            if budget is not None:
                ax.hlines(budget, k - 0.1, k + 0.7, colors="red", linestyles="dashed")
        ax.set_ylabel(title)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.grid(axis="y", alpha=0.3)
    axes[2].axhline(1.0, color="red", linestyle="dashed", linewidth=0.8)  # per streamed request (issue 16)
    names = [f"{prompt}{f'/s{stream}' if stream else ''} c{conc}\n{path}" for prompt, stream, conc, path in keys]
    axes[-1].set_xticks([k + 0.4 - width / 2 for k in range(len(keys))], names, fontsize=7)
    axes[0].legend(fontsize=8)
    axes[0].set_title("kvswitch's added latency over Envoy alone (dashed: the budgets)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _is_authz(path: str) -> bool:
    return path.startswith("ext-authz")


def _response_body(path: str) -> str:
    """The picker's and Envoy's response mode for a bench path (ext-authz takes the access log)."""
    return "access-log" if _is_authz(path) else path


def _prompts(size: int, n: int = 32, stream_tokens: int = 0) -> list[bytes]:
    rnd = random.Random(size)
    out = []
    for _ in range(n):
        text = "".join(rnd.choices(string.ascii_lowercase + " ", k=size))
        doc = {"model": MODEL, "prompt": text, "max_tokens": 1}
        if stream_tokens:
            doc.update(max_tokens=stream_tokens, stream=True)
        out.append(orjson.dumps(doc))
    return out


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _run(url: str, bodies: list[bytes], concurrency: int, total: int,
               ttft: list[float] | None = None, burst: list[float] | None = None,
               stagger_s: float = 0.0) -> tuple[list[float], float]:
    """Latencies of ``total`` requests at ``concurrency`` (and, into ``ttft``, the time to the first body
    chunk: for a streamed response, its first token) and the elapsed wall time.

    At concurrency > 1 the first ``concurrency`` requests start in the same instant (every worker's first
    request): that start burst is not the steady state of ``concurrency`` requests in flight the budgets are
    about, so its latencies go to ``burst`` instead of the returned list (and its first tokens are not in
    ``ttft``); the elapsed time and throughput count every request. ``stagger_s`` > 0 spreads the clients' first
    requests evenly over that many seconds instead (a streamed row: one stream's duration), so that clients
    whose requests all last the same do not stay in lockstep, every round a burst of ``concurrency`` decisions;
    nothing is then reported apart."""
    lat: list[float] = []
    ramp = concurrency if concurrency > 1 and stagger_s <= 0 else 0
    next_i = 0
    errors = 0
    conn = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    async with aiohttp.ClientSession(connector=conn) as s:
        async def worker(k: int) -> None:
            nonlocal next_i, errors
            if stagger_s > 0:
                await asyncio.sleep(k * stagger_s / concurrency)
            while next_i < total:
                i = next_i
                next_i += 1
                body = bodies[i % len(bodies)]
                t0 = time.perf_counter()
                async with s.post(url + "/v1/completions", data=body,
                                  headers={"content-type": "application/json"}) as r:
                    first = True
                    async for _ in r.content.iter_any():
                        if first and ttft is not None and i >= ramp:
                            ttft.append(time.perf_counter() - t0)
                        first = False
                    if r.status != 200:
                        errors += 1
                took = time.perf_counter() - t0
                if i >= ramp:
                    lat.append(took)
                elif burst is not None:
                    burst.append(took)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - t0
    if errors:
        print(f"  warning: {errors} non-200 responses", file=sys.stderr)
    return lat, elapsed


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] * 1000


async def _wait_http(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(url)
            await asyncio.sleep(0.1)


def decisions_per_second(prompt_tokens: int = 8192, pods: int = 64, seconds: float = 3.0,
                         simple: bool = False) -> tuple[float, str]:
    """In-process: ext_proc state machine (request and response path) + the framework scheduler, one core,
    no network; pods' metrics are fed once and a frozen clock keeps them fresh."""
    from e2e.support.extproc_fakes import REQUEST_HEADERS, body, headers
    from extproc.config import config_from_dict
    from extproc.stream import ExtProcStream, StreamSettings
    from pickers.clock import ManualClock
    from pickers.config import build_scheduler as framework_build
    from pickers.datalayer.metrics import PodMetrics

    cfg = config_from_dict({"endpoints": [{"address": f"10.0.{i // 250}.{i % 250 + 1}:8000", "role": "decode"}
                                          for i in range(pods)]})
    clock = ManualClock(1000.0)  # frozen: the metrics fed below never go stale
    sched = framework_build(SIMPLE if simple else None, cfg.endpoint_objects(), clock, network=False)
    for i, ep in enumerate(cfg.endpoints):
        sched.dl.metrics.update(ep.address, PodMetrics(waiting=i % 3, running=i % 7, kv_usage=0.3))
    rnd = random.Random(1)
    # 8K tokens at ~4 bytes per token; 16 shared prefixes so prefix scoring has something to find
    prefixes = ["".join(rnd.choices(string.ascii_lowercase, k=prompt_tokens * 3)) for _ in range(16)]
    reqs = [orjson.dumps({"model": MODEL, "prompt": prefixes[i % 16] + "".join(
        rnd.choices(string.ascii_lowercase, k=prompt_tokens))}) for i in range(64)]
    settings = StreamSettings()
    hdr = headers(REQUEST_HEADERS)
    msgs = [body(r, True) for r in reqs]
    resp_hdr = headers({":status": "200", "content-type": "application/json"}, response=True)
    resp_body = body(orjson.dumps({"choices": [{"text": "x"}], "usage": {"prompt_tokens": prompt_tokens,
                                                                         "completion_tokens": 1}}), True,
                     response=True)

    async def go() -> int:
        n = 0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            s = ExtProcStream(sched, settings, clock)
            await s.handle(hdr)
            out = await s.handle(msgs[n % len(msgs)])
            assert out[0].HasField("request_headers"), out[0]
            await s.handle(resp_hdr)
            await s.handle(resp_body)
            s.close()
            n += 1
        return n

    t0 = time.process_time()
    n = asyncio.run(go())
    cpu = time.process_time() - t0
    return n / cpu, f"profile {sched.profile}"


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"load {os.getloadavg()[0]:.2f}"


# ext-authz (with the access log, its entries batched by --batch-flush-ms as by default; -unbatched: one message per
# entry), or ext_proc with a response mode
PATHS = ("ext-authz", "ext-authz-unbatched", *RESPONSE_MODES)


async def main_async(args: argparse.Namespace) -> None:
    ports = [free_port() for _ in range(args.pods)]
    modes = args.paths.split(",")
    for m in modes:
        if m not in PATHS:
            raise SystemExit(f"--paths: {m!r} is not one of {', '.join(PATHS)}")
    picker_ports = {m: free_port() for m in modes}
    decide_ports = {m: free_port() if _is_authz(m) else -1 for m in modes}
    logdir = Path(tempfile.mkdtemp(prefix="kvswitch-bench-"))
    pods = [f"127.0.0.1:{p}" for p in ports]
    if args.upstream == "sim":
        fleet = logdir / "fleet.yaml"  # 200 KB prompts (~50K tokens) need a context longer than the 32K default
        fleet.write_text(f"defaults: {{max_model_len: 131072, model_name: {MODEL}}}\npods:\n"
                         f"  - {{count: {args.pods}, name: bench}}\n")
        up_cmd = [sys.executable, "-m", "engine.sim", "--config", str(fleet), "--base-port", str(ports[0]),
                  "--no-kv-events", "--time-scale", "0.001", "--host", "127.0.0.1"]
        pods = [f"127.0.0.1:{ports[0] + i}" for i in range(args.pods)]
    else:
        up_cmd = [sys.executable, "-m", "e2e.bench.overhead", "--serve-upstream", ",".join(map(str, ports))]
    env = {**os.environ, "KVSWITCH_BENCH_TOKEN_INTERVAL_MS": str(args.token_interval_ms)}
    sim = subprocess.Popen(up_cmd, cwd=REPO, stdout=open(logdir / "upstream.log", "wb"), stderr=subprocess.STDOUT,
                           env=env)
    pickers: dict[str, subprocess.Popen] = {}
    for m, port in picker_ports.items():
        cmd = [sys.executable, "-m", "e2e.bench.overhead", "--serve-picker", str(port), "--endpoints",
               ",".join(pods), "--picker-response-body", _response_body(m), "--picker-decide-port",
               str(decide_ports[m])] + (["--simple"] if args.scheduler == "simple" else [])
        if args.picker_profile:
            cmd = [sys.executable, "-m", "cProfile", "-o", f"{args.picker_profile}.{m}"] + cmd[1:]
        pickers[m] = subprocess.Popen(cmd, cwd=REPO, stdout=open(logdir / f"picker-{m}.log", "wb"),
                                      stderr=subprocess.STDOUT)
    alone = EnvoyProcess(EnvoyConfigOptions(ext_proc=False, endpoints=pods))
    withk = {m: EnvoyProcess(EnvoyConfigOptions(
        picker=f"127.0.0.1:{port}", endpoints=pods, response_body=_response_body(m),
        picker_protocol="ext-authz" if _is_authz(m) else "ext-proc",
        access_log_flush_ms=0.0 if m.endswith("-unbatched") else args.batch_flush_ms,
        picker_decide=[f"127.0.0.1:{decide_ports[m]}"] if _is_authz(m) else []))
        for m, port in picker_ports.items()}
    try:
        for a in pods:
            await _wait_http(f"http://{a}/health")
        for port in picker_ports.values():
            await wait_grpc_health(f"127.0.0.1:{port}")
        await alone.start()
        for e in withk.values():
            await e.start()
        # The picker's background CPU (metrics scrapes, health, readiness) while idle: subtracted from each
        # row's picker CPU for the per-request figure (both are reported).
        # Settle first: a picker's first seconds (imports on first use, the first scrapes, Envoy's first health
        # checks) cost more than its steady background and would be subtracted from every request after.
        await asyncio.sleep(3.0)
        idle0 = {m: _cpu_seconds(p.pid) for m, p in pickers.items()}
        t_idle = time.perf_counter()
        await asyncio.sleep(5.0)
        idle_rate = {m: (_cpu_seconds(p.pid) - idle0[m]) / (time.perf_counter() - t_idle) for m, p in pickers.items()}
        print("# picker idle CPU: " + ", ".join(f"{m} {r * 1e3:.1f} ms/s" for m, r in idle_rate.items()))
        streamed = [(f"s{args.stream_tokens}", args.stream_tokens)] if args.stream_tokens else []
        shapes = streamed if args.streamed_only and streamed else [("", 0), *streamed]
        print(f"# Envoy alone vs Envoy + kvswitch ({args.scheduler} scheduler, paths: {', '.join(modes)}); "
              f"{args.pods} {args.upstream} pods; non-streaming max_tokens 1"
              + (f", and s{args.stream_tokens} rows: stream true, {args.stream_tokens} SSE events "
                 f"{args.token_interval_ms:g} ms apart" if args.stream_tokens else "")
              + f"; {os.cpu_count()} CPUs shared by client, Envoy, picker and upstream")
        print(f"# uptime: {_uptime()}")
        print(f"{'prompt':>9} {'conc':>4} {'path':>10} {'n':>5} | {'alone p50':>9} {'p99':>7} | {'kvs p50':>8} "
              f"{'p99':>7} | {'+p50':>6} {'+p99':>6} | {'budget':>14} | {'req/s a':>7} {'req/s k':>7} | "
              f"{'picker CPU/req (net of idle)':>14}")
        concs = [int(c) for c in args.concurrency.split(",")]
        rows: list[dict[str, object]] = []
        for shape, stream_tokens in shapes:
            for size_name in args.sizes.split(","):
                size = SIZES[size_name]
                bodies = _prompts(size, stream_tokens=stream_tokens)
                for conc in concs:
                    base = {1: 400, 32: 1600, 150: 3000}.get(conc, 1600)
                    if size_name == "200KB":
                        base //= 2
                    if stream_tokens:
                        base //= 4
                    total = max(conc * 2, int(base * args.requests_scale))
                    # warm-up every path (a streamed request lasts its whole stream: two rounds of clients)
                    warm = min(total, 2 * conc if stream_tokens else 200)
                    # streamed rows: clients spread over one stream's duration, not in lockstep (see _run)
                    stagger = stream_tokens * args.token_interval_ms / 1000 if conc > 1 else 0.0
                    await _run(alone.url, bodies, conc, warm, stagger_s=stagger)
                    for e in withk.values():
                        await _run(e.url, bodies, conc, warm, stagger_s=stagger)
                    la: list[float] = []
                    fa: list[float] = []
                    ba: list[float] = []
                    ta = 0.0
                    fk: dict[str, list[float]] = {m: [] for m in modes}
                    bk: dict[str, list[float]] = {m: [] for m in modes}  # start bursts (see _run)
                    lk: dict[str, list[float]] = {m: [] for m in modes}
                    tk = {m: 0.0 for m in modes}
                    cpu_k = {m: 0.0 for m in modes}
                    for half in range(2):  # alone, then each mode, twice (order flipped) to cancel drift
                        x, t = await _run(alone.url, bodies, conc, total // 2, fa, ba, stagger)
                        la += x
                        ta += t
                        for m in (modes if half == 0 else modes[::-1]):
                            c0 = _cpu_seconds(pickers[m].pid)
                            x, t = await _run(withk[m].url, bodies, conc, total // 2, fk[m], bk[m], stagger)
                            cpu_k[m] += _cpu_seconds(pickers[m].pid) - c0
                            lk[m] += x
                            tk[m] += t
                    a50, a99 = _pct(la, 50), _pct(la, 99)
                    done_a = len(la) + len(ba)  # every request of the row, start bursts included: throughput and CPU
                    done_k = {m: len(lk[m]) + len(bk[m]) for m in modes}
                    net = {m: max(0.0, cpu_k[m] - idle_rate[m] * tk[m]) / done_k[m] * 1e3 for m in modes}

                    label = f"{size_name}{'/' + shape if shape else ''}"
                    for m in modes:
                        k50, k99 = _pct(lk[m], 50), _pct(lk[m], 99)
                        budget = []
                        for pname, added in (("p50", k50 - a50), ("p99", k99 - a99)):
                            b = None if stream_tokens else BUDGETS.get((size_name, conc, pname))
                            if b:
                                budget.append(f"{pname} {added / b:.2f}x of {b:g}ms")
                        print(f"{label:>9} {conc:>4} {m:>10} {len(lk[m]):>5} | {a50:8.2f}m {a99:6.2f}m | "
                              f"{k50:7.2f}m {k99:6.2f}m | {k50 - a50:6.2f} {k99 - a99:6.2f} | "
                              f"{', '.join(budget) or '-':>14} | {done_a / ta:7.0f} {done_k[m] / tk[m]:7.0f} | "
                              f"{cpu_k[m] / done_k[m] * 1e3:7.3f} ({net[m]:.3f} net) ms", flush=True)
                        rows.append({
                            "prompt": size_name, "concurrency": conc, "stream_tokens": stream_tokens,
                            "path": m, "picker_protocol": "ext-authz" if _is_authz(m) else "ext-proc",
                            "response_body": _response_body(m), "requests": len(lk[m]),
                            "added_p50_ms": round(k50 - a50, 3), "added_p99_ms": round(k99 - a99, 3),
                            "added_ttft_p50_ms": round(_pct(fk[m], 50) - _pct(fa, 50), 3),
                            "added_ttft_p99_ms": round(_pct(fk[m], 99) - _pct(fa, 99), 3),
                            "start_burst_requests": len(bk[m]),
                            "start_burst_added_p99_ms": (round(_pct(bk[m], 99) - _pct(ba, 99), 3)
                                                         if bk[m] and ba else None),
                            "picker_cpu_ms_per_req": round(cpu_k[m] / done_k[m] * 1e3, 4),
                            "picker_cpu_net_ms_per_req": round(net[m], 4),
                            "picker_idle_cpu_ms_per_s": round(idle_rate[m] * 1e3, 3),
                            "throughput_ratio": round((done_k[m] / tk[m]) / (done_a / ta), 4),
                            "load_1min": round(os.getloadavg()[0], 2),
                        })
        print(f"# uptime: {_uptime()}")
        if args.json:
            Path(args.json).write_text(orjson.dumps({"rows": rows, "upstream": args.upstream, "pods": args.pods,
                                                     "scheduler": args.scheduler}, option=orjson.OPT_INDENT_2)
                                       .decode())
            print(f"# rows written to {args.json}")
    finally:
        await alone.stop()
        for e in withk.values():
            await e.stop()
        for p in (*pickers.values(), sim):
            p.terminate()  # SIGTERM: the serve helpers exit through SystemExit, so cProfile still writes
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m e2e.bench.overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests-scale", type=float, default=1.0, help="multiply request counts")
    p.add_argument("--json", metavar="FILE", help="write one record per row: added p50/p99 latency and TTFT, picker "
                                                   "CPU per request, throughput ratio, response-body mode")
    p.add_argument("--realistic", action="store_true",
                   help="the realistic rows: 4 KB, 40 KB and 200 KB prompts at concurrency 1, 32 and 150 with "
                        "300-token streamed responses at a decode-like pace (20 ms per token)")
    p.add_argument("--decisions-only", action="store_true")
    p.add_argument("--upstream", choices=("fast", "sim"), default="fast")
    p.add_argument("--pods", type=int, default=4)
    p.add_argument("--scheduler", choices=("framework", "simple"), default="framework")
    p.add_argument("--sizes", default="4KB,200KB")
    p.add_argument("--concurrency", default="1,32,150")
    p.add_argument("--no-decisions", action="store_true", help="skip the in-process decisions/s figures")
    p.add_argument("--picker-profile", metavar="FILE", help="run each picker under cProfile, stats to FILE.<mode>")
    p.add_argument("--paths", default="ext-authz",
                   help="comma-separated request paths, one picker + Envoy each, interleaved in every row: ext-authz "
                        "(the default of kvswitch up: ext_authz over HTTP, outcomes from the access log) or an "
                        "ext_proc response mode (access-log, observe, skip, detach); ext-authz-unbatched: ext-authz "
                        "with one access-log message per entry")
    p.add_argument("--batch-flush-ms", type=float, default=EnvoyConfigOptions.access_log_flush_ms,
                   help="Envoy's access-log batching interval on the access-log paths (default: kvswitch's, "
                        f"{EnvoyConfigOptions.access_log_flush_ms:g} ms)")
    p.add_argument("--stream-tokens", type=int, default=0,
                   help="also run rows with streamed responses of this many SSE events (e.g. 64)")
    p.add_argument("--streamed-only", action="store_true",
                   help="with --stream-tokens (or --realistic): only the streamed rows")
    p.add_argument("--token-interval-ms", type=float, default=1.0,
                   help="gap between the fast upstream's SSE events (so they reach Envoy as separate chunks)")
    p.add_argument("--picker-response-body", default="access-log", help=argparse.SUPPRESS)
    p.add_argument("--picker-decide-port", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--serve-upstream", metavar="PORTS", help=argparse.SUPPRESS)
    p.add_argument("--serve-picker", type=int, metavar="PORT", help=argparse.SUPPRESS)
    p.add_argument("--endpoints", default="", help=argparse.SUPPRESS)
    p.add_argument("--simple", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--plot", nargs="+", metavar="LABEL=FILE.json",
                   help="only plot: the added p50/p99 (TTFT for streamed rows) and picker CPU per request of each "
                        "--json file, row by row, side by side, into --png")
    p.add_argument("--png", default="overhead.png", help="with --plot: the figure's path")
    args = p.parse_args(argv)
    if args.plot:
        plot_runs(dict(item.split("=", 1) for item in args.plot), Path(args.png))
        print(f"wrote {args.png}")
        return 0
    if args.realistic:
        args.sizes, args.concurrency = "4KB,40KB,200KB", "1,32,150"
        args.stream_tokens, args.token_interval_ms = 300, 20.0
    if args.serve_upstream or args.serve_picker:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.serve_upstream:
        try:
            serve_fast_upstream([int(x) for x in args.serve_upstream.split(",")])
        except KeyboardInterrupt:
            pass
        return 0
    if args.serve_picker:
        if os.environ.get("KVSWITCH_BENCH_LOOP", "uvloop") == "uvloop":
            uvloop.install()
        try:
            serve_picker(args.serve_picker, args.endpoints.split(","), args.simple, args.picker_response_body,
                         args.picker_decide_port)
        except KeyboardInterrupt:
            pass
        return 0
    if args.decisions_only:
        for simple in (False, True):
            rate, kind = decisions_per_second(simple=simple)
            print(f"decisions/s ({kind}, 64 pods, 8K-token prompts, one core): {rate:,.0f}")
        return 0
    uvloop.install()
    asyncio.run(main_async(args))
    if args.no_decisions:
        return 0
    simple_rate, _ = decisions_per_second(simple=True)
    print(f"\ndecisions/s on one core with the least-inflight profile (the ext_proc path alone): {simple_rate:,.0f}")
    rate, kind = decisions_per_second()
    print(f"decisions/s on one core (in-process ext_proc state machine + {kind}, 64 pods, 8K-token prompts): "
          f"{rate:,.0f}  (budget >= 3,000: {rate / 3000:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
