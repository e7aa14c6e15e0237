"""/metrics parsing (old and new vLLM names) and the scraper's health accounting against a real server."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from pickers.clock import MonotonicClock
from pickers.config import ConfigError, build_scheduler
from pickers.datalayer.promparse import SAMPLE_NAMES, MetricsParseError, parse_vllm_metrics, restricted_url
from pickers.types import Endpoint

from .helpers import metrics_page, request

NEW = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
vllm:num_requests_waiting_by_reason{engine="0",reason="x"} 99.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 400.0
vllm:time_to_first_token_seconds_bucket{le="0.1"} 5.0
vllm:cache_config_info{block_size="128",cache_dtype="auto",enable_prefix_caching="True",num_gpu_blocks="5000"} 1.0
vllm:lora_requests_info{max_lora="2",running_lora_adapters="a,b",waiting_lora_adapters=""} 100.0
vllm:lora_requests_info{max_lora="2",running_lora_adapters="c",waiting_lora_adapters="d"} 200.0
"""
OLD = "vllm:gpu_cache_usage_perc{model_name=\"m\"} 0.5\nvllm:num_requests_running{model_name=\"m\"} 1\n"


def test_parse_new_and_old_names():
    m = parse_vllm_metrics(NEW)
    assert (m.running, m.waiting, m.kv_usage) == (5.0, 4.0, 0.25)
    assert (m.block_size, m.num_gpu_blocks) == (128, 5000)
    assert (m.prefix_cache_queries, m.prefix_cache_hits) == (1000.0, 400.0)
    assert (m.running_lora_adapters, m.waiting_lora_adapters, m.max_lora) == (("c",), ("d",), 2)
    assert parse_vllm_metrics(OLD).kv_usage == 0.5
    with pytest.raises(MetricsParseError):
        parse_vllm_metrics("<html>not metrics</html>")


@pytest.mark.parametrize("shift", range(0, 13, 3))
@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_a_wanted_line_counts_wherever_it_stands(shift, eol):
    """The scan matches at line starts: the first line, CRLF pages and any order of lines give the same figures,
    and a name inside another line (or a longer name) is not a match."""
    lines = NEW.splitlines()
    lines = lines[shift:] + lines[:shift]  # rotate: each wanted line takes its turn as the first
    noise = ['# HELP x vllm:num_requests_running{model_name="m"} 77.0', "vllm:num_requests_running_total 9"]
    page = eol.join(lines[:2] + noise + lines[2:])
    assert parse_vllm_metrics(page) == parse_vllm_metrics(NEW)


def test_restricted_url_names_every_family_read_after_the_query_it_had():
    from urllib.parse import parse_qsl, urlsplit

    url = restricted_url("http://10.0.0.1:8000/metrics?x=1")
    parts = urlsplit(url)
    assert (parts.netloc, parts.path) == ("10.0.0.1:8000", "/metrics")
    query = parse_qsl(parts.query)
    assert query[0] == ("x", "1") and [v for k, v in query[1:] if k == "name[]"] == list(SAMPLE_NAMES)
    assert {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc",
            "vllm:cache_config_info"} <= set(SAMPLE_NAMES)


async def test_scraper_feeds_metrics_and_health():
    """Against a server that ignores the name[] filter (sends the whole page): the scraper asked for exactly the
    families it reads, and reads them from the whole page."""
    state = {"ok": True}
    asked: list[list[str]] = []

    async def metrics(request):
        asked.append(request.query.getall("name[]", []))
        return web.Response(text=NEW) if state["ok"] else web.Response(status=500)

    async with metrics_page(metrics) as port:
        ep = Endpoint(f"127.0.0.1:{port}")
        s = build_scheduler({"datalayer": {"scrape_interval_ms": 10, "failure_threshold": 2, "dp_ranks": "off"}},
                            [ep], MonotonicClock(), registry=CollectorRegistry())
        dl = s.dl
        try:
            await s.start()
            assert await _until(lambda: dl.metrics.running[0] == 5.0)
            assert dl.metrics.waiting[0] == 4.0 and dl.endpoints.block_size[0] == 128
            assert asked and all(a == list(SAMPLE_NAMES) for a in asked)
            state["ok"] = False
            assert await _until(lambda: not dl.health.healthy[0])
            state["ok"] = True
            assert await _until(lambda: dl.health.healthy[0])
            assert any(t.get_name() == f"scrape {ep.scrape_url}" for t in asyncio.all_tasks())
            s.decide(request("r", list(range(300))))
        finally:
            await s.stop()
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("scrape ") and not t.done()]


async def test_scrape_read_families_only_false_gets_the_configured_url_as_it_is():
    """A bad setting is a ConfigError naming it; off, every GET carries the configured query alone."""
    asked: list[str] = []

    async def metrics(request):
        asked.append(request.query_string)
        return web.Response(text=NEW)

    with pytest.raises(ConfigError, match="scrape_read_families_only"):
        build_scheduler({"datalayer": {"scrape_read_families_only": "yes"}}, [], MonotonicClock(),
                        registry=CollectorRegistry())
    async with metrics_page(metrics) as port:
        s = build_scheduler({"datalayer": {"scrape_interval_ms": 10, "scrape_read_families_only": False}},
                            [Endpoint(f"127.0.0.1:{port}", metrics_url=f"http://127.0.0.1:{port}/metrics?x=1")],
                            MonotonicClock(), registry=CollectorRegistry())
        try:
            await s.start()
            assert await _until(lambda: s.dl.metrics.running[0] == 5.0)
            assert asked and set(asked) == {"x=1"}
        finally:
            await s.stop()


async def _until(pred, timeout_s: float = 2.0) -> bool:
    for _ in range(int(timeout_s / 0.01)):
        if pred():
            return True
        await asyncio.sleep(0.01)
    return bool(pred())
