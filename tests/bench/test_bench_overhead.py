"""e2e/bench/overhead.py: the parts that run without Envoy (the plot of --json files; the streamed rows' clients
spread over one stream so they do not stay in lockstep)."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from aiohttp import web

from e2e.bench import overhead


def _row(prompt: str, conc: int, path: str, stream: int, added: float) -> dict:
    return {"prompt": prompt, "concurrency": conc, "stream_tokens": stream, "path": path, "added_p50_ms": added,
            "added_p99_ms": 2 * added, "added_ttft_p50_ms": added / 2, "added_ttft_p99_ms": added,
            "picker_cpu_net_ms_per_req": 0.7}


def test_plot_draws_every_row_of_every_run(tmp_path):
    runs = {}
    for label, added in (("before", 1.2), ("after", 0.9)):
        f = tmp_path / f"{label}.json"
        rows = [_row("4KB", 1, "ext-authz", 0, added), _row("4KB", 32, "ext-authz", 300, added)]
        if label == "after":
            rows.append(_row("200KB", 1, "ext-authz-unbatched", 0, 2.5))  # a row only one run has
        f.write_bytes(orjson.dumps({"rows": rows}))
        runs[label] = str(f)
    png = tmp_path / "out.png"
    overhead.plot_runs(runs, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with pytest.raises(KeyError):  # a file that is not the bench's --json output is refused, not half-drawn
        bad = tmp_path / "bad.json"
        bad.write_bytes(orjson.dumps({"rows": [{"prompt": "4KB"}]}))
        overhead.plot_runs({"bad": str(bad)}, tmp_path / "bad.png")


async def test_staggered_clients_start_spread_over_the_window():
    """With stagger_s, client k sends its first request k/conc of the window after the first: never all at once
    (requests that all last the same would otherwise keep the clients in lockstep, a burst every round)."""
    starts: list[float] = []
    loop = asyncio.get_running_loop()

    async def complete(request: web.Request) -> web.Response:
        starts.append(loop.time())
        await request.read()
        await asyncio.sleep(0.5)  # a stream's length: each client holds its request (as a 6 s stream does)
        return web.Response(body=b"{}", content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/completions", complete)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        lat, _ = await overhead._run(f"http://127.0.0.1:{port}", [b"{}"], 4, 4, stagger_s=0.4)
        assert len(lat) == 4  # nothing is set apart as a start burst
        gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        assert min(gaps) > 0.05  # ~0.1 s apart (0.4 s over 4 clients)
        starts.clear()
        lat, _ = await overhead._run(f"http://127.0.0.1:{port}", [b"{}"], 4, 4)
        assert lat == [] and starts[-1] - starts[0] < 0.05  # without: one burst, reported apart
    finally:
        await runner.cleanup()
